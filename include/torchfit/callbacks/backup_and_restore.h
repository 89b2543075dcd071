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

#include "torchfit/arg.h"
#include "torchfit/callback.h"
#include "torchfit/callbacks/checkpoint.h"

namespace torchfit {

/// Options of BackupAndRestore, with chainable setters; see Keras's BackupAndRestore.
class BackupOptions {
 public:
  explicit BackupOptions(std::string backup_dir) : backup_dir_(std::move(backup_dir)) {}

  const std::string& backup_dir() const { return backup_dir_; }

  /// When to back up: at epoch boundaries (default), every n batches, every s seconds of
  /// training, or both (`SaveFreq::batches(n) | SaveFreq::seconds(s)`), at batch starts.
  TORCHFIT_ARG(SaveFreq, save_freq) = SaveFreq::epoch();
  /// Remove the backup when training ends normally (default true).
  TORCHFIT_ARG(bool, delete_checkpoint) = true;
  /// Keep the previous backup too, and fall back to it if the newest does not verify.
  TORCHFIT_ARG(bool, double_checkpoint) = false;
  /// fsync backups on commit (default true).
  TORCHFIT_ARG(bool, fsync) = true;
  /// Write backups in the background (default false); see `CheckpointOptions::async_save`.
  TORCHFIT_ARG(bool, async_save) = false;
  /// The storage (default: files, `FileCheckpointIO` with `fsync()`). Every read, write,
  /// rename and removal of a backup goes through it.
  TORCHFIT_ARG(std::shared_ptr<CheckpointIO>, io);

 private:
  std::string backup_dir_;
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
  detail::SaveTrigger trigger_;
  int64_t last_backup_step_ = -1;
};

}  // namespace torchfit
