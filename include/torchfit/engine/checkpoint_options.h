#pragma once
/// \file
/// What `CheckpointManager` and `CheckpointCallback` save, when, and what they keep;
/// the arguments of Keras's `ModelCheckpoint` plus retention and storage.
///
///     torchfit::CheckpointOptions("ckpt/{epoch:02d}-{val_loss:.4f}.pt")
///         .monitor("val_accuracy").save_best_only(true).save_top_k(3).async_save(true)

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "torchfit/arg.h"
#include "torchfit/mode.h"

namespace torchfit {

class CheckpointIO;

/// When to save: at each epoch end, or every n batches (or every n calls of
/// `CheckpointManager::save`).
class SaveFreq {
 public:
  /// At the end of every epoch (the default); the manager saves at every call.
  static SaveFreq epoch() { return SaveFreq(0); }
  /// When n batches (calls) have run since the last save; the count carries
  /// across epochs. Throws `ValueError` if n <= 0.
  static SaveFreq batches(int64_t n);

  bool is_epoch() const { return every_n_batches_ == 0; }
  /// n for `batches(n)`, 0 for `epoch()`.
  int64_t every_n_batches() const { return every_n_batches_; }

 private:
  explicit SaveFreq(int64_t n) : every_n_batches_(n) {}
  int64_t every_n_batches_;
};

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

 private:
  std::string filepath_;
};

}  // namespace torchfit
