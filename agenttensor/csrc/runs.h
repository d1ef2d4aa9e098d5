// Shared by the native kernels that sum groups laid out as runs of agents (agenttensor/csrc/group_kernels.cpp,
// models/covid/csrc/shadow_kernel.cpp; built with -I agenttensor/csrc).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace agenttensor {

// x if same else 0, without a branch (a branch mispredicts at every run's end: 2x slower for households). A run's
// sum is acc = keep(acc, same group) + v: it starts at +0, so the first addition gives v's own bits.
inline float keep(float x, bool same) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits &= 0u - static_cast<uint32_t>(same);
  std::memcpy(&x, &bits, 4);
  return x;
}

// K chains of run sums advanced one agent at a time: acc = keep(acc, same run) + v[k][i], stored at o[k][slot] (a run's
// last store holds its sum), continuing a run of `previous` summed so far to `open`. On x86 each sum stays in an SSE
// register and keep's mask is made from the comparison, off the chain of dependent additions; `keep` on a float moved
// the sum to an integer register and back on every step (AMD Zen 3, full NYC's households, two arrays: 20.4 -> 10.5 ms
// a pass, four streams of `keep` against two of these). The same bits. Keep one in a local variable (not an array
// indexed at run time): stores to o may alias memory, which would reload the sums after every store.
template <int K>
struct RunChain {
#if defined(__SSE2__)
  __m128 acc[K];
#else
  float acc[K];
#endif
  int64_t previous;

  explicit RunChain(int64_t previous_run = -1, float open = 0.f) : previous(previous_run) {
    for (int k = 0; k < K; ++k) {
#if defined(__SSE2__)
      acc[k] = _mm_set_ss(open);
#else
      acc[k] = open;
#endif
    }
  }

  inline void add(int64_t s, const float* const (&v)[K], int64_t i, float* const (&o)[K]) {
#if defined(__SSE2__)
    const __m128 same = _mm_castsi128_ps(_mm_cvtsi32_si128(-static_cast<int32_t>(s == previous)));
    for (int k = 0; k < K; ++k) {
      acc[k] = _mm_add_ss(_mm_and_ps(acc[k], same), _mm_load_ss(v[k] + i));
      _mm_store_ss(o[k] + s, acc[k]);
    }
#else
    for (int k = 0; k < K; ++k) {
      acc[k] = keep(acc[k], s == previous) + v[k][i];
      o[k][s] = acc[k];
    }
#endif
    previous = s;
  }
};

// Index at or after `i` where a new group starts (n if none): a split point that keeps every group in one piece.
template <class Index>
int64_t group_boundary(const Index* slot, int64_t n, int64_t i) {
  if (i <= 0) return 0;
  while (i < n && slot[i] == slot[i - 1]) ++i;
  return i < n ? i : n;
}

// Cuts [0, n) into Streams pieces at run boundaries (cut[0] = 0, cut[Streams] = n, non-decreasing: a long run may
// reach past the next nominal cut) and returns the shortest piece's length
template <int Streams, class Index>
int64_t cut_at_runs(const Index* slot, int64_t n, int64_t (&cut)[Streams + 1]) {
  cut[0] = 0;
  cut[Streams] = n;
  for (int q = 1; q < Streams; ++q) cut[q] = std::max(cut[q - 1], group_boundary(slot, n, q * n / Streams));
  int64_t shortest = n;
  for (int q = 0; q < Streams; ++q) shortest = std::min(shortest, cut[q + 1] - cut[q]);
  return shortest;
}

#if defined(__AVX512F__)
// o[k][s] = the sum of v[k][i] over the run of agents i with slot[i] = s, for K arrays, over consecutive calls
// (`add`: agents [0, n) of the next stretch; a run may go on from one call into the next): every run summed in
// agent order from +0, the additions of the scalar chain acc = keep(acc, same run) + v[i] in the same order (the
// same bits), 16 agents per step. That chain is bound by the latency of its additions (four streams advanced
// together: ~2 ns per agent and array over full NYC's households); here all 16 lanes take the step
// acc = keep(lane before's acc, same run) + v at once, repeated until every lane's value is final (a lane's is once
// the lane before's is: as many repetitions as the longest chain of continuing agents among the 16, at least five,
// so most steps take no branch on it). A run's sum is written at its last agent, and at a step's last agent
// (overwritten where the run goes on). Full NYC's transition backward: 74 -> 61 ms per call (medians of 12
// interleaved calls, one day's inputs).
template <int K>
struct VectorRunSums {
  __m512 carry[K];  // the last 16 lanes' sums: lane 15 continues into the next step's lane 0
  __m512i previous = _mm512_set1_epi32(-1);

  VectorRunSums() {
    for (int k = 0; k < K; ++k) carry[k] = _mm512_setzero_ps();
  }

  void add(int64_t n, const float* const (&v)[K], const int32_t* __restrict slot, float* const (&o)[K]) {
    constexpr int kSteps = 5;
    auto repeat = [](__m512& a, const __m512& x, const __m512& before, __mmask16 same) {
      const __m512 shifted = _mm512_castsi512_ps(  // lane j: lane j - 1's sum (lane 0: the step before's lane 15)
          _mm512_alignr_epi32(_mm512_castps_si512(a), _mm512_castps_si512(before), 15));
      a = _mm512_mask_add_ps(a, same, shifted, x);
    };
    for (int64_t i = 0; i < n; i += 16) {
      const int64_t m = std::min<int64_t>(16, n - i);
      const __mmask16 valid = static_cast<__mmask16>(m == 16 ? 0xffffu : (1u << m) - 1);
      const __m512i s = _mm512_maskz_loadu_epi32(valid, slot + i);
      const __mmask16 same = _mm512_mask_cmpeq_epi32_mask(valid, s, _mm512_alignr_epi32(s, previous, 15));
      unsigned chain = same;  // lanes whose chain of continuing agents is longer than the repetitions so far
      for (int r = 0; r < kSteps; ++r) chain &= chain << 1;
      __m512 x[K], a[K];
      for (int k = 0; k < K; ++k) {
        x[k] = _mm512_maskz_loadu_ps(valid, v[k] + i);
        a[k] = _mm512_add_ps(_mm512_setzero_ps(), x[k]);  // +0 + v: a run's first sum, as `keep` gives it
      }
#pragma GCC unroll 8
      for (int r = 0; r < kSteps; ++r)
        for (int k = 0; k < K; ++k) repeat(a[k], x[k], carry[k], same);
      for (; chain; chain &= chain << 1)
        for (int k = 0; k < K; ++k) repeat(a[k], x[k], carry[k], same);
      const __mmask16 ends = static_cast<__mmask16>(  // the next agent is in another run, or this step's last agent
          _mm512_mask_cmpneq_epi32_mask(valid, s, _mm512_alignr_epi32(_mm512_set1_epi32(-1), s, 1)) |
          (1u << (m - 1)));
      // where each agent's run is the one before's or the next number (runs numbered in agent order), the ends' runs
      // are consecutive numbers from the first end's: their sums compressed into one (masked) store, where a scatter
      // wrote them one lane at a time (elsewhere it still does). Full NYC's households, 16-lane steps over chunks of
      // 1024 agents in cache: 0.82 -> 0.75 ns per agent for two arrays.
      const __mmask16 gaps = _mm512_mask_cmpgt_epu32_mask(  // lanes 1.. whose run is neither the one before's nor next
          valid & 0xfffeu, _mm512_sub_epi32(s, _mm512_alignr_epi32(s, previous, 15)), _mm512_set1_epi32(1));
      const int32_t first = gaps ? 0 : _mm512_cvtsi512_si32(_mm512_maskz_compress_epi32(ends, s));
      const __mmask16 stored = static_cast<__mmask16>((1u << _mm_popcnt_u32(ends)) - 1);
      for (int k = 0; k < K; ++k) {
        if (gaps)
          _mm512_mask_i32scatter_ps(o[k], ends, s, a[k], 4);
        else
          _mm512_mask_storeu_ps(o[k] + first, stored, _mm512_maskz_compress_ps(ends, a[k]));
        // a short last step: its lane m - 1 is lane 15 for the next step (the lanes above it hold no agent)
        carry[k] = m == 16 ? a[k] : _mm512_permutexvar_ps(_mm512_set1_epi32(static_cast<int>(m - 1)), a[k]);
      }
      previous = m == 16 ? s : _mm512_permutexvar_epi32(_mm512_set1_epi32(static_cast<int>(m - 1)), s);
    }
  }
};

// o[k][s] = the sum of v[k] over the run of slot s, for runs that lie whole in [0, n): `VectorRunSums` over Streams
// pieces cut at run boundaries, advanced together a step of 16 agents at a time (the steps of one piece form a chain
// of dependent additions through the carried lane: independent chains overlap). Each run is summed by one piece, in
// agent order from +0: the same bits. Full NYC's households as above: 0.71 ns per agent in one piece, 0.60 in two,
// 0.62 in four.
template <int K, int Streams = 2>
void vector_run_sums(int64_t n, const float* const (&v)[K], const int32_t* __restrict slot, float* const (&o)[K]) {
  int64_t cut[Streams + 1];
  const int64_t common = cut_at_runs<Streams>(slot, n, cut) & ~int64_t(15);
  VectorRunSums<K> piece[Streams];
  auto step = [&](int q, int64_t i, int64_t m) {
    const float* in[K];
    for (int k = 0; k < K; ++k) in[k] = v[k] + cut[q] + i;
    piece[q].add(m, in, slot + cut[q] + i, o);
  };
  for (int64_t i = 0; i < common; i += 16)
    for (int q = 0; q < Streams; ++q) step(q, i, 16);
  for (int q = 0; q < Streams; ++q)
    if (cut[q + 1] - cut[q] > common) step(q, common, cut[q + 1] - cut[q] - common);
}
#endif

}  // namespace agenttensor
