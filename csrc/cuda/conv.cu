// Conv family, CUDA kernels: conv1d_fwd, conv1d_bwd, conv1d_update.
// Checks and layout helpers: csrc/ops/conv.cpp. Semantics: mblm/ops/reference.py.
//
// Same layout as the CPU kernels: x read channel-contiguous, y/grad_x written (B, L, C)-contiguous,
// so consecutive threads own consecutive channels (coalesced). One thread per output element;
// the backward recomputes g = grad_y * act'(pre) where it needs it (K is small, so the O(K^2)
// recomputation is cheaper than a stored pre-activation pass). The weight and bias gradients are
// reduced per block in shared memory into partial sums, then summed over blocks (deterministic).
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
#include <optional>
#include <tuple>

#include "mblm/conv.h"

namespace mblm {

namespace {

constexpr int kThreads = 256;
constexpr int kReduceX = 32;  // channels per reduction block
constexpr int kReduceY = 8;   // row lanes per reduction block

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_for(int64_t n, const at::Tensor& t) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device()));
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads), int64_t{sms} * 32)));
}

template <typename scalar_t, typename acc_t>
struct ConvArgs {
  const scalar_t* x;       // channel-contiguous
  int64_t sb, st;          // x batch / time strides
  const scalar_t* prefix;  // (B, K - 1, C) contiguous
  const acc_t* wt;         // (K, C)
  const acc_t* bias;       // (C,)
  int64_t B, C, L, K;

  // Extended sequence [prefix, x] of batch b at time s in [-(K - 1), L), channel c.
  __device__ acc_t xx(int64_t b, int64_t s, int64_t c) const {
    return s >= 0 ? static_cast<acc_t>(x[b * sb + s * st + c])
                  : static_cast<acc_t>(prefix[(b * (K - 1) + s + K - 1) * C + c]);
  }
  __device__ acc_t pre(int64_t b, int64_t t, int64_t c) const {
    acc_t acc = bias[c];
    for (int64_t k = 0; k < K; ++k) acc += wt[k * C + c] * xx(b, t + k - (K - 1), c);
    return acc;
  }
};

template <typename acc_t>
__device__ __forceinline__ acc_t silu(acc_t p) {
  return p / (acc_t(1) + exp(-p));
}

template <typename acc_t>
__device__ __forceinline__ acc_t silu_grad(acc_t p) {
  const acc_t s = acc_t(1) / (acc_t(1) + exp(-p));
  return s * (acc_t(1) + p * (acc_t(1) - s));
}

template <typename scalar_t, typename acc_t>
__global__ void conv1d_fwd_kernel(ConvArgs<scalar_t, acc_t> a, bool activation, scalar_t* y) {
  const int64_t n = a.B * a.L * a.C;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t c = i % a.C, bt = i / a.C;
    const int64_t b = bt / a.L, t = bt % a.L;
    const acc_t p = a.pre(b, t, c);
    y[i] = static_cast<scalar_t>(activation ? silu(p) : p);
  }
}

template <typename scalar_t, typename acc_t>
struct BwdArgs {
  ConvArgs<scalar_t, acc_t> a;
  const scalar_t* gy;  // channel-contiguous
  int64_t gsb, gst;
  const scalar_t* gfinal;  // (B, C, K - 1) contiguous or null
  bool activation;

  __device__ acc_t g(int64_t b, int64_t t, int64_t c) const {
    const acc_t v = static_cast<acc_t>(gy[b * gsb + t * gst + c]);
    return activation ? v * silu_grad(a.pre(b, t, c)) : v;
  }
  // Gradient of extended element s in [-(K - 1), L).
  __device__ acc_t gxx(int64_t b, int64_t s, int64_t c) const {
    acc_t acc = 0;
    for (int64_t k = 0; k < a.K; ++k) {
      const int64_t t = s + (a.K - 1) - k;
      if (t >= 0 && t < a.L) acc += a.wt[k * a.C + c] * g(b, t, c);
    }
    const int64_t j = s - (a.L - (a.K - 1));
    if (gfinal != nullptr && j >= 0) {
      acc += static_cast<acc_t>(gfinal[(b * a.C + c) * (a.K - 1) + j]);
    }
    return acc;
  }
};

template <typename scalar_t, typename acc_t>
__global__ void conv1d_grad_x_kernel(BwdArgs<scalar_t, acc_t> w, scalar_t* gx) {
  const auto& a = w.a;
  const int64_t n = a.B * a.L * a.C;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t c = i % a.C, bt = i / a.C;
    gx[i] = static_cast<scalar_t>(w.gxx(bt / a.L, bt % a.L, c));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void conv1d_grad_init_kernel(BwdArgs<scalar_t, acc_t> w, scalar_t* gi) {
  const auto& a = w.a;
  const int64_t n = a.B * a.C * (a.K - 1);
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t j = i % (a.K - 1), bc = i / (a.K - 1);
    gi[i] = static_cast<scalar_t>(w.gxx(bc / a.C, j - (a.K - 1), bc % a.C));
  }
}

// partial[blockIdx.y, k, c] = sum over this block's rows of g * xx(t + k - (K - 1)) (k < K) or
// g (k == K, the bias). grid = (ceil(C / 32), row blocks, K + 1), block = (32, 8).
template <typename scalar_t, typename acc_t>
__global__ void conv1d_grad_wb_kernel(BwdArgs<scalar_t, acc_t> w, acc_t* partial) {
  const auto& a = w.a;
  __shared__ acc_t sums[kReduceY][kReduceX];
  const int64_t c = blockIdx.x * int64_t{kReduceX} + threadIdx.x;
  const int64_t k = blockIdx.z;
  acc_t acc = 0;
  if (c < a.C) {
    for (int64_t r = blockIdx.y * int64_t{kReduceY} + threadIdx.y; r < a.B * a.L;
         r += int64_t{gridDim.y} * kReduceY) {
      const int64_t b = r / a.L, t = r % a.L;
      const acc_t gv = w.g(b, t, c);
      acc += k < a.K ? gv * a.xx(b, t + k - (a.K - 1), c) : gv;
    }
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < a.C) {
    acc_t total = 0;
    for (int y = 0; y < kReduceY; ++y) total += sums[y][threadIdx.x];
    partial[(blockIdx.y * (a.K + 1) + k) * a.C + c] = total;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void conv1d_update_kernel(const scalar_t* x, int64_t xsb, int64_t xsc, scalar_t* state,
                                     int64_t ssb, int64_t ssc, int64_t ssk, const acc_t* wt,
                                     const acc_t* bias, int64_t B, int64_t C, int64_t K,
                                     bool activation, scalar_t* y) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < B * C;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t b = i / C, c = i % C;
    scalar_t* s = state + b * ssb + c * ssc;
    const acc_t xv = static_cast<acc_t>(x[b * xsb + c * xsc]);
    acc_t acc = bias[c] + wt[(K - 1) * C + c] * xv;
    for (int64_t k = 0; k < K - 1; ++k) acc += wt[k * C + c] * static_cast<acc_t>(s[k * ssk]);
    for (int64_t k = 0; k + 1 < K - 1; ++k) s[k * ssk] = s[(k + 1) * ssk];
    if (K > 1) s[(K - 2) * ssk] = static_cast<scalar_t>(xv);
    y[i] = static_cast<scalar_t>(activation ? silu(acc) : acc);
  }
}

template <typename scalar_t, typename acc_t>
ConvArgs<scalar_t, acc_t> conv_args(const at::Tensor& x, const at::Tensor& prefix,
                                    const at::Tensor& wt, const at::Tensor& bv, int64_t K) {
  return {x.const_data_ptr<scalar_t>(),
          x.stride(0),
          x.stride(2),
          prefix.const_data_ptr<scalar_t>(),
          wt.const_data_ptr<acc_t>(),
          bv.const_data_ptr<acc_t>(),
          x.size(0),
          x.size(1),
          x.size(2),
          K};
}

std::tuple<at::Tensor, at::Tensor> conv1d_fwd_cuda(const at::Tensor& x_in, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& initial_state,
                                                   bool activation) {
  check_conv1d_fwd_args(x_in, weight, bias, initial_state);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = conv1d_channels_last(x_in);
  const int64_t K = weight.size(1);
  at::Tensor y = conv1d_empty_like_output(x, x.scalar_type());
  const at::Tensor prefix = conv1d_prefix_rows(initial_state, x, K);
  at::Tensor final_state = conv1d_final_state(prefix, x, K);
  const int64_t n = x.numel();
  if (n == 0) return {y, final_state};
  const at::Tensor wt = conv1d_weight_table(weight, x);
  const at::Tensor bv = conv1d_bias_vector(bias, x);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv1d_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    conv1d_fwd_kernel<scalar_t, acc_t>
        <<<grid_for(n, x), kThreads, 0, stream>>>(conv_args<scalar_t, acc_t>(x, prefix, wt, bv, K),
                                                  activation, y.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, final_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv1d_bwd_cuda(
    const at::Tensor& grad_y_in, const std::optional<at::Tensor>& grad_final_in,
    const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_state, bool activation) {
  check_conv1d_bwd_args(grad_y_in, grad_final_in, x_in, weight, bias, initial_state);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = conv1d_channels_last(x_in);
  const at::Tensor grad_y = conv1d_channels_last(grad_y_in);
  std::optional<at::Tensor> grad_final;
  if (grad_final_in.has_value()) grad_final = grad_final_in->contiguous();
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2), K = weight.size(1);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_x = conv1d_empty_like_output(x, x.scalar_type());
  at::Tensor grad_init = at::zeros({B, C, K - 1}, x.options());
  const int64_t row_blocks =
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(B * L, kReduceY * 16), 1024));
  at::Tensor partial = at::zeros({row_blocks, K + 1, C}, x.options().dtype(acc_dtype));
  if (B > 0 && C > 0) {
    const at::Tensor wt = conv1d_weight_table(weight, x);
    const at::Tensor bv = conv1d_bias_vector(bias, x);
    const at::Tensor prefix = conv1d_prefix_rows(initial_state, x, K);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv1d_bwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const BwdArgs<scalar_t, acc_t> w{
          conv_args<scalar_t, acc_t>(x, prefix, wt, bv, K),
          grad_y.const_data_ptr<scalar_t>(),
          grad_y.stride(0),
          grad_y.stride(2),
          grad_final.has_value() ? grad_final->const_data_ptr<scalar_t>() : nullptr,
          activation};
      if (L > 0) {
        conv1d_grad_x_kernel<scalar_t, acc_t><<<grid_for(x.numel(), x), kThreads, 0, stream>>>(
            w, grad_x.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const dim3 grid(static_cast<unsigned>(ceil_div(C, kReduceX)),
                        static_cast<unsigned>(row_blocks), static_cast<unsigned>(K + 1));
        conv1d_grad_wb_kernel<scalar_t, acc_t>
            <<<grid, dim3(kReduceX, kReduceY), 0, stream>>>(w, partial.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (K > 1) {
        conv1d_grad_init_kernel<scalar_t, acc_t>
            <<<grid_for(grad_init.numel(), x), kThreads, 0, stream>>>(
                w, grad_init.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  const at::Tensor sums = partial.sum(0);
  // Fresh tensors (copy=true): views into `sums` would not match the fake's metadata.
  at::Tensor grad_w = sums.narrow(0, 0, K).t().to(weight.scalar_type(), false, true).contiguous();
  at::Tensor grad_b = bias.has_value() ? sums[K].to(bias->scalar_type(), false, true)
                                       : at::empty({0}, x.options().dtype(weight.scalar_type()));
  return {grad_x, grad_w, grad_b, grad_init};
}

at::Tensor conv1d_update_cuda(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, bool activation) {
  check_conv1d_update_args(x, conv_state, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), K = weight.size(1);
  at::Tensor y = at::empty({B, C}, x.options());
  if (B == 0 || C == 0) return y;
  const at::Tensor wt = conv1d_weight_table(weight, x);
  const at::Tensor bv = conv1d_bias_vector(bias, x);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv1d_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    conv1d_update_kernel<scalar_t, acc_t><<<grid_for(B * C, x), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1),
        conv_state.mutable_data_ptr<scalar_t>(), conv_state.stride(0), conv_state.stride(1),
        conv_state.stride(2), wt.const_data_ptr<acc_t>(), bv.const_data_ptr<acc_t>(), B, C, K,
        activation, y.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace

}  // namespace mblm

TORCH_LIBRARY_IMPL(mblm, CUDA, m) {
  m.impl("conv1d_fwd", &mblm::conv1d_fwd_cuda);
  m.impl("conv1d_bwd", &mblm::conv1d_bwd_cuda);
  m.impl("conv1d_update", &mblm::conv1d_update_cuda);
}
