#include "sys/posix_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <new>

#include <fmt/format.h>

#include "torchfit/error.h"

namespace torchfit::detail {

uint64_t file_size_or_zero(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

std::string errno_message(const std::string& what, const std::string& path, int error) {
  return fmt::format("{} {}: {}", what, path, std::strerror(error));
}

namespace {
/// The kept tail of the last FileReader closed on this thread, for the next one: allocating
/// 68 KiB took 0.2-0.5 ms in save_bench's rounds (glibc sorting the thousands of free chunks
/// other work had left), longer than anything else before a load's first read.
thread_local std::unique_ptr<char[]> spare_tail;

thread_local std::string spare_scratch;
constexpr size_t kMaxScratchKept = 4 << 20;  // a larger buffer is freed after its use
}  // namespace

ScratchBytes::ScratchBytes() : bytes_(std::move(spare_scratch)) { bytes_.clear(); }

ScratchBytes::~ScratchBytes() {
  if (bytes_.capacity() <= kMaxScratchKept && bytes_.capacity() > spare_scratch.capacity()) {
    spare_scratch = std::move(bytes_);
  }
}

size_t thread_spare_bytes() {
  return (spare_tail ? kKeptTail : 0) + spare_scratch.capacity() - std::string().capacity();
}

void release_thread_spares() {
  spare_tail.reset();
  std::string().swap(spare_scratch);
}

FileReader::FileReader(std::string path) : path_(std::move(path)) {
  // Non-blocking, so that a FIFO in a checkpoint's place is refused rather than waited on.
  fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd_ < 0 && (errno == ENOENT || errno == ENOTDIR)) {
    throw CheckpointError(fmt::format("Checkpoint file {} does not exist", path_));
  }
  if (fd_ < 0) throw StorageError(errno_message("Failed opening checkpoint", path_, errno));
  try {
    struct stat st {};
    if (::fstat(fd_, &st) != 0) throw StorageError(errno_message("Failed reading checkpoint", path_, errno));
    if (S_ISDIR(st.st_mode)) throw CheckpointError(fmt::format("Checkpoint path {} is a directory, not a file", path_));
    if (!S_ISREG(st.st_mode)) throw CheckpointError(fmt::format("Checkpoint path {} is not a regular file", path_));
    size_ = static_cast<uint64_t>(st.st_size);
    const uint64_t kept = std::min<uint64_t>(size_, kKeptTail);
    tail_offset_ = size_ - kept;
    tail_ = spare_tail ? std::move(spare_tail) : std::unique_ptr<char[]>(new char[kKeptTail]);
    read_from_file(tail_offset_, tail_.get(), kept);
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

FileReader::~FileReader() {
  ::close(fd_);
  if (!spare_tail) spare_tail = std::move(tail_);
}

bool FileReader::kept(uint64_t offset, size_t n) const {
  return offset >= tail_offset_ && offset <= size_ && n <= size_ - offset;
}

void FileReader::read_at(uint64_t offset, void* buffer, size_t n) const {
  if (kept(offset, n)) {
    std::memcpy(buffer, tail_.get() + (offset - tail_offset_), n);
  } else {
    read_from_file(offset, buffer, n);
  }
}

std::string_view FileReader::bytes_at(uint64_t offset, size_t n, std::string& storage) const {
  if (kept(offset, n)) return {tail_.get() + (offset - tail_offset_), n};
  storage.resize(n);  // into the memory `storage` has, when it has enough
  read_from_file(offset, storage.data(), n);
  return storage;
}

void FileReader::read_from_file(uint64_t offset, void* buffer, size_t n) const {
  size_t done = 0;
  while (done < n) {
    ssize_t r = ::pread(fd_, static_cast<char*>(buffer) + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw StorageError(errno_message("Failed reading checkpoint", path_, errno));
    if (r == 0) throw CheckpointError(fmt::format("Failed reading checkpoint {}: unexpected end of file", path_));
    done += static_cast<size_t>(r);
  }
}

std::string FileReader::read_at(uint64_t offset, size_t n) const {
  std::string out(n, '\0');
  read_at(offset, out.data(), n);
  return out;
}

void* allocate_for_filling(size_t size) {
  constexpr size_t kHugePage = 2 << 20;
  void* data = nullptr;
  if (::posix_memalign(&data, size >= kHugePage ? kHugePage : kPageSize, std::max<size_t>(size, 1)) != 0) {
    throw std::bad_alloc();
  }
#ifdef MADV_HUGEPAGE
  // Whole huge pages only: the tail keeps small pages rather than round up the memory used.
  if (size >= kHugePage) ::madvise(data, size / kHugePage * kHugePage, MADV_HUGEPAGE);
#endif
  return data;
}

}  // namespace torchfit::detail
