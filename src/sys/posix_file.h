#pragma once
// POSIX file access the readers share: positioned reads through one descriptor, error texts,
// and page-aligned buffers for reads.

#include <cstddef>
#include <cstdint>
#include <string>

namespace torchfit::detail {

inline constexpr size_t kPageSize = 4096;

/// The size of the file at `path`, or 0 when there is none.
uint64_t file_size_or_zero(const std::string& path);

/// "<what> <path>: <strerror(errno)>"
std::string errno_message(const std::string& what, const std::string& path, int error);

/// A file open for positional reads.
class FileReader {
 public:
  /// Throws CheckpointError naming the path and errno text if it cannot be opened.
  explicit FileReader(std::string path);
  ~FileReader();
  FileReader(const FileReader&) = delete;
  FileReader& operator=(const FileReader&) = delete;

  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  /// Reads exactly `n` bytes at `offset`; throws CheckpointError on errors or EOF.
  void read_at(uint64_t offset, void* buffer, size_t n) const;
  std::string read_at(uint64_t offset, size_t n) const;

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

/// Fresh CPU memory for a buffer about to be filled: page-aligned, and from 2 MiB
/// up aligned to 2 MiB with transparent huge pages asked for, so filling it takes
/// a fault per 2 MiB instead of one per page. Release it with std::free. Throws
/// std::bad_alloc.
void* allocate_for_filling(size_t size);

}  // namespace torchfit::detail
