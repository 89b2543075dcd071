#pragma once
// The whole-file CRC32 of checkpoint files: ChecksumSink computes it as a zip stream goes out
// and seals the end record with it; KnownCrcs skips buffers whose CRC is already known.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace torchfit::detail {

class ByteSink;

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

}  // namespace torchfit::detail
