#pragma once
// POSIX file access the readers share: positioned reads through one descriptor, error texts,
// and page-aligned buffers for reads.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace torchfit::detail {

inline constexpr size_t kPageSize = 4096;

/// The size of the file at `path`, or 0 when there is none.
uint64_t file_size_or_zero(const std::string& path);

/// "<what> <path>: <strerror(errno)>"
std::string errno_message(const std::string& what, const std::string& path, int error);

/// How much of a file's end a FileReader keeps from its one read at open: a zip's end record
/// with the longest comment (22 + 65535 bytes), and what comes before it (the directory, the
/// pickle and local headers of a small archive).
inline constexpr size_t kKeptTail = 68 << 10;

/// A regular file open for positional reads. Its last kKeptTail bytes are read once when it is
/// opened: a zip reader's first reads all fall there, and each costs a system call otherwise.
class FileReader {
 public:
  /// Throws CheckpointError naming the path if there is no such file or it is not a regular
  /// file, StorageError with the errno text if it cannot be opened or read.
  explicit FileReader(std::string path);
  ~FileReader();
  FileReader(const FileReader&) = delete;
  FileReader& operator=(const FileReader&) = delete;

  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  /// Reads exactly `n` bytes at `offset` (from the kept tail when they lie in it); throws
  /// StorageError on errors, CheckpointError at the end of the file.
  void read_at(uint64_t offset, void* buffer, size_t n) const;
  std::string read_at(uint64_t offset, size_t n) const;
  /// Bytes [offset, offset + n): a view into the kept tail when they lie in it, else read into
  /// `storage` (and valid as long as it is).
  std::string_view bytes_at(uint64_t offset, size_t n, std::string& storage) const;

 private:
  bool kept(uint64_t offset, size_t n) const;
  void read_from_file(uint64_t offset, void* buffer, size_t n) const;

  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
  std::unique_ptr<char[]> tail_;  // the file's bytes from tail_offset_ to its end
  uint64_t tail_offset_ = 0;
};

/// Fresh CPU memory for a buffer about to be filled: page-aligned, and from 2 MiB
/// up aligned to 2 MiB with transparent huge pages asked for, so filling it takes
/// a fault per 2 MiB instead of one per page. Release it with std::free. Throws
/// std::bad_alloc.
void* allocate_for_filling(size_t size);

/// Bytes read for a moment (a zip directory, a pickle) in memory this thread used for the last
/// such read: allocating and faulting in 126 KiB for the directory of 2000 records took
/// 0.3-0.5 ms in save_bench's rounds, where the read itself takes a tenth of that. A buffer in
/// use elsewhere on the thread (a nested load) is not shared: this one starts empty then.
class ScratchBytes {
 public:
  ScratchBytes();
  ~ScratchBytes();
  ScratchBytes(const ScratchBytes&) = delete;
  ScratchBytes& operator=(const ScratchBytes&) = delete;
  std::string& get() { return bytes_; }

 private:
  std::string bytes_;
};

/// Bytes this thread keeps for its next reads: the last kept tail and ScratchBytes buffer.
size_t thread_spare_bytes();
/// Frees them (release_load_memory calls it for the calling thread).
void release_thread_spares();

}  // namespace torchfit::detail
