#pragma once
/// \file
/// The monitor-and-mode logic shared by CheckpointManager and every callback that
/// watches a quantity (Keras's MonitorCallback): which log key, which direction
/// is better, and the best value so far.
///
///     torchfit::MetricMonitor monitor("MyCallback", "val_loss", torchfit::Mode::Auto);
///     if (auto value = monitor.current(logs); value && monitor.is_improvement(*value, monitor.best())) ...

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "torchfit/logs.h"
#include "torchfit/mode.h"

namespace torchfit {

/// Watches one log key and decides what counts as an improvement.
class MetricMonitor {
 public:
  /// `owner` names the user in messages ("CheckpointCallback"). `baseline` is
  /// the initial best. Throws `ValueError` for an empty monitor or a NaN baseline.
  MetricMonitor(std::string owner, std::string monitor, Mode mode, std::optional<double> baseline = std::nullopt,
                double min_delta = 0.0);

  const std::string& owner() const { return owner_; }
  const std::string& monitor() const { return monitor_; }
  /// The configured mode; `Auto` until `resolve` is called.
  Mode mode() const { return mode_; }
  double min_delta() const { return min_delta_; }
  /// Best value seen so far (or the baseline); empty before any.
  std::optional<double> best() const { return best_; }
  void set_best(std::optional<double> value) { best_ = value; }
  /// Forgets the values seen: `best` returns to the baseline.
  void reset() { best_ = baseline_; }

  /// Resolves `Mode::Auto`: `loss` and `val_loss` are minimised; other names ask
  /// `metric_direction` (given the name without `val_`), which returns `Auto`
  /// when it does not know. Throws `ValueError` naming the owner and the monitor,
  /// and the nearest of `known_keys` when the monitor looks misspelt.
  void resolve(const std::function<Mode(const std::string& metric)>& metric_direction = {},
               const std::vector<std::string>& known_keys = {});
  /// Strictly better than `reference` by more than min_delta; NaN never is.
  /// An empty reference is beaten by any number. Resolves `Auto` first.
  bool is_improvement(double value, std::optional<double> reference);
  /// The monitored value in `logs`, if present.
  std::optional<double> current(const Logs& logs) const;

 private:
  std::string owner_;
  std::string monitor_;
  Mode mode_;
  std::optional<double> baseline_;
  std::optional<double> best_;
  double min_delta_;
};

}  // namespace torchfit
