#pragma once
/// \file
/// Learning-rate callbacks: LearningRateScheduler and ReduceLROnPlateau (Keras semantics).
/// Both set the lr of every param group of the trainer's optimizer.

#include <cstdint>
#include <functional>
#include <string>

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
  ReduceLROnPlateauOptions& monitor(std::string value) { monitor_ = std::move(value); return *this; }
  /// New lr = lr * factor; must be below 1.
  ReduceLROnPlateauOptions& factor(double value) { factor_ = value; return *this; }
  ReduceLROnPlateauOptions& patience(int64_t value) { patience_ = value; return *this; }
  ReduceLROnPlateauOptions& verbose(int value) { verbose_ = value; return *this; }
  ReduceLROnPlateauOptions& mode(Mode value) { mode_ = value; return *this; }
  ReduceLROnPlateauOptions& min_delta(double value) { min_delta_ = value; return *this; }
  /// Epochs to wait after a reduction before counting again.
  ReduceLROnPlateauOptions& cooldown(int64_t value) { cooldown_ = value; return *this; }
  ReduceLROnPlateauOptions& min_lr(double value) { min_lr_ = value; return *this; }

  const std::string& monitor() const { return monitor_; }
  double factor() const { return factor_; }
  int64_t patience() const { return patience_; }
  int verbose() const { return verbose_; }
  Mode mode() const { return mode_; }
  double min_delta() const { return min_delta_; }
  int64_t cooldown() const { return cooldown_; }
  double min_lr() const { return min_lr_; }

 private:
  std::string monitor_ = "val_loss";
  double factor_ = 0.1;
  int64_t patience_ = 10;
  int verbose_ = 0;
  Mode mode_ = Mode::Auto;
  double min_delta_ = 1e-4;
  int64_t cooldown_ = 0;
  double min_lr_ = 0.0;
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
