#pragma once
// Running two jobs at once on two threads.

#include <functional>

namespace torchfit::detail {

/// Runs `first` here and `second` on a helper thread; rethrows the first's error,
/// else the second's. The helper starts on another CPU than the caller's (when the process may
/// run on another), unless the caller is a background thread.
void run_pair(const std::function<void()>& first, const std::function<void()>& second);

/// Marks the calling thread as one that works beside training (the async writer): its
/// `run_pair` helpers go where the scheduler puts them, since the other CPU is training's.
void mark_background_thread();

}  // namespace torchfit::detail
