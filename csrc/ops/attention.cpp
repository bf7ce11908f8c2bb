// Attention family: schemas and the argument checks shared by the CPU and CUDA kernels.
// Semantics: mblm/ops/reference.py (attention_ref, rotary_half_ref).
#include "mblm/attention.h"

#include <torch/library.h>

#include "mblm/check.h"

namespace mblm {

namespace {

// The accumulation / lse dtype of an input dtype: float64 stays float64, the rest use float32.
at::ScalarType lse_dtype_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_qkv_like(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4, "mblm: attention ", name, " must have 4 dims (N, S, H, Dh), got shape ",
              t.sizes());
  TORCH_CHECK(t.device() == q.device(), "mblm: attention ", name, " is on ", t.device(),
              " but q is on ", q.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "mblm: attention ", name, " has dtype ",
              t.scalar_type(), " but q has dtype ", q.scalar_type());
  TORCH_CHECK(t.sizes() == q.sizes(), "mblm: attention ", name, " must have the shape of q ",
              q.sizes(), " (N, S, H, Dh), got ", t.sizes());
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) <= 1 || t.numel() == 0, "mblm: attention ", name,
              " must have a contiguous last dimension (stride(-1) == 1), got strides ",
              t.strides());
}

void check_rotary_table(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 2, "mblm: attention ", name, " must have 2 dims (S, Dh), got shape ",
              t.sizes());
  TORCH_CHECK(t.device() == q.device(), "mblm: attention ", name, " is on ", t.device(),
              " but q is on ", q.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat ||
                  (t.scalar_type() == at::kDouble && q.scalar_type() == at::kDouble),
              "mblm: attention ", name, " must be float32 (or float64 with float64 q), got ",
              t.scalar_type(), " with q of dtype ", q.scalar_type());
  TORCH_CHECK(t.size(0) == q.size(1) && t.size(1) == q.size(3), "mblm: attention ", name,
              " must have shape (S, Dh) = (", q.size(1), ", ", q.size(3), "), got ", t.sizes());
}

}  // namespace

void check_attn_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& cos,
                         const std::optional<at::Tensor>& sin) {
  TORCH_CHECK(q.dim() == 4, "mblm: attention q must have 4 dims (N, S, H, Dh), got shape ",
              q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kDouble || q.scalar_type() == at::kFloat ||
                  q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "mblm: attention q must be float64/float32/float16/bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.stride(-1) == 1 || q.size(-1) <= 1 || q.numel() == 0,
              "mblm: attention q must have a contiguous last dimension (stride(-1) == 1), got "
              "strides ",
              q.strides());
  check_qkv_like(k, "k", q);
  check_qkv_like(v, "v", q);
  TORCH_CHECK(cos.has_value() == sin.has_value(),
              "mblm: attention cos and sin must be given together (rotary) or both be None, got ",
              cos.has_value() ? "cos without sin" : "sin without cos");
  if (cos.has_value()) {
    check_rotary_table(*cos, "cos", q);
    check_rotary_table(*sin, "sin", q);
    TORCH_CHECK(q.size(3) % 2 == 0,
                "mblm: attention with rotary (cos/sin) needs an even head dim Dh = q.size(3), got ",
                q.size(3));
  }
}

void check_attn_bwd_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                         const std::optional<at::Tensor>& cos,
                         const std::optional<at::Tensor>& sin) {
  check_attn_fwd_args(q, k, v, cos, sin);
  check_qkv_like(grad_out, "grad_out", q);
  check_qkv_like(out, "out", q);
  TORCH_CHECK(lse.dim() == 3, "mblm: attention lse must have 3 dims (N, H, S), got shape ",
              lse.sizes());
  TORCH_CHECK(lse.device() == q.device(), "mblm: attention lse is on ", lse.device(),
              " but q is on ", q.device());
  TORCH_CHECK(lse.scalar_type() == lse_dtype_of(q.scalar_type()), "mblm: attention lse must be ",
              lse_dtype_of(q.scalar_type()), " for q of dtype ", q.scalar_type(), ", got ",
              lse.scalar_type());
  TORCH_CHECK(lse.size(0) == q.size(0) && lse.size(1) == q.size(2) && lse.size(2) == q.size(1),
              "mblm: attention lse must have shape (N, H, S) = (", q.size(0), ", ", q.size(2), ", ",
              q.size(1), "), got ", lse.sizes());
}

void check_attn_kv_args(const at::Tensor& q, const at::Tensor& kv) {
  TORCH_CHECK(kv.dim() == 5, "mblm: attention kv must have 5 dims (N, S, 2, H, Dh), got shape ",
              kv.sizes());
  TORCH_CHECK(kv.size(2) == 2, "mblm: attention kv.size(2) must be 2 (k, v), got shape ",
              kv.sizes());
  TORCH_CHECK(q.dim() == 4 && kv.size(0) == q.size(0) && kv.size(1) == q.size(1) &&
                  kv.size(3) == q.size(2) && kv.size(4) == q.size(3),
              "mblm: attention kv must have shape (N, S, 2, H, Dh) for q of shape (N, S, H, Dh) = ",
              q.sizes(), ", got ", kv.sizes());
}

}  // namespace mblm

TORCH_LIBRARY_FRAGMENT(mblm, m) {
  m.set_python_module("mblm.ops.attention");
  // q, k, v: (N, S, H, Dh), any strides with stride(-1) == 1. cos, sin: (S, Dh) or None.
  // out: (N, S, H, Dh) contiguous, input dtype; lse: (N, H, S) float32 (float64 for float64).
  m.def(
      "attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? cos, Tensor? sin, bool causal, float scale) "
      "-> (Tensor out, Tensor lse)");
  // Gradients w.r.t. the un-rotated q, k and v; (N, S, H, Dh) contiguous. No double backward.
  m.def(
      "attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? cos, Tensor? sin, bool causal, float scale) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // attn_fwd with k and v packed as kv (N, S, 2, H, Dh) (the to_kv projection's output as it
  // is), any strides with stride(-1) == 1.
  m.def(
      "attn_kv_fwd(Tensor q, Tensor kv, Tensor? cos, Tensor? sin, bool causal, float scale) "
      "-> (Tensor out, Tensor lse)");
  // attn_bwd whose k and v gradients come packed: grad_kv (N, S, 2, H, Dh) contiguous.
  m.def(
      "attn_kv_bwd(Tensor grad_out, Tensor q, Tensor kv, Tensor out, Tensor lse, Tensor? cos, "
      "Tensor? sin, bool causal, float scale) -> (Tensor grad_q, Tensor grad_kv)");
}
