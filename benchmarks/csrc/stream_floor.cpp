// The streaming speed of passes like the gradient kernels' (benchmarks/stream_floor.py): `inputs` float arrays read and
// `outputs` float arrays written at the same agent index, in tiles of `tile` agents, each array streamed through the
// tile in a loop of its own (the kernels' pattern: a tile buffer in L1, a few arrays per loop); trivial arithmetic. Plain
// C, OpenMP threads (torch's libgomp, as the kernels).

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

extern "C" {

// Runs the pass `repeats` times over agents [0, n) and returns the fastest run's seconds.
double agenttensor_stream_pass(int64_t n, int64_t inputs, const float* const* in, int64_t outputs, float* const* out,
                               int64_t tile, int64_t threads, int64_t repeats) {
  double best = 1e30;
  for (int64_t r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
      std::vector<float> buffer(tile);
      float* __restrict acc = buffer.data();
#pragma omp for schedule(static)
      for (int64_t t0 = 0; t0 < n; t0 += tile) {
        const int64_t m = std::min(tile, n - t0);
        const float* __restrict first = in[0] + t0;
        for (int64_t j = 0; j < m; ++j) acc[j] = first[j];
        for (int64_t k = 1; k < inputs; ++k) {
          const float* __restrict x = in[k] + t0;
          for (int64_t j = 0; j < m; ++j) acc[j] += x[j];
        }
        for (int64_t q = 0; q < outputs; ++q) {
          float* __restrict o = out[q] + t0;
          const float c = static_cast<float>(q + 1);
          for (int64_t j = 0; j < m; ++j) o[j] = acc[j] * c;
        }
      }
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::min(best, seconds);
  }
  return best;
}

}  // extern "C"
