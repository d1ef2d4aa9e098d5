// The backward pass of the covid model's own contributions (models/covid/contributions.py, `_OwnContributions`)
// as one pass over the agents, for CPU. Loaded by models/covid/contributions_native.py; contributions.py holds
// the same chain rule in torch ops (the reference, and the path on other devices). Plain C, no torch headers.
//
// Each layer's incoming gradient is built here, per tile, from the probes of agenttensor.transmission.ForceTerm:
// d_l = (group[slot] − member) scale[slot] + plain[slot] (the others-sum; member [B, N], group and plain [B, S],
// each null where no gradient reached it: read as 0; all null: no gradient for the layer), so that no [B, N]
// others-sum is written and read back. Presences and the testing lever are [B | 1, N] rows (stride N or 0), or
// null (1, resp. no lever). Per-element constants are [B] arrays.
// Outputs are [B, N] or null (not wanted). The sums for d alpha and d eta are written per fixed block of agents
// (double), so that they do not depend on the number of threads; the caller adds the blocks in order.

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "bits.h"
#include "parallel.h"
#include "tables.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// agents per tile, as measured per machine (per-call A/Bs in situ at full NYC, benchmarks/ab_kernel_calls.py), the
// build's vector width standing for the machine. The AVX-512 machine (Intel, 48 KB L1): 256, its ~31 tile buffers
// (~31 KB) in L1; 512 (~62 KB) took 25.4 ms per call against 23.3 (14 of 14 runs), 128 took 27.4 against 25.0. The
// AVX2 machine (AMD EPYC Zen 3, 32 KB L1): 512, each array's stretch per tile twice as long for the memory streams;
// 35.3 -> 31.0 ms per call against 256 (8 of 8 runs; a first A/B: 42.1 -> 36.5, 6 of 6), 384 took 4.1 ms more than
// 512 (0 of 6 faster), 768 0.7 less (4 of 6), 1024 2.0 more than 256, 128 12.9 more than 256. The AVX-512 AMD machine
// (Zen 5, 48 KB L1, 1 MB L2; `AGENTTENSOR_ZEN`): 4096, each step faster in 6 of 6 runs (with the pairs' scalar loads,
// `pair_others_sum`): 512 -4.9 ms per call against 256 (the loads and 512 together -7.3, the loads alone -2.4), 1024
// -2.8 against 512, 2048 -1.5 against 1024, 4096 -0.5 and -1.3 against 2048 (two A/Bs), 8192 +0.2 against 4096 (1 of
// 6). The tile buffers are on the heap (`OwnTileBuffers`, ~0.5 MB a thread at 4096; against the stack: -0.2, 3 of 6).
// The same numbers at every tile size (the α and η sums keep their lanes: tiles are multiples of kLanes).
#if defined(__AVX512F__) && defined(AGENTTENSOR_ZEN)
constexpr int64_t kTile = 4096;
#elif defined(__AVX512F__)
constexpr int64_t kTile = 256;
#else
constexpr int64_t kTile = 512;
#endif

// A thread's tile buffers in `agenttensor_covid_own_backward` (on the heap: ~0.5 MB at 4096 agents a tile)
struct OwnTileBuffers {
  float zero[kTile], scratch[6][kTile], sums[3][kTile], d[4][kTile], alpha_term[kTile], eta_term[kTile],
      unpacked[3][kTile], gs[kTile], weights[4][kTile], one[kTile], sigmas[kTile], presence_terms[3][kTile];
  int32_t positions[kTile];
};

// An optional [B | 1, N] row's tile: its values, or a constant tile (zeros, ones: filled once per thread) where it is
// null (the arithmetic below then runs as one branch-free loop the compiler vectorises; the constants stay in cache).
inline const float* tile_or(const float* p, int64_t i0, const float* constant) { return p ? p + i0 : constant; }

// The α and η sums of a block: kLanes running sums in double (agent j into lane j % kLanes, tiles are multiples of
// kLanes), added in lane order at the end: a fixed order, whatever the threads, and independent chains (one serial
// chain of dependent adds per agent cost ~8 cycles per agent).
constexpr int64_t kLanes = 8;

inline void add_lanes(double* __restrict lanes, const float* __restrict terms, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += terms[j + l];
  for (int64_t l = 0; j < n; ++j, ++l) lanes[l] += terms[j];
}

inline double lanes_total(const double* lanes) {
  double total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// One tile's outputs and its per-agent α and η terms (summed in order by the caller); the presences' outputs only
// where `Presences`, the terms only where `Terms` (else those pointers are not written: five stores per agent fewer
// where a run wants neither, as the benchmark's loss).
template <bool Presences, bool Terms, bool Accumulate, bool Packed>
void own_tile(int64_t n, float alpha, float eta, float detect0, const float* __restrict dh, const float* __restrict ds,
              const float* __restrict dw, const float* __restrict dc, const float* __restrict ps,
              const float* __restrict pw, const float* __restrict pc, const float* __restrict I_sym,
              const float* __restrict I_asym, const float* __restrict isolating,
              const float* __restrict isolate_prob, const int16_t* __restrict stage_end,
              const float* __restrict testing, float* o_sym, float* o_asym,
              float* __restrict o_iso, float* __restrict o_ps, float* __restrict o_pw, float* __restrict o_pc,
              float* __restrict alpha_term, float* __restrict eta_term, const float* acc_sym, const float* acc_asym,
              const uint8_t* __restrict flags) {
  // `Accumulate`: o_sym = acc_sym + the contribution, o_asym likewise, each o over its acc or not (an agent's acc is
  // read before its o is written; `ivdep`: no agent's output is another's input)
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    // every load unconditional (selects, not branches: the loop vectorises). `Packed`: I_sym, I_asym, isolating and the
    // countdown's sign from the agent's flags (`agenttensor_covid_pack`: bits 0-3), read here, not unpacked into tiles
    const float household = dh[j], prob = isolate_prob[j];
    uint8_t f = 0;
    float I_sym_j, I_asym_j, isolating_j;
    if constexpr (Packed) {
      f = flags[j];
      I_sym_j = static_cast<float>(f & 1), I_asym_j = static_cast<float>((f >> 1) & 1);
      isolating_j = static_cast<float>((f >> 2) & 1);
    } else {
      I_sym_j = I_sym[j], I_asym_j = I_asym[j], isolating_j = isolating[j];
    }
    // D = Σ_l d_l p_l
    const float D = ds[j] * ps[j] + dw[j] * pw[j] + dc[j] * pc[j];
    bool real;
    if constexpr (Packed)
      real = ((f >> 3) & 1) != 0;
    else
      real = stage_end[j] >= 0;
    const float kept = 1.f - eta * isolating_j;
    const float d_iota = (real ? household : 0.f) + D * kept;
    const float iota = I_sym_j + alpha * I_asym_j;
    // expected isolation of untaken infections: −η free isolate_prob D
    const float expected = real ? 0.f : prob * D * -eta;
    const float detect = detect0 + testing[j] * (1.f - detect0);
    const float sym = d_iota + expected, asym = d_iota * alpha + expected * (alpha * detect);
    if constexpr (Accumulate) {
      const float before_sym = acc_sym[j], before_asym = acc_asym[j];
      o_sym[j] = before_sym + sym;
      o_asym[j] = before_asym + asym;
    } else {
      o_sym[j] = sym;
      o_asym[j] = asym;
    }
    const float iota_D = iota * D;
    o_iso[j] = iota_D * -eta;
    if constexpr (Presences) {
      const float away = iota * kept;
      o_ps[j] = ds[j] * away;
      o_pw[j] = dw[j] * away;
      o_pc[j] = dc[j] * away;
    }
    if constexpr (Terms) {
      alpha_term[j] = I_asym_j * d_iota;
      eta_term[j] = iota_D * isolating_j;
    }
  }
}

// own_tile's 16 instantiations, indexed by Presences | Terms << 1 | Accumulate << 2 | Packed << 3
template <size_t... I>
constexpr auto own_variants_of(std::index_sequence<I...>) {
  return std::array<decltype(&own_tile<false, false, false, false>), sizeof...(I)>{
      &own_tile<(I & 1) != 0, (I & 2) != 0, (I & 4) != 0, (I & 8) != 0>...};
}
inline const auto& own_variants() {
  static constexpr auto variants = own_variants_of(std::make_index_sequence<16>());
  return variants;
}

// The packed fields of a tile (`agenttensor_covid_pack`) as floats 0/1, into three tile buffers (stay in L1)
void unpack(int64_t n, const uint8_t* __restrict flags, float (*__restrict out)[kTile]) {
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t f = flags[j];
    out[0][j] = static_cast<float>(f & 1);
    out[1][j] = static_cast<float>((f >> 1) & 1);
    out[2][j] = static_cast<float>((f >> 2) & 1);
  }
}

// `agenttensor_covid_pack` for n agents: whether any value is other than +0.0 or 1.0. Restrict pointers, no
// branch, 32-bit lanes: it vectorises (as a lambda over the closure's pointers it ran one agent at a time, 21 ms
// at full NYC).
// Timed: bit 3 is stage_end[k] >= 0 (a running countdown).
template <bool Timed, bool Susceptible>
int32_t pack_range(int64_t n, const float* __restrict I_sym, const float* __restrict I_asym,
                   const float* __restrict isolating, const int16_t* __restrict stage_end,
                   const float* __restrict S, uint8_t* __restrict flags) {
  constexpr uint32_t kOne = 0x3f800000u;  // 1.0f
  uint32_t other = 0;
  for (int64_t k = 0; k < n; ++k) {
    uint32_t s, a, i, u = 0;
    std::memcpy(&s, I_sym + k, 4);
    std::memcpy(&a, I_asym + k, 4);
    std::memcpy(&i, isolating + k, 4);
    if (Susceptible) std::memcpy(&u, S + k, 4);
    const uint32_t one_s = s == kOne, one_a = a == kOne, one_i = i == kOne, one_u = u == kOne;
    other |= (s != 0u && !one_s) | (a != 0u && !one_a) | (i != 0u && !one_i) | (u != 0u && !one_u);
    const uint32_t timed = Timed ? static_cast<uint32_t>(stage_end[k] >= 0) : 0u;
    flags[k] = static_cast<uint8_t>(one_s | one_a << 1 | one_i << 2 | timed << 3 | one_u << 4);
  }
  return other != 0;
}

}  // namespace

extern "C" {

// One layer's probes' derivatives (see the top of the file).
struct OthersSumArgs {
  const float *member, *group, *plain;  // [B, N], [B, S], [B, S] or null
  // member as the force's weight's parts (`agenttensor.transmission.WeightParts`), where `weighted` is 1 (member is
  // then null): member = (grad σ) (presence ((1 factor) factor_all)) with OwnArgs' grad and σ, each of these
  // [B | 1, N] rows (stride N or 0) or null (1): the force's native pass's arithmetic (the same bits)
  int64_t weighted;
  const float *w_presence, *w_factor, *w_factor_all;
  int64_t w_presence_stride, w_factor_stride, w_factor_all_stride;
  const int32_t* slot;                  // [N]
  const float* scale;                   // [B | 1, S]
  int64_t scale_stride, groups;         // 0 or S; S
  int64_t runs;                         // 1: every group is one run of agents (a tile with one slot at both ends is
                                        // inside one group: a neighbourhood of agents sorted by neighbourhood)
  int64_t paired;                       // 1: read group and scale as interleaved pairs (see pair_others_sum)
};

}  // extern "C"

namespace {

// out[j] = (group[k] − member[j]) · scale[k], k = slot[j], for n agents, with each group's (group, scale) values
// interleaved in `pairs` [2 S]: one 64-bit gather per agent fetches both from one cache line, where two 32-bit
// gathers touched two (a large layer's slots, workplaces, are random: its tables miss the cache). With AVX2 (no
// AVX-512, e.g. AMD Zen 3) one 64-bit load per agent, 8 agents' pairs de-interleaved by permutes: the compiler's
// scalar loop made two 32-bit loads per agent, and AVX2 hardware gathers were slower still (full NYC's slots, one
// thread, 256-agent tiles: workplaces 11.5 -> 8.6 ms a pass, gathers 10.7; schools 8.1 -> 5.7, gathers 10.0). So too
// on AMD's AVX-512 CPUs (`AGENTTENSOR_ZEN`; Zen 5, full NYC, 256-agent tiles: the own contributions' backward 38.3 ->
// 36.2 ms per call with these loads in place of the 512-bit gathers, 6 of 6 runs). The same numbers.
void pair_others_sum(int64_t n, const int32_t* __restrict slot, const float* __restrict pairs,
                     const float* __restrict member, float* __restrict out) {
  int64_t j = 0;
#if defined(__AVX512F__) && !defined(AGENTTENSOR_ZEN)
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const double* table = reinterpret_cast<const double*>(pairs);
  for (; j + 16 <= n; j += 16) {
    const __m512i k = _mm512_loadu_si512(slot + j);
    const __m512 lo = _mm512_castpd_ps(_mm512_i32gather_pd(_mm512_castsi512_si256(k), table, 8));
    const __m512 hi = _mm512_castpd_ps(_mm512_i32gather_pd(_mm512_extracti64x4_epi64(k, 1), table, 8));
    const __m512 group = _mm512_permutex2var_ps(lo, even, hi), scale = _mm512_permutex2var_ps(lo, odd, hi);
    _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_sub_ps(group, _mm512_loadu_ps(member + j)), scale));
  }
#elif defined(__AVX2__)
  const double* table = reinterpret_cast<const double*>(pairs);
  const __m256i apart = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  // (g s g s g s g s) -> (g g g g s s s s)
  for (; j + 8 <= n; j += 8) {
    const int32_t* k = slot + j;
    const __m128d p01 = _mm_loadh_pd(_mm_load_sd(table + k[0]), table + k[1]);
    const __m128d p23 = _mm_loadh_pd(_mm_load_sd(table + k[2]), table + k[3]);
    const __m128d p45 = _mm_loadh_pd(_mm_load_sd(table + k[4]), table + k[5]);
    const __m128d p67 = _mm_loadh_pd(_mm_load_sd(table + k[6]), table + k[7]);
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_castpd_ps(_mm256_set_m128d(p23, p01)), apart);
    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_castpd_ps(_mm256_set_m128d(p67, p45)), apart);
    const __m256 group = _mm256_permute2f128_ps(lo, hi, 0x20), scale = _mm256_permute2f128_ps(lo, hi, 0x31);
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_sub_ps(group, _mm256_loadu_ps(member + j)), scale));
  }
#endif
  for (; j < n; ++j) out[j] = (pairs[2 * slot[j]] - member[j]) * pairs[2 * slot[j] + 1];
}

// The layer's d_l for agents [i0, i0 + n) of row b into `out` (zeros where no gradient reached the layer); `pairs`:
// the layer's interleaved (group, scale) values [B, 2 S] or null (see pair_others_sum); `weights`: the tile's member
// values where the layer's are `weighted` (see `weights_tile`), else null. Compiled with -ffp-contract=off: the same
// arithmetic as the torch ops (`others_sum_derivative`), no fused multiply-add.
const float* others_sum_tile(const OthersSumArgs& l, int64_t b, int64_t N, int64_t i0, int64_t n, float* __restrict out,
                             const float* pairs = nullptr, const float* weights = nullptr) {
  const float* __restrict member = weights ? weights : l.member ? l.member + b * N + i0 : nullptr;
  const bool any = member || l.group || l.plain;
  if (!any) {
    std::fill(out, out + n, 0.f);
    return out;
  }
  const int32_t* __restrict slot = l.slot + i0;
  const float* __restrict scale = l.scale + b * l.scale_stride;
  // a tile inside one group: its values read once, not gathered. Asked only where the layer's groups are longer than a
  // tile on average (a neighbourhood's agents, not a household's): the read of the tile's last slot, ahead of the rest,
  // missed the cache for every tile of the households' (the general path gives the same numbers).
  if (l.runs && n > 0 && N > n * l.groups && slot[0] == slot[n - 1]) {
    const int32_t g = slot[0];
    const float sv = scale[g];
    if (l.group) {
      const float gv = l.group[b * l.groups + g];
      if (member)
        for (int64_t j = 0; j < n; ++j) out[j] = (gv - member[j]) * sv;
      else
        std::fill(out, out + n, (gv - 0.f) * sv);
    } else if (member) {
      for (int64_t j = 0; j < n; ++j) out[j] = -(sv * member[j]);
    } else {
      std::fill(out, out + n, 0.f);
    }
    if (l.plain) {
      const float pv = l.plain[b * l.groups + g];
      for (int64_t j = 0; j < n; ++j) out[j] = out[j] + pv;
    }
    return out;
  }
  if (l.group) {
    const float* __restrict group = l.group + b * l.groups;
    if (member && pairs) {
      pair_others_sum(n, slot, pairs + b * 2 * l.groups, member, out);
    } else if (member && l.runs) {  // groups as runs of agents (households): the values read by `run_lookup`
      float values[2][kTile];
      agenttensor::run_lookup<2>(n, {group, scale}, l.groups, slot, {values[0], values[1]});
      for (int64_t j = 0; j < n; ++j) out[j] = (values[0][j] - member[j]) * values[1][j];
    } else if (member)
      for (int64_t j = 0; j < n; ++j) out[j] = (group[slot[j]] - member[j]) * scale[slot[j]];
    else
      for (int64_t j = 0; j < n; ++j) out[j] = (group[slot[j]] - 0.f) * scale[slot[j]];
  } else if (member) {
    for (int64_t j = 0; j < n; ++j) out[j] = -(scale[slot[j]] * member[j]);
  } else {
    std::fill(out, out + n, 0.f);
  }
  if (l.plain) {
    const float* __restrict plain = l.plain + b * l.groups;
    for (int64_t j = 0; j < n; ++j) out[j] = out[j] + plain[slot[j]];
  }
  return out;
}

// The positions in a tile of its infectious agents (flags' bits 0 or 1 set, else I_sym or I_asym not 0, NaN counted
// as not 0, as `!=` does), in order, into `at` [n]; returns how many. With AVX2 32 agents' flags tested at a time and
// their positions popped from one mask: one test per 32 agents for all of the tile's in-place adds below, where the
// adds tested and masked 8 agents at a time, each add on its own (four passes of mispredicted branches a tile).
int64_t infectious_positions(int64_t n, const uint8_t* __restrict flags, const float* __restrict I_sym,
                             const float* __restrict I_asym, int32_t* __restrict at) {
  int64_t m = 0, j = 0;
  if (flags) {
#if defined(__AVX2__)
    for (; j + 32 <= n; j += 32)
      for (uint32_t mask = agenttensor::flagged32(flags + j, 3); mask; mask &= mask - 1)
        at[m++] = static_cast<int32_t>(j + __builtin_ctz(mask));
#endif
    for (; j < n; ++j) {
      at[m] = static_cast<int32_t>(j);
      m += (flags[j] & 3) != 0;
    }
    return m;
  }
  for (; j < n; ++j) {
    at[m] = static_cast<int32_t>(j);
    m += I_sym[j] != 0.f || I_asym[j] != 0.f;
  }
  return m;
}

// o[k] += terms[k] at the m positions `at` (the tile's infectious agents: the only ones whose term can be other than 0),
// in place: only their lines of the [B, N] row are read and written
void add_at(int64_t m, const int32_t* __restrict at, const float* __restrict terms, float* __restrict o) {
  for (int64_t k = 0; k < m; ++k) o[at[k]] = o[at[k]] + terms[at[k]];
}

// A `weighted` layer's member values for a tile of n agents: gs (grad σ) (presence ((1 factor) factor_all)), with
// ones where a part is null (exact: the force's native pass multiplies by the parts that exist, in this order).
void weights_tile(int64_t n, const float* __restrict gs, const float* __restrict p, const float* __restrict f,
                  const float* __restrict a, float* __restrict out) {
  for (int64_t j = 0; j < n; ++j) {
    const float fa = (1.f * f[j]) * a[j];
    out[j] = gs[j] * (p[j] * fa);
  }
}

}  // namespace

extern "C" {

struct OwnArgs {
  int64_t B, N, threads, block;
  OthersSumArgs household, school, workplace, community;
  const float *p_school, *p_workplace, *p_community;
  int64_t p_school_stride, p_workplace_stride, p_community_stride;
  const float *I_sym, *I_asym, *isolating, *isolate_prob;
  const int16_t* stage_end;
  const float* testing;
  int64_t testing_stride;
  const float *alpha, *eta, *detect_asym;  // [B]
  float *out_I_sym, *out_I_asym, *out_isolating, *out_p_school, *out_p_workplace, *out_p_community;
  double *alpha_sums, *eta_sums;  // [B * blocks] or null
  // derivatives already reaching I_sym, I_asym, isolating (the node's pass-through) [B, N] or null: the outputs are
  // these plus the contributions' (an output may be the same buffer: added in place)
  const float *acc_I_sym, *acc_I_asym, *acc_isolating;
  // or null: I_sym, I_asym and isolating packed into one byte per agent (bits 0, 1, 2; `agenttensor_covid_pack`),
  // read in place of the three float fields
  const uint8_t* flags;
  // 1: the flags' bit 3 is stage_end >= 0, read in place of stage_end (null then)
  int64_t flags_timed;
  // the `weighted` layers' grad [B, N] and σ [B | 1, N] (row stride N or 0), or null where none is
  const float *w_grad, *w_sigma;
  int64_t w_sigma_stride;
  // or null: σ as a table by group [B | 1, size] (row stride 0 or size) read at w_sigma_index [N] (bytes), in place
  // of w_sigma (`agenttensor._group_kernels.by_group`)
  const float* w_sigma_table;
  int64_t w_sigma_table_stride, w_sigma_table_size;
  const uint8_t* w_sigma_index;
  // derivatives already reaching the presences (the force's, handed over: `ForceTerm.weight_handoff`) [B, N] or null:
  // the presence's output is that plus the contributions', added in place where it is the same buffer
  const float *acc_p_school, *acc_p_workplace, *acc_p_community;
};

// flags[k] = I_sym[k] | I_asym[k] << 1 | isolating[k] << 2 for n agents whose values are each exactly +0.0 or 1.0
// (compared as bit patterns, so that unpacking gives the same bits), | (stage_end[k] >= 0) << 3 where stage_end is
// given, | S[k] << 4 where S is; returns the number of chunks with any other value (0: all packed; else the caller
// keeps the float fields). One pass, one byte written per agent instead of twelve copied (and two: the countdown's
// sign; four: S).
int64_t agenttensor_covid_pack(const float* I_sym, const float* I_asym, const float* isolating,
                               const int16_t* stage_end, const float* S, uint8_t* flags, int64_t n, int64_t threads) {
  constexpr int64_t kChunk = int64_t(1) << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<int64_t> bad(chunks, 0);
  agenttensor::parallel(threads, chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t k0 = c * kChunk;
      const int64_t m = std::min(kChunk, n - k0);
      auto range = [&](auto timed, auto susceptible) {
        return pack_range<decltype(timed)::value, decltype(susceptible)::value>(
            m, I_sym + k0, I_asym + k0, isolating + k0, stage_end ? stage_end + k0 : nullptr, S ? S + k0 : nullptr,
            flags + k0);
      };
      using yes = std::true_type;
      using no = std::false_type;
      bad[c] = stage_end ? (S ? range(yes(), yes()) : range(yes(), no())) : (S ? range(no(), yes()) : range(no(), no()));
    }
  });
  int64_t total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += bad[c];
  return total;
}

// `contributions_native.carry` in one pass: the flags `live` [B, N] updated at the M exiting agents (flat positions
// `at`) to the fields' values after the day's transition (I_sym | I_asym << 1 | isolating << 2, | (stage_end >= 0)
// << 3 where stage_end is given, | (S == 1) << 4 where S is), then at the K infected agents (`infected`) bit 3 set
// (stage_end given: their countdown began) and bit 4 cleared (S given: they left S). Returns 1, writing nothing, where
// a field's value at an exiting agent is not exactly 0 or 1 (the caller then stops carrying the flags).
// The exiting and the infected agents are each distinct (a day's pairs): the threads split them.
int64_t agenttensor_covid_carry(uint8_t* live, const int64_t* at, int64_t M, const float* I_sym, const float* I_asym,
                                const float* isolating, const int16_t* stage_end, const float* S,
                                const int64_t* infected, int64_t K, int64_t threads) {
  constexpr int64_t kGrain = int64_t(1) << 14, kAhead = agenttensor::kFetchAhead;
  // the agents' fields are read once, scattered (a cache miss each: their lines fetched kAhead agents ahead), into
  // each agent's byte, written to `live` once no field was found other than 0 or 1
  static thread_local std::vector<uint8_t> scratch;
  if (static_cast<int64_t>(scratch.size()) < M) scratch.resize(M);
  uint8_t* bytes = scratch.data();
  int64_t other = 0;
  agenttensor::parallel(threads, M, kGrain, [&](int64_t lo, int64_t hi) {
    int64_t found = 0;
    for (int64_t m = lo; m < hi; ++m) {
      if (m + kAhead < hi) {
        const int64_t ahead = at[m + kAhead];
        for (const float* x : {I_sym, I_asym, isolating, S})
          if (x) __builtin_prefetch(x + ahead);
        if (stage_end) __builtin_prefetch(stage_end + ahead);
      }
      const int64_t k = at[m];
      for (const float* x : {I_sym, I_asym, isolating}) found |= x[k] != 0.f && x[k] != 1.f;
      int bits = static_cast<int>(I_sym[k]) | static_cast<int>(I_asym[k]) << 1 | static_cast<int>(isolating[k]) << 2;
      if (stage_end) bits |= (stage_end[k] >= 0) << 3;
      if (S) bits |= (S[k] == 1.f) << 4;
      bytes[m] = static_cast<uint8_t>(bits);
    }
    if (found) {
#pragma omp atomic
      other += found;
    }
  });
  if (other) return 1;
  agenttensor::parallel(threads, M, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m) {
      if (m + kAhead < hi) __builtin_prefetch(live + at[m + kAhead], 1);
      live[at[m]] = bytes[m];
    }
  });
  agenttensor::parallel(threads, K, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m) {
      uint8_t& f = live[infected[m]];
      if (stage_end) f = static_cast<uint8_t>(f | 8);
      if (S) f = static_cast<uint8_t>(f & ~16);
    }
  });
  return 0;
}

void agenttensor_covid_own_backward(const OwnArgs* a) {
  const int64_t N = a->N, block = a->block, blocks = (N + block - 1) / block;
  // the group sums and scales of the layers flagged `paired` interleaved (see pair_others_sum)
  const OthersSumArgs* layers[4] = {&a->household, &a->school, &a->workplace, &a->community};
  std::vector<float> pairs[4];
  for (int q = 0; q < 4; ++q) {
    const OthersSumArgs& l = *layers[q];
    if (!l.paired || !l.group || !(l.member || l.weighted)) continue;
    pairs[q].resize(2 * a->B * l.groups);
    for (int64_t b = 0; b < a->B; ++b)
      for (int64_t g = 0; g < l.groups; ++g) {
        pairs[q][2 * (b * l.groups + g)] = l.group[b * l.groups + g];
        pairs[q][2 * (b * l.groups + g) + 1] = l.scale[b * l.scale_stride + g];
      }
  }
  auto paired = [&](int q) -> const float* { return pairs[q].empty() ? nullptr : pairs[q].data(); };
  const bool presences = a->out_p_school || a->out_p_workplace || a->out_p_community;
  const bool terms = a->alpha_sums || a->eta_sums;
  // I_sym's and I_asym's derivatives added to the ones already there in the tile's pass (not a tile buffer added after)
  const bool accumulate = a->acc_I_sym && a->acc_I_asym;
  // the flags read in the tile's pass where they carry the countdown's sign too (else unpacked into tile buffers)
  const bool packed = a->flags && !a->stage_end;
  const auto own = own_variants()[(presences ? 1 : 0) | (terms ? 2 : 0) | (accumulate ? 4 : 0) | (packed ? 8 : 0)];
  // the blocks taken by the threads as they come free (`parallel_tasks`: equal halves left one thread waiting)
  agenttensor::parallel_tasks(a->threads, a->B * blocks, [&](agenttensor::TaskQueue& queue) {
    // tiles: optional inputs (zeros or ones where null; the testing lever's detection: 0 extra), unwanted outputs
    // (`new`, not make_unique: the rows need no zero fill)
    const std::unique_ptr<OwnTileBuffers> buffers(new OwnTileBuffers);
    OwnTileBuffers& tiles = *buffers;
    std::fill(tiles.one, tiles.one + kTile, 1.f);  // a weighted layer's missing parts, a missing presence
    std::fill(tiles.zero, tiles.zero + kTile, 0.f);  // no testing lever: no extra detection
    for (int64_t job; queue.next(job);) {
      const int64_t b = job / blocks, i0 = (job % blocks) * block, i1 = i0 + block < N ? i0 + block : N;
      const float alpha = a->alpha[b], eta = a->eta[b], detect0 = a->detect_asym[b];
      const float* ps = a->p_school ? a->p_school + b * a->p_school_stride : nullptr;
      const float* pw = a->p_workplace ? a->p_workplace + b * a->p_workplace_stride : nullptr;
      const float* pc = a->p_community ? a->p_community + b * a->p_community_stride : nullptr;
      const float* testing = a->testing ? a->testing + b * a->testing_stride : nullptr;
      double alpha_sum[kLanes] = {}, eta_sum[kLanes] = {};
      for (int64_t t0 = i0; t0 < i1; t0 += kTile) {
        const int64_t n = std::min(kTile, i1 - t0), k0 = b * N + t0;
        auto out = [&](float* p, int slot) { return p ? p + k0 : tiles.scratch[slot]; };
        // a field with a derivative already: the contributions' into a tile buffer, then added (in place or not);
        // every unwanted output into a scratch row of its own (they are restrict pointers)
        auto field = [&](float* p, const float* acc, int slot) { return acc ? tiles.sums[slot] : out(p, slot); };
        auto presence = [&](float* p, const float* acc, int q) {
          return acc ? tiles.presence_terms[q] : out(p, 3 + q);
        };
        const float *I_sym = a->I_sym + k0, *I_asym = a->I_asym + k0, *isolating = a->isolating + k0;
        if (a->flags && !packed) {
          unpack(n, a->flags + k0, tiles.unpacked);
          I_sym = tiles.unpacked[0], I_asym = tiles.unpacked[1], isolating = tiles.unpacked[2];
        }
        // (without stage_end the flags carry its sign: `packed`, and own_tile reads them)
        const int16_t* stage_end = a->stage_end ? a->stage_end + k0 : nullptr;
        // the weighted layers' member values: gs = grad σ once per tile, then each layer's product
        if (a->w_grad) {
          const float* sigma = tiles.sigmas;
          if (a->w_sigma_table)
            agenttensor::small_table_lookup(n, a->w_sigma_table + b * a->w_sigma_table_stride, a->w_sigma_table_size,
                                            a->w_sigma_index + t0, tiles.sigmas);
          else
            sigma = a->w_sigma + b * a->w_sigma_stride + t0;
          for (int64_t j = 0; j < n; ++j) tiles.gs[j] = a->w_grad[k0 + j] * sigma[j];
        }
        auto member = [&](int q) -> const float* {
          const OthersSumArgs& l = *layers[q];
          if (!l.weighted) return nullptr;
          // no parts: gs (1 ((1 1) 1)) is gs, bit for bit; a presence only: gs (p ((1 1) 1)) is gs p
          if (!l.w_presence && !l.w_factor && !l.w_factor_all) return tiles.gs;
          if (!l.w_factor && !l.w_factor_all) {
            const float* __restrict p = l.w_presence + b * l.w_presence_stride + t0;
            float* __restrict w = tiles.weights[q];
            for (int64_t j = 0; j < n; ++j) w[j] = tiles.gs[j] * p[j];
            return w;
          }
          auto part = [&](const float* x, int64_t stride) { return x ? x + b * stride + t0 : tiles.one; };
          weights_tile(n, tiles.gs, part(l.w_presence, l.w_presence_stride), part(l.w_factor, l.w_factor_stride),
                       part(l.w_factor_all, l.w_factor_all_stride), tiles.weights[q]);
          return tiles.weights[q];
        };
        own(n, alpha, eta, detect0, others_sum_tile(a->household, b, N, t0, n, tiles.d[0], paired(0), member(0)),
                 others_sum_tile(a->school, b, N, t0, n, tiles.d[1], paired(1), member(1)),
                 others_sum_tile(a->workplace, b, N, t0, n, tiles.d[2], paired(2), member(2)),
                 others_sum_tile(a->community, b, N, t0, n, tiles.d[3], paired(3), member(3)),
                 tile_or(ps, t0, tiles.one), tile_or(pw, t0, tiles.one), tile_or(pc, t0, tiles.one),
                 I_sym, I_asym, isolating,
                 a->isolate_prob + k0, stage_end,
                 tile_or(testing, t0, tiles.zero),
                 accumulate ? a->out_I_sym + k0 : field(a->out_I_sym, a->acc_I_sym, 0),
                 accumulate ? a->out_I_asym + k0 : field(a->out_I_asym, a->acc_I_asym, 1),
                 field(a->out_isolating, a->acc_isolating, 2), presence(a->out_p_school, a->acc_p_school, 0),
                 presence(a->out_p_workplace, a->acc_p_workplace, 1),
                 presence(a->out_p_community, a->acc_p_community, 2), tiles.alpha_term, tiles.eta_term,
                 accumulate ? a->acc_I_sym + k0 : nullptr, accumulate ? a->acc_I_asym + k0 : nullptr,
                 packed ? a->flags + k0 : nullptr);
        const float* accs[3] = {a->acc_I_sym, a->acc_I_asym, a->acc_isolating};
        // the tile's infectious agents' positions (into `tiles.positions`), found once for every in-place add below:
        // their count (found < 0: not yet)
        int64_t found = -1;
        auto infectious = [&]() {
          if (found < 0)
            found = infectious_positions(n, a->flags ? a->flags + k0 : nullptr, I_sym, I_asym, tiles.positions);
          return found;
        };
        float* outs[3] = {a->out_I_sym, a->out_I_asym, a->out_isolating};
        for (int q = accumulate ? 2 : 0; q < 3; ++q) {
          if (!accs[q]) continue;
          const float* acc = accs[q] + k0;  // may be outs[q]: the same element is read, then written
          float* o = outs[q] + k0;
          if (q == 2 && acc == o) {  // isolating's, added in place: its contribution ι D (−η) is 0 where ι is, at all
            // but the infectious agents (~0.1 %): those only (acc + 0 is acc; where D is not finite the torch ops
            // would give NaN, 0 · ∞, for an agent without infectiousness). No [B, N] read and written back.
            add_at(infectious(), tiles.positions, tiles.sums[q], o);
            continue;
          }
          for (int64_t j = 0; j < n; ++j) o[j] = acc[j] + tiles.sums[q][j];
        }
        // the presences' with the force's derivative: d_l ι (1 − η isolating) is 0 where ι is, at all but the
        // infectious agents: those only where it is added in place (as isolating's above)
        const float* presence_accs[3] = {a->acc_p_school, a->acc_p_workplace, a->acc_p_community};
        float* presence_outs[3] = {a->out_p_school, a->out_p_workplace, a->out_p_community};
        for (int q = 0; q < 3; ++q) {
          if (!presence_accs[q]) continue;
          const float* acc = presence_accs[q] + k0;
          float* o = presence_outs[q] + k0;
          if (acc == o) {
            add_at(infectious(), tiles.positions, tiles.presence_terms[q], o);
            continue;
          }
          for (int64_t j = 0; j < n; ++j) o[j] = acc[j] + tiles.presence_terms[q][j];
        }
        if (a->alpha_sums) add_lanes(alpha_sum, tiles.alpha_term, n);
        if (a->eta_sums) add_lanes(eta_sum, tiles.eta_term, n);
      }
      if (a->alpha_sums) a->alpha_sums[job] = lanes_total(alpha_sum);
      if (a->eta_sums) a->eta_sums[job] = -lanes_total(eta_sum);
    }
  });
}

}  // extern "C"
