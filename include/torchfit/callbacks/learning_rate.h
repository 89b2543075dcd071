#pragma once
/// \file
/// Learning-rate callbacks: LearningRateScheduler and ReduceLROnPlateau (Keras semantics).
/// Both set the lr of every param group of the trainer's optimizer.
///
///     auto plateau = std::make_shared<torchfit::ReduceLROnPlateau>(
///         torchfit::ReduceLROnPlateauOptions().monitor("val_loss").factor(0.5).patience(3));
///     auto decay = std::make_shared<torchfit::LearningRateScheduler>(
///         [](int64_t epoch, double lr) { return epoch < 10 ? lr : lr * 0.9; });

#include <cstdint>
#include <functional>
#include <string>

#include "torchfit/arg.h"
#include "torchfit/callbacks/monitor.h"

namespace torchfit {

/// At each epoch start, sets the lr to `schedule(epoch, current_lr)`.
class LearningRateScheduler : public Callback {
 public:
  using Schedule = std::function<double(int64_t epoch, double lr)>;
  explicit LearningRateScheduler(Schedule schedule, int verbose = 0);

  void on_epoch_begin(int64_t epoch, const Logs& logs) override;

 private:
  Schedule schedule_;
  int verbose_;
};

/// Options of ReduceLROnPlateau, with chainable setters; see Keras's ReduceLROnPlateau.
class ReduceLROnPlateauOptions {
 public:
  TORCHFIT_ARG(std::string, monitor) = "val_loss";
  /// New lr = lr * factor; must be below 1.
  TORCHFIT_ARG(double, factor) = 0.1;
  TORCHFIT_ARG(int64_t, patience) = 10;
  TORCHFIT_ARG(int, verbose) = 0;
  TORCHFIT_ARG(Mode, mode) = Mode::Auto;
  TORCHFIT_ARG(double, min_delta) = 1e-4;
  /// Epochs to wait after a reduction before counting again.
  TORCHFIT_ARG(int64_t, cooldown) = 0;
  TORCHFIT_ARG(double, min_lr) = 0.0;
};

/// Multiplies the lr by `factor` when the monitored value has not improved for
/// `patience` epochs.
class ReduceLROnPlateau : public MonitorCallback {
 public:
  /// Throws `ValueError` for factor >= 1 or negative patience/cooldown.
  explicit ReduceLROnPlateau(ReduceLROnPlateauOptions options = ReduceLROnPlateauOptions());

  void on_train_begin(const Logs& logs) override;
  void on_epoch_end(int64_t epoch, const Logs& logs) override;

  /// Built from every option, so two instances keep separate state.
  std::string state_key() const override;
  c10::IValue state_dict() const override;
  void load_state_dict(const c10::IValue& state) override;

 private:
  ReduceLROnPlateauOptions options_;
  int64_t wait_ = 0;
  int64_t cooldown_counter_ = 0;
};

}  // namespace torchfit
