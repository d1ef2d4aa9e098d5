// Shared by agenttensor's native compute kernels (built by agenttensor/native.py with -I agenttensor/csrc).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace agenttensor {

// Whether `parallel` hands out chunks dynamically (the default) or one fixed share per thread
// (AGENTTENSOR_STATIC_SPLIT=1, read once per library: for A/B measurements).
inline bool dynamic_chunks() {
  static const bool dynamic = [] {
    const char* v = std::getenv("AGENTTENSOR_STATIC_SPLIT");
    return v == nullptr || v[0] == '\0' || v[0] == '0';
  }();
  return dynamic;
}

constexpr int64_t kChunksPerThread = 8;

// body(begin, end) over [0, n) in contiguous chunks of at least `grain` items on torch's own OpenMP pool (the
// kernels link the libgomp torch has loaded: its threads are already running, and no second pool competes with
// them for the cores). Where there are enough items, up to kChunksPerThread chunks per thread, each taken by
// whichever thread is free: on a VM whose second vCPU runs slow at times a fixed half per thread left the other
// waiting at the barrier. The chunk boundaries depend on n, grain and the thread count only, never on which thread
// runs a chunk; callers make results independent of the ranges they are given (each item computed on its own, or
// sums over fixed pieces that are the items), so results do not depend on the number of threads either.
template <class F>
void parallel(int64_t threads, int64_t n, int64_t grain, F&& body) {
  grain = std::max<int64_t>(grain, 1);
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, n / grain));
  if (threads <= 1) {
    body(0, n);
    return;
  }
  const int64_t chunks = std::min<int64_t>(n / grain, threads * kChunksPerThread);
  if (chunks > threads && dynamic_chunks()) {
    const int64_t size = (n + chunks - 1) / chunks;
#pragma omp parallel for num_threads(static_cast<int>(threads)) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) body(std::min(n, c * size), std::min(n, (c + 1) * size));
    return;
  }
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int64_t count = omp_get_num_threads(), w = omp_get_thread_num();
    const int64_t chunk = (n + count - 1) / count;
    body(std::min(n, w * chunk), std::min(n, (w + 1) * chunk));
  }
}

// body(b, i0, i1) for each row b of a [B, N] array that the flat range [lo, hi) touches, with its agents [i0, i1):
// how the kernels walk a thread's chunk without a division per agent.
template <class F>
void for_rows(int64_t lo, int64_t hi, int64_t N, F&& body) {
  for (int64_t b = lo / N; b * N < hi; ++b) body(b, std::max(lo, b * N) - b * N, std::min(hi, (b + 1) * N) - b * N);
}

}  // namespace agenttensor
