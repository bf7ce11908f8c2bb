// GELU family: schema and the argument checks shared by the CPU and CUDA kernels.
// Semantics: mblm/ops/reference.py (gelu_bwd_ref).
#include "mblm/gelu.h"

#include <torch/library.h>

namespace mblm {

void check_gelu_bwd_args(const at::Tensor& grad_act, const at::Tensor& h) {
  const auto t = h.scalar_type();
  TORCH_CHECK(t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "mblm: gelu_bwd h must be float64/float32/float16/bfloat16, got dtype ", t);
  TORCH_CHECK(grad_act.sizes() == h.sizes(), "mblm: gelu_bwd grad_act must have the shape of h ",
              h.sizes(), ", got ", grad_act.sizes());
  TORCH_CHECK(grad_act.scalar_type() == t, "mblm: gelu_bwd grad_act has dtype ",
              grad_act.scalar_type(), " but h has dtype ", t);
  TORCH_CHECK(grad_act.device() == h.device(), "mblm: gelu_bwd grad_act is on ", grad_act.device(),
              " but h is on ", h.device());
}

}  // namespace mblm

TORCH_LIBRARY_FRAGMENT(mblm, m) {
  m.set_python_module("mblm.ops.gelu");
  // grad_act, h: any shape, same dtype. grad_h, act: h's shape, contiguous. No double backward.
  m.def("gelu_bwd(Tensor grad_act, Tensor h) -> (Tensor grad_h, Tensor act)");
}
