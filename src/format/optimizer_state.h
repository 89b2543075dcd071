#pragma once
// Optimizers as Python-style state dicts: {"state": {index: {...}}, "param_groups": [{..., "params": [indices]}]}.

#include <functional>
#include <string>

#include <ATen/core/ivalue.h>

namespace torch::optim {
class Optimizer;
}

namespace torchfit::detail {

/// The optimizer's state and every param group's options, as Python's
/// Optimizer.state_dict() lays them out. Tensors are the optimizer's own.
c10::IValue optimizer_state_dict(const torch::optim::Optimizer& optimizer);
/// Checks `state` against `optimizer` completely and returns a function that
/// applies it (options of every group and the per-parameter state) and cannot
/// fail. Throws CheckpointError starting with `where`. With `take` (a state just read from a
/// file, held nowhere else), its tensors are not copied: the optimizer's state tensors take
/// their memory (install_weights' swap) or, where there is none, the tensors themselves.
std::function<void()> prepare_optimizer_load(torch::optim::Optimizer& optimizer, const c10::IValue& state,
                                             const std::string& where, bool take = false);

}  // namespace torchfit::detail
