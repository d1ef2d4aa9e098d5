// Shared by agenttensor's native compute kernels (built by agenttensor/native.py with -I agenttensor/csrc).
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace agenttensor {

// body(begin, end) over [0, n) in contiguous chunks of at least `grain` items, one per thread of torch's own
// OpenMP pool (the kernels link the libgomp torch has loaded: its threads are already running, and no second
// pool competes with them for the cores). Callers make results independent of the number of threads.
template <class F>
void parallel(int64_t threads, int64_t n, int64_t grain, F&& body) {
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, n / std::max<int64_t>(grain, 1)));
  if (threads <= 1) {
    body(0, n);
    return;
  }
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int64_t count = omp_get_num_threads(), w = omp_get_thread_num();
    const int64_t chunk = (n + count - 1) / count;
    body(std::min(n, w * chunk), std::min(n, (w + 1) * chunk));
  }
}

// How far ahead (in items) a pass over scattered positions fetches their cache lines (`__builtin_prefetch`), where
// its loop body is long enough that the out-of-order window holds few of its misses (each a cache miss at full NYC):
// `uniform_at`, the exits' passes, the flags' carry, the fields' puts, the gradient modes' source totals (per-call
// A/Bs, thirty-third round: 1.2-4x faster; a tight gather measured no faster).
constexpr int64_t kFetchAhead = 32;

// Tasks [0, count) handed out one at a time to whoever asks first (`next`): for work whose tasks' costs differ, or
// whose threads run at different speeds (this VM's two cores do), where `parallel`'s equal halves leave one thread
// waiting for the other at the end of every call (the covid transition's fused backward: -2.3 to -5.4 ms per call at
// full NYC). A task's result must not depend on the thread that runs it.
struct TaskQueue {
  std::atomic<int64_t> taken{0};
  int64_t count;

  explicit TaskQueue(int64_t tasks) : count(tasks) {}
  bool next(int64_t& task) {
    task = taken.fetch_add(1, std::memory_order_relaxed);
    return task < count;
  }
};

// body(queue) on each thread of torch's pool (as `parallel`; at most one thread per task), every thread taking tasks
// from one `TaskQueue` of `tasks` until none are left: a thread's per-task scratch set up once per thread, in body.
template <class F>
void parallel_tasks(int64_t threads, int64_t tasks, F&& body) {
  TaskQueue queue(tasks);
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, tasks));
  if (threads <= 1) {
    body(queue);
    return;
  }
#pragma omp parallel num_threads(static_cast<int>(threads))
  body(queue);
}

// body(b, i0, i1) for each row b of a [B, N] array that the flat range [lo, hi) touches, with its agents [i0, i1):
// how the kernels walk a thread's chunk without a division per agent.
template <class F>
void for_rows(int64_t lo, int64_t hi, int64_t N, F&& body) {
  for (int64_t b = lo / N; b * N < hi; ++b) body(b, std::max(lo, b * N) - b * N, std::min(hi, (b + 1) * N) - b * N);
}

}  // namespace agenttensor
