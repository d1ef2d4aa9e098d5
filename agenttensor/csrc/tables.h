// Shared by the native kernels: per-agent values read from a small table through a per-agent index.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace agenttensor {

#if defined(__AVX2__) && !defined(__AVX512F__)
// 8 agents' indices as int32 lanes (index: int32 or bytes)
template <class Index>
inline __m256i load_indices8(const Index* index) {
  if constexpr (sizeof(Index) == 1)
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(index)));
  else
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(index));
}
#endif

// out[j] = table[index[j]] for n agents (index in [0, size); int32 or bytes, e.g. the age groups as one byte per
// agent): with AVX-512 and a table of at most 16 entries (the age groups, the boroughs) in-register, one permute per
// 16 agents; with AVX2 (no AVX-512, e.g. AMD Zen 3) two permutes of 8 entries and a blend per 8 agents; else a plain
// loop (the compiler's gathers or scalar loads: these small-table loops stayed scalar, ~a quarter of the covid shadow
// backward's tile time at full NYC). Exact: the values are copied.
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
#elif defined(__AVX2__)
  if constexpr (sizeof(Index) == 1 || sizeof(Index) == 4) {
    if (size <= 16) {
      float padded[16] = {};
      for (int64_t k = 0; k < size; ++k) padded[k] = table[k];
      const __m256 low = _mm256_loadu_ps(padded), high = _mm256_loadu_ps(padded + 8);
      const __m256i seven = _mm256_set1_epi32(7);
      for (; j + 8 <= n; j += 8) {
        const __m256i slots = load_indices8(index + j);
        __m256 values = _mm256_permutevar8x32_ps(low, slots);  // (the index's low 3 bits)
        if (size > 8)
          values = _mm256_blendv_ps(values, _mm256_permutevar8x32_ps(high, slots),
                                    _mm256_castsi256_ps(_mm256_cmpgt_epi32(slots, seven)));
        _mm256_storeu_ps(out + j, values);
      }
    }
  }
#endif
  for (; j < n; ++j) out[j] = table[index[j]];
}

// out[k][j] = tables[k][slot[j]] for n agents and K tables of `size` entries, for slots laid out as runs of agents
// (households of agents sorted by household): where 16 consecutive agents' slots lie within 16 of the first's, as they
// do unless a run of them is numbered far from the one before, the 16 values from the first's slot on are read with one
// load and permuted into place (AVX-512; with AVX2 8 agents from one load of 8 values), else gathered (with the own
// contributions' vectorised sparse adds: full-NYC backward 87.4 -> 85.8 ms/day, benchmarks/HISTORY.md, twenty-fifth
// round). Exact: the values are copied.
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
#elif defined(__AVX2__)
  const __m256i seven = _mm256_set1_epi32(7), lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; j + 8 <= n; j += 8) {
    const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(slot + j));
    const int32_t first = slot[j];
    const __m256i offset = _mm256_sub_epi32(s, _mm256_set1_epi32(first));  // (unsigned: a slot below `first` is large)
    if (_mm256_movemask_epi8(_mm256_cmpeq_epi32(_mm256_max_epu32(offset, seven), seven)) == -1) {
      const int64_t left = size - first;  // table entries from `first` on (>= 1: slot[j] is one)
      const __m256i in_table = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(left, 8))),
                                                  lanes);
      for (int k = 0; k < K; ++k)
        _mm256_storeu_ps(out[k] + j, _mm256_permutevar8x32_ps(
                                         left >= 8 ? _mm256_loadu_ps(tables[k] + first)
                                                   : _mm256_maskload_ps(tables[k] + first, in_table), offset));
    } else {
      for (int64_t i = j; i < j + 8; ++i)
        for (int k = 0; k < K; ++k) out[k][i] = tables[k][slot[i]];
    }
  }
#endif
  for (; j < n; ++j)
    for (int k = 0; k < K; ++k) out[k][j] = tables[k][slot[j]];
}

}  // namespace agenttensor
