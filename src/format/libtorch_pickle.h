#pragma once
// A fast reader for the pickles LibTorch's Pickler writes, which is every pickle
// torchfit writes: the opcodes it emits for dicts, lists, tuples, strings,
// numbers and tensors, made straight into the IValues LibTorch's Unpickler would
// make. The Unpickler goes through the dispatcher for every tensor and costs
// microseconds per tensor, which dominates files of thousands of small ones.

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

/// Throws std::invalid_argument unless `pickle` is made of the opcodes LibTorch's
/// Pickler writes, in an order that leaves one value, with containers nested at
/// most kMaxPickleDepth deep and no list or dict changed after it was shared.
/// A checksum is easily forged: this keeps a crafted file from making either
/// reader, or what walks the value later, recurse without bound or into a cycle.
void check_pickle_shape(std::string_view pickle);

/// Reads `pickle`, or returns nullopt when it holds anything outside what
/// LibTorch's Pickler writes for those values (the caller then falls back to
/// LibTorch's Unpickler; nothing has been taken from it). Throws
/// std::invalid_argument for a tensor that reaches past its storage, and for a
/// pickle check_pickle_shape refuses (which the fallback must not see either).
std::optional<LibTorchPickle> read_libtorch_pickle(std::string_view pickle);

}  // namespace torchfit::detail
