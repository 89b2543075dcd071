#pragma once
// The reader of the pickles LibTorch's Pickler writes, which is every pickle
// torchfit writes: the opcodes it emits for dicts, lists, tuples, strings,
// numbers, devices and (quantized) tensors, made straight into the IValues
// LibTorch's Unpickler would make. The Unpickler goes through the dispatcher for
// every tensor and costs microseconds per tensor, which dominates files of
// thousands of small ones. It also trusts what it reads: with a forged checksum,
// a file could make it crash.

#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <ATen/core/ivalue.h>

namespace torchfit::detail {

/// A storage the pickle asks for, still without its bytes: the caller binds the
/// bytes of record "data/<key>" with `storage.set_data_ptr_noswap`.
struct UnboundStorage {
  c10::Storage storage;
  std::string key;
};

struct LibTorchPickle {
  c10::IValue value;
  std::vector<UnboundStorage> storages;  // one per key
};

/// Reads `pickle`. Throws std::invalid_argument saying what is wrong and where:
/// anything LibTorch's Pickler does not write, a tensor reaching past its storage,
/// containers nested deeper than kMaxPickleDepth, or a list or dict changed after
/// it was shared (which is how a pickle puts a value inside itself).
LibTorchPickle read_libtorch_pickle(std::string_view pickle);

/// The bytes for a storage of `nbytes` bytes from record "data/<key>" of a file read and
/// checked. Throws CheckpointError when there is no such record or it is shorter.
using TakeStorage = std::function<at::DataPtr(std::string_view key, size_t nbytes)>;

/// One tensor of a weights file as index_tensor_dict finds it, with views into the pickle.
struct IndexedTensor {
  std::string_view name;
  std::string_view key;  ///< of its storage record, "data/<key>"
  int64_t numel;         ///< the tensor's, which is its storage's (its bytes fit an int64_t)
  size_t first_size;     ///< where its sizes start in TensorDictIndex::sizes
  uint8_t dims;
  at::ScalarType dtype;
};

/// The tensors of a weights file, and their sizes one after another.
struct TensorDictIndex {
  std::vector<IndexedTensor> tensors;
  std::vector<int64_t> sizes;
  c10::IntArrayRef sizes_of(const IndexedTensor& tensor) const {
    return {sizes.data() + tensor.first_size, tensor.dims};
  }
};

/// The tensors of a pickle LibTorch's Pickler wrote for a flat dict from names to whole,
/// contiguous, unquantized tensors on storages of their own (a weights file), found without
/// making one of them: a load into a model that has them binds their bytes straight in.
/// nullopt for any other pickle, valid or not: read_libtorch_pickle reads those, and says
/// what is wrong with one that is broken.
std::optional<TensorDictIndex> index_tensor_dict(std::string_view pickle);

}  // namespace torchfit::detail
