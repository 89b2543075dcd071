#pragma once
// The zip container of checkpoint files, with a whole-file CRC32 in the
// end-of-archive comment: written by ZipWriter (our fast path) or by wrapping
// LibTorch's own zip writer with ChecksumSink, and checked by check_integrity.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "format/checksum.h"
#include "sys/posix_file.h"
#include "sys/threads.h"
#include "torchfit/error.h"

namespace torchfit::detail {

/// Records at least this large start on a page boundary of the file, so a
/// page-aligned buffer can go to the disk without the page cache (O_DIRECT).
inline constexpr size_t kPageAlignedRecord = 1 << 20;
/// The fixed part of a zip local header; its name and extra field follow.
inline constexpr size_t kLocalHeaderSize = 30;

/// Writes a PyTorch-style zip: stored records under "<archive>/", data aligned
/// to 64 bytes, CRC32s computed while streaming. Only for archives under 4 GiB;
/// `fits()` tells beforehand.
class ZipWriter {
 public:
  /// Buffers `known_crcs` knows are not read again for their CRC32.
  ZipWriter(ChecksumSink& sink, std::string archive_name, KnownCrcs* known_crcs = nullptr)
      : sink_(sink), prefix_(archive_name + "/"), known_crcs_(known_crcs) {}
  /// Whether records of these total payload bytes fit without zip64.
  static bool fits(uint64_t payload_bytes, size_t records);
  void add(const std::string& name, const void* data, size_t size);
  /// Writes the central directory and the end record, then `sink.finish()`.
  void finish();

 private:
  struct Entry {
    std::string name;
    uint32_t crc;
    uint64_t size;
    uint64_t offset;
  };
  ChecksumSink& sink_;
  std::string prefix_;
  KnownCrcs* known_crcs_;
  std::vector<Entry> entries_;
};

/// Where a record's data lies in the file, and its CRC32 from the zip directory.
struct RecordSpan {
  uint64_t offset;
  uint64_t size;  // bytes in the file
  uint32_t crc = 0;
  uint16_t method = 0;             // 0 stored; 8 deflate (LibTorch compresses TorchScript code)
  uint64_t uncompressed_size = 0;  // for deflated records
  uint64_t local = 0;              // where its local header starts
};

/// Orders record names by length, then bytes: one comparison tells most names apart, and the
/// records torchfit and LibTorch write (data/0, data/1, ..., data/10, ...) come in this order.
struct RecordNameLess {
  using is_transparent = void;
  bool operator()(std::string_view a, std::string_view b) const {
    return a.size() != b.size() ? a.size() < b.size() : a < b;
  }
};
/// Records by name without the archive prefix, in RecordNameLess order. A sorted vector: a
/// directory is built once, in order, and then only searched, and a tree node per record (2000
/// for as many small tensors) cost more to make and free than the searches save.
class RecordMap {
 public:
  using value_type = std::pair<std::string, RecordSpan>;
  using const_iterator = std::vector<value_type>::const_iterator;

  const_iterator begin() const { return records_.begin(); }
  const_iterator end() const { return records_.end(); }
  size_t size() const { return records_.size(); }
  const_iterator find(std::string_view name) const;
  size_t count(std::string_view name) const { return find(name) != end() ? 1 : 0; }
  /// Throws std::out_of_range naming `name` if there is no such record.
  const RecordSpan& at(std::string_view name) const;
  /// Adds a record, O(1) when it comes after every other; false, adding nothing, if the name is
  /// there already.
  bool insert(std::string_view name, const RecordSpan& span);
  void reserve(size_t n) { records_.reserve(n); }

 private:
  std::vector<value_type> records_;
};

/// A zip's records, and where its central directory starts (every record ends before it).
struct ZipDirectory {
  RecordMap records;
  uint64_t directory_offset = 0;
};

/// Reads the zip directory of any zip whose records are stored or deflated, zip64
/// included; every offset and size is checked against the file's size. Without
/// `read_local_headers` each record's `offset` stays 0 until `resolve_offset`
/// (one read fewer per record, for callers that read the headers anyway). Throws
/// CheckpointError naming the path and the damage.
ZipDirectory read_directory(const FileReader& file, bool read_local_headers);

/// Where a zip's central directory lies, as its end record (or zip64 end record) says,
/// checked against the file's size: read_directory's first half.
struct DirectoryLocation {
  uint64_t count = 0;   // records
  uint64_t size = 0;    // bytes
  uint64_t offset = 0;  // where it starts
};
DirectoryLocation locate_directory(const FileReader& file);
/// read_directory of the directory at `location`.
ZipDirectory read_directory(const FileReader& file, const DirectoryLocation& location, bool read_local_headers);

/// Sets `span.offset` from the record's local header: `header` holds the
/// kLocalHeaderSize bytes at `span.local`, or, without it, they are read.
void resolve_offset(const FileReader& file, std::string_view name, RecordSpan& span, const unsigned char* header);
void resolve_offset(const FileReader& file, std::string_view name, RecordSpan& span);

/// Throws CheckpointError unless `data` (record `name` of `file`) matches the
/// CRC32 the zip directory gives for it.
void check_record_crc(const FileReader& file, const std::string& name, const RecordSpan& span, const void* data);

/// A span of the file to read into memory.
struct ReadJob {
  RecordSpan span;
  void* destination;
  bool filled = false;  // `destination` holds the bytes already: read_once only counts them
};

/// Runs the reads, split over two threads by bytes for large totals.
void read_parallel(const FileReader& file, const std::vector<ReadJob>& jobs);

/// The result of checking a file's integrity.
struct Integrity {
  enum class Status { Intact, NoChecksum, Corrupt } status;
  std::string reason;  // why it is not intact
};

/// What a file's end says: `Intact` here means it carries a torchfit checksum
/// (`checksum`, not yet compared), `NoChecksum` another tool's zip, `Corrupt` damage.
struct Trailer {
  Integrity integrity;
  uint32_t checksum = 0;
  uint64_t covered = 0;  // bytes the checksum covers: all but the comment
};
Trailer read_trailer(const FileReader& file);
/// "checksum mismatch (stored ..., computed ...)".
Integrity checksum_mismatch(uint32_t stored, uint32_t computed);
/// CheckpointError "Checkpoint <path> is damaged: <what>".
CheckpointError damaged_checkpoint(const std::string& path, const std::string& what);

/// Reads bytes [0, size) of `file` once: each job's span into its destination,
/// every other byte into scratch memory, adjacent small jobs sharing one read.
/// Returns the CRC32 of all those bytes, computed as they arrive. Jobs must not
/// overlap.
/// `alongside` runs on the calling thread while a helper reads; then the calling
/// thread reads too, taking stretches of the file in turn with the helper. Small
/// files are read after it, on the calling thread alone.
uint32_t read_once(const FileReader& file, std::vector<ReadJob> jobs, uint64_t size,
                   const std::function<void()>& alongside = {});
/// read_once of bytes [0, size) into `destination`, begun on a helper thread at construction
/// while the caller does other work (a file of many small records, read from the moment it is
/// opened while its directory and pickle are parsed). finish() takes the caller's share.
struct ReadStretches;  // read_once's and BackgroundRead's shared state (zip.cpp)
class BackgroundRead {
 public:
  BackgroundRead(const FileReader& file, void* destination, uint64_t size);
  /// Stops the helper after the stretch it reads, and waits for it.
  ~BackgroundRead();
  BackgroundRead(const BackgroundRead&) = delete;
  BackgroundRead& operator=(const BackgroundRead&) = delete;
  /// Reads the stretches the helper has not taken, waits for it, rethrows a read error of
  /// either thread, and returns the CRC32 of the bytes. Once only.
  uint32_t finish();

 private:
  std::unique_ptr<ReadStretches> stretches_;
  std::unique_ptr<HelperRun> helper_;
};

/// Files read on two threads from this size on: smaller ones cost less than a thread (1 MiB:
/// 0.27 ms alone, 0.39 helped).
inline constexpr uint64_t kHelpedRead = 2 << 20;

/// A read_once of `size` bytes comes soon from this thread: the helper it reads with is woken
/// now, while the caller still prepares (files of 2 MiB and more, which it reads on two threads).
void expect_read_once(uint64_t size);

/// Checks the structure and the whole-file checksum of `file` (read as `read_once` reads).
Integrity check_integrity(const FileReader& file);
/// The same for a path; throws only for files that cannot be opened.
Integrity check_integrity(const std::string& path);

}  // namespace torchfit::detail
