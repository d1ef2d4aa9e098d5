// Group kernels for agenttensor on CPU (loaded by agenttensor/_group_kernels.py; plain C, no torch headers).
//
// Float32 [B, N] agent values, group slots [N] in [0, G), int32 (what GroupLayer keeps) or int64: every entry point
// below has an `_i32` twin (the slot type is a template parameter). torch's CPU `index_add_` / `index_select`
// along dim 1 take 10-30 ms for 8.7M agents (the full-NYC population), several times a memory pass; these
// loops take 3-10 ms. Results do not depend on the thread count or on the batch: each row is summed in
// agent order over two fixed halves of the agents (one below 2^18 agents), added in order, or, where groups
// are contiguous runs, each group in agent order by one thread.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "runs.h"
#include "tables.h"

namespace {

constexpr int64_t kSpread = 8;  // extra cells for the last slot (a layer's non-members)

// o[0, G + kSpread) += v[i] at slot[i] for agents [lo, hi), with the last slot (non-members: a long chain of
// dependent adds into one cell otherwise) spread over kSpread cells.
// ``base``: v holds agents [base, ...) (v[i - base] is agent i's value).
template <class Index>
void accumulate(const float* v, const Index* slot, int64_t lo, int64_t hi, int64_t G, float* o, int64_t base = 0) {
  const int64_t last = G - 1;
  for (int64_t i = lo; i < hi; ++i) {
    int64_t s = slot[i];
    s += static_cast<int64_t>(s == last) * (G - last + (i & (kSpread - 1)));
    o[s] += v[i - base];
  }
}

// cells[c] += v[i] for the agents i in [lo, hi) in the slot `last`, with i % kSpread == c; lo and hi multiples of
// kSpread. A member adds 0, which leaves a sum that starts at +0 unchanged. One vectorised loop (kept out of line:
// inlined, it lost its vectorisation).
template <class Index>
__attribute__((noinline)) void last_slot_lanes(const float* __restrict v, const Index* __restrict slot, int64_t lo,
                                               int64_t hi, Index last, float* __restrict cells) {
  float lanes[kSpread];
  for (int64_t c = 0; c < kSpread; ++c) lanes[c] = cells[c];
  for (int64_t i = lo; i < hi; i += kSpread)
    for (int64_t c = 0; c < kSpread; ++c) {
      const float x = v[i + c];  // loaded unconditionally, so the select vectorises
      lanes[c] += slot[i + c] == last ? x : 0.f;
    }
  for (int64_t c = 0; c < kSpread; ++c) cells[c] = lanes[c];
}

// `accumulate` where most agents are in the last slot, given the others (`members`, sorted agent indices in
// [m0, m1) for agents [lo, hi)): per tile, the last slot's kSpread cells in one vectorised pass (unless not
// ``last_too``: they stay 0), then the members' adds. Every cell gets the same additions in the same order as in
// `accumulate`: the same bits, with a fraction of the scalar adds. ``base``: v holds agents [base, ...) (v[i - base]
// is agent i's value).
template <class Index>
void accumulate_members(const float* v, const Index* slot, int64_t lo, int64_t hi, int64_t G, float* o,
                        const int32_t* members, int64_t m0, int64_t m1, bool last_too = true, int64_t base = 0,
                        const int32_t* member_slots = nullptr) {
  constexpr int64_t kTile = 4096;
  const Index last = static_cast<Index>(G - 1);
  float* cells = o + G;  // cell G + c: agents i with i % kSpread == c
  int64_t m = m0;
  for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
    const int64_t t1 = std::min(hi, t0 + kTile);
    const int64_t a = std::min(t1, (t0 + kSpread - 1) & ~(kSpread - 1)), e = std::max(a, t1 & ~(kSpread - 1));
    if (last_too) {
      for (int64_t i = t0; i < a; ++i) cells[i & (kSpread - 1)] += slot[i] == last ? v[i - base] : 0.f;
      last_slot_lanes(v + (a - base), slot + a, 0, e - a, last, cells);
      for (int64_t i = e; i < t1; ++i) cells[i & (kSpread - 1)] += slot[i] == last ? v[i - base] : 0.f;
    }
    if (member_slots)
      for (; m < m1 && members[m] < t1; ++m) o[member_slots[m]] += v[members[m] - base];
    else
      for (; m < m1 && members[m] < t1; ++m) o[slot[members[m]]] += v[members[m] - base];
  }
}

// o[0, G) = the per-part sums p [parts][G + kSpread] added in part order, the last slot's kSpread cells after
// (`accumulate`)
inline void combine_parts(const float* p, int64_t parts, int64_t G, float* o) {
  const int64_t W = G + kSpread;
  for (int64_t g = 0; g < G; ++g) {
    float s = p[g];
    for (int64_t part = 1; part < parts; ++part) s += p[part * W + g];
    o[g] = s;
  }
  if (G > 0)
    for (int64_t part = 0; part < parts; ++part)
      for (int64_t c = 0; c < kSpread; ++c) o[G - 1] += p[part * W + G + c];
}

using agenttensor::group_boundary;

// Groups laid out contiguously (each group's agents one run, e.g. households of agents sorted by household):
// runs are summed in a register and stored once, so every group is summed by one chain in agent order. The
// agents are cut at group boundaries into 2 parts (one per thread) of kStreams streams each, advanced together
// (independent chains of dependent adds: ~3x faster than one), so no partial buffers are needed.
constexpr int64_t kStreams = 4;


// o[s] = sum of the run of slot s for agents [a, e), continuing a run of `previous` summed so far to `acc`.
template <class Index>
void run_sums(const float* v, const Index* slot, int64_t a, int64_t e, float* o, int64_t previous = -1,
              float acc = 0.f) {
  agenttensor::RunChain<1> chain(previous, acc);
  for (int64_t i = a; i < e; ++i) chain.add(slot[i], {v}, i, {o});
}

template <class Index>
void contiguous_sum(const float* values, int64_t row_stride, const Index* slot, int64_t B, int64_t N, int64_t G,
                    float* out, int64_t threads) {
  std::fill(out, out + B * G, 0.f);  // groups without members
  const int64_t pieces = N >= (int64_t(1) << 18) ? 2 * kStreams : 1;
  std::vector<int64_t> cut(pieces + 1);
  for (int64_t p = 0; p <= pieces; ++p)  // non-decreasing: a large group may run past the next nominal cut
    cut[p] = p == pieces ? N : std::max(p ? cut[p - 1] : 0, group_boundary(slot, N, p * (N / pieces)));
  const int64_t parts = pieces == 1 ? 1 : 2;
  const int64_t streams = pieces / parts;
  agenttensor::parallel(threads, B * parts, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t b = k / parts, first = (k % parts) * streams;
      const float* v = values + b * row_stride;
      float* o = out + b * G;
      if (streams == 1) {
        run_sums(v, slot, cut[first], cut[first + 1], o);
        continue;
      }
      // kStreams == 4 chains in local variables (arrays would be reloaded after every store to o, which may alias them)
      const int64_t* c = cut.data() + first;
      const int64_t common = std::min(std::min(c[1] - c[0], c[2] - c[1]), std::min(c[3] - c[2], c[4] - c[3]));
      agenttensor::RunChain<1> a0, a1, a2, a3;
      for (int64_t step = 0; step < common; ++step) {
        const int64_t i0 = c[0] + step, i1 = c[1] + step, i2 = c[2] + step, i3 = c[3] + step;
        a0.add(slot[i0], {v}, i0, {o});  // a run's last store holds its sum
        a1.add(slot[i1], {v}, i1, {o});
        a2.add(slot[i2], {v}, i2, {o});
        a3.add(slot[i3], {v}, i3, {o});
      }
      auto rest = [&](agenttensor::RunChain<1>& chain, int64_t j) {  // the rest of stream j, continuing its open run
        for (int64_t i = c[j] + common; i < c[j + 1]; ++i) chain.add(slot[i], {v}, i, {o});
      };
      rest(a0, 0), rest(a1, 1), rest(a2, 2), rest(a3, 3);
    }
  });
}

// 1 if every group's agents form one contiguous run of `slot` (then `segment_sum` with contiguous=1
// applies), else 0. `seen`: [G] bytes of scratch.
template <class Index>
int64_t contiguous_groups(const Index* slot, int64_t N, int64_t G) {
  std::vector<uint8_t> seen(G, 0);
  for (int64_t i = 0; i < N; ++i) {
    if (i > 0 && slot[i] == slot[i - 1]) continue;
    if (seen[slot[i]]) return 0;
    seen[slot[i]] = 1;
  }
  return 1;
}

// out[b, g] = sum of values[b * row_stride + i] over agents i with slot[i] == g; out [B, G] contiguous,
// overwritten. row_stride 0: one row of values for every b. contiguous: see contiguous_groups. members (or null):
// the sorted indices of the agents whose slot is not the last, member_count of them (see accumulate_members).
template <class Index>
void segment_sum(const float* values, int64_t row_stride, const Index* slot, int64_t B, int64_t N, int64_t G,
                 float* out, int64_t threads, int64_t contiguous, const int32_t* members, int64_t member_count) {
  if (contiguous) {
    contiguous_sum(values, row_stride, slot, B, N, G, out, threads);
    return;
  }
  const int64_t parts = N >= (int64_t(1) << 18) ? 2 : 1;
  const int64_t W = G + kSpread;
  thread_local std::vector<float> partial;
  if (partial.size() < static_cast<size_t>(B * parts * W)) partial.resize(B * parts * W);
  float* scratch = partial.data();  // thread_local: the workers must not name it
  std::fill(scratch, scratch + B * parts * W, 0.f);
  agenttensor::parallel(threads, B * parts, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t b = k / parts, part = k % parts;
      const int64_t a = part * (N / parts), e = part == parts - 1 ? N : (part + 1) * (N / parts);
      if (members) {
        const int64_t m0 = std::lower_bound(members, members + member_count, a) - members;
        const int64_t m1 = std::lower_bound(members, members + member_count, e) - members;
        accumulate_members(values + b * row_stride, slot, a, e, G, scratch + k * W, members, m0, m1);
      } else {
        accumulate(values + b * row_stride, slot, a, e, G, scratch + k * W);
      }
    }
  });
  for (int64_t b = 0; b < B; ++b) combine_parts(scratch + b * parts * W, parts, G, out + b * G);
}

// out[b, i] = table[b * table_stride + slot[i]]; out [B, N] contiguous (table_stride 0: one row for every b).
template <class Index>
void gather(const float* table, int64_t table_stride, const Index* slot, int64_t B, int64_t N, float* out,
            int64_t threads) {
  agenttensor::parallel(threads, B * N, int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
    agenttensor::for_rows(lo, hi, N, [&](int64_t b, int64_t i0, int64_t i1) {
      const float* t = table + b * table_stride;
      float* o = out + b * N;
      for (int64_t i = i0; i < i1; ++i) o[i] = t[slot[i]];
    });
  });
}

// out[b, i] = (sums[b, slot[i]] - grad[b, i]) * scale[b * scale_stride + slot[i]]: the derivative that reaches
// agent i through the *other* members of its group (sums [B, G] = per-group sums of grad). All contiguous.
template <class Index>
void others_scaled(const float* grad, const float* sums, int64_t G, const float* scale, int64_t scale_stride,
                   const Index* slot, int64_t B, int64_t N, float* out, int64_t threads) {
  agenttensor::parallel(threads, B * N, int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
    agenttensor::for_rows(lo, hi, N, [&](int64_t b, int64_t i0, int64_t i1) {
      const float* s = sums + b * G;
      const float* c = scale + b * scale_stride;
      const float* g = grad + b * N;
      float* o = out + b * N;
      for (int64_t i = i0; i < i1; ++i) o[i] = (s[slot[i]] - g[i]) * c[slot[i]];
    });
  });
}

}  // namespace

// The C entry points: int64 slots, and `_i32` twins for int32 slots.
#define AGENTTENSOR_GROUP_KERNELS(SUFFIX, Index)                                                                 \
  int64_t agenttensor_contiguous_groups##SUFFIX(const Index* slot, int64_t N, int64_t G) {                       \
    return contiguous_groups(slot, N, G);                                                                     \
  }                                                                                                           \
  void agenttensor_segment_sum##SUFFIX(const float* values, int64_t row_stride, const Index* slot, int64_t B,   \
                                       int64_t N, int64_t G, float* out, int64_t threads, int64_t contiguous,   \
                                       const int32_t* members, int64_t member_count) {                          \
    segment_sum(values, row_stride, slot, B, N, G, out, threads, contiguous, members, member_count);          \
  }                                                                                                           \
  void agenttensor_gather##SUFFIX(const float* table, int64_t table_stride, const Index* slot, int64_t B,       \
                                  int64_t N, float* out, int64_t threads) {                                    \
    gather(table, table_stride, slot, B, N, out, threads);                                                    \
  }                                                                                                           \
  void agenttensor_others_scaled##SUFFIX(const float* grad, const float* sums, int64_t G, const float* scale,    \
                                         int64_t scale_stride, const Index* slot, int64_t B, int64_t N,         \
                                         float* out, int64_t threads) {                                        \
    others_scaled(grad, sums, G, scale, scale_stride, slot, B, N, out, threads);                              \
  }

extern "C" {
AGENTTENSOR_GROUP_KERNELS(, int64_t)
AGENTTENSOR_GROUP_KERNELS(_i32, int32_t)

// One contact layer of a layered force (agenttensor.transmission.layered_force). Row strides are 0 for a row
// broadcast over the batch; a null presence or factor reads as 1.
struct ForceLayer {
  const float* table;  // [B | 1, S] value per slot
  int64_t table_stride;
  const void* slot;  // [N]: int64, or int32 where slot_i32 is 1
  int64_t slot_i32;
  const float* presence;  // [B | 1, N] or null
  int64_t presence_stride;
  const float* factor;  // [B | 1, N] or null
  int64_t factor_stride;
  const float* factor_all;  // [B | 1, N] or null: a second factor, applied after `factor`
  int64_t factor_all_stride;
  // backward: [B, N] out, grad σ presence factors (the derivative reaching table and sources), or null: not written
  // (then `sums` is set: the weights are summed per group in the pass, from a tile buffer)
  float* weight;
  float* d_presence;    // backward: [B, N] out or null, grad σ table[slot] factors
  float* d_factor;      // backward: [B, N] out or null, grad σ table[slot] presence factor_all
  float* d_factor_all;  // backward: [B, N] out or null, grad σ table[slot] presence factor
  // backward, or null: [B, S] out, the group sums of weight (the table's derivative), summed in the same pass
  float* sums;
  int64_t groups;      // S
  int64_t contiguous;  // 1: every group is one run of agents (see contiguous_groups)
  const int32_t* members;  // or null: the agents not in the last slot, sorted (see accumulate_members)
  int64_t member_count;
  int64_t last_constant;  // 1: the table's last slot is a constant: with `members`, its sum is left 0 (not summed)
  const int32_t* member_slots;  // or null: with `members`, each member's slot (read in place of slot[member])
};

// σ as a table by group, where the caller has one (e.g. susceptibility by age group): [B | 1, size] (row stride 0 or
// size), read at index [N] (bytes); table null: σ is the [B | 1, N] array
struct SigmaTable {
  const float* table;
  int64_t stride, size;
  const uint8_t* index;
};

}  // extern "C"

// Layer-by-layer loops over tiles of agents (a tile's accumulator stays in cache), specialised on which of
// presence / factor / factor_all exist so that the loops carry no branches.
namespace force_detail {

// agents per tile. AMD's AVX-512 machine (Zen 5, 1 MB L2; `AGENTTENSOR_ZEN`): 32768, per-call A/Bs of the layered
// force in situ at full NYC (its forward and backward calls alternating): 8192 -> 16384 -0.6 ms per call, -> 32768
// -0.7 more (6 of 6 runs each; 4096: +0.9). The tile buffers are on the heap (at 32768, 384 KB a thread).
#if defined(AGENTTENSOR_ZEN)
constexpr int64_t kTile = 32768;
#else
constexpr int64_t kTile = 8192;
#endif

// A thread's tile buffers, allocated by `new` (on the heap, as the own contributions' `OwnTileBuffers`: no zero fill;
// the passes write them before reading them, as they did the stack arrays)
struct TileBuffers {
  float total[kTile], gs[kTile], sigma_buffer[kTile];
};

// Whether agents [i0, i1) are all in one group of a layer whose groups are runs of agents (its first and last slot
// equal: a neighbourhood's agents, sorted by neighbourhood; full NYC's community layer: all but a few tiles). The tile
// then reads the group's value once instead of gathering it per agent (paired A/B at full NYC: −1.6 ms per call).
template <class Index>
bool one_group(const ForceLayer& layer, int64_t i0, int64_t i1) {
  const Index* slot = static_cast<const Index*>(layer.slot);
  return layer.contiguous && i1 > i0 && slot[i0] == slot[i1 - 1];
}

// One: every agent's table value is `value` (see one_group), else gathered.
template <bool P, bool F, bool A, bool One, class Index>
void forward_loop(const ForceLayer& layer, int64_t b, int64_t i0, int64_t i1, bool first, float value,
                  float* __restrict total) {
  const float* __restrict t = layer.table + b * layer.table_stride;
  const Index* __restrict slot = static_cast<const Index*>(layer.slot);
  const float* __restrict p = P ? layer.presence + b * layer.presence_stride : nullptr;
  const float* __restrict f = F ? layer.factor + b * layer.factor_stride : nullptr;
  const float* __restrict a = A ? layer.factor_all + b * layer.factor_all_stride : nullptr;
  for (int64_t i = i0; i < i1; ++i) {
    float term = One ? value : t[slot[i]];
    if (P) term *= p[i];
    if (F) term *= f[i];
    if (A) term *= a[i];
    total[i - i0] = first ? term : total[i - i0] + term;
  }
}

template <bool P, bool F, bool A, class Index>
void forward_layer(const ForceLayer& layer, int64_t b, int64_t i0, int64_t i1, bool first, float* __restrict total) {
  if (one_group<Index>(layer, i0, i1))
    forward_loop<P, F, A, true, Index>(layer, b, i0, i1, first,
                                       layer.table[b * layer.table_stride + static_cast<const Index*>(layer.slot)[i0]],
                                       total);
  else
    forward_loop<P, F, A, false, Index>(layer, b, i0, i1, first, 0.f, total);
}

// One tile of n agents: weight = grad σ (p f a); with V (the group's value is needed): d_presence = grad σ (value f a),
// d_factor = grad σ (value p a), d_factor_all = grad σ (value p f), and total += value p f a (for dσ). Every output is
// written (a caller's unwanted ones go to a scratch tile): no branch in the loop, restrict parameters: it vectorises.
// One: every agent's table value is `one_value` (see one_group), else gathered.
template <bool P, bool F, bool A, bool V, bool One, class Index>
void backward_tile(int64_t n, const float* __restrict t, const Index* __restrict slot, float one_value,
                   const float* __restrict p, const float* __restrict f, const float* __restrict a,
                   const float* __restrict gs, float* __restrict w, float* __restrict dp, float* __restrict df,
                   float* __restrict da, float* __restrict total) {
  for (int64_t j = 0; j < n; ++j) {
    float fa = 1.f;
    if (F) fa *= f[j];
    if (A) fa *= a[j];
    const float pfa = P ? p[j] * fa : fa;
    const float g = gs[j];
    w[j] = g * pfa;
    if (V) {
      const float value = One ? one_value : t[slot[j]];
      const float vp = P ? value * p[j] : value;
      if (P) dp[j] = g * (value * fa);
      if (F) df[j] = g * (A ? vp * a[j] : vp);
      if (A) da[j] = g * (F ? vp * f[j] : vp);
      total[j] += value * pfa;
    }
  }
}

// The layer's part of a backward tile [i0, i1) of row b (see backward_tile); scratch: 4 kTile floats. -> the
// tile's weights (the layer's `weight` at i0, or the scratch tile they went to where it is null).
template <bool P, bool F, bool A, bool V, class Index>
const float* backward_layer(const ForceLayer& layer, int64_t b, int64_t N, int64_t i0, int64_t i1, const float* gs,
                            float* total, float* scratch) {
  auto rows = [&](const float* x, int64_t stride) { return x ? x + b * stride + i0 : nullptr; };
  auto out = [&](float* x, int k) { return x ? x + b * N + i0 : scratch + k * kTile; };
  const float* table = layer.table + b * layer.table_stride;
  const Index* slot = static_cast<const Index*>(layer.slot) + i0;
  float* weight = out(layer.weight, 3);
  auto tile = [&](auto one) {
    backward_tile<P, F, A, V, decltype(one)::value, Index>(
        i1 - i0, table, slot, decltype(one)::value ? table[slot[0]] : 0.f, rows(layer.presence, layer.presence_stride),
        rows(layer.factor, layer.factor_stride), rows(layer.factor_all, layer.factor_all_stride), gs, weight,
        out(layer.d_presence, 0), out(layer.d_factor, 1), out(layer.d_factor_all, 2), total);
  };
  if (V && one_group<Index>(layer, i0, i1))
    tile(std::true_type());
  else
    tile(std::false_type());
  return weight;
}

// fn(key, index): key says which of presence / factor / factor_all exist (bits 1, 2, 4), index is a value of the
// layer's slot type
template <class Index, class Fn>
void dispatch_parts(const ForceLayer& layer, Fn&& fn) {
  const int key = (layer.presence ? 1 : 0) | (layer.factor ? 2 : 0) | (layer.factor_all ? 4 : 0);
  switch (key) {
    case 0: fn(std::integral_constant<int, 0>(), Index()); break;
    case 1: fn(std::integral_constant<int, 1>(), Index()); break;
    case 2: fn(std::integral_constant<int, 2>(), Index()); break;
    case 3: fn(std::integral_constant<int, 3>(), Index()); break;
    case 4: fn(std::integral_constant<int, 4>(), Index()); break;
    case 5: fn(std::integral_constant<int, 5>(), Index()); break;
    case 6: fn(std::integral_constant<int, 6>(), Index()); break;
    default: fn(std::integral_constant<int, 7>(), Index()); break;
  }
}

template <class Fn>
void dispatch(const ForceLayer& layer, Fn&& fn) {
  if (layer.slot_i32)
    dispatch_parts<int32_t>(layer, fn);
  else
    dispatch_parts<int64_t>(layer, fn);
}

// σ of a row's agents: an array [N] (row), or a small table [size] read at a byte per agent (index [N], table non-null)
struct Sigma {
  const float* row;
  const float* table;
  int64_t size;
  const uint8_t* index;

  // σ for the tile [i0, i1): the row's values there, or the table's read into `buffer` (kTile floats; the same values)
  const float* tile(int64_t i0, int64_t i1, float* buffer) const {
    if (!table) return row + i0;
    agenttensor::small_table_lookup(i1 - i0, table, size, index + i0, buffer);
    return buffer;
  }
};

inline Sigma sigma_of(const SigmaTable& t, int64_t b, const float* sigma, int64_t sigma_stride) {
  return t.table ? Sigma{nullptr, t.table + b * t.stride, t.size, t.index} : Sigma{sigma + b * sigma_stride, nullptr, 0,
                                                                                     nullptr};
}

// One backward tile [i0, i1) of row b (see agenttensor_layered_force): gs = grad σ, each layer's outputs
// (`backward_layer`) followed by `after_layer(l, Index(), the tile's weights)` (the fused group sums, or nothing),
// then d_sigma. gs, total: kTile floats; scratch: 4 kTile.
template <class AfterLayer>
void backward_rows(int64_t N, int64_t L, const ForceLayer* layers, int64_t b, int64_t i0, int64_t i1,
                   const float* sigma_tile, const float* grad_row, float* d_sigma, float* gs, float* total,
                   float* scratch, AfterLayer&& after_layer) {
  const int64_t n = i1 - i0;
  for (int64_t i = i0; i < i1; ++i) gs[i - i0] = grad_row[i] * sigma_tile[i - i0];
  std::fill(total, total + n, 0.f);
  for (int64_t l = 0; l < L; ++l)
    dispatch(layers[l], [&](auto key, auto index) {
      constexpr int k = decltype(key)::value;
      using Index = decltype(index);
      const ForceLayer& layer = layers[l];
      const float* weight =
          d_sigma != nullptr || layer.d_presence != nullptr || layer.d_factor != nullptr ||
                  layer.d_factor_all != nullptr
              ? backward_layer<(k & 1) != 0, (k & 2) != 0, (k & 4) != 0, true, Index>(layer, b, N, i0, i1, gs, total,
                                                                                       scratch)
              : backward_layer<(k & 1) != 0, (k & 2) != 0, (k & 4) != 0, false, Index>(layer, b, N, i0, i1, gs, total,
                                                                                        scratch);
      after_layer(l, index, weight);
    });
  if (d_sigma != nullptr)
    for (int64_t i = i0; i < i1; ++i) d_sigma[b * N + i] = grad_row[i] * total[i - i0];
}

// The open run of a contiguous layer's group sums in a task: its group (-1: none) and its partial sums (agent i
// into lane i % kSpread).
struct OpenRun {
  int64_t group = -1;
  float lanes[kSpread] = {};
};

inline void close_run(OpenRun& open, float* o) {
  if (open.group < 0) return;
  float total = open.lanes[0];
  for (int64_t c = 1; c < kSpread; ++c) total += open.lanes[c];
  o[open.group] = total;
  open.group = -1;
}

// o[s] = the sum of w over the run of group s for agents [i0, i1) (w[i - i0]: agent i's), the open run continued, for
// groups of many agents (e.g. neighbourhoods): a run's agents added into kSpread lanes by agent index (a vectorised
// loop; one chain in agent order, as contiguous_sum's, is bound by the additions' latency), the lanes added in order
// when the run closes (`close_run`): a fixed order whatever the tiles and threads, though not contiguous_sum's.
template <class Index>
void long_runs(const float* w, const Index* slot, int64_t i0, int64_t i1, float* o, OpenRun& open) {
  for (int64_t i = i0; i < i1;) {
    const int64_t group = slot[i];
    if (group != open.group) {
      close_run(open, o);
      open.group = group;
      std::fill(open.lanes, open.lanes + kSpread, 0.f);
    }
    // the run's end: the first agent of another group. Each group is one run, so the agents of `group` in [i, i1)
    // are a prefix of it: a binary search (the scan for it ran one agent at a time, ~1 % of a gradient day)
    const int64_t e = std::partition_point(slot + i + 1, slot + i1, [&](Index s) { return s == group; }) - slot;
    float lanes[kSpread];
    std::copy(open.lanes, open.lanes + kSpread, lanes);
    int64_t j = i;
    for (; j < e && (j & (kSpread - 1)); ++j) lanes[j & (kSpread - 1)] += w[j - i0];
    for (; j + kSpread <= e; j += kSpread)
      for (int64_t c = 0; c < kSpread; ++c) lanes[c] += w[j - i0 + c];
    for (; j < e; ++j) lanes[j & (kSpread - 1)] += w[j - i0];
    std::copy(lanes, lanes + kSpread, open.lanes);
    i = e;
  }
}

// The open runs of a contiguous layer of short runs (households) in a task, continued from tile to tile: every run
// summed in agent order from +0, as contiguous_sum sums it (the same bits): `VectorRunSums` for int32 slots with
// AVX-512, else `run_sums`' chain (also on AMD's AVX-512 CPUs, `AGENTTENSOR_ZEN`: on Zen 5 the layered force -0.30 ms per
// call at full NYC, 5 of 6 runs, 3 of 3 pairs).
#if defined(__AVX512F__) && !defined(AGENTTENSOR_ZEN)
#define AGENTTENSOR_VECTOR_SHORT_RUNS 1
#endif
struct ShortRuns {
#if defined(AGENTTENSOR_VECTOR_SHORT_RUNS)
  agenttensor::VectorRunSums<1> vector;
#endif
  int64_t previous = -1;
  float acc = 0.f;

  template <class Index>
  void add(const float* w, const Index* slot, int64_t n, float* o) {  // the next n agents' weights and slots
#if defined(AGENTTENSOR_VECTOR_SHORT_RUNS)
    if constexpr (std::is_same_v<Index, int32_t>) {
      vector.add(n, {w}, slot, {o});
      return;
    }
#endif
    if (n == 0) return;
    run_sums(w, slot, 0, n, o, previous, acc);
    previous = slot[n - 1];
    acc = o[previous];  // (each step stores the run's sum so far)
  }
};

constexpr int64_t kLongRuns = 256;  // mean agents per group from which `long_runs` sums them (LONG_RUNS in Python)

// The backward with the group sums of the weights in the same pass (for each layer whose `sums` is set), for the
// layers where that beats a separate pass over the weights (`_group_kernels.layered_force` picks them: contiguous
// groups of many agents, `long_runs`, and scattered groups that most agents are not members of, the members' adds
// only, `accumulate_members`) and for those whose weights are not written (any layer: short runs, `ShortRuns`, or
// `accumulate`). The agents of a row are cut into `parts` fixed pieces (2 from 2^18 agents, else 1;
// one task per row and piece), at a point where every contiguous layer's group changes, so that each of those
// groups is summed by one task; the scattered layers add into per-task partial sums (with the last slot spread, as
// in segment_sum) added in piece order at the end. Results do not depend on the thread count.
void backward_with_sums(int64_t B, int64_t N, int64_t L, const ForceLayer* layers, const float* sigma,
                        int64_t sigma_stride, const SigmaTable& by_group, const float* grad, float* d_sigma,
                        int64_t threads) {
  const int64_t parts = N >= (int64_t(1) << 18) ? 2 : 1;
  int64_t cut = parts == 1 ? N : N / 2;
  auto changes = [&](int64_t i) {  // whether every contiguous summed layer starts a new group at agent i
    for (int64_t l = 0; l < L; ++l) {
      const ForceLayer& layer = layers[l];
      if (!layer.sums || !layer.contiguous) continue;
      if (layer.slot_i32) {
        const int32_t* slot = static_cast<const int32_t*>(layer.slot);
        if (slot[i] == slot[i - 1]) return false;
      } else {
        const int64_t* slot = static_cast<const int64_t*>(layer.slot);
        if (slot[i] == slot[i - 1]) return false;
      }
    }
    return true;
  };
  while (cut < N && cut > 0 && !changes(cut)) ++cut;
  // per-task partial sums of the scattered layers: [L][B * parts][S + kSpread]
  std::vector<int64_t> offset(L + 1, 0);
  for (int64_t l = 0; l < L; ++l)
    offset[l + 1] =
        offset[l] + (layers[l].sums && !layers[l].contiguous ? B * parts * (layers[l].groups + kSpread) : 0);
  std::vector<float> partial(offset[L], 0.f);
  for (int64_t l = 0; l < L; ++l)
    if (layers[l].sums && layers[l].contiguous) std::fill(layers[l].sums, layers[l].sums + B * layers[l].groups, 0.f);
  agenttensor::parallel(threads, B * parts, 1, [&](int64_t lo, int64_t hi) {
    const std::unique_ptr<TileBuffers> buffers(new TileBuffers);
    float *total = buffers->total, *gs = buffers->gs, *sigma_buffer = buffers->sigma_buffer;
    std::vector<float> scratch(4 * kTile);
    std::vector<OpenRun> open(L);
    std::vector<ShortRuns> runs(L);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / parts, part = task % parts, r0 = part == 0 ? 0 : cut, r1 = part == parts - 1 ? N : cut;
      std::fill(open.begin(), open.end(), OpenRun());
      runs.assign(L, ShortRuns());
      const Sigma s = sigma_of(by_group, b, sigma, sigma_stride);
      const float* g = grad + b * N;
      for (int64_t i0 = r0; i0 < r1; i0 += kTile) {
        const int64_t i1 = std::min(r1, i0 + kTile);
        backward_rows(N, L, layers, b, i0, i1, s.tile(i0, i1, sigma_buffer), g, d_sigma, gs, total, scratch.data(),
                      [&](int64_t l, auto index, const float* w) {  // w: the tile's weights (agent i: w[i - i0])
          using Index = decltype(index);
          const ForceLayer& layer = layers[l];
          if (!layer.sums) return;
          const Index* slot = static_cast<const Index*>(layer.slot);
          const int64_t G = layer.groups;
          if (layer.contiguous && N >= kLongRuns * G) {
            long_runs(w, slot, i0, i1, layer.sums + b * G, open[l]);
            if (i1 == r1) close_run(open[l], layer.sums + b * G);
          } else if (layer.contiguous) {
            runs[l].add(w, slot + i0, i1 - i0, layer.sums + b * G);
          } else {
            float* o = partial.data() + offset[l] + task * (G + kSpread);
            if (layer.members) {
              const int32_t *first = layer.members, *past = layer.members + layer.member_count;
              accumulate_members(w, slot, i0, i1, G, o, first, std::lower_bound(first, past, i0) - first,
                                 std::lower_bound(first, past, i1) - first, !layer.last_constant, i0,
                                 layer.member_slots);
            } else {
              accumulate(w, slot, i0, i1, G, o, i0);
            }
          }
        });
      }
    }
  });
  for (int64_t l = 0; l < L; ++l) {  // the scattered layers' partial sums, in piece order (as segment_sum)
    const ForceLayer& layer = layers[l];
    if (!layer.sums || layer.contiguous) continue;
    const int64_t G = layer.groups;
    for (int64_t b = 0; b < B; ++b)
      combine_parts(partial.data() + offset[l] + b * parts * (G + kSpread), parts, G, layer.sums + b * G);
  }
}

}  // namespace force_detail

extern "C" {

// grad null (forward): force[b, i] = σ[b, i] Σ_l ((table_l[b, slot_l(i)] presence_l[b, i]) factor_l[b, i]) factor_all_l[b, i],
// multiplied and summed in that order (built without floating-point contraction: the same numbers as torch's
// elementwise ops). grad given (backward): each layer's weight, d_presence, d_factor and d_factor_all (where not
// null), and d_sigma = grad Σ_l (...).
void agenttensor_layered_force(int64_t B, int64_t N, int64_t L, const ForceLayer* layers, const float* sigma,
                               int64_t sigma_stride, const SigmaTable* by_group, const float* grad, float* force,
                               float* d_sigma, int64_t threads) {
  using namespace force_detail;
  const SigmaTable none{nullptr, 0, 0, nullptr};
  const SigmaTable& table = by_group ? *by_group : none;
  if (grad != nullptr)
    for (int64_t l = 0; l < L; ++l)
      if (layers[l].sums) {
        backward_with_sums(B, N, L, layers, sigma, sigma_stride, table, grad, d_sigma, threads);
        return;
      }
  // (the forward's per-agent work is light: two threads from 2^14 agents on)
  agenttensor::parallel(threads, B * N, int64_t(1) << (grad ? 16 : 14), [&](int64_t lo, int64_t hi) {
    const std::unique_ptr<TileBuffers> buffers(new TileBuffers);
    float *total = buffers->total, *gs = buffers->gs, *sigma_buffer = buffers->sigma_buffer;
    std::vector<float> scratch(grad ? 4 * kTile : 0);  // the backward's unwanted outputs
    agenttensor::for_rows(lo, hi, N, [&](int64_t b, int64_t r0, int64_t r1) {
      const Sigma s = sigma_of(table, b, sigma, sigma_stride);
      for (int64_t i0 = r0; i0 < r1; i0 += kTile) {
        const int64_t i1 = std::min(r1, i0 + kTile), n = i1 - i0;
        const float* sigma_tile = s.tile(i0, i1, sigma_buffer);
        if (grad == nullptr) {
          if (L == 0) std::fill(total, total + n, 0.f);
          for (int64_t l = 0; l < L; ++l)
            dispatch(layers[l], [&](auto key, auto index) {
              constexpr int k = decltype(key)::value;
              using Index = decltype(index);
              forward_layer<(k & 1) != 0, (k & 2) != 0, (k & 4) != 0, Index>(layers[l], b, i0, i1, l == 0, total);
            });
          float* out = force + b * N;
          for (int64_t i = i0; i < i1; ++i) out[i] = sigma_tile[i - i0] * total[i - i0];
        } else {
          backward_rows(N, L, layers, b, i0, i1, sigma_tile, grad + b * N, d_sigma, gs, total, scratch.data(),
                        [](int64_t, auto, const float*) {});
        }
      }
    });
  });
}


// Each layer's share of the force at the pairs (b[m], i[m]), summed per batch element: out[l, b] += term_l / max(Σ_l'
// term_l', 1e-30) over m in order, term_l = ((table_l[b, slot_l(i)] presence_l[b, i]) factor_l[b, i]) factor_all_l[b, i]
// (σ cancels). The same operations in the same order as the torch ops: the terms gathered and multiplied per layer,
// summed over the layers, clamped, divided, and ``index_add``'s sequential sums (out [L, B], zeroed by the caller).
void agenttensor_layered_shares_at(int64_t B, int64_t L, const ForceLayer* layers, int64_t M, const int64_t* pb,
                                   const int64_t* pi, float* out) {
  std::vector<float> term(static_cast<size_t>(L));
  for (int64_t m = 0; m < M; ++m) {
    const int64_t b = pb[m], i = pi[m];
    float total = 0.f;
    for (int64_t l = 0; l < L; ++l) {
      const ForceLayer& layer = layers[l];
      const int64_t slot = layer.slot_i32 ? static_cast<const int32_t*>(layer.slot)[i]
                                          : static_cast<const int64_t*>(layer.slot)[i];
      float value = layer.table[b * layer.table_stride + slot];
      if (layer.presence) value = value * layer.presence[b * layer.presence_stride + i];
      if (layer.factor) value = value * layer.factor[b * layer.factor_stride + i];
      if (layer.factor_all) value = value * layer.factor_all[b * layer.factor_all_stride + i];
      term[l] = value;
      total = l == 0 ? value : total + value;
    }
    total = total < 1e-30f ? 1e-30f : total;  // clamp_min (NaN passes through)
    for (int64_t l = 0; l < L; ++l) out[l * B + b] += term[l] / total;
  }
}

}  // extern "C"
