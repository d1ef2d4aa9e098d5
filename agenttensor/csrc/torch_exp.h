// Torch's own float32 exp on CPU for the native kernels (built with -I agenttensor/csrc): MKL's vmsExp, whose address
// and mode agenttensor/native.py's `torch_exp` finds in torch's library and checks against torch.exp bit for bit, so a
// pass can make exp(−h) block by block with torch's numbers instead of reading a [B, N] that torch made.
#pragma once

#include <cstdint>

namespace agenttensor {

// MKL's vmsExp(n, a, r, mode) (n: MKL_INT; passed as 64 bits, which an LP64 build reads the low half of; r may be a)
using ExpFn = void (*)(int64_t, const float*, float*, int64_t);
// MKL_Set_Num_Threads_Local(n): the calling thread's MKL thread count (0: back to the global one); returns the previous
using LocalThreadsFn = int (*)(int);

// MKL sequential on this thread while in scope (a null function: nothing done): each vmsExp call otherwise asks MKL's
// threading layer whether to thread it (~0.7 µs a call inside a 2-thread region; outside an active region, as with
// one thread, it forks its own team: ~35 ns per value at 1,024-value calls)
struct SequentialMkl {
  explicit SequentialMkl(void* set) : set(reinterpret_cast<LocalThreadsFn>(set)), previous(set ? this->set(1) : 0) {}
  ~SequentialMkl() {
    if (set) set(previous);
  }
  SequentialMkl(const SequentialMkl&) = delete;
  SequentialMkl& operator=(const SequentialMkl&) = delete;
  LocalThreadsFn set;
  int previous;
};

// out[0, n) = exp(−h[0, n)) with `exp` at `mode` (out: a block in cache; the negation is exact, as torch's)
inline void exp_of_negated(void* exp, int64_t mode, const float* h, float* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = -h[j];
  reinterpret_cast<ExpFn>(exp)(n, out, out, mode);
}

}  // namespace agenttensor
