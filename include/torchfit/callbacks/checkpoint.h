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
#include <exception>
#include <memory>
#include <optional>
#include <string>

#include "torchfit/callbacks/monitor.h"
#include "torchfit/engine/checkpoint_manager.h"
#include "torchfit/engine/checkpoint_options.h"
#include "torchfit/io/checkpoint_io.h"

namespace torchfit {

/// Saves the model (weights only, or a full checkpoint) at epoch ends or every n
/// batches, optionally only when the monitored quantity improves.
class CheckpointCallback : public MonitorCallback {
 public:
  /// Throws `ValueError` for an empty filepath, a bad save_freq, save_top_k or max_to_keep.
  explicit CheckpointCallback(CheckpointOptions options);
  /// Waits for an async save in flight.
  ~CheckpointCallback() override;

  const CheckpointOptions& options() const { return manager_->options(); }
  /// The manager that decides and writes; its tables are this callback's state.
  CheckpointManager& manager() { return *manager_; }
  /// Path of the last file this callback saved; empty before the first save.
  /// With async_save the file is complete once `wait()` returns.
  const std::string& last_saved_path() const { return manager_->last_saved_path(); }
  /// Waits for an async save in flight and raises its error, if any.
  void wait();

  void on_train_begin(const Logs& logs) override;
  void on_train_end(const Logs& logs) override;
  void on_epoch_begin(int64_t epoch, const Logs& logs) override;
  void on_epoch_end(int64_t epoch, const Logs& logs) override;
  void on_train_batch_end(int64_t batch, const Logs& logs) override;
  void on_before_update() override;

  /// Built from the filepath and every option that changes decisions.
  std::string state_key() const override;
  c10::IValue state_dict() const override;
  void load_state_dict(const c10::IValue& state) override;

  /// `filepath` formatted with 1-based `epoch`, optional 1-based `batch` and the
  /// logs. Throws `ValueError` naming the template, the missing key and the
  /// available keys.
  static std::string format_filepath(const std::string& filepath, int64_t epoch,
                                     std::optional<int64_t> batch, const Logs& logs);

 private:
  void save_model(int64_t epoch, std::optional<int64_t> batch, const Logs& logs);
  /// Data-parallel async saves: rank 0 waits for its save in flight and every
  /// rank raises its error, if any.
  void settle_across_ranks();

  std::unique_ptr<CheckpointManager> manager_;
  int64_t current_epoch_ = 0;
  bool async_save_ = false;       // as configured (ranks other than 0 write nothing, so save synchronously)
  bool background_save_ = false;  // data-parallel: an async save whose outcome the ranks have not shared
  std::exception_ptr inline_failure_;  // data-parallel, rank 0: that save ran inline and failed
};

}  // namespace torchfit
