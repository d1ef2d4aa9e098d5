// Streaming (non-temporal) stores for the native kernels (built with -I agenttensor/csrc): a fresh [B, N] output that
// a pass writes and that nobody reads soon (e.g. the backward's exp(−λ), the force's d λ) otherwise has each of its
// cache lines read from memory before it is written.
#pragma once

#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace agenttensor {

// dst[0, n) = src[0, n) (src: a block in cache), streamed where dst is 64-byte aligned (AVX-512) or 32-byte aligned
// (AVX, e.g. AMD Zen 3), else stored
inline void stream_out(float* dst, const float* src, int64_t n) {
  int64_t k = 0;
#if defined(__AVX512F__)
  for (; k < n && (reinterpret_cast<uintptr_t>(dst + k) & 63); ++k) dst[k] = src[k];
  for (; k + 16 <= n; k += 16) _mm512_stream_ps(dst + k, _mm512_loadu_ps(src + k));
#elif defined(__AVX__)
  for (; k < n && (reinterpret_cast<uintptr_t>(dst + k) & 31); ++k) dst[k] = src[k];
  for (; k + 8 <= n; k += 8) _mm256_stream_ps(dst + k, _mm256_loadu_ps(src + k));
#endif
  for (; k < n; ++k) dst[k] = src[k];
}

// orders this thread's streamed stores before what follows (call before the pass returns)
inline void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();
#endif
}

}  // namespace agenttensor
