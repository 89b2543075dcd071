#include "format/pickle_file.h"

#include <optional>
#include <vector>

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>

#include "format/byte_sink.h"
#include "format/libtorch_pickle.h"
#include "format/python_pickle.h"  // kMaxPickleDepth

namespace torchfit::detail {
namespace {

/// `value` with every list untyped (List[Any]), or nullopt when it holds no typed list. LibTorch's
/// Pickler writes typed lists through globals (torch.jit._pickle.build_intlist and the like) that
/// Python's weights-only torch.load refuses. Past kMaxPickleDepth the value stays as it is: the
/// read-back check refuses it.
std::optional<c10::IValue> untyped(const c10::IValue& value, int depth = 0) {
  if (depth > kMaxPickleDepth) return std::nullopt;
  if (value.isList()) {
    auto list = value.toList();
    bool typed = list.elementType()->kind() != c10::TypeKind::AnyType;
    std::vector<std::optional<c10::IValue>> items;
    for (const auto& item : value.toListRef()) {
      items.push_back(untyped(item, depth + 1));
      typed = typed || items.back().has_value();
    }
    if (!typed) return std::nullopt;
    c10::impl::GenericList out(c10::AnyType::get());
    out.reserve(items.size());
    for (size_t i = 0; i < items.size(); ++i) out.push_back(items[i] ? *items[i] : list.get(i));
    return out;
  }
  if (value.isGenericDict()) {
    auto dict = value.toGenericDict();
    std::optional<c10::impl::GenericDict> out;
    size_t done = 0;
    for (const auto& entry : dict) {
      auto item = untyped(entry.value(), depth + 1);
      if (item && !out) {  // the first change: copy what came before it
        out.emplace(dict.keyType(), c10::AnyType::get());
        size_t copied = 0;
        for (const auto& before : dict) {
          if (copied++ == done) break;
          out->insert(before.key(), before.value());
        }
      }
      if (out) out->insert(entry.key(), item ? *item : entry.value());
      ++done;
    }
    if (!out) return std::nullopt;
    return *out;
  }
  if (value.isTuple()) {
    const auto& elements = value.toTupleRef().elements();
    std::vector<c10::IValue> out(elements.begin(), elements.end());
    bool changed = false;
    for (auto& element : out) {
      if (auto item = untyped(element, depth + 1)) {
        element = std::move(*item);
        changed = true;
      }
    }
    if (!changed) return std::nullopt;
    return c10::ivalue::Tuple::create(std::move(out));
  }
  return std::nullopt;
}

}  // namespace

void write_pickle(ChecksumSink& sink, const c10::IValue& value, KnownCrcs* known_crcs) {
  std::vector<char> pickle;
  // Untagged, as Python pickles: Python's weights-only unpickler refuses restore_type_tag.
  torch::jit::Pickler pickler(
      [&pickle](const char* data, size_t size) { pickle.insert(pickle.end(), data, data + size); },
      nullptr, nullptr, nullptr, nullptr, /*tag_aggregates=*/false);
  pickler.protocol();
  auto plain = untyped(value);
  pickler.pushIValue(plain ? *plain : value);
  pickler.stop();
  (void)read_libtorch_pickle({pickle.data(), pickle.size()});  // what would not read back is not written

  std::vector<torch::jit::WriteableTensorData> storages;
  uint64_t payload = pickle.size();
  for (const auto& tensor : pickler.tensorData()) {
    storages.push_back(torch::jit::getWriteableTensorData(tensor));
    payload += storages.back().sizeInBytes();
  }
  if (!ZipWriter::fits(payload, storages.size() + 2)) {
    // zip64 territory: LibTorch's writer handles it (at its slower CRC speed).
    caffe2::serialize::PyTorchStreamWriter zip(
        [&sink](const void* data, size_t size) { return sink(data, size); });
    torch::jit::writeArchiveAndTensors("data", pickle.data(), pickle.size(), pickler.tensorData(), zip);
    zip.writeEndOfFile();
    sink.finish();
    return;
  }
  ZipWriter zip(sink, "archive", known_crcs);
  for (size_t i = 0; i < storages.size(); ++i) {
    zip.add("data/" + std::to_string(i), storages[i].data(), storages[i].sizeInBytes());
  }
  zip.add("data.pkl", pickle.data(), pickle.size());
  zip.add("version", "3\n", 2);
  zip.finish();
}

std::string pickle_to_bytes(const c10::IValue& value) {
  StringSink out;
  ChecksumSink sink(out);
  write_pickle(sink, value);
  return std::move(out.bytes);
}

}  // namespace torchfit::detail
