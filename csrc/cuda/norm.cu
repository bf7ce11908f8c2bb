// Norm family, CUDA kernels: rms_norm_fwd / rms_norm_bwd. Checks: csrc/ops/norm.cpp. Semantics:
// rms_norm_ref in mblm/ops/reference.py; the algorithm mirrors csrc/cpu/norm.cpp.
//
// One warp per row (grid-stride over rows): lanes walk the features, the sum of squares (forward)
// and dot(grad_y * g, u / c) (backward) are warp reductions. The token shift is addressing only:
// u[s] = [x[s, :keep], x[s - 1, keep:]] (0 at s = 0); the backward's adjoint writes the gradient
// of u[s, keep:] into row s - 1, so every element of grad_x is written by exactly one warp.
// grad_g is a column reduction done by a second kernel: per-chunk partial sums over rows
// (threadIdx.x on features: coalesced), then a small kernel summing the chunks in order
// (deterministic, no atomics). Inputs are made contiguous by the host code.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "mblm/norm.h"

namespace mblm {

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxGridY = 65535;
// Rows per grad_g partial-sum chunk (at least) and the most chunks.
constexpr int64_t kChunkRows = 64;
constexpr int64_t kMaxChunks = 1024;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.get_device()));
  return std::max(count, 1);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename scalar_t, typename acc_t>
struct NormParams {
  const scalar_t* x;
  const scalar_t* g;
  const scalar_t* grad_y;
  scalar_t* y;       // forward output
  scalar_t* grad_x;  // backward output
  acc_t* rms;        // forward: written; backward: read
  acc_t* partial;    // (n_chunks, d) grad_g partial sums
  scalar_t* grad_g;
  int64_t rows, seq, d, keep, chunk_rows, n_chunks;
  acc_t scale, eps;
};

// Feature i of the (shifted) row r.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t u_at(const NormParams<scalar_t, acc_t>& p, int64_t r, int64_t s,
                                      int64_t i) {
  if (i < p.keep) return static_cast<acc_t>(p.x[r * p.d + i]);
  return s == 0 ? acc_t(0) : static_cast<acc_t>(p.x[(r - 1) * p.d + i]);
}

template <typename scalar_t, typename acc_t>
__global__ void rms_norm_fwd_kernel(NormParams<scalar_t, acc_t> p) {
  const int lane = threadIdx.x;
  const int64_t warps = int64_t{gridDim.x} * blockDim.y;
  for (int64_t r = int64_t{blockIdx.x} * blockDim.y + threadIdx.y; r < p.rows; r += warps) {
    const int64_t s = r % p.seq;
    acc_t ss = 0;
    for (int64_t i = lane; i < p.d; i += kWarp) {
      const acc_t u = u_at(p, r, s, i);
      ss += u * u;
    }
    const acc_t norm = sqrt(warp_sum(ss)) * p.scale;
    const acc_t inv = acc_t(1) / (norm > p.eps ? norm : p.eps);
    for (int64_t i = lane; i < p.d; i += kWarp) {
      p.y[r * p.d + i] = static_cast<scalar_t>(u_at(p, r, s, i) * inv * static_cast<acc_t>(p.g[i]));
    }
    if (lane == 0) p.rms[r] = norm;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void rms_norm_bwd_x_kernel(NormParams<scalar_t, acc_t> p) {
  const int lane = threadIdx.x;
  const int64_t warps = int64_t{gridDim.x} * blockDim.y;
  const acc_t scale2 = p.scale * p.scale;
  for (int64_t r = int64_t{blockIdx.x} * blockDim.y + threadIdx.y; r < p.rows; r += warps) {
    const int64_t s = r % p.seq;
    const acc_t rms = p.rms[r];
    const acc_t inv = acc_t(1) / (rms > p.eps ? rms : p.eps);
    acc_t dot = 0;
    for (int64_t i = lane; i < p.d; i += kWarp) {
      const acc_t a = static_cast<acc_t>(p.grad_y[r * p.d + i]) * static_cast<acc_t>(p.g[i]);
      dot += a * (u_at(p, r, s, i) * inv);
    }
    // A clamped RMS is a constant: no radial term.
    const acc_t radial = rms < p.eps ? acc_t(0) : warp_sum(dot) * scale2;
    for (int64_t i = lane; i < p.d; i += kWarp) {
      const acc_t a = static_cast<acc_t>(p.grad_y[r * p.d + i]) * static_cast<acc_t>(p.g[i]);
      const acc_t gu = (a - u_at(p, r, s, i) * inv * radial) * inv;
      if (i < p.keep) {
        p.grad_x[r * p.d + i] = static_cast<scalar_t>(gu);
      } else {
        if (s != 0) p.grad_x[(r - 1) * p.d + i] = static_cast<scalar_t>(gu);
        if (s == p.seq - 1) p.grad_x[r * p.d + i] = scalar_t(0);
      }
    }
  }
}

// grid (feature tiles of 32, chunks of rows); block (32, kWarpsPerBlock).
template <typename scalar_t, typename acc_t>
__global__ void rms_norm_bwd_g_partial_kernel(NormParams<scalar_t, acc_t> p) {
  __shared__ acc_t part[kWarpsPerBlock][kWarp];
  const int64_t i = int64_t{blockIdx.x} * kWarp + threadIdx.x;
  for (int64_t c = blockIdx.y; c < p.n_chunks; c += gridDim.y) {
    acc_t acc = 0;
    if (i < p.d) {
      const int64_t r1 = min(p.rows, (c + 1) * p.chunk_rows);
      for (int64_t r = c * p.chunk_rows + threadIdx.y; r < r1; r += blockDim.y) {
        const acc_t rms = p.rms[r];
        const acc_t inv = acc_t(1) / (rms > p.eps ? rms : p.eps);
        acc += static_cast<acc_t>(p.grad_y[r * p.d + i]) * (u_at(p, r, r % p.seq, i) * inv);
      }
    }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && i < p.d) {
      acc_t sum = 0;
      for (int w = 0; w < kWarpsPerBlock; ++w) sum += part[w][threadIdx.x];
      p.partial[c * p.d + i] = sum;
    }
    __syncthreads();
  }
}

template <typename scalar_t, typename acc_t>
__global__ void rms_norm_bwd_g_reduce_kernel(NormParams<scalar_t, acc_t> p) {
  const int64_t step = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < p.d; i += step) {
    acc_t sum = 0;
    for (int64_t c = 0; c < p.n_chunks; ++c) sum += p.partial[c * p.d + i];
    p.grad_g[i] = static_cast<scalar_t>(sum);
  }
}

unsigned row_blocks(int64_t rows, int sms) {
  return static_cast<unsigned>(std::max<int64_t>(
      1, std::min({ceil_div(rows, kWarpsPerBlock), int64_t{sms} * 32, kMaxGridX})));
}

template <typename scalar_t, typename acc_t>
NormParams<scalar_t, acc_t> params_of(const at::Tensor& x, const at::Tensor& g, double scale,
                                      double eps, bool shift) {
  NormParams<scalar_t, acc_t> p{};
  p.x = x.const_data_ptr<scalar_t>();
  p.g = g.const_data_ptr<scalar_t>();
  p.d = x.size(-1);
  p.rows = p.d == 0 ? 0 : x.numel() / p.d;
  p.seq = shift ? x.size(-2) : 1;
  p.keep = shift ? token_shift_keep(p.d) : p.d;
  p.scale = static_cast<acc_t>(scale);
  p.eps = static_cast<acc_t>(eps);
  return p;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x_in, const at::Tensor& g_in,
                                                     double scale, double eps, bool shift) {
  check_rms_norm_fwd_args(x_in, g_in, scale, eps, shift);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto g = g_in.contiguous();
  auto y = at::empty(x.sizes(), x.options());
  auto rms = at::zeros(x.sizes().slice(0, x.dim() - 1),
                       x.options().dtype(rms_norm_stat_dtype(x.scalar_type())));
  if (x.numel() == 0) return {y, rms};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_fwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto p = params_of<scalar_t, acc_t>(x, g, scale, eps, shift);
        p.y = y.mutable_data_ptr<scalar_t>();
        p.rms = rms.mutable_data_ptr<acc_t>();
        rms_norm_fwd_kernel<scalar_t, acc_t>
            <<<row_blocks(p.rows, sm_count(x)), dim3(kWarp, kWarpsPerBlock), 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {y, rms};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& grad_y_in,
                                                     const at::Tensor& x_in, const at::Tensor& g_in,
                                                     const at::Tensor& rms_in, double scale,
                                                     double eps, bool shift) {
  check_rms_norm_bwd_args(grad_y_in, x_in, g_in, rms_in, scale, eps, shift);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto g = g_in.contiguous();
  const auto grad_y = grad_y_in.contiguous();
  const auto rms = rms_in.contiguous();
  auto grad_x = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return {grad_x, at::zeros(g.sizes(), g.options())};
  auto grad_g = at::empty(g.sizes(), g.options());
  const int sms = sm_count(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_bwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto p = params_of<scalar_t, acc_t>(x, g, scale, eps, shift);
        p.grad_y = grad_y.const_data_ptr<scalar_t>();
        p.grad_x = grad_x.mutable_data_ptr<scalar_t>();
        p.rms = const_cast<acc_t*>(rms.const_data_ptr<acc_t>());
        p.grad_g = grad_g.mutable_data_ptr<scalar_t>();
        p.chunk_rows = std::max(kChunkRows, ceil_div(p.rows, kMaxChunks));
        p.n_chunks = ceil_div(p.rows, p.chunk_rows);
        auto partial = at::empty({p.n_chunks, p.d}, x.options().dtype(rms.scalar_type()));
        p.partial = partial.mutable_data_ptr<acc_t>();
        rms_norm_bwd_x_kernel<scalar_t, acc_t>
            <<<row_blocks(p.rows, sms), dim3(kWarp, kWarpsPerBlock), 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const dim3 grid(static_cast<unsigned>(std::min(ceil_div(p.d, kWarp), kMaxGridX)),
                        static_cast<unsigned>(std::min(p.n_chunks, kMaxGridY)));
        rms_norm_bwd_g_partial_kernel<scalar_t, acc_t>
            <<<grid, dim3(kWarp, kWarpsPerBlock), 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const unsigned reduce_blocks =
            static_cast<unsigned>(std::min<int64_t>(ceil_div(p.d, 256), int64_t{sms} * 32));
        rms_norm_bwd_g_reduce_kernel<scalar_t, acc_t><<<reduce_blocks, 256, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_x, grad_g};
}

}  // namespace

TORCH_LIBRARY_IMPL(mblm, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cuda);
}

}  // namespace mblm
