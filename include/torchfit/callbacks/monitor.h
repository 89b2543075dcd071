#pragma once
/// \file
/// The monitor-and-mode logic shared by CheckpointCallback and the other callbacks
/// that watch a quantity (as Keras's MonitorCallback).
///
///     class MyCallback : public torchfit::MonitorCallback { ... };  // monitor(), mode(), best()

#include <optional>
#include <string>
#include <utility>

#include <memory>

#include "torchfit/callback.h"
#include "torchfit/engine/metric_monitor.h"
#include "torchfit/mode.h"

namespace torchfit {

/// Watches one log key and decides what counts as an improvement.
class MonitorCallback : public Callback {
 public:
  const std::string& monitor() const { return monitor_; }
  /// The configured mode; `Auto` until resolved by `on_train_begin`.
  Mode mode() const { return tracker_->mode(); }
  /// Best value seen so far (or the initial threshold); empty before any.
  std::optional<double> best() const { return tracker_->best(); }

  /// Resolves `Mode::Auto` against the trainer's metrics.
  void on_train_begin(const Logs& logs) override;

  /// `{"best": ...}`, for full checkpoints; subclasses add their own fields.
  c10::IValue state_dict() const override;
  void load_state_dict(const c10::IValue& state) override;

 protected:
  /// `name` is the callback's class name, used in messages.
  MonitorCallback(std::string name, std::string monitor, Mode mode,
                  std::optional<double> baseline, double min_delta = 0.0);
  /// Shares `tracker` (its mode and best) with another user, such as a CheckpointManager.
  MonitorCallback(std::string name, std::shared_ptr<MetricMonitor> tracker);

  /// Strictly better than `reference` by more than min_delta; NaN never is.
  /// An empty reference is beaten by any number.
  bool is_improvement(double value, std::optional<double> reference) const;
  /// The monitored value in `logs`, if present.
  std::optional<double> current(const Logs& logs) const;

  const std::string& name() const { return name_; }
  /// The integer `field` of a state dict built on ours; throws CheckpointError
  /// naming the callback and field if it is missing or not an integer.
  int64_t int_field(const c10::IValue& state, const char* field) const;
  /// True once after `load_state`: the next `on_train_begin` continues the
  /// restored state instead of starting afresh.
  bool take_restored() { return std::exchange(restored_, false); }

  std::string name_;
  std::string monitor_;
  std::shared_ptr<MetricMonitor> tracker_;
  bool restored_ = false;
};

/// Resolves `Mode::Auto` for `monitor`: `loss`/`val_loss` are minimised, otherwise
/// the direction of the trainer's metric of that name (after stripping `val_`).
/// Throws `ValueError` naming `owner` and `monitor` when no direction is known.
Mode resolve_mode(Mode mode, const std::string& monitor, const Trainer* trainer,
                  const std::string& owner);

}  // namespace torchfit
