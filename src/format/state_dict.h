#pragma once
// Module state dicts: names to tensors, checked against a module before anything is copied.

#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <ATen/core/ivalue.h>

#include "format/libtorch_pickle.h"

#include "torchfit/state_dict.h"

namespace torchfit::detail {

/// "shape [2, 3] dtype Float"
std::string describe(const at::Tensor& t);
/// `value` as a flat dict from names to tensors; throws CheckpointError naming `path`.
TensorMap weights_from_ivalue(const c10::IValue& value, const std::string& path);
/// The model weights inside a checkpoint's data: the entry `key` of a dict when
/// given; else a flat state dict as is, or the one module item of a torchfit
/// checkpoint (its "torchfit" entry says which items are modules). Throws
/// CheckpointError listing the keys or candidates when it cannot tell.
TensorMap select_weights(const c10::IValue& value, const std::string& path, const std::string& key = "");
/// Checks that `weights` fit the module exactly; returns the module's tensors by
/// name (the tensors themselves, not detached aliases, for copy_weights and
/// install_weights). Otherwise throws CheckpointError listing every missing,
/// unexpected and mismatching key.
TensorMap check_weights(const torch::nn::Module& module, const TensorMap& weights, const std::string& path);
/// Copies `weights` into `targets` (the module's tensors from check_weights).
void copy_weights(TensorMap& targets, const TensorMap& weights);
/// Puts checked `weights` that nothing else holds (freshly read) into `targets`
/// (the module's tensors from check_weights): a parameter or buffer takes the
/// tensor's storage where neither shares its storage, and is copied into
/// otherwise. Cannot fail half-way.
void install_weights(TensorMap& targets, const TensorMap& weights);
/// Whether `tensor` is all of a storage that no other tensor has.
bool owns_storage_alone(const at::Tensor& tensor);
/// Whether `source`, freshly read and held nowhere else, can give `target` its memory instead
/// of being copied into it: the same sizes, dtype and device, each all of a storage of its own.
bool can_swap_memory(const at::Tensor& target, const at::Tensor& source);
/// `target` takes `source`'s memory (checked with can_swap_memory) and `source` the target's
/// old memory, which serves the next load once `source` is freed. Cannot fail.
void swap_memory(at::Tensor& target, const at::Tensor& source);

/// A load that binds a weights file's storages straight to a module's tensors, making no
/// tensor of the file (for thousands of small tensors that costs more than reading them):
/// planned from the pickle alone, bound once the file's checksum matched, while the pickle
/// lives (CheckpointFile::Shortcut).
class DirectLoad {
 public:
  /// The plan when `pickle` is a flat state dict (index_tensor_dict) whose names, shapes and
  /// dtypes are exactly the module's; nullopt otherwise, and check_weights says what differs.
  static std::optional<DirectLoad> plan(const torch::nn::Module& module, std::string_view pickle);
  /// Takes every storage's bytes, throwing CheckpointError before a tensor changes when one
  /// is missing or short, then installs them as install_weights does.
  void bind(const TakeStorage& take);

 private:
  struct Binding {
    at::Tensor target;
    std::string_view key;
    size_t nbytes;
  };
  std::vector<Binding> bindings_;
};

/// Calls `visit` with every tensor inside `value` (dicts, lists, tuples), depth first.
void for_each_tensor(const c10::IValue& value, const std::function<void(const at::Tensor&)>& visit);

/// Key of the entry that describes a torchfit checkpoint's items.
inline constexpr const char* kMetadataKey = "torchfit";

}  // namespace torchfit::detail
