// Shared by the native kernels that sum groups laid out as runs of agents (agenttensor/csrc/group_kernels.cpp,
// models/covid/csrc/shadow_kernel.cpp; built with -I agenttensor/csrc).
#pragma once

#include <cstdint>
#include <cstring>

namespace agenttensor {

// x if same else 0, without a branch (a branch mispredicts at every run's end: 2x slower for households). A run's
// sum is acc = keep(acc, same group) + v: it starts at +0, so the first addition gives v's own bits.
inline float keep(float x, bool same) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits &= 0u - static_cast<uint32_t>(same);
  std::memcpy(&x, &bits, 4);
  return x;
}

}  // namespace agenttensor
