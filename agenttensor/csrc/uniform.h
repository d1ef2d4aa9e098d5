// The counter-based uniform of agenttensor/rng.py for the native kernels (built with -I agenttensor/csrc):
// lowbias32(base ^ key) -> top 24 bits -> float32 in (0, 1). Integer arithmetic is exact and the float conversion
// is one rounded add and an exact scaling, as in the torch ops: the same bits.
#pragma once

#include <cstdint>

namespace agenttensor {

inline float uniform_of(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return (static_cast<float>((x >> 8) & 0xFFFFFFu) + 0.5f) * 5.9604644775390625e-08f;  // 2^-24
}

}  // namespace agenttensor
