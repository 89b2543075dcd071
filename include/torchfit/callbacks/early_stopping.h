#pragma once
/// \file
/// EarlyStopping: stop training when a monitored quantity stops improving (Keras semantics).
///
///     auto stopper = std::make_shared<torchfit::EarlyStopping>(
///         torchfit::EarlyStoppingOptions().monitor("val_loss").patience(3).restore_best_weights(true));

#include <cstdint>
#include <optional>
#include <string>

#include "torchfit/callbacks/monitor.h"
#include "torchfit/serialize.h"

namespace torchfit {

/// Options of EarlyStopping, with chainable setters; see Keras's EarlyStopping.
class EarlyStoppingOptions {
 public:
  EarlyStoppingOptions& monitor(std::string value) { monitor_ = std::move(value); return *this; }
  /// Changes smaller than this (in absolute value) do not count as improvements.
  EarlyStoppingOptions& min_delta(double value) { min_delta_ = value; return *this; }
  /// Epochs without improvement after which training stops.
  EarlyStoppingOptions& patience(int64_t value) { patience_ = value; return *this; }
  EarlyStoppingOptions& verbose(int value) { verbose_ = value; return *this; }
  EarlyStoppingOptions& mode(Mode value) { mode_ = value; return *this; }
  /// Training stops unless the monitored value beats this within `patience` epochs.
  EarlyStoppingOptions& baseline(double value) { baseline_ = value; return *this; }
  /// At the end of training, restore the weights of the best epoch.
  EarlyStoppingOptions& restore_best_weights(bool value) { restore_best_weights_ = value; return *this; }
  /// Epochs to wait before monitoring starts (warm-up).
  EarlyStoppingOptions& start_from_epoch(int64_t value) { start_from_epoch_ = value; return *this; }

  const std::string& monitor() const { return monitor_; }
  double min_delta() const { return min_delta_; }
  int64_t patience() const { return patience_; }
  int verbose() const { return verbose_; }
  Mode mode() const { return mode_; }
  const std::optional<double>& baseline() const { return baseline_; }
  bool restore_best_weights() const { return restore_best_weights_; }
  int64_t start_from_epoch() const { return start_from_epoch_; }

 private:
  std::string monitor_ = "val_loss";
  double min_delta_ = 0.0;
  int64_t patience_ = 0;
  int verbose_ = 0;
  Mode mode_ = Mode::Auto;
  std::optional<double> baseline_;
  bool restore_best_weights_ = false;
  int64_t start_from_epoch_ = 0;
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
