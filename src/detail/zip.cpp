#include "detail/zip.h"

#include <fcntl.h>
#include <libdeflate.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include <fmt/format.h>

#include "detail/atomic_file.h"
#include "torchfit/error.h"

namespace torchfit::detail {
namespace {

constexpr uint32_t kLocalHeaderSig = 0x04034b50;
constexpr uint32_t kCentralHeaderSig = 0x02014b50;
constexpr uint32_t kEndSig = 0x06054b50;
constexpr uint32_t kDescriptorSig = 0x08074b50;
constexpr size_t kEndSize = 22;
constexpr size_t kLocalHeaderSize = 30;
constexpr size_t kAlignment = 64;  // as PyTorch, so tensors can be mapped in place
constexpr size_t kChunk = 4 << 20;
// "torchfit-crc32:" + 8 hex digits: the CRC32 of every byte before the comment.
constexpr const char* kCommentPrefix = "torchfit-crc32:";
constexpr size_t kCommentSize = 15 + 8;
constexpr uint16_t kUtf8Flag = 0x0800;
constexpr uint16_t kDescriptorFlag = 0x0008;

void put16(std::string& out, uint16_t v) {
  out.push_back(static_cast<char>(v & 0xff));
  out.push_back(static_cast<char>(v >> 8));
}
void put32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint16_t get16(const unsigned char* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t get32(const unsigned char* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}

uint32_t crc32_of(const void* data, size_t size, uint32_t crc = 0) {
  return libdeflate_crc32(crc, data, size);
}

}  // namespace

void ChecksumSink::pass_through(const char* data, size_t size, uint32_t crc, bool have_crc) {
  if (size == 0) return;
  crc_ = have_crc ? static_cast<uint32_t>(crc32_combine(crc_, crc, static_cast<z_off_t>(size)))
                  : crc32_of(data, size, crc_);
  file_.write(data, size);
}

size_t ChecksumSink::operator()(const void* data, size_t size) noexcept {
  if (!error_.empty()) return size;
  try {
    // Hold back the last kEndSize bytes: they may be the end record to rewrite.
    auto* bytes = static_cast<const char*>(data);
    position_ += size;
    if (size >= kEndSize) {
      pass_through(tail_.data(), tail_.size(), 0, false);
      pass_through(bytes, size - kEndSize, 0, false);
      tail_.assign(bytes + size - kEndSize, bytes + size);
    } else {
      tail_.insert(tail_.end(), bytes, bytes + size);
      if (tail_.size() > kEndSize) {
        size_t flush = tail_.size() - kEndSize;
        pass_through(tail_.data(), flush, 0, false);
        tail_.erase(tail_.begin(), tail_.begin() + static_cast<std::ptrdiff_t>(flush));
      }
    }
  } catch (const std::exception& e) {
    error_ = e.what();
  }
  return size;
}

void ChecksumSink::write_with_crc(const void* data, size_t size, uint32_t crc) noexcept {
  if (!error_.empty()) return;
  try {
    // Large payloads are never the end record: flush the tail, then the payload.
    pass_through(tail_.data(), tail_.size(), 0, false);
    tail_.clear();
    pass_through(static_cast<const char*>(data), size, crc, true);
    position_ += size;
  } catch (const std::exception& e) {
    error_ = e.what();
  }
}

void ChecksumSink::raise_if_failed() const {
  if (!error_.empty()) throw CheckpointError(error_);
}

void ChecksumSink::finish() {
  raise_if_failed();
  auto* end = reinterpret_cast<const unsigned char*>(tail_.data());
  if (tail_.size() != kEndSize || get32(end) != kEndSig || get16(end + 20) != 0) {
    throw CheckpointError(fmt::format("Failed writing {}: the zip writer did not end with a plain end record",
                                      file_.target()));
  }
  tail_[20] = static_cast<char>(kCommentSize & 0xff);
  tail_[21] = static_cast<char>(kCommentSize >> 8);
  pass_through(tail_.data(), tail_.size(), 0, false);
  auto comment = fmt::format("{}{:08x}", kCommentPrefix, crc_);
  file_.write(comment.data(), comment.size());
  tail_.clear();
}

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
  size_t padding = (kAlignment - start % kAlignment) % kAlignment;
  put16(header, static_cast<uint16_t>(4 + padding));
  header += full_name;
  put16(header, 0x4246);  // "FB": PyTorch's padding field
  put16(header, static_cast<uint16_t>(padding));
  header.append(padding, 'Z');
  sink_(header.data(), header.size());

  uint32_t crc = 0;
  auto* bytes = static_cast<const char*>(data);
  for (size_t done = 0; done < size; done += kChunk) {
    size_t n = std::min(kChunk, size - done);
    uint32_t chunk_crc = crc32_of(bytes + done, n);  // while the chunk is in cache
    sink_.write_with_crc(bytes + done, n, chunk_crc);
    crc = static_cast<uint32_t>(crc32_combine(crc, chunk_crc, static_cast<z_off_t>(n)));
  }
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

Integrity check_integrity(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw CheckpointError(errno_message("Failed opening checkpoint", path, errno));
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw CheckpointError(errno_message("Failed reading checkpoint", path, errno));
  auto size = static_cast<uint64_t>(st.st_size);
  using Status = Integrity::Status;
  if (size == 0) return {Status::Corrupt, "the file is empty"};

  auto read_at = [&](uint64_t offset, void* buffer, size_t n) {
    size_t done = 0;
    while (done < n) {
      ssize_t r = ::pread(fd, static_cast<char*>(buffer) + done, n - done, static_cast<off_t>(offset + done));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) throw CheckpointError(errno_message("Failed reading checkpoint", path, errno));
      if (r == 0) throw CheckpointError(fmt::format("Failed reading checkpoint {}: unexpected end of file", path));
      done += static_cast<size_t>(r);
    }
  };

  unsigned char first[4] = {};
  read_at(0, first, std::min<uint64_t>(4, size));
  if (size < 4 || get32(first) != kLocalHeaderSig) {
    return {Status::Corrupt, "not a checkpoint: the file does not start with a zip record"};
  }
  const size_t trailer = kEndSize + kCommentSize;
  unsigned char tail[kEndSize + kCommentSize];
  if (size >= trailer) read_at(size - trailer, tail, trailer);
  bool has_comment = size >= trailer && get32(tail) == kEndSig && get16(tail + 20) == kCommentSize &&
                     std::memcmp(tail + kEndSize, kCommentPrefix, std::strlen(kCommentPrefix)) == 0;
  if (!has_comment) {
    unsigned char end[kEndSize];
    // A plain end record with no comment, as other tools write it; a comment
    // length that runs past the end means the file was cut.
    bool plain_end = size >= kEndSize && (read_at(size - kEndSize, end, kEndSize), get32(end) == kEndSig) &&
                     get16(end + 20) == 0;
    if (plain_end) return {Status::NoChecksum, "the file carries no torchfit checksum (written by another tool)"};
    return {Status::Corrupt, fmt::format("truncated or damaged: no end-of-archive record in the last bytes of {} bytes", size)};
  }
  std::string stored(reinterpret_cast<const char*>(tail + kEndSize + std::strlen(kCommentPrefix)), 8);
  std::vector<char> buffer(kChunk);
  uint32_t crc = 0;
  uint64_t covered = size - kCommentSize;
  for (uint64_t offset = 0; offset < covered; offset += kChunk) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(kChunk, covered - offset));
    read_at(offset, buffer.data(), n);
    crc = crc32_of(buffer.data(), n, crc);
  }
  auto computed = fmt::format("{:08x}", crc);
  if (computed != stored) {
    return {Status::Corrupt, fmt::format("checksum mismatch (stored {}, computed {}): the content is corrupt",
                                         stored, computed)};
  }
  return {Status::Intact, ""};
}

}  // namespace torchfit::detail
