#pragma once
// CRC32 (the zip and gzip polynomial) of every byte torchfit writes and reads back.
//
// A load checksums the whole file while it reads it, and on this machine libdeflate 1.14
// (Debian 12) checksums at about 12 GB/s, slower than the page cache hands the bytes over:
// the checksum, not the read, set the pace of large loads. Where the CPU has VPCLMULQDQ and
// AVX2, buffers of 256 bytes and more are folded 128 bytes per step on 256-bit registers;
// elsewhere, and for the head and tail, libdeflate computes it. Both give the same value.

#include <cstddef>
#include <cstdint>

namespace torchfit::detail {

/// The CRC32 of `size` bytes at `data`, continuing from `crc` (the CRC32 of the bytes
/// before them; 0 for none), as zlib's crc32 and libdeflate_crc32 compute it.
uint32_t crc32_of(const void* data, size_t size, uint32_t crc = 0);

/// Whether crc32_of folds with VPCLMULQDQ on this CPU.
bool crc32_is_folded();

}  // namespace torchfit::detail
