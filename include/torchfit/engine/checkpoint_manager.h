#pragma once
/// \file
/// `CheckpointManager`: when to save and what to keep, for any training loop (as
/// Orbax's CheckpointManager). It makes the decisions of Keras's ModelCheckpoint:
/// the filepath template, monitor and mode, save_best_only, the initial threshold,
/// NaN handling; and keeps files by rank (save_top_k) and age (max_to_keep).
///
///     torchfit::CheckpointManager manager(
///         torchfit::CheckpointOptions("ckpt/{step:06d}-{g_loss:.3f}.pt")
///             .monitor("g_loss").mode(torchfit::Mode::Min).save_top_k(3).save_last(true).async_save(true));
///     state.track("step", step);                                       // saved from `step`, restored into it
///     state.track("g_loss", g_loss);
///     std::optional<std::string> from = manager.restore_latest(state);  // resume, if there is a file
///     for (; step < steps;) {
///       ...                                                            // forward, backward
///       manager.before_update();                                       // the last save's copy is done
///       g_opt.step();
///       ++step;
///       manager.save(state);                                           // {step} and g_loss from the state
///     }
///     manager.wait();                                                  // the last save is durable

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "torchfit/engine/checkpoint.h"
#include "torchfit/engine/checkpoint_options.h"
#include "torchfit/engine/metric_monitor.h"
#include "torchfit/io/checkpoint_io.h"
#include "torchfit/logs.h"

namespace torchfit {

namespace detail {
class FilepathTemplate;
}

/// Saves a `Checkpoint` when its options say so and deletes what they do not keep.
class CheckpointManager {
 public:
  /// Throws `ValueError` for an empty filepath, or a bad save_top_k or max_to_keep.
  explicit CheckpointManager(CheckpointOptions options);
  /// Shares `monitor` (its mode and best) with a callback.
  CheckpointManager(CheckpointOptions options, std::shared_ptr<MetricMonitor> monitor);
  /// Waits for a save in flight (its error is logged, not thrown).
  ~CheckpointManager();
  CheckpointManager(const CheckpointManager&) = delete;
  CheckpointManager& operator=(const CheckpointManager&) = delete;

  /// Considers a save: counts the call against `save_freq`, formats the filepath (a
  /// bad template fails here, before deciding), then applies save_best_only, NaN
  /// handling and save_top_k. The template and the monitor read the state's numeric
  /// values (set or tracked; integers format as integers, `{step:06d}`) and `logs`,
  /// which override them; log keys `epoch`, `batch` and `step` with integral values
  /// format as integers too. Returns whether a save was made (with async_save:
  /// started). Throws `ValueError` for a bad template and `CheckpointError` when
  /// writing fails; the manager's state then stays as before the call.
  /// `last_of_run`: the caller will wait for this save right away (the run ends
  /// after it), so an async manager stores it inline, where it costs less.
  bool save(const Checkpoint& state, const Logs& logs = {}, bool last_of_run = false);
  /// Call before the saved tensors change: before each `optimizer.step()` (and
  /// any other in-place change of parameters or optimizer state). Once it has
  /// been called, async saves return before copying parameters and optimizer
  /// state; the copy overlaps the next forward and backward pass, and this call
  /// only finishes it (copying what is left alongside the writer) if it is
  /// unfinished. Without it, saves copy at once.
  void before_update();
  /// Waits until the save in flight is durable; raises its error, restoring the
  /// manager's state (best, kept files) to what it was before that save.
  void wait();

  /// Restores `state` (and this manager's own state, when the file has it) from
  /// the newest intact file of this manager: the one `save_last` recorded, else
  /// files matching the filepath template, newest first. Damaged files are skipped
  /// with a warning; if there were files but none could be read, throws
  /// `CheckpointError` listing why. An I/O error reading a file is no damage: it is raised
  /// (`StorageError`, naming the path) instead of restoring an older file. Returns the path, or
  /// nothing when there is no file.
  /// The first call checks that the template's directory is writable or can be created (with the
  /// default file storage), so a loop that resumes on start fails on a bad path before training;
  /// a loop that never restores finds a bad path at its first save.
  std::optional<std::string> restore_latest(Checkpoint& state);
  /// Restores `state` and this manager's state from `path`, all or nothing, and
  /// never deletes that file afterwards.
  void restore(Checkpoint& state, const std::string& path);

  /// Best monitored value so far (or the initial threshold); empty before any.
  std::optional<double> best() const { return monitor_->best(); }
  const std::shared_ptr<MetricMonitor>& monitor() const { return monitor_; }
  const CheckpointOptions& options() const { return options_; }
  /// For the ranks other than 0 of a data-parallel run: goes on deciding every save as rank
  /// 0 does, with the same state, but stores and removes nothing (a `ReadOnlyCheckpointIO`
  /// over the storage, synchronous). Waits for a save in flight first; idempotent. A reference
  /// from `io()` taken before does not survive it.
  void store_nothing();
  /// The storage saves go through (async-wrapped with async_save).
  CheckpointIO& io() const { return *io_; }
  /// Path of the last save; empty before the first. With async_save the file is
  /// complete once `wait()` returns.
  const std::string& last_saved_path() const { return record_.last_saved_path; }
  /// The files kept by rank, best first, with their scores.
  const std::vector<std::pair<std::string, double>>& top_k() const { return record_.top_k; }
  /// The files kept by age, oldest first.
  const std::vector<std::string>& recent() const { return record_.recent; }
  /// Calls of `save` since the last save point (for `SaveFreq::batches`).
  int64_t calls_since_last_save() const { return record_.calls_since_last_save; }
  /// A file retention never deletes (the one the run resumed from).
  void protect(const std::string& path) { protected_path_ = path; }
  /// Deletes every file this manager keeps track of, after waiting for a save in flight.
  void remove_saved();

  /// The manager's own state (best, kept files, counters), as saved inside its files.
  c10::IValue state_dict() const;
  void load_state_dict(const c10::IValue& state);
  /// Checks a state `load_state_dict` would take; throws `CheckpointError`.
  void check_state_dict(const c10::IValue& state, const std::string& where) const;
  /// The key of its state inside checkpoints: the filepath, and the monitor when one
  /// decides (save_best_only or save_top_k), so managers of other files do not collide.
  std::string state_key() const;

  /// Logs values that format as integers when integral (`epoch`, `batch`, `step`).
  static bool is_integer_key(const std::string& key);

 private:
  /// What a save changes, so a failed one can be undone.
  struct Record {
    std::optional<double> best;
    std::string last_saved_path;
    std::vector<std::pair<std::string, double>> top_k;  // path and score, best first
    std::vector<std::string> recent;                    // oldest first
    int64_t calls_since_last_save = 0;
  };
  Record record() const;
  void restore_record(const Record& record);
  bool should_save(const std::string& prefix, const Logs& logs, const std::string& path);
  bool ranks_in_top_k(const std::string& path, std::optional<double> score);
  std::vector<std::string> plan_retention(const std::string& path, std::optional<double> score);
  void write(const Checkpoint& state, const std::string& path, std::vector<std::string> evict,
             const std::string& prefix, bool last_of_run);
  /// The files of this manager that exist now, newest first.
  std::vector<std::string> candidates();
  /// Once per manager, from restore_latest: the template's directory is writable or can be created.
  void check_directory();
  /// The state's numeric values overridden by `logs`; integral ones are listed in `integers`.
  Logs values_for(const Checkpoint& state, const Logs& logs, std::set<std::string>& integers) const;
  /// Raises the on_commit hook's failure, if any (the file it ran for stays saved).
  void raise_hook_failure();

  CheckpointOptions options_;
  std::shared_ptr<MetricMonitor> monitor_;
  std::unique_ptr<detail::FilepathTemplate> template_;
  std::shared_ptr<CheckpointIO> io_;
  Record record_;
  Record before_pending_;
  std::string protected_path_;
  int64_t saves_ = 0;
  bool guards_updates_ = false;  // before_update() has been called: saves may copy late
  bool directory_checked_ = false;
  detail::SaveTrigger trigger_;
  struct HookFailure;
  std::shared_ptr<HookFailure> hook_failure_;  // set on the writer thread, raised on the caller's
};

}  // namespace torchfit
