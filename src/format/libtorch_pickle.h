#pragma once
// The reader of the pickles LibTorch's Pickler writes, which is every pickle
// torchfit writes: the opcodes it emits for dicts, lists, tuples, strings,
// numbers, devices and (quantized) tensors, made straight into the IValues
// LibTorch's Unpickler would make. The Unpickler goes through the dispatcher for
// every tensor and costs microseconds per tensor, which dominates files of
// thousands of small ones. It also trusts what it reads: with a forged checksum,
// a file could make it crash.

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

}  // namespace torchfit::detail
