// Loss family: per-row cross entropy of logits against integer targets (F.cross_entropy with
// reduction="none"), in one pass over the logits forward and one backward.
//   lse[r] = log(sum_j exp(logits[r, j]));  loss[r] = lse[r] - logits[r, target[r]]
// Rows whose target equals ignore_index get loss 0 and a zero gradient.
// logits: (R, V) float64/float32/float16/bfloat16; target: (R,) int64 in [0, V) or ignore_index.
// loss: (R,) in logits' dtype; lse: (R,) float32 (float64 for float64), kept for the backward.
// Semantics: mblm/ops/reference.py (cross_entropy_ref).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace mblm {

// Shape / dtype / device checks shared by the CPU and CUDA kernels (csrc/ops/loss.cpp).
void check_cross_entropy_fwd_args(const at::Tensor& logits, const at::Tensor& target);
void check_cross_entropy_bwd_args(const at::Tensor& grad_loss, const at::Tensor& logits,
                                  const at::Tensor& target, const at::Tensor& lse);
// Every target in [0, V) or equal to ignore_index (reads the targets: call on the host side of
// the device that holds them).
void check_cross_entropy_targets(const at::Tensor& target, int64_t vocab, int64_t ignore_index);

at::ScalarType cross_entropy_stat_dtype(at::ScalarType logits_dtype);

}  // namespace mblm
