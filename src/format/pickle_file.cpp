#include "format/pickle_file.h"

#include <vector>

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>

#include "format/byte_sink.h"
#include "format/libtorch_pickle.h"

namespace torchfit::detail {
namespace {

/// Collects what a sink receives, for in-memory files.
class StringSink : public ByteSink {
 public:
  void write(const void* data, size_t size) override { bytes.append(static_cast<const char*>(data), size); }
  const std::string& target() const override { return name_; }
  std::string bytes;

 private:
  std::string name_ = "(memory)";
};

}  // namespace

void write_pickle(ChecksumSink& sink, const c10::IValue& value) {
  std::vector<char> pickle;
  torch::jit::Pickler pickler(
      [&pickle](const char* data, size_t size) { pickle.insert(pickle.end(), data, data + size); },
      nullptr, nullptr, nullptr);
  pickler.protocol();
  pickler.pushIValue(value);
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
  ZipWriter zip(sink, "archive");
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
