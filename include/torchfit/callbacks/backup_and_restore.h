#pragma once
/// \file
/// BackupAndRestore: resume an interrupted fit exactly where it stopped (Keras semantics).
///
///     auto backup = std::make_shared<torchfit::BackupAndRestore>(
///         torchfit::BackupOptions("/scratch/run1/backup").save_freq(torchfit::SaveFreq::batches(100)));
///     trainer.fit(x, y, torchfit::FitOptions().epochs(50).seed(1).callbacks({backup}));
///     // Killed? Run the same program again: fit continues from the last backup.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "torchfit/callback.h"
#include "torchfit/callbacks/checkpoint.h"

namespace torchfit {

/// Options of BackupAndRestore, with chainable setters; see Keras's BackupAndRestore.
class BackupOptions {
 public:
  explicit BackupOptions(std::string backup_dir) : backup_dir_(std::move(backup_dir)) {}

  /// When to back up: at epoch boundaries (default), every n batches, every s seconds of
  /// training, or both (`SaveFreq::batches(n) | SaveFreq::seconds(s)`), at batch starts.
  BackupOptions& save_freq(SaveFreq value) { save_freq_ = value; return *this; }
  /// Remove the backup when training ends normally (default true).
  BackupOptions& delete_checkpoint(bool value) { delete_checkpoint_ = value; return *this; }
  /// Keep the previous backup too, and fall back to it if the newest does not verify.
  BackupOptions& double_checkpoint(bool value) { double_checkpoint_ = value; return *this; }
  /// fsync backups on commit (default true).
  BackupOptions& fsync(bool value) { fsync_ = value; return *this; }
  /// Write backups in the background (default false); see `CheckpointOptions::async_save`.
  BackupOptions& async_save(bool value) { async_save_ = value; return *this; }

  const std::string& backup_dir() const { return backup_dir_; }
  const SaveFreq& save_freq() const { return save_freq_; }
  bool delete_checkpoint() const { return delete_checkpoint_; }
  bool double_checkpoint() const { return double_checkpoint_; }
  bool fsync() const { return fsync_; }
  bool async_save() const { return async_save_; }

 private:
  std::string backup_dir_;
  SaveFreq save_freq_ = SaveFreq::epoch();
  bool delete_checkpoint_ = true;
  bool double_checkpoint_ = false;
  bool fsync_ = true;
  bool async_save_ = false;
};

/// Backs up the whole training state (model, optimizer, epoch and batch position,
/// shuffle seed, RNG, partial epoch logs, every callback's state and the history)
/// and restores it in `on_train_begin`, so a restarted fit ends bitwise equal to
/// an uninterrupted one.
class BackupAndRestore : public Callback {
 public:
  /// Throws `ValueError` for an empty directory.
  explicit BackupAndRestore(BackupOptions options);

  const BackupOptions& options() const { return options_; }
  /// The newest backup file and the previous one (kept with double_checkpoint).
  std::string backup_path() const;
  std::string previous_backup_path() const;
  /// Whether `on_train_begin` restored a backup.
  bool restored() const { return restored_; }

  /// Restores the newest backup that verifies, before any callback's `on_train_begin`.
  void on_train_setup() override;
  void on_train_end(const Logs& logs) override;
  void on_epoch_begin(int64_t epoch, const Logs& logs) override;
  void on_train_batch_begin(int64_t batch, const Logs& logs) override;
  void on_train_batch_end(int64_t batch, const Logs& logs) override;
  void on_before_update() override;

 private:
  /// Backs up now, unless nothing was trained since the last backup or restore.
  void backup();
  void write_backup();

  BackupOptions options_;
  std::unique_ptr<CheckpointManager> manager_;
  bool restored_ = false;
  int64_t batches_since_backup_ = 0;
  std::optional<double> interval_start_;  // the time trigger's clock at the last backup or start
  int64_t last_backup_step_ = -1;
};

}  // namespace torchfit
