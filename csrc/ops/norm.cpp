// Norm family: schemas and the argument checks shared by the CPU and CUDA kernels.
// Semantics: mblm/ops/reference.py (rms_norm_ref).
#include "mblm/norm.h"

#include <torch/library.h>

#include <cmath>

namespace mblm {

namespace {

bool is_kernel_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

at::ScalarType rms_norm_stat_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_rms_norm_fwd_args(const at::Tensor& x, const at::Tensor& g, double scale, double eps,
                             bool shift) {
  TORCH_CHECK(x.dim() >= (shift ? 2 : 1), "mblm: rms_norm x must have at least ", (shift ? 2 : 1),
              " dims (", (shift ? "..., S, D" : "..., D"), "), got shape ", x.sizes());
  TORCH_CHECK(is_kernel_float(x.scalar_type()),
              "mblm: rms_norm x must be float64/float32/float16/bfloat16, got dtype ",
              x.scalar_type());
  TORCH_CHECK(g.dim() == 1 && g.size(0) == x.size(-1), "mblm: rms_norm g must have shape (D,) = (",
              x.size(-1), ",), got ", g.sizes());
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), "mblm: rms_norm g has dtype ", g.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(g.device() == x.device(), "mblm: rms_norm g is on ", g.device(), " but x is on ",
              x.device());
  TORCH_CHECK(std::isfinite(scale) && scale > 0,
              "mblm: rms_norm scale must be finite and > 0, got ", scale);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "mblm: rms_norm eps must be finite and >= 0, got ",
              eps);
}

void check_rms_norm_bwd_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& g,
                             const at::Tensor& rms, double scale, double eps, bool shift) {
  check_rms_norm_fwd_args(x, g, scale, eps, shift);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "mblm: rms_norm grad_y must have the shape of x ",
              x.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "mblm: rms_norm grad_y has dtype ",
              grad_y.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(grad_y.device() == x.device(), "mblm: rms_norm grad_y is on ", grad_y.device(),
              " but x is on ", x.device());
  const auto stat_shape = x.sizes().slice(0, x.dim() - 1);
  TORCH_CHECK(rms.sizes() == stat_shape,
              "mblm: rms_norm rms must have shape x.shape[:-1] = ", stat_shape, ", got ",
              rms.sizes());
  TORCH_CHECK(rms.scalar_type() == rms_norm_stat_dtype(x.scalar_type()),
              "mblm: rms_norm rms must be ", rms_norm_stat_dtype(x.scalar_type()),
              " for x of dtype ", x.scalar_type(), ", got ", rms.scalar_type());
  TORCH_CHECK(rms.device() == x.device(), "mblm: rms_norm rms is on ", rms.device(),
              " but x is on ", x.device());
}

}  // namespace mblm

TORCH_LIBRARY_FRAGMENT(mblm, m) {
  m.set_python_module("mblm.ops.norm");
  // x: (..., D) any strides; g: (D,). y: x's shape, contiguous; rms: x.shape[:-1] (unclamped).
  m.def(
      "rms_norm_fwd(Tensor x, Tensor g, float scale, float eps, bool shift) "
      "-> (Tensor y, Tensor rms)");
  // Gradients w.r.t. x and g given rms from rms_norm_fwd. No double backward.
  m.def(
      "rms_norm_bwd(Tensor grad_y, Tensor x, Tensor g, Tensor rms, float scale, float eps, "
      "bool shift) -> (Tensor grad_x, Tensor grad_g)");
}
