// Conv family: schemas, the argument checks shared by the CPU and CUDA kernels, layout helpers
// and the C++ front functions. Semantics: mblm/ops/reference.py (causal_conv1d_ref).
#include "mblm/conv.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

namespace mblm {

namespace {

bool is_kernel_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 3, "mblm: ", op, " x must have 3 dims (B, C, L), got shape ", x.sizes());
  TORCH_CHECK(is_kernel_float(x.scalar_type()), "mblm: ", op,
              " x must be float64/float32/float16/bfloat16, got ", x.scalar_type());
}

// weight (C, K) and bias (C,): x's dtype or float32 (float64 x: float64 or float32).
void check_param_dtype(const at::Tensor& t, const char* name, const at::Tensor& x, const char* op) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == x.scalar_type() || dt == at::kFloat, "mblm: ", op, " ", name,
              " must have x's dtype (", x.scalar_type(), ") or float32, got ", dt);
}

void check_weight_bias(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& x, int64_t channels, const char* op) {
  TORCH_CHECK(weight.device() == x.device(), "mblm: ", op, " weight is on ", weight.device(),
              " but x is on ", x.device());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == channels, "mblm: ", op,
              " weight must have shape (C, K) with C = ", channels, " (x's channels), got shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(1) >= 1, "mblm: ", op,
              " weight must have a kernel width K >= 1, got shape ", weight.sizes());
  check_param_dtype(weight, "weight", x, op);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device(), "mblm: ", op, " bias is on ", bias->device(),
                " but x is on ", x.device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == channels, "mblm: ", op,
                " bias must have shape (C,) = (", channels, ",), got shape ", bias->sizes());
    check_param_dtype(*bias, "bias", x, op);
  }
}

void check_state(const at::Tensor& s, const char* name, const at::Tensor& x, int64_t batch,
                 int64_t channels, int64_t width, const char* op) {
  TORCH_CHECK(s.device() == x.device(), "mblm: ", op, " ", name, " is on ", s.device(),
              " but x is on ", x.device());
  TORCH_CHECK(s.scalar_type() == x.scalar_type(), "mblm: ", op, " ", name, " has dtype ",
              s.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(s.dim() == 3 && s.size(0) == batch && s.size(1) == channels && s.size(2) == width - 1,
              "mblm: ", op, " ", name, " must have shape (B, C, K - 1) = (", batch, ", ", channels,
              ", ", width - 1, "), got shape ", s.sizes());
}

}  // namespace

void check_conv1d_fwd_args(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& initial_state) {
  check_x(x, "conv1d");
  check_weight_bias(weight, bias, x, x.size(1), "conv1d");
  if (initial_state.has_value()) {
    check_state(*initial_state, "initial_state", x, x.size(0), x.size(1), weight.size(1), "conv1d");
  }
}

void check_conv1d_bwd_args(const at::Tensor& grad_y,
                           const std::optional<at::Tensor>& grad_final_state, const at::Tensor& x,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& initial_state) {
  check_conv1d_fwd_args(x, weight, bias, initial_state);
  TORCH_CHECK(grad_y.device() == x.device(), "mblm: conv1d_bwd grad_y is on ", grad_y.device(),
              " but x is on ", x.device());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "mblm: conv1d_bwd grad_y has dtype ",
              grad_y.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(grad_y.sizes() == x.sizes(),
              "mblm: conv1d_bwd grad_y must have x's shape (B, C, L) = ", x.sizes(), ", got ",
              grad_y.sizes());
  if (grad_final_state.has_value()) {
    check_state(*grad_final_state, "grad_final_state", x, x.size(0), x.size(1), weight.size(1),
                "conv1d_bwd");
  }
}

void check_conv1d_update_args(const at::Tensor& x, const at::Tensor& conv_state,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "mblm: conv1d_update x must have 2 dims (B, C), got shape ", x.sizes());
  TORCH_CHECK(is_kernel_float(x.scalar_type()),
              "mblm: conv1d_update x must be float64/float32/float16/bfloat16, got ",
              x.scalar_type());
  check_weight_bias(weight, bias, x, x.size(1), "conv1d_update");
  check_state(conv_state, "conv_state", x, x.size(0), x.size(1), weight.size(1), "conv1d_update");
  TORCH_CHECK(at::has_internal_overlap(conv_state) != at::MemOverlap::Yes,
              "mblm: conv1d_update conv_state is updated in place and must not have overlapping "
              "memory (e.g. an expand()ed tensor), got strides ",
              conv_state.strides());
}

at::Tensor conv1d_channels_last(const at::Tensor& x) {
  if (x.stride(1) == 1 || x.size(1) <= 1) return x;
  return x.transpose(1, 2).contiguous().transpose(1, 2);
}

at::Tensor conv1d_empty_like_output(const at::Tensor& x, at::ScalarType dtype) {
  return at::empty({x.size(0), x.size(2), x.size(1)}, x.options().dtype(dtype)).transpose(1, 2);
}

at::Tensor conv1d_weight_table(const at::Tensor& weight, const at::Tensor& x) {
  return weight.to(compute_dtype(x)).t().contiguous();
}

at::Tensor conv1d_bias_vector(const std::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (bias.has_value()) return bias->to(compute_dtype(x)).contiguous();
  return at::zeros({x.size(1)}, x.options().dtype(compute_dtype(x)));
}

at::Tensor conv1d_prefix_rows(const std::optional<at::Tensor>& initial_state, const at::Tensor& x,
                              int64_t width) {
  if (initial_state.has_value()) return initial_state->transpose(1, 2).contiguous();
  return at::zeros({x.size(0), width - 1, x.size(1)}, x.options());
}

at::Tensor conv1d_final_state(const at::Tensor& prefix, const at::Tensor& x, int64_t width) {
  const int64_t L = x.size(2), W1 = width - 1;
  const at::Tensor from_x = x.narrow(2, std::max<int64_t>(0, L - W1), std::min(L, W1));
  // Always a fresh tensor: an op output must not alias its input.
  if (L >= W1) return from_x.clone(at::MemoryFormat::Contiguous);
  const at::Tensor from_prefix = prefix.transpose(1, 2).narrow(2, L, W1 - L);
  return at::cat({from_prefix, from_x}, 2);
}

namespace {

c10::OperatorHandle op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> conv1d_fwd(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& initial_state,
                                              bool activation) {
  static auto op = op_handle("mblm::conv1d_fwd")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, bool)>();
  return op.call(x, weight, bias, initial_state, activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv1d_bwd(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_state, bool activation) {
  static auto op = op_handle("mblm::conv1d_bwd")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, bool)>();
  return op.call(grad_y, grad_final_state, x, weight, bias, initial_state, activation);
}

at::Tensor conv1d_update(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, bool activation) {
  static auto op = op_handle("mblm::conv1d_update")
                       .typed<at::Tensor(const at::Tensor&, at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, bool)>();
  return op.call(x, conv_state, weight, bias, activation);
}

}  // namespace mblm

TORCH_LIBRARY_FRAGMENT(mblm, m) {
  // y (B, C, L) and final_state (B, C, K - 1): the last K - 1 inputs of [initial_state, x].
  m.def(
      "conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_state, bool activation)"
      " -> (Tensor y, Tensor final_state)");
  // grad_bias is (0,) without a bias; grad_initial_state is always computed (it is small).
  m.def(
      "conv1d_bwd(Tensor grad_y, Tensor? grad_final_state, Tensor x, Tensor weight, Tensor? bias,"
      " Tensor? initial_state, bool activation)"
      " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_initial_state)");
  // One decode step: returns y (B, C) and rolls conv_state (B, C, K - 1) in place.
  m.def(
      "conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias,"
      " bool activation) -> Tensor");
}

// The decode step is not differentiable (it runs under inference mode): autograd passes through.
TORCH_LIBRARY_IMPL(mblm, Autograd, m) {
  m.impl("conv1d_update", torch::CppFunction::makeFallthrough());
}
