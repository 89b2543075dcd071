#include "format/checksum.h"

#include <zlib.h>

#include <exception>

#include <fmt/format.h>

#include "format/byte_sink.h"
#include "format/zip_layout.h"
#include "torchfit/error.h"

namespace torchfit::detail {

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

void KnownCrcs::track(const void* data, size_t size, const KnownCrcs* previous) {
  Entry entry{size, std::nullopt};
  if (previous) entry.crc = previous->find(data, size);
  entries_[data] = entry;
}

std::optional<uint32_t> KnownCrcs::find(const void* data, size_t size) const {
  auto it = entries_.find(data);
  if (it == entries_.end() || it->second.size != size) return std::nullopt;
  return it->second.crc;
}

void KnownCrcs::remember(const void* data, size_t size, uint32_t crc) {
  auto it = entries_.find(data);
  if (it != entries_.end() && it->second.size == size) it->second.crc = crc;
}


}  // namespace torchfit::detail
