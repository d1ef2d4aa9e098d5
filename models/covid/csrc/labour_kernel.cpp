// The covid model's weekly labour market (models/covid/model.py, `labour_market`) as one pass over the agents, for
// CPU: the job-loss and rehire probabilities, both draws and the moves between employed and unemployed, for the
// memberships as hard mode holds them (uint8) and as gradient modes hold them (float32). The same bits as the torch
// ops of `model.labour_flows` (built with -ffp-contract=off: the same products and sums, in the same order).
// Loaded by models/covid/labour_native.py. Plain C, no torch headers.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "parallel.h"
#include "uniform.h"

extern "C" {

struct LabourArgs {
  int64_t B, N, threads;
  int64_t is_float;  // 1: the fields are float32, 0: uint8
  // [B, N] contiguous, all of one dtype; has_workplace [N] (0/1 bytes)
  const void *employed, *unemployed, *on_site, *remote, *D;
  const uint8_t* has_workplace;
  const int32_t* base;  // [N] the agents' hashes (`Randomness.agent_base`)
  const int32_t* keys;  // [2, B]: the streams "job-loss", "rehire" at this step
  // per batch element [B]: job_loss_base, job_loss_absent, job_loss_closed, stimulus_job_loss_relief, rehire_rate
  const float *loss_base, *loss_absent, *loss_closed, *relief, *rehire;
  // per-agent levers [B | 1, N] (row stride N or 0), or null (absent): closed workplaces, stimulus, workplace closure
  const float *closed, *stimulus, *closure;
  int64_t closed_stride, stimulus_stride, closure_stride;
  void *employed_out, *unemployed_out;  // [B, N], the fields' dtype
  // or null: the five fields packed one byte per agent (bits 0..4: employed, unemployed, on_site, remote, D), where
  // each is exactly +0.0 or 1.0 (float fields), and the two draws (bit 5: u < p, job loss; bit 6: u < q, rehire);
  // the return value counts the chunks where a field is neither
  uint8_t* packed;
};

// The straight-through derivatives of the week's (employed, unemployed) with respect to the five fields
// (agenttensor_covid_labour_backward), from the forward pass's packed bytes
struct LabourBackwardArgs {
  int64_t B, N, threads;
  const uint8_t* packed;         // [B, N]: LabourArgs' packed bytes, draws included
  const uint8_t* has_workplace;  // [N] (0/1 bytes)
  const float *g_employed, *g_unemployed;  // [B, N] the incoming gradients, or null (zero)
  const float *loss_absent, *loss_closed, *relief;  // [B]: job_loss_absent, job_loss_closed, stimulus_job_loss_relief
  const float *closed, *stimulus;  // [B | 1, N] (row stride N or 0) or null (absent)
  int64_t closed_stride, stimulus_stride;
  float *d_employed, *d_unemployed, *d_on_site, *d_remote, *d_D;  // [B, N], or null (not wanted)
};

}  // extern "C"

namespace {

inline float as_float(float x) { return x; }
inline float as_float(uint8_t x) { return static_cast<float>(x); }

constexpr uint32_t kOne = 0x3f800000u;  // 1.0f

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

// Per-row constants of `labour_span`: the two streams' keys and the rates
struct Row {
  uint32_t key_loss, key_hire;
  float base, absent, closed, relief, rehire;
};

// n agents: restrict parameters and no branches (the optional levers are template flags): it vectorises. Returns
// whether a packed field was neither +0.0 nor 1.0.
template <class T, bool Stimulus, bool Closed, bool Closure, bool Packed>
uint32_t labour_span(int64_t n, Row r, const T* __restrict e, const T* __restrict un, const T* __restrict os,
                     const T* __restrict rm, const T* __restrict d, const uint8_t* __restrict hw,
                     const int32_t* __restrict base, const float* __restrict closed, const float* __restrict stimulus,
                     const float* __restrict closure, T* __restrict e_out, T* __restrict u_out,
                     uint8_t* __restrict packed) {
  uint32_t other = 0;
  for (int64_t j = 0; j < n; ++j) {
    // p = base + [absent (1 − on_site) o + closed · closed_j · o] · (1 − relief · s), o = (1 − remote) has_workplace
    const float job = (1.f - as_float(rm[j])) * static_cast<float>(hw[j]);  // (0/1 bytes)
    const float absent = (r.absent * (1.f - as_float(os[j]))) * job;
    const float relief = Stimulus ? 1.f - r.relief * stimulus[j] : 1.f;
    float p = r.base + (Stimulus ? absent * relief : absent);
    if constexpr (Closed) {
      const float shut = (r.closed * closed[j]) * job;
      p = p + (Stimulus ? shut * relief : shut);
    }
    const float q = Closure ? r.rehire * (1.f - closure[j]) : r.rehire;
    const uint32_t h = static_cast<uint32_t>(base[j]);
    const bool lose = agenttensor::uniform_of(h ^ r.key_loss) < p, hire = agenttensor::uniform_of(h ^ r.key_hire) < q;
    if constexpr (std::is_same_v<T, float>) {
      const float lost = (lose ? 1.f : 0.f) * e[j], hired = (hire ? 1.f : 0.f) * un[j], alive = 1.f - d[j];
      e_out[j] = ((e[j] - lost) + hired) * alive;
      u_out[j] = ((un[j] + lost) - hired) * alive;
      if constexpr (Packed) {
        const uint32_t v0 = bits_of(e[j]), v1 = bits_of(un[j]), v2 = bits_of(os[j]), v3 = bits_of(rm[j]),
                       v4 = bits_of(d[j]);
        other |= (v0 != 0u && v0 != kOne) | (v1 != 0u && v1 != kOne) | (v2 != 0u && v2 != kOne) |
                 (v3 != 0u && v3 != kOne) | (v4 != 0u && v4 != kOne);
        packed[j] = static_cast<uint8_t>((v0 == kOne) | (v1 == kOne) << 1 | (v2 == kOne) << 2 | (v3 == kOne) << 3 |
                                         (v4 == kOne) << 4 | static_cast<uint32_t>(lose) << 5 |
                                         static_cast<uint32_t>(hire) << 6);
      }
    } else {  // uint8 arithmetic, as torch's (wrapping)
      const int lost = lose ? e[j] : 0, hired = hire ? un[j] : 0, alive = 1 - d[j];
      e_out[j] = static_cast<uint8_t>((e[j] - lost + hired) * alive);
      u_out[j] = static_cast<uint8_t>((un[j] + lost - hired) * alive);
    }
  }
  return other;
}

// One row's agents [i0, i1)
template <class T, bool Stimulus, bool Closed, bool Closure, bool Packed>
uint32_t labour_row(const LabourArgs& a, int64_t b, int64_t i0, int64_t i1) {
  const int64_t o = b * a.N + i0;
  auto field = [&](const void* x) { return static_cast<const T*>(x) + o; };
  auto lever = [&](const float* x, int64_t stride) { return x ? x + b * stride + i0 : nullptr; };
  const Row r{static_cast<uint32_t>(a.keys[b]), static_cast<uint32_t>(a.keys[a.B + b]), a.loss_base[b],
              a.loss_absent[b], a.loss_closed[b], a.relief[b], a.rehire[b]};
  return labour_span<T, Stimulus, Closed, Closure, Packed>(
      i1 - i0, r, field(a.employed), field(a.unemployed), field(a.on_site), field(a.remote), field(a.D),
      a.has_workplace + i0, a.base + i0, lever(a.closed, a.closed_stride), lever(a.stimulus, a.stimulus_stride),
      lever(a.closure, a.closure_stride), static_cast<T*>(a.employed_out) + o, static_cast<T*>(a.unemployed_out) + o,
      Packed ? a.packed + o : nullptr);
}

template <class T, bool... Flags>
int64_t run(const LabourArgs& a) {
  constexpr int64_t kChunk = int64_t(1) << 15;
  const int64_t total = a.B * a.N, chunks = (total + kChunk - 1) / kChunk;
  int64_t other = 0;
  agenttensor::parallel(a.threads, chunks, 1, [&](int64_t lo, int64_t hi) {
    int64_t mine = 0;
    agenttensor::for_rows(lo * kChunk, std::min(total, hi * kChunk), a.N, [&](int64_t b, int64_t i0, int64_t i1) {
      mine += labour_row<T, Flags...>(a, b, i0, i1) != 0;
    });
#pragma omp atomic
    other += mine;
  });
  return other;
}

template <class T, bool... Flags>
int64_t dispatch(const LabourArgs& a) {
  constexpr int kSet = sizeof...(Flags);
  if constexpr (kSet == 4) {
    return run<T, Flags...>(a);
  } else {
    const bool flag = kSet == 0 ? a.stimulus != nullptr : kSet == 1 ? a.closed != nullptr
                      : kSet == 2 ? a.closure != nullptr : (std::is_same_v<T, float> && a.packed != nullptr);
    return flag ? dispatch<T, Flags..., true>(a) : dispatch<T, Flags..., false>(a);
  }
}

// The derivatives for n agents, in the order of the operations autograd takes through `model.labour_flows` with
// straight-through events (`sampling._StraightThroughDrawnEvent`: d event / d p = grad · where, d event / d where =
// grad · 1[u < p]), so the same bits: for e' = ((e − lost) + hired) a, u' = ((un + lost) − hired) a, a = 1 − D,
// lost = L e, hired = H un, p = base + [absent (1 − on_site) o + closed · closed_j · o] · relief, o = (1 − remote) hw.
// Each sum of two terms is exact in either order (the engine's order of accumulation does not matter).
template <bool Stimulus, bool Closed>
void labour_backward_span(int64_t n, float r_absent, float r_closed, float r_relief, const uint8_t* __restrict f,
                          const uint8_t* __restrict hw, const float* __restrict gE, const float* __restrict gU,
                          const float* __restrict closed, const float* __restrict stimulus, float* __restrict d_e,
                          float* __restrict d_un, float* __restrict d_os, float* __restrict d_rm,
                          float* __restrict d_d) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = f[j];
    const float e = static_cast<float>(bits & 1), un = static_cast<float>((bits >> 1) & 1),
                os = static_cast<float>((bits >> 2) & 1), rm = static_cast<float>((bits >> 3) & 1),
                d = static_cast<float>((bits >> 4) & 1);
    const bool L = (bits >> 5) & 1, H = (bits >> 6) & 1;
    const float alive = 1.f - d, lost = (L ? 1.f : 0.f) * e, hired = (H ? 1.f : 0.f) * un;
    const float X = (e - lost) + hired, Y = (un + lost) - hired;
    const float gX = gE[j] * alive, gY = gU[j] * alive;  // through the products with alive
    const float g_lost = -gX + gY, g_hired = gX + -gY;
    d_e[j] = gX + (L ? g_lost : 0.f);  // (where, and the event's d / d where)
    d_un[j] = gY + (H ? g_hired : 0.f);
    d_d[j] = -(gE[j] * X + gU[j] * Y);
    const float g_p = g_lost * e;  // the event's d / d p
    const float relief = Stimulus ? 1.f - r_relief * stimulus[j] : 1.f;
    const float g_term = Stimulus ? g_p * relief : g_p;  // (each pandemic term times relief)
    const float job = (1.f - rm) * static_cast<float>(hw[j]);
    d_os[j] = -((g_term * job) * r_absent);
    float g_job = g_term * (r_absent * (1.f - os));
    if constexpr (Closed) g_job = g_job + g_term * (r_closed * closed[j]);
    d_rm[j] = -(g_job * static_cast<float>(hw[j]));
  }
}

template <bool Stimulus, bool Closed>
void labour_backward(const LabourBackwardArgs& a) {
  constexpr int64_t kTile = 1024;
  agenttensor::parallel(a.threads, a.B * a.N, int64_t(1) << 15, [&](int64_t lo, int64_t hi) {
    float zero[kTile] = {}, unwanted[5][kTile];  // (one row per unwanted output: the outputs are restrict pointers)
    agenttensor::for_rows(lo, hi, a.N, [&](int64_t b, int64_t i0, int64_t i1) {
      for (int64_t t0 = i0; t0 < i1; t0 += kTile) {
        const int64_t n = std::min(kTile, i1 - t0), o = b * a.N + t0;
        auto in = [&](const float* x) { return x ? x + o : zero; };
        auto out = [&](float* x, int row) { return x ? x + o : unwanted[row]; };
        auto lever = [&](const float* x, int64_t stride) { return x ? x + b * stride + t0 : zero; };
        labour_backward_span<Stimulus, Closed>(
            n, a.loss_absent[b], a.loss_closed[b], a.relief[b], a.packed + o, a.has_workplace + t0, in(a.g_employed),
            in(a.g_unemployed), lever(a.closed, a.closed_stride), lever(a.stimulus, a.stimulus_stride),
            out(a.d_employed, 0), out(a.d_unemployed, 1), out(a.d_on_site, 2), out(a.d_remote, 3), out(a.d_D, 4));
      }
    });
  });
}

}  // namespace

extern "C" {

// The week's derivatives with respect to the fields (see LabourBackwardArgs), where no rate or lever asks for one
void agenttensor_covid_labour_backward(const LabourBackwardArgs* a) {
  if (a->stimulus)
    a->closed ? labour_backward<true, true>(*a) : labour_backward<true, false>(*a);
  else
    a->closed ? labour_backward<false, true>(*a) : labour_backward<false, false>(*a);
}

// The labour market's week for every agent (see LabourArgs); returns the number of chunks with a packed field that is
// neither +0.0 nor 1.0 (0 where nothing is packed).
int64_t agenttensor_covid_labour(const LabourArgs* a) {
  return a->is_float ? dispatch<float>(*a) : dispatch<uint8_t>(*a);
}

}  // extern "C"
