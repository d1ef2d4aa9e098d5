// Counter-based uniforms (agenttensor/rng.py) in one pass each, for CPU: lowbias32(base ^ key) -> top 24 bits ->
// float32 in (0, 1). Loaded by agenttensor/_rng_kernels.py; rng.py holds the definition in torch ops (the reference,
// and the path on other devices). Integer arithmetic is exact and the float conversion is one rounded add and an
// exact scaling, as in the torch ops: the same bits. Plain C, no torch headers.

#include <cstdint>

#include "parallel.h"

namespace {

inline float uniform_of(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return (static_cast<float>((x >> 8) & 0xFFFFFFu) + 0.5f) * 5.9604644775390625e-08f;  // 2^-24
}

// One row's agents [i0, i1) of `agenttensor_hard_event`; Q: 0 the number q, 1 p[n], 2 1 − p[n]. Branch-free, with
// restrict pointers (uint8 stores may otherwise alias every input), so the loop vectorises.
template <int Q, bool Where>
void event_row(int64_t i0, int64_t i1, const int32_t* __restrict__ base, uint32_t key, const float* __restrict__ p,
               float q, const uint8_t* __restrict__ where, uint8_t* __restrict__ out) {
  for (int64_t n = i0; n < i1; ++n) {
    const float qn = Q == 0 ? q : Q == 1 ? p[n] : 1.f - p[n];
    const uint8_t event = uniform_of(static_cast<uint32_t>(base[n]) ^ key) < qn;
    out[n] = Where ? static_cast<uint8_t>(event * where[n]) : event;
  }
}

// One row's agents [i0, i1) of `agenttensor_float_event`: the events of `event_row` as a 0/1 mask and as float32
// 1[u < q] · where (where null: 1). Branch-free with restrict pointers: the loop vectorises.
template <int Q, bool Where>
void float_event_row(int64_t i0, int64_t i1, const int32_t* __restrict__ base, uint32_t key,
                     const float* __restrict__ p, float q, const float* __restrict__ where,
                     uint8_t* __restrict__ happened, float* __restrict__ out) {
  for (int64_t n = i0; n < i1; ++n) {
    const float qn = Q == 0 ? q : Q == 1 ? p[n] : 1.f - p[n];
    const bool event = uniform_of(static_cast<uint32_t>(base[n]) ^ key) < qn;
    happened[n] = event;
    out[n] = Where ? (event ? 1.f : 0.f) * where[n] : (event ? 1.f : 0.f);
  }
}

}  // namespace

extern "C" {

// out[b, n] = uniform(base[n] ^ keys[b])   (out [B, N] contiguous)
void agenttensor_uniform(int64_t B, int64_t N, const int32_t* base, const int32_t* keys, float* out, int64_t threads) {
  agenttensor::parallel(threads, B * N, int64_t(1) << 15, [&](int64_t lo, int64_t hi) {
    agenttensor::for_rows(lo, hi, N, [&](int64_t b, int64_t i0, int64_t i1) {
      const uint32_t key = static_cast<uint32_t>(keys[b]);
      float* row = out + b * N;
      for (int64_t n = i0; n < i1; ++n) row[n] = uniform_of(static_cast<uint32_t>(base[n]) ^ key);
    });
  });
}

// out[s, m] = uniform(base[agent[m]] ^ keys[s, batch[m]])   (keys [S, B], out [S, M] contiguous). Returns the
// number of pairs outside [0, B) x [0, N) (left unwritten): the caller raises.
int64_t agenttensor_uniform_at(int64_t S, int64_t B, int64_t N, int64_t M, const int32_t* base, const int32_t* keys,
                               const int64_t* batch, const int64_t* agent, float* out, int64_t threads) {
  int64_t outside = 0;
  agenttensor::parallel(threads, M, int64_t(1) << 14, [&](int64_t lo, int64_t hi) {
    int64_t bad = 0;
    for (int64_t m = lo; m < hi; ++m) {
      const int64_t i = agent[m], b = batch[m];
      if (i < 0 || i >= N || b < 0 || b >= B) {
        ++bad;
        continue;
      }
      const uint32_t h = static_cast<uint32_t>(base[i]);
      for (int64_t s = 0; s < S; ++s) out[s * M + m] = uniform_of(h ^ static_cast<uint32_t>(keys[s * B + b]));
    }
    if (bad) {
#pragma omp atomic
      outside += bad;
    }
  });
  return outside;
}

// Hard events, drawn for every agent: out[b, n] = 1[u < q] · where[b, n] (uint8; where may be null: 1), with
// u = uniform(base[n] ^ keys[b]) and q = p or, with `complement`, 1 − p (p = exp(−hazard): the same rounding as
// torch's 1 − p); p read at b · p_stride_b + n · p_stride_n (a broadcast [B, N] view; p_stride_n 0 or 1)
void agenttensor_hard_event(int64_t B, int64_t N, const int32_t* base, const int32_t* keys, const float* p,
                            int64_t p_stride_b, int64_t p_stride_n, int64_t complement, const uint8_t* where,
                            uint8_t* out, int64_t threads) {
  agenttensor::parallel(threads, B * N, int64_t(1) << 15, [&](int64_t lo, int64_t hi) {
    agenttensor::for_rows(lo, hi, N, [&](int64_t b, int64_t i0, int64_t i1) {
      const uint32_t key = static_cast<uint32_t>(keys[b]);
      const float* p_row = p + b * p_stride_b;
      const uint8_t* where_row = where ? where + b * N : nullptr;
      uint8_t* row = out + b * N;
      const int mode = p_stride_n == 0 ? 0 : complement ? 2 : 1;
      const float q = complement ? 1.f - p_row[0] : p_row[0];  // mode 0
      if (where_row) {
        if (mode == 0) event_row<0, true>(i0, i1, base, key, p_row, q, where_row, row);
        if (mode == 1) event_row<1, true>(i0, i1, base, key, p_row, q, where_row, row);
        if (mode == 2) event_row<2, true>(i0, i1, base, key, p_row, q, where_row, row);
      } else {
        if (mode == 0) event_row<0, false>(i0, i1, base, key, p_row, q, where_row, row);
        if (mode == 1) event_row<1, false>(i0, i1, base, key, p_row, q, where_row, row);
        if (mode == 2) event_row<2, false>(i0, i1, base, key, p_row, q, where_row, row);
      }
    });
  });
}

// Straight-through events, drawn for every agent: happened[b, n] = 1[u < q] (uint8) and out[b, n] = happened ·
// where[b, n] (float32; where [B, N] float32 or null: 1), u and q as in `agenttensor_hard_event`: the numbers of
// ``(uniform(step, stream) < q).to(float32) * where`` without the [B, N] of uniforms
void agenttensor_float_event(int64_t B, int64_t N, const int32_t* base, const int32_t* keys, const float* p,
                             int64_t p_stride_b, int64_t p_stride_n, int64_t complement, const float* where,
                             uint8_t* happened, float* out, int64_t threads) {
  agenttensor::parallel(threads, B * N, int64_t(1) << 15, [&](int64_t lo, int64_t hi) {
    agenttensor::for_rows(lo, hi, N, [&](int64_t b, int64_t i0, int64_t i1) {
      const uint32_t key = static_cast<uint32_t>(keys[b]);
      const float* p_row = p + b * p_stride_b;
      const float* where_row = where ? where + b * N : nullptr;
      uint8_t* happened_row = happened + b * N;
      float* row = out + b * N;
      const int mode = p_stride_n == 0 ? 0 : complement ? 2 : 1;
      const float q = complement ? 1.f - p_row[0] : p_row[0];  // mode 0
      if (where_row) {
        if (mode == 0) float_event_row<0, true>(i0, i1, base, key, p_row, q, where_row, happened_row, row);
        if (mode == 1) float_event_row<1, true>(i0, i1, base, key, p_row, q, where_row, happened_row, row);
        if (mode == 2) float_event_row<2, true>(i0, i1, base, key, p_row, q, where_row, happened_row, row);
      } else {
        if (mode == 0) float_event_row<0, false>(i0, i1, base, key, p_row, q, where_row, happened_row, row);
        if (mode == 1) float_event_row<1, false>(i0, i1, base, key, p_row, q, where_row, happened_row, row);
        if (mode == 2) float_event_row<2, false>(i0, i1, base, key, p_row, q, where_row, happened_row, row);
      }
    });
  });
}

}  // extern "C"
