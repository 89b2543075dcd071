#include "format/crc32.h"

#include <libdeflate.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TORCHFIT_CRC32_FOLD 1
#endif

namespace torchfit::detail {

#ifdef TORCHFIT_CRC32_FOLD
namespace {

/// x^n mod P, P the CRC32 polynomial, bit-reflected as the CRC's register is (bit 31 holds x^0).
constexpr uint32_t reflected_power(unsigned n) {
  uint64_t remainder = 1;  // bit i holds x^i
  for (unsigned i = 0; i < n; ++i) {
    remainder <<= 1;
    if (remainder >> 32) remainder ^= 0x104C11DB7ull;
  }
  uint32_t reflected = 0;
  for (int i = 0; i < 32; ++i) reflected |= static_cast<uint32_t>((remainder >> i) & 1) << (31 - i);
  return reflected;
}

// The bytes are a polynomial, the first byte's lowest bit its highest term. A 128-bit lane holds
// H * x^64 + L: its low quadword H (the earlier bytes) and its high quadword L. Moving the lane
// forward by D bits multiplies it by x^D, which modulo P is H * (x^(64+D) mod P) + L * (x^D mod P).
// A carry-less product of two bit-reflected quadwords comes out multiplied by x once more, hence
// the exponents 63 + D and D - 1. Each constant sits in the high half of its quadword, where a
// reflected polynomial of degree below 32 lies.
constexpr unsigned kFoldBits = 4 * 256;  // four 256-bit registers: 128 bytes a step
constexpr uint64_t kHighTerms = static_cast<uint64_t>(reflected_power(63 + kFoldBits)) << 32;
constexpr uint64_t kLowTerms = static_cast<uint64_t>(reflected_power(kFoldBits - 1)) << 32;
constexpr size_t kStep = kFoldBits / 8;

#define TORCHFIT_FOLD_TARGET __attribute__((target("avx2,pclmul,vpclmulqdq")))

TORCHFIT_FOLD_TARGET inline __m256i load(const unsigned char* at) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
}

TORCHFIT_FOLD_TARGET inline __m256i fold(__m256i lanes, __m256i constants, const unsigned char* next) {
  const __m256i high = _mm256_clmulepi64_epi128(lanes, constants, 0x00);
  const __m256i low = _mm256_clmulepi64_epi128(lanes, constants, 0x11);
  return _mm256_xor_si256(_mm256_xor_si256(high, low), load(next));
}

/// `size` >= 2 * kStep bytes. The running register goes into the first four bytes; the lanes
/// then fold forward step by step, and what is left (128 bytes that leave the same remainder as
/// everything folded) is checksummed from a zero register, followed by the tail.
TORCHFIT_FOLD_TARGET uint32_t crc32_folded(const unsigned char* p, size_t size, uint32_t crc) {
  const __m256i constants = _mm256_set_epi64x(static_cast<long long>(kLowTerms), static_cast<long long>(kHighTerms),
                                              static_cast<long long>(kLowTerms), static_cast<long long>(kHighTerms));
  __m256i a0 = _mm256_xor_si256(load(p), _mm256_set_epi32(0, 0, 0, 0, 0, 0, 0, static_cast<int>(~crc)));
  __m256i a1 = load(p + 32), a2 = load(p + 64), a3 = load(p + 96);
  p += kStep;
  size -= kStep;
  for (; size >= kStep; p += kStep, size -= kStep) {
    a0 = fold(a0, constants, p);
    a1 = fold(a1, constants, p + 32);
    a2 = fold(a2, constants, p + 64);
    a3 = fold(a3, constants, p + 96);
  }
  alignas(32) unsigned char left[kStep];
  _mm256_store_si256(reinterpret_cast<__m256i*>(left), a0);
  _mm256_store_si256(reinterpret_cast<__m256i*>(left + 32), a1);
  _mm256_store_si256(reinterpret_cast<__m256i*>(left + 64), a2);
  _mm256_store_si256(reinterpret_cast<__m256i*>(left + 96), a3);
  crc = libdeflate_crc32(0xffffffffu, left, kStep);  // from a zero register
  return libdeflate_crc32(crc, p, size);
}

bool cpu_folds() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("vpclmulqdq");
}

}  // namespace

bool crc32_is_folded() {
  static const bool folds = cpu_folds();
  return folds;
}

uint32_t crc32_of(const void* data, size_t size, uint32_t crc) {
  if (size >= 2 * kStep && crc32_is_folded()) return crc32_folded(static_cast<const unsigned char*>(data), size, crc);
  return libdeflate_crc32(crc, data, size);
}
#else
bool crc32_is_folded() { return false; }
uint32_t crc32_of(const void* data, size_t size, uint32_t crc) { return libdeflate_crc32(crc, data, size); }
#endif

}  // namespace torchfit::detail
