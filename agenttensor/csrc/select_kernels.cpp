// Indices of the agents that satisfy a test, for CPU: nonzero((a | b) != 0) and nonzero(x == value) over a [B, N]
// array, as (batch, agent) int64 pairs in row-major order (torch.nonzero's). One pass over fixed chunks, each
// chunk's hits into a list of its own, the lists joined in chunk order (`agenttensor_select_pairs`), so the result
// does not depend on the number of threads; or two passes, count per chunk, then write at the chunk's offset. Loaded
// by agenttensor/select.py; plain C, no torch headers.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bits.h"
#include "pairs.h"
#include "parallel.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// test(k) over the chunks of [0, n): counts[c] = hits in chunk c (a branch-free loop the compiler vectorises)
template <class Test>
void count(int64_t n, int64_t chunks, int64_t threads, int64_t* counts, Test test) {
  const int64_t size = (n + chunks - 1) / chunks;
#pragma omp parallel for num_threads(static_cast<int>(threads)) schedule(static) if (threads > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t hits = 0;
    for (int64_t k = c * size, end = std::min(n, (c + 1) * size); k < end; ++k) hits += test(k) ? 1 : 0;
    counts[c] = hits;
  }
}

// The tests of `width` <= 64 values from k0 as a bit mask (bit j: test(k0 + j))
template <class Test>
uint64_t generic_bits(const Test& test, int64_t k0, int64_t width) {
  int any = 0;  // most blocks have no hit: a vectorised test first
  for (int64_t j = 0; j < width; ++j) any |= test(k0 + j) ? 1 : 0;
  if (!any) return 0;
  uint64_t bits = 0;
  for (int64_t j = 0; j < width; ++j) bits |= uint64_t(test(k0 + j)) << j;
  return bits;
}

template <class Test>
uint64_t block_bits(const Test& test, int64_t k0, int64_t width) {
  return generic_bits(test, k0, width);
}

template <class T>
struct Nonzero {
  const T* a;
  bool operator()(int64_t k) const { return a[k] != T(0); }
};

template <class T>
struct Either {
  const T* a;
  const T* b;
  bool operator()(int64_t k) const { return (a[k] != T(0)) | (b[k] != T(0)); }
};

struct AnyBits {
  const uint8_t* a;
  uint8_t bits;
  bool operator()(int64_t k) const { return (a[k] & bits) != 0; }
};

struct Equal {
  const int16_t* x;
  int16_t value;
  bool operator()(int64_t k) const { return x[k] == value; }
};

#if defined(__AVX2__)
// A full block's mask from byte and word comparisons and `movemask` (the same bits): the generic mask's scalar loop
// ran in most blocks of the infectious agents' flags (1-2 % of them hit: most 64-agent blocks hold one) and of the
// countdowns that end today
inline uint64_t block_bits(const AnyBits& test, int64_t k0, int64_t width) {
  if (width < 64) return generic_bits(test, k0, width);
  return agenttensor::flagged32(test.a + k0, test.bits) |
         static_cast<uint64_t>(agenttensor::flagged32(test.a + k0 + 32, test.bits)) << 32;
}

inline uint64_t block_bits(const Equal& test, int64_t k0, int64_t width) {
  if (width < 64) return generic_bits(test, k0, width);
  const __m256i value = _mm256_set1_epi16(test.value);
  uint64_t out = 0;
  for (int h = 0; h < 2; ++h) {
    const int16_t* x = test.x + k0 + 32 * h;
    const __m256i low = _mm256_cmpeq_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), value);
    const __m256i high = _mm256_cmpeq_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16)), value);
    // packs works per 128-bit lane (low 0-7, high 0-7, low 8-15, high 8-15): the permute puts them in order
    const __m256i both = _mm256_permute4x64_epi64(_mm256_packs_epi16(low, high), 0xD8);
    out |= static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_epi8(both))) << (32 * h);
  }
  return out;
}
#endif

// hit(k) for each hit k of [begin, end) in order: 64 tests at a time into a bit mask (`block_bits`), then one call per
// set bit (the hits are sparse)
template <class Test, class Hit>
void hits(int64_t begin, int64_t end, Test test, Hit hit) {
  for (int64_t k0 = begin; k0 < end; k0 += 64) {
    uint64_t bits = block_bits(test, k0, std::min<int64_t>(64, end - k0));
    while (bits) {
      hit(k0 + __builtin_ctzll(bits));
      bits &= bits - 1;
    }
  }
}

// A flat index k of a [B, N] array as its (k / N, k % N), for increasing k without a division per hit (two 64-bit
// divisions per hit were a third of a dense selection's time)
struct RowMajor {
  RowMajor(int64_t first, int64_t N) : N(N), b(first / N), row(b * N) {}
  template <class F>
  void operator()(int64_t k, F&& pair) {
    while (k >= row + N) {
      row += N;
      ++b;
    }
    pair(b, k - row);
  }
  int64_t N, b, row;
};

// writes the hits of chunk c from offsets[c] on: out_b = k / N, out_i = k % N
template <class Test>
void fill(int64_t n, int64_t N, int64_t chunks, int64_t threads, const int64_t* offsets, int64_t* out_b,
          int64_t* out_i, Test test) {
  const int64_t size = (n + chunks - 1) / chunks;
#pragma omp parallel for num_threads(static_cast<int>(threads)) schedule(static) if (threads > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t at = offsets[c];
    RowMajor position(c * size, N);
    hits(c * size, std::min(n, (c + 1) * size), test, [&](int64_t k) {
      position(k, [&](int64_t b, int64_t i) {
        out_b[at] = b;
        out_i[at] = i;
      });
      ++at;
    });
  }
}

// the hits of each chunk as (k / N, k % N) pairs into its own list: one pass
template <class Test>
void collect(int64_t n, int64_t N, int64_t chunks, int64_t threads, std::vector<std::vector<int64_t>>& lists,
             Test test) {
  const int64_t size = (n + chunks - 1) / chunks;
#pragma omp parallel for num_threads(static_cast<int>(threads)) schedule(static) if (threads > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    std::vector<int64_t>& list = lists[c];
    RowMajor position(c * size, N);
    hits(c * size, std::min(n, (c + 1) * size), test, [&](int64_t k) {
      position(k, [&](int64_t b, int64_t i) {
        list.push_back(b);
        list.push_back(i);
      });
    });
  }
}

// run(test) with the test of `kind`: 0 uint8 (a | b) != 0, 1 float32 (a | b) != 0 (b may be null), 2 int16 a == value,
// 3 uint8 (a & value) != 0
template <class Run>
void dispatch(int64_t kind, const void* a, const void* b, int64_t value, Run run) {
  if (kind == 2) return run(Equal{(const int16_t*)a, static_cast<int16_t>(value)});
  if (kind == 3) return run(AnyBits{(const uint8_t*)a, static_cast<uint8_t>(value)});
  if (kind == 0 && b) return run(Either<uint8_t>{(const uint8_t*)a, (const uint8_t*)b});
  if (kind == 0) return run(Nonzero<uint8_t>{(const uint8_t*)a});
  if (b) return run(Either<float>{(const float*)a, (const float*)b});
  run(Nonzero<float>{(const float*)a});
}

// `agenttensor_zero_one_bytes` for n values: whether any is neither 0 nor 1 (restrict pointers: vectorises)
int32_t zero_one_range(int64_t n, const float* __restrict x, uint8_t* __restrict out) {
  int32_t other = 0;
  for (int64_t k = 0; k < n; ++k) {
    const float v = x[k];
    other |= !(v == 0.f || v == 1.f);
    out[k] = static_cast<uint8_t>(v == 1.f);
  }
  return other != 0;
}

// Σ a[j] (· m[j]) over n values. uint8: the sum of the bytes (their products wrap as torch's uint8 ones do); float32:
// the number of 1.0s, with `other` set where a value (or product) is neither 0 nor 1 (NaN included). n <= 2^16.
inline int64_t range_total(const uint8_t* __restrict a, const uint8_t* __restrict m, int64_t n, uint32_t&) {
  uint32_t total = 0;
  if (m)
    for (int64_t j = 0; j < n; ++j) total += static_cast<uint8_t>(a[j] * m[j]);
  else
    for (int64_t j = 0; j < n; ++j) total += a[j];
  return total;
}

inline int64_t range_total(const float* __restrict a, const float* __restrict m, int64_t n, uint32_t& other) {
  int32_t total = 0, bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float v = m ? a[j] * m[j] : a[j];
    total += v == 1.f ? 1 : 0;
    bad |= (v == 0.f || v == 1.f) ? 0 : 1;
  }
  other |= static_cast<uint32_t>(bad);
  return total;
}

// One piece of `agenttensor_range_counts`: field k, row b, range g, values [i0, i1) (at most 2^16)
struct RangePiece {
  int64_t k, b, g, i0, i1;
};

template <class T>
int64_t range_counts(int64_t K, int64_t B, int64_t N, const void* const* fields, const void* const* masks,
                     const int64_t* mask_strides, int64_t G, const int64_t* starts, int64_t* counts,
                     int64_t threads) {
  constexpr int64_t kPiece = int64_t(1) << 16;
  std::vector<RangePiece> pieces;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = starts[g]; i < starts[g + 1]; i += kPiece)
          pieces.push_back({k, b, g, i, std::min(starts[g + 1], i + kPiece)});
  const int64_t P = static_cast<int64_t>(pieces.size());
  std::vector<int64_t> totals(P, 0);
  std::vector<uint32_t> other(P, 0);
  agenttensor::parallel(threads, P, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const RangePiece& r = pieces[p];
      const T* a = static_cast<const T*>(fields[r.k]) + r.b * N + r.i0;
      const T* m = masks[r.k] ? static_cast<const T*>(masks[r.k]) + r.b * mask_strides[r.k] + r.i0 : nullptr;
      totals[p] = range_total(a, m, r.i1 - r.i0, other[p]);
    }
  });
  std::fill(counts, counts + K * B * G, int64_t(0));
  int64_t bad = 0;
  for (int64_t p = 0; p < P; ++p) {  // (integer sums: the same in any order)
    counts[(pieces[p].k * B + pieces[p].b) * G + pieces[p].g] += totals[p];
    bad += other[p] != 0;
  }
  return bad;
}

}  // namespace

extern "C" {

// counts[(k B + b) G + g] = Σ over agents i in [starts[g], starts[g + 1]) of fields[k][b, i] (· masks[k][b | 0, i]) for
// K [B, N] arrays of one dtype (kind 0: uint8, 1: float32 of 0/1 values), each with an optional mask of its dtype ([B, N]:
// mask_strides[k] = N; one row [N]: 0), over G contiguous ranges. Returns the number of pieces with a float value (or
// product) other than 0 or 1 (then counts is not the sums; 0 for uint8).
int64_t agenttensor_range_counts(int64_t kind, int64_t K, int64_t B, int64_t N, const void* const* fields,
                                 const void* const* masks, const int64_t* mask_strides, int64_t G,
                                 const int64_t* starts, int64_t* counts, int64_t threads) {
  return kind == 0 ? range_counts<uint8_t>(K, B, N, fields, masks, mask_strides, G, starts, counts, threads)
                   : range_counts<float>(K, B, N, fields, masks, mask_strides, G, starts, counts, threads);
}

void agenttensor_select_count(int64_t kind, int64_t n, const void* a, const void* b, int64_t value, int64_t chunks,
                              int64_t threads, int64_t* counts) {
  dispatch(kind, a, b, value, [&](auto test) { count(n, chunks, threads, counts, test); });
}

void agenttensor_select_fill(int64_t kind, int64_t n, int64_t N, const void* a, const void* b, int64_t value,
                             int64_t chunks, int64_t threads, const int64_t* offsets, int64_t* out_b, int64_t* out_i) {
  dispatch(kind, a, b, value, [&](auto test) { fill(n, N, chunks, threads, offsets, out_b, out_i, test); });
}

// The hits in one pass (for sparse hits: a pass fewer than count and fill): their count, and their chunks' lists held
// for `agenttensor_select_take` (*pairs, pairs.h; null if none)
int64_t agenttensor_select_pairs(int64_t kind, int64_t n, int64_t N, const void* a, const void* b, int64_t value,
                                 int64_t chunks, int64_t threads, void** pairs) {
  std::vector<std::vector<int64_t>> lists(chunks);
  dispatch(kind, a, b, value, [&](auto test) { collect(n, N, chunks, threads, lists, test); });
  int64_t total = 0;
  for (const auto& list : lists) total += static_cast<int64_t>(list.size()) / 2;
  *pairs = agenttensor::hold_pairs(std::move(lists));
  return total;
}

// out[k] = x[k] as a byte for n values, where each is 0 or 1 (== as floats: -0.0 too); returns the number of chunks with
// another value (NaN included; then out is not what the caller keeps). One pass, branch-free: it vectorises.
int64_t agenttensor_zero_one_bytes(const float* x, uint8_t* out, int64_t n, int64_t threads) {
  constexpr int64_t kChunk = int64_t(1) << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<int64_t> bad(chunks, 0);
  agenttensor::parallel(threads, chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t k0 = c * kChunk, m = std::min(kChunk, n - k0);
      bad[c] = zero_one_range(m, x + k0, out + k0);
    }
  });
  int64_t total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += bad[c];
  return total;
}

// Hits among `windows` windows of `width` entries spread evenly over [0, n) (at most windows · width tests): a
// density estimate that picks `agenttensor_select_pairs` (few hits) or counting and filling (many), which give the
// same pairs
int64_t agenttensor_select_sample(int64_t kind, int64_t n, const void* a, const void* b, int64_t value,
                                  int64_t windows, int64_t width) {
  int64_t total = 0;
  dispatch(kind, a, b, value, [&](auto test) {
    for (int64_t w = 0; w < windows; ++w) {
      const int64_t k0 = n * w / windows, k1 = std::min(n, k0 + width);
      int64_t hits = 0;
      for (int64_t k = k0; k < k1; ++k) hits += test(k) ? 1 : 0;
      total += hits;
    }
  });
  return total;
}

// out[k][m] = x[k][pos[m]] for K float32 arrays of n entries at M flat positions (e.g. several fields read at the
// day's exiting agents in one pass: each position's K values fetched together). Returns the number of positions
// outside [0, n) (then nothing is written: the caller runs torch's take, which raises).
int64_t agenttensor_gather_fields(int64_t K, const float* const* x, int64_t n, const int64_t* pos, int64_t M,
                                  float* const* out, int64_t threads) {
  int64_t bad = 0;
  for (int64_t m = 0; m < M; ++m) bad += (pos[m] < 0) | (pos[m] >= n);
  if (bad) return bad;
  agenttensor::parallel(threads, M, int64_t(1) << 14, [&](int64_t lo, int64_t hi) {
    for (int64_t k = 0; k < K; ++k) {
      const float* __restrict xk = x[k];
      float* __restrict ok = out[k];
      for (int64_t m = lo; m < hi; ++m) ok[m] = xk[pos[m]];  // (lines fetched ahead: no faster, a tight loop)
    }
  });
  return 0;
}

// x[k][pos[m]] = v[k][m], or with `accumulate` x[k][pos[m]] + v[k][m], for K float32 arrays of n entries at M
// strictly increasing flat positions (each written once: threads may split them, and the sums are torch's
// ``index_put_(accumulate=True)``'s, one addition each). Returns 1 where a position is out of [0, n) or not above
// the one before (then nothing is written: the caller runs torch's index_put_).
int64_t agenttensor_put_fields(int64_t K, float* const* x, int64_t n, const int64_t* pos, int64_t M,
                               const float* const* v, int64_t accumulate, int64_t threads) {
  int64_t bad = M > 0 && (pos[0] < 0 || pos[M - 1] >= n);
  for (int64_t m = 1; m < M; ++m) bad |= pos[m] <= pos[m - 1];
  if (bad) return 1;
  agenttensor::parallel(threads, M, int64_t(1) << 14, [&](int64_t lo, int64_t hi) {
    for (int64_t k = 0; k < K; ++k) {
      float* __restrict xk = x[k];
      const float* __restrict vk = v[k];
      if (accumulate)
        for (int64_t m = lo; m < hi; ++m) {
          if (m + agenttensor::kFetchAhead < hi) __builtin_prefetch(xk + pos[m + agenttensor::kFetchAhead], 1);
          xk[pos[m]] = xk[pos[m]] + vk[m];
        }
      else
        for (int64_t m = lo; m < hi; ++m) {
          if (m + agenttensor::kFetchAhead < hi) __builtin_prefetch(xk + pos[m + agenttensor::kFetchAhead], 1);
          xk[pos[m]] = vk[m];
        }
    }
  });
  return 0;
}

// The pairs `agenttensor_select_pairs` held into b [M] and i [M]; frees them.
void agenttensor_select_take(void* pairs, int64_t* out_b, int64_t* out_i) {
  agenttensor::take_pairs(pairs, out_b, out_i);
}

}  // extern "C"
