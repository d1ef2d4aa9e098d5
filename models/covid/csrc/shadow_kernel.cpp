// The backward pass of the covid model's shadow flows (models/covid/shadow.py, `_ShadowFlows`) fused into two
// passes over the agents, for CPU. Loaded by models/covid/shadow_native.py; shadow.py holds the same map in
// torch ops (the reference, and the path on other devices). Plain C, no torch headers.
//
// Every [B, N] input may be null (no gradient reached it: read as 0). Per-borough [B, G] inputs are read at the
// agent's borough; per-element constants are [B] arrays; per-age-group tables [A].

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"

namespace {

inline float at(const float* p, int64_t k) { return p ? p[k] : 0.f; }

// exp(x) for x <= 0 (0 below -87): 2^k e^r with |r| <= ln2 / 2, a degree-6 polynomial (relative error ~2e-7).
// Written out, and branch-free, so that the loops below vectorise (glibc's scalar expf / powf took 3/4 of the
// kernel's time at full NYC).
inline float exp_nonpositive(float x) {
  x = x > -87.f ? x : -87.f;
  const float k = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23 trick)
  const float r = (x - k * 0.693145752f) - k * 1.42860677e-6f;
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(k) << 23;
  std::memcpy(&p, &bits, 4);
  return p;
}

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

// body(b, i, k = b * N + i) for the flat range [lo, hi) of a [B, N] array, without a division per agent.
template <class F>
void each(int64_t lo, int64_t hi, int64_t N, F&& body) {
  agenttensor::for_rows(lo, hi, N, [&](int64_t b, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) body(b, i, b * N + i);
  });
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
  const int32_t* age_group;  // [N]
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
  const float *from_sym_sums, *from_asym_sums, *q_sym, *q_asym;
  const int32_t* household;
  int64_t households;
  float half_infectious, rate_E, rate_Is, rate_Ia, rate_H;
  // outputs [B, N]
  float *out_E, *out_Is, *out_Ia, *out_H, *out_exposure0, *out_latent0;
};

// q_sym = S_k [1 - (1 - T_sym)(1 - T_sym T_mid)^s] g_exposure, the same with T_asym (see attack_probabilities):
// unit [B | 1, N] (unit_stride 0: one row), susceptible [B, N], sums of susceptible per household [B, H].
// Two passes: s (a gather per agent, into q_asym) and then the arithmetic (contiguous: vectorised).
void agenttensor_covid_attack(int64_t B, int64_t N, const float* unit, int64_t unit_stride, const float* susceptible,
                              const float* susceptible_sums, const int32_t* household, int64_t households,
                              const float* alpha, float d_sym, float d_asym, float f_mean, const float* g_exposure,
                              float* q_sym, float* q_asym, int64_t threads) {
  agenttensor::parallel(threads, B * N, int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
    agenttensor::for_rows(lo, hi, N, [&](int64_t b, int64_t i0, int64_t i1) {
      const float* __restrict S = susceptible + b * N;
      const float* __restrict sums = susceptible_sums + b * households;
      float* __restrict chain = q_asym + b * N;
      for (int64_t i = i0; i < i1; ++i) {
        const float c = sums[household[i]] - S[i] - 1.f;
        chain[i] = c > 0.f ? c : 0.f;
      }
      const float* __restrict u = unit + b * unit_stride;
      const float* __restrict g = g_exposure + b * N;
      float* __restrict qs = q_sym + b * N;
      const float a_sym = -d_sym, a_asym = -alpha[b] * d_asym;
      for (int64_t i = i0; i < i1; ++i) {
        const float T_sym = 1.f - exp_nonpositive(u[i] * a_sym);
        const float T_asym = 1.f - exp_nonpositive(u[i] * a_asym);
        const float T_mid = T_sym * f_mean + T_asym * (1.f - f_mean);
        const float n = chain[i], sg = S[i] * g[i];
        qs[i] = (1.f - power_unit(1.f - T_sym * T_mid, n) * (1.f - T_sym)) * sg;
        chain[i] = (1.f - power_unit(1.f - T_asym * T_mid, n) * (1.f - T_asym)) * sg;
      }
    });
  });
}

void agenttensor_covid_shadow_backward(const ShadowArgs* a) {
  const int64_t N = a->N, G = a->G;
  agenttensor::parallel(a->threads, a->B * N, int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
    each(lo, hi, N, [&](int64_t b, int64_t i, int64_t k) {
      const int64_t bo = b * G + a->borough[i];
      const int32_t age = a->age_group[i];
      const float gS = at(a->gS, k), gE = at(a->gE, k), gIs = at(a->gIs, k), gIa = at(a->gIa, k);
      const float gH = at(a->gH, k), gR = at(a->gR, k), gD = at(a->gD, k);
      const float gX = at(a->g_exposure, k), gL = at(a->g_latent, k);
      const float report = at(a->g_report, bo);
      // infected = exposure / half_infectious: leaves S and household_exposure, enters household_latent, counted
      const float g_infected = -gS + at(a->g_infections, bo) - gX + gL;
      a->out_exposure0[k] = gX + g_infected * (1.f / a->half_infectious);
      // entering I, split by f; reported with the detection probabilities (raised by testing)
      float d_sym = a->detect_sym[b], d_asym = a->detect_asym[b];
      if (a->testing) {
        const float extra = a->testing[b * a->cells + a->cell[i]];
        d_sym += extra * (1.f - d_sym);
        d_asym += extra * (1.f - d_asym);
      }
      const float g_to_Is = gIs + d_sym * report, g_to_Ia = gIa + d_asym * report;
      const float f = a->symptomatic[age];
      const float g_enter = (g_to_Is - g_to_Ia) * f + g_to_Ia;
      a->out_latent0[k] = (1.f - a->rate_E) * gL + a->rate_E * g_enter;
      float g_spread = 0.f;
      if (a->q_sym) {
        const int64_t h = b * a->households + a->household[i];
        const float from_sym = a->from_sym_sums[h] - a->q_sym[k], from_asym = a->from_asym_sums[h] - a->q_asym[k];
        g_spread = (from_sym - from_asym) * f + from_asym;
      }
      const float free = a->stage_end[k] < 0 ? 1.f : 0.f;
      a->out_E[k] = (g_enter - gE + g_spread) * free * a->rate_E;
      float p_hosp = a->hosp[age];
      if (a->vaccinated) p_hosp *= 1.f - a->efficacy_severe[b] * a->vaccinated[k];
      const float g_to_H = gH - gR + at(a->g_admissions, bo);
      a->out_Is[k] = (gR - gIs + p_hosp * g_to_H) * free * a->rate_Is;
      a->out_Ia[k] = (gR - gIa) * free * a->rate_Ia;
      const float g_to_D = gD - gR + at(a->g_deaths, bo);
      a->out_H[k] = (gR - gH + a->death[age] * g_to_D) * free * a->rate_H;
    });
  });
}

}  // extern "C"
