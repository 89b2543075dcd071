#include "torchfit/callbacks/early_stopping.h"

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "torchfit/error.h"
#include "torchfit/log.h"
#include "torchfit/training_context.h"

namespace torchfit {
namespace {

/// CPU copies of the module's tensors.
TensorMap copy_weights(const torch::nn::Module& module) {
  TensorMap out;
  for (auto& [name, tensor] : state_dict(module)) out[name] = tensor.to(at::kCPU, /*non_blocking=*/false, /*copy=*/true);
  return out;
}

}  // namespace

EarlyStopping::EarlyStopping(EarlyStoppingOptions options)
    : MonitorCallback("EarlyStopping", options.monitor(), options.mode(), std::nullopt, options.min_delta()),
      options_(std::move(options)) {
  if (options_.patience() < 0) {
    throw ValueError(fmt::format("EarlyStopping: invalid patience {} (must be >= 0)", options_.patience()));
  }
  if (options_.start_from_epoch() < 0) {
    throw ValueError(
        fmt::format("EarlyStopping: invalid start_from_epoch {} (must be >= 0)", options_.start_from_epoch()));
  }
}

void EarlyStopping::on_train_begin(const Logs& logs) {
  MonitorCallback::on_train_begin(logs);
  if (take_restored()) return;  // resuming: keep the state load_state brought back
  // As Keras: an instance can be reused, each fit starting afresh.
  wait_ = 0;
  stopped_epoch_ = 0;
  best_epoch_ = 0;
  tracker_->reset();
  best_weights_.reset();
}

void EarlyStopping::on_epoch_end(int64_t epoch, const Logs& logs) {
  auto value = current(logs);
  if (!value) {
    logger()->warn("Early stopping conditioned on metric `{}` which is not available. Available metrics are: {}.{}",
                   monitor_, join_keys(logs), did_you_mean(monitor_, logs));
    return;
  }
  if (epoch < options_.start_from_epoch()) return;
  if (options_.restore_best_weights() && !best_weights_) {
    best_weights_ = copy_weights(context_->model());  // until something improves, these are the best
    best_epoch_ = epoch;
  }
  ++wait_;
  if (is_improvement(*value, best())) {
    tracker_->set_best(*value);
    best_epoch_ = epoch;
    if (options_.restore_best_weights()) best_weights_ = copy_weights(context_->model());
    // Only a value that beats the baseline too restarts the count.
    if (!options_.baseline() || is_improvement(*value, options_.baseline())) wait_ = 0;
    return;
  }
  if (wait_ >= options_.patience() && epoch > 0) {
    stopped_epoch_ = epoch;
    context_->stop_training(true);
  }
}

void EarlyStopping::on_train_end(const Logs&) {
  bool verbose = options_.verbose() > 0;
  if (stopped_epoch_ > 0 && verbose) logger()->info("Epoch {}: early stopping", stopped_epoch_ + 1);
  if (options_.restore_best_weights() && best_weights_) {
    if (verbose) logger()->info("Restoring model weights from the end of the best epoch: {}.", best_epoch_ + 1);
    assign_weights(context_->model(), *best_weights_, "(best weights in memory)");
  }
}

std::string EarlyStopping::state_key() const {
  const auto& o = options_;
  return fmt::format("EarlyStopping{{monitor={}, min_delta={}, patience={}, mode={}, baseline={}, "
                     "restore_best_weights={}, start_from_epoch={}}}",
                     o.monitor(), o.min_delta(), o.patience(), to_string(o.mode()),
                     o.baseline() ? fmt::format("{}", *o.baseline()) : "None", o.restore_best_weights(),
                     o.start_from_epoch());
}

c10::IValue EarlyStopping::state_dict() const {
  auto out = MonitorCallback::state_dict().toGenericDict();
  out.insert("wait", wait_);
  out.insert("stopped_epoch", stopped_epoch_);
  out.insert("best_epoch", best_epoch_);
  c10::impl::GenericDict weights(c10::StringType::get(), c10::TensorType::get());
  if (best_weights_) {
    for (const auto& [name, tensor] : *best_weights_) weights.insert(name, tensor);
  }
  out.insert("best_weights", best_weights_ ? c10::IValue(weights) : c10::IValue());
  return out;
}

void EarlyStopping::load_state_dict(const c10::IValue& state) {
  int64_t wait = int_field(state, "wait"), stopped = int_field(state, "stopped_epoch"),
          best_epoch = int_field(state, "best_epoch");
  std::optional<TensorMap> weights;
  auto saved = state.toGenericDict().find("best_weights");
  if (saved != state.toGenericDict().end() && !saved->value().isNone()) {
    if (!saved->value().isGenericDict()) throw CheckpointError("EarlyStopping: corrupt saved best weights");
    weights.emplace();
    for (const auto& entry : saved->value().toGenericDict()) {
      if (!entry.key().isString() || !entry.value().isTensor()) {
        throw CheckpointError("EarlyStopping: corrupt saved best weights");
      }
      (*weights)[entry.key().toStringRef()] = entry.value().toTensor();
    }
  }
  MonitorCallback::load_state_dict(state);
  wait_ = wait;
  stopped_epoch_ = stopped;
  best_epoch_ = best_epoch;
  best_weights_ = std::move(weights);
}

}  // namespace torchfit
