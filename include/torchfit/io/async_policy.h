#pragma once
/// \file
/// AsyncPolicy: where a background-saving storage runs each save.
///
///     CheckpointOptions("ckpt/{epoch}.pt").async_save(true).async_policy(torchfit::AsyncPolicy::Always);

namespace torchfit {

/// Where `AsyncCheckpointIO` runs each save.
enum class AsyncPolicy {
  /// In the background, unless saving on the caller's thread measured cheaper for the caller
  /// (the default). A background save costs the caller its time in `save` and in waits plus
  /// how much slower its steps ran meanwhile; an inline save costs its wall time. Both are
  /// measured as the saves run; every 8th save runs in the other place to follow changes.
  /// A save the caller waits for at once (`SaveHints::caller_waits`, a fit's last) runs inline.
  Measured,
  /// Always in the background.
  Always,
};

}  // namespace torchfit
