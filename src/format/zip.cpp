#include "format/zip.h"

#include <fcntl.h>
#include <libdeflate.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <thread>

#include <fmt/format.h>

#include "format/byte_sink.h"
#include "torchfit/error.h"

namespace torchfit::detail {

std::string errno_message(const std::string& what, const std::string& path, int error) {
  return fmt::format("{} {}: {}", what, path, std::strerror(error));
}
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

/// Runs `first` here and `second` on a helper thread; rethrows either's error.
template <typename First, typename Second>
void run_pair(First&& first, Second&& second) {
  std::exception_ptr error;
  std::thread helper([&] {
    try {
      second();
    } catch (...) {
      error = std::current_exception();
    }
  });
  try {
    first();
  } catch (...) {
    helper.join();
    throw;
  }
  helper.join();
  if (error) std::rethrow_exception(error);
}

constexpr uint64_t kParallelThreshold = 4 * kChunk;

}  // namespace

void ChecksumSink::pass_through(const char* data, size_t size) {
  if (size == 0) return;
  crc_ = crc32_of(data, size, crc_);
  file_.write(data, size);
}

size_t ChecksumSink::operator()(const void* data, size_t size) noexcept {
  if (!error_.empty()) return size;
  try {
    // Hold back the last kEndSize bytes: they may be the end record to rewrite.
    auto* bytes = static_cast<const char*>(data);
    position_ += size;
    if (size >= kEndSize) {
      pass_through(tail_.data(), tail_.size());
      pass_through(bytes, size - kEndSize);
      tail_.assign(bytes + size - kEndSize, bytes + size);
    } else {
      tail_.insert(tail_.end(), bytes, bytes + size);
      if (tail_.size() > kEndSize) {
        size_t flush = tail_.size() - kEndSize;
        pass_through(tail_.data(), flush);
        tail_.erase(tail_.begin(), tail_.begin() + static_cast<std::ptrdiff_t>(flush));
      }
    }
  } catch (const std::exception& e) {
    error_ = e.what();
  }
  return size;
}

void ChecksumSink::write_uncounted(const void* data, size_t size) noexcept {
  if (!error_.empty()) return;
  try {
    // Large payloads are never the end record: flush the tail, then the payload.
    pass_through(tail_.data(), tail_.size());
    tail_.clear();
    file_.write(data, size);
    position_ += size;
  } catch (const std::exception& e) {
    error_ = e.what();
  }
}

void ChecksumSink::count(uint32_t crc, size_t size) {
  crc_ = static_cast<uint32_t>(crc32_combine(crc_, crc, static_cast<z_off_t>(size)));
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
  pass_through(tail_.data(), tail_.size());
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

  // The CRC runs on a second thread while this one writes the same bytes.
  uint32_t crc = 0;
  if (size >= kParallelThreshold) {
    run_pair([&] { sink_.write_uncounted(data, size); }, [&] { crc = crc32_of(data, size); });
  } else {
    crc = crc32_of(data, size);
    sink_.write_uncounted(data, size);
  }
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

FileReader::FileReader(std::string path) : path_(std::move(path)) {
  fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw CheckpointError(errno_message("Failed opening checkpoint", path_, errno));
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    int error = errno;
    ::close(fd_);
    throw CheckpointError(errno_message("Failed reading checkpoint", path_, error));
  }
  size_ = static_cast<uint64_t>(st.st_size);
}

FileReader::~FileReader() { ::close(fd_); }

void FileReader::read_at(uint64_t offset, void* buffer, size_t n) const {
  size_t done = 0;
  while (done < n) {
    ssize_t r = ::pread(fd_, static_cast<char*>(buffer) + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw CheckpointError(errno_message("Failed reading checkpoint", path_, errno));
    if (r == 0) throw CheckpointError(fmt::format("Failed reading checkpoint {}: unexpected end of file", path_));
    done += static_cast<size_t>(r);
  }
}

std::string FileReader::read_at(uint64_t offset, size_t n) const {
  std::string out(n, '\0');
  read_at(offset, out.data(), n);
  return out;
}

namespace {

/// CRC32 of bytes [begin, end) of the file, read in cache-sized chunks.
uint32_t crc32_range(const FileReader& file, uint64_t begin, uint64_t end) {
  std::vector<char> buffer(std::min<uint64_t>(kChunk, end - begin));
  uint32_t crc = 0;
  for (uint64_t offset = begin; offset < end; offset += kChunk) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(kChunk, end - offset));
    file.read_at(offset, buffer.data(), n);
    crc = crc32_of(buffer.data(), n, crc);
  }
  return crc;
}

/// CRC32 of the first `size` bytes, split over two threads for large files.
uint32_t crc32_prefix(const FileReader& file, uint64_t size) {
  if (size < kParallelThreshold) return crc32_range(file, 0, size);
  uint64_t half = size / 2;
  uint32_t first = 0, second = 0;
  run_pair([&] { first = crc32_range(file, 0, half); }, [&] { second = crc32_range(file, half, size); });
  return static_cast<uint32_t>(crc32_combine(first, second, static_cast<z_off_t>(size - half)));
}

}  // namespace

void read_parallel(const FileReader& file, const std::vector<ReadJob>& jobs) {
  uint64_t total = 0;
  for (const auto& job : jobs) total += job.span.size;
  // Cut the byte stream in two halves, splitting the job that straddles the middle.
  std::vector<ReadJob> halves[2];
  uint64_t seen = 0, middle = total < kParallelThreshold ? total : total / 2;
  for (const auto& job : jobs) {
    uint64_t begin = seen, end = seen + job.span.size;
    seen = end;
    if (end <= middle) {
      halves[0].push_back(job);
    } else if (begin >= middle) {
      halves[1].push_back(job);
    } else {
      uint64_t head = middle - begin;
      halves[0].push_back({{job.span.offset, head}, job.destination});
      halves[1].push_back({{job.span.offset + head, job.span.size - head}, static_cast<char*>(job.destination) + head});
    }
  }
  auto run = [&file](const std::vector<ReadJob>& part) {
    for (const auto& job : part) file.read_at(job.span.offset, job.destination, job.span.size);
  };
  if (halves[1].empty()) return run(halves[0]);
  run_pair([&] { run(halves[0]); }, [&] { run(halves[1]); });
}

Integrity check_integrity(const FileReader& file) {
  using Status = Integrity::Status;
  const uint64_t size = file.size();
  if (size == 0) return {Status::Corrupt, "the file is empty"};
  if (size < 4 || get32(reinterpret_cast<const unsigned char*>(file.read_at(0, 4).data())) != kLocalHeaderSig) {
    return {Status::Corrupt, "not a checkpoint: the file does not start with a zip record"};
  }
  const size_t trailer = kEndSize + kCommentSize;
  std::string tail = file.read_at(size - std::min<uint64_t>(size, trailer), std::min<uint64_t>(size, trailer));
  auto* t = reinterpret_cast<const unsigned char*>(tail.data());
  bool has_comment = tail.size() == trailer && get32(t) == kEndSig && get16(t + 20) == kCommentSize &&
                     std::memcmp(t + kEndSize, kCommentPrefix, std::strlen(kCommentPrefix)) == 0;
  if (!has_comment) {
    // A plain end record with no comment, as other tools write it; a comment
    // length that runs past the end means the file was cut.
    const unsigned char* plain = tail.size() >= kEndSize ? t + tail.size() - kEndSize : nullptr;
    if (plain != nullptr && get32(plain) == kEndSig && get16(plain + 20) == 0) {
      return {Status::NoChecksum, "the file carries no torchfit checksum (written by another tool)"};
    }
    return {Status::Corrupt,
            fmt::format("truncated or damaged: no end-of-archive record in the last bytes of {} bytes", size)};
  }
  std::string stored(reinterpret_cast<const char*>(t + kEndSize + std::strlen(kCommentPrefix)), 8);
  auto computed = fmt::format("{:08x}", crc32_prefix(file, size - kCommentSize));
  if (computed != stored) {
    return {Status::Corrupt,
            fmt::format("checksum mismatch (stored {}, computed {}): the content is corrupt", stored, computed)};
  }
  return {Status::Intact, ""};
}

Integrity check_integrity(const std::string& path) { return check_integrity(FileReader(path)); }

std::optional<std::map<std::string, RecordSpan>> list_records(const FileReader& file) {
  const uint64_t size = file.size();
  if (size < kEndSize + kCommentSize) return std::nullopt;
  std::string end_record = file.read_at(size - kEndSize - kCommentSize, kEndSize);
  auto* end = reinterpret_cast<const unsigned char*>(end_record.data());
  if (get32(end) != kEndSig) return std::nullopt;
  uint64_t count = get16(end + 10), directory_size = get32(end + 12), directory_offset = get32(end + 16);
  if (count == 0xffff || directory_offset == 0xffffffff || directory_offset + directory_size > size) {
    return std::nullopt;  // zip64 or damaged: leave it to LibTorch's reader
  }
  std::string directory = file.read_at(directory_offset, directory_size);
  auto* bytes = reinterpret_cast<const unsigned char*>(directory.data());
  std::map<std::string, RecordSpan> records;
  uint64_t at = 0;
  for (uint64_t i = 0; i < count; ++i) {
    if (at + 46 > directory_size || get32(bytes + at) != kCentralHeaderSig) return std::nullopt;
    const unsigned char* h = bytes + at;
    uint64_t record_size = get32(h + 24), local = get32(h + 42);
    size_t name_size = get16(h + 28), extra = get16(h + 30), comment = get16(h + 32);
    if (get16(h + 10) != 0 || record_size == 0xffffffff || local + kLocalHeaderSize > size ||
        at + 46 + name_size > directory_size) {
      return std::nullopt;
    }
    std::string name(reinterpret_cast<const char*>(h + 46), name_size);
    std::string local_header = file.read_at(local, kLocalHeaderSize);
    auto* l = reinterpret_cast<const unsigned char*>(local_header.data());
    if (get32(l) != kLocalHeaderSig) return std::nullopt;
    uint64_t data = local + kLocalHeaderSize + get16(l + 26) + get16(l + 28);
    if (data + record_size > size) return std::nullopt;
    auto slash = name.find('/');
    records[slash == std::string::npos ? name : name.substr(slash + 1)] = {data, record_size};
    at += 46 + name_size + extra + comment;
  }
  return records;
}

}  // namespace torchfit::detail
