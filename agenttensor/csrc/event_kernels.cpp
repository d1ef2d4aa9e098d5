// The straight-through infection event 1[u < 1 − s] · where (s = exp(−hazard), computed by torch) and its
// backward (also the drawn event's, 1[u < p] · where: without s), each one pass over the agents, for CPU. Loaded by agenttensor/_event_kernels.py; sampling.py holds the
// same arithmetic in torch ops (the reference, and the path on other devices). Built without floating-point
// contraction: the numbers are those of the torch ops, bit for bit. Plain C, no torch headers.

#include <cstdint>

#include "parallel.h"

namespace {

// restrict pointers (the uint8 stores may otherwise alias every input) and no branches on the coin flips: the loops
// vectorise
void event_chunk(int64_t lo, int64_t hi, const float* __restrict__ survival, const float* __restrict__ u,
                 const float* __restrict__ where, uint8_t* __restrict__ happened, float* __restrict__ out) {
  for (int64_t k = lo; k < hi; ++k) {
    const bool event = u[k] < 1.f - survival[k];
    happened[k] = event;
    out[k] = (event ? 1.f : 0.f) * where[k];
  }
}

void d_hazard_chunk(int64_t lo, int64_t hi, const float* __restrict__ grad, const float* __restrict__ where,
                    const float* __restrict__ survival, float* __restrict__ d_hazard) {
  for (int64_t k = lo; k < hi; ++k) d_hazard[k] = grad[k] * where[k] * survival[k];
}

void d_p_chunk(int64_t lo, int64_t hi, const float* __restrict__ grad, const float* __restrict__ where,
               float* __restrict__ d_p) {
  for (int64_t k = lo; k < hi; ++k) d_p[k] = grad[k] * where[k];
}

void d_where_chunk(int64_t lo, int64_t hi, const float* __restrict__ grad, const uint8_t* __restrict__ happened,
                   float* __restrict__ d_where) {
  for (int64_t k = lo; k < hi; ++k) d_where[k] = happened[k] ? grad[k] : 0.f;
}

}  // namespace

extern "C" {

// happened[k] = u[k] < 1 − survival[k]; out[k] = happened · where[k]   (all [n], contiguous)
void agenttensor_hazard_event(int64_t n, const float* survival, const float* u, const float* where, uint8_t* happened,
                              float* out, int64_t threads) {
  agenttensor::parallel(threads, n, int64_t(1) << 16,
                        [&](int64_t lo, int64_t hi) { event_chunk(lo, hi, survival, u, where, happened, out); });
}

// d_hazard[k] = grad[k] · where[k] · survival[k] (if d_hazard; survival null: grad[k] · where[k], the drawn event's
// d/dp); d_where[k] = happened ? grad[k] : 0 (if d_where)
void agenttensor_hazard_event_backward(int64_t n, const float* grad, const float* where, const float* survival,
                                       const uint8_t* happened, float* d_hazard, float* d_where, int64_t threads) {
  agenttensor::parallel(threads, n, int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
    if (d_hazard && survival) d_hazard_chunk(lo, hi, grad, where, survival, d_hazard);
    if (d_hazard && !survival) d_p_chunk(lo, hi, grad, where, d_hazard);
    if (d_where) d_where_chunk(lo, hi, grad, happened, d_where);
  });
}

}  // extern "C"
