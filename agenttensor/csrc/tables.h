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

// out[k][j] = tables[k][slot[j]] for n agents and K tables of `size` entries, for slots laid out as runs of agents
// (households of agents sorted by household): where 16 consecutive agents' slots lie within 16 of the first's, as
// they do unless a run of them is numbered far from the one before, the 16 values from the first's slot on are read
// with one load and permuted into place (AVX-512), else gathered (with the own contributions' vectorised sparse adds:
// full-NYC backward 87.4 -> 85.8 ms/day, benchmarks/HISTORY.md, twenty-fifth round). Exact: the values are copied.
template <int K>
inline void run_lookup(int64_t n, const float* const (&tables)[K], int64_t size, const int32_t* __restrict slot,
                       float* const (&out)[K]) {
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512i sixteen = _mm512_set1_epi32(16);
  for (; j + 16 <= n; j += 16) {
    const __m512i s = _mm512_loadu_si512(slot + j);
    const int32_t first = slot[j];
    const __m512i offset = _mm512_sub_epi32(s, _mm512_set1_epi32(first));  // (unsigned: a slot below `first` is large)
    if (_mm512_cmplt_epu32_mask(offset, sixteen) == 0xFFFF) {
      const int64_t left = size - first;  // table entries from `first` on (>= 1: slot[j] is one)
      const __mmask16 in_table = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      for (int k = 0; k < K; ++k)
        _mm512_storeu_ps(out[k] + j, _mm512_permutexvar_ps(offset, _mm512_maskz_loadu_ps(in_table, tables[k] + first)));
    } else {
      for (int k = 0; k < K; ++k) _mm512_storeu_ps(out[k] + j, _mm512_i32gather_ps(s, tables[k], 4));
    }
  }
#endif
  for (; j < n; ++j)
    for (int k = 0; k < K; ++k) out[k][j] = tables[k][slot[j]];
}

}  // namespace agenttensor
