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

// Index at or after `i` where a new group starts (n if none): a split point that keeps every group in one piece.
template <class Index>
int64_t group_boundary(const Index* slot, int64_t n, int64_t i) {
  if (i <= 0) return 0;
  while (i < n && slot[i] == slot[i - 1]) ++i;
  return i < n ? i : n;
}

}  // namespace agenttensor
