#pragma once
/// \file
/// CheckpointCallback: Keras's ModelCheckpoint for LibTorch.
///
///     auto checkpoint = std::make_shared<torchfit::CheckpointCallback>(
///         torchfit::CheckpointOptions("ckpt/{epoch:02d}-{val_loss:.4f}.pt")
///             .monitor("val_accuracy")
///             .save_best_only(true));
///     trainer.fit(x, y, torchfit::FitOptions().epochs(10).callbacks({checkpoint}));
///     spdlog::info("best {} in {}", *checkpoint->best(), checkpoint->last_saved_path());

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "torchfit/callbacks/monitor.h"

namespace torchfit {

namespace detail {
class AsyncWriter;
class Snapshot;
}  // namespace detail

/// When to save: at each epoch end, or every n batches.
class SaveFreq {
 public:
  /// At the end of every epoch (the default).
  static SaveFreq epoch() { return SaveFreq(0); }
  /// When n batches have run since the last save; the count carries across
  /// epochs. Throws `ValueError` if n <= 0.
  static SaveFreq batches(int64_t n);

  bool is_epoch() const { return every_n_batches_ == 0; }
  /// n for `batches(n)`, 0 for `epoch()`.
  int64_t every_n_batches() const { return every_n_batches_; }

 private:
  explicit SaveFreq(int64_t n) : every_n_batches_(n) {}
  int64_t every_n_batches_;
};

/// Options of CheckpointCallback, with chainable setters; see Keras's ModelCheckpoint.
class CheckpointOptions {
 public:
  /// `filepath` may hold fmt/Python-style fields: `{epoch:02d}` (1-based),
  /// `{batch}` (1-based, batch-level saves only) and any log key (`{val_loss:.4f}`).
  explicit CheckpointOptions(std::string filepath) : filepath_(std::move(filepath)) {}

  CheckpointOptions& monitor(std::string value) { monitor_ = std::move(value); return *this; }
  CheckpointOptions& verbose(int value) { verbose_ = value; return *this; }
  CheckpointOptions& save_best_only(bool value) { save_best_only_ = value; return *this; }
  CheckpointOptions& save_weights_only(bool value) { save_weights_only_ = value; return *this; }
  CheckpointOptions& mode(Mode value) { mode_ = value; return *this; }
  CheckpointOptions& save_freq(SaveFreq value) { save_freq_ = value; return *this; }
  /// The initial "best": with save_best_only, only a better value saves.
  CheckpointOptions& initial_value_threshold(double value) {
    initial_value_threshold_ = value;
    return *this;
  }
  /// fsync the file and its directory on commit (default true). Turn off only for comparisons.
  CheckpointOptions& fsync(bool value) { fsync_ = value; return *this; }
  /// Save in the background (default false): the training thread only copies the
  /// state into reusable buffers; a writer thread serializes and commits. At most
  /// one save is in flight; a writer error is raised at the next save or at the
  /// end of training.
  CheckpointOptions& async_save(bool value) { async_save_ = value; return *this; }
  /// Keep only the k best files by the monitored value (-1, the default, keeps
  /// all). A save that would not rank among the k best is skipped; the worst is
  /// deleted only after the new file is committed. Only files this callback
  /// wrote are deleted, never the file the run resumed from.
  CheckpointOptions& save_top_k(int64_t value) { save_top_k_ = value; return *this; }
  /// With save_best_only(false): keep the newest n files this callback wrote
  /// (-1, the default, keeps all).
  CheckpointOptions& max_to_keep(int64_t value) { max_to_keep_ = value; return *this; }
  /// After each save, atomically update `torchfit_latest.txt` in the file's
  /// directory to name it; read it back with `latest_checkpoint(dir)`.
  CheckpointOptions& save_last(bool value) { save_last_ = value; return *this; }

  const std::string& filepath() const { return filepath_; }
  const std::string& monitor() const { return monitor_; }
  int verbose() const { return verbose_; }
  bool save_best_only() const { return save_best_only_; }
  bool save_weights_only() const { return save_weights_only_; }
  Mode mode() const { return mode_; }
  const SaveFreq& save_freq() const { return save_freq_; }
  const std::optional<double>& initial_value_threshold() const { return initial_value_threshold_; }
  bool fsync() const { return fsync_; }
  bool async_save() const { return async_save_; }
  int64_t save_top_k() const { return save_top_k_; }
  int64_t max_to_keep() const { return max_to_keep_; }
  bool save_last() const { return save_last_; }

 private:
  std::string filepath_;
  std::string monitor_ = "val_loss";
  int verbose_ = 0;
  bool save_best_only_ = false;
  bool save_weights_only_ = false;
  Mode mode_ = Mode::Auto;
  SaveFreq save_freq_ = SaveFreq::epoch();
  std::optional<double> initial_value_threshold_;
  bool fsync_ = true;
  bool async_save_ = false;
  int64_t save_top_k_ = -1;
  int64_t max_to_keep_ = -1;
  bool save_last_ = false;
};

/// Name of the pointer file `save_last` keeps next to the checkpoints.
inline constexpr const char* kLatestPointer = "torchfit_latest.txt";

/// The newest intact checkpoint in `dir`: the one the `save_last` pointer names,
/// or else the most recently modified file that verifies. Temporary and
/// unverifiable files are ignored. Empty when there is none.
std::optional<std::string> latest_checkpoint(const std::string& dir);

/// Saves the model (weights only, or a full checkpoint) at epoch ends or every n
/// batches, optionally only when the monitored quantity improves.
class CheckpointCallback : public MonitorCallback {
 public:
  /// Throws `ValueError` for an empty filepath, a bad save_freq, save_top_k or max_to_keep.
  explicit CheckpointCallback(CheckpointOptions options);
  /// Waits for an async save in flight.
  ~CheckpointCallback() override;

  const CheckpointOptions& options() const { return options_; }
  /// Path of the last file this callback saved; empty before the first save.
  /// With async_save the file is complete once `wait()` returns.
  const std::string& last_saved_path() const { return last_saved_path_; }
  /// Waits for an async save in flight and raises its error, if any.
  void wait();

  void on_train_begin(const Logs& logs) override;
  void on_train_end(const Logs& logs) override;
  void on_epoch_begin(int64_t epoch, const Logs& logs) override;
  void on_epoch_end(int64_t epoch, const Logs& logs) override;
  void on_train_batch_end(int64_t batch, const Logs& logs) override;

  std::string state_key() const override;
  CallbackState state() const override;
  void load_state(const CallbackState& state) override;

  /// `filepath` formatted with 1-based `epoch`, optional 1-based `batch` and the
  /// logs. Throws `ValueError` naming the template, the missing key and the
  /// available keys.
  static std::string format_filepath(const std::string& filepath, int64_t epoch,
                                     std::optional<int64_t> batch, const Logs& logs);

 private:
  void save_model(int64_t epoch, std::optional<int64_t> batch, const Logs& logs);
  bool should_save(int64_t epoch, const Logs& logs, const std::string& path);
  /// Writes `path` (on rank 0 only when data-parallel, then a barrier).
  void write(int64_t epoch, const std::string& path, std::vector<std::string> evict);
  /// Writes `path` now, or hands a snapshot to the writer thread; then deletes
  /// `evict` and updates the latest pointer.
  void write_here(int64_t epoch, const std::string& path, std::vector<std::string> evict);
  /// Whether a file with this score would be kept by save_top_k.
  bool ranks_in_top_k(const std::string& path, std::optional<double> score) const;
  /// Updates the top-k and newest-n tables for a save to `path`; returns the
  /// files to delete once it is committed.
  std::vector<std::string> plan_retention(const std::string& path, std::optional<double> score);

  /// What a save changes, so a failed one can be undone.
  struct Record {
    std::optional<double> best;
    std::string last_saved_path;
    std::vector<std::pair<std::string, double>> top_k;
    std::vector<std::string> recent;
  };
  Record record() const;
  void restore(const Record& record);

  CheckpointOptions options_;
  int64_t current_epoch_ = 0;
  int64_t batches_since_last_save_ = 0;
  std::string last_saved_path_;
  std::vector<std::pair<std::string, double>> top_k_;  // path and score, best first
  std::vector<std::string> recent_;                    // oldest first
  // Async saves: the reusable snapshot, the writer, and what to restore if the
  // save in flight fails.
  std::unique_ptr<detail::Snapshot> snapshot_;
  std::unique_ptr<detail::AsyncWriter> writer_;
  Record before_pending_;
  bool warned_sync_fallback_ = false;
};

}  // namespace torchfit
