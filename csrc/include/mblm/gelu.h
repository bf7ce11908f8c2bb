// GELU family: the backward of a GELU whose output was not kept. From h and the gradient of
// act = gelu(h) it gives, in one pass, the gradient of h and act itself (which the next layer's
// weight gradient needs):  act = h * Phi(h),  grad_h = grad_act * (Phi(h) + h * phi(h)),
// Phi / phi the standard normal CDF / density (the exact, erf-based GELU).
// Semantics: mblm/ops/reference.py (gelu_bwd_ref).
#pragma once

#include <ATen/core/Tensor.h>

namespace mblm {

// Checks shared by the CPU and CUDA kernels (csrc/ops/gelu.cpp).
void check_gelu_bwd_args(const at::Tensor& grad_act, const at::Tensor& h);

}  // namespace mblm
