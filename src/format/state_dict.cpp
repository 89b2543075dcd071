#include "format/state_dict.h"

#include <algorithm>
#include <map>
#include <vector>

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/module.h>

#include "format/load_memory.h"
#include "torchfit/error.h"

namespace torchfit {
namespace {

/// Reads a module's own parameters without the copy `named_parameters` makes
/// (an OrderedDict per module, about 0.4 µs per tensor): `parameters_` is
/// protected for subclasses, and a using-declaration here names it.
struct ParameterAccess : torch::nn::Module {
  using torch::nn::Module::parameters_;
};

/// Adds the tensors of `module` and its descendants under `prefix` (restored on return).
void add_module_tensors(const torch::nn::Module& module, std::string& prefix, TensorMap& out) {
  const size_t length = prefix.size();
  auto add = [&](const std::string& name, const at::Tensor& tensor) {
    if (!tensor.defined()) return;  // as named_parameters skips them
    prefix += name;
    // Hinted at the end: names often come sorted, and each insertion is then O(1).
    out.insert_or_assign(out.end(), prefix, tensor);  // a buffer overrides a parameter of the same name
    prefix.resize(length);
  };
  for (const auto& item : module.*(&ParameterAccess::parameters_)) add(item.key(), item.value());
  for (const auto& item : module.named_buffers(/*recurse=*/false)) add(item.key(), item.value());
  for (const auto& child : module.named_children()) {
    prefix += child.key();
    prefix += '.';
    add_module_tensors(*child.value(), prefix, out);
    prefix.resize(length);
  }
}

/// The module's parameters and buffers by name: its own tensors, not detached aliases.
TensorMap module_tensors(const torch::nn::Module& module) {
  TensorMap out;
  std::string prefix;
  add_module_tensors(module, prefix, out);
  return out;
}

}  // namespace

TensorMap state_dict(const torch::nn::Module& module) {
  TensorMap out = module_tensors(module);
  for (auto& [name, tensor] : out) tensor = tensor.detach();
  return out;
}

namespace detail {

std::string describe(const at::Tensor& t) {
  return fmt::format("shape [{}] dtype {}", fmt::join(t.sizes(), ", "),
                     std::string(c10::toString(t.scalar_type())));
}

namespace {

std::vector<std::string> keys_of(const c10::impl::GenericDict& dict) {
  std::vector<std::string> out;
  for (const auto& entry : dict) out.push_back(entry.key().isString() ? entry.key().toStringRef() : "?");
  return out;
}

bool is_tensor_dict(const c10::IValue& value) {
  if (!value.isGenericDict()) return false;
  for (const auto& entry : value.toGenericDict()) {
    if (!entry.key().isString() || !entry.value().isTensor()) return false;
  }
  return true;
}

/// `... at most `limit` names, then "and N more".
std::string list_names(const std::vector<std::string>& names, size_t limit = 20) {
  std::vector<std::string> shown(names.begin(), names.begin() + static_cast<std::ptrdiff_t>(std::min(limit, names.size())));
  auto out = fmt::format("{}", fmt::join(shown, ", "));
  if (names.size() > limit) out += fmt::format(" and {} more", names.size() - limit);
  return out;
}

}  // namespace

TensorMap weights_from_ivalue(const c10::IValue& value, const std::string& path) {
  if (!value.isGenericDict()) {
    throw CheckpointError(fmt::format(
        "Failed reading checkpoint {}: expected a state dict (names to tensors), found a {} (not a dict)", path,
        value.tagKind()));
  }
  const auto& dict = value.toGenericDict();
  if (!is_tensor_dict(value)) {
    // The usual Python checkpoint: {"model": state_dict, "optimizer": ..., "epoch": ...}.
    std::vector<std::string> candidates;
    std::string odd;  // the first entry that is not a tensor
    for (const auto& entry : dict) {
      if (entry.key().isString() && is_tensor_dict(entry.value())) candidates.push_back(entry.key().toStringRef());
      if (odd.empty() && !entry.value().isTensor()) {
        odd = fmt::format(" (entry '{}' is a {}, not a tensor)", entry.key().isString() ? entry.key().toStringRef() : "?",
                          entry.value().tagKind());
      }
    }
    auto hint = candidates.empty()
                    ? std::string()
                    : fmt::format("; pick the state dict by key, e.g. load_weights(module, \"{}\", \"{}\")", path,
                                  candidates.front());
    throw CheckpointError(fmt::format(
        "Failed reading checkpoint {}: expected a state dict (names to tensors), found a dict with keys {}{}{}", path,
        list_names(keys_of(dict)), odd, hint));
  }
  TensorMap out;
  for (const auto& entry : dict) out.insert_or_assign(out.end(), entry.key().toStringRef(), entry.value().toTensor());
  return out;
}

TensorMap select_weights(const c10::IValue& value, const std::string& path, const std::string& key) {
  if (!key.empty()) {
    if (!value.isGenericDict()) {
      throw CheckpointError(fmt::format("Checkpoint {} holds a {}, not a dict with key '{}'", path, value.tagKind(), key));
    }
    const auto& dict = value.toGenericDict();
    auto it = dict.find(key);
    if (it == dict.end()) {
      throw CheckpointError(
          fmt::format("Checkpoint {} has no key '{}'; its keys are {}", path, key, list_names(keys_of(dict))));
    }
    return weights_from_ivalue(it->value(), path + " [" + key + "]");
  }
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
        "Checkpoint {} holds {} modules ({}); pick one with load_weights(module, path, key), or load it with "
        "torchfit::load and a Checkpoint naming them",
        path, modules.size(), fmt::join(modules, ", ")));
  }
  return weights_from_ivalue(dict.at(modules.front()), path + " [" + modules.front() + "]");
}

/// Checks that `weights` fit the module exactly; returns the module's tensors by name.
TensorMap check_weights(const torch::nn::Module& module, const TensorMap& weights, const std::string& path) {
  TensorMap expected = module_tensors(module);  // for copy_weights and install_weights
  std::vector<std::string> missing, unexpected, mismatched;
  // Both maps are sorted by name: one pass over them side by side.
  auto target = expected.begin();
  auto source = weights.begin();
  while (target != expected.end() || source != weights.end()) {
    if (source == weights.end() || (target != expected.end() && target->first < source->first)) {
      missing.push_back(fmt::format("'{}' ({})", target->first, describe(target->second)));
      ++target;
    } else if (target == expected.end() || source->first < target->first) {
      unexpected.push_back(fmt::format("'{}' ({})", source->first, describe(source->second)));
      ++source;
    } else {
      if (source->second.sizes() != target->second.sizes() ||
          source->second.scalar_type() != target->second.scalar_type()) {
        mismatched.push_back(fmt::format("'{}' has {} in the checkpoint but {} in the model", target->first,
                                         describe(source->second), describe(target->second)));
      }
      ++target;
      ++source;
    }
  }
  if (missing.empty() && unexpected.empty() && mismatched.empty()) return expected;
  std::vector<std::string> problems;
  if (!mismatched.empty()) problems.push_back(fmt::format("{} mismatching key(s): {}", mismatched.size(), list_names(mismatched)));
  if (!missing.empty()) problems.push_back(fmt::format("{} missing key(s): {}", missing.size(), list_names(missing)));
  if (!unexpected.empty()) {
    problems.push_back(fmt::format("{} unexpected key(s): {}", unexpected.size(), list_names(unexpected)));
  }
  throw CheckpointError(
      fmt::format("Checkpoint {} does not match the model: {}", path, fmt::join(problems, "; ")));
}

namespace {

/// Calls `assign(target, source)` for each target and the weight of its name
/// (check_weights made both maps hold the same names, in the same order).
template <typename Assign>
void for_each_pair(TensorMap& targets, const TensorMap& weights, Assign&& assign) {
  auto source = weights.begin();
  for (auto& [name, target] : targets) {
    if (source == weights.end() || source->first != name) source = weights.find(name);
    if (source == weights.end()) throw Error(fmt::format("no weight named '{}' to assign", name));
    assign(target, source->second);
    ++source;
  }
}

}  // namespace

void copy_weights(TensorMap& targets, const TensorMap& weights) {
  at::NoGradGuard no_grad;
  for_each_pair(targets, weights, [](at::Tensor& target, const at::Tensor& source) { target.copy_(source); });
}

void install_weights(TensorMap& targets, const TensorMap& weights) {
  at::NoGradGuard no_grad;
  // Swapping memory costs no copy; it is only safe when neither side shares its storage, and
  // for a source read under one name only: a swap leaves the target's old memory in it.
  std::map<const void*, int> names_per_storage;
  for (const auto& [name, source] : weights) ++names_per_storage[source.storage().unsafeGetStorageImpl()];
  for_each_pair(targets, weights, [&](at::Tensor& target, const at::Tensor& source) {
    bool swap = target.device() == source.device() && target.is_contiguous() && source.is_contiguous() &&
                source.storage_offset() == 0 && source.storage().nbytes() == source.nbytes() &&
                target.storage().nbytes() == target.nbytes() && target.storage().use_count() == 1 &&
                source.storage().use_count() == 1 && names_per_storage[source.storage().unsafeGetStorageImpl()] == 1;
    if (swap && !target.is_quantized()) {
      // Same sizes, strides, dtype and device (checked): only the memory changes hands, at a
      // tenth of set_data's cost (no dispatch). The target takes the file's memory; the source
      // takes the target's old memory, which serves the next load once the source is freed.
      const size_t nbytes = target.storage().nbytes();
      at::DataPtr old_memory = target.storage().set_data_ptr(source.storage().set_data_ptr(at::DataPtr()));
      source.storage().set_data_ptr_noswap(recycled_for_loads(std::move(old_memory), nbytes));
    } else if (swap) {  // a quantized tensor takes the file's scales too, through set_data
      target.set_data(source);
    } else {
      target.copy_(source);
    }
    target.unsafeGetTensorImpl()->bump_version();
  });
}

void for_each_tensor(const c10::IValue& value, const std::function<void(const at::Tensor&)>& visit) {
  if (value.isTensor()) {
    visit(value.toTensor());
  } else if (value.isGenericDict()) {
    for (const auto& entry : value.toGenericDict()) for_each_tensor(entry.value(), visit);
  } else if (value.isList()) {
    for (const auto& item : value.toListRef()) for_each_tensor(item, visit);
  } else if (value.isTuple()) {
    for (const auto& item : value.toTupleRef().elements()) for_each_tensor(item, visit);
  }
}

}  // namespace detail
}  // namespace torchfit
