#pragma once
/// \file
/// EarlyStopping: stop training when a monitored quantity stops improving (Keras semantics).
///
///     auto stopper = std::make_shared<torchfit::EarlyStopping>(
///         torchfit::EarlyStoppingOptions().monitor("val_loss").patience(3).restore_best_weights(true));

#include <cstdint>
#include <optional>
#include <string>

#include "torchfit/arg.h"
#include "torchfit/callbacks/monitor.h"
#include "torchfit/serialize.h"

namespace torchfit {

/// Options of EarlyStopping, with chainable setters; see Keras's EarlyStopping.
class EarlyStoppingOptions {
 public:
  TORCHFIT_ARG(std::string, monitor) = "val_loss";
  /// Changes smaller than this (in absolute value) do not count as improvements.
  TORCHFIT_ARG(double, min_delta) = 0.0;
  /// Epochs without improvement after which training stops.
  TORCHFIT_ARG(int64_t, patience) = 0;
  TORCHFIT_ARG(int, verbose) = 0;
  TORCHFIT_ARG(Mode, mode) = Mode::Auto;
  /// Training stops unless the monitored value beats this within `patience` epochs.
  TORCHFIT_ARG(std::optional<double>, baseline);
  /// At the end of training, restore the weights of the best epoch.
  TORCHFIT_ARG(bool, restore_best_weights) = false;
  /// Epochs to wait before monitoring starts (warm-up).
  TORCHFIT_ARG(int64_t, start_from_epoch) = 0;
};

/// Sets `stop_training` when the monitored quantity has not improved for
/// `patience` epochs.
class EarlyStopping : public MonitorCallback {
 public:
  /// Throws `ValueError` for a negative patience or start_from_epoch.
  explicit EarlyStopping(EarlyStoppingOptions options = EarlyStoppingOptions());

  const EarlyStoppingOptions& options() const { return options_; }
  /// 0-based epoch at which training was stopped; 0 if it was not.
  int64_t stopped_epoch() const { return stopped_epoch_; }
  /// 0-based epoch of the best value.
  int64_t best_epoch() const { return best_epoch_; }
  /// Epochs since the last improvement.
  int64_t wait() const { return wait_; }

  void on_train_begin(const Logs& logs) override;
  void on_epoch_end(int64_t epoch, const Logs& logs) override;
  void on_train_end(const Logs& logs) override;

  /// Built from every option, so two EarlyStopping instances keep separate state.
  std::string state_key() const override;
  /// Counters, best value and, with restore_best_weights, the best weights.
  c10::IValue state_dict() const override;
  void load_state_dict(const c10::IValue& state) override;

 private:
  EarlyStoppingOptions options_;
  int64_t wait_ = 0;
  int64_t stopped_epoch_ = 0;
  int64_t best_epoch_ = 0;
  std::optional<TensorMap> best_weights_;
};

}  // namespace torchfit
