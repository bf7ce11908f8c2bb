// Decode family: the attn_decode schema and the argument checks shared by the CPU and CUDA
// kernels. Semantics: mblm/ops/reference.py (attn_decode_ref).
#include "mblm/decode.h"

#include <torch/library.h>

namespace mblm {

namespace {

bool kernel_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool last_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 || t.size(-1) <= 1 || t.numel() == 0;
}

void check_like_q(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4, "mblm: attn_decode ", name,
              " must have 4 dims (R, S, H, Dh), got shape ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), "mblm: attn_decode ", name, " is on ", t.device(),
              " but q is on ", q.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "mblm: attn_decode ", name, " has dtype ",
              t.scalar_type(), " but q has dtype ", q.scalar_type());
  TORCH_CHECK(t.sizes() == q.sizes(), "mblm: attn_decode ", name, " must have the shape of q ",
              q.sizes(), " (R, S, H, Dh), got ", t.sizes());
  TORCH_CHECK(last_contiguous(t), "mblm: attn_decode ", name,
              " must have a contiguous last dimension (stride(-1) == 1), got strides ",
              t.strides());
}

void check_cache(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4, "mblm: attn_decode ", name,
              " must have 4 dims (B, C, H, Dh), got shape ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), "mblm: attn_decode ", name, " is on ", t.device(),
              " but q is on ", q.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "mblm: attn_decode ", name, " has dtype ",
              t.scalar_type(), " but q has dtype ", q.scalar_type());
  TORCH_CHECK(t.size(2) == q.size(2) && t.size(3) == q.size(3), "mblm: attn_decode ", name,
              " must have shape (B, C, H, Dh) with H, Dh = ", q.size(2), ", ", q.size(3),
              " (those of q), got ", t.sizes());
  TORCH_CHECK(last_contiguous(t), "mblm: attn_decode ", name,
              " must have a contiguous last dimension (stride(-1) == 1), got strides ",
              t.strides());
}

void check_index(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == q.size(0), "mblm: attn_decode ", name,
              " must have shape (R,) = (", q.size(0), ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, "mblm: attn_decode ", name, " must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "mblm: attn_decode ", name, " is on ", t.device(),
              " but q is on ", q.device());
}

void check_table(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 3, "mblm: attn_decode ", name, " must have 3 dims (R, S, Dh), got shape ",
              t.sizes());
  TORCH_CHECK(t.device() == q.device(), "mblm: attn_decode ", name, " is on ", t.device(),
              " but q is on ", q.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat ||
                  (t.scalar_type() == at::kDouble && q.scalar_type() == at::kDouble),
              "mblm: attn_decode ", name, " must be float32 (or float64 with float64 q), got ",
              t.scalar_type(), " with q of dtype ", q.scalar_type());
  TORCH_CHECK(t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(2) == q.size(3),
              "mblm: attn_decode ", name, " must have shape (R, S, Dh) = (", q.size(0), ", ",
              q.size(1), ", ", q.size(3), "), got ", t.sizes());
}

}  // namespace

void check_attn_decode_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& lens, const std::optional<at::Tensor>& rows,
                            const std::optional<at::Tensor>& cos,
                            const std::optional<at::Tensor>& sin) {
  TORCH_CHECK(q.dim() == 4, "mblm: attn_decode q must have 4 dims (R, S, H, Dh), got shape ",
              q.sizes());
  TORCH_CHECK(kernel_dtype(q.scalar_type()),
              "mblm: attn_decode q must be float64/float32/float16/bfloat16, got ",
              q.scalar_type());
  TORCH_CHECK(last_contiguous(q),
              "mblm: attn_decode q must have a contiguous last dimension (stride(-1) == 1), got "
              "strides ",
              q.strides());
  check_like_q(k, "k", q);
  check_like_q(v, "v", q);
  check_cache(k_cache, "k_cache", q);
  check_cache(v_cache, "v_cache", q);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(),
              "mblm: attn_decode v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  check_index(lens, "lens", q);
  if (rows.has_value()) {
    check_index(*rows, "rows", q);
  } else {
    TORCH_CHECK(k_cache.size(0) == q.size(0),
                "mblm: attn_decode without rows needs one cache row per query row: k_cache.size(0) "
                "must be R = q.size(0) = ",
                q.size(0), ", got k_cache of shape ", k_cache.sizes());
  }
  TORCH_CHECK(cos.has_value() == sin.has_value(),
              "mblm: attn_decode cos and sin must be given together (rotary) or both be None, got ",
              cos.has_value() ? "cos without sin" : "sin without cos");
  if (cos.has_value()) {
    check_table(*cos, "cos", q);
    check_table(*sin, "sin", q);
    TORCH_CHECK(q.size(3) % 2 == 0,
                "mblm: attn_decode with rotary (cos/sin) needs an even head dim Dh = q.size(3), "
                "got ",
                q.size(3));
  }
}

}  // namespace mblm

TORCH_LIBRARY_FRAGMENT(mblm, m) {
  m.set_python_module("mblm.ops.decode");
  // q, k, v: (R, S, H, Dh); k_cache, v_cache: (B, C, H, Dh), written at positions
  // lens[r] .. lens[r] + S - 1 of row rows[r] (r when rows is None); lens, rows: (R,) int64;
  // cos, sin: (R, S, Dh) or None. Returns the attention output (R, S, H, Dh), contiguous.
  m.def(
      "attn_decode(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor lens, Tensor? rows, Tensor? cos, Tensor? sin, float scale) -> Tensor");
}
