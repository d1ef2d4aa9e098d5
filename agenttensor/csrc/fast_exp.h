// A fast exp for x <= 0 for the native kernels (built with -I agenttensor/csrc): a polynomial that vectorises, where
// glibc's expf is scalar and MKL's vmsExp (torch's own exp) takes its SSE4.2 path on AMD CPUs (~1.3 ns per value on
// one Zen 3 core). Not torch's bits: a kernel uses it where only a comparison with a bound on its error is needed, or
// where its own numbers are the reference (models/covid/csrc/shadow_kernel.cpp).
#pragma once

#include <cstdint>
#include <cstring>

namespace agenttensor {

// exp(x) for x <= 0 (exp(-87) below -87): 2^k e^r with |r| <= ln2 / 2, a degree-6 polynomial (relative error ~2e-7;
// measured against torch's exp: `agenttensor_covid_fast_exp_error`). Branch-free, so that loops over it vectorise.
inline float exp_nonpositive(float x) {
  x = x > -87.f ? x : -87.f;
  const float k = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23 trick)
  const float r = (x - k * 0.693145752f) - k * 1.42860677e-6f;
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(k) << 23;
  std::memcpy(&p, &bits, 4);
  return p;
}

}  // namespace agenttensor
