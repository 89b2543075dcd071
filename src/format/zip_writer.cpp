#include "format/zip.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cerrno>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <thread>

#include <fmt/format.h>

#include "format/byte_sink.h"
#include "format/zip_layout.h"
#include "torchfit/error.h"

namespace torchfit::detail {

bool ZipWriter::fits(uint64_t payload_bytes, size_t records) {
  // Generous per-record overhead: headers, names, padding, descriptors.
  return payload_bytes + records * 512 + (1 << 20) < std::numeric_limits<uint32_t>::max();
}

void ZipWriter::add(const std::string& name, const void* data, size_t size) {
  std::string full_name = prefix_ + name;
  uint64_t offset = sink_.position();
  std::string header;
  put32(header, kLocalHeaderSig);
  put16(header, 20);                               // version needed
  put16(header, kUtf8Flag | kDescriptorFlag);      // CRC and sizes follow the data
  put16(header, 0);                                // stored
  put16(header, 0);                                // time
  put16(header, 0);                                // date
  put32(header, 0);
  put32(header, 0);
  put32(header, 0);
  put16(header, static_cast<uint16_t>(full_name.size()));
  size_t start = offset + kLocalHeaderSize + full_name.size() + 4;
  size_t alignment = size >= kPageAlignedRecord ? kPageSize : kAlignment;
  size_t padding = (alignment - start % alignment) % alignment;
  put16(header, static_cast<uint16_t>(4 + padding));
  header += full_name;
  put16(header, 0x4246);  // "FB": PyTorch's padding field
  put16(header, static_cast<uint16_t>(padding));
  header.append(padding, 'Z');
  sink_(header.data(), header.size());

  KnownCrcs* known = known_crcs_;
  std::optional<uint32_t> known_crc = known ? known->find(data, size) : std::nullopt;
  uint32_t crc = 0;
  if (known_crc) {
    crc = *known_crc;
    sink_.write_uncounted(data, size);
  } else if (size >= kParallelThreshold) {
    // The CRC runs on a second thread while this one writes the same bytes.
    run_pair([&] { sink_.write_uncounted(data, size); }, [&] { crc = crc32_of(data, size); });
  } else {
    crc = crc32_of(data, size);
    sink_.write_uncounted(data, size);
  }
  if (known && !known_crc) known->remember(data, size, crc);
  sink_.count(crc, size);
  std::string descriptor;
  put32(descriptor, kDescriptorSig);
  put32(descriptor, crc);
  put32(descriptor, static_cast<uint32_t>(size));
  put32(descriptor, static_cast<uint32_t>(size));
  sink_(descriptor.data(), descriptor.size());
  entries_.push_back({std::move(full_name), crc, size, offset});
}

void ZipWriter::finish() {
  uint64_t directory_offset = sink_.position();
  std::string directory;
  for (const auto& e : entries_) {
    put32(directory, kCentralHeaderSig);
    put16(directory, 20);  // made by
    put16(directory, 20);  // needed
    put16(directory, kUtf8Flag | kDescriptorFlag);
    put16(directory, 0);
    put16(directory, 0);
    put16(directory, 0);
    put32(directory, e.crc);
    put32(directory, static_cast<uint32_t>(e.size));
    put32(directory, static_cast<uint32_t>(e.size));
    put16(directory, static_cast<uint16_t>(e.name.size()));
    put16(directory, 0);  // extra
    put16(directory, 0);  // comment
    put16(directory, 0);  // disk
    put16(directory, 0);  // internal attributes
    put32(directory, 0);  // external attributes
    put32(directory, static_cast<uint32_t>(e.offset));
    directory += e.name;
  }
  std::string end;
  put32(end, kEndSig);
  put16(end, 0);
  put16(end, 0);
  put16(end, static_cast<uint16_t>(entries_.size()));
  put16(end, static_cast<uint16_t>(entries_.size()));
  put32(end, static_cast<uint32_t>(directory.size()));
  put32(end, static_cast<uint32_t>(directory_offset));
  put16(end, 0);  // the comment is added by the sink
  sink_(directory.data(), directory.size());
  sink_(end.data(), end.size());
  sink_.finish();
}

}  // namespace torchfit::detail
