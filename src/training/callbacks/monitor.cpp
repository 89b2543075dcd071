#include "torchfit/callbacks/monitor.h"

#include <ATen/core/ivalue.h>
#include <fmt/format.h>

#include "format/state_fields.h"
#include "torchfit/error.h"
#include "torchfit/metrics.h"
#include "torchfit/training_context.h"

namespace torchfit {

namespace {

detail::StateFields saved_fields(const c10::IValue& state, const std::string& name, const std::string& monitor) {
  return detail::StateFields(state, fmt::format("{} ({})", name, monitor), "corrupt saved state");
}

/// How a MetricMonitor learns the direction of a metric: from the run's registered metrics.
auto metric_directions(const TrainingContext* context) {
  return [context](const std::string& name) {
    const Metric* metric = context != nullptr ? context->find_metric(name) : nullptr;
    return metric != nullptr ? metric->direction : Mode::Auto;
  };
}

}  // namespace

Mode resolve_mode(Mode mode, const std::string& monitor, const Trainer* trainer, const std::string& owner) {
  MetricMonitor tracker(owner, monitor, mode);
  const TrainingContext* context = trainer != nullptr ? context_of(trainer) : nullptr;
  tracker.resolve(metric_directions(context), context != nullptr ? context->log_keys() : std::vector<std::string>{});
  return tracker.mode();
}

MonitorCallback::MonitorCallback(std::string name, std::string monitor, Mode mode, std::optional<double> baseline,
                                 double min_delta)
    : MonitorCallback(name, std::make_shared<MetricMonitor>(name, std::move(monitor), mode, baseline, min_delta)) {}

MonitorCallback::MonitorCallback(std::string name, std::shared_ptr<MetricMonitor> tracker)
    : name_(std::move(name)), monitor_(tracker->monitor()), tracker_(std::move(tracker)) {}

void MonitorCallback::on_train_begin(const Logs&) {
  tracker_->resolve(metric_directions(context_), context_ != nullptr ? context_->log_keys() : std::vector<std::string>{});
}

bool MonitorCallback::is_improvement(double value, std::optional<double> reference) const {
  return tracker_->is_improvement(value, reference);
}

std::optional<double> MonitorCallback::current(const Logs& logs) const { return tracker_->current(logs); }

c10::IValue MonitorCallback::state_dict() const {
  c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
  auto best = tracker_->best();
  out.insert("best", best ? c10::IValue(*best) : c10::IValue());
  return out;
}

void MonitorCallback::load_state_dict(const c10::IValue& state) {
  tracker_->set_best(saved_fields(state, name_, monitor_).optional_number("best"));
  restored_ = true;
}

int64_t MonitorCallback::int_field(const c10::IValue& state, const char* field) const {
  return saved_fields(state, name_, monitor_).integer(field);
}

}  // namespace torchfit
