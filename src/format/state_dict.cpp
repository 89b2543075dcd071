#include "format/state_dict.h"

#include <algorithm>
#include <functional>
#include <map>
#include <optional>
#include <string_view>
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

/// Calls `visit(name, tensor)` for the defined parameters, then buffers, of `module` and its
/// descendants, with `prefix` before each name (restored on return).
template <typename Visit>
void visit_module_tensors(const torch::nn::Module& module, std::string& prefix, Visit&& visit) {
  const size_t length = prefix.size();
  auto named = [&](const std::string& name, const at::Tensor& tensor) {
    if (!tensor.defined()) return;  // as named_parameters skips them
    prefix += name;
    visit(static_cast<const std::string&>(prefix), tensor);
    prefix.resize(length);
  };
  for (const auto& item : module.*(&ParameterAccess::parameters_)) named(item.key(), item.value());
  for (const auto& item : module.named_buffers(/*recurse=*/false)) named(item.key(), item.value());
  for (const auto& child : module.named_children()) {
    prefix += child.key();
    prefix += '.';
    visit_module_tensors(*child.value(), prefix, visit);
    prefix.resize(length);
  }
}

/// The module's parameters and buffers by name: its own tensors, not detached aliases.
TensorMap module_tensors(const torch::nn::Module& module) {
  TensorMap out;
  std::string prefix;
  visit_module_tensors(module, prefix, [&](const std::string& name, const at::Tensor& tensor) {
    // Hinted at the end: names often come sorted, and each insertion is then O(1).
    out.insert_or_assign(out.end(), name, tensor);  // a buffer overrides a parameter of the same name
  });
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

namespace {

/// Whether `target` can take a file's memory in place of its own rather than be copied into:
/// a CPU tensor that owns its storage whole.
bool takes_memory(const at::Tensor& target) {
  return target.device().is_cpu() && target.layout() == at::kStrided && target.is_contiguous() &&
         target.storage().nbytes() == target.nbytes() && target.storage().use_count() == 1;
}

/// `target`'s storage takes `memory` (of the same size, checked); its old memory is returned,
/// to serve the next load once freed. Only the memory changes hands, at a tenth of set_data's
/// cost (no dispatch).
at::DataPtr take_memory(at::Tensor& target, at::DataPtr memory) {
  const size_t nbytes = target.storage().nbytes();
  return recycled_for_loads(target.storage().set_data_ptr(std::move(memory)), nbytes);
}

}  // namespace

bool owns_storage_alone(const at::Tensor& tensor) {
  return tensor.is_contiguous() && tensor.storage_offset() == 0 && tensor.storage().nbytes() == tensor.nbytes() &&
         tensor.storage().use_count() == 1;
}

bool can_swap_memory(const at::Tensor& target, const at::Tensor& source) {
  return takes_memory(target) && !target.is_quantized() && source.device() == target.device() &&
         source.scalar_type() == target.scalar_type() && source.sizes() == target.sizes() &&
         owns_storage_alone(source);
}

void swap_memory(at::Tensor& target, const at::Tensor& source) {
  // The source takes the target's old memory, which serves the next load once the source is freed.
  source.storage().set_data_ptr_noswap(take_memory(target, source.storage().set_data_ptr(at::DataPtr())));
  target.unsafeGetTensorImpl()->bump_version();
}

void install_weights(TensorMap& targets, const TensorMap& weights) {
  at::NoGradGuard no_grad;
  // A swap is only safe for a source read under one name: it leaves the target's old memory in it.
  std::map<const void*, int> names_per_storage;
  for (const auto& [name, source] : weights) ++names_per_storage[source.storage().unsafeGetStorageImpl()];
  for_each_pair(targets, weights, [&](at::Tensor& target, const at::Tensor& source) {
    const bool read_once = names_per_storage[source.storage().unsafeGetStorageImpl()] == 1;
    if (read_once && can_swap_memory(target, source)) {
      swap_memory(target, source);
      return;
    }
    if (read_once && target.is_quantized() && takes_memory(target) && source.device() == target.device() &&
        owns_storage_alone(source)) {
      target.set_data(source);  // a quantized tensor takes the file's scales too
    } else {
      target.copy_(source);
    }
    target.unsafeGetTensorImpl()->bump_version();
  });
}

namespace {

/// The entries of an index by name: an open-addressing table of positions, built in one pass
/// (2000 names: a sort and a binary search per name cost 0.3 ms, most of it in string compares).
class EntriesByName {
 public:
  /// nullopt when a name is there twice.
  static std::optional<EntriesByName> of(const std::vector<IndexedTensor>& entries) {
    EntriesByName out(entries);
    for (uint32_t i = 0; i < entries.size(); ++i) {
      uint32_t& slot = out.slots_[out.slot_of(entries[i].name)];
      if (slot != 0) return std::nullopt;
      slot = i + 1;
    }
    return out;
  }
  /// The position of the entry called `name`, or entries.size() if there is none.
  size_t find(std::string_view name) const {
    const uint32_t slot = slots_[slot_of(name)];
    return slot == 0 ? entries_.size() : slot - 1;
  }

 private:
  explicit EntriesByName(const std::vector<IndexedTensor>& entries) : entries_(entries) {
    size_t capacity = 16;
    while (capacity < 2 * entries.size()) capacity *= 2;
    slots_.assign(capacity, 0);
  }
  /// The slot holding `name`, or the empty one where it would go.
  size_t slot_of(std::string_view name) const {
    const size_t mask = slots_.size() - 1;
    for (size_t i = std::hash<std::string_view>{}(name) & mask;; i = (i + 1) & mask) {
      if (slots_[i] == 0 || entries_[slots_[i] - 1].name == name) return i;
    }
  }
  const std::vector<IndexedTensor>& entries_;
  std::vector<uint32_t> slots_;  // an entry's position + 1; 0 is empty
};

}  // namespace

std::optional<DirectLoad> DirectLoad::plan(const torch::nn::Module& module, std::string_view pickle) {
  auto index = index_tensor_dict(pickle);
  if (!index) return std::nullopt;
  const auto& entries = index->tensors;
  // A name the file repeats, or one the module visits twice (a buffer named as a parameter),
  // or one left over declines.
  const auto by_name = EntriesByName::of(entries);
  if (!by_name) return std::nullopt;
  DirectLoad out;
  out.bindings_.resize(entries.size());
  bool fits = true;
  size_t found = 0;
  std::string prefix;
  visit_module_tensors(module, prefix, [&](const std::string& name, const at::Tensor& target) {
    const size_t at = fits ? by_name->find(name) : entries.size();
    if (at == entries.size()) {
      fits = false;
      return;
    }
    const auto& entry = entries[at];
    auto& binding = out.bindings_[at];
    // select_weights takes an entry of this name for a torchfit checkpoint's description.
    if (binding.target.defined() || name == kMetadataKey || entry.dtype != target.scalar_type() ||
        target.sizes() != index->sizes_of(entry) || target.layout() != at::kStrided) {
      fits = false;
      return;
    }
    binding = {target, entry.key, static_cast<size_t>(entry.numel) * target.element_size()};
    ++found;
  });
  if (!fits || found != entries.size()) return std::nullopt;
  return out;
}

void DirectLoad::bind(const TakeStorage& take) {
  std::vector<at::DataPtr> memory;  // every record first: a missing one changes nothing
  memory.reserve(bindings_.size());
  for (const auto& binding : bindings_) {
    memory.push_back(binding.nbytes > 0 ? take(binding.key, binding.nbytes) : at::DataPtr());
  }
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < bindings_.size(); ++i) {
    auto& target = bindings_[i].target;
    if (memory[i] && takes_memory(target)) {
      take_memory(target, std::move(memory[i]));  // the old memory is freed here, or kept for the next load
    } else if (memory[i]) {
      target.copy_(at::from_blob(memory[i].get(), target.sizes(), at::TensorOptions(target.scalar_type())));
    }
    target.unsafeGetTensorImpl()->bump_version();
  }
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
