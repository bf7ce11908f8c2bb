// Scan family, CUDA front end: argument checks, device guard, outputs and workspaces, one dtype
// dispatch, and the registration of the CUDA kernels (csrc/cuda/scan_kernels.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "mblm/scan.h"
#include "mblm/scan_params.h"

namespace mblm {

namespace {

// Calls f(T{}) with the kernel input type of `dtype` (float32, float16, bfloat16; the checks in
// check_scan_cuda_limits rule out the rest).
template <typename F>
void dispatch_input(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      f(c10::BFloat16{});
      break;
  }
}

ScanStrided strided(const at::Tensor& t) {
  if (t.dim() == 2) return {t.const_data_ptr(), t.stride(0), t.stride(1), 0};
  return {t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

ScanStrided strided(const std::optional<at::Tensor>& t) {
  return t.has_value() ? strided(*t) : ScanStrided{};
}

std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->to(at::kFloat).contiguous();
}

const float* ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

// The float32 copies of the weights the kernels read, kept alive while they run.
struct Weights {
  at::Tensor A;
  std::optional<at::Tensor> D, bias, init;
};

ScanFwdParams fwd_params(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& B,
                         const at::Tensor& C, const std::optional<at::Tensor>& z, const Weights& w,
                         bool delta_softplus) {
  ScanFwdParams p;
  p.batch = u.size(0), p.dim = u.size(1), p.len = u.size(2);
  p.n = static_cast<int>(w.A.size(1));
  p.u = strided(u), p.delta = strided(delta), p.z = strided(z);
  p.B = strided(B), p.C = strided(C);
  p.A = w.A.const_data_ptr<float>();
  p.D = ptr(w.D), p.bias = ptr(w.bias), p.init = ptr(w.init);
  p.softplus = delta_softplus;
  return p;
}

Weights weights(const at::Tensor& A, const std::optional<at::Tensor>& D,
                const std::optional<at::Tensor>& delta_bias,
                const std::optional<at::Tensor>& initial_state) {
  return {A.to(at::kFloat).contiguous(), to_float(D), to_float(delta_bias),
          to_float(initial_state)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_fwd_cuda(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
    const std::optional<at::Tensor>& initial_state) {
  check_scan_fwd_args(u, delta, A, B, C, D, z, delta_bias, initial_state);
  check_scan_cuda_limits(u, A.size(1));
  const c10::cuda::CUDAGuard guard(u.device());
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2), n = A.size(1);
  const auto fopts = u.options().dtype(at::kFloat);
  at::Tensor y = scan_empty_like(u, u.scalar_type());
  at::Tensor final_state = at::empty({batch, dim, n}, fopts);
  at::Tensor ckpt = at::empty({batch, scan_num_chunks(len), n, dim}, fopts);
  if (batch * dim == 0) return {y, final_state, ckpt};
  if (n == 0) final_state.zero_();
  const Weights w = weights(A, D, delta_bias, initial_state);
  ScanFwdParams p = fwd_params(u, delta, B, C, z, w, delta_softplus);
  p.y = strided(y);
  p.final_state = final_state.mutable_data_ptr<float>();
  p.ckpt = ckpt.mutable_data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_input(u.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(run_scan_fwd<T>(p, stream));
  });
  return {y, final_state, ckpt};
}

ScanGrads scan_bwd_cuda(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
                        const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C,
                        const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                        const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                        const std::optional<at::Tensor>& initial_state,
                        const at::Tensor& checkpoints) {
  check_scan_bwd_args(grad_y, grad_final_state, u, delta, A, B, C, D, z, delta_bias, initial_state,
                      checkpoints);
  check_scan_cuda_limits(u, A.size(1));
  const c10::cuda::CUDAGuard guard(u.device());
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2), n = A.size(1);
  const auto dtype = u.scalar_type();
  const auto fopts = u.options().dtype(at::kFloat);
  at::Tensor gu = scan_empty_like(u, dtype);
  at::Tensor gdelta = scan_empty_like(delta, dtype);
  at::Tensor gz = z ? scan_empty_like(*z, dtype) : at::empty({0}, u.options());
  at::Tensor gB_acc = at::zeros({batch, len, n}, fopts);
  at::Tensor gC_acc = at::zeros({batch, len, n}, fopts);
  at::Tensor gA_part = at::zeros({batch, dim, n}, fopts);
  at::Tensor gD_part = at::zeros({batch, dim}, fopts);
  at::Tensor gbias_part = at::zeros({batch, dim}, fopts);
  at::Tensor g_init = grad_final_state ? grad_final_state->to(at::kFloat).clone()
                                       : at::zeros({batch, dim, n}, fopts);
  if (batch * dim > 0) {
    const Weights w = weights(A, D, delta_bias, std::nullopt);
    const at::Tensor ckpt = checkpoints.contiguous();
    const std::optional<at::Tensor> g_final = to_float(grad_final_state);
    ScanBwdParams p;
    p.f = fwd_params(u, delta, B, C, z, w, delta_softplus);
    p.f.ckpt = const_cast<float*>(ckpt.const_data_ptr<float>());
    p.gy = strided(grad_y);
    p.g_final = ptr(g_final);
    p.gu = strided(gu), p.gdelta = strided(gdelta);
    if (z) p.gz = strided(gz);
    p.gB_acc = gB_acc.mutable_data_ptr<float>();
    p.gC_acc = gC_acc.mutable_data_ptr<float>();
    p.gA_part = gA_part.mutable_data_ptr<float>();
    p.gD_part = gD_part.mutable_data_ptr<float>();
    p.gbias_part = gbias_part.mutable_data_ptr<float>();
    p.g_init = g_init.mutable_data_ptr<float>();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_input(dtype, [&](auto tag) {
      using T = decltype(tag);
      C10_CUDA_CHECK(run_scan_bwd<T>(p, stream));
    });
  }
  at::Tensor gB = scan_empty_like(B, dtype);
  gB.copy_(gB_acc.transpose(1, 2));
  at::Tensor gC = scan_empty_like(C, dtype);
  gC.copy_(gC_acc.transpose(1, 2));
  at::Tensor gA = gA_part.sum(0).to(A.scalar_type());
  at::Tensor gD = D ? gD_part.sum(0).to(D->scalar_type()) : at::empty({0}, u.options());
  at::Tensor gbias =
      delta_bias ? gbias_part.sum(0).to(delta_bias->scalar_type()) : at::empty({0}, u.options());
  at::Tensor ginit =
      initial_state ? g_init.to(initial_state->scalar_type()) : at::empty({0}, u.options());
  return {gu, gdelta, gA, gB, gC, gD, gz, gbias, ginit};
}

at::Tensor scan_update_cuda(const at::Tensor& state, const at::Tensor& u, const at::Tensor& delta,
                            const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                            const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                            const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  check_scan_update_args(state, u, delta, A, B, C, D, z, delta_bias);
  check_scan_cuda_limits(u, A.size(1));
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor y = at::empty(u.sizes(), u.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  // The kernel updates a contiguous float32 state; anything else goes through a copy.
  const bool direct = state.scalar_type() == at::kFloat && state.is_contiguous();
  at::Tensor st = direct ? state : state.to(at::kFloat).contiguous();
  const Weights w = weights(A, D, delta_bias, std::nullopt);
  ScanUpdateParams p;
  p.batch = u.size(0), p.dim = u.size(1), p.n = static_cast<int>(A.size(1));
  p.u = strided(u), p.delta = strided(delta), p.z = strided(z);
  p.B = strided(B), p.C = strided(C);
  p.A = w.A.const_data_ptr<float>();
  p.D = ptr(w.D), p.bias = ptr(w.bias);
  p.softplus = delta_softplus;
  p.state = st.mutable_data_ptr<float>();
  p.y = y.mutable_data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_input(u.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(run_scan_update<T>(p, stream));
  });
  if (!direct) state.copy_(st);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mblm, CUDA, m) {
  m.impl("scan_fwd", &scan_fwd_cuda);
  m.impl("scan_bwd", &scan_bwd_cuda);
  m.impl("scan_update", &scan_update_cuda);
}

}  // namespace mblm
