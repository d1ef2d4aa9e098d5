// Byte masks for the native kernels (built with -I agenttensor/csrc): which of 32 consecutive bytes have any of
// `bits` set, as one 32-bit mask (AVX2 builds only), for passes that pick the few agents whose flags are set.
#pragma once

#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>

namespace agenttensor {

// bit j set where p[j] & bits is not 0, for j in [0, 32): one compare and `movemask`
inline uint32_t flagged32(const uint8_t* p, uint8_t bits) {
  const __m256i v = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                                     _mm256_set1_epi8(static_cast<char>(bits)));
  return ~static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256())));
}

}  // namespace agenttensor
#endif
