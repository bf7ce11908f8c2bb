#include "kernels.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

namespace mblm::runtime::kernels {

namespace {

using OptTensor = std::optional<at::Tensor>;

}  // namespace

at::Tensor attention_kv(const at::Tensor& q, const at::Tensor& kv, const OptTensor& cos,
                        const OptTensor& sin, bool causal, double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mblm::attn_kv_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const OptTensor&,
                                 const OptTensor&, bool, double)>();
  return std::get<0>(op.call(q, kv, cos, sin, causal, scale));
}

at::Tensor attn_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& lens,
                       const OptTensor& rows, const OptTensor& cos, const OptTensor& sin,
                       double scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mblm::attn_decode", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                            at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                            const OptTensor&, double)>();
  return op.call(q, k, v, k_cache, v_cache, lens, rows, cos, sin, scale);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& g, double scale, double eps,
                    bool shift) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mblm::rms_norm_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, double, double, bool)>();
  return std::get<0>(op.call(x, g, scale, eps, shift));
}

at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mblm::cross_entropy_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, int64_t)>();
  return std::get<0>(op.call(logits, target, ignore_index));
}

}  // namespace mblm::runtime::kernels
