// GELU family, CUDA kernel: gelu_bwd. Checks: csrc/ops/gelu.cpp. Semantics: gelu_bwd_ref in
// mblm/ops/reference.py. Elementwise, grid-stride, erf / exp from the CUDA math library in the
// accumulation type (float32; float64 for float64).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "mblm/gelu.h"

namespace mblm {

namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void gelu_bwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ h,
                                scalar_t* __restrict__ gh, scalar_t* __restrict__ act,
                                int64_t numel) {
  const int64_t step = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < numel; i += step) {
    const acc_t x = static_cast<acc_t>(h[i]);
    const acc_t cdf = acc_t(0.5) * (acc_t(1) + erf(x * acc_t(0.70710678118654752440)));
    const acc_t pdf = acc_t(0.39894228040143267794) * exp(acc_t(-0.5) * x * x);
    act[i] = static_cast<scalar_t>(x * cdf);
    gh[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * (cdf + x * pdf));
  }
}

std::tuple<at::Tensor, at::Tensor> gelu_bwd_cuda(const at::Tensor& grad_act_in,
                                                 const at::Tensor& h_in) {
  check_gelu_bwd_args(grad_act_in, h_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const auto h = h_in.contiguous();
  const auto grad_act = grad_act_in.contiguous();
  auto grad_h = at::empty(h.sizes(), h.options());
  auto act = at::empty(h.sizes(), h.options());
  const int64_t numel = h.numel();
  if (numel == 0) return {grad_h, act};
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, h.get_device()));
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>((numel + kThreads - 1) / kThreads, int64_t{sms} * 32));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "gelu_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gelu_bwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        grad_act.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
        grad_h.mutable_data_ptr<scalar_t>(), act.mutable_data_ptr<scalar_t>(), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_h, act};
}

}  // namespace

TORCH_LIBRARY_IMPL(mblm, CUDA, m) { m.impl("gelu_bwd", &gelu_bwd_cuda); }

}  // namespace mblm
