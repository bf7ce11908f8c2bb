// Per-step scalars of the CPU SSD scan, shared by the forward and the backward: the effective
// step size d_t, the decay a_t = exp(d_t A), and the rescaling that lets every pass skip the
// per-step multiplication of the state by a_t.
//
// Rescaling. Within a segment of steps the state is kept as S_t = lam_t * T_t with lam_t the
// product of the decays since the segment began, so that the recurrence S_t = a_t S_{t-1} +
// d_t x_t B_t^T becomes T_t = T_{t-1} + (d_t / lam_t) x_t B_t^T: one FMA per state element and
// step instead of a multiply and an FMA. Outputs are read as y_t = lam_t (T_t C_t). When lam
// would leave [2^-40, 2^40] a new segment starts: the tile is multiplied once by lam_{t-1} a_t
// (pre_t) and lam restarts at 1. Rounding errors are those of the direct recurrence (each step
// rounds relative to the current state), the factor range only keeps d/lam far from overflow.
// The backward's reverse recurrence G_t = a_{t+1} G_{t+1} + gy_t C_t^T is rescaled the same way
// from the end (mu_t).
//
// The state is also brought back to scale (lam = 1) at the end of every checkpoint block, where
// the forward stores it, so a pass that starts from a checkpoint repeats the forward exactly.
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "mblm/ssd.h"
#include "vec.h"  // MBLM_CPU_ISA

namespace mblm::cpu_ssd {
inline namespace MBLM_CPU_ISA {

template <typename T>
struct RescaleRange {
  static constexpr T lo = T(9.094947017729282e-13);  // 2^-40
  static constexpr T hi = T(1099511627776.0);        // 2^40
};

// torch.nn.functional.softplus (beta 1, threshold 20) and its derivative.
template <typename T>
inline T softplus(T v) {
  return v > T(20) ? v : std::log1p(std::exp(v));
}
template <typename T>
inline T softplus_grad(T v) {
  if (v > T(20)) return T(1);
  const T z = std::exp(v);
  return z / (z + T(1));
}

// Arrays of length B * H * L, index (b * H + h) * L + t.
template <typename T>
struct StepTables {
  T* d = nullptr;     // d_t = softplus?(dt + dt_bias)
  T* a = nullptr;     // a_t = exp(d_t A)
  T* pre = nullptr;   // forward: tile factor before step t (1 = none)
  T* wsc = nullptr;   // forward: d_t / lam_t, the scale of x_t in the update
  T* osc = nullptr;   // forward: lam_t, the scale of the outputs read at step t
  T* rpre = nullptr;  // reverse: tile factor before step t, walking backwards (1 = none)
  T* gsc = nullptr;   // reverse: 1 / mu_t, the scale of gy_t in the update
  T* rosc = nullptr;  // reverse: mu_t
};

// dt: (B, L, H) contiguous; A, dt_bias: (H,) contiguous (dt_bias may be null).
template <typename T>
void compute_step_tables(const StepTables<T>& s, const T* dt, const T* A, const T* dt_bias,
                         bool softplus_dt, int64_t batch, int64_t length, int64_t heads,
                         bool reverse) {
  constexpr T lo = RescaleRange<T>::lo, hi = RescaleRange<T>::hi;
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const int64_t base = bh * length;
      const T bias = dt_bias ? dt_bias[h] : T(0);
      T lam = T(1);
      for (int64_t t = 0; t < length; ++t) {
        T v = dt[(b * length + t) * heads + h] + bias;
        if (softplus_dt) v = softplus(v);
        const T a = std::exp(v * A[h]);
        s.d[base + t] = v;
        s.a[base + t] = a;
        if (t % kSsdCheckpointSteps == 0) lam = T(1);  // the state was brought back to scale
        const T cand = lam * a;
        if (cand < lo || cand > hi) {
          s.pre[base + t] = cand;
          lam = T(1);
        } else {
          s.pre[base + t] = T(1);
          lam = cand;
        }
        s.wsc[base + t] = v / lam;
        s.osc[base + t] = lam;
      }
      if (!reverse) continue;
      T mu = T(1);
      for (int64_t t = length - 1; t >= 0; --t) {
        const T cand = t == length - 1 ? T(1) : mu * s.a[base + t + 1];
        if (cand < lo || cand > hi) {
          s.rpre[base + t] = cand;
          mu = T(1);
        } else {
          s.rpre[base + t] = T(1);
          mu = cand;
        }
        s.gsc[base + t] = T(1) / mu;
        s.rosc[base + t] = mu;
      }
    }
  });
}

}  // namespace MBLM_CPU_ISA
}  // namespace mblm::cpu_ssd
