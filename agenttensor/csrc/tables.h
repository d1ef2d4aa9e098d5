// Shared by the native kernels: per-agent values read from a small table through a per-agent index.
#pragma once

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace agenttensor {

// out[j] = table[index[j]] for n agents (index in [0, size); int32 or bytes, e.g. the age groups as one byte per
// agent): with AVX-512 and a table of at most 16 entries (the age groups, the boroughs) in-register, one permute per
// 16 agents; else a plain loop (the compiler's gathers or scalar loads: these small-table loops stayed scalar, ~a
// quarter of the covid shadow backward's tile time at full NYC). Exact: the values are copied.
template <class Index>
inline void small_table_lookup(int64_t n, const float* __restrict table, int64_t size, const Index* __restrict index,
                               float* __restrict out) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if (size <= 16) {
    const __m512 values = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << size) - 1), table);
    for (; j + 16 <= n; j += 16) {
      __m512i slots;
      if constexpr (sizeof(Index) == 1)
        slots = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(index + j)));
      else
        slots = _mm512_loadu_si512(index + j);
      _mm512_storeu_ps(out + j, _mm512_permutexvar_ps(slots, values));
    }
  }
#endif
  for (; j < n; ++j) out[j] = table[index[j]];
}

}  // namespace agenttensor
