// What a Trainer saves and restores: its checkpoint items, weights, legacy files.
#include "torchfit/trainer.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <torch/optim/optimizer.h>

#include "engine/trainer_state_item.h"
#include "format/checkpoint_file.h"
#include "format/module_archive.h"
#include "format/state_fields.h"
#include "format/trainer_state.h"
#include "training/collectives.h"
#include "torchfit/error.h"
#include "torchfit/log.h"
#include "torchfit/serialize.h"

namespace torchfit {

std::map<std::string, CallbackState> Trainer::callback_states() const {
  std::map<std::string, CallbackState> states;
  if (active_callbacks_ != nullptr) states = active_callbacks_->states();
  return states;
}

/// The callbacks' states: those of the running fit, plus restored ones no callback claimed yet.
struct Trainer::CallbacksItem : Stateful {
  CallbacksItem(Trainer& trainer, bool with_history, const Callback* caller)
      : trainer(trainer), with_history(with_history), caller(caller) {}
  c10::IValue state_dict() const override {
    auto states = trainer.pending_callback_states_;
    if (caller != nullptr && !caller->state_key().empty()) states[caller->state_key()] = caller->state_dict();
    if (trainer.active_callbacks_ != nullptr) {
      for (auto& [key, state] : trainer.active_callbacks_->state_dicts()) states[key] = std::move(state);
    }
    c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
    for (const auto& [key, state] : states) out.insert(key, state);
    return out;
  }
  void check_state_dict(const c10::IValue& state, const std::string& where) const override {
    if (!state.isGenericDict()) {
      throw CheckpointError(fmt::format("{}: callback states are a {}, not a dict", where, state.tagKind()));
    }
    for (const auto& entry : state.toGenericDict()) {  // checked with the other items, before any is applied
      if (!entry.key().isString()) {
        throw CheckpointError(fmt::format("{}: a callback state is keyed by a {}, not a string", where,
                                          entry.key().tagKind()));
      }
    }
  }
  void load_state_dict(const c10::IValue& state) override {
    std::map<std::string, c10::IValue> states;
    for (const auto& entry : state.toGenericDict()) states[entry.key().toStringRef()] = entry.value();
    // A fit returns the epochs it ran, as Keras's; only a backup restores the
    // interrupted fit itself, history included.
    if (!with_history) states.erase(History::kStateKey);
    if (trainer.active_callbacks_ != nullptr) trainer.active_callbacks_->load_state_dicts(states);
    trainer.pending_callback_states_ = std::move(states);
  }
  Trainer& trainer;
  bool with_history;
  const Callback* caller;
};

/// The gradients of an unfinished accumulation window, so a resumed fit continues
/// the window instead of restarting it (Keras 3 keeps its accumulators as
/// optimizer variables). Holds none between windows, and none under data
/// parallelism, where each rank's partial sums are its own until the step.
struct Trainer::GradientsItem : Stateful {
  explicit GradientsItem(Trainer& trainer) : trainer(trainer) {}
  c10::IValue state_dict() const override {
    const int64_t batches = trainer.collectives_ ? 0 : trainer.accumulated_;
    c10::impl::GenericDict grads(c10::StringType::get(), c10::TensorType::get());
    for (const auto& param : trainer.model_->named_parameters()) {
      if (batches > 0 && param.value().grad().defined()) grads.insert(param.key(), param.value().grad());
    }
    c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
    out.insert("batches", batches);
    out.insert("steps", trainer.gradients_.accumulation);
    out.insert("grads", grads);
    return out;
  }
  void check_state_dict(const c10::IValue& state, const std::string& where) const override {
    const detail::StateFields fields(state, where, "accumulated gradients");
    const int64_t batches = fields.integer("batches"), steps = fields.integer("steps");
    if (steps < 1 || batches < 0 || batches >= steps) {
      fields.fail(fmt::format("{} batches in a window of {}", batches, steps));
    }
    const auto grads = fields.dict("grads");
    auto params = trainer.model_->named_parameters();
    for (const auto& entry : grads.toGenericDict()) {
      if (!entry.key().isString() || !entry.value().isTensor()) fields.fail("'grads' holds a non-tensor entry");
      const auto& name = entry.key().toStringRef();
      const auto* param = params.find(name);
      if (param == nullptr) fields.fail(fmt::format("gradient '{}' names no parameter of the model", name));
      if (entry.value().toTensor().sizes() != param->sizes()) {
        fields.fail(fmt::format("gradient '{}' has shape {}, the parameter {}", name,
                                entry.value().toTensor().sizes(), param->sizes()));
      }
    }
  }
  void load_state_dict(const c10::IValue& state) override { trainer.restored_window_ = state; }
  Trainer& trainer;
};

void Trainer::restore_window(bool mid_epoch) {
  auto window = std::exchange(restored_window_, c10::IValue());
  if (!mid_epoch || !window.isGenericDict()) return;
  auto dict = window.toGenericDict();
  const int64_t batches = dict.at("batches").toInt(), steps = dict.at("steps").toInt();
  if (batches == 0) return;
  if (steps != gradients_.accumulation) {
    logger()->warn("The checkpoint was saved {} batches into a window of {} accumulated batches; this fit "
                   "accumulates {}, so those batches' gradients are dropped",
                   batches, steps, gradients_.accumulation);
    return;
  }
  auto grads = dict.at("grads").toGenericDict();
  at::NoGradGuard no_grad;
  for (auto& param : model_->named_parameters()) {
    auto it = grads.find(param.key());
    param.value().mutable_grad() = it == grads.end() ? at::Tensor()
                                                     : it->value().toTensor().to(param.value().options(), false, true);
  }
  accumulated_ = batches;
}

Checkpoint Trainer::checkpoint(const CheckpointScope& scope) {
  Checkpoint out;
  out.add("model", model_);
  out.add("optimizer", optimizer_);
  // The trainer's progress; loading it makes the next fit resume there.
  out.add("trainer", std::make_shared<detail::TrainerStateItem>(state_, [this] { resume_ = state_; }));
  out.add_optional("gradients", std::make_shared<GradientsItem>(*this));
  out.add_rng();
  out.add("callbacks", std::make_shared<CallbacksItem>(*this, scope.with_history(), scope.caller()));
  return out;
}

namespace {

/// A load inside a fit (from a callback) changes tensors whose late copy a background save may
/// still be making: those copies finish first, as before an optimizer step.
void finish_late_copies(CallbackList* active) {
  if (active != nullptr) active->on_before_update();
}

}  // namespace

void Trainer::load_weights(const std::string& path) {
  finish_late_copies(active_callbacks_);
  torchfit::load_weights(*model_, path);
}

void Trainer::load_checkpoint(const std::string& path) { restore(path, /*with_history=*/false); }

void Trainer::restore_backup(const std::string& path) { restore(path, /*with_history=*/true); }

void Trainer::restore(const std::string& path, bool with_history) {
  finish_late_copies(active_callbacks_);
  restored_window_ = c10::IValue();
  detail::read_checkpoint_file(
      path,
      [&](const detail::CheckpointFile& file) {
        auto items = checkpoint(CheckpointScope().with_history(with_history));
        detail::load_read_state(items, file.read_torchfit(), path);
      },
      [&](const detail::CheckpointFile& file) { restore_legacy(file); });
  resumed_from_ = path;
}

void Trainer::restore_backup(const c10::IValue& state, const std::string& path) {
  finish_late_copies(active_callbacks_);
  restored_window_ = c10::IValue();
  checkpoint(CheckpointScope().with_history(true)).load_state_dict(state, path);
  resumed_from_ = path;
}

void Trainer::restore_legacy(const detail::CheckpointFile& file) {
  const std::string& path = file.path();
  auto contents = detail::read_legacy_checkpoint(file, *model_, *optimizer_);
  state_ = contents.trainer;
  if (!state_.rng_state.empty()) {
    auto generator = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(at::from_blob(state_.rng_state.data(), {static_cast<int64_t>(state_.rng_state.size())},
                                      at::kByte).clone());
  }
  state_.rng_state.clear();
  resume_ = state_;
  if (!contents.callbacks.empty()) {
    logger()->info("Checkpoint {} is a torchfit 0.1 file: model, optimizer and progress restored; its callback "
                   "states (0.1 text form) are not",
                   path);
  }
}

TrainerState Trainer::checkpoint_state() const {
  TrainerState out = state_;
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  auto bytes = generator.get_state();
  out.rng_state.assign(bytes.data_ptr<uint8_t>(), bytes.data_ptr<uint8_t>() + bytes.numel());
  return out;
}

void Trainer::save_weights(const std::string& path) const { torchfit::save_weights(*model_, path); }

void Trainer::save_checkpoint(const std::string& path) const {
  torchfit::save(const_cast<Trainer*>(this)->checkpoint(), path);
}

}  // namespace torchfit
