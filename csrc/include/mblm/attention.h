// Attention family: multi-head attention where every head has its own K and V (MEGABYTE
// stages), optional half-split rotary embedding on q and k, causal or bidirectional.
// Layout: q, k, v are (N, S, H, Dh) with any strides but a contiguous last dimension; out is
// (N, S, H, Dh) contiguous; lse is (N, H, S) in float32 (float64 for float64 inputs).
// cos and sin are (S, Dh) float32 (float64 allowed for float64 inputs), both given or both absent.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace mblm {

// Validates the arguments of attn_fwd; shared by the CPU and CUDA kernels.
void check_attn_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& cos,
                         const std::optional<at::Tensor>& sin);

// Validates the arguments of attn_bwd (calls check_attn_fwd_args for the shared part).
void check_attn_bwd_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                         const std::optional<at::Tensor>& cos,
                         const std::optional<at::Tensor>& sin);

// Validates the packed kv (N, S, 2, H, Dh) of attn_kv_fwd / attn_kv_bwd against q; the rest is
// checked on the views kv[:, :, 0] and kv[:, :, 1] as k and v.
void check_attn_kv_args(const at::Tensor& q, const at::Tensor& kv);

}  // namespace mblm
