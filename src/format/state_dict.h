#pragma once
// Module state dicts: names to tensors, checked against a module before anything is copied.

#include <string>

#include <ATen/core/ivalue.h>

#include "torchfit/state_dict.h"

namespace torchfit::detail {

/// "shape [2, 3] dtype Float"
std::string describe(const at::Tensor& t);
/// `value` as a flat dict from names to tensors; throws CheckpointError naming `path`.
TensorMap weights_from_ivalue(const c10::IValue& value, const std::string& path);
/// The model weights inside a checkpoint's data: a flat state dict as is, or the
/// one module item of a torchfit checkpoint (its "torchfit" entry says which items
/// are modules). Throws CheckpointError listing the candidates when it is ambiguous.
TensorMap select_weights(const c10::IValue& value, const std::string& path);
/// Checks that `weights` fit the module exactly; returns the module's tensors by name.
TensorMap check_weights(const torch::nn::Module& module, const TensorMap& weights, const std::string& path);
/// Copies `weights` into `targets` (the module's tensors from check_weights).
void copy_weights(TensorMap& targets, const TensorMap& weights);

/// Key of the entry that describes a torchfit checkpoint's items.
inline constexpr const char* kMetadataKey = "torchfit";

}  // namespace torchfit::detail
