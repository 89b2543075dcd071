#include "torchfit/callbacks/monitor.h"

#include <cmath>

#include <fmt/format.h>

#include "torchfit/error.h"
#include "torchfit/trainer.h"

namespace torchfit {

Mode resolve_mode(Mode mode, const std::string& monitor, const Trainer* trainer,
                  const std::string& owner) {
  if (mode != Mode::Auto) return mode;
  std::string name = monitor.rfind("val_", 0) == 0 ? monitor.substr(4) : monitor;
  if (name == "loss") return Mode::Min;
  if (trainer != nullptr) {
    if (const Metric* metric = trainer->find_metric(name)) return metric->direction;
  }
  throw ValueError(fmt::format(
      "{} callback received monitor={}, but torchfit cannot tell whether that metric should be "
      "maximized or minimized. Pass .mode(torchfit::Mode::Max) to keep the highest value, or "
      ".mode(torchfit::Mode::Min) to keep the lowest.",
      owner, monitor));
}

MonitorCallback::MonitorCallback(std::string name, std::string monitor, Mode mode,
                                 std::optional<double> baseline, double min_delta)
    : name_(std::move(name)),
      monitor_(std::move(monitor)),
      mode_(mode),
      best_(baseline),
      min_delta_(std::abs(min_delta)) {
  if (monitor_.empty()) throw ValueError(fmt::format("{}: monitor must not be empty", name_));
  if (best_ && std::isnan(*best_)) {
    throw ValueError(fmt::format("{}: the initial best value of {} must not be NaN", name_, monitor_));
  }
}

void MonitorCallback::on_train_begin(const Logs&) {
  mode_ = resolve_mode(mode_, monitor_, trainer_, name_);
}

bool MonitorCallback::is_improvement(double value, std::optional<double> reference) const {
  if (std::isnan(value)) return false;
  if (!reference) return true;
  return mode_ == Mode::Max ? value - min_delta_ > *reference : value + min_delta_ < *reference;
}

CallbackState MonitorCallback::state() const {
  CallbackState out;
  if (best_) out["best"] = fmt::format("{}", *best_);
  return out;
}

void MonitorCallback::load_state(const CallbackState& state) {
  if (auto it = state.find("best"); it != state.end()) {
    try {
      best_ = std::stod(it->second);
    } catch (const std::exception&) {
      throw CheckpointError(fmt::format("{} ({}): corrupt saved state: best='{}'", name_, monitor_, it->second));
    }
  }
  restored_ = true;
}

void MonitorCallback::read_field(const CallbackState& state, const char* field, int64_t& out) const {
  auto it = state.find(field);
  if (it == state.end()) return;
  try {
    out = std::stoll(it->second);
  } catch (const std::exception&) {
    throw CheckpointError(fmt::format("{} ({}): corrupt saved state: {}='{}'", name_, monitor_, field, it->second));
  }
}

std::optional<double> MonitorCallback::current(const Logs& logs) const {
  auto it = logs.find(monitor_);
  if (it == logs.end()) return std::nullopt;
  return it->second;
}

}  // namespace torchfit
