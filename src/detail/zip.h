#pragma once
// The zip container of checkpoint files, with a whole-file CRC32 in the
// end-of-archive comment: written by ZipWriter (our fast path) or by wrapping
// LibTorch's own zip writer with ChecksumSink, and checked by check_integrity.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace torchfit::detail {

class AtomicFile;

/// Passes a zip stream through to `file`, keeping a CRC32 of every byte, and on
/// `finish()` rewrites the end-of-central-directory record to carry our checksum
/// comment. Never throws from operator() (LibTorch's writer calls it from its
/// destructor); the first error is raised by `finish()`.
class ChecksumSink {
 public:
  explicit ChecksumSink(AtomicFile& file) : file_(file) {}
  size_t operator()(const void* data, size_t size) noexcept;
  /// Appends bytes whose CRC32 the caller already computed.
  void write_with_crc(const void* data, size_t size, uint32_t crc) noexcept;
  /// Bytes written so far (including those held back).
  uint64_t position() const { return position_; }
  /// Writes the held-back end record with the checksum comment; throws CheckpointError.
  void finish();
  /// Throws the first write error, if any.
  void raise_if_failed() const;

 private:
  void pass_through(const char* data, size_t size, uint32_t crc, bool have_crc);
  AtomicFile& file_;
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

/// The result of checking a file's integrity.
struct Integrity {
  enum class Status { Intact, NoChecksum, Corrupt } status;
  std::string reason;  // why it is not intact
};

/// Checks the structure and the whole-file checksum of `path`. Throws only for
/// files that cannot be opened.
Integrity check_integrity(const std::string& path);

}  // namespace torchfit::detail
