#pragma once
/// \file
/// A module's weights by name, as Python's `state_dict()` has them.
///
///     torchfit::TensorMap weights = torchfit::state_dict(*model);  // {"fc1.bias": ..., "fc1.weight": ...}

#include <map>
#include <string>

#include <ATen/core/Tensor.h>

#include "torchfit/trainer_state.h"

namespace torch::nn {
class Module;
}

namespace torchfit {

/// Name-to-tensor map in the order of Python's `state_dict()` keys' sort.
using TensorMap = std::map<std::string, at::Tensor>;

/// The module's parameters and buffers under their dotted names, detached.
TensorMap state_dict(const torch::nn::Module& module);

/// What a full checkpoint restores besides the weights (`load_checkpoint`).
struct CheckpointContents {
  TensorMap weights;
  TrainerState trainer;
  std::map<std::string, CallbackState> callbacks;
};

}  // namespace torchfit
