// Loss family, CUDA kernels: cross_entropy_fwd / cross_entropy_bwd. Checks: csrc/ops/loss.cpp.
// Semantics: cross_entropy_ref in mblm/ops/reference.py; mirrors csrc/cpu/loss.cpp.
//
// One warp per row (grid-stride over rows): lanes walk the classes; the max and the sum of
// exp(x - max) are warp reductions; the loss is (max - x_t) + log(sum). The backward writes
// grad_loss * (exp(x - lse) - [j == t]) per element, 0 on ignored rows.
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
#include <limits>
#include <tuple>

#include "mblm/loss.h"

namespace mblm {

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.get_device()));
  return std::max(count, 1);
}

unsigned row_blocks(int64_t rows, int sms) {
  return static_cast<unsigned>(std::max<int64_t>(
      1, std::min({ceil_div(rows, kWarpsPerBlock), int64_t{sms} * 32, kMaxGridX})));
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename scalar_t, typename acc_t>
struct CeParams {
  const scalar_t* logits;
  int64_t rs, cs;  // logits strides
  const int64_t* target;
  const scalar_t* grad_loss;
  scalar_t* loss;
  scalar_t* grad;  // (R, V) contiguous
  acc_t* lse;
  int64_t rows, vocab, ignore_index;
};

template <typename scalar_t, typename acc_t>
__global__ void cross_entropy_fwd_kernel(CeParams<scalar_t, acc_t> p) {
  const int lane = threadIdx.x;
  const int64_t warps = int64_t{gridDim.x} * blockDim.y;
  for (int64_t r = int64_t{blockIdx.x} * blockDim.y + threadIdx.y; r < p.rows; r += warps) {
    const scalar_t* row = p.logits + r * p.rs;
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = lane; j < p.vocab; j += kWarp) {
      mx = max(mx, static_cast<acc_t>(row[j * p.cs]));
    }
    mx = warp_max(mx);
    acc_t s = 0;
    if (isfinite(mx)) {
      for (int64_t j = lane; j < p.vocab; j += kWarp) {
        s += exp(static_cast<acc_t>(row[j * p.cs]) - mx);
      }
    }
    s = warp_sum(s);
    if (lane == 0) {
      const acc_t log_sum = isfinite(mx) ? log(s) : acc_t(0);
      p.lse[r] = mx + log_sum;
      const int64_t t = p.target[r];
      p.loss[r] = static_cast<scalar_t>(
          t == p.ignore_index ? acc_t(0) : (mx - static_cast<acc_t>(row[t * p.cs])) + log_sum);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void cross_entropy_bwd_kernel(CeParams<scalar_t, acc_t> p) {
  const int lane = threadIdx.x;
  const int64_t warps = int64_t{gridDim.x} * blockDim.y;
  for (int64_t r = int64_t{blockIdx.x} * blockDim.y + threadIdx.y; r < p.rows; r += warps) {
    const scalar_t* row = p.logits + r * p.rs;
    scalar_t* dst = p.grad + r * p.vocab;
    const int64_t t = p.target[r];
    const bool ignored = t == p.ignore_index;
    const acc_t g = ignored ? acc_t(0) : static_cast<acc_t>(p.grad_loss[r]);
    const acc_t lse = p.lse[r];
    for (int64_t j = lane; j < p.vocab; j += kWarp) {
      acc_t v = ignored ? acc_t(0) : exp(static_cast<acc_t>(row[j * p.cs]) - lse) * g;
      if (j == t) v -= g;
      dst[j] = static_cast<scalar_t>(v);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cuda(const at::Tensor& logits,
                                                          const at::Tensor& target_in,
                                                          int64_t ignore_index) {
  check_cross_entropy_fwd_args(logits, target_in);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto target = target_in.contiguous();
  check_cross_entropy_targets(target, logits.size(1), ignore_index);
  auto loss = at::empty({logits.size(0)}, logits.options());
  auto lse = at::empty({logits.size(0)},
                       logits.options().dtype(cross_entropy_stat_dtype(logits.scalar_type())));
  if (logits.numel() == 0) return {loss, lse};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_fwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        CeParams<scalar_t, acc_t> p{};
        p.logits = logits.const_data_ptr<scalar_t>();
        p.rs = logits.stride(0), p.cs = logits.stride(1);
        p.target = target.const_data_ptr<int64_t>();
        p.loss = loss.mutable_data_ptr<scalar_t>();
        p.lse = lse.mutable_data_ptr<acc_t>();
        p.rows = logits.size(0), p.vocab = logits.size(1), p.ignore_index = ignore_index;
        cross_entropy_fwd_kernel<scalar_t, acc_t>
            <<<row_blocks(p.rows, sm_count(logits)), dim3(kWarp, kWarpsPerBlock), 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {loss, lse};
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& grad_loss_in, const at::Tensor& logits,
                                  const at::Tensor& target_in, const at::Tensor& lse_in,
                                  int64_t ignore_index) {
  check_cross_entropy_bwd_args(grad_loss_in, logits, target_in, lse_in);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto target = target_in.contiguous();
  check_cross_entropy_targets(target, logits.size(1), ignore_index);
  const auto grad_loss = grad_loss_in.contiguous();
  const auto lse = lse_in.contiguous();
  auto grad =
      at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (logits.numel() == 0) return grad;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_bwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        CeParams<scalar_t, acc_t> p{};
        p.logits = logits.const_data_ptr<scalar_t>();
        p.rs = logits.stride(0), p.cs = logits.stride(1);
        p.target = target.const_data_ptr<int64_t>();
        p.grad_loss = grad_loss.const_data_ptr<scalar_t>();
        p.grad = grad.mutable_data_ptr<scalar_t>();
        p.lse = const_cast<acc_t*>(lse.const_data_ptr<acc_t>());
        p.rows = logits.size(0), p.vocab = logits.size(1), p.ignore_index = ignore_index;
        cross_entropy_bwd_kernel<scalar_t, acc_t>
            <<<row_blocks(p.rows, sm_count(logits)), dim3(kWarp, kWarpsPerBlock), 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(mblm, CUDA, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cuda);
}

}  // namespace mblm
