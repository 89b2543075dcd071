#include "detail/snapshot.h"

#include <set>
#include <string>

#include <torch/nn/module.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>

namespace torchfit::detail {
namespace {

using torch::optim::Optimizer;

/// A reusable copy of a live state tensor, in the shadow's buffer when it fits.
at::Tensor copied(const at::Tensor& live, at::Tensor buffer) {
  copy_into(buffer, live);
  return buffer;
}

void copy_state(torch::optim::SGDParamState& shadow, const torch::optim::SGDParamState& live) {
  shadow.momentum_buffer(copied(live.momentum_buffer(), shadow.momentum_buffer()));
}
/// Adam and AdamW keep the same fields in distinct types.
template <typename AdamLikeState>
void copy_adam_like(AdamLikeState& shadow, const AdamLikeState& live) {
  shadow.step(live.step());
  shadow.exp_avg(copied(live.exp_avg(), shadow.exp_avg()));
  shadow.exp_avg_sq(copied(live.exp_avg_sq(), shadow.exp_avg_sq()));
  shadow.max_exp_avg_sq(copied(live.max_exp_avg_sq(), shadow.max_exp_avg_sq()));
}
void copy_state(torch::optim::AdamParamState& shadow, const torch::optim::AdamParamState& live) {
  copy_adam_like(shadow, live);
}
void copy_state(torch::optim::AdamWParamState& shadow, const torch::optim::AdamWParamState& live) {
  copy_adam_like(shadow, live);
}
void copy_state(torch::optim::RMSpropParamState& shadow, const torch::optim::RMSpropParamState& live) {
  shadow.step(live.step());
  shadow.square_avg(copied(live.square_avg(), shadow.square_avg()));
  shadow.momentum_buffer(copied(live.momentum_buffer(), shadow.momentum_buffer()));
  shadow.grad_avg(copied(live.grad_avg(), shadow.grad_avg()));
}
void copy_state(torch::optim::AdagradParamState& shadow, const torch::optim::AdagradParamState& live) {
  shadow.step(live.step());
  shadow.sum(copied(live.sum(), shadow.sum()));
}

/// Refreshes `shadow` from `live` if `live` is an `Opt`; returns whether it was.
template <typename Opt, typename Options, typename State>
bool capture_as(const Optimizer& live, std::unique_ptr<Optimizer>& shadow) {
  if (dynamic_cast<const Opt*>(&live) == nullptr) return false;
  const auto& groups = live.param_groups();
  if (dynamic_cast<Opt*>(shadow.get()) == nullptr || shadow->param_groups().size() != groups.size()) {
    // Copying a group clones its options and shares its parameters, which only
    // serve as the keys of the state.
    std::vector<torch::optim::OptimizerParamGroup> copies(groups.begin(), groups.end());
    shadow = std::make_unique<Opt>(std::move(copies), static_cast<const Options&>(live.defaults()));
  } else {
    for (size_t i = 0; i < groups.size(); ++i) {
      shadow->param_groups()[i].params() = groups[i].params();
      shadow->param_groups()[i].set_options(groups[i].options().clone());
    }
  }
  auto& shadow_state = shadow->state();
  std::set<std::string> live_keys;
  for (const auto& [key, state] : live.state()) {
    live_keys.insert(key);
    auto& slot = shadow_state[key];
    if (!slot) slot = std::make_unique<State>();
    copy_state(static_cast<State&>(*slot), static_cast<const State&>(*state));
  }
  for (auto it = shadow_state.begin(); it != shadow_state.end();) {
    it = live_keys.count(it->first) ? std::next(it) : shadow_state.erase(it);
  }
  return true;
}

bool capture_any(const Optimizer& live, std::unique_ptr<Optimizer>& shadow) {
  using namespace torch::optim;
  return capture_as<SGD, SGDOptions, SGDParamState>(live, shadow) ||
         capture_as<AdamW, AdamWOptions, AdamWParamState>(live, shadow) ||
         capture_as<Adam, AdamOptions, AdamParamState>(live, shadow) ||
         capture_as<RMSprop, RMSpropOptions, RMSpropParamState>(live, shadow) ||
         capture_as<Adagrad, AdagradOptions, AdagradParamState>(live, shadow);
}

}  // namespace

Snapshot::Snapshot() = default;
Snapshot::~Snapshot() = default;

void Snapshot::capture_model(const torch::nn::Module& module) { model_.copy_from(ModuleTree::of(module)); }

bool Snapshot::capture_optimizer(const Optimizer& optimizer) { return capture_any(optimizer, optimizer_); }

}  // namespace torchfit::detail
