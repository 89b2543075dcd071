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
#include <string_view>

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

/// The type an annotation such as "Dict[str, List[Tensor]]" names, for the type
/// tags LibTorch's Pickler writes (restore_type_tag): int, float, bool, str,
/// complex, number, Tensor, Device, NoneType, Any, and List, Dict, Optional and
/// Tuple of them. Read without LibTorch's TorchScript parser, which resolves class
/// names and trusts its input. nullptr for anything else.
c10::TypePtr parse_type_annotation(std::string_view annotation);

/// A TorchScript object (the modules of a LibTorch module archive, read with
/// `script_objects`) becomes a dict of its attributes holding its class name under
/// this key, which no TorchScript attribute can be named.
inline constexpr const char* kScriptClassKey = "\x01class";

/// Unpickles `pickle`. Throws std::invalid_argument saying what is wrong and where
/// (the caller names the file). With `script_objects`, TorchScript objects
/// (`__torch__.*` classes made by NEWOBJ and given their attributes by BUILD) are
/// read as dicts (kScriptClassKey); their code is never looked at.
c10::IValue unpickle_python(const std::string& pickle, const StorageAllocator& allocate,
                            bool script_objects = false);

}  // namespace torchfit::detail
