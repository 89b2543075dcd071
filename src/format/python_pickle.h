#pragma once
// Reads the pickled state dicts Python's torch.save writes: an OrderedDict (with
// `_metadata`) of tensors rebuilt from storages. LibTorch 1.13's unpickler turns
// OrderedDicts into None, so it cannot read them.

#include <functional>
#include <map>
#include <string>

#include <ATen/core/Tensor.h>

namespace torchfit::detail {

/// Reads the storage record `key` (as "data/<key>") into a CPU tensor of `dtype`
/// with `numel` elements.
using StorageReader = std::function<at::Tensor(const std::string& key, at::ScalarType dtype, int64_t numel)>;

/// Unpickles `pickle` into name -> tensor. Throws CheckpointError naming `path`
/// and the construct it does not support.
std::map<std::string, at::Tensor> unpickle_state_dict(const std::string& pickle, const StorageReader& storage,
                                                      const std::string& path);

}  // namespace torchfit::detail
