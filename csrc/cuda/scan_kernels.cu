// Scan family, CUDA device code: scan_fwd, scan_bwd, scan_update kernels and their launchers.
// Knows only the structs of mblm/scan_params.h; the ATen side is csrc/cuda/scan.cu.
//
// Mapping (the CPU kernel's, csrc/cpu/scan.cpp, spread over threads): a block of 128 threads
// serves 16 channels of one batch row; 8 lanes per channel hold kS = ceil(N / 8) states each in
// registers (state n = lane + 8 s), so sums over n are 3 warp shuffles. Time runs through the
// block in chunks of kChunk = 64 steps (the checkpoint interval of scan_fwd): each chunk's B_t,
// C_t (shared by all channels) and the channels' u, delta, z are first copied into shared memory
// with loads that are coalesced for either layout (channel- or time-contiguous), converted to
// float32 and with bias / softplus / SiLU applied once per element.
//
// Backward: per chunk, last to first, the 8 lanes recompute the chunk's states from its
// checkpoint into a per-thread array (local memory, 64 x kS floats), then walk it backwards.
// grad_B / grad_C (sums over channels) are reduced over the warp's 4 channels with shuffles, over
// the block's 4 warps with shared-memory atomics, and across blocks with float32 global atomics;
// grad_A / grad_D / grad_delta_bias stay in registers over time and go to per-(batch, channel)
// partials that the front end sums over the batch.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mblm/scan_params.h"

namespace mblm {

namespace {

constexpr int kLanes = 8;      // lanes per channel
constexpr int kChannels = 16;  // channels per block
constexpr int kThreads = kLanes * kChannels;
constexpr int kChunk = 64;  // == kScanChunk (csrc/include/mblm/scan.h)
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(__expf(x)); }
__device__ __forceinline__ float softplus_grad(float x) {
  return x > 20.f ? 1.f : 1.f / (1.f + __expf(-x));
}
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

// Sum over the 8 lanes of a channel (aligned groups of 8 in the warp); every lane gets it.
__device__ __forceinline__ float lane_sum(float v) {
  v += __shfl_xor_sync(kFullMask, v, 4);
  v += __shfl_xor_sync(kFullMask, v, 2);
  v += __shfl_xor_sync(kFullMask, v, 1);
  return v;
}

// Sum over the 4 channels of a warp (lanes 8 apart); every lane gets it.
__device__ __forceinline__ float warp_channel_sum(float v) {
  v += __shfl_xor_sync(kFullMask, v, 8);
  v += __shfl_xor_sync(kFullMask, v, 16);
  return v;
}

template <typename T>
__device__ __forceinline__ const T* at(const ScanStrided& s, int64_t b, int64_t x, int64_t t) {
  return static_cast<const T*>(s.p) + b * s.sb + x * s.sx + t * s.st;
}

// dst[t * ld + x] = op(x, value at (x, t)) for t < nt, x < nx; 0 elsewhere in [kChunk][ld]. The
// thread-to-element order follows the smaller stride, so both layouts load coalesced.
template <typename T, typename Op>
__device__ void stage(float* dst, int ld, const T* base, int64_t sx, int64_t st, int nx, int nt,
                      Op op) {
  const bool x_fast = (sx < 0 ? -sx : sx) <= (st < 0 ? -st : st);
  for (int i = threadIdx.x; i < kChunk * ld; i += kThreads) {
    int t, x;
    if (x_fast) {
      t = i / ld, x = i % ld;
    } else {
      x = i / kChunk, t = i % kChunk;
    }
    float v = 0.f;
    if (t < nt && x < nx) v = op(x, static_cast<float>(base[x * sx + t * st]));
    dst[t * ld + x] = v;
  }
}

template <typename T>
__device__ void stage_plain(float* dst, int ld, const T* base, int64_t sx, int64_t st, int nx,
                            int nt) {
  stage(dst, ld, base, sx, st, nx, nt, [](int, float v) { return v; });
}

// base[x * sx + t * st] = src[t * ld + x] for t < nt, x < nx.
template <typename T>
__device__ void unstage(const float* src, int ld, T* base, int64_t sx, int64_t st, int nx, int nt) {
  const bool x_fast = (sx < 0 ? -sx : sx) <= (st < 0 ? -st : st);
  for (int i = threadIdx.x; i < nt * nx; i += kThreads) {
    int t, x;
    if (x_fast) {
      t = i / nx, x = i % nx;
    } else {
      x = i / nt, t = i % nt;
    }
    base[x * sx + t * st] = static_cast<T>(src[t * ld + x]);
  }
}

// Shared memory of the forward: B, C [kChunk][8 kS]; u, dt, silu(z), y [kChunk][kChannels].
template <int kS>
constexpr size_t fwd_smem_bytes() {
  return sizeof(float) * kChunk * (2 * kLanes * kS + 4 * kChannels);
}

// Backward: B, C, grad_B, grad_C [kChunk][8 kS]; u, dt, dsp, z, g, y_pre, gu, gdelta, gz
// [kChunk][kChannels].
template <int kS>
constexpr size_t bwd_smem_bytes() {
  return sizeof(float) * kChunk * (4 * kLanes * kS + 9 * kChannels);
}

template <typename T, int kS>
__global__ void __launch_bounds__(kThreads) scan_fwd_kernel(const ScanFwdParams p) {
  extern __shared__ float smem[];
  constexpr int NP = kLanes * kS;
  float* Bs = smem;
  float* Cs = Bs + kChunk * NP;
  float* us = Cs + kChunk * NP;
  float* dts = us + kChunk * kChannels;
  float* zs = dts + kChunk * kChannels;
  float* ys = zs + kChunk * kChannels;

  const int lane = threadIdx.x % kLanes, ch = threadIdx.x / kLanes;
  const int64_t b = blockIdx.x, d0 = int64_t{blockIdx.y} * kChannels, d = d0 + ch;
  const int64_t dim = p.dim, len = p.len;
  const int N = p.n;
  const bool valid = d < dim;
  const int nd = static_cast<int>(dim - d0 < kChannels ? dim - d0 : kChannels);
  const int64_t nc = (len + kChunk - 1) / kChunk;
  const bool has_z = p.z.p != nullptr;

  float A_r[kS], h[kS];
#pragma unroll
  for (int s = 0; s < kS; ++s) {
    const int n = lane + kLanes * s;
    const bool ok = valid && n < N;
    A_r[s] = ok ? p.A[d * N + n] : 0.f;
    h[s] = ok && p.init ? p.init[(b * dim + d) * N + n] : 0.f;
  }
  const float Dd = valid && p.D ? p.D[d] : 0.f;
  const float* bias = p.bias;
  const bool sp = p.softplus;

  for (int64_t c = 0; c < nc; ++c) {
    const int64_t t0 = c * kChunk;
    const int nt = static_cast<int>(len - t0 < kChunk ? len - t0 : kChunk);
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      const int n = lane + kLanes * s;
      if (valid && n < N) p.ckpt[((b * nc + c) * N + n) * dim + d] = h[s];
    }
    __syncthreads();  // the previous chunk's reads of shared memory are done
    stage_plain(Bs, NP, at<T>(p.B, b, 0, t0), p.B.sx, p.B.st, N, nt);
    stage_plain(Cs, NP, at<T>(p.C, b, 0, t0), p.C.sx, p.C.st, N, nt);
    stage_plain(us, kChannels, at<T>(p.u, b, d0, t0), p.u.sx, p.u.st, nd, nt);
    stage(dts, kChannels, at<T>(p.delta, b, d0, t0), p.delta.sx, p.delta.st, nd, nt,
          [&](int x, float v) {
            const float xb = v + (bias ? bias[d0 + x] : 0.f);
            return sp ? softplus(xb) : xb;
          });
    if (has_z) {
      stage(zs, kChannels, at<T>(p.z, b, d0, t0), p.z.sx, p.z.st, nd, nt,
            [](int, float v) { return v * sigmoid(v); });
    }
    __syncthreads();
    for (int t = 0; t < nt; ++t) {
      const float dt = dts[t * kChannels + ch], u = us[t * kChannels + ch];
      const float dtu = dt * u;
      float part = 0.f;
#pragma unroll
      for (int s = 0; s < kS; ++s) {
        const int n = lane + kLanes * s;
        h[s] = __expf(dt * A_r[s]) * h[s] + dtu * Bs[t * NP + n];
        part += h[s] * Cs[t * NP + n];
      }
      part = lane_sum(part);
      if (lane == 0) {
        float y = part + Dd * u;
        if (has_z) y *= zs[t * kChannels + ch];
        ys[t * kChannels + ch] = y;
      }
    }
    __syncthreads();
    unstage(ys, kChannels, const_cast<T*>(at<T>(p.y, b, d0, t0)), p.y.sx, p.y.st, nd, nt);
  }
#pragma unroll
  for (int s = 0; s < kS; ++s) {
    const int n = lane + kLanes * s;
    if (valid && n < N) p.final_state[(b * dim + d) * N + n] = h[s];
  }
}

template <typename T, int kS>
__global__ void __launch_bounds__(kThreads) scan_bwd_kernel(const ScanBwdParams q) {
  extern __shared__ float smem[];
  constexpr int NP = kLanes * kS;
  constexpr int CH = kChunk * kChannels;
  float* Bs = smem;
  float* Cs = Bs + kChunk * NP;
  float* gBs = Cs + kChunk * NP;
  float* gCs = gBs + kChunk * NP;
  float* us = gCs + kChunk * NP;
  float* dts = us + CH;
  float* dsps = dts + CH;
  float* zs = dsps + CH;
  float* gs = zs + CH;
  float* yps = gs + CH;
  float* gus = yps + CH;
  float* gds = gus + CH;
  float* gzs = gds + CH;

  const ScanFwdParams& p = q.f;
  const int lane = threadIdx.x % kLanes, ch = threadIdx.x / kLanes;
  const int64_t b = blockIdx.x, d0 = int64_t{blockIdx.y} * kChannels, d = d0 + ch;
  const int64_t dim = p.dim, len = p.len;
  const int N = p.n;
  const bool valid = d < dim;
  const int nd = static_cast<int>(dim - d0 < kChannels ? dim - d0 : kChannels);
  const int64_t nc = (len + kChunk - 1) / kChunk;
  const bool has_z = p.z.p != nullptr;
  const float* bias = p.bias;
  const bool sp = p.softplus;

  float A_r[kS], gh[kS], gA[kS], h0[kS];
  float hs[kChunk][kS];  // the chunk's states h_t (local memory)
#pragma unroll
  for (int s = 0; s < kS; ++s) {
    const int n = lane + kLanes * s;
    const bool ok = valid && n < N;
    A_r[s] = ok ? p.A[d * N + n] : 0.f;
    gh[s] = ok && q.g_final ? q.g_final[(b * dim + d) * N + n] : 0.f;
    gA[s] = 0.f;
  }
  const float Dd = valid && p.D ? p.D[d] : 0.f;
  float gD = 0.f, gbias = 0.f;

  for (int64_t c = nc - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk;
    const int nt = static_cast<int>(len - t0 < kChunk ? len - t0 : kChunk);
    __syncthreads();
    stage_plain(Bs, NP, at<T>(p.B, b, 0, t0), p.B.sx, p.B.st, N, nt);
    stage_plain(Cs, NP, at<T>(p.C, b, 0, t0), p.C.sx, p.C.st, N, nt);
    for (int i = threadIdx.x; i < kChunk * NP; i += kThreads) gBs[i] = gCs[i] = 0.f;
    stage_plain(us, kChannels, at<T>(p.u, b, d0, t0), p.u.sx, p.u.st, nd, nt);
    stage(dts, kChannels, at<T>(p.delta, b, d0, t0), p.delta.sx, p.delta.st, nd, nt,
          [&](int x, float v) {
            const float xb = v + (bias ? bias[d0 + x] : 0.f);
            return sp ? softplus(xb) : xb;
          });
    stage(
        dsps, kChannels, at<T>(p.delta, b, d0, t0), p.delta.sx, p.delta.st, nd, nt,
        [&](int x, float v) { return sp ? softplus_grad(v + (bias ? bias[d0 + x] : 0.f)) : 1.f; });
    stage_plain(gs, kChannels, at<T>(q.gy, b, d0, t0), q.gy.sx, q.gy.st, nd, nt);
    if (has_z) stage_plain(zs, kChannels, at<T>(p.z, b, d0, t0), p.z.sx, p.z.st, nd, nt);
    __syncthreads();

    // Recompute the chunk from its checkpoint.
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      const int n = lane + kLanes * s;
      h0[s] = valid && n < N ? p.ckpt[((b * nc + c) * N + n) * dim + d] : 0.f;
    }
    {
      float h[kS];
#pragma unroll
      for (int s = 0; s < kS; ++s) h[s] = h0[s];
      for (int t = 0; t < nt; ++t) {
        const float dt = dts[t * kChannels + ch], u = us[t * kChannels + ch];
        const float dtu = dt * u;
        float part = 0.f;
#pragma unroll
        for (int s = 0; s < kS; ++s) {
          const int n = lane + kLanes * s;
          h[s] = __expf(dt * A_r[s]) * h[s] + dtu * Bs[t * NP + n];
          hs[t][s] = h[s];
          part += h[s] * Cs[t * NP + n];
        }
        part = lane_sum(part);
        if (lane == 0) yps[t * kChannels + ch] = part + Dd * u;
      }
    }

    // Walk it backwards.
    for (int t = nt - 1; t >= 0; --t) {
      const int o = t * kChannels + ch;
      const float dt = dts[o], u = us[o], g = gs[o];
      const float dtu = dt * u;
      float gy = g, sz = 0.f, z = 0.f;
      if (has_z) {
        z = zs[o];
        sz = sigmoid(z);
        gy = g * z * sz;
      }
      float gdtu = 0.f, gdt = 0.f;
#pragma unroll
      for (int s = 0; s < kS; ++s) {
        const int n = lane + kLanes * s;
        const float hc = hs[t][s];
        const float hp = t > 0 ? hs[t - 1][s] : h0[s];
        gh[s] += gy * Cs[t * NP + n];
        float gCp = gy * hc, gBp = gh[s] * dtu;
        gdtu += gh[s] * Bs[t * NP + n];
        const float dA = __expf(dt * A_r[s]);
        const float qd = gh[s] * hp * dA;
        gdt += qd * A_r[s];
        gA[s] += qd * dt;
        gh[s] *= dA;
        gCp = warp_channel_sum(gCp);
        gBp = warp_channel_sum(gBp);
        if ((threadIdx.x & 31) < kLanes) {
          atomicAdd(&gCs[t * NP + n], gCp);
          atomicAdd(&gBs[t * NP + n], gBp);
        }
      }
      gdtu = lane_sum(gdtu);
      gdt = lane_sum(gdt);
      if (lane == 0) {
        gus[o] = gy * Dd + gdtu * dt;
        const float gd = (gdt + gdtu * u) * dsps[o];
        gds[o] = gd;
        gbias += gd;
        gD += gy * u;
        if (has_z) gzs[o] = g * yps[o] * sz * (1.f + z * (1.f - sz));
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nt * N; i += kThreads) {
      const int t = i / N, n = i % N;
      const int64_t g = (b * len + t0 + t) * N + n;
      atomicAdd(&q.gB_acc[g], gBs[t * NP + n]);
      atomicAdd(&q.gC_acc[g], gCs[t * NP + n]);
    }
    unstage(gus, kChannels, const_cast<T*>(at<T>(q.gu, b, d0, t0)), q.gu.sx, q.gu.st, nd, nt);
    unstage(gds, kChannels, const_cast<T*>(at<T>(q.gdelta, b, d0, t0)), q.gdelta.sx, q.gdelta.st,
            nd, nt);
    if (has_z) {
      unstage(gzs, kChannels, const_cast<T*>(at<T>(q.gz, b, d0, t0)), q.gz.sx, q.gz.st, nd, nt);
    }
  }
#pragma unroll
  for (int s = 0; s < kS; ++s) {
    const int n = lane + kLanes * s;
    if (valid && n < N) {
      q.gA_part[(b * dim + d) * N + n] = gA[s];
      q.g_init[(b * dim + d) * N + n] = gh[s];
    }
  }
  if (valid && lane == 0) {
    q.gD_part[b * dim + d] = gD;
    q.gbias_part[b * dim + d] = gbias;
  }
}

template <typename T, int kS>
__global__ void __launch_bounds__(kThreads) scan_update_kernel(const ScanUpdateParams p) {
  const int lane = threadIdx.x % kLanes, ch = threadIdx.x / kLanes;
  const int64_t b = blockIdx.x, d = int64_t{blockIdx.y} * kChannels + ch;
  const int64_t dim = p.dim;
  const int N = p.n;
  const bool valid = d < dim;
  float u = 0.f, dt = 0.f, z = 0.f;
  if (valid) {
    u = static_cast<float>(static_cast<const T*>(p.u.p)[b * p.u.sb + d * p.u.sx]);
    dt = static_cast<float>(static_cast<const T*>(p.delta.p)[b * p.delta.sb + d * p.delta.sx]);
    if (p.bias) dt += p.bias[d];
    if (p.softplus) dt = softplus(dt);
    if (p.z.p) z = static_cast<float>(static_cast<const T*>(p.z.p)[b * p.z.sb + d * p.z.sx]);
  }
  const float dtu = dt * u;
  float part = 0.f;
#pragma unroll
  for (int s = 0; s < kS; ++s) {
    const int n = lane + kLanes * s;
    if (valid && n < N) {
      float* h = p.state + (b * dim + d) * N + n;
      const float Bn = static_cast<float>(static_cast<const T*>(p.B.p)[b * p.B.sb + n * p.B.sx]);
      const float Cn = static_cast<float>(static_cast<const T*>(p.C.p)[b * p.C.sb + n * p.C.sx]);
      const float hn = __expf(dt * p.A[d * N + n]) * *h + dtu * Bn;
      *h = hn;
      part += hn * Cn;
    }
  }
  part = lane_sum(part);
  if (valid && lane == 0) {
    float y = part + (p.D ? p.D[d] : 0.f) * u;
    if (p.z.p) y *= z * sigmoid(z);
    static_cast<T*>(p.y)[b * dim + d] = static_cast<T>(y);
  }
}

dim3 scan_grid(int64_t batch, int64_t dim) {
  return dim3(static_cast<unsigned>(batch),
              static_cast<unsigned>((dim + kChannels - 1) / kChannels));
}

// Kernels asking for more than the default 48 KiB of dynamic shared memory must opt in.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(smem));
}

// Calls f.template operator()<kS>() with the states per lane that hold N: 1, 2, 4 or 8.
template <typename F>
cudaError_t state_switch(int n, F&& f) {
  if (n <= kLanes) return f.template operator()<1>();
  if (n <= 2 * kLanes) return f.template operator()<2>();
  if (n <= 4 * kLanes) return f.template operator()<4>();
  return f.template operator()<8>();
}

}  // namespace

template <typename T>
cudaError_t run_scan_fwd(const ScanFwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return cudaSuccess;
  return state_switch(p.n, [&]<int kS>() {
    constexpr size_t smem = fwd_smem_bytes<kS>();
    const cudaError_t err = allow_smem(scan_fwd_kernel<T, kS>, smem);
    if (err != cudaSuccess) return err;
    scan_fwd_kernel<T, kS><<<scan_grid(p.batch, p.dim), kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t run_scan_bwd(const ScanBwdParams& p, cudaStream_t stream) {
  if (p.f.batch == 0 || p.f.dim == 0) return cudaSuccess;
  return state_switch(p.f.n, [&]<int kS>() {
    constexpr size_t smem = bwd_smem_bytes<kS>();
    const cudaError_t err = allow_smem(scan_bwd_kernel<T, kS>, smem);
    if (err != cudaSuccess) return err;
    scan_bwd_kernel<T, kS><<<scan_grid(p.f.batch, p.f.dim), kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t run_scan_update(const ScanUpdateParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return cudaSuccess;
  return state_switch(p.n, [&]<int kS>() {
    scan_update_kernel<T, kS><<<scan_grid(p.batch, p.dim), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

#define MBLM_SCAN_INSTANTIATE(T)                                            \
  template cudaError_t run_scan_fwd<T>(const ScanFwdParams&, cudaStream_t); \
  template cudaError_t run_scan_bwd<T>(const ScanBwdParams&, cudaStream_t); \
  template cudaError_t run_scan_update<T>(const ScanUpdateParams&, cudaStream_t);

MBLM_SCAN_INSTANTIATE(float)
MBLM_SCAN_INSTANTIATE(c10::Half)
MBLM_SCAN_INSTANTIATE(c10::BFloat16)

}  // namespace mblm
