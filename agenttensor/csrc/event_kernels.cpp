// The straight-through infection event 1[u < 1 − s] · where (s = exp(−hazard), computed by torch) and its
// backward, each one pass over the agents, for CPU. Loaded by agenttensor/_event_kernels.py; sampling.py holds the
// same arithmetic in torch ops (the reference, and the path on other devices). Built without floating-point
// contraction: the numbers are those of the torch ops, bit for bit. Plain C, no torch headers.

#include <cstdint>

#include "parallel.h"

extern "C" {

// happened[k] = u[k] < 1 − survival[k]; out[k] = happened · where[k]   (all [n], contiguous)
void agenttensor_hazard_event(int64_t n, const float* survival, const float* u, const float* where, uint8_t* happened,
                              float* out, int64_t threads) {
  agenttensor::parallel(threads, n, int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const bool event = u[k] < 1.f - survival[k];
      happened[k] = event;
      out[k] = (event ? 1.f : 0.f) * where[k];
    }
  });
}

// d_hazard[k] = grad[k] · where[k] · survival[k] (if d_hazard); d_where[k] = happened ? grad[k] : 0 (if d_where)
void agenttensor_hazard_event_backward(int64_t n, const float* grad, const float* where, const float* survival,
                                       const uint8_t* happened, float* d_hazard, float* d_where, int64_t threads) {
  agenttensor::parallel(threads, n, int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
    if (d_hazard)
      for (int64_t k = lo; k < hi; ++k) d_hazard[k] = grad[k] * where[k] * survival[k];
    if (d_where)
      for (int64_t k = lo; k < hi; ++k) d_where[k] = happened[k] ? grad[k] : 0.f;
  });
}

}  // extern "C"
