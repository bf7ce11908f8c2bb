// Typed calls of the mblm ops that csrc/include declares no C++ front function for (attention,
// decode, RMSNorm, cross entropy). They go through the dispatcher, so the runtime runs on every
// device mblm_ops has kernels for. Argument layouts: see the schemas in csrc/ops/<family>.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace mblm::runtime::kernels {

// q (N, S, H, Dh); kv (N, S, 2, H, Dh); cos, sin (S, Dh) or absent. Returns (N, S, H, Dh).
at::Tensor attention_kv(const at::Tensor& q, const at::Tensor& kv,
                        const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                        bool causal, double scale);

// q, k, v (R, S, H, Dh); caches (B, C, H, Dh) written at lens[r]...; rows (R,) or absent;
// cos, sin (R, S, Dh) or absent. Returns (R, S, H, Dh).
at::Tensor attn_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& lens,
                       const std::optional<at::Tensor>& rows, const std::optional<at::Tensor>& cos,
                       const std::optional<at::Tensor>& sin, double scale);

// MEGABYTE's RMSNorm of x (..., D), optionally over token_shift(x): x's shape.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& g, double scale, double eps, bool shift);

// Per-row cross entropy of logits (R, V) against target (R,): (R,), 0 on ignored rows.
at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index);

}  // namespace mblm::runtime::kernels
