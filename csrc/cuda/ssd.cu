// SSD family, CUDA kernels: ssd_fwd, ssd_bwd, ssd_update. Checks: csrc/ops/ssd.cpp. Semantics:
// mblm/ops/reference.py (ssd_ref); the algorithm and the backward's formulas mirror the CPU
// kernels (csrc/cpu/ssd_fwd.cpp, csrc/cpu/ssd_bwd.cpp), with the plain recurrence
// S = a S + u B^T (a GPU has multiplies to spare, so no rescaling).
//
// Every pass is one kernel, "scan_pass": a (P x N) state per head is split between threads along
// its "reduced" dimension R (the one each step sums over) and its "kept" dimension K: a group of
// RG lanes of a warp holds one kept index k and RT reduced indices each (r = lane + RG j), in
// registers. Per step, with the step's vectors staged in shared memory for blocks of steps:
//     s *= pre;  [acc = sum_r Rv[r] s[r]]  s[r] += Uv[r] * Vv[k];  [acc = sum_r Rv[r] s[r]]
// (the reduction before or after the update, as on the CPU), then acc is summed over the group
// by shuffles and the group leader writes the pass's outputs. Per-step scalars that sum over the
// kept dimension (C . aR, x . aQ, x . gy) and the gradients shared by a group's heads (gB, gC) are
// accumulated with atomics into float32 (float64) buffers.
//
//   pass   R  K  U      V      Rv   order              outputs
//   fwd    N  P  B      d x    C    forward, after     y, checkpoints, final state
//   state  P  N  d x    B      gy   forward, before    gC, C . aR, a <gSf, S_{L-2}>
//   gradB  P  N  gy     C      x    reverse, after     gB, g initial_state, anchors
//   gradX  N  P  C      gy     B    reverse, before    gx, x . aQ, x . gy, gD, C . B
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "mblm/ssd.h"

namespace mblm {

namespace {

constexpr int kThreads = 128;
constexpr int kMaxStepsPerStage = 32;
constexpr int kMaxReduced = 1024;  // RT * RG with RT <= 32 and RG <= 32

enum class Pass { kFwd, kState, kGradB, kGradX };

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A (B, L, X, Y) input with a contiguous last dimension, in elements.
template <typename T>
struct Operand {
  const T* p = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
};

template <typename T>
Operand<T> operand(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// A (B, X, Y) input (a decode step's x, B or C).
template <typename T>
Operand<T> operand3(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), 0};
}

template <typename scalar_t, typename acc_t>
struct ScanParams {
  int64_t batch, length, heads, headdim, groups, dstate, per_group, chunks;
  Operand<scalar_t> x, B, C, gy;
  const acc_t* d;     // (B, H, L) step sizes
  const acc_t* a;     // (B, H, L) decays
  const acc_t* Dv;    // (H, P) or null
  const acc_t* init;  // (B, H, P, N) or null: initial state (fwd) / grad_final_state (bwd)
  acc_t* ck;          // (B, H, chunks, P, N) checkpoints (written by fwd, read by the state pass)
  // fwd
  scalar_t* y;         // (B, L, H, P)
  acc_t* final_state;  // (B, H, P, N)
  // bwd
  acc_t* gC;      // (B, L, G, N)
  acc_t* gB;      // (B, L, G, N)
  scalar_t* gx;   // (B, L, H, P)
  acc_t* cgc;     // (B, H, L)  C . aR
  acc_t* xaq;     // (B, H, L)  x . aQ
  acc_t* xgy;     // (B, H, L)  x . gy
  acc_t* cb;      // (B, G, L)  C . B
  acc_t* fin;     // (B, H)     a_{L-1} <gSf, S_{L-2}>
  acc_t* anchor;  // (B, H, chunks)
  acc_t* gS0;     // (B, H, P, N)
  acc_t* gD;      // (B, H, P)
};

template <typename T>
__device__ __forceinline__ T group_sum(T v, int rg) {
  for (int off = rg / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the group leaders of a warp (lanes 0, RG, 2 RG, ...), result in lane 0.
template <typename T>
__device__ __forceinline__ T leaders_sum(T v, int rg) {
  for (int off = 16; off >= rg; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename scalar_t, typename acc_t, Pass kPass>
struct PassTraits {
  static constexpr bool kReverse = kPass == Pass::kGradB || kPass == Pass::kGradX;
  static constexpr bool kReduceFirst = kPass == Pass::kState || kPass == Pass::kGradX;
  // R runs over n (true) or p (false)
  static constexpr bool kReducedIsN = kPass == Pass::kFwd || kPass == Pass::kGradX;
};

// grid: x = b * H + h, y = kept tile, z = checkpoint block (state pass) ; block: kThreads.
// Dynamic shared memory: steps x (2 R_pad + K_tile + 2) acc_t.
template <typename scalar_t, typename acc_t, Pass kPass, int RT>
__global__ void __launch_bounds__(kThreads)
    scan_pass_kernel(ScanParams<scalar_t, acc_t> p, int rg, int stage_steps) {
  using Tr = PassTraits<scalar_t, acc_t, kPass>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  const int64_t H = p.heads, L = p.length, P = p.headdim, N = p.dstate;
  const int64_t R = Tr::kReducedIsN ? N : P, K = Tr::kReducedIsN ? P : N;
  const int64_t bh = blockIdx.x, b = bh / H, h = bh % H, g = h / p.per_group;
  const int kept_per_block = kThreads / rg;
  const int lane_r = threadIdx.x % rg, kl = threadIdx.x / rg;
  const int64_t k = int64_t{blockIdx.y} * kept_per_block + kl;
  const bool k_ok = k < K;
  const int r_pad = RT * rg;
  const int lane = threadIdx.x % 32;
  const bool leader = lane_r == 0;

  acc_t* sU = smem;
  acc_t* sR = sU + int64_t{stage_steps} * r_pad;
  acc_t* sV = sR + int64_t{stage_steps} * r_pad;
  acc_t* sPre = sV + int64_t{stage_steps} * kept_per_block;
  acc_t* sD = sPre + stage_steps;

  // time range
  int64_t t_begin = 0, t_end = L;
  if constexpr (kPass == Pass::kState) {
    t_begin = int64_t{blockIdx.z} * kSsdCheckpointSteps;
    t_end = std::min<int64_t>(L, t_begin + kSsdCheckpointSteps);
  }

  // state element j: reduced index r = lane_r + rg j, kept index k; (p, n) = (k, r) or (r, k)
  auto state_index = [&](int j) -> int64_t {
    const int64_t r = lane_r + int64_t{rg} * j;
    return Tr::kReducedIsN ? k * N + r : r * N + k;
  };
  auto r_ok = [&](int j) { return lane_r + int64_t{rg} * j < R; };

  acc_t s[RT];
  const acc_t* start = nullptr;
  if constexpr (kPass == Pass::kFwd) start = p.init ? p.init + bh * P * N : nullptr;
  if constexpr (kPass == Pass::kState) start = p.ck + (bh * p.chunks + blockIdx.z) * P * N;
  if constexpr (kPass == Pass::kGradB || kPass == Pass::kGradX) {
    start = p.init ? p.init + bh * P * N : nullptr;
  }
#pragma unroll
  for (int j = 0; j < RT; ++j) s[j] = (start && k_ok && r_ok(j)) ? start[state_index(j)] : acc_t(0);
  if constexpr (kPass == Pass::kFwd) {
    if (p.chunks > 0 && k_ok) {
      acc_t* dst = p.ck + bh * p.chunks * P * N;
#pragma unroll
      for (int j = 0; j < RT; ++j)
        if (r_ok(j)) dst[state_index(j)] = s[j];
    }
  }
  acc_t gd_sum = 0;  // gradX: sum_t gy x for this p

  const int64_t steps_total = t_end - t_begin;
  for (int64_t done = 0; done < steps_total; done += stage_steps) {
    const int steps = static_cast<int>(std::min<int64_t>(stage_steps, steps_total - done));
    // stage step i of this block is time t(i): in processing order
    auto time_of = [&](int i) -> int64_t {
      return Tr::kReverse ? t_end - 1 - done - i : t_begin + done + i;
    };
    __syncthreads();
    for (int e = threadIdx.x; e < steps * r_pad; e += kThreads) {
      const int i = e / r_pad, r = e % r_pad;
      const int64_t t = time_of(i);
      acc_t u = 0, rv = 0;
      if (r < R) {
        if constexpr (kPass == Pass::kFwd || kPass == Pass::kGradX) {
          const scalar_t* Brow = p.B.p + b * p.B.s0 + t * p.B.s1 + g * p.B.s2;
          const scalar_t* Crow = p.C.p + b * p.C.s0 + t * p.C.s1 + g * p.C.s2;
          u = static_cast<acc_t>(kPass == Pass::kFwd ? Brow[r] : Crow[r]);
          rv = static_cast<acc_t>(kPass == Pass::kFwd ? Crow[r] : Brow[r]);
        } else {
          const scalar_t* xrow = p.x.p + b * p.x.s0 + t * p.x.s1 + h * p.x.s2;
          const scalar_t* grow = p.gy.p + b * p.gy.s0 + t * p.gy.s1 + h * p.gy.s2;
          if constexpr (kPass == Pass::kState) {
            u = p.d[bh * L + t] * static_cast<acc_t>(xrow[r]);
            rv = static_cast<acc_t>(grow[r]);
          } else {
            u = static_cast<acc_t>(grow[r]);
            rv = static_cast<acc_t>(xrow[r]);
          }
        }
      }
      sU[e] = u;
      sR[e] = rv;
    }
    for (int e = threadIdx.x; e < steps * kept_per_block; e += kThreads) {
      const int i = e / kept_per_block;
      const int64_t kk = int64_t{blockIdx.y} * kept_per_block + e % kept_per_block;
      const int64_t t = time_of(i);
      acc_t v = 0;
      if (kk < K) {
        if constexpr (kPass == Pass::kFwd) {
          v = p.d[bh * L + t] *
              static_cast<acc_t>(p.x.p[b * p.x.s0 + t * p.x.s1 + h * p.x.s2 + kk]);
        } else if constexpr (kPass == Pass::kState) {
          v = static_cast<acc_t>(p.B.p[b * p.B.s0 + t * p.B.s1 + g * p.B.s2 + kk]);
        } else if constexpr (kPass == Pass::kGradB) {
          v = static_cast<acc_t>(p.C.p[b * p.C.s0 + t * p.C.s1 + g * p.C.s2 + kk]);
        } else {
          v = static_cast<acc_t>(p.gy.p[b * p.gy.s0 + t * p.gy.s1 + h * p.gy.s2 + kk]);
        }
      }
      sV[e] = v;
    }
    for (int i = threadIdx.x; i < steps; i += kThreads) {
      const int64_t t = time_of(i);
      acc_t pre;
      if constexpr (Tr::kReverse) {
        pre = t == L - 1 ? acc_t(1) : p.a[bh * L + t + 1];
      } else {
        pre = p.a[bh * L + t];
      }
      sPre[i] = pre;
      sD[i] = p.d[bh * L + t];
    }
    __syncthreads();

    for (int i = 0; i < steps; ++i) {
      const int64_t t = time_of(i);
      const acc_t* u = sU + int64_t{i} * r_pad;
      const acc_t* rv = sR + int64_t{i} * r_pad;
      const acc_t v = sV[int64_t{i} * kept_per_block + kl];
      const acc_t pre = sPre[i];
#pragma unroll
      for (int j = 0; j < RT; ++j) s[j] *= pre;
      if constexpr (kPass == Pass::kState) {
        if (t == L - 1 && p.init != nullptr) {  // here init = grad_final_state
          acc_t part = 0;
#pragma unroll
          for (int j = 0; j < RT; ++j)
            if (k_ok && r_ok(j)) part += s[j] * p.init[bh * P * N + state_index(j)];
          part = leaders_sum(group_sum(part, rg), rg);
          if (lane == 0) atomicAdd(p.fin + bh, part);
        }
      }
      acc_t acc = 0, side = 0;  // side: U . R over the reduced dim (d gy . x or C . B)
      if constexpr (Tr::kReduceFirst) {
#pragma unroll
        for (int j = 0; j < RT; ++j) {
          acc += rv[lane_r + rg * j] * s[j];
          side += u[lane_r + rg * j] * rv[lane_r + rg * j];
        }
      }
#pragma unroll
      for (int j = 0; j < RT; ++j) s[j] += u[lane_r + rg * j] * v;
      if constexpr (!Tr::kReduceFirst) {
#pragma unroll
        for (int j = 0; j < RT; ++j) acc += rv[lane_r + rg * j] * s[j];
      }
      acc = group_sum(acc, rg);
      if constexpr (Tr::kReduceFirst) side = group_sum(side, rg);

      if constexpr (kPass == Pass::kFwd) {
        if (leader && k_ok) {
          const scalar_t xv = p.x.p[b * p.x.s0 + t * p.x.s1 + h * p.x.s2 + k];
          acc_t out = acc;
          if (p.Dv) out += p.Dv[h * P + k] * static_cast<acc_t>(xv);
          p.y[((b * L + t) * H + h) * P + k] = static_cast<scalar_t>(out);
        }
        if ((t + 1) % kSsdCheckpointSteps == 0 && t + 1 < L && k_ok) {
          acc_t* dst = p.ck + (bh * p.chunks + (t + 1) / kSsdCheckpointSteps) * P * N;
#pragma unroll
          for (int j = 0; j < RT; ++j)
            if (r_ok(j)) dst[state_index(j)] = s[j];
        }
      } else if constexpr (kPass == Pass::kState) {
        // acc = a_t S_{t-1}^T gy_t (kept n); side = d_t gy_t . x_t
        acc_t cgc_part = 0;
        if (leader && k_ok) {
          const acc_t bk = v;  // B_t[k]
          atomicAdd(p.gC + ((b * L + t) * p.groups + g) * N + k, acc + side * bk);
          cgc_part = acc * static_cast<acc_t>(p.C.p[b * p.C.s0 + t * p.C.s1 + g * p.C.s2 + k]);
        }
        cgc_part = leaders_sum(cgc_part, rg);
        if (lane == 0) atomicAdd(p.cgc + bh * L + t, cgc_part);
      } else if constexpr (kPass == Pass::kGradB) {
        if (leader && k_ok) atomicAdd(p.gB + ((b * L + t) * p.groups + g) * N + k, sD[i] * acc);
        if (t > 0 && t % kSsdCheckpointSteps == 0) {
          const acc_t* S = p.ck + (bh * p.chunks + t / kSsdCheckpointSteps) * P * N;
          acc_t part = 0;
#pragma unroll
          for (int j = 0; j < RT; ++j)
            if (k_ok && r_ok(j)) part += s[j] * S[state_index(j)];
          part = leaders_sum(group_sum(part, rg), rg);
          if (lane == 0) {
            atomicAdd(p.anchor + bh * p.chunks + t / kSsdCheckpointSteps, p.a[bh * L + t] * part);
          }
        }
      } else {  // kGradX: acc = a_{t+1} G_{t+1} B_t (kept p); side = C_t . B_t
        acc_t q_part = 0, g_part = 0;
        if (leader && k_ok) {
          const acc_t gv = v;
          const acc_t xv = static_cast<acc_t>(p.x.p[b * p.x.s0 + t * p.x.s1 + h * p.x.s2 + k]);
          const acc_t gb = acc + side * gv;
          acc_t out = sD[i] * gb;
          if (p.Dv) out += p.Dv[h * P + k] * gv;
          p.gx[((b * L + t) * H + h) * P + k] = static_cast<scalar_t>(out);
          q_part = xv * acc;
          g_part = xv * gv;
          gd_sum += gv * xv;
        }
        q_part = leaders_sum(q_part, rg);
        g_part = leaders_sum(g_part, rg);
        if (lane == 0) {
          atomicAdd(p.xaq + bh * L + t, q_part);
          atomicAdd(p.xgy + bh * L + t, g_part);
        }
        if (h % p.per_group == 0 && blockIdx.y == 0 && threadIdx.x == 0) {
          p.cb[(b * p.groups + g) * L + t] = side;
        }
      }
    }
  }

  if constexpr (kPass == Pass::kFwd) {
    if (k_ok) {
#pragma unroll
      for (int j = 0; j < RT; ++j)
        if (r_ok(j)) p.final_state[bh * P * N + state_index(j)] = s[j];
    }
  } else if constexpr (kPass == Pass::kGradB) {
    if (k_ok) {
      const acc_t scale = L > 0 ? p.a[bh * L] : acc_t(1);
#pragma unroll
      for (int j = 0; j < RT; ++j)
        if (r_ok(j)) p.gS0[bh * P * N + state_index(j)] = scale * s[j];
    }
  } else if constexpr (kPass == Pass::kGradX) {
    if (leader && k_ok) p.gD[bh * P + k] = gd_sum;
  }
}

// d_t = softplus?(dt + dt_bias), a_t = exp(d_t A), laid out (B, H, L).
template <typename dt_t, typename acc_t>
__global__ void step_table_kernel(const dt_t* dt, int64_t dts0, int64_t dts1, int64_t dts2,
                                  const acc_t* A, const acc_t* bias, bool softplus, int64_t batch,
                                  int64_t length, int64_t heads, acc_t* d, acc_t* a) {
  const int64_t total = batch * heads * length;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = e % length, bh = e / length, b = bh / heads, h = bh % heads;
    acc_t v = static_cast<acc_t>(dt[b * dts0 + t * dts1 + h * dts2]) + (bias ? bias[h] : acc_t(0));
    if (softplus) v = v > acc_t(20) ? v : log1p(exp(v));
    d[e] = v;
    a[e] = exp(v * A[h]);
  }
}

// Per (b, h), sequential in time (double): g(log a)_t, then grad dt, and (B, H) partial sums for
// A and dt_bias. Mirrors dt_pass in csrc/cpu/ssd_bwd.cpp.
template <typename dt_t, typename acc_t>
__global__ void dt_grad_kernel(const dt_t* dt, int64_t dts0, int64_t dts1, int64_t dts2,
                               const acc_t* A, const acc_t* bias, bool softplus, int64_t batch,
                               int64_t length, int64_t heads, int64_t groups, int64_t per_group,
                               int64_t chunks, const acc_t* d, const acc_t* cb, const acc_t* cgc,
                               const acc_t* xaq, const acc_t* xgy, const acc_t* fin,
                               const acc_t* anchor, acc_t* gdt, acc_t* gA, acc_t* gbias) {
  const int64_t bh = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (bh >= batch * heads) return;
  const int64_t b = bh / heads, h = bh % heads, g = h / per_group, L = length;
  double run = fin[bh], ga = 0, gb = 0;
  for (int64_t t = L - 1; t >= 0; --t) {
    if (t + 1 < L && (t + 1) % kSsdCheckpointSteps == 0) {
      run = anchor[bh * chunks + (t + 1) / kSsdCheckpointSteps];
    }
    const double dd = d[bh * L + t], q = xaq[bh * L + t];
    run += t == L - 1 ? double(cgc[bh * L + t]) : double(cgc[bh * L + t]) - dd * q;
    const double x_gb = q + double(cb[(b * groups + g) * L + t]) * double(xgy[bh * L + t]);
    double grad = run * double(A[h]) + x_gb;
    ga += run * dd;
    if (softplus) {
      const double raw = double(static_cast<acc_t>(dt[b * dts0 + t * dts1 + h * dts2])) +
                         (bias ? double(bias[h]) : 0.0);
      grad *= raw > 20.0 ? 1.0 : 1.0 / (1.0 + exp(-raw));
    }
    gb += grad;
    gdt[(b * L + t) * heads + h] = static_cast<acc_t>(grad);
  }
  gA[bh] = static_cast<acc_t>(ga);
  gbias[bh] = static_cast<acc_t>(gb);
}

// One decode step per (b, h): groups of rg lanes hold one p and RT n's each.
template <typename scalar_t, typename acc_t, typename state_t, int RT>
__global__ void __launch_bounds__(kThreads)
    update_kernel(state_t* state, int64_t ss0, int64_t ss1, int64_t ss2, Operand<scalar_t> x,
                  Operand<scalar_t> B, Operand<scalar_t> C, const acc_t* dt, const acc_t* A,
                  const acc_t* Dv, const acc_t* bias, bool softplus, int64_t heads, int64_t P,
                  int64_t N, int64_t per_group, int rg, scalar_t* y) {
  const int64_t bh = blockIdx.x, b = bh / heads, h = bh % heads, g = h / per_group;
  const int kept_per_block = kThreads / rg;
  const int lane_r = threadIdx.x % rg;
  const int64_t pp = int64_t{blockIdx.y} * kept_per_block + threadIdx.x / rg;
  acc_t d = dt[bh] + (bias ? bias[h] : acc_t(0));
  if (softplus) d = d > acc_t(20) ? d : log1p(exp(d));
  const acc_t a = exp(d * A[h]);
  const bool ok = pp < P;
  const acc_t xv = ok ? static_cast<acc_t>(x.p[b * x.s0 + h * x.s1 + pp]) : acc_t(0);
  const scalar_t* Brow = B.p + b * B.s0 + g * B.s1;
  const scalar_t* Crow = C.p + b * C.s0 + g * C.s1;
  state_t* row = state + b * ss0 + h * ss1 + pp * ss2;
  acc_t acc = 0;
#pragma unroll
  for (int j = 0; j < RT; ++j) {
    const int64_t n = lane_r + int64_t{rg} * j;
    if (ok && n < N) {
      const acc_t sv = a * static_cast<acc_t>(row[n]) + d * xv * static_cast<acc_t>(Brow[n]);
      row[n] = static_cast<state_t>(sv);
      acc += sv * static_cast<acc_t>(Crow[n]);
    }
  }
  acc = group_sum(acc, rg);
  if (ok && lane_r == 0) {
    if (Dv) acc += Dv[h * P + pp] * xv;
    y[bh * P + pp] = static_cast<scalar_t>(acc);
  }
}

// Elements per thread along the reduced dimension and lanes per group: RT * RG >= R.
struct Split {
  int rt, rg;
};

Split split_reduced(int64_t R) {
  const int rt = R <= 64 ? 8 : (R <= 256 ? 16 : 32);
  int rg = 1;
  while (int64_t{rt} * rg < R) rg *= 2;
  return {rt, rg};
}

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

void check_cuda_sizes(const at::Tensor& x, const at::Tensor& B) {
  TORCH_CHECK(x.size(-1) <= kMaxReduced && B.size(-1) <= kMaxReduced,
              std::string("mblm: ssd CUDA kernels support head dims P and state sizes N up to ") +
                  std::to_string(kMaxReduced) + ", got x of shape " + shape_str(x) +
                  " and B of shape " + shape_str(B));
}

template <typename scalar_t, typename acc_t, Pass kPass>
void launch_scan_pass(const ScanParams<scalar_t, acc_t>& p, int64_t R, int64_t K, int64_t gridz,
                      cudaStream_t stream) {
  const Split sp = split_reduced(R);
  const int kept_per_block = kThreads / sp.rg;
  const int r_pad = sp.rt * sp.rg;
  const int64_t per_step = (2 * int64_t{r_pad} + kept_per_block + 2) * int64_t(sizeof(acc_t));
  const int steps =
      static_cast<int>(std::clamp<int64_t>(48 * 1024 / per_step, 1, kMaxStepsPerStage));
  const size_t smem = static_cast<size_t>(steps * per_step);
  const dim3 grid(static_cast<unsigned>(p.batch * p.heads),
                  static_cast<unsigned>(ceil_div(K, kept_per_block)), static_cast<unsigned>(gridz));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  switch (sp.rt) {
    case 8:
      scan_pass_kernel<scalar_t, acc_t, kPass, 8>
          <<<grid, kThreads, smem, stream>>>(p, sp.rg, steps);
      break;
    case 16:
      scan_pass_kernel<scalar_t, acc_t, kPass, 16>
          <<<grid, kThreads, smem, stream>>>(p, sp.rg, steps);
      break;
    default:
      scan_pass_kernel<scalar_t, acc_t, kPass, 32>
          <<<grid, kThreads, smem, stream>>>(p, sp.rg, steps);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_step_table(const at::Tensor& dt, const at::Tensor& A, const at::Tensor& bias,
                       bool softplus, int64_t batch, int64_t length, int64_t heads, acc_t* d,
                       acc_t* a, cudaStream_t stream) {
  const int64_t total = batch * heads * length;
  if (total == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256), 65535));
  const acc_t* bias_p = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dt.scalar_type(), "ssd_step_table", [&] {
        step_table_kernel<scalar_t, acc_t><<<blocks, 256, 0, stream>>>(
            dt.const_data_ptr<scalar_t>(), dt.stride(0), dt.stride(1), dt.stride(2),
            A.const_data_ptr<acc_t>(), bias_p, softplus, batch, length, heads, d, a);
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct HeadTensors {
  at::Tensor A, D, bias;
};

HeadTensors head_tensors(const at::Tensor& A, const std::optional<at::Tensor>& D,
                         const std::optional<at::Tensor>& bias, at::ScalarType cdt, int64_t heads,
                         int64_t headdim) {
  HeadTensors out;
  out.A = A.to(cdt).contiguous();
  if (D.has_value()) {
    at::Tensor d = D->to(cdt);
    out.D = (d.dim() == 1 ? d.view({heads, 1}).expand({heads, headdim}) : d).contiguous();
  }
  if (bias.has_value()) out.bias = bias->to(cdt).contiguous();
  return out;
}

at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

bool capturing(const at::Tensor& t) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(t.get_device()), &status));
  return status != cudaStreamCaptureStatusNone;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ssd_fwd_cuda(
    const at::Tensor& x_in, const at::Tensor& dt_in, const at::Tensor& A, const at::Tensor& B_in,
    const at::Tensor& C_in, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
    const std::optional<at::Tensor>& initial_state) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_ssd_fwd_args(x_in, dt_in, A, B_in, C_in, D, dt_bias, initial_state, !capturing(x_in));
  const at::Tensor x = last_dim_contiguous(x_in), B = last_dim_contiguous(B_in);
  const at::Tensor C = last_dim_contiguous(C_in);
  const int64_t batch = x.size(0), L = x.size(1), H = x.size(2), P = x.size(3);
  const int64_t G = B.size(2), N = B.size(3), chunks = ssd_num_checkpoints(L);
  const auto cdt = ssd_compute_dtype(x.scalar_type());
  const auto opts = x.options().dtype(cdt);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor final_state = at::zeros({batch, H, P, N}, opts);
  at::Tensor checkpoints = at::zeros({batch, H, chunks, P, N}, opts);
  if (final_state.numel() == 0) {
    if (y.numel() > 0) {
      if (D.has_value()) {
        const at::Tensor Dc = D->to(cdt);
        y.copy_(at::mul(x.to(cdt), Dc.dim() == 1 ? Dc.view({H, 1}) : Dc));
      } else {
        y.zero_();
      }
    }
    return {y, final_state, checkpoints};
  }
  check_cuda_sizes(x, B);
  const HeadTensors ht = head_tensors(A, D, dt_bias, cdt, H, P);
  at::Tensor init;
  if (initial_state.has_value()) init = initial_state->to(cdt).contiguous();
  at::Tensor da = at::empty({2, batch, H, L}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ssd_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* d = da.data_ptr<acc_t>();
    acc_t* a = d + batch * H * L;
    launch_step_table<acc_t>(dt_in, ht.A, ht.bias, dt_softplus, batch, L, H, d, a, stream);
    ScanParams<scalar_t, acc_t> p{};
    p.batch = batch, p.length = L, p.heads = H, p.headdim = P, p.groups = G, p.dstate = N;
    p.per_group = H / G, p.chunks = chunks;
    p.x = operand<scalar_t>(x), p.B = operand<scalar_t>(B), p.C = operand<scalar_t>(C);
    p.d = d, p.a = a;
    p.Dv = ht.D.defined() ? ht.D.const_data_ptr<acc_t>() : nullptr;
    p.init = init.defined() ? init.const_data_ptr<acc_t>() : nullptr;
    p.ck = checkpoints.data_ptr<acc_t>();
    p.y = y.data_ptr<scalar_t>();
    p.final_state = final_state.data_ptr<acc_t>();
    launch_scan_pass<scalar_t, acc_t, Pass::kFwd>(p, N, P, 1, stream);
  });
  return {y, final_state, checkpoints};
}

SsdGrads ssd_bwd_cuda(const at::Tensor& grad_y_in,
                      const std::optional<at::Tensor>& grad_final_state, const at::Tensor& x_in,
                      const at::Tensor& dt_in, const at::Tensor& A, const at::Tensor& B_in,
                      const at::Tensor& C_in, const std::optional<at::Tensor>& D,
                      const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                      const std::optional<at::Tensor>& initial_state,
                      const at::Tensor& checkpoints_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_ssd_bwd_args(grad_y_in, grad_final_state, x_in, dt_in, A, B_in, C_in, D, dt_bias,
                     initial_state, checkpoints_in, !capturing(x_in));
  const at::Tensor x = last_dim_contiguous(x_in), B = last_dim_contiguous(B_in);
  const at::Tensor C = last_dim_contiguous(C_in), gy = last_dim_contiguous(grad_y_in);
  const at::Tensor checkpoints = checkpoints_in.contiguous();
  const int64_t batch = x.size(0), L = x.size(1), H = x.size(2), P = x.size(3);
  const int64_t G = B.size(2), N = B.size(3), chunks = ssd_num_checkpoints(L);
  const auto cdt = ssd_compute_dtype(x.scalar_type());
  const auto opts = x.options().dtype(cdt);
  const auto contiguous = at::MemoryFormat::Contiguous;

  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(contiguous));
  at::Tensor gB = at::zeros({batch, L, G, N}, opts), gC = at::zeros({batch, L, G, N}, opts);
  at::Tensor gdt = at::zeros({batch, L, H}, opts);
  at::Tensor gA_bh = at::zeros({batch, H}, opts), gbias_bh = at::zeros({batch, H}, opts);
  at::Tensor gD_bhp = at::zeros({batch, H, P}, opts);
  at::Tensor gS0 = at::zeros({batch, H, P, N}, opts);

  if (gS0.numel() > 0) {
    check_cuda_sizes(x, B);
    const HeadTensors ht = head_tensors(A, D, dt_bias, cdt, H, P);
    at::Tensor gsf;
    if (grad_final_state.has_value()) gsf = grad_final_state->to(cdt).contiguous();
    at::Tensor da = at::empty({2, batch, H, L}, opts);
    at::Tensor sums = at::zeros({3, batch, H, L}, opts);  // C . aR, x . aQ, x . gy
    at::Tensor cb = at::zeros({batch, G, L}, opts);
    at::Tensor fin = at::zeros({batch, H}, opts);
    at::Tensor anchor = at::zeros({batch, H, chunks}, opts);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ssd_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      acc_t* d = da.data_ptr<acc_t>();
      acc_t* a = d + batch * H * L;
      launch_step_table<acc_t>(dt_in, ht.A, ht.bias, dt_softplus, batch, L, H, d, a, stream);
      ScanParams<scalar_t, acc_t> p{};
      p.batch = batch, p.length = L, p.heads = H, p.headdim = P, p.groups = G, p.dstate = N;
      p.per_group = H / G, p.chunks = chunks;
      p.x = operand<scalar_t>(x), p.B = operand<scalar_t>(B), p.C = operand<scalar_t>(C);
      p.gy = operand<scalar_t>(gy);
      p.d = d, p.a = a;
      p.Dv = ht.D.defined() ? ht.D.const_data_ptr<acc_t>() : nullptr;
      p.init = gsf.defined() ? gsf.const_data_ptr<acc_t>() : nullptr;
      p.ck = const_cast<acc_t*>(checkpoints.const_data_ptr<acc_t>());
      p.gC = gC.data_ptr<acc_t>(), p.gB = gB.data_ptr<acc_t>();
      p.gx = grad_x.data_ptr<scalar_t>();
      acc_t* sp = sums.data_ptr<acc_t>();
      p.cgc = sp, p.xaq = sp + batch * H * L, p.xgy = sp + 2 * batch * H * L;
      p.cb = cb.data_ptr<acc_t>(), p.fin = fin.data_ptr<acc_t>(),
      p.anchor = anchor.data_ptr<acc_t>();
      p.gS0 = gS0.data_ptr<acc_t>(), p.gD = gD_bhp.data_ptr<acc_t>();
      launch_scan_pass<scalar_t, acc_t, Pass::kState>(p, P, N, chunks, stream);
      launch_scan_pass<scalar_t, acc_t, Pass::kGradB>(p, P, N, 1, stream);
      launch_scan_pass<scalar_t, acc_t, Pass::kGradX>(p, N, P, 1, stream);
      const int64_t BH = batch * H;
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, dt_in.scalar_type(), "ssd_dt_grad", [&] {
            dt_grad_kernel<scalar_t, acc_t>
                <<<static_cast<unsigned>(ceil_div(BH, 64)), 64, 0, stream>>>(
                    dt_in.const_data_ptr<scalar_t>(), dt_in.stride(0), dt_in.stride(1),
                    dt_in.stride(2), ht.A.const_data_ptr<acc_t>(),
                    ht.bias.defined() ? ht.bias.const_data_ptr<acc_t>() : nullptr, dt_softplus,
                    batch, L, H, G, H / G, chunks, d, p.cb, p.cgc, p.xaq, p.xgy, p.fin, p.anchor,
                    gdt.data_ptr<acc_t>(), gA_bh.data_ptr<acc_t>(), gbias_bh.data_ptr<acc_t>());
          });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    if (D.has_value() && x.numel() > 0) {
      at::Tensor Dc = D->to(cdt);
      if (Dc.dim() == 1) Dc = Dc.view({H, 1});
      grad_x.copy_(at::mul(gy.to(cdt), Dc));
      gD_bhp = at::mul(gy.to(cdt), x.to(cdt)).sum(1);
    } else {
      grad_x.zero_();
    }
  }

  at::Tensor grad_D = at::empty({0}, opts), grad_bias = at::empty({0}, opts);
  at::Tensor grad_init = at::empty({0}, opts);
  if (D.has_value()) {
    grad_D = (D->dim() == 1 ? gD_bhp.sum({0, 2}) : gD_bhp.sum(0)).to(D->scalar_type());
  }
  if (dt_bias.has_value()) grad_bias = gbias_bh.sum(0).to(dt_bias->scalar_type());
  if (initial_state.has_value()) grad_init = gS0.to(initial_state->scalar_type());
  return {grad_x,
          gdt.to(dt_in.scalar_type()),
          gA_bh.sum(0).to(A.scalar_type()),
          gB.to(B.scalar_type()),
          gC.to(C.scalar_type()),
          grad_D,
          grad_bias,
          grad_init};
}

at::Tensor ssd_update_cuda(at::Tensor& state, const at::Tensor& x_in, const at::Tensor& dt,
                           const at::Tensor& A, const at::Tensor& B_in, const at::Tensor& C_in,
                           const std::optional<at::Tensor>& D,
                           const std::optional<at::Tensor>& dt_bias, bool dt_softplus) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_ssd_update_args(state, x_in, dt, A, B_in, C_in, D, dt_bias, !capturing(x_in));
  const at::Tensor x = last_dim_contiguous(x_in), B = last_dim_contiguous(B_in);
  const at::Tensor C = last_dim_contiguous(C_in);
  const int64_t batch = x.size(0), H = x.size(1), P = x.size(2), G = B.size(1), N = B.size(2);
  const auto cdt = ssd_compute_dtype(x.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  TORCH_CHECK(N <= kMaxReduced, std::string("mblm: ssd CUDA kernels support state sizes N up to ") +
                                    std::to_string(kMaxReduced) + ", got B of shape " +
                                    shape_str(B));
  const bool direct = state.size(-1) <= 1 || state.stride(-1) == 1;
  at::Tensor work = direct ? state : state.contiguous();
  const HeadTensors ht = head_tensors(A, D, dt_bias, cdt, H, P);
  const at::Tensor dtc = dt.to(cdt).contiguous();
  const Split sp = split_reduced(N);
  const int kept_per_block = kThreads / sp.rg;
  const dim3 grid(static_cast<unsigned>(batch * H),
                  static_cast<unsigned>(ceil_div(P, kept_per_block)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "ssd_update_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto launch = [&](auto* state_ptr) {
          using state_t = std::remove_pointer_t<decltype(state_ptr)>;
          const acc_t* Dp = ht.D.defined() ? ht.D.const_data_ptr<acc_t>() : nullptr;
          const acc_t* bp = ht.bias.defined() ? ht.bias.const_data_ptr<acc_t>() : nullptr;
          switch (sp.rt) {
            case 8:
              update_kernel<scalar_t, acc_t, state_t, 8><<<grid, kThreads, 0, stream>>>(
                  state_ptr, work.stride(0), work.stride(1), work.stride(2), operand3<scalar_t>(x),
                  operand3<scalar_t>(B), operand3<scalar_t>(C), dtc.const_data_ptr<acc_t>(),
                  ht.A.const_data_ptr<acc_t>(), Dp, bp, dt_softplus, H, P, N, H / G, sp.rg,
                  y.data_ptr<scalar_t>());
              break;
            case 16:
              update_kernel<scalar_t, acc_t, state_t, 16><<<grid, kThreads, 0, stream>>>(
                  state_ptr, work.stride(0), work.stride(1), work.stride(2), operand3<scalar_t>(x),
                  operand3<scalar_t>(B), operand3<scalar_t>(C), dtc.const_data_ptr<acc_t>(),
                  ht.A.const_data_ptr<acc_t>(), Dp, bp, dt_softplus, H, P, N, H / G, sp.rg,
                  y.data_ptr<scalar_t>());
              break;
            default:
              update_kernel<scalar_t, acc_t, state_t, 32><<<grid, kThreads, 0, stream>>>(
                  state_ptr, work.stride(0), work.stride(1), work.stride(2), operand3<scalar_t>(x),
                  operand3<scalar_t>(B), operand3<scalar_t>(C), dtc.const_data_ptr<acc_t>(),
                  ht.A.const_data_ptr<acc_t>(), Dp, bp, dt_softplus, H, P, N, H / G, sp.rg,
                  y.data_ptr<scalar_t>());
              break;
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (work.scalar_type() == cdt) {
          launch(work.data_ptr<acc_t>());
        } else {
          launch(work.data_ptr<scalar_t>());
        }
      });
  if (!direct) state.copy_(work);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mblm, CUDA, m) {
  m.impl("ssd_fwd", &ssd_fwd_cuda);
  m.impl("ssd_bwd", &ssd_bwd_cuda);
  m.impl("ssd_update", &ssd_update_cuda);
}

}  // namespace mblm
