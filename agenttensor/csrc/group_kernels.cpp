// Group kernels for agenttensor on CPU (loaded by agenttensor/_group_kernels.py; plain C, no torch headers).
//
// Float32 [B, N] agent values, int64 group slots [N] in [0, G). torch's CPU `index_add_` / `index_select`
// along dim 1 take 10-30 ms for 8.7M agents (the full-NYC population), several times a memory pass; these
// loops take 3-10 ms. Results do not depend on the thread count or on the batch: each row is summed in
// agent order over two fixed halves of the agents (one above 2^18 agents), added in order.

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

// body(begin, end) over [0, n) in `threads` contiguous chunks (at least `grain` items each).
template <class F>
void parallel(int64_t threads, int64_t n, int64_t grain, F&& body) {
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, n / std::max<int64_t>(grain, 1)));
  if (threads <= 1) {
    body(0, n);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (n + threads - 1) / threads;
  for (int64_t w = 1; w < threads; ++w)
    pool.emplace_back([&, w] { body(std::min(n, w * chunk), std::min(n, (w + 1) * chunk)); });
  body(0, std::min(n, chunk));
  for (auto& t : pool) t.join();
}

constexpr int64_t kSpread = 8;  // extra cells for the last slot (a layer's non-members)

// o[0, G + kSpread) += v[i] at slot[i] for agents [lo, hi).
// `runs` (slots mostly equal to their predecessor, e.g. neighbourhoods of agents sorted by place): each run is
// summed in a register. Otherwise one add per agent, with the last slot (non-members: a long chain of adds into
// one cell) spread over kSpread cells.
void accumulate(const float* v, const int64_t* slot, int64_t lo, int64_t hi, int64_t G, bool runs, float* o) {
  if (lo >= hi) return;
  if (runs) {
    int64_t g = slot[lo];
    float acc = 0.f;
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t s = slot[i];
      if (s != g) {
        o[g] += acc;
        g = s;
        acc = 0.f;
      }
      acc += v[i];
    }
    o[g] += acc;
    return;
  }
  const int64_t last = G - 1;
  for (int64_t i = lo; i < hi; ++i) {
    int64_t s = slot[i];
    s += static_cast<int64_t>(s == last) * (G - last + (i & (kSpread - 1)));
    o[s] += v[i];
  }
}

bool mostly_runs(const int64_t* slot, int64_t N) {  // from the first 4096 agents
  const int64_t n = std::min<int64_t>(N, 4096);
  int64_t same = 0;
  for (int64_t i = 1; i < n; ++i) same += slot[i] == slot[i - 1];
  return n > 1 && same * 10 >= (n - 1) * 9;
}

}  // namespace

extern "C" {

// out[b, g] = sum of values[b * row_stride + i] over agents i with slot[i] == g; out [B, G] contiguous,
// overwritten. row_stride 0: one row of values for every b.
void agenttensor_segment_sum(const float* values, int64_t row_stride, const int64_t* slot, int64_t B, int64_t N,
                             int64_t G, float* out, int64_t threads) {
  const int64_t parts = N >= (int64_t(1) << 18) ? 2 : 1;
  const int64_t W = G + kSpread;
  const bool runs = mostly_runs(slot, N);
  thread_local std::vector<float> partial;
  if (partial.size() < static_cast<size_t>(B * parts * W)) partial.resize(B * parts * W);
  float* scratch = partial.data();  // thread_local: the workers must not name it
  std::fill(scratch, scratch + B * parts * W, 0.f);
  parallel(threads, B * parts, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t b = k / parts, part = k % parts;
      const int64_t a = part * (N / parts), e = part == parts - 1 ? N : (part + 1) * (N / parts);
      accumulate(values + b * row_stride, slot, a, e, G, runs, scratch + k * W);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    float* o = out + b * G;
    const float* p = scratch + b * parts * W;
    for (int64_t g = 0; g < G; ++g) {
      float s = p[g];
      for (int64_t part = 1; part < parts; ++part) s += p[part * W + g];
      o[g] = s;
    }
    if (G > 0)
      for (int64_t part = 0; part < parts; ++part)
        for (int64_t c = 0; c < kSpread; ++c) o[G - 1] += p[part * W + G + c];
  }
}

// out[b, i] = table[b * table_stride + slot[i]]; out [B, N] contiguous (table_stride 0: one row for every b).
void agenttensor_gather(const float* table, int64_t table_stride, const int64_t* slot, int64_t B, int64_t N,
                        float* out, int64_t threads) {
  parallel(threads, B * N, int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo / N; b * N < hi; ++b) {
      const int64_t i0 = std::max(lo, b * N) - b * N, i1 = std::min(hi, (b + 1) * N) - b * N;
      const float* t = table + b * table_stride;
      float* o = out + b * N;
      for (int64_t i = i0; i < i1; ++i) o[i] = t[slot[i]];
    }
  });
}

// out[b, i] = (sums[b, slot[i]] - grad[b, i]) * scale[b * scale_stride + slot[i]]: the derivative that reaches
// agent i through the *other* members of its group (sums [B, G] = per-group sums of grad). All contiguous.
void agenttensor_others_scaled(const float* grad, const float* sums, int64_t G, const float* scale,
                               int64_t scale_stride, const int64_t* slot, int64_t B, int64_t N, float* out,
                               int64_t threads) {
  parallel(threads, B * N, int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo / N; b * N < hi; ++b) {
      const int64_t i0 = std::max(lo, b * N) - b * N, i1 = std::min(hi, (b + 1) * N) - b * N;
      const float* s = sums + b * G;
      const float* c = scale + b * scale_stride;
      const float* g = grad + b * N;
      float* o = out + b * N;
      for (int64_t i = i0; i < i1; ++i) o[i] = (s[slot[i]] - g[i]) * c[slot[i]];
    }
  });
}

}  // extern "C"
