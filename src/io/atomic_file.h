#pragma once
// Crash-safe file commits: temp file in the same directory, fsync, rename, fsync dir.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "format/byte_sink.h"

namespace torchfit::detail {

/// Marker in the names of our temporary files, so leftovers can be recognised.
inline constexpr const char* kTempMarker = ".torchfit-tmp.";

/// A file written under a unique temporary name next to `target` and renamed over
/// it by `commit()`. Destroyed uncommitted, it removes the temporary file, so a
/// failed write leaves the previous target intact and nothing behind.
class AtomicFile : public ByteSink {
 public:
  AtomicFile(std::string target, bool fsync);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  /// Appends all of `data` (small writes are buffered); throws CheckpointError
  /// with the path and errno text. A durable file does not stay in the page
  /// cache: the whole pages of a page-aligned `data` at a page-aligned position
  /// go straight to the disk (O_DIRECT), and the rest is written back and
  /// dropped as it streams (the final fsync waits for the bytes anyway, and a
  /// growing page cache takes fresh memory and bandwidth from training).
  void write(const void* data, size_t size) override;
  /// Flushes, fsyncs, renames over the target and fsyncs the directory. The
  /// replaced file's blocks are freed afterwards, off the caller (file_release.h).
  void commit();

  const std::string& temp_path() const { return temp_path_; }
  const std::string& target() const override { return target_; }

 private:
  std::string target_;
  std::string temp_path_;
  bool fsync_;
  void write_fd(const char* data, size_t size);
  size_t write_direct(const char* data, size_t size);
  void flush();
  void stream_to_disk();

  int fd_ = -1;
  int direct_fd_ = -1;  // the same file opened with O_DIRECT, if the file system allows
  bool committed_ = false;
  uint64_t written_ = 0;  // bytes written to the file (through either descriptor)
  uint64_t started_ = 0;  // bytes whose writeback was started
  uint64_t dropped_ = 0;  // bytes written back and dropped from the page cache
  bool streaming_ = true;  // false where sync_file_range is not supported

  std::string buffer_;
};

/// Removes the temporary files in `directory` left by writers that no longer run:
/// named `.<target>.torchfit-tmp.<pid>.<hex>` and not locked (a writer holds an
/// flock on its temporary until the rename). Touches nothing else. Returns the
/// removed paths. AtomicFile calls it once per directory and process.
std::vector<std::string> remove_stale_temporaries(const std::string& directory);

/// Atomically points `<dir of checkpoint>/torchfit_latest.txt` at `checkpoint`.
void write_latest_pointer(const std::string& checkpoint, bool fsync);

/// Throws CheckpointError if `path` is an existing directory; `owner` names who
/// was given the path ("the checkpoint", "CheckpointCallback").
void check_not_directory(const std::string& path, const std::string& owner);

/// Throws CheckpointError unless `path` is an existing file (not a directory).
void check_readable_file(const std::string& path);

/// Throws CheckpointError naming `owner` and the directory unless `directory`
/// ("" is the working directory) is writable, or can be created: its nearest
/// existing ancestor is a writable directory. Proves it by creating and
/// removing a file; creates nothing else. Run where a fit starts, so a bad path
/// fails then and not at the first save.
void check_writable_directory(const std::string& directory, const std::string& owner);

/// fsyncs the directory holding `target`, so its entry is durable; throws CheckpointError.
void fsync_directory(const std::string& target);

/// Creates the parent directories of `path` if missing; throws CheckpointError.
void create_parent_directories(const std::string& path);


}  // namespace torchfit::detail
