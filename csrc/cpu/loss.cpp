// CPU kernels of the loss family (cross_entropy_fwd / cross_entropy_bwd). Semantics:
// cross_entropy_ref in mblm/ops/reference.py.
//
// One pass per row each way: the row is converted into a per-thread buffer in the accumulation
// type, padded with -inf to the vector width (exp(-inf) = 0), then max, sum of exp and the
// log-sum-exp (forward), or softmax * grad minus grad at the target (backward), in full vectors.
// Versus log_softmax + nll_loss this keeps no (R, V) log-probabilities, and the backward writes
// the gradient once instead of zero-filling, scattering and then rescaling it.
#include "mblm/loss.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "attention_vec.h"

namespace mblm {

namespace {

using cpu_attn::cvt_load;
using cpu_attn::cvt_store;
using cpu_attn::Vec;

constexpr int64_t kGrainElems = int64_t{1} << 14;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// buf[0:vp] = row (acc_t), the padding -inf.
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* row, int64_t v, int64_t vp, acc_t* buf) {
  cvt_load(row, buf, v);
  std::fill(buf + v, buf + vp, -std::numeric_limits<acc_t>::infinity());
}

// Returns the row max and log(sum(exp(row - max))) (their sum is the log-sum-exp; kept apart so
// that loss = (max - x_t) + log_sum loses nothing to the rounding of a large lse).
template <typename acc_t>
inline std::pair<acc_t, acc_t> max_and_log_sum(const acc_t* buf, int64_t vp) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::kWidth;
  V m = V::broadcast(-std::numeric_limits<acc_t>::infinity());
  for (int64_t j = 0; j < vp; j += W) m = max(m, V::load(buf + j));
  const acc_t mx = m.hmax();
  if (!std::isfinite(mx)) return {mx, acc_t(0)};  // all -inf, or an inf / NaN logit
  const V mv = V::broadcast(mx);
  V s = V::zero();
  for (int64_t j = 0; j < vp; j += W) s = s + (V::load(buf + j) - mv).exp();
  return {mx, std::log(s.sum())};
}

template <typename scalar_t>
void fwd_impl(const at::Tensor& logits, const int64_t* target, scalar_t* loss,
              at::opmath_type<scalar_t>* lse, int64_t ignore_index) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = logits.size(0), v = logits.size(1), vp = round_up(v, Vec<acc_t>::kWidth);
  const int64_t rs = logits.stride(0), cs = logits.stride(1);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / v), [&](int64_t b, int64_t e) {
    std::vector<acc_t> buf(vp);
    std::vector<scalar_t> row(cs == 1 ? 0 : v);
    for (int64_t r = b; r < e; ++r) {
      const scalar_t* src = base + r * rs;
      if (cs != 1) {
        for (int64_t j = 0; j < v; ++j) row[j] = src[j * cs];
        src = row.data();
      }
      load_row(src, v, vp, buf.data());
      const auto [mx, log_sum] = max_and_log_sum(buf.data(), vp);
      lse[r] = mx + log_sum;
      const int64_t t = target[r];
      loss[r] = static_cast<scalar_t>(t == ignore_index ? acc_t(0) : (mx - buf[t]) + log_sum);
    }
  });
}

template <typename scalar_t>
void bwd_impl(const scalar_t* grad_loss, const at::Tensor& logits, const int64_t* target,
              const at::opmath_type<scalar_t>* lse, scalar_t* grad, int64_t ignore_index) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t W = V::kWidth;
  const int64_t rows = logits.size(0), v = logits.size(1), vp = round_up(v, W);
  const int64_t rs = logits.stride(0), cs = logits.stride(1);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / v), [&](int64_t b, int64_t e) {
    std::vector<acc_t> buf(vp);
    std::vector<scalar_t> row(cs == 1 ? 0 : v);
    for (int64_t r = b; r < e; ++r) {
      scalar_t* dst = grad + r * v;
      const int64_t t = target[r];
      if (t == ignore_index) {
        std::fill(dst, dst + v, scalar_t(0));
        continue;
      }
      const scalar_t* src = base + r * rs;
      if (cs != 1) {
        for (int64_t j = 0; j < v; ++j) row[j] = src[j * cs];
        src = row.data();
      }
      load_row(src, v, vp, buf.data());
      const acc_t g = static_cast<acc_t>(grad_loss[r]);
      const V lv = V::broadcast(lse[r]), gv = V::broadcast(g);
      for (int64_t j = 0; j < vp; j += W) {
        ((V::load(buf.data() + j) - lv).exp() * gv).store(buf.data() + j);
      }
      buf[t] -= g;
      cvt_store(buf.data(), dst, v);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits,
                                                         const at::Tensor& target_in,
                                                         int64_t ignore_index) {
  check_cross_entropy_fwd_args(logits, target_in);
  const auto target = target_in.contiguous();
  check_cross_entropy_targets(target, logits.size(1), ignore_index);
  auto loss = at::empty({logits.size(0)}, logits.options());
  auto lse = at::empty({logits.size(0)},
                       logits.options().dtype(cross_entropy_stat_dtype(logits.scalar_type())));
  if (logits.numel() == 0) return {loss, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "cross_entropy_fwd_cpu", [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    fwd_impl<scalar_t>(logits, target.const_data_ptr<int64_t>(),
                                                       loss.mutable_data_ptr<scalar_t>(),
                                                       lse.mutable_data_ptr<acc_t>(), ignore_index);
                                  });
  return {loss, lse};
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_loss_in, const at::Tensor& logits,
                                 const at::Tensor& target_in, const at::Tensor& lse_in,
                                 int64_t ignore_index) {
  check_cross_entropy_bwd_args(grad_loss_in, logits, target_in, lse_in);
  const auto target = target_in.contiguous();
  check_cross_entropy_targets(target, logits.size(1), ignore_index);
  const auto grad_loss = grad_loss_in.contiguous();
  const auto lse = lse_in.contiguous();
  auto grad =
      at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (logits.numel() == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_bwd_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        bwd_impl<scalar_t>(grad_loss.const_data_ptr<scalar_t>(), logits,
                           target.const_data_ptr<int64_t>(), lse.const_data_ptr<acc_t>(),
                           grad.mutable_data_ptr<scalar_t>(), ignore_index);
      });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(mblm, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
}

}  // namespace mblm
