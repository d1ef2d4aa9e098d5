// (batch, agent) pairs a kernel found (e.g. the day's infections), handed to Python in two calls: the kernel returns
// their count and a handle from `hold_pairs`; the library's take entry point copies them out with `take_pairs`.
#pragma once

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

// The pairs of a `hold_pairs` handle (null: none) into b [M] and i [M], the chunks in order; frees them.
inline void take_pairs(void* pairs, int64_t* b, int64_t* i) {
  auto* chunks = static_cast<std::vector<std::vector<int64_t>>*>(pairs);
  if (chunks == nullptr) return;
  int64_t m = 0;
  for (const auto& chunk : *chunks)
    for (std::size_t k = 0; k < chunk.size(); k += 2, ++m) {
      b[m] = chunk[k];
      i[m] = chunk[k + 1];
    }
  delete chunks;
}

}  // namespace agenttensor
