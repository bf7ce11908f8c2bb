// Norm family: MEGABYTE's RMSNorm, optionally over the token-shifted input (RWKV token shift),
// fused so that neither the shifted nor the normalised copy is materialised.
//   u = token_shift(x) if shift else x   (shift: the last floor(D/2) features move one position
//                                          down axis -2; position 0 of that half becomes 0)
//   rms = scale * ||u||_2 over the last axis;  y = u / max(rms, eps) * g
// x: (..., D) (with shift at least 2 dims, axis -2 being the sequence), g: (D,) of x's dtype.
// rms is kept (unclamped) for the backward: x.shape[:-1], float32 (float64 for float64 x).
// Semantics: mblm/ops/reference.py (rms_norm_ref).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace mblm {

// Argument checks shared by the CPU and CUDA kernels (csrc/ops/norm.cpp).
void check_rms_norm_fwd_args(const at::Tensor& x, const at::Tensor& g, double scale, double eps,
                             bool shift);
void check_rms_norm_bwd_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& g,
                             const at::Tensor& rms, double scale, double eps, bool shift);

// The dtype of rms: float64 for float64 x, float32 otherwise.
at::ScalarType rms_norm_stat_dtype(at::ScalarType x_dtype);

// Features kept in place by the token shift: ceil(D / 2) (torch.chunk(2)'s first part).
inline int64_t token_shift_keep(int64_t dim) { return (dim + 1) / 2; }

}  // namespace mblm
