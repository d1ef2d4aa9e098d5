// (batch, agent) pairs a kernel found (e.g. the day's infections), handed to Python in two calls: the kernel returns
// their count and a handle from `hold_pairs`; the library's take entry point copies them out with `take_pairs`.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace agenttensor {

// The chunks' pairs (b0, i0, b1, i1, ... each; the chunks in order), moved to the heap as they are (not joined: one
// copy fewer): the handle, null if none.
inline void* hold_pairs(std::vector<std::vector<int64_t>>&& chunks) {
  std::size_t total = 0;
  for (const auto& chunk : chunks) total += chunk.size();
  if (!total) return nullptr;
  return new std::vector<std::vector<int64_t>>(std::move(chunks));
}

// The pairs of a `hold_pairs` handle (null: none) into b [M] and i [M], the chunks in order (copied in parallel, a
// thread per chunk, where there are many); frees them.
inline void take_pairs(void* pairs, int64_t* b, int64_t* i) {
  auto* chunks = static_cast<std::vector<std::vector<int64_t>>*>(pairs);
  if (chunks == nullptr) return;
  const int64_t count = static_cast<int64_t>(chunks->size());
  std::vector<int64_t> offsets(static_cast<std::size_t>(count) + 1, 0);
  for (int64_t c = 0; c < count; ++c) offsets[c + 1] = offsets[c] + static_cast<int64_t>((*chunks)[c].size() / 2);
  const int threads = static_cast<int>(std::min<int64_t>(count, omp_get_max_threads()));
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && offsets[count] > (int64_t(1) << 16))
  for (int64_t c = 0; c < count; ++c) {
    const std::vector<int64_t>& chunk = (*chunks)[c];
    const int64_t m0 = offsets[c], pairs_here = static_cast<int64_t>(chunk.size() / 2);
    for (int64_t m = 0; m < pairs_here; ++m) {
      b[m0 + m] = chunk[2 * m];
      i[m0 + m] = chunk[2 * m + 1];
    }
  }
  delete chunks;
}

}  // namespace agenttensor
