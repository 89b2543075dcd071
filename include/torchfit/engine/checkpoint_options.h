#pragma once
/// \file
/// What `CheckpointManager` and `CheckpointCallback` save, when, and what they keep;
/// the arguments of Keras's `ModelCheckpoint` plus retention and storage.
///
///     torchfit::CheckpointOptions("ckpt/{epoch:02d}-{val_loss:.4f}.pt")
///         .monitor("val_accuracy").save_best_only(true).save_top_k(3).async_save(true)

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "torchfit/arg.h"
#include "torchfit/io/async_policy.h"
#include "torchfit/mode.h"

namespace torchfit {

class CheckpointIO;

/// When to save: at each epoch end (every call of `CheckpointManager::save`), every
/// n batches (calls), every s seconds of training, or a batch and a time trigger
/// together, whichever comes first:
///
///     SaveFreq::batches(500) | SaveFreq::seconds(600)
class SaveFreq {
 public:
  /// The clock of the time trigger, in seconds (default: `std::chrono::steady_clock`).
  using Clock = std::function<double()>;

  /// At the end of every epoch (the default); the manager saves at every call.
  static SaveFreq epoch() { return SaveFreq(); }
  /// Every call of `CheckpointManager::save`: `epoch()` by the name an own loop reads.
  static SaveFreq every_call() { return SaveFreq(); }
  /// When n batches (calls) have run since the last save; the count carries
  /// across epochs. Throws `ValueError` if n <= 0.
  static SaveFreq batches(int64_t n);
  /// At the first batch end (call) after `s` seconds of training since the last save.
  /// Time is counted from the first call after the start (or a restore) of a run: the
  /// time a run is down is not counted, and an interval cut by a kill starts again.
  /// Throws `ValueError` unless s > 0 and finite.
  static SaveFreq seconds(double s);
  /// Both triggers: a save when either is due; both restart at each save point.
  /// Throws `ValueError` unless one side counts batches and the other seconds.
  friend SaveFreq operator|(const SaveFreq& a, const SaveFreq& b);
  /// Reads time from `clock` instead (for tests: a fake clock, no sleeps).
  SaveFreq& clock(Clock clock);

  bool is_epoch() const { return every_n_batches_ == 0 && every_seconds_ == 0; }
  /// n for `batches(n)`, 0 without a batch trigger.
  int64_t every_n_batches() const { return every_n_batches_; }
  /// s for `seconds(s)`, 0 without a time trigger.
  double every_seconds() const { return every_seconds_; }
  /// Whether `calls` calls and `seconds` of training since the last save make a save point.
  bool due(int64_t calls, double seconds) const;
  /// The trigger's clock, in seconds.
  double now() const;
  /// "epoch", "batches(3)", "seconds(60)" or "batches(3) | seconds(60)".
  std::string to_string() const;

 private:
  SaveFreq() = default;
  int64_t every_n_batches_ = 0;
  double every_seconds_ = 0;
  Clock clock_;
};

namespace detail {

/// The running side of a `SaveFreq`: the time trigger's clock since the last save point.
/// The caller counts calls (the manager keeps the count in its saved record).
class SaveTrigger {
 public:
  /// Whether `calls` calls since the last save point make one now; if so, the clock
  /// restarts. The clock starts at the first check after construction or `restart_clock`.
  bool fires(const SaveFreq& freq, int64_t calls);
  /// The clock starts again at the next check: the time a run was down does not count.
  void restart_clock() { interval_start_.reset(); }

 private:
  std::optional<double> interval_start_;
};

}  // namespace detail

/// Options of CheckpointManager and CheckpointCallback, with chainable setters.
class CheckpointOptions {
 public:
  /// `filepath` may hold Python-style fields: `{epoch:02d}` (1-based), `{batch}`
  /// (1-based, batch-level saves only), `{step}` and any log key (`{val_loss:.4f}`).
  explicit CheckpointOptions(std::string filepath) : filepath_(std::move(filepath)) {}

  const std::string& filepath() const { return filepath_; }

  /// The log key whose value decides `save_best_only` and `save_top_k`.
  TORCHFIT_ARG(std::string, monitor) = "val_loss";
  /// 0: silent; 1: a line per save decision, as Keras prints them.
  TORCHFIT_ARG(int, verbose) = 0;
  /// Save only when the monitored value improves on the best so far.
  TORCHFIT_ARG(bool, save_best_only) = false;
  /// Save only the model's weights (a state dict `torch.load` reads) instead of
  /// everything the checkpoint holds.
  TORCHFIT_ARG(bool, save_weights_only) = false;
  /// Whether lower or higher is better; `Auto` takes it from the metric.
  TORCHFIT_ARG(Mode, mode) = Mode::Auto;
  /// When the callback saves; the manager counts its `save` calls the same way.
  TORCHFIT_ARG(SaveFreq, save_freq) = SaveFreq::epoch();
  /// The initial "best": with save_best_only, only a better value saves.
  TORCHFIT_ARG(std::optional<double>, initial_value_threshold);
  /// fsync the file and its directory on commit (default true). Turn off only for comparisons.
  TORCHFIT_ARG(bool, fsync) = true;
  /// Save in the background (default false): the training thread only copies the
  /// state into reusable buffers; a writer thread serializes and commits. At most
  /// one save is in flight; a writer error is raised at the next save or `wait()`.
  TORCHFIT_ARG(bool, async_save) = false;
  /// With async_save: where each save runs. `Measured` (default) saves on the training thread
  /// when that measured cheaper for it (small states, busy cores); `Always` in the background.
  TORCHFIT_ARG(AsyncPolicy, async_policy) = AsyncPolicy::Measured;
  /// Keep only the k best files by the monitored value (-1, the default, keeps
  /// all). A save that would not rank among the k best is skipped; the worst is
  /// deleted only after the new file is committed. Only files this manager
  /// wrote are deleted, never the file the run resumed from.
  TORCHFIT_ARG(int64_t, save_top_k) = -1;
  /// With save_best_only(false): keep the newest n files (-1, the default, keeps all).
  TORCHFIT_ARG(int64_t, max_to_keep) = -1;
  /// After each save, record it as the newest (`torchfit_latest.txt` next to the
  /// files); read it back with `latest_checkpoint(dir)` or `restore_latest`.
  TORCHFIT_ARG(bool, save_last) = false;
  /// The storage (default: files, `FileCheckpointIO` with `fsync()`). With
  /// `async_save`, saves run in the background through it.
  TORCHFIT_ARG(std::shared_ptr<CheckpointIO>, io);
  /// Runs with a file's path once the file and its directory entry are durable (after
  /// `save_last`'s pointer and retention), for uploaders and loggers; never for a save
  /// that failed or was skipped. With async_save it runs on the writer thread. An
  /// exception from it is raised like a writer error (by that save, or with async_save by
  /// the next save or `wait()`); the file stays saved and the manager's tables keep it.
  TORCHFIT_ARG(std::function<void(const std::string& path)>, on_commit);

 private:
  std::string filepath_;
};

}  // namespace torchfit
