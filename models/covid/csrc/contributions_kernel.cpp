// The backward pass of the covid model's own contributions (models/covid/contributions.py, `_OwnContributions`)
// as one pass over the agents, for CPU. Loaded by models/covid/contributions_native.py; contributions.py holds
// the same chain rule in torch ops (the reference, and the path on other devices). Plain C, no torch headers.
//
// Incoming gradients d_* are [B, N] or null (none reached that layer: read as 0). Presences and the testing
// lever are [B | 1, N] rows (stride N or 0), or null (1, resp. no lever). Per-element constants are [B] arrays.
// Outputs are [B, N] or null (not wanted). The sums for d alpha and d eta are written per fixed block of agents
// (double), so that they do not depend on the number of threads; the caller adds the blocks in order.

#include <cstdint>

#include "parallel.h"

namespace {

inline float at(const float* p, int64_t k) { return p ? p[k] : 0.f; }

}  // namespace

extern "C" {

struct OwnArgs {
  int64_t B, N, threads, block;
  const float *d_household, *d_school, *d_workplace, *d_community;
  const float *p_school, *p_workplace, *p_community;
  int64_t p_school_stride, p_workplace_stride, p_community_stride;
  const float *I_sym, *I_asym, *isolating, *isolate_prob;
  const int16_t* stage_end;
  const float* testing;
  int64_t testing_stride;
  const float *alpha, *eta, *detect_asym;  // [B]
  float *out_I_sym, *out_I_asym, *out_isolating, *out_p_school, *out_p_workplace, *out_p_community;
  double *alpha_sums, *eta_sums;  // [B * blocks] or null
};

void agenttensor_covid_own_backward(const OwnArgs* a) {
  const int64_t N = a->N, block = a->block, blocks = (N + block - 1) / block;
  agenttensor::parallel(a->threads, a->B * blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t job = lo; job < hi; ++job) {
      const int64_t b = job / blocks, i0 = (job % blocks) * block, i1 = i0 + block < N ? i0 + block : N;
      const float alpha = a->alpha[b], eta = a->eta[b], detect0 = a->detect_asym[b];
      const float* ps = a->p_school ? a->p_school + b * a->p_school_stride : nullptr;
      const float* pw = a->p_workplace ? a->p_workplace + b * a->p_workplace_stride : nullptr;
      const float* pc = a->p_community ? a->p_community + b * a->p_community_stride : nullptr;
      const float* testing = a->testing ? a->testing + b * a->testing_stride : nullptr;
      double alpha_sum = 0, eta_sum = 0;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t k = b * N + i;
        const float ds = at(a->d_school, k), dw = at(a->d_workplace, k), dc = at(a->d_community, k);
        // D = Σ_l d_l p_l
        const float D = ds * (ps ? ps[i] : 1.f) + dw * (pw ? pw[i] : 1.f) + dc * (pc ? pc[i] : 1.f);
        const bool real = a->stage_end[k] >= 0;
        const float kept = 1.f - eta * a->isolating[k];
        const float d_iota = (real ? at(a->d_household, k) : 0.f) + D * kept;
        const float iota = a->I_sym[k] + alpha * a->I_asym[k];
        // expected isolation of untaken infections: −η free isolate_prob D
        const float expected = real ? 0.f : a->isolate_prob[k] * D * -eta;
        if (a->out_I_sym) a->out_I_sym[k] = d_iota + expected;
        if (a->out_I_asym) {
          const float detect = testing ? detect0 + testing[i] * (1.f - detect0) : detect0;
          a->out_I_asym[k] = d_iota * alpha + expected * (alpha * detect);
        }
        const float iota_D = iota * D;
        if (a->out_isolating) a->out_isolating[k] = iota_D * -eta;
        const float away = iota * kept;
        if (a->out_p_school) a->out_p_school[k] = ds * away;
        if (a->out_p_workplace) a->out_p_workplace[k] = dw * away;
        if (a->out_p_community) a->out_p_community[k] = dc * away;
        alpha_sum += a->I_asym[k] * d_iota;
        eta_sum -= iota_D * a->isolating[k];
      }
      if (a->alpha_sums) a->alpha_sums[job] = alpha_sum;
      if (a->eta_sums) a->eta_sums[job] = eta_sum;
    }
  });
}

}  // extern "C"
