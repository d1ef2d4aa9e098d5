// (batch, agent) pairs a kernel found (e.g. the day's infections), handed to Python in two calls: the kernel returns
// their count and a handle from `hold_pairs`; the library's take entry point copies them out with `take_pairs`.
#pragma once

#include <cstdint>
#include <vector>

namespace agenttensor {

// The chunks' pairs (b0, i0, b1, i1, ... each; the chunks in order) as one heap vector: the handle, null if none.
inline void* hold_pairs(const std::vector<std::vector<int64_t>>& chunks) {
  size_t total = 0;
  for (const auto& chunk : chunks) total += chunk.size();
  if (!total) return nullptr;
  auto* all = new std::vector<int64_t>();
  all->reserve(total);
  for (const auto& chunk : chunks) all->insert(all->end(), chunk.begin(), chunk.end());
  return all;
}

// The pairs of a `hold_pairs` handle into b [M] and i [M]; frees them.
inline void take_pairs(void* pairs, int64_t* b, int64_t* i) {
  auto* all = static_cast<std::vector<int64_t>*>(pairs);
  for (size_t m = 0; m < all->size() / 2; ++m) {
    b[m] = (*all)[2 * m];
    i[m] = (*all)[2 * m + 1];
  }
  delete all;
}

}  // namespace agenttensor
