#pragma once
// The zip container of checkpoint files, with a whole-file CRC32 in the
// end-of-archive comment: written by ZipWriter (our fast path) or by wrapping
// LibTorch's own zip writer with ChecksumSink, and checked by check_integrity.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace torchfit::detail {

class ByteSink;

/// Records at least this large start on a page boundary of the file, so a
/// page-aligned buffer can go to the disk without the page cache (O_DIRECT).
inline constexpr size_t kPageAlignedRecord = 1 << 20;
inline constexpr size_t kPageSize = 4096;
/// The fixed part of a zip local header; its name and extra field follow.
inline constexpr size_t kLocalHeaderSize = 30;

/// CRC32s of buffers whose bytes did not change since the CRC was computed, so
/// ZipWriter need not read them again (the snapshot buffers of frozen tensors).
/// Only buffers the owner registered are looked up or filled: their addresses
/// cannot be reused by other allocations while a save writes them.
class KnownCrcs {
 public:
  struct Entry {
    size_t size;
    std::optional<uint32_t> crc;
  };
  /// Registers `data`, keeping its CRC from `previous` if that holds one for the
  /// same bytes.
  void track(const void* data, size_t size, const KnownCrcs* previous = nullptr);
  void clear() { entries_.clear(); }
  std::optional<uint32_t> find(const void* data, size_t size) const;
  /// Stores the CRC of a registered buffer; ignores others.
  void remember(const void* data, size_t size, uint32_t crc);

  /// While a Scope lives, ZipWriters on this thread consult and fill `crcs`.
  class Scope {
   public:
    explicit Scope(KnownCrcs& crcs);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    KnownCrcs* previous_;
  };
  /// The CRCs of the innermost Scope on this thread, or null.
  static KnownCrcs* current();

 private:
  std::unordered_map<const void*, Entry> entries_;
};

/// Passes a zip stream through to `file`, keeping a CRC32 of every byte, and on
/// `finish()` rewrites the end-of-central-directory record to carry our checksum
/// comment. Never throws from operator() (LibTorch's writer calls it from its
/// destructor); the first error is raised by `finish()`.
class ChecksumSink {
 public:
  explicit ChecksumSink(ByteSink& file) : file_(file) {}
  size_t operator()(const void* data, size_t size) noexcept;
  /// Appends bytes whose CRC32 the caller computes itself and hands to
  /// `count()` before anything else is written.
  void write_uncounted(const void* data, size_t size) noexcept;
  /// Folds the CRC32 of the bytes of the last `write_uncounted` into the checksum.
  void count(uint32_t crc, size_t size);
  /// Bytes written so far (including those held back).
  uint64_t position() const { return position_; }
  /// Writes the held-back end record with the checksum comment; throws CheckpointError.
  void finish();
  /// Throws the first write error, if any.
  void raise_if_failed() const;

 private:
  void pass_through(const char* data, size_t size);
  ByteSink& file_;
  std::vector<char> tail_;  // the last bytes, which may be the end record
  uint32_t crc_ = 0;        // of every byte passed to file_
  uint64_t position_ = 0;
  std::string error_;
};

/// Writes a PyTorch-style zip: stored records under "<archive>/", data aligned
/// to 64 bytes, CRC32s computed while streaming. Only for archives under 4 GiB;
/// `fits()` tells beforehand.
class ZipWriter {
 public:
  ZipWriter(ChecksumSink& sink, std::string archive_name) : sink_(sink), prefix_(archive_name + "/") {}
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
  std::vector<Entry> entries_;
};

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

/// Where a record's data lies in the file, and its CRC32 from the zip directory.
struct RecordSpan {
  uint64_t offset;
  uint64_t size;  // bytes in the file
  uint32_t crc = 0;
  uint16_t method = 0;             // 0 stored; 8 deflate (LibTorch compresses TorchScript code)
  uint64_t uncompressed_size = 0;  // for deflated records
  uint64_t local = 0;              // where its local header starts
};

/// A zip's records, by name without the archive prefix, and where its central
/// directory starts (every record ends before it).
struct ZipDirectory {
  std::map<std::string, RecordSpan> records;
  uint64_t directory_offset = 0;
};

/// Reads the zip directory of any zip whose records are stored or deflated, zip64
/// included; every offset and size is checked against the file's size. Without
/// `read_local_headers` each record's `offset` stays 0 until `resolve_offset`
/// (one read fewer per record, for callers that read the headers anyway). Throws
/// CheckpointError naming the path and the damage.
ZipDirectory read_directory(const FileReader& file, bool read_local_headers);

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

/// Fresh CPU memory for a buffer about to be filled: page-aligned, and from 2 MiB
/// up aligned to 2 MiB with transparent huge pages asked for, so filling it takes
/// a fault per 2 MiB instead of one per page. Release it with std::free. Throws
/// std::bad_alloc.
void* allocate_for_filling(size_t size);

/// Runs `first` here and `second` on a helper thread; rethrows the first's error,
/// else the second's.
void run_pair(const std::function<void()>& first, const std::function<void()>& second);

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

/// Reads bytes [0, size) of `file` once: each job's span into its destination,
/// every other byte into scratch memory, adjacent small jobs sharing one read, on
/// two threads for large sizes. Returns the CRC32 of all those bytes, computed
/// as they arrive. Jobs must not overlap.
uint32_t read_once(const FileReader& file, std::vector<ReadJob> jobs, uint64_t size);

/// Checks the structure and the whole-file checksum of `file` (on two threads).
Integrity check_integrity(const FileReader& file);
/// The same for a path; throws only for files that cannot be opened.
Integrity check_integrity(const std::string& path);

}  // namespace torchfit::detail
