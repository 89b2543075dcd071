#pragma once
// torch.save's file layout: a zip holding "data.pkl" (the pickled object) and one
// record per tensor storage. torchfit writes every checkpoint this way, so
// Python's torch.load reads them.

#include <map>
#include <string>

#include <ATen/core/ivalue.h>

#include "format/zip.h"

namespace torchfit::detail {

/// Pickles `value` (dicts, lists, tuples, numbers, strings, tensors) as torch.save
/// does and streams the zip into `sink`, ending with `sink.finish()`. Throws
/// std::invalid_argument, before writing, for a value read_libtorch_pickle would
/// refuse (containers nested deeper than kMaxPickleDepth, objects of TorchScript
/// classes).
void write_pickle(ChecksumSink& sink, const c10::IValue& value, KnownCrcs* known_crcs = nullptr);

/// A file's pickle, parsed with its storages allocated but not yet read.
struct DeferredPickle {
  c10::IValue value;
  /// Where the bytes of each allocated storage lie in the file, by the address of its
  /// memory. A storage the pickle dropped is freed: its address may be stale.
  std::map<const void*, RecordSpan> spans;
};

/// Encodes `value` into an in-memory torch.save file (with our checksum).
std::string pickle_to_bytes(const c10::IValue& value);

}  // namespace torchfit::detail
