// Counter-based uniforms (agenttensor/rng.py) in one pass each, for CPU: lowbias32(base ^ key) -> top 24 bits ->
// float32 in (0, 1) (uniform.h). Loaded by agenttensor/_rng_kernels.py; rng.py holds the definition in torch ops (the reference,
// and the path on other devices). Integer arithmetic is exact and the float conversion is one rounded add and an
// exact scaling, as in the torch ops: the same bits. Plain C, no torch headers.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "pairs.h"
#include "parallel.h"
#include "stores.h"
#include "torch_exp.h"
#include "uniform.h"

namespace {

using agenttensor::uniform_of;

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

// The loop shared by the event kernels: each row's agents [i0, i1) of `row_fn<Q, Where>(i0, i1, key, p_row, q, b)`,
// with Q the form of p (0: one number per row, q; 1: p[n]; 2: 1 − p[n]; p = exp(−hazard) with `complement`, the
// same rounding as torch's 1 − p) and Where whether a `where` is given. p is read at b · p_stride_b + n ·
// p_stride_n (a broadcast [B, N] view; p_stride_n 0 or 1).
template <class RowFn>
void event_rows(int64_t B, int64_t N, const int32_t* keys, const float* p, int64_t p_stride_b, int64_t p_stride_n,
                int64_t complement, bool where, int64_t threads, RowFn&& row_fn) {
  using Q0 = std::integral_constant<int, 0>;
  using Q1 = std::integral_constant<int, 1>;
  using Q2 = std::integral_constant<int, 2>;
  agenttensor::parallel(threads, B * N, int64_t(1) << 15, [&](int64_t lo, int64_t hi) {
    agenttensor::for_rows(lo, hi, N, [&](int64_t b, int64_t i0, int64_t i1) {
      const uint32_t key = static_cast<uint32_t>(keys[b]);
      const float* p_row = p + b * p_stride_b;
      const float q = complement ? 1.f - p_row[0] : p_row[0];  // Q = 0
      const int mode = p_stride_n == 0 ? 0 : complement ? 2 : 1;
      auto run = [&](auto w) {
        if (mode == 0) row_fn(Q0(), w, i0, i1, key, p_row, q, b);
        if (mode == 1) row_fn(Q1(), w, i0, i1, key, p_row, q, b);
        if (mode == 2) row_fn(Q2(), w, i0, i1, key, p_row, q, b);
      };
      if (where)
        run(std::true_type());
      else
        run(std::false_type());
    });
  });
}

// One row's agents [i0, i1) of `agenttensor_float_event_move`, in blocks of kMoveBlock: each block's events
// (branch-free over restrict pointers: vectorised), then its moved agents' (b, n) appended to `pairs`. InPlace: the
// outputs are not written in the first loop; the moved agents' values change in from and into themselves (where
// the outputs would have been written with from − 0 = from and into + 0 = into elsewhere: the same numbers).
constexpr int64_t kMoveBlock = 1024;

// moved(n) for each agent n of [j0, j1) whose event happened, in order: 8 agents' bytes at a time, skipped where all
// are 0 (at an epidemic's peak most blocks have an event, and an agent-by-agent scan of every block was most of the
// pass)
template <class Moved>
inline void each_event(int64_t j0, int64_t j1, const uint8_t* happened, Moved&& moved) {
  int64_t n = j0;
  for (; n + 8 <= j1; n += 8) {
    uint64_t word;
    std::memcpy(&word, happened + n, 8);
    if (!word) continue;
    for (int64_t k = n; k < n + 8; ++k)
      if (happened[k]) moved(k);
  }
  for (; n < j1; ++n)
    if (happened[n]) moved(n);
}

// `move_row`'s scan of a block in place: from and into are the fields themselves (not restrict: written here only)
inline void move_in_place(int64_t b, int64_t j0, int64_t j1, const uint8_t* happened, float* from, float* into,
                          std::vector<int64_t>& pairs) {
  each_event(j0, j1, happened, [&](int64_t n) {
    if (from[n] != 0.f) {
      pairs.push_back(b);
      pairs.push_back(n);
      const float e = 1.f * from[n];
      from[n] = from[n] - e;
      into[n] = into[n] + e;
    }
  });
}

// p[n - p_first] is agent n's p (Q 1, 2)
template <int Q, bool InPlace>
void move_row(int64_t b, int64_t i0, int64_t i1, const int32_t* __restrict__ base, uint32_t key,
              const float* __restrict__ p, int64_t p_first, float q, const float* __restrict__ from,
              const float* __restrict__ into,
              uint8_t* __restrict__ happened, float* __restrict__ from_out, float* __restrict__ into_out,
              std::vector<int64_t>& pairs) {
  for (int64_t j0 = i0; j0 < i1; j0 += kMoveBlock) {
    const int64_t j1 = std::min(i1, j0 + kMoveBlock);
    // the block's moved agents (most blocks have none: no scan); in place, its events: the scan then reads `from` at
    // them only (the whole [B, N] of it is not read: a quarter of the pass's bytes)
    int32_t any = 0;
    for (int64_t n = j0; n < j1; ++n) {
      const float qn = Q == 0 ? q : Q == 1 ? p[n - p_first] : 1.f - p[n - p_first];
      const bool event = uniform_of(static_cast<uint32_t>(base[n]) ^ key) < qn;
      happened[n] = event;
      if (InPlace) {
        any += event;
      } else {
        const float e = (event ? 1.f : 0.f) * from[n];  // the events, as `float_event` makes them
        from_out[n] = from[n] - e;
        into_out[n] = into[n] + e;
        any += e != 0.f;
      }
    }
    if (any == 0) continue;
    if (InPlace) {
      move_in_place(b, j0, j1, happened, from_out, into_out, pairs);
      continue;
    }
    each_event(j0, j1, happened, [&](int64_t n) {  // e != 0 where the event happened and from is not 0
      if (from[n] != 0.f) {
        pairs.push_back(b);
        pairs.push_back(n);
      }
    });
  }
}

// `move_row` of row b's agents [i0, i1) of [B, N] arrays, in place (from_out null) or into the outputs
template <int Q>
void move_span(int64_t b, int64_t N, int64_t i0, int64_t i1, const int32_t* base, uint32_t key, const float* p_row,
               int64_t p_first, float q, const float* from, const float* into, uint8_t* happened, float* from_out,
               float* into_out, bool in_place, std::vector<int64_t>& mine) {
  const int64_t o = b * N;
  if (in_place)  // (from and into written at the moved agents, after the first loop read them)
    move_row<Q, true>(b, i0, i1, base, key, p_row, p_first, q, from + o, into + o, happened + o,
                      const_cast<float*>(from) + o, const_cast<float*>(into) + o, mine);
  else
    move_row<Q, false>(b, i0, i1, base, key, p_row, p_first, q, from + o, into + o, happened + o, from_out + o,
                       into_out + o, mine);
}

// The move kernels' loop: row_fn(b, i0, i1, pairs) over fixed pieces of 2^16 agents, handed to the threads as they
// come free (`parallel_tasks`: with equal halves one thread waited for the other at the end of each call; an agent's
// draw depends on its own values only), each piece's moved agents' (b, n) into a list of its own, the lists held in
// the pieces' order (row-major) for `agenttensor_take_pairs`. Returns their count.
template <class RowFn>
int64_t moves(int64_t B, int64_t N, int64_t threads, void** pairs, RowFn&& row_fn) {
  const int64_t n = B * N, piece = int64_t(1) << 16, pieces = (n + piece - 1) / piece;
  std::vector<std::vector<int64_t>> chunks(pieces);
  auto take = [&](agenttensor::TaskQueue& queue) {
    for (int64_t task; queue.next(task);)
      agenttensor::for_rows(task * piece, std::min(n, (task + 1) * piece), N,
                            [&](int64_t b, int64_t i0, int64_t i1) { row_fn(b, i0, i1, chunks[task]); });
  };
  agenttensor::parallel_tasks(std::max<int64_t>(1, std::min<int64_t>(threads, n >> 15)), pieces, take);
  size_t total = 0;
  for (const auto& chunk : chunks) total += chunk.size();
  *pairs = agenttensor::hold_pairs(std::move(chunks));
  return static_cast<int64_t>(total / 2);
}

// agents per exp call: its block and exp(−h) stay in L1 for the draws. On AMD's AVX-512 CPUs (`AGENTTENSOR_ZEN`, 48 KB
// L1) 8192: on Zen 5 at full NYC the infection draws' pass -0.49 ms per call against 2048 (5 of 6 runs, pairs 3 of 3;
// 16384: -0.14 to -0.33 again, 4 of 6), fewer calls into MKL
#if defined(AGENTTENSOR_ZEN)
constexpr int64_t kExpBlock = 8192;
#else
constexpr int64_t kExpBlock = 2048;
#endif

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
      if (m + agenttensor::kFetchAhead < hi) {  // the agents' hashes are scattered reads
        const int64_t ahead = agent[m + agenttensor::kFetchAhead];
        if (ahead >= 0 && ahead < N) __builtin_prefetch(base + ahead);
      }
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
// u = uniform(base[n] ^ keys[b]) and q = p or, with `complement`, 1 − p (see `event_rows`)
void agenttensor_hard_event(int64_t B, int64_t N, const int32_t* base, const int32_t* keys, const float* p,
                            int64_t p_stride_b, int64_t p_stride_n, int64_t complement, const uint8_t* where,
                            uint8_t* out, int64_t threads) {
  event_rows(B, N, keys, p, p_stride_b, p_stride_n, complement, where != nullptr, threads,
             [&](auto Q, auto Where, int64_t i0, int64_t i1, uint32_t key, const float* p_row, float q, int64_t b) {
               event_row<decltype(Q)::value, decltype(Where)::value>(i0, i1, base, key, p_row, q,
                                                                     where ? where + b * N : nullptr, out + b * N);
             });
}

// Straight-through events, drawn for every agent: happened[b, n] = 1[u < q] (uint8) and out[b, n] = happened ·
// where[b, n] (float32; where [B, N] float32 or null: 1), u and q as in `agenttensor_hard_event`: the numbers of
// ``(uniform(step, stream) < q).to(float32) * where`` without the [B, N] of uniforms
void agenttensor_float_event(int64_t B, int64_t N, const int32_t* base, const int32_t* keys, const float* p,
                             int64_t p_stride_b, int64_t p_stride_n, int64_t complement, const float* where,
                             uint8_t* happened, float* out, int64_t threads) {
  event_rows(B, N, keys, p, p_stride_b, p_stride_n, complement, where != nullptr, threads,
             [&](auto Q, auto Where, int64_t i0, int64_t i1, uint32_t key, const float* p_row, float q, int64_t b) {
               float_event_row<decltype(Q)::value, decltype(Where)::value>(
                   i0, i1, base, key, p_row, q, where ? where + b * N : nullptr, happened + b * N, out + b * N);
             });
}

// Straight-through events that move agents between two float32 fields (gradient modes' infections, S -> E), drawn
// for every agent: happened[b, n] = 1[u < q] as in `agenttensor_float_event`, e = happened · from[b, n], and
// from_out = from − e, into_out = into + e: the numbers of `float_event`'s events and torch's ``from - events``,
// ``into + events``, in one pass without the events' [B, N]. The (b, n) of the agents with e != 0, row-major, are
// held for `agenttensor_take_pairs` (*pairs; null if none); returns their count. from, into, from_out, into_out
// [B, N] contiguous, the outputs apart from the inputs (restrict); from_out and into_out null: in place (from − e,
// into + e written into from and into, at the moved agents only).
int64_t agenttensor_float_event_move(int64_t B, int64_t N, const int32_t* base, const int32_t* keys, const float* p,
                                     int64_t p_stride_b, int64_t p_stride_n, int64_t complement, const float* from,
                                     const float* into, uint8_t* happened, float* from_out, float* into_out,
                                     void** pairs, int64_t threads) {
  const bool in_place = from_out == nullptr;
  return moves(B, N, threads, pairs, [&](int64_t b, int64_t i0, int64_t i1, std::vector<int64_t>& mine) {
    const uint32_t key = static_cast<uint32_t>(keys[b]);
    const float* p_row = p + b * p_stride_b;
    const float q = complement ? 1.f - p_row[0] : p_row[0];
    const int mode = p_stride_n == 0 ? 0 : complement ? 2 : 1;
    auto run = [&](auto Q) { move_span<decltype(Q)::value>(b, N, i0, i1, base, key, p_row, 0, q, from, into, happened,
                                                           from_out, into_out, in_place, mine); };
    if (mode == 0) run(std::integral_constant<int, 0>());
    if (mode == 1) run(std::integral_constant<int, 1>());
    if (mode == 2) run(std::integral_constant<int, 2>());
  });
}

// `agenttensor_float_event_move` at hazard h [B, N] contiguous, with complement: p = exp(−h) made block by block
// inside the pass with `exp` (MKL's vmsExp, torch's own exp on CPU: the same bits as torch's ``(-h).exp_()``, which
// agenttensor/_rng_kernels.py checks before it passes the function) at `exp_mode` and written to survival [B, N]
// (the backward's exp(−h)), each block read back from L1 by the draws: no separate negation and exp over [B, N].
int64_t agenttensor_hazard_event_move(int64_t B, int64_t N, const int32_t* base, const int32_t* keys,
                                      const float* hazard, void* exp, int64_t exp_mode, void* mkl_local_threads,
                                      float* survival, const float* from, const float* into, uint8_t* happened,
                                      float* from_out, float* into_out, void** pairs, int64_t threads) {
  const bool in_place = from_out == nullptr;
  return moves(B, N, threads, pairs, [&](int64_t b, int64_t i0, int64_t i1, std::vector<int64_t>& mine) {
    const agenttensor::SequentialMkl sequential(mkl_local_threads);
    const uint32_t key = static_cast<uint32_t>(keys[b]);
    const int64_t o = b * N;
    alignas(64) float block[kExpBlock];  // −h, then exp(−h), of a block of agents (in L1)
    for (int64_t j0 = i0; j0 < i1; j0 += kExpBlock) {
      const int64_t j1 = std::min(i1, j0 + kExpBlock);
      agenttensor::exp_of_negated(exp, exp_mode, hazard + o + j0, block, j1 - j0);
      move_span<2>(b, N, j0, j1, base, key, block, j0, 0.f, from, into, happened, from_out, into_out, in_place, mine);
      agenttensor::stream_out(survival + o + j0, block, j1 - j0);  // (not read back: streamed)
    }
    agenttensor::stream_fence();
  });
}

// The pairs `agenttensor_float_event_move` held into b [M] and i [M]; frees them.
void agenttensor_take_pairs(void* pairs, int64_t* b, int64_t* i) { agenttensor::take_pairs(pairs, b, i); }

}  // extern "C"
