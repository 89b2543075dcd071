#include "torchfit/engine/metric_monitor.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "torchfit/error.h"

namespace torchfit {

MetricMonitor::MetricMonitor(std::string owner, std::string monitor, Mode mode, std::optional<double> baseline,
                             double min_delta)
    : owner_(std::move(owner)),
      monitor_(std::move(monitor)),
      mode_(mode),
      baseline_(baseline),
      best_(baseline),
      min_delta_(std::abs(min_delta)) {
  if (monitor_.empty()) throw ValueError(fmt::format("{}: monitor must not be empty", owner_));
  if (baseline_ && std::isnan(*baseline_)) {
    throw ValueError(fmt::format("{}: the initial best value of {} must not be NaN", owner_, monitor_));
  }
}

void MetricMonitor::resolve(const std::function<Mode(const std::string&)>& metric_direction,
                            const std::vector<std::string>& known_keys) {
  if (mode_ != Mode::Auto) return;
  std::string name = monitor_.rfind("val_", 0) == 0 ? monitor_.substr(4) : monitor_;
  if (name == "loss") {
    mode_ = Mode::Min;
  } else if (metric_direction) {
    mode_ = metric_direction(name);
  }
  if (mode_ != Mode::Auto) return;
  if (std::find(known_keys.begin(), known_keys.end(), monitor_) == known_keys.end()) {
    auto hint = did_you_mean(monitor_, known_keys);
    if (!hint.empty()) {
      throw ValueError(fmt::format("{} callback received monitor={}, which is not a metric of this run.{} Its logs "
                                   "have: {}",
                                   owner_, monitor_, hint, fmt::join(known_keys, ", ")));
    }
  }
  throw ValueError(fmt::format(
      "{} callback received monitor={}, but torchfit cannot tell whether that metric should be "
      "maximized or minimized. Pass .mode(torchfit::Mode::Max) to keep the highest value, or "
      ".mode(torchfit::Mode::Min) to keep the lowest.",
      owner_, monitor_));
}

bool MetricMonitor::is_improvement(double value, std::optional<double> reference) {
  resolve();
  if (std::isnan(value)) return false;
  if (!reference) return true;
  return mode_ == Mode::Max ? value - min_delta_ > *reference : value + min_delta_ < *reference;
}

std::optional<double> MetricMonitor::current(const Logs& logs) const {
  auto it = logs.find(monitor_);
  if (it == logs.end()) return std::nullopt;
  return it->second;
}

}  // namespace torchfit
