#include "format/state_dict.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/module.h>

#include "torchfit/error.h"

namespace torchfit {

TensorMap state_dict(const torch::nn::Module& module) {
  TensorMap out;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    out[item.key()] = item.value().detach();
  }
  for (const auto& item : module.named_buffers(/*recurse=*/true)) {
    out[item.key()] = item.value().detach();
  }
  return out;
}

namespace detail {

std::string describe(const at::Tensor& t) {
  return fmt::format("shape [{}] dtype {}", fmt::join(t.sizes(), ", "),
                     std::string(c10::toString(t.scalar_type())));
}

TensorMap weights_from_ivalue(const c10::IValue& value, const std::string& path) {
  if (!value.isGenericDict()) {
    throw CheckpointError(fmt::format(
        "Failed reading checkpoint {}: expected a dict of tensors, found {}", path,
        value.tagKind()));
  }
  TensorMap out;
  for (const auto& entry : value.toGenericDict()) {
    if (!entry.key().isString() || !entry.value().isTensor()) {
      throw CheckpointError(fmt::format(
          "Failed reading checkpoint {}: expected a dict from names to tensors, found an "
          "entry of {} -> {}",
          path, entry.key().tagKind(), entry.value().tagKind()));
    }
    out[entry.key().toStringRef()] = entry.value().toTensor();
  }
  return out;
}

TensorMap select_weights(const c10::IValue& value, const std::string& path) {
  if (!value.isGenericDict()) return weights_from_ivalue(value, path);
  const auto& dict = value.toGenericDict();
  auto meta = dict.find(kMetadataKey);
  if (meta == dict.end()) return weights_from_ivalue(value, path);
  std::vector<std::string> modules;
  if (meta->value().isGenericDict()) {
    auto items = meta->value().toGenericDict().find("items");
    if (items != meta->value().toGenericDict().end() && items->value().isGenericDict()) {
      for (const auto& item : items->value().toGenericDict()) {
        if (item.value().isString() && item.value().toStringRef() == "module") modules.push_back(item.key().toStringRef());
      }
    }
  }
  if (modules.size() != 1) {
    throw CheckpointError(fmt::format(
        "Checkpoint {} holds {} modules ({}); load it with torchfit::load and a Checkpoint naming them", path,
        modules.size(), fmt::join(modules, ", ")));
  }
  return weights_from_ivalue(dict.at(modules.front()), path + " [" + modules.front() + "]");
}

/// Checks that `weights` fit the module exactly; returns the module's tensors by name.
TensorMap check_weights(const torch::nn::Module& module, const TensorMap& weights,
                        const std::string& path) {
  TensorMap expected = state_dict(module);
  for (const auto& [name, target] : expected) {
    auto it = weights.find(name);
    if (it == weights.end()) {
      throw CheckpointError(fmt::format(
          "Checkpoint {} does not match the model: missing key '{}' ({})", path, name,
          describe(target)));
    }
    const auto& source = it->second;
    if (source.sizes() != target.sizes() || source.scalar_type() != target.scalar_type()) {
      throw CheckpointError(fmt::format(
          "Checkpoint {} does not match the model: key '{}' has {} in the checkpoint but {} "
          "in the model",
          path, name, describe(source), describe(target)));
    }
  }
  for (const auto& [name, source] : weights) {
    if (!expected.count(name)) {
      throw CheckpointError(fmt::format(
          "Checkpoint {} does not match the model: unexpected key '{}' ({})", path, name,
          describe(source)));
    }
  }
  return expected;
}

void copy_weights(TensorMap& targets, const TensorMap& weights) {
  at::NoGradGuard no_grad;
  for (auto& [name, target] : targets) target.copy_(weights.at(name));
}

}  // namespace detail
}  // namespace torchfit
