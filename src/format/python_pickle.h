#pragma once
// Reads the pickles Python's torch.save writes (protocols 2 to 5): dicts,
// OrderedDicts, lists, tuples, sets, numbers, strings and tensors rebuilt from
// storages. LibTorch 1.13's own unpickler turns OrderedDicts into None and trusts
// every size it reads, so files of other tools come here instead.
//
// Hostile input is expected: every length is checked against the pickle, every
// tensor against its storage, containers nest at most kMaxPickleDepth deep, and
// values live in one arena, so nothing recurses over the input's shape.

#include <functional>
#include <string>

#include <ATen/core/ivalue.h>

namespace torchfit::detail {

/// How deep containers may nest in a pickle we read (state dicts need about 5).
inline constexpr int kMaxPickleDepth = 100;

/// How many dimensions a tensor we read may have.
inline constexpr size_t kMaxTensorDims = 64;

/// The dtype of a pickled storage class ("torch.FloatStorage"); throws
/// std::invalid_argument for any other name.
at::ScalarType storage_dtype(const std::string& name);

/// Throws std::invalid_argument unless a tensor of these sizes and strides,
/// starting at element `offset`, lies inside a storage of `numel` elements.
void check_tensor_extent(int64_t offset, c10::IntArrayRef sizes, c10::IntArrayRef strides, int64_t numel);

/// Allocates the storage of record "data/<key>": `nbytes` bytes, read later.
/// Throws std::invalid_argument when the record is missing or too small.
using StorageAllocator = std::function<at::DataPtr(const std::string& key, size_t nbytes)>;

/// Unpickles `pickle`. Throws std::invalid_argument saying what is wrong and where
/// (the caller names the file).
c10::IValue unpickle_python(const std::string& pickle, const StorageAllocator& allocate);

}  // namespace torchfit::detail
