// Indices of the agents that satisfy a test, for CPU: nonzero((a | b) != 0) and nonzero(x == value) over a [B, N]
// array, as (batch, agent) int64 pairs in row-major order (torch.nonzero's). One pass over fixed chunks, each
// chunk's hits into a list of its own, the lists joined in chunk order (`agenttensor_select_pairs`), so the result
// does not depend on the number of threads; or two passes, count per chunk, then write at the chunk's offset. Loaded
// by agenttensor/select.py; plain C, no torch headers.

#include <cstdint>
#include <vector>

#include "pairs.h"
#include "parallel.h"

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

// hit(k) for each hit k of [begin, end) in order: 64 tests at a time into a bit mask, then one call per set bit (the
// hits are sparse)
template <class Test, class Hit>
void hits(int64_t begin, int64_t end, Test test, Hit hit) {
  for (int64_t k0 = begin; k0 < end; k0 += 64) {
    const int64_t width = std::min<int64_t>(64, end - k0);
    int any = 0;  // most blocks have no hit: a vectorised test first
    for (int64_t j = 0; j < width; ++j) any |= test(k0 + j) ? 1 : 0;
    if (!any) continue;
    uint64_t bits = 0;
    for (int64_t j = 0; j < width; ++j) bits |= uint64_t(test(k0 + j)) << j;
    while (bits) {
      hit(k0 + __builtin_ctzll(bits));
      bits &= bits - 1;
    }
  }
}

// writes the hits of chunk c from offsets[c] on: out_b = k / N, out_i = k % N
template <class Test>
void fill(int64_t n, int64_t N, int64_t chunks, int64_t threads, const int64_t* offsets, int64_t* out_b,
          int64_t* out_i, Test test) {
  const int64_t size = (n + chunks - 1) / chunks;
#pragma omp parallel for num_threads(static_cast<int>(threads)) schedule(static) if (threads > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t at = offsets[c];
    hits(c * size, std::min(n, (c + 1) * size), test, [&](int64_t k) {
      out_b[at] = k / N;
      out_i[at] = k % N;
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
    hits(c * size, std::min(n, (c + 1) * size), test, [&](int64_t k) {
      list.push_back(k / N);
      list.push_back(k % N);
    });
  }
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

}  // namespace

extern "C" {

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

// The pairs `agenttensor_select_pairs` held into b [M] and i [M]; frees them.
void agenttensor_select_take(void* pairs, int64_t* out_b, int64_t* out_i) {
  agenttensor::take_pairs(pairs, out_b, out_i);
}

}  // extern "C"
