#pragma once
// The zip records' signatures, sizes and little-endian fields, shared by the writer and the reader.

#include <cstddef>
#include <cstdint>
#include <string>

#include "format/crc32.h"

namespace torchfit::detail {

inline constexpr uint32_t kLocalHeaderSig = 0x04034b50;
inline constexpr uint32_t kCentralHeaderSig = 0x02014b50;
inline constexpr uint32_t kEndSig = 0x06054b50;
inline constexpr uint32_t kDescriptorSig = 0x08074b50;
inline constexpr size_t kEndSize = 22;
inline constexpr size_t kAlignment = 64;  // as PyTorch, so tensors can be mapped in place
inline constexpr size_t kChunk = 4 << 20;
// "torchfit-crc32:" + 8 hex digits: the CRC32 of every byte before the comment.
inline constexpr const char* kCommentPrefix = "torchfit-crc32:";
inline constexpr size_t kCommentSize = 15 + 8;
inline constexpr uint16_t kUtf8Flag = 0x0800;
inline constexpr uint16_t kDescriptorFlag = 0x0008;

inline void put16(std::string& out, uint16_t v) {
  out.push_back(static_cast<char>(v & 0xff));
  out.push_back(static_cast<char>(v >> 8));
}
inline void put32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
inline uint16_t get16(const unsigned char* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline uint32_t get32(const unsigned char* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}

inline constexpr uint64_t kParallelThreshold = 4 * kChunk;

}  // namespace torchfit::detail
