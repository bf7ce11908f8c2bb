// Loss family: schemas and the argument checks shared by the CPU and CUDA kernels.
// Semantics: mblm/ops/reference.py (cross_entropy_ref).
#include "mblm/loss.h"

#include <ATen/ops/aminmax.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

namespace mblm {

namespace {

bool is_kernel_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

at::ScalarType cross_entropy_stat_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cross_entropy_fwd_args(const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.dim() == 2, "mblm: cross_entropy logits must have 2 dims (R, V), got shape ",
              logits.sizes());
  TORCH_CHECK(is_kernel_float(logits.scalar_type()),
              "mblm: cross_entropy logits must be float64/float32/float16/bfloat16, got dtype ",
              logits.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0),
              "mblm: cross_entropy target must have shape (R,) = (", logits.size(0), ",), got ",
              target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "mblm: cross_entropy target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), "mblm: cross_entropy target is on ",
              target.device(), " but logits is on ", logits.device());
  TORCH_CHECK(logits.size(1) > 0 || logits.size(0) == 0,
              "mblm: cross_entropy logits must have at least one class, got shape ",
              logits.sizes());
}

void check_cross_entropy_bwd_args(const at::Tensor& grad_loss, const at::Tensor& logits,
                                  const at::Tensor& target, const at::Tensor& lse) {
  check_cross_entropy_fwd_args(logits, target);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == logits.size(0),
              "mblm: cross_entropy grad_loss must have shape (R,) = (", logits.size(0), ",), got ",
              grad_loss.sizes());
  TORCH_CHECK(grad_loss.scalar_type() == logits.scalar_type(),
              "mblm: cross_entropy grad_loss has dtype ", grad_loss.scalar_type(),
              " but logits has dtype ", logits.scalar_type());
  TORCH_CHECK(grad_loss.device() == logits.device(), "mblm: cross_entropy grad_loss is on ",
              grad_loss.device(), " but logits is on ", logits.device());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == logits.size(0),
              "mblm: cross_entropy lse must have shape (R,) = (", logits.size(0), ",), got ",
              lse.sizes());
  TORCH_CHECK(lse.scalar_type() == cross_entropy_stat_dtype(logits.scalar_type()),
              "mblm: cross_entropy lse must be ", cross_entropy_stat_dtype(logits.scalar_type()),
              " for logits of dtype ", logits.scalar_type(), ", got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == logits.device(), "mblm: cross_entropy lse is on ", lse.device(),
              " but logits is on ", logits.device());
}

void check_cross_entropy_targets(const at::Tensor& target, int64_t vocab, int64_t ignore_index) {
  if (target.numel() == 0) return;
  // Ignored entries are replaced by 0 so that min/max see only real class ids.
  const at::Tensor real = at::where(at::eq(target, ignore_index), at::zeros_like(target), target);
  const auto [lo, hi] = at::aminmax(real);
  const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
  TORCH_CHECK(lo_v >= 0 && hi_v < vocab, "mblm: cross_entropy target must lie in [0, ", vocab,
              ") or equal ignore_index = ", ignore_index, ", got values in [", lo_v, ", ", hi_v,
              "]");
}

}  // namespace mblm

TORCH_LIBRARY_FRAGMENT(mblm, m) {
  m.set_python_module("mblm.ops.loss");
  // logits: (R, V) any strides; target: (R,) int64. loss: (R,) logits' dtype; lse: (R,) fp32/fp64.
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index) "
      "-> (Tensor loss, Tensor lse)");
  // grad_logits (R, V) contiguous = grad_loss * (softmax(logits) - onehot(target)), 0 on ignored
  // rows. No double backward.
  m.def(
      "cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, "
      "int ignore_index) -> Tensor");
}
