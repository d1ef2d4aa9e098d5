// The day's exits in the gradient modes with straight-through draws (models/covid/model.py, `progress`; the node is
// models/covid/exits_native.py's `_ExitFlows`), for CPU: every agent whose countdown ends today draws its next stage,
// its detection and its isolation and gets its next countdown, and the per-borough sums of the flows are counted, in
// one pass over the M exits (forward); the derivatives of the same arithmetic in one pass (backward). Plain C, no torch
// headers.
//
// Forward: the torch ops' operations on float32 0/1 values in their order (built with -ffp-contract=off): the same
// bits. Backward: autograd's chain for those ops, term for term (straight-through: d 1[u < p] / d p = 1), and each
// sum of several terms added in the order autograd's engine adds them (recorded from its graph): the same bits. The
// reductions autograd makes (index_select's index_add into the age tables, a broadcast parameter's sum) are left to the
// caller, which makes them with the same torch ops from the per-exit terms written here.

#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"

namespace {

constexpr int kChanges = 7;  // E, I_sym, I_asym, H, R, D, isolating (shadow.py's STAGES[1:])
constexpr int kSums = 12;    // reported, to_H, to_D, then the flows out_E, in_Ia, out_Ia, in_Is, out_Is, out_H, in_R,
                             // isolating after, isolating before
constexpr int64_t kGrain = 4096;
using agenttensor::kFetchAhead;  // (the exits' scattered lines fetched that many exits ahead)

inline float at(const float* p, int64_t k) { return p ? p[k] : 0.f; }

// min(K, 1 + #{k : cdf[k] <= u}) (`disease.draw_durations`; as hard_kernel.cpp's `duration`)
inline int64_t duration(const float* cdf, int64_t K, float u) {
  int64_t lo = 0, hi = K;  // upper bound of u
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (cdf[mid] <= u) lo = mid + 1; else hi = mid;
  }
  return std::min<int64_t>(K, 1 + lo);
}

}  // namespace

// The arguments (exits_native.py's _Args, field for field).
struct ExitArgs {
  int64_t M, B, N, G, K, t, threads;
  const int64_t *b, *i;                      // [M] the exits, row-major
  const float *lE, *lIa, *lIs, *lH, *iso0;   // [M] E, I_asym, I_sym, H, isolating at the exits
  const float* u;                            // [6, M] symptoms, hospitalisation, death, detection, isolation, duration
  const int32_t *age_group, *borough;        // [N]
  const float *symptomatic, *hosp, *death;   // [A]
  const float *detect, *ratio;               // one value (stride 0) or [M] (stride 1)
  int64_t detect_stride, ratio_stride;
  const float *testing, *severe, *isolate;   // [M]; testing, severe null where absent (severe = efficacy · vaccinated)
  const float* cdf_exit;                     // [3, K] I_asym, I_sym, H
  int16_t* stage_end;                        // [B, N]: written at the exits
  float* changes[kChanges];                  // [M] out each
  uint8_t* events;                           // [M] out: bits 0-4 the symptoms, hospitalisation, death, detection and
                                             // isolation draws
  float* sums;                               // [12, B, G] out
};

// The backward's arguments (exits_native.py's _GradArgs, field for field). Every input gradient may be null (none
// reached it: 0), every output null (not wanted).
struct ExitGradArgs {
  int64_t M, B, G, threads;
  const int64_t *b, *i;
  const int32_t* borough;                    // [N]
  const float *lE, *lIa, *lIs, *lH, *iso0;   // [M] as in the forward
  const uint8_t* events;                     // [M] the forward's
  const float* hosp_at;                      // [M] the hospitalisation table at the exits (read with severe only)
  const float *detect, *ratio;
  int64_t detect_stride, ratio_stride;
  const float *testing, *severe;
  const float* g_changes[kChanges];          // [M] each
  const float* g_sums[3];                    // [B, G]: reported, admissions, deaths
  // [M] out: d lE, d lIa, d lIs, d lH, d iso0, d (symptomatic at the exits), d (hospitalisation table at the exits),
  // d (death table at the exits), d detect's terms, d ratio's terms, d testing, d severe, d isolate
  float* out[13];
};

extern "C" {

void agenttensor_covid_exits_forward(ExitArgs* args) {
  const ExitArgs& a = *args;
  const int64_t M = a.M, cells = a.B * a.G;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(a.threads, M / kGrain));
  std::vector<float> partial(static_cast<size_t>(threads * kSums * cells), 0.f);
  agenttensor::parallel(threads, M, kGrain, [&](int64_t lo, int64_t hi) {
    float* sums = partial.data() + omp_get_thread_num() * kSums * cells;
    for (int64_t k = lo; k < hi; ++k) {
      if (k + kFetchAhead < hi) {  // the exits' scattered lines (age group, borough, countdown), fetched ahead
        const int64_t ahead = a.i[k + kFetchAhead];
        __builtin_prefetch(a.age_group + ahead);
        __builtin_prefetch(a.borough + ahead);
        __builtin_prefetch(a.stage_end + a.b[k + kFetchAhead] * a.N + ahead, 1);
      }
      const int64_t b = a.b[k], n = a.i[k];
      const int32_t g = a.age_group[n];
      const float u0 = a.u[k], u1 = a.u[M + k], u2 = a.u[2 * M + k], u3 = a.u[3 * M + k], u4 = a.u[4 * M + k],
                  u5 = a.u[5 * M + k];
      const float lE = a.lE[k], lIa = a.lIa[k], lIs = a.lIs[k], lH = a.lH[k], iso0 = a.iso0[k];
      const float ev_sym = u0 < a.symptomatic[g] ? 1.f : 0.f;
      const float to_Is = ev_sym * lE;
      const float to_Ia = lE - to_Is;
      float p_hosp = a.hosp[g];
      if (a.severe) p_hosp = p_hosp * (1.f - a.severe[k]);
      const float ev_h = u1 < p_hosp ? 1.f : 0.f;
      const float to_H = ev_h * lIs;
      const float ev_d = u2 < a.death[g] ? 1.f : 0.f;
      const float to_D = ev_d * lH;
      const float to_R = (lIa + (lIs - to_H)) + (lH - to_D);
      float p_detect = a.detect[k * a.detect_stride] * (to_Is + a.ratio[k * a.ratio_stride] * to_Ia);
      if (a.testing) p_detect = p_detect + a.testing[k] * (1.f - p_detect);
      const float ev_r = u3 < p_detect ? 1.f : 0.f;
      const float reported = ev_r * (to_Ia + to_Is);
      const float aware = (to_Is + reported) - to_Is * reported;
      const float ev_i = u4 < a.isolate[k] ? 1.f : 0.f;
      const float isolate = ev_i * aware;
      const float after = iso0 * (1.f - (lIa + lIs)) + isolate;
      const float values[kChanges] = {-lE, to_Is - lIs, to_Ia - lIa, to_H - lH, to_R, to_D, after - iso0};
      for (int c = 0; c < kChanges; ++c) a.changes[c][k] = values[c];
      a.events[k] = static_cast<uint8_t>(static_cast<int>(ev_sym) | static_cast<int>(ev_h) << 1
                                         | static_cast<int>(ev_d) << 2 | static_cast<int>(ev_r) << 3
                                         | static_cast<int>(ev_i) << 4);
      // the next countdown: I_asym 0, I_sym 1, H 2 (one search); no timed stage (R, D): -1
      const int64_t table = static_cast<int64_t>(to_Is + 2.f * to_H);
      const bool timed = (to_Ia + to_Is) + to_H > 0.f;
      a.stage_end[b * a.N + n] = timed ? static_cast<int16_t>(a.t + duration(a.cdf_exit + table * a.K, a.K, u5))
                                       : static_cast<int16_t>(-1);
      const int64_t cell = b * a.G + a.borough[n];
      const float counted[kSums] = {reported, to_H, to_D, lE, to_Ia, lIa, to_Is, lIs, lH, to_R, after, iso0};
      for (int s = 0; s < kSums; ++s) sums[s * cells + cell] += counted[s];  // (0/1 values: exact in any order)
    }
  });
  for (int64_t s = 0; s < kSums * cells; ++s) {
    float total = 0.f;
    for (int64_t w = 0; w < threads; ++w) total += partial[w * kSums * cells + s];
    a.sums[s] = total;
  }
}

void agenttensor_covid_exits_backward(ExitGradArgs* args) {
  const ExitGradArgs& a = *args;
  const int64_t M = a.M;
  agenttensor::parallel(a.threads, M, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      if (k + kFetchAhead < hi) __builtin_prefetch(a.borough + a.i[k + kFetchAhead]);  // (scattered: fetched ahead)
      const int64_t cell = a.b[k] * a.G + a.borough[a.i[k]];
      const float gE = at(a.g_changes[0], k), gIs_c = at(a.g_changes[1], k), gIa_c = at(a.g_changes[2], k),
                  gH_c = at(a.g_changes[3], k), gR = at(a.g_changes[4], k), gD_c = at(a.g_changes[5], k),
                  giso_c = at(a.g_changes[6], k);
      const float G_rep = at(a.g_sums[0], cell), G_H = at(a.g_sums[1], cell), G_D = at(a.g_sums[2], cell);
      // the forward's values
      const uint8_t e = a.events[k];
      const float ev_sym = e & 1 ? 1.f : 0.f, ev_h = e & 2 ? 1.f : 0.f, ev_d = e & 4 ? 1.f : 0.f,
                  ev_r = e & 8 ? 1.f : 0.f, ev_i = e & 16 ? 1.f : 0.f;
      const float lE = a.lE[k], lIa = a.lIa[k], lIs = a.lIs[k], lH = a.lH[k], iso0 = a.iso0[k];
      const float detect = a.detect[k * a.detect_stride], ratio = a.ratio[k * a.ratio_stride];
      const float to_Is = ev_sym * lE, to_Ia = lE - to_Is;
      const float r2 = to_Is + ratio * to_Ia, r3 = to_Ia + to_Is;
      const float p_detect = detect * r2;
      const float reported = ev_r * r3;
      const float aware = (to_Is + reported) - to_Is * reported;
      const float w1 = 1.f - (lIa + lIs);
      // isolating after = iso0 w1 + ev_i aware; aware = (to_Is + reported) − to_Is reported
      const float g_isolate = giso_c, g_w2 = giso_c;
      const float g_aware = g_isolate * ev_i;
      const float g_ev_i = g_isolate * aware;
      const float g_w1 = g_w2 * iso0;
      const float g_leave_I = -g_w1;
      const float g_q1 = g_aware, g_q2 = -g_aware;
      // reported = ev_r (to_Ia + to_Is): its three consumers (the borough sums, q2, q1), in the engine's order
      const float g_rep = (G_rep + g_q2 * to_Is) + g_q1;
      const float g_ev_r = g_rep * r3, g_r3 = g_rep * ev_r;
      // p_detect = detect (to_Is + ratio to_Ia), then + testing (1 − p_detect)
      float g_p = g_ev_r;
      float g_testing = 0.f;
      if (a.testing) {
        const float t = a.testing[k];
        g_testing = g_p * (1.f - p_detect);
        g_p = g_p + -(g_p * t);
      }
      const float g_r2 = g_p * detect;
      const float g_r1 = g_r2;
      const float g_to_Ia = (gIa_c + g_r3) + g_r1 * ratio;
      const float g_to_Is = ((((gIs_c + g_q2 * reported) + g_q1) + g_r3) + g_r2) + -g_to_Ia;
      // to_R = (lIa + (lIs − to_H)) + (lH − to_D)
      const float g_to_D = (gD_c + G_D) + -gR;
      const float g_to_H = (gH_c + G_H) + -gR;
      // p_hosp = hosp (1 − severe) with severe (efficacy · vaccinated), else hosp
      const float g_p_hosp = g_to_H * lIs;
      const float g_hosp = a.severe ? g_p_hosp * (1.f - a.severe[k]) : g_p_hosp;
      const float g_severe = a.severe ? -(g_p_hosp * a.hosp_at[k]) : 0.f;
      const float outs[13] = {
          ((-gE) + g_to_Ia) + g_to_Is * ev_sym,           // lE: the change, to_Ia, to_Is
          ((-gIa_c) + g_leave_I) + gR,                    // lIa: the change, leave_I, to_R
          (((-gIs_c) + g_leave_I) + gR) + g_to_H * ev_h,  // lIs: the change, leave_I, to_R, to_H
          ((-gH_c) + gR) + g_to_D * ev_d,                 // lH: the change, to_R, to_D
          (-giso_c) + g_w2 * w1,                          // iso0: the change, iso0 w1
          g_to_Is * lE,                                   // symptomatic at the exits
          g_hosp,                                         // the hospitalisation table at the exits
          g_to_D * lH,                                    // the death table at the exits
          g_p * r2,                                       // detect's terms
          g_r1 * to_Ia,                                   // ratio's terms
          g_testing,
          g_severe,
          g_ev_i};                                        // isolate
      for (int o = 0; o < 13; ++o)
        if (a.out[o]) a.out[o][k] = outs[o];
    }
  });
}

}  // extern "C"
