// The covid model's hard-mode day (models/covid/model.py) as native passes, for CPU: the force of infection
// (`infection_pressure`: the group totals of the infectious agents' contributions, the layers' tables made from them,
// and the layered force read from the tables), and the transition (`progress`): the infection draws, the newly
// infected agents' entry into E with their countdowns, and every agent whose countdown ends today drawing its next
// stage, its detection, its isolation and its next countdown; the per-borough flows are counted in the same pass.
// Loaded by models/covid/hard_native.py; model.py keeps the same arithmetic in torch ops (the reference, and the path
// on other devices and in gradient modes, which use one of these passes: the group totals of the infectious agents,
// `agenttensor_covid_source_totals_at`). Memberships are uint8 0/1 and are combined in uint8 arithmetic as the torch ops
// do; probabilities are float32 with the torch ops' operations in their order (built with
// -ffp-contract=off); the uniforms are agenttensor/rng.py's (uniform.h). The same bits.
//
// At a small population the torch ops are a day's fixed cost of calls (37,518 agents: ~60 ops on tens of agents in the
// transition, ~45 in the force and its tables); these are two calls. The infections between them are those of torch's
// survival exp(−λ): made by torch, or inside the transition's pass (a fast polynomial with a certified test, and the
// function torch's own exp calls, MKL's vmsExp, for the few agents the test leaves open: `certified_tests`).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fast_exp.h"
#include "pairs.h"
#include "parallel.h"
#include "torch_exp.h"
#include "uniform.h"

namespace {

using agenttensor::uniform_of;

// A per-agent value as a broadcast [B, N] float32 view: p[b * sb + n * sn] (sb, sn 0 where broadcast).
struct Strided {
  const float* p;
  int64_t sb, sn;
};

inline float read(const Strided& x, int64_t b, int64_t n) { return x.p[b * x.sb + n * x.sn]; }

}  // namespace

// The arguments (models/covid/hard_native.py's _Args, field for field).
struct ProgressArgs {
  int64_t B, N, G, K, t, threads;
  // [B, N] memberships (uint8) and countdowns (int16), updated in place
  uint8_t *S, *E, *Ia, *Is, *H, *R, *D, *isolating;
  int16_t* stage_end;
  // the infection draws: survival exp(−λ) [B, N] (an agent of S is infected where u < 1 − survival), or null: then
  // decided block by block from the hazard λ [B, N] (`certified_tests`), with `exp` (MKL's vmsExp, torch's own exp on
  // CPU, which models/covid/hard_native.py passes only where its bits are torch's) at `exp_mode` where the test leaves
  // an agent open, MKL sequential on the pass's threads (`local_threads`: MKL_Set_Num_Threads_Local)
  const float* survival;
  const float* hazard;
  void* exp;
  int64_t exp_mode;
  void* local_threads;
  // random streams: base [N]; keys [8, B] (symptoms, hospitalisation, death, detection, isolation, duration-exit,
  // duration-E, infection)
  const int32_t *base, *keys;
  const int32_t *age_group, *borough;                  // [N]
  const float *symptomatic, *hosp, *death;              // [A]
  Strided detect, detect_asym_ratio, testing, isolate, efficacy_severe;  // testing, efficacy_severe: p null if unused
  const uint8_t* vaccinated;                            // [B, N] or null (no vaccination lever)
  const float *cdf_E, *cdf_exit;                        // [K], [3, K] (I_asym, I_sym, H)
  float* flows;  // [21, B, G] out: the 13 flows, then the stage counts' 8 changes
  // out: today's infections, their (b, i) pairs in row-major order held for `agenttensor_covid_take_pairs` (null if
  // none)
  int64_t infected;
  void* pairs;
};

namespace {

constexpr int kFlows = 13;  // new infections, then at the exits: reported, to_H, to_D, leave_E, to_Ia, leave_Ia,
                            // to_Is, leave_Is, leave_H, to_R, isolating after, isolating before

// min(K, 1 + #{k : cdf[k] <= u}): torch.searchsorted(cdf, u, right=True) + 1, clamped (`disease.draw_duration`)
inline int64_t duration(const float* cdf, int64_t K, float u) {
  return std::min<int64_t>(K, 1 + (std::upper_bound(cdf, cdf + K, u) - cdf));
}

// agents per block of `tests`; on AMD's AVX-512 CPUs (`AGENTTENSOR_ZEN`) 4096: on Zen 5 at full NYC the hard
// transition -0.58 ms per call against 1024 (4 of 6 runs, pairs of runs 3 of 3)
#if defined(AGENTTENSOR_ZEN)
constexpr int64_t kBlock = 4096;
#else
constexpr int64_t kBlock = 1024;
#endif

// hit[j] for a block's agents: bit 0 an agent of S infected today (u < 1 − survival), bit 1 its countdown ends today.
// Branch-free over restrict pointers: the loop vectorises.
void tests(const int32_t* __restrict__ base, uint32_t key, const float* __restrict__ survival,
           const uint8_t* __restrict__ S, const int16_t* __restrict__ ends, int16_t today, int64_t width,
           uint8_t* __restrict__ hit) {
  for (int64_t j = 0; j < width; ++j) {
    const uint8_t infected = (uniform_of(static_cast<uint32_t>(base[j]) ^ key) < 1.f - survival[j]) & (S[j] != 0);
    hit[j] = static_cast<uint8_t>(infected | ((ends[j] == today) << 1));
  }
}

// A bound on |exp_nonpositive(x) / exp(x) − 1| for x in [-87, 0], exp being torch's (MKL's vmsExp). The largest over
// every float of that range is 2.53e-7 (`agenttensor_covid_fast_exp_error` with this file's build flags, against MKL's
// SSE4.2 exp on an AMD Zen 3; 12.8 s). A 16x margin: torch's exp on other CPUs (other MKL paths) is within an ulp of
// it, and s (1 ± bound) is rounded.
constexpr float kFastExpBound = 4e-6f;

// `tests` from the hazard λ, without torch's exp for most agents: s = exp_nonpositive(−λ) is within kFastExpBound of
// exp(−λ), and 1 − x (rounded) does not increase with x, so an agent with u < 1 − s (1 + bound) is infected and one with
// u >= 1 − s (1 − bound) is not, whatever exp(−λ)'s last bits. Only the agents of S between the two (a band ~1e-5 wide:
// a few per million), or with λ negative or NaN, take torch's exp (`exp` at `mode`), one call per block that has any:
// the same decisions as `tests` on torch's survival, bit for bit. Below −87, exp(−87) ≈ 1.6e−38 and every survival
// there leaves 1 − s = 1 after rounding. Full NYC, AMD Zen 3 (MKL's SSE4.2 exp there): see HISTORY.md.
void certified_tests(const int32_t* __restrict__ base, uint32_t key, const float* __restrict__ hazard,
                     const uint8_t* __restrict__ S, const int16_t* __restrict__ ends, int16_t today, int64_t width,
                     uint8_t* __restrict__ hit, void* exp, int64_t mode) {
  alignas(64) uint8_t unsure[kBlock];
  uint32_t any = 0;
  for (int64_t j = 0; j < width; ++j) {
    const float x = -hazard[j];
    const float s = agenttensor::exp_nonpositive(x);
    const float u = uniform_of(static_cast<uint32_t>(base[j]) ^ key);
    const float high = s * (1.f + kFastExpBound) + 1e-30f, low = s * (1.f - kFastExpBound);
    const uint8_t valid = x <= 0.f;  // (NaN: false)
    const uint8_t in = u < 1.f - high, out = u >= 1.f - low, susceptible = S[j] != 0;
    unsure[j] = static_cast<uint8_t>((valid & (in | out)) ^ 1) & susceptible;
    any |= unsure[j];
    hit[j] = static_cast<uint8_t>((valid & in & susceptible) | ((ends[j] == today) << 1));
  }
  if (!any) return;
  alignas(64) float exact[kBlock];
  int32_t where[kBlock];
  int64_t m = 0;
  for (int64_t j = 0; j < width; ++j)
    if (unsure[j]) {
      where[m] = static_cast<int32_t>(j);
      exact[m++] = -hazard[j];  // (the negation is exact, as torch's)
    }
  reinterpret_cast<agenttensor::ExpFn>(exp)(m, exact, exact, mode);
  for (int64_t k = 0; k < m; ++k) {
    const int64_t j = where[k];
    hit[j] = static_cast<uint8_t>(hit[j] | (uniform_of(static_cast<uint32_t>(base[j]) ^ key) < 1.f - exact[k]));
  }
}

void exit_agent(const ProgressArgs& a, int64_t b, int64_t n, int64_t* count) {
  const int64_t at = b * a.N + n, B = a.B;
  const uint32_t h = static_cast<uint32_t>(a.base[n]);
  float u[6];
  for (int s = 0; s < 6; ++s) u[s] = uniform_of(h ^ static_cast<uint32_t>(a.keys[s * B + b]));
  const int32_t g = a.age_group[n];
  const uint8_t leave_E = a.E[at], leave_Ia = a.Ia[at], leave_Is = a.Is[at], leave_H = a.H[at],
                before = a.isolating[at];
  const uint8_t to_Is = static_cast<uint8_t>((u[0] < a.symptomatic[g]) * leave_E);
  const uint8_t to_Ia = static_cast<uint8_t>(leave_E - to_Is);
  float p_hosp = a.hosp[g];
  if (a.vaccinated) p_hosp = p_hosp * (1.f - read(a.efficacy_severe, b, n) * static_cast<float>(a.vaccinated[at]));
  const uint8_t to_H = static_cast<uint8_t>((u[1] < p_hosp) * leave_Is);
  const uint8_t to_D = static_cast<uint8_t>((u[2] < a.death[g]) * leave_H);
  const uint8_t to_R = static_cast<uint8_t>(leave_Ia + static_cast<uint8_t>(leave_Is - to_H)
                                            + static_cast<uint8_t>(leave_H - to_D));
  float p_detect = read(a.detect, b, n) * (static_cast<float>(to_Is)
                                           + read(a.detect_asym_ratio, b, n) * static_cast<float>(to_Ia));
  if (a.testing.p) p_detect = p_detect + read(a.testing, b, n) * (1.f - p_detect);
  const uint8_t reported = static_cast<uint8_t>((u[3] < p_detect) * static_cast<uint8_t>(to_Ia + to_Is));
  const uint8_t aware = static_cast<uint8_t>(static_cast<uint8_t>(to_Is + reported)
                                             - static_cast<uint8_t>(to_Is * reported));
  const uint8_t isolate = static_cast<uint8_t>((u[4] < read(a.isolate, b, n)) * aware);
  const uint8_t leave_I = static_cast<uint8_t>(leave_Ia + leave_Is);
  const uint8_t after = static_cast<uint8_t>(static_cast<uint8_t>(before * static_cast<uint8_t>(1 - leave_I))
                                             + isolate);
  const int64_t table = static_cast<int64_t>(static_cast<uint8_t>(to_Is + static_cast<uint8_t>(2 * to_H)));
  const bool timed = static_cast<uint8_t>(static_cast<uint8_t>(to_Ia + to_Is) + to_H) > 0;
  a.stage_end[at] = timed ? static_cast<int16_t>(a.t + duration(a.cdf_exit + table * a.K, a.K, u[5]))
                          : static_cast<int16_t>(-1);
  a.E[at] = 0;
  a.Ia[at] = to_Ia;
  a.Is[at] = to_Is;
  a.H[at] = to_H;
  a.R[at] = to_R;
  a.D[at] = to_D;
  a.isolating[at] = after;
  const int64_t cell = b * a.G + a.borough[n], stride = B * a.G;
  const uint8_t values[kFlows - 1] = {reported, to_H, to_D, leave_E, to_Ia, leave_Ia, to_Is, leave_Is, leave_H,
                                      to_R, after, before};
  for (int k = 0; k < kFlows - 1; ++k) count[(k + 1) * stride + cell] += values[k];
}

}  // namespace

extern "C" {

// The day's transition (see the file's comment): the infection draws, entries into E, exits; the flows' counts
// [13, B, G] as float32, then the changes of the stage counts they make [8, B, G].
void agenttensor_covid_hard_progress(ProgressArgs* args) {
  ProgressArgs& a = *args;
  const int64_t cells = a.B * a.G, total = a.B * a.N;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(a.threads, total >> 14));  // from 2^14 agents on
  std::vector<int64_t> counts(static_cast<size_t>(threads * kFlows * cells), 0);
  std::vector<std::vector<int64_t>> found(static_cast<size_t>(threads));  // per thread: its infections' (b, i)
  const uint32_t* keys = reinterpret_cast<const uint32_t*>(a.keys);
  const int16_t today = static_cast<int16_t>(a.t);
  agenttensor::parallel(threads, total, int64_t(1) << 14, [&](int64_t lo, int64_t hi) {
    const int w = omp_get_thread_num();  // 0 outside a parallel region
    int64_t* count = counts.data() + w * kFlows * cells;
    std::vector<int64_t>& pairs = found[static_cast<size_t>(w)];
    const bool made = a.survival == nullptr;  // exp(−λ) made here, a block at a time
    const agenttensor::SequentialMkl sequential(made ? a.local_threads : nullptr);
    agenttensor::for_rows(lo, hi, a.N, [&](int64_t b, int64_t i0, int64_t i1) {
      const int64_t row = b * a.N;
      const uint8_t* S = a.S + row;
      const int16_t* ends = a.stage_end + row;
      const uint32_t infection = keys[7 * a.B + b];
      for (int64_t n0 = i0; n0 < i1; n0 += kBlock) {  // a block's tests (vectorised), then its few hits
        const int64_t width = std::min<int64_t>(kBlock, i1 - n0);
        alignas(64) uint8_t hit[kBlock + 8] = {};
        if (made)
          certified_tests(a.base + n0, infection, a.hazard + row + n0, S + n0, ends + n0, today, width, hit, a.exp,
                          a.exp_mode);
        else
          tests(a.base + n0, infection, a.survival + row + n0, S + n0, ends + n0, today, width, hit);
        for (int64_t j0 = 0; j0 < width; j0 += 8) {
          uint64_t word;
          std::memcpy(&word, hit + j0, 8);
          if (!word) continue;
          for (int64_t j = j0; j < std::min(width, j0 + 8); ++j) {
            const int64_t n = n0 + j, at = row + n;
            if (hit[j] & 1) {  // S → E, the latent period's countdown t + d, d ~ the E table
              a.S[at] = static_cast<uint8_t>(a.S[at] - 1);
              a.E[at] = static_cast<uint8_t>(a.E[at] + 1);
              const float u = uniform_of(static_cast<uint32_t>(a.base[n]) ^ keys[6 * a.B + b]);
              a.stage_end[at] = static_cast<int16_t>(static_cast<int32_t>(a.t + duration(a.cdf_E, a.K, u)));
              count[b * a.G + a.borough[n]] += 1;
              pairs.push_back(b);
              pairs.push_back(n);
            } else if (hit[j]) {  // a countdown ends today (a susceptible agent has none)
              exit_agent(a, b, n, count);
            }
          }
        }
      }
    });
  });
  size_t infected = 0;
  for (const auto& pairs : found) infected += pairs.size() / 2;
  a.infected = static_cast<int64_t>(infected);
  a.pairs = agenttensor::hold_pairs(std::move(found));  // the threads' chunks in order: row-major
  for (int64_t k = 0; k < kFlows * cells; ++k) {
    int64_t sum = 0;
    for (int64_t w = 0; w < threads; ++w) sum += counts[w * kFlows * cells + k];
    a.flows[k] = static_cast<float>(sum);
  }
  // the stage counts' changes (S, E, I_asym, I_sym, H, R, D, isolating), as the torch ops form them from the flows
  const float* f = a.flows;
  float* change = a.flows + kFlows * cells;
  for (int64_t c = 0; c < cells; ++c) {
    auto flow = [&](int k) { return f[k * cells + c]; };
    const float values[8] = {-flow(0), flow(0) - flow(4), flow(5) - flow(6), flow(7) - flow(8), flow(2) - flow(9),
                             flow(10), flow(3), flow(11) - flow(12)};
    for (int k = 0; k < 8; ++k) change[k * cells + c] = values[k];
  }
}

// Today's infections from `agenttensor_covid_hard_progress` (its ``pairs``) into b [M] and i [M]; frees them.
void agenttensor_covid_take_pairs(void* pairs, int64_t* b, int64_t* i) { agenttensor::take_pairs(pairs, b, i); }

}  // extern "C"

// One layer's sources (hard_native.py's _SourceLayer, field for field).
struct SourceLayer {
  const void* slot;  // [N]: int64, or int32 where slot_i32 is 1
  int64_t slot_i32;
  int64_t slots;     // S: the table's slots (the groups and the non-members' slot)
  int64_t away;      // 1: the contribution is ι a (away from home), 0: ι
  Strided lever;     // p non-null: times the presence 1 − lever
  const uint8_t* on_site;  // non-null (workplaces): times on_site, and (closed.p non-null) 1 − closed
  Strided closed;
  float* out;        // [B, S] out: the totals, then (`agenttensor_covid_hard_force`) the layer's table, in place
};

// How a layer's table is made from its totals (hard_native.py's _TableLayer, field for field).
struct TableLayer {
  int64_t kind;          // kScaled: (c inv_s) T_s; kLevels: ((c inv_s) level_s) T_s; kCommunity: the mixing below
  const float* weight;   // w_l (one value); c = β w_l with β = scale · multiplier
  const float* inv;      // [S] 1 / (n_g − 1) (kScaled, kLevels)
  const float* level;    // [S] the school level's weight (kLevels)
};

// The community layer's mixing (hard_native.py's _Community): NTA c of borough k(c) of G < 8.
struct Community {
  int64_t C, G;
  const int64_t* borough;  // [C] k(c)
  const float* divisor;    // [G] agents per borough, at least 1
  const float* mixing;     // [G, G] row-normalised
  const float* size;       // [C] agents per NTA, at least 1
  const float* rho;        // the borough-wide share ρ (one value)
};

typedef void (*LayeredForce)(int64_t, int64_t, int64_t, const void*, const float*, int64_t, const void*, const float*,
                             float*, float*, int64_t);

// The arguments of `agenttensor_covid_hard_force` (hard_native.py's _ForceArgs, field for field).
struct ForceArgs {
  int64_t B, N, L, threads;
  const uint8_t *I_sym, *I_asym, *isolating;
  Strided alpha, eta;
  SourceLayer* sources;        // [L]
  const TableLayer* tables;    // [L]
  const float *scale, *multiplier;  // β = scale · multiplier (one value each)
  Community community;
  LayeredForce layered_force;  // group_kernels.cpp's agenttensor_layered_force
  const void* force_layers;    // its [L] ForceLayer array, reading the tables in `sources[l].out`
  const float* sigma;
  int64_t sigma_stride;
  float* force;                // [B, N] out
  const void* sigma_by_group;  // or null: σ as a table by age group (group_kernels.cpp's SigmaTable)
};

namespace {

enum { kScaled = 0, kLevels = 1, kCommunity = 2 };

// Bit k: whether byte k of x (little-endian: the k-th in memory) is not 0. Each byte's high bit set where any bit is
// (x's high bits, or the low seven's carry into it), then the eight high bits gathered by one multiplication. The
// serial scan of `source_totals` tested one byte per agent (one thread; the other waits): at full NYC, per-call A/B in
// hard-mode runs (AMD Zen 3), 19.95 -> 18.75 ms per `hard_force` call (8 of 8 runs faster), the same numbers.
inline uint64_t nonzero_bytes(uint64_t x) {
  const uint64_t high = (x | ((x & 0x7f7f7f7f7f7f7f7full) + 0x7f7f7f7f7f7f7f7full)) & 0x8080808080808080ull;
  return ((high >> 7) * 0x0102040810204080ull) >> 56;
}

// Every layer's group totals of the infectious agents' contributions (`model.infection_pressure`'s ``group_totals``
// per layer) in one pass: for each agent with I_sym or I_asym, in (b, n) order, ι = I_sym + α I_asym and ι a = ι (1 − η
// isolating), times each layer's presence, added at the agent's slot: the torch ops' numbers (their products in
// their order, index_add's sequential sums).
void source_totals(int64_t B, int64_t N, const uint8_t* I_sym, const uint8_t* I_asym, const uint8_t* isolating,
                   const Strided& alpha, const Strided& eta, int64_t L, const SourceLayer* layers) {
  for (int64_t l = 0; l < L; ++l) std::fill(layers[l].out, layers[l].out + B * layers[l].slots, 0.f);
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t *sym = I_sym + b * N, *asym = I_asym + b * N;
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
      const int64_t width = std::min<int64_t>(64, N - n0);
      uint64_t bits = 0;  // the block's infectious agents (8 agents' bytes at a time), then each of them in order
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
      if (width == 64) {
        for (int64_t w = 0; w < 8; ++w) {
          uint64_t s, x;
          std::memcpy(&s, sym + n0 + 8 * w, 8);
          std::memcpy(&x, asym + n0 + 8 * w, 8);
          bits |= nonzero_bytes(s | x) << (8 * w);
        }
      } else
#endif
        for (int64_t j = 0; j < width; ++j) bits |= static_cast<uint64_t>((sym[n0 + j] | asym[n0 + j]) != 0) << j;
      while (bits) {
        const int64_t n = n0 + __builtin_ctzll(bits);
        bits &= bits - 1;
        const float iota = static_cast<float>(sym[n]) + read(alpha, b, n) * static_cast<float>(asym[n]);
        const float away = iota * (1.f - read(eta, b, n) * static_cast<float>(isolating[b * N + n]));
        for (int64_t l = 0; l < L; ++l) {
          const SourceLayer& layer = layers[l];
          float value = layer.away ? away : iota;
          if (layer.lever.p) value = value * (1.f - read(layer.lever, b, n));
          if (layer.on_site) {
            float present = static_cast<float>(layer.on_site[b * N + n]);
            if (layer.closed.p) present = present * (1.f - read(layer.closed, b, n));
            value = value * present;
          }
          const int64_t slot = layer.slot_i32 ? static_cast<const int32_t*>(layer.slot)[n]
                                              : static_cast<const int64_t*>(layer.slot)[n];
          layer.out[b * layer.slots + slot] += value;
        }
      }
    }
  }
}

// One layer of `agenttensor_covid_source_totals_at` (hard_native.py's _PairLayer, field for field).
struct PairLayer {
  const void* slot;  // [N]: int64, or int32 where slot_i32 is 1
  int64_t slot_i32;
  int64_t slots;     // S
  int64_t away;      // 1: ι a, 0: ι
  Strided lever;     // p non-null: times the presence 1 − lever
  Strided on_site;   // p non-null (workplaces): times on_site, and (closed.p non-null) 1 − closed
  Strided closed;
  float* out;        // [B, S]: the totals, added into
  int64_t* index;    // [M] out: each source's flat position b · S + slot (the slot where B is 1)
  float* values;     // [M] out: each source's contribution
  // or null: [B, S] zeros, into which scale · totals goes at the positions summed at (`transmission._product_at`),
  // with scale [B | 1, S] (row stride S or 0); then the totals are set back to zeros there
  float* product;
  const float* scale;
  int64_t scale_stride;
};

// torch's sum of a row of n < 8 contiguous float32 (its scalar path, SumKernel.cpp's row_sum: four partial sums
// over the row read as (-1, 4), the remainder into the first, then the four added in order)
inline float row_sum(const float* x, int64_t n) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const int64_t whole = n / 4;
  for (int64_t i = 0; i < whole; ++i)
    for (int k = 0; k < 4; ++k) acc[k] += x[4 * i + k];
  for (int64_t i = whole * 4; i < n; ++i) acc[0] += x[i];
  for (int k = 1; k < 4; ++k) acc[0] += acc[k];
  return acc[0];
}

// The community table in place of its totals [B, C + 1] (`model.infection_pressure`'s torch ops, in their order):
// P_k = Σ_{c: k(c) = k} T_c (index_add), m_k = Σ_k' (P_k' / n_k') M_kk' (torch's row sum), then for each NTA
// (c_w · ((1 − ρ) T_c / size_c + ρ m_k(c))), the non-members' slot 0.
void community_table(const Community& m, float c_w, float* table, int64_t B) {
  const int64_t C = m.C, G = m.G;
  const float rho = *m.rho, kept = 1.f - rho;
  std::vector<float> per_borough(G), product(G), mixed(G);
  for (int64_t b = 0; b < B; ++b) {
    float* row = table + b * (C + 1);
    std::fill(per_borough.begin(), per_borough.end(), 0.f);
    for (int64_t c = 0; c < C; ++c) per_borough[m.borough[c]] += row[c];
    for (int64_t k = 0; k < G; ++k) {
      for (int64_t j = 0; j < G; ++j) product[j] = (per_borough[j] / m.divisor[j]) * m.mixing[k * G + j];
      mixed[k] = row_sum(product.data(), G);
    }
    for (int64_t c = 0; c < C; ++c) row[c] = c_w * (kept * row[c] / m.size[c] + rho * mixed[m.borough[c]]);
    row[C] = 0.f;
  }
}

}  // namespace

extern "C" {

// `model.infection_pressure` in hard mode: the layers' totals (`source_totals`), their tables in place of them, and
// the force of infection from the tables (group_kernels.cpp's layered force) in one call: the torch ops' numbers.
void agenttensor_covid_hard_force(const ForceArgs* args) {
  const ForceArgs& a = *args;
  source_totals(a.B, a.N, a.I_sym, a.I_asym, a.isolating, a.alpha, a.eta, a.L, a.sources);
  const float beta = *a.scale * *a.multiplier;
  for (int64_t l = 0; l < a.L; ++l) {
    const TableLayer& t = a.tables[l];
    float* table = a.sources[l].out;
    const int64_t S = a.sources[l].slots;
    const float c = beta * *t.weight;
    if (t.kind == kCommunity) {
      community_table(a.community, c, table, a.B);
      continue;
    }
    agenttensor::parallel(a.threads, a.B * S, int64_t(1) << 16, [&](int64_t lo, int64_t hi) {  // (elementwise)
      agenttensor::for_rows(lo, hi, S, [&](int64_t b, int64_t s0, int64_t s1) {
        float* row = table + b * S;
        for (int64_t s = s0; s < s1; ++s) {
          float scale = c * t.inv[s];
          if (t.kind == kLevels) scale = scale * t.level[s];
          row[s] = scale * row[s];
        }
      });
    });
  }
  a.layered_force(a.B, a.N, a.L, a.force_layers, a.sigma, a.sigma_stride, a.sigma_by_group, nullptr, a.force, nullptr,
                  a.threads);
}

// Gradient modes' `source_totals`: every layer's group totals of the contributions of the M infectious agents
// (b_m, n_m) (`select.nonzero_bits`' pairs, in their order), their memberships read from the packed flags [B, N]
// (`agenttensor_covid_pack`: bit 0 I_sym, 1 I_asym, 2 isolating, each exactly 0 or 1), with each source's flat
// position and contribution per layer (`index`, `values`), then added at those positions into each layer's `out`
// in the sources' order: the numbers of `model.infection_pressure`'s gathers at the sources, their products and
// index_add's sequential sums. The reads at the sources are scattered (a cache miss each): the first phase runs on
// the threads, its lines fetched ahead; the sums, a serial pass per layer (the layers on the threads), fetch their
// totals' lines ahead.
void agenttensor_covid_source_totals_at(int64_t B, int64_t N, int64_t M, const int64_t* pb, const int64_t* pn,
                                        const uint8_t* flags, const Strided* alpha, const Strided* eta, int64_t L,
                                        const PairLayer* layers, int64_t threads) {
  constexpr int64_t kAhead = agenttensor::kFetchAhead;
  auto slot_at = [](const PairLayer& layer, int64_t n) -> const void* {
    return layer.slot_i32 ? static_cast<const void*>(static_cast<const int32_t*>(layer.slot) + n)
                          : static_cast<const void*>(static_cast<const int64_t*>(layer.slot) + n);
  };
  agenttensor::parallel(threads, M, int64_t(1) << 12, [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m) {
      if (m + kAhead < hi) {
        const int64_t b = pb[m + kAhead], n = pn[m + kAhead];
        __builtin_prefetch(flags + b * N + n);
        for (int64_t l = 0; l < L; ++l) {
          const PairLayer& layer = layers[l];
          __builtin_prefetch(slot_at(layer, n));
          if (layer.lever.p) __builtin_prefetch(&layer.lever.p[b * layer.lever.sb + n * layer.lever.sn]);
          if (layer.on_site.p) __builtin_prefetch(&layer.on_site.p[b * layer.on_site.sb + n * layer.on_site.sn]);
          if (layer.closed.p) __builtin_prefetch(&layer.closed.p[b * layer.closed.sb + n * layer.closed.sn]);
        }
      }
      const int64_t b = pb[m], n = pn[m];
      const uint32_t f = flags[b * N + n];
      const float sym = static_cast<float>(f & 1), asym = static_cast<float>((f >> 1) & 1),
                  isolating = static_cast<float>((f >> 2) & 1);
      const float iota = sym + read(*alpha, b, n) * asym;
      const float away = iota * (1.f - read(*eta, b, n) * isolating);
      for (int64_t l = 0; l < L; ++l) {
        const PairLayer& layer = layers[l];
        float value = layer.away ? away : iota;
        if (layer.lever.p) value = value * (1.f - read(layer.lever, b, n));
        if (layer.on_site.p) {
          float present = read(layer.on_site, b, n);
          if (layer.closed.p) present = present * (1.f - read(layer.closed, b, n));
          value = value * present;
        }
        const int64_t slot = layer.slot_i32 ? static_cast<const int32_t*>(layer.slot)[n]
                                            : static_cast<const int64_t*>(layer.slot)[n];
        layer.index[m] = B == 1 ? slot : b * layer.slots + slot;
        layer.values[m] = value;
      }
    }
  });
  // the layers' totals are separate, each summed in its sources' order: one layer per task, on the threads as they
  // come free (`parallel_tasks`; one serial pass over the layers left the other thread idle)
  agenttensor::parallel_tasks(M >= (int64_t(1) << 12) ? threads : 1, L, [&](agenttensor::TaskQueue& queue) {
    for (int64_t l; queue.next(l);) {
      const PairLayer& layer = layers[l];
      for (int64_t m = 0; m < M; ++m) {
        if (m + kAhead < M) __builtin_prefetch(layer.out + layer.index[m + kAhead], 1);
        layer.out[layer.index[m]] += layer.values[m];
      }
      if (!layer.product) continue;
      const int64_t S = layer.slots;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t flat = layer.index[m], b = B == 1 ? 0 : pb[m];
        layer.product[flat] = layer.scale[b * layer.scale_stride + (flat - b * S)] * layer.out[flat];
      }
      for (int64_t m = 0; m < M; ++m) layer.out[layer.index[m]] = 0.f;
    }
  });
}

// The largest |exp_nonpositive(x) / exp(x) − 1| over the floats x in [lo, hi] (−87 <= lo <= hi <= 0), every
// `stride`-th one (1: all of them), exp being torch's (`exp` at `mode`, MKL sequential via `local_threads`): what
// kFastExpBound must exceed (tests; measured once over every float of the range).
double agenttensor_covid_fast_exp_error(float lo, float hi, int64_t stride, void* exp, int64_t mode,
                                        void* local_threads) {
  const agenttensor::SequentialMkl sequential(local_threads);
  uint32_t first, last;  // negative floats: larger magnitude, larger bit pattern
  std::memcpy(&first, &hi, 4);
  std::memcpy(&last, &lo, 4);
  if (hi == 0.f) first = 0x80000000u;
  double worst = 0.0;
  constexpr int64_t kChunk = 4096;
  float x[kChunk], e[kChunk];
  int64_t n = 0;
  auto flush = [&]() {
    reinterpret_cast<agenttensor::ExpFn>(exp)(n, x, e, mode);
    for (int64_t k = 0; k < n; ++k) {
      const double error = std::abs(static_cast<double>(agenttensor::exp_nonpositive(x[k])) / e[k] - 1.0);
      worst = error > worst ? error : worst;
    }
    n = 0;
  };
  for (uint64_t bits = first; bits <= last; bits += static_cast<uint64_t>(stride)) {
    const uint32_t b32 = static_cast<uint32_t>(bits);
    std::memcpy(&x[n++], &b32, 4);
    if (n == kChunk) flush();
  }
  if (n) flush();
  return worst;
}

}  // extern "C"
