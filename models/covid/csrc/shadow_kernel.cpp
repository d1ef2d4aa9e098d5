// The backward pass of the covid model's shadow flows (models/covid/shadow.py, `_Transition`) fused into one pass
// over the agents where households are runs of agents (agenttensor_covid_shadow_backward_fused), else the attack
// pass and the shadow pass with the caller's household sums between them, for CPU. Loaded by
// models/covid/shadow_native.py; shadow.py holds the same map in torch ops (the reference, and the path on other devices). Plain C, no torch headers.
//
// Every [B, N] input may be null (no gradient reached it: read as 0). Per-borough [B, G] inputs are read at the
// agent's borough; per-element constants are [B] arrays; per-age-group tables [A].

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fast_exp.h"
#include "parallel.h"
#include "runs.h"
#include "tables.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float at(const float* p, int64_t k) { return p ? p[k] : 0.f; }

// exp(x) for x <= 0 (fast_exp.h; glibc's scalar expf / powf took 3/4 of the kernel's time at full NYC)
using agenttensor::exp_nonpositive;

// log(x) for x in (0, 1]: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh((m - 1) / (m + 1)) to s^9
// (relative error ~1e-7, and exact near x = 1, where (m - 1) is exact).
inline float log_unit(float x) {
  x = x > 1e-30f ? x : 1e-30f;
  int32_t bits;
  std::memcpy(&bits, &x, 4);
  int32_t e = ((bits >> 23) & 255) - 127;
  int32_t mbits = (bits & 0x7fffff) | (127 << 23);
  float m;
  std::memcpy(&m, &mbits, 4);  // [1, 2)
  const float high = m > 1.41421356f ? 1.f : 0.f;
  m *= 1.f - 0.5f * high;
  const float t = (m - 1.f) / (m + 1.f), t2 = t * t;
  const float series = 2.f * t * (1.f + t2 * (1.f / 3 + t2 * (1.f / 5 + t2 * (1.f / 7 + t2 * (1.f / 9)))));
  return series + (static_cast<float>(e) + high) * 0.693147181f;
}

// x^n for x in (0, 1], n >= 0 (x^0 = 1, also for x = 0)
inline float power_unit(float x, float n) {
  const float p = exp_nonpositive(n * log_unit(x));
  return n == 0.f ? 1.f : p;
}

constexpr int64_t kTile = 256;

// tiles per chunk of the fused backward (agenttensor_covid_shadow_backward_fused): 16 (~4,096 agents; measured on Zen
// 3, see there), on AMD's AVX-512 CPUs (`AGENTTENSOR_ZEN`, 1 MB L2) 32: on Zen 5 at full NYC -0.7 ms per call (5 of 6
// runs; pairs of runs with the days' parity swapped -0.69, -1.28, -1.15), 64 no better again (3 of 6); 512-agent tiles
// in 16-tile chunks: no change (3 of 6).
#if defined(AGENTTENSOR_ZEN)
constexpr int64_t kChunkTiles = 32;
#else
constexpr int64_t kChunkTiles = 16;
#endif

// x^k for a whole k in [0, 2^Bits), by squaring (Bits branch-free steps: vectorises, and exact to a few ulp; a
// step whose bit is 0 multiplies by 1, so any Bits that covers k gives the same value, though not always the same
// compiled arithmetic: see attack_range)
template <int Bits>
inline float power_whole(float x, float k) {
  const int32_t bits = static_cast<int32_t>(k);
  float r = 1.f, p = x;
  for (int bit = 0; bit < Bits; ++bit) {
    r *= ((bits >> bit) & 1) ? p : 1.f;
    p *= p;
  }
  return r;
}

// The bits the tile's counts need (0 where all are 0), where every count is whole and below 64 (always with 0/1
// memberships; relaxed ones may not be), else -1
int whole_count_bits(int64_t n, const float* __restrict counts) {
  int32_t other = 0, any = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int32_t whole = static_cast<int32_t>(counts[j]);
    other |= (static_cast<float>(whole) != counts[j]) | (counts[j] >= 64.f);
    any |= whole;
  }
  if (other) return -1;
  int bits = 0;
  while (any >> bits) ++bits;
  return bits;
}

// q_sym and q_asym of a tile (see agenttensor_covid_attack) from the counts s in `chain`. Whole (Bits >= 0): s^k by
// squaring in Bits steps (households are small: most tiles need 3 of the 6), else exp(s log x): with 0/1
// memberships two logs and two exps fewer per agent.
template <int Bits>
void attack_tile(int64_t n, const float* __restrict u, const float* __restrict S, const float* __restrict g,
                 float a_sym, float a_asym, float f_mean, const float* __restrict chain, float* __restrict qs,
                 float* __restrict qa) {
  for (int64_t i = 0; i < n; ++i) {
    const float T_sym = 1.f - exp_nonpositive(u[i] * a_sym);
    const float T_asym = 1.f - exp_nonpositive(u[i] * a_asym);
    const float T_mid = T_sym * f_mean + T_asym * (1.f - f_mean);
    const float s = chain[i], sg = S[i] * g[i];
    const float x_sym = 1.f - T_sym * T_mid, x_asym = 1.f - T_asym * T_mid;
    const float p_sym = Bits >= 0 ? power_whole<(Bits > 0 ? Bits : 0)>(x_sym, s) : power_unit(x_sym, s);
    const float p_asym = Bits >= 0 ? power_whole<(Bits > 0 ? Bits : 0)>(x_asym, s) : power_unit(x_asym, s);
    qs[i] = (1.f - p_sym * (1.f - T_sym)) * sg;
    qa[i] = (1.f - p_asym * (1.f - T_asym)) * sg;
  }
}

// s_k: the other susceptible members of k's household besides k and the source (restrict parameters: it vectorises)
void chain_counts(int64_t n, const float* __restrict sums, int64_t households, const int32_t* __restrict household,
                  const float* __restrict S, float* __restrict chain) {
  agenttensor::run_lookup<1>(n, {sums}, households, household, {chain});  // (a window where households are runs)
  for (int64_t i = 0; i < n; ++i) {
    const float c = chain[i] - S[i] - 1.f;
    chain[i] = c > 0.f ? c : 0.f;
  }
}


using agenttensor::small_table_lookup;

// u = sigma ((scale[household] kept1) kept2) for n agents (kept1, kept2 null: absent), the order of the torch ops
// (`shadow.UnitHazard.dense`: products only, so the same bits)
void unit_hazards(int64_t n, const float* __restrict sigma, const float* __restrict scale, int64_t households,
                  const int32_t* __restrict household, const float* __restrict kept1, const float* __restrict kept2,
                  float* __restrict u) {
  agenttensor::run_lookup<1>(n, {scale}, households, household, {u});  // (a window where households are runs)
  if (kept1)
    for (int64_t j = 0; j < n; ++j) u[j] *= kept1[j];
  if (kept2)
    for (int64_t j = 0; j < n; ++j) u[j] *= kept2[j];
  for (int64_t j = 0; j < n; ++j) u[j] = sigma[j] * u[j];
}

using agenttensor::group_boundary;

// o[k][s] = the sum of v[k] over the run of agents of household s (K arrays), for the households whose runs lie in
// [0, n): each in agent order from 0, the additions of `group_sum`'s pass for contiguous groups (the same bits).
// With AVX-512 `agenttensor::vector_run_sums` (runs.h: two pieces of 16-lane steps), else two streams cut at household
// boundaries, advanced together (a run's sum is a chain of dependent additions: one stream at a time is bound by their
// latency; `agenttensor::RunChain`).
template <int K>
void run_sums(int64_t n, const float* const (&v)[K], const int32_t* __restrict household, float* const (&o)[K]) {
#if defined(__AVX512F__)
  agenttensor::vector_run_sums<K>(n, v, household, o);
#else
  int64_t c[3];
  const int64_t common = agenttensor::cut_at_runs<2>(household, n, c);
  agenttensor::RunChain<K> first, second;  // two chains advanced together (four were slower: `RunChain`)
  for (int64_t step = 0; step < common; ++step) {
    first.add(household[c[0] + step], v, c[0] + step, o);
    second.add(household[c[1] + step], v, c[1] + step, o);
  }
  for (int64_t i = c[0] + common; i < c[1]; ++i) first.add(household[i], v, i, o);
  for (int64_t i = c[1] + common; i < c[2]; ++i) second.add(household[i], v, i, o);
#endif
}

// q_sym, q_asym for agents [i0, i1) of one row, per tile of kTile: the counts s into a tile buffer, then the
// arithmetic with whole powers where every s of the tile is whole
void attack_range(int64_t i0, int64_t i1, const float* u, const float* S, const float* sums, int64_t households,
                  const int32_t* household, const float* g, float a_sym, float a_asym, float f_mean, float* qs,
                  float* qa) {
  float chain[kTile];
  for (int64_t t0 = i0; t0 < i1; t0 += kTile) {
    const int64_t n = std::min(kTile, i1 - t0);
    chain_counts(n, sums, households, household + t0, S + t0, chain);
    switch (whole_count_bits(n, chain)) {
#define AGENTTENSOR_ATTACK(BITS) \
  case BITS:                     \
    attack_tile<BITS>(n, u + t0, S + t0, g + t0, a_sym, a_asym, f_mean, chain, qs + t0, qa + t0); \
    break;
      AGENTTENSOR_ATTACK(0)
      case 1:  // (three steps at least: with one or two, GCC contracts the products into FMAs otherwise, 1 ulp off
      case 2:  // the six steps' numbers)
      AGENTTENSOR_ATTACK(3)
      AGENTTENSOR_ATTACK(4)
      AGENTTENSOR_ATTACK(5)
      AGENTTENSOR_ATTACK(6)
#undef AGENTTENSOR_ATTACK
      default:
        attack_tile<-1>(n, u + t0, S + t0, g + t0, a_sym, a_asym, f_mean, chain, qs + t0, qa + t0);
    }
  }
}

// today's infections new_E leave S, enter E and are counted: d new_E from the gradients of S and E and the per-borough
// infections' gradient; d λ = d new_E · S · exp(−λ) (the infection event's d new_E / d λ). Shared by `shadow_tile` and
// `hazard_span`, which must give the same bits.
inline float new_E_gradient(float gE, float gS, float infections) { return gE - gS + infections; }
inline float hazard_gradient(float g_new_E, float S, float survival) { return g_new_E * S * survival; }

// The shadow backward's arithmetic for one tile of agents, from gathered per-agent values (see
// agenttensor_covid_shadow_backward); no branches, so it vectorises. An output may be written over its own incoming
// gradient's buffer (out_E over gE, ...: `shadow_native.backward`'s ``reuse``): every input of an agent is read before
// any of its outputs is written, those pointers are not restrict, and `ivdep` tells the compiler that no agent's
// outputs are another agent's inputs.
template <bool WriteH, bool WriteNewE, bool WriteHazard>
void shadow_tile(int64_t n, const float* gS, const float* gE, const float* gIs, const float* gIa, const float* gH,
                 const float* __restrict gR, const float* __restrict gD, const float* gX, const float* gL,
                 const float* __restrict infections, const float* __restrict report,
                 const float* __restrict admissions, const float* __restrict deaths, const float* __restrict f,
                 const float* __restrict p_hosp, const float* __restrict p_death, const float* __restrict d_sym,
                 const float* __restrict d_asym, const float* __restrict from_sym, const float* __restrict from_asym,
                 const int16_t* __restrict stage_end, const uint8_t* __restrict infection_mask,
                 const float* __restrict S, const float* __restrict survival, float half_infectious,
                 float rate_E, float rate_Is, float rate_Ia, float rate_H, float* out_E, float* out_Is, float* out_Ia,
                 float* out_H, float* out_exposure0, float* out_latent0, float* __restrict out_new_E, float* out_S,
                 float* __restrict out_hazard) {
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    const float s = gS[j], e = gE[j], i_sym = gIs[j], i_asym = gIa[j], h = gH[j], r = gR[j], d = gD[j], x = gX[j],
                l = gL[j];
    // infected = exposure / half_infectious: leaves S and household_exposure, enters household_latent, counted
    const float g_infected = -s + infections[j] - x + l;
    const float exposure0 = x + g_infected * (1.f / half_infectious);
    // entering I, split by f; reported with the detection probabilities
    const float g_to_Is = i_sym + d_sym[j] * report[j], g_to_Ia = i_asym + d_asym[j] * report[j];
    const float g_enter = (g_to_Is - g_to_Ia) * f[j] + g_to_Ia;
    const float latent0 = (1.f - rate_E) * l + rate_E * g_enter;
    // the mass handed to household members (zero without a household hand-off)
    const float g_spread = (from_sym[j] - from_asym[j]) * f[j] + from_asym[j];
    // the stage memberships carry their own gradient through (after = before + today's changes), plus the flows
    const float free = stage_end[j] < 0 ? 1.f : 0.f;
    const float E0 = e + (g_enter - e + g_spread) * free * rate_E;
    const float g_to_H = h - r + admissions[j];
    const float Is0 = i_sym + (r - i_sym + p_hosp[j] * g_to_H) * free * rate_Is;
    const float Ia0 = i_asym + (r - i_asym) * free * rate_Ia;
    const float g_to_D = d - r + deaths[j];
    // today's infections new_E (`new_E_gradient`); the event's derivative w.r.t. S (its mask) added to S's
    const float g_new_E = new_E_gradient(e, s, infections[j]);
    const float S0 = s + (infection_mask[j] ? g_new_E : 0.f);
    out_exposure0[j] = exposure0;
    out_latent0[j] = latent0;
    out_E[j] = E0;
    out_Is[j] = Is0;
    out_Ia[j] = Ia0;
    if constexpr (WriteH) out_H[j] = h + (r - h + p_death[j] * g_to_D) * free * rate_H;
    if constexpr (WriteNewE) out_new_E[j] = g_new_E;
    out_S[j] = S0;
    if constexpr (WriteHazard) out_hazard[j] = hazard_gradient(g_new_E, S[j], survival[j]);
  }
}

}  // namespace

extern "C" {

struct ShadowArgs {
  int64_t B, N, G;  // batch, agents, boroughs
  int64_t threads;
  // incoming gradients [B, N] (null: none)
  const float *gS, *gE, *gIs, *gIa, *gH, *gR, *gD, *g_exposure, *g_latent;
  // per-borough incoming gradients [B, G] (null: none); g_report = reported + today's reported_recent column
  const float *g_infections, *g_report, *g_admissions, *g_deaths;
  const int32_t* borough;    // [N]
  const uint8_t* age_group;  // [N] (one byte per agent)
  const float *symptomatic, *hosp, *death;  // [A]
  const float *detect_sym, *detect_asym;  // [B]
  const float* testing;  // [B, cells] or null
  const int32_t* cell;   // [N]
  int64_t cells;
  const float* vaccinated;  // [B, N] or null
  const float* efficacy_severe;  // [B]
  const int16_t* stage_end;      // [B, N]
  // household hand-off: sums over each agent's household of q_sym g_exposure and q_asym g_exposure ([B, H]),
  // the agent's own values [B, N] and its household slot [N] (all null without g_exposure)
  float *from_sym_sums, *from_asym_sums;  // written by the fused pass, read by the other
  const float *q_sym, *q_asym;
  const int32_t* household;
  int64_t households;
  float half_infectious, rate_E, rate_Is, rate_Ia, rate_H;
  // outputs [B, N], or null where every input they depend on is null (zero: not written); each may be its incoming
  // gradient's buffer (out_E gE, out_Is gIs, out_Ia gIa, out_H gH, out_exposure0 g_exposure, out_latent0 g_latent, out_S
  // gS: see shadow_tile)
  float *out_E, *out_Is, *out_Ia, *out_H, *out_exposure0, *out_latent0, *out_new_E;
  // agenttensor_covid_shadow_backward_fused: the attack probabilities' inputs (see agenttensor_covid_attack), the
  // unit hazard as its factors u = sigma ((scale[household] kept1) kept2) (sigma, kept1, kept2 [B | 1, N] rows,
  // kept1 and kept2 null where absent; scale [B | 1, H]; each with its row stride, 0 or its length), and [B, H]
  // scratch for the household sums (susceptible, q_sym, q_asym)
  const float *sigma, *scale, *kept1, *kept2;
  int64_t sigma_stride, scale_stride, kept1_stride, kept2_stride;
  const float *susceptible, *alpha;
  float d_sym, d_asym, f_mean;
  float *susceptible_sums;
  int64_t ages;  // entries of the per-age-group tables
  // the infection event's d new_E / d S [B, N] (0/1 bytes) or null; then out_S = gS + mask · d new_E [B, N]
  const uint8_t* infection_mask;
  float* out_S;
  // [G + 1]: the first agent of each borough and N, where agents are sorted by borough (else null): a tile inside
  // one borough reads the per-borough gradients as one value
  const int64_t* borough_starts;
  // exp(−λ) [B, N] of the infection event or null; then out_hazard = d new_E · susceptible · exp(−λ) [B, N], the
  // force of infection's gradient (the event's d new_E / d λ; susceptible is then set in both kernels)
  const float* survival;
  float* out_hazard;
  // or null: flags [B, N] whose bit 3 is stage_end >= 0 (`agenttensor_covid_pack`), read where stage_end is null
  const uint8_t* timed_flags;
  // 1: susceptible is null, S is bit 4 of timed_flags (the transition saved the flags in its place)
  int64_t susceptible_bit;
  // or null: σ per age group [B | 1, ages] (row stride 0 or ages), read at age_group in place of sigma (σ = a table
  // by age: 1 byte per agent read instead of 4)
  const float* sigma_table;
  int64_t sigma_table_stride;
  // or null (agenttensor_covid_shadow_backward_fused, with out_hazard): [B, households] out, written at every slot
  // with agents (the caller zeroes the others: the non-members' slot, any empty household): each
  // household's sum of the force's household-term weights w = (d λ σ) (kept1 kept2), kept1, kept2 where not null (the
  // numbers of the layered force's backward, agenttensor/csrc/group_kernels.cpp: the same products, each household's
  // run summed in agent order from +0), so that it need not make them in a pass of its own
  float* weight_sums;
};

// q_sym = S_k [1 - (1 - T_sym)(1 - T_sym T_mid)^s] g_exposure, the same with T_asym (see attack_probabilities):
// unit [B | 1, N] (unit_stride 0: one row), susceptible [B, N], sums of susceptible per household [B, H]. The
// caller sums q_sym and q_asym per household (where households are runs of agents,
// agenttensor_covid_shadow_backward_fused does all of it in one pass instead).
void agenttensor_covid_attack(int64_t B, int64_t N, const float* unit, int64_t unit_stride, const float* susceptible,
                              const float* susceptible_sums, const int32_t* household, int64_t households,
                              const float* alpha, float d_sym, float d_asym, float f_mean, const float* g_exposure,
                              float* q_sym, float* q_asym, int64_t threads) {
  agenttensor::parallel(threads, B * N, int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
    agenttensor::for_rows(lo, hi, N, [&](int64_t b, int64_t i0, int64_t i1) {
      attack_range(i0, i1, unit + b * unit_stride, susceptible + b * N, susceptible_sums + b * households, households,
                   household, g_exposure + b * N, -d_sym, -alpha[b] * d_asym, f_mean, q_sym + b * N, q_asym + b * N);
    });
  });
}

}  // extern "C"

namespace {

// The hand-off from each agent's household members: from[j] = sums[household[j]] − q[j], for both sources (the sums
// read by `run_lookup`: a window where households are runs of agents, else gathered; restrict pointers: written
// inline, the loop ran one agent at a time)
void hand_offs(int64_t n, const float* __restrict sums_sym, const float* __restrict sums_asym, int64_t households,
               const int32_t* __restrict household, const float* __restrict q_sym, const float* __restrict q_asym,
               float* __restrict from_sym, float* __restrict from_asym) {
  agenttensor::run_lookup<2>(n, {sums_sym, sums_asym}, households, household, {from_sym, from_asym});
  for (int64_t j = 0; j < n; ++j) {
    from_sym[j] = from_sym[j] - q_sym[j];
    from_asym[j] = from_asym[j] - q_asym[j];
  }
}

// The weights of the force's household term for n agents, w = (d λ σ) (kept1 kept2) (kept1, kept2 null: absent), as the
// layered force's backward makes them (grad σ, times 1 · factor · factor_all: the same bits)
void household_weights(int64_t n, const float* __restrict d_lambda, const float* __restrict sigma,
                       const float* __restrict kept1, const float* __restrict kept2, float* __restrict w) {
  for (int64_t j = 0; j < n; ++j) w[j] = d_lambda[j] * sigma[j];
  if (kept1 && kept2)
    for (int64_t j = 0; j < n; ++j) w[j] = w[j] * (kept1[j] * kept2[j]);
  else if (kept1)
    for (int64_t j = 0; j < n; ++j) w[j] = w[j] * kept1[j];
}

// S [n] as floats 0/1 from bit 4 of the flags (`agenttensor_covid_pack`)
void unpack_susceptible(int64_t n, const uint8_t* __restrict flags, float* __restrict S) {
  for (int64_t j = 0; j < n; ++j) S[j] = static_cast<float>((flags[j] >> 4) & 1);
}

// A tile row that holds one value at every agent (kTile of them: any tile fits), refilled only when asked for another
// (compared as bits): the per-borough gradients where a tile lies in one borough, the detection probabilities without
// the testing lever. (Filled per tile, their ~5 rows took ~2 % of the shadow pass's instructions.)
struct ConstantRow {
  float values[kTile];
  uint32_t bits;
  bool filled;
};

inline const float* constant_row(ConstantRow& row, float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if (!row.filled || row.bits != bits) {
    std::fill(row.values, row.values + kTile, value);
    row.bits = bits;
    row.filled = true;
  }
  return row.values;
}

// A thread's tile buffers for `shadow_span` (value-initialise it: ``zero`` is read for every null input, never written;
// ``unwritten`` takes the null outputs, never read)
struct ShadowTile {
  float zero[kTile], infections[kTile], report[kTile], admissions[kTile], deaths[kTile], f[kTile], p_hosp[kTile],
      p_death[kTile], d_sym[kTile], d_asym[kTile], from_sym[kTile], from_asym[kTile], unwritten[kTile];
  uint8_t no_mask[kTile];
  int16_t timed[kTile];  // stage_end's sign from timed_flags (0: a countdown, −1: none)
  float susceptible[kTile];  // S from timed_flags' bit 4 (susceptible_bit)
  ConstantRow one_infections, one_report, one_admissions, one_deaths, one_d_sym, one_d_asym;
};

// The incoming [B, N] gradients in `shadow_tile`'s order (gS ... g_latent)
inline void incoming_gradients(const ShadowArgs* a, const float* (&in)[9]) {
  const float* g[9] = {a->gS, a->gE, a->gIs, a->gIa, a->gH, a->gR, a->gD, a->g_exposure, a->g_latent};
  std::copy(g, g + 9, in);
}

// The outputs in `shadow_tile`'s order (out_E ... out_hazard)
inline void outputs(const ShadowArgs* a, float* (&out)[9]) {
  float* o[9] = {a->out_E,      a->out_Is,    a->out_Ia, a->out_H, a->out_exposure0,
                 a->out_latent0, a->out_new_E, a->out_S,  a->out_hazard};
  std::copy(o, o + 9, out);
}

// A per-borough [B, G] gradient at agents [t0, t0 + n) of row b: `zero` where it is null, `one`'s row where the agents
// are all in one borough, else read at each agent's into `out`
const float* borough_values(const ShadowArgs* a, int64_t b, int64_t t0, int64_t n, const float* table,
                            float* __restrict out, ConstantRow& one, const float* zero) {
  if (!table) return zero;
  const int64_t G = a->G;
  for (int64_t g = 0; a->borough_starts && g < G; ++g)
    if (a->borough_starts[g] <= t0 && t0 + n <= a->borough_starts[g + 1]) return constant_row(one, table[b * G + g]);
  small_table_lookup(n, table + b * G, G, a->borough + t0, out);
  return out;
}

// d λ = d new_E · S · exp(−λ) for agents [t0, t0 + n) of row b (n <= kTile) into out: `shadow_tile`'s out_hazard, the
// same functions (for the fused pass, which sums its household weights before the rest of the tile's arithmetic)
void hazard_span(const ShadowArgs* a, int64_t b, int64_t t0, int64_t n, const float* __restrict S, ShadowTile& t,
                 float* __restrict out) {
  const int64_t k0 = b * a->N + t0;
  const float* __restrict infections =
      borough_values(a, b, t0, n, a->g_infections, t.infections, t.one_infections, t.zero);
  const float* __restrict gS = a->gS ? a->gS + k0 : t.zero;
  const float* __restrict gE = a->gE ? a->gE + k0 : t.zero;
  const float* __restrict survival = a->survival + k0;
  for (int64_t j = 0; j < n; ++j)
    out[j] = hazard_gradient(new_E_gradient(gE[j], gS[j], infections[j]), S[j], survival[j]);
}

// The shadow backward for agents [t0, t0 + n) of row b (n <= kTile): each agent's gathered values (per-borough
// gradients, age tables, detection, household hand-off), zeros for the incoming gradients that are null, then one
// branch-free loop the compiler vectorises. from_sym, from_asym: the hand-off from the agent's household members
// (sums[h] - q), or null (none: zeros). The outputs are written in place (one may be its incoming gradient's buffer:
// `shadow_tile` reads each agent's inputs first).
void shadow_span(const ShadowArgs* a, int64_t b, int64_t t0, int64_t n, const float* from_sym, const float* from_asym,
                 ShadowTile& t, bool hazard_written = false) {
  const int64_t N = a->N, k0 = b * N + t0;
  // one loop per gathered value, its null checks outside (no branch inside: the loops vectorise; the single loop
  // with every gather and its branches ran one agent at a time, ~half of the kernel's time at full NYC)
  const uint8_t* __restrict age = a->age_group + t0;
  auto per_borough = [&](const float* table, float* out, ConstantRow& one) {
    return borough_values(a, b, t0, n, table, out, one, t.zero);
  };
  const float* infections = per_borough(a->g_infections, t.infections, t.one_infections);
  const float* report = per_borough(a->g_report, t.report, t.one_report);
  const float* admissions = per_borough(a->g_admissions, t.admissions, t.one_admissions);
  const float* deaths = per_borough(a->g_deaths, t.deaths, t.one_deaths);
  small_table_lookup(n, a->symptomatic, a->ages, age, t.f);
  if (a->out_H) small_table_lookup(n, a->death, a->ages, age, t.p_death);  // (read for H's output only)
  small_table_lookup(n, a->hosp, a->ages, age, t.p_hosp);
  if (a->vaccinated) {
    const float efficacy = a->efficacy_severe[b];
    const float* __restrict vaccinated = a->vaccinated + k0;
    for (int64_t j = 0; j < n; ++j) t.p_hosp[j] *= 1.f - efficacy * vaccinated[j];
  }
  // detection probabilities, raised by testing
  const float ds = a->detect_sym[b], da = a->detect_asym[b];
  const float *d_sym = t.d_sym, *d_asym = t.d_asym;
  if (a->testing) {
    const float* __restrict testing = a->testing + b * a->cells;
    const int32_t* __restrict cell = a->cell + t0;
    for (int64_t j = 0; j < n; ++j) {
      const float extra = testing[cell[j]];
      t.d_sym[j] = ds + extra * (1.f - ds);
      t.d_asym[j] = da + extra * (1.f - da);
    }
  } else {
    d_sym = constant_row(t.one_d_sym, ds);
    d_asym = constant_row(t.one_d_asym, da);
  }
  if (!from_sym) from_sym = from_asym = t.zero;
  // a null output is zero for every agent (all its inputs are null): not written
  float* dst[9];
  outputs(a, dst);
  float* out[9];
  for (int q = 0; q < 9; ++q) out[q] = dst[q] ? dst[q] + k0 : t.unwritten;
  if (hazard_written) out[8] = t.unwritten;  // (`hazard_span` wrote d λ: the same values)
  const float* g[9];
  incoming_gradients(a, g);
  for (int q = 0; q < 9; ++q) g[q] = g[q] ? g[q] + k0 : t.zero;
  if (!a->stage_end)
    for (int64_t j = 0; j < n; ++j) t.timed[j] = static_cast<int16_t>(((a->timed_flags[k0 + j] >> 3) & 1) - 1);
  // S and exp(−λ) are read for d λ only: not where `hazard_span` made it
  const bool hazard = a->survival && !hazard_written;
  const float* S = t.zero;
  if (hazard && a->susceptible_bit) {
    unpack_susceptible(n, a->timed_flags + k0, t.susceptible);
    S = t.susceptible;
  } else if (hazard) {
    S = a->susceptible + k0;
  }
  // the outputs that no gradient reaches (null) or that `hazard_span` wrote are not made (a store per agent each)
  static constexpr decltype(&shadow_tile<false, false, false>) tiles[8] = {
      &shadow_tile<false, false, false>, &shadow_tile<true, false, false>, &shadow_tile<false, true, false>,
      &shadow_tile<true, true, false>,   &shadow_tile<false, false, true>, &shadow_tile<true, false, true>,
      &shadow_tile<false, true, true>,   &shadow_tile<true, true, true>};
  tiles[(dst[3] ? 1 : 0) | (dst[6] ? 2 : 0) | (dst[8] && !hazard_written ? 4 : 0)](n, g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], infections, report, admissions, deaths,
              t.f, t.p_hosp, t.p_death, d_sym, d_asym, from_sym, from_asym,
              a->stage_end ? a->stage_end + k0 : t.timed,
              a->infection_mask ? a->infection_mask + k0 : t.no_mask, S, hazard ? a->survival + k0 : t.zero, a->half_infectious, a->rate_E, a->rate_Is, a->rate_Ia,
              a->rate_H, out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8]);
}

}  // namespace

extern "C" {

// The backward pass. With the household hand-off (q_sym non-null), q and its household sums are the caller's
// (agenttensor_covid_attack, then the sums).
void agenttensor_covid_shadow_backward(const ShadowArgs* a) {
  const int64_t N = a->N;
  agenttensor::parallel(a->threads, a->B * N, int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
    ShadowTile tile{};
    float* from_sym = tile.from_sym;
    float* from_asym = tile.from_asym;
    agenttensor::for_rows(lo, hi, N, [&](int64_t b, int64_t r0, int64_t r1) {
      for (int64_t t0 = r0; t0 < r1; t0 += kTile) {
        const int64_t n = std::min(kTile, r1 - t0), k0 = b * N + t0;
        if (!a->q_sym) {
          shadow_span(a, b, t0, n, nullptr, nullptr, tile);
          continue;
        }
        hand_offs(n, a->from_sym_sums + b * a->households, a->from_asym_sums + b * a->households, a->households,
                  a->household + t0, a->q_sym + k0, a->q_asym + k0, from_sym, from_asym);
        shadow_span(a, b, t0, n, from_sym, from_asym, tile);
      }
    });
  });
}

// The same where every household is one run of agents and g_exposure is non-null: the attack probabilities, their
// household sums and the shadow arithmetic in one pass per chunk of whole households (q never leaves the cache: no
// [B, N] q_sym, q_asym written and read back, no second read of the household slots).
void agenttensor_covid_shadow_backward_fused(const ShadowArgs* a) {
  const int64_t N = a->N, H = a->households;
  // pieces of ~2^16 agents cut at household boundaries, taken by the threads as they come free (`parallel_tasks`)
  const int64_t parts = std::max<int64_t>(1, N >> 16);
  std::vector<int64_t> cut(parts + 1);
  for (int64_t p = 0; p <= parts; ++p)
    cut[p] = p == parts ? N : std::max(p ? cut[p - 1] : 0, group_boundary(a->household, N, p * (N / parts)));
  agenttensor::parallel_tasks(a->threads, a->B * parts, [&](agenttensor::TaskQueue& queue) {
    ShadowTile tile{};
    std::vector<float> us, qs, qa, from_sym, from_asym, unpacked, sigmas, weights;  // a chunk's unit hazards, q,
                                                                                    // hand-offs (and S, σ, weights)
    for (int64_t k; queue.next(k);) {
      const int64_t b = k / parts, i0 = cut[k % parts], i1 = cut[k % parts + 1];
      const float* S_row = a->susceptible_bit ? nullptr : a->susceptible + b * N;
      const float* sigma = a->sigma_table ? nullptr : a->sigma + b * a->sigma_stride;
      const float* scale = a->scale + b * a->scale_stride;
      const float* kept1 = a->kept1 ? a->kept1 + b * a->kept1_stride : nullptr;
      const float* kept2 = a->kept2 ? a->kept2 + b * a->kept2_stride : nullptr;
      const float* g = a->g_exposure + b * N;
      float* sums = a->susceptible_sums + b * H;
      float* sums_sym = a->from_sym_sums + b * H;
      float* sums_asym = a->from_asym_sums + b * H;
      const float a_sym = -a->d_sym, a_asym = -a->alpha[b] * a->d_asym;
      // chunks of whole households, about kChunkTiles tiles each (~4,096 agents: each array's stretch per chunk long
      // enough for the memory streams; the chunk's 8 buffers, 128 KB, in L2). Per-call A/B in situ at full NYC (AMD
      // EPYC Zen 3), sixteen tiles against four: -3.2 ms per call (medians 44.1 -> 41.7; faster in each of 4 pairs of
      // runs with the days' parity swapped); eight: -2.9. (512-agent tiles in 4,096-agent chunks: +0.4.)
      for (int64_t c0 = i0; c0 < i1;) {
        const int64_t c1 = group_boundary(a->household, i1, std::min(i1, c0 + kChunkTiles * kTile)), n = c1 - c0;
        if (static_cast<int64_t>(qs.size()) < n) {
          us.resize(n);
          qs.resize(n);
          qa.resize(n);
          from_sym.resize(n);
          from_asym.resize(n);
          unpacked.resize(n);
          sigmas.resize(n);
          weights.resize(n);
        }
        const int32_t* household = a->household + c0;
        const float* S = S_row ? S_row + c0 : unpacked.data();  // the chunk's S
        if (!S_row) unpack_susceptible(n, a->timed_flags + b * N + c0, unpacked.data());
        if (!sigma)
          small_table_lookup(n, a->sigma_table + b * a->sigma_table_stride, a->ages, a->age_group + c0, sigmas.data());
        unit_hazards(n, sigma ? sigma + c0 : sigmas.data(), scale, H, household, kept1 ? kept1 + c0 : nullptr,
                     kept2 ? kept2 + c0 : nullptr, us.data());
        // d λ and the household weights first, summed with S in one pass over the runs (each such pass is bound by
        // its shuffles: one pass fewer per chunk took 40.7 -> 38.9 ms per call off the transition, in situ at full NYC)
        if (a->weight_sums) {
          for (int64_t t0 = 0; t0 < n; t0 += kTile)
            hazard_span(a, b, c0 + t0, std::min(kTile, n - t0), S + t0, tile, a->out_hazard + b * N + c0 + t0);
          household_weights(n, a->out_hazard + b * N + c0, sigma ? sigma + c0 : sigmas.data(),
                            kept1 ? kept1 + c0 : nullptr, kept2 ? kept2 + c0 : nullptr, weights.data());
          run_sums<2>(n, {S, weights.data()}, household, {sums, a->weight_sums + b * H});
        } else {
          run_sums<1>(n, {S}, household, {sums});
        }
        attack_range(0, n, us.data(), S, sums, H, household, g + c0, a_sym, a_asym, a->f_mean, qs.data(), qa.data());
        run_sums<2>(n, {qs.data(), qa.data()}, household, {sums_sym, sums_asym});
        hand_offs(n, sums_sym, sums_asym, H, household, qs.data(), qa.data(), from_sym.data(), from_asym.data());
        for (int64_t t0 = 0; t0 < n; t0 += kTile)
          shadow_span(a, b, c0 + t0, std::min(kTile, n - t0), from_sym.data() + t0, from_asym.data() + t0, tile,
                      a->weight_sums != nullptr);
        c0 = c1;
      }
    }
  });
}

}  // extern "C"
