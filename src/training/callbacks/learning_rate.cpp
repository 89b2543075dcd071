#include "torchfit/callbacks/learning_rate.h"

#include <cmath>

#include <ATen/core/ivalue.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "training/learning_rate.h"
#include "torchfit/error.h"
#include "torchfit/log.h"
#include "torchfit/training_context.h"

namespace torchfit {

LearningRateScheduler::LearningRateScheduler(Schedule schedule, int verbose)
    : schedule_(std::move(schedule)), verbose_(verbose) {
  if (!schedule_) throw ValueError("LearningRateScheduler: the schedule must not be empty");
}

void LearningRateScheduler::on_epoch_begin(int64_t epoch, const Logs&) {
  auto& optimizer = context_->optimizer();
  double lr = schedule_(epoch, detail::learning_rate(optimizer));
  if (!std::isfinite(lr)) {
    throw ValueError(fmt::format("LearningRateScheduler: the schedule returned lr={} at epoch {}", lr, epoch));
  }
  detail::set_learning_rate(optimizer, lr);
  if (verbose_ > 0) {
    logger()->info("Epoch {}: LearningRateScheduler setting learning rate to {}.", epoch + 1, lr);
  }
}

ReduceLROnPlateau::ReduceLROnPlateau(ReduceLROnPlateauOptions options)
    : MonitorCallback("ReduceLROnPlateau", options.monitor(), options.mode(), std::nullopt, options.min_delta()),
      options_(std::move(options)) {
  if (options_.factor() >= 1.0) {
    throw ValueError(fmt::format("ReduceLROnPlateau does not support a factor >= 1.0. Received factor={}",
                                 options_.factor()));
  }
  if (options_.patience() < 0 || options_.cooldown() < 0) {
    throw ValueError(fmt::format("ReduceLROnPlateau: patience ({}) and cooldown ({}) must be >= 0",
                                 options_.patience(), options_.cooldown()));
  }
}

void ReduceLROnPlateau::on_train_begin(const Logs& logs) {
  MonitorCallback::on_train_begin(logs);
  if (take_restored()) return;  // resuming: keep the state load_state brought back
  tracker_->reset();
  wait_ = 0;
  cooldown_counter_ = 0;
}

void ReduceLROnPlateau::on_epoch_end(int64_t epoch, const Logs& logs) {
  auto value = current(logs);
  if (!value) {
    logger()->warn("Learning rate reduction is conditioned on metric `{}` which is not available. Available metrics "
                   "are: {}.{}",
                   monitor_, join_keys(logs), did_you_mean(monitor_, logs));
    return;
  }
  if (cooldown_counter_ > 0) {
    --cooldown_counter_;
    wait_ = 0;
  }
  if (is_improvement(*value, best())) {
    tracker_->set_best(*value);
    wait_ = 0;
    return;
  }
  if (cooldown_counter_ > 0) return;
  if (++wait_ < options_.patience()) return;
  auto& optimizer = context_->optimizer();
  double old_lr = detail::learning_rate(optimizer);
  if (old_lr > options_.min_lr()) {
    double new_lr = std::max(old_lr * options_.factor(), options_.min_lr());
    detail::set_learning_rate(optimizer, new_lr);
    if (options_.verbose() > 0) {
      logger()->info("Epoch {}: ReduceLROnPlateau reducing learning rate to {}.", epoch + 1, new_lr);
    }
    cooldown_counter_ = options_.cooldown();
    wait_ = 0;
  }
}

std::string ReduceLROnPlateau::state_key() const {
  const auto& o = options_;
  return fmt::format("ReduceLROnPlateau{{monitor={}, factor={}, patience={}, mode={}, min_delta={}, cooldown={}, "
                     "min_lr={}}}",
                     o.monitor(), o.factor(), o.patience(), to_string(o.mode()), o.min_delta(), o.cooldown(),
                     o.min_lr());
}

c10::IValue ReduceLROnPlateau::state_dict() const {
  auto out = MonitorCallback::state_dict().toGenericDict();
  out.insert("wait", wait_);
  out.insert("cooldown_counter", cooldown_counter_);
  return out;
}

void ReduceLROnPlateau::load_state_dict(const c10::IValue& state) {
  int64_t wait = int_field(state, "wait"), cooldown = int_field(state, "cooldown_counter");
  MonitorCallback::load_state_dict(state);
  wait_ = wait;
  cooldown_counter_ = cooldown;
}

}  // namespace torchfit
