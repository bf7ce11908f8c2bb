// Attention family, CUDA front end: argument checks, device guard, workspaces, one dtype
// dispatch, and the registration of the CUDA kernels (csrc/cuda/attention_kernels.cu).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <string>
#include <utility>

#include "mblm/attention.h"
#include "mblm/attention_params.h"

namespace mblm {

namespace {

at::ScalarType acc_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Error messages here are built with std::to_string rather than streamed (c10::str): no
// iostream number formatting gets instantiated in this nvcc-compiled file (an nvcc host compiler
// whose libstdc++ headers differ from the runtime's has crashed formatting numbers there).
std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d > 0) s += ", ";
    s += std::to_string(t.size(d));
  }
  return s + "]";
}

void check_cuda_sizes(const at::Tensor& q) {
  const int64_t dh = q.size(3);
  TORCH_CHECK(dh > 0 && dh % 8 == 0 && dh <= kAttnMaxHeadDim,
              std::string("mblm: attention CUDA kernels support head dims q.size(3) that are "
                          "multiples of 8 from 8 to ") +
                  std::to_string(kAttnMaxHeadDim) + ", got q of shape " + shape_str(q));
  TORCH_CHECK(q.size(1) <= INT_MAX && q.size(2) <= INT_MAX,
              std::string("mblm: attention CUDA kernels need S = q.size(1) and H = q.size(2) "
                          "below 2^31, got q of shape ") +
                  shape_str(q));
}

// The tensor-core kernels read 16-byte chunks: the data pointer and the strides of the
// (N, S, H) dims (those of size > 1) must be multiples of 16 bytes. Otherwise: an aligned copy.
at::Tensor chunk_aligned(const at::Tensor& t) {
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3 && ok; ++d) {
    ok = t.size(d) <= 1 || (t.stride(d) * t.element_size()) % 16 == 0;
  }
  if (ok) return t;
  at::Tensor copy = at::empty(t.sizes(), t.options());
  copy.copy_(t);
  return copy;
}

// A table in the accumulation dtype, contiguous (S, Dh), 16-byte aligned (read as float4).
at::Tensor rotary_table(const at::Tensor& t, at::ScalarType acc) {
  at::Tensor r = t.to(acc).contiguous();
  if (reinterpret_cast<uintptr_t>(r.const_data_ptr()) % 16 == 0) return r;
  at::Tensor copy = at::empty(r.sizes(), r.options());
  copy.copy_(r);
  return copy;
}

std::pair<at::Tensor, at::Tensor> rotary_tables(const std::optional<at::Tensor>& cos,
                                                const std::optional<at::Tensor>& sin,
                                                at::ScalarType acc) {
  if (!cos.has_value()) return {};
  return {rotary_table(*cos, acc), rotary_table(*sin, acc)};
}

void fill_fwd_params(AttnFwdParams& p, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const std::pair<at::Tensor, at::Tensor>& tables,
                     bool causal, double scale) {
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.q_sn = q.stride(0), p.q_ss = q.stride(1), p.q_sh = q.stride(2);
  p.k_sn = k.stride(0), p.k_ss = k.stride(1), p.k_sh = k.stride(2);
  p.v_sn = v.stride(0), p.v_ss = v.stride(1), p.v_sh = v.stride(2);
  if (tables.first.defined()) {
    p.cos = tables.first.const_data_ptr();
    p.sin = tables.second.const_data_ptr();
  }
  p.N = q.size(0);
  p.S = static_cast<int>(q.size(1));
  p.H = static_cast<int>(q.size(2));
  p.Dh = static_cast<int>(q.size(3));
  p.scale = scale;
  p.causal = causal;
}

std::tuple<at::Tensor, at::Tensor> attn_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& cos,
                                                 const std::optional<at::Tensor>& sin, bool causal,
                                                 double scale) {
  check_attn_fwd_args(q, k, v, cos, sin);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = acc_dtype(q);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(acc));
  if (lse.numel() == 0) return {out, lse};
  check_cuda_sizes(q);

  const AttnPlan plan = attn_plan(static_cast<int>(q.element_size()), q.size(1), q.size(3));
  const at::Tensor qq = plan.tensor_cores ? chunk_aligned(q) : q;
  const at::Tensor kk = plan.tensor_cores ? chunk_aligned(k) : k;
  const at::Tensor vv = plan.tensor_cores ? chunk_aligned(v) : v;
  const auto tables = rotary_tables(cos, sin, acc);
  AttnFwdParams p;
  fill_fwd_params(p, qq, kk, vv, tables, causal, scale);
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mblm_attn_fwd_cuda",
                                  [&] { C10_CUDA_CHECK(run_attn_fwd<scalar_t>(p, stream)); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin, bool causal, double scale) {
  check_attn_bwd_args(grad_out, q, k, v, out, lse, cos, sin);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = acc_dtype(q);
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_q = at::empty(q.sizes(), opts);
  at::Tensor grad_k = at::empty(q.sizes(), opts);
  at::Tensor grad_v = at::empty(q.sizes(), opts);
  if (q.size(0) * q.size(1) * q.size(2) == 0) return {grad_q, grad_k, grad_v};
  check_cuda_sizes(q);

  const AttnPlan plan = attn_plan(static_cast<int>(q.element_size()), q.size(1), q.size(3));
  const bool tc = plan.tensor_cores;
  const at::Tensor qq = tc ? chunk_aligned(q) : q;
  const at::Tensor kk = tc ? chunk_aligned(k) : k;
  const at::Tensor vv = tc ? chunk_aligned(v) : v;
  const at::Tensor dout = tc ? chunk_aligned(grad_out) : grad_out;
  const at::Tensor oo = tc ? chunk_aligned(out) : out;
  const at::Tensor lse_c = lse.contiguous();
  const auto tables = rotary_tables(cos, sin, acc);
  at::Tensor delta;  // rowsum(grad_out * out), unless the backward kernel computes it itself
  if (!(tc && plan.bwd_fused_delta)) {
    delta = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(acc));
  }
  at::Tensor dq_accum;
  if (tc && plan.bwd_dq_accum) dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));

  AttnBwdParams p;
  fill_fwd_params(p.f, qq, kk, vv, tables, causal, scale);
  p.f.lse = const_cast<void*>(lse_c.const_data_ptr());
  p.dout = dout.const_data_ptr();
  p.do_sn = dout.stride(0), p.do_ss = dout.stride(1), p.do_sh = dout.stride(2);
  p.o = oo.const_data_ptr();
  p.o_sn = oo.stride(0), p.o_ss = oo.stride(1), p.o_sh = oo.stride(2);
  p.dq = grad_q.mutable_data_ptr();
  p.dk = grad_k.mutable_data_ptr();
  p.dv = grad_v.mutable_data_ptr();
  p.delta = delta.defined() ? delta.mutable_data_ptr() : nullptr;
  p.dq_accum = dq_accum.defined() ? dq_accum.mutable_data_ptr<float>() : nullptr;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mblm_attn_bwd_cuda",
                                  [&] { C10_CUDA_CHECK(run_attn_bwd<scalar_t>(p, stream)); });
  return {grad_q, grad_k, grad_v};
}

std::tuple<at::Tensor, at::Tensor> attn_kv_fwd_cuda(const at::Tensor& q, const at::Tensor& kv,
                                                    const std::optional<at::Tensor>& cos,
                                                    const std::optional<at::Tensor>& sin,
                                                    bool causal, double scale) {
  check_attn_kv_args(q, kv);
  return attn_fwd_cuda(q, kv.select(2, 0), kv.select(2, 1), cos, sin, causal, scale);
}

// The kernels write dK and dV as (N, S, H, Dh) rows; they are packed here with one copy (the CPU
// kernel writes the packed layout directly).
std::tuple<at::Tensor, at::Tensor> attn_kv_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                                    const at::Tensor& kv, const at::Tensor& out,
                                                    const at::Tensor& lse,
                                                    const std::optional<at::Tensor>& cos,
                                                    const std::optional<at::Tensor>& sin,
                                                    bool causal, double scale) {
  check_attn_kv_args(q, kv);
  auto [grad_q, grad_k, grad_v] = attn_bwd_cuda(grad_out, q, kv.select(2, 0), kv.select(2, 1), out,
                                                lse, cos, sin, causal, scale);
  return {grad_q, at::stack({grad_k, grad_v}, 2)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mblm, CUDA, m) {
  m.impl("attn_fwd", &attn_fwd_cuda);
  m.impl("attn_bwd", &attn_bwd_cuda);
  m.impl("attn_kv_fwd", &attn_kv_fwd_cuda);
  m.impl("attn_kv_bwd", &attn_kv_bwd_cuda);
}

}  // namespace mblm
