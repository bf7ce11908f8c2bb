// Conv family, CPU kernels: conv1d_fwd, conv1d_bwd, conv1d_update.
// Checks and layout helpers: csrc/ops/conv.cpp. Semantics: mblm/ops/reference.py.
//
// Time is the sequential axis and channels are independent, so every kernel walks time rows of
// C contiguous channels (x read channel-contiguous, y written (B, L, C)-contiguous) and the inner
// loops over channels vectorise. Rows before t = 0 come from a per-batch (K - 1, C) prefix made
// from initial_state. Work is split over (batch, blocks of time rows); the backward recomputes
// the pre-activation of the rows it needs instead of saving it, and reduces the weight and bias
// gradients through per-task partial sums (deterministic, no atomics).
#include "mblm/conv.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "attention_vec.h"

namespace mblm {

namespace {

using cpu_attn::Vec;

// Time rows per task: enough work per task to amortise the scheduling, few enough to keep both
// cores busy at batch 1.
constexpr int64_t kRowsPerTask = 64;

template <typename acc_t>
using Buf = std::vector<acc_t>;

// e[c] = exp(-p[c]) for c < n, vectorised.
template <typename acc_t>
void exp_neg(const acc_t* p, acc_t* e, int64_t n) {
  using V = Vec<acc_t>;
  int64_t c = 0;
  for (; c + V::kWidth <= n; c += V::kWidth) (V::zero() - V::load(p + c)).exp().store(e + c);
  for (; c < n; ++c) e[c] = std::exp(-p[c]);
}

// Read access to the extended sequence [prefix, x] of one batch: row(s) for s in [-(K-1), L).
template <typename scalar_t>
struct Rows {
  const scalar_t* x;       // x[b, 0, 0], channel stride 1
  int64_t time_stride;     // x.stride(2)
  const scalar_t* prefix;  // (K - 1, C) contiguous
  int64_t width;
  int64_t channels;

  const scalar_t* row(int64_t s) const {
    return s >= 0 ? x + s * time_stride : prefix + (s + width - 1) * channels;
  }
};

// pre[c] = bias[c] + sum_k w[k][c] * row(t + k - (K - 1))[c].
template <typename scalar_t, typename acc_t>
void pre_activation(const Rows<scalar_t>& rows, const acc_t* wt, const acc_t* bias, int64_t t,
                    acc_t* pre) {
  const int64_t C = rows.channels;
  std::copy(bias, bias + C, pre);
  for (int64_t k = 0; k < rows.width; ++k) {
    const scalar_t* r = rows.row(t + k - (rows.width - 1));
    const acc_t* w = wt + k * C;
    for (int64_t c = 0; c < C; ++c) pre[c] += w[c] * static_cast<acc_t>(r[c]);
  }
}

// out = silu(pre) (or pre), e is scratch of C elements.
template <typename acc_t>
void activate(const acc_t* pre, acc_t* e, acc_t* out, int64_t n, bool activation) {
  if (!activation) {
    std::copy(pre, pre + n, out);
    return;
  }
  exp_neg(pre, e, n);
  for (int64_t c = 0; c < n; ++c) out[c] = pre[c] / (acc_t(1) + e[c]);
}

// g = grad_y * d act / d pre, in place in gy (pre and e are C-element inputs/scratch).
template <typename acc_t>
void activation_grad(const acc_t* pre, acc_t* e, acc_t* gy, int64_t n, bool activation) {
  if (!activation) return;
  exp_neg(pre, e, n);
  for (int64_t c = 0; c < n; ++c) {
    const acc_t s = acc_t(1) / (acc_t(1) + e[c]);
    gy[c] *= s * (acc_t(1) + pre[c] * (acc_t(1) - s));
  }
}

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& x, const at::Tensor& prefix, int64_t b, int64_t width) {
  return {x.const_data_ptr<scalar_t>() + b * x.stride(0), x.stride(2),
          prefix.const_data_ptr<scalar_t>() + b * prefix.stride(0), width, x.size(1)};
}

std::tuple<at::Tensor, at::Tensor> conv1d_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  const std::optional<at::Tensor>& initial_state,
                                                  bool activation) {
  check_conv1d_fwd_args(x_in, weight, bias, initial_state);
  const at::Tensor x = conv1d_channels_last(x_in);
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2), K = weight.size(1);
  at::Tensor y = conv1d_empty_like_output(x, x.scalar_type());
  const at::Tensor prefix = conv1d_prefix_rows(initial_state, x, K);
  at::Tensor final_state = conv1d_final_state(prefix, x, K);
  if (B == 0 || C == 0 || L == 0) return {y, final_state};
  const at::Tensor wt = conv1d_weight_table(weight, x);
  const at::Tensor bv = conv1d_bias_vector(bias, x);
  const int64_t blocks = (L + kRowsPerTask - 1) / kRowsPerTask;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv1d_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* w = wt.const_data_ptr<acc_t>();
    const acc_t* bp = bv.const_data_ptr<acc_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      Buf<acc_t> pre(C), e(C), out(C);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, t0 = (task % blocks) * kRowsPerTask;
        const Rows<scalar_t> rows = rows_of<scalar_t>(x, prefix, b, K);
        for (int64_t t = t0; t < std::min(L, t0 + kRowsPerTask); ++t) {
          pre_activation(rows, w, bp, t, pre.data());
          activate(pre.data(), e.data(), out.data(), C, activation);
          scalar_t* yr = yp + (b * L + t) * C;
          for (int64_t c = 0; c < C; ++c) yr[c] = static_cast<scalar_t>(out[c]);
        }
      }
    });
  });
  return {y, final_state};
}

// The backward of one batch row range. With g[t] = grad_y[t] * act'(pre[t]) (t in [0, L)) and
// the extended sequence xx = [prefix, x] (index s = t + k - (K - 1)):
//   grad_xx[s] = sum_k w[k] g[s + (K - 1) - k]  (+ grad_final_state[s - (L - (K - 1))])
//   grad_w[k] = sum_t g[t] xx[t + k - (K - 1)],  grad_bias = sum_t g[t].
template <typename scalar_t, typename acc_t>
struct ConvBackward {
  const at::Tensor& x;
  const at::Tensor& grad_y;  // channel-contiguous
  const at::Tensor& prefix;
  const acc_t* wt;
  const acc_t* bias;
  const std::optional<at::Tensor>& grad_final;  // (B, C, K - 1) contiguous
  int64_t C, L, K;
  bool activation;

  // g rows [r0, r1) of batch b into g (row-major, C wide); scratch pre/e of C.
  void g_rows(int64_t b, int64_t r0, int64_t r1, acc_t* g, acc_t* pre, acc_t* e) const {
    const Rows<scalar_t> rows = rows_of<scalar_t>(x, prefix, b, K);
    const scalar_t* gy = grad_y.const_data_ptr<scalar_t>() + b * grad_y.stride(0);
    for (int64_t t = r0; t < r1; ++t) {
      acc_t* gr = g + (t - r0) * C;
      const scalar_t* gyr = gy + t * grad_y.stride(2);
      for (int64_t c = 0; c < C; ++c) gr[c] = static_cast<acc_t>(gyr[c]);
      if (activation) {
        pre_activation(rows, wt, bias, t, pre);
        activation_grad(pre, e, gr, C, true);
      }
    }
  }

  // grad of extended row s (s in [-(K-1), L)) from g rows [g0, g0 + n) into out (C wide).
  void grad_xx_row(int64_t b, int64_t s, const acc_t* g, int64_t g0, int64_t n, acc_t* out) const {
    std::fill(out, out + C, acc_t(0));
    for (int64_t k = 0; k < K; ++k) {
      const int64_t t = s + (K - 1) - k;
      if (t < 0 || t >= L) continue;
      const acc_t* gr = g + (t - g0) * C;
      const acc_t* w = wt + k * C;
      (void)n;
      for (int64_t c = 0; c < C; ++c) out[c] += w[c] * gr[c];
    }
    const int64_t j = s - (L - (K - 1));
    if (grad_final.has_value() && j >= 0) {
      const scalar_t* gf = grad_final->const_data_ptr<scalar_t>() + b * C * (K - 1);
      for (int64_t c = 0; c < C; ++c) out[c] += static_cast<acc_t>(gf[c * (K - 1) + j]);
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv1d_bwd_cpu(
    const at::Tensor& grad_y_in, const std::optional<at::Tensor>& grad_final_in,
    const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_state, bool activation) {
  check_conv1d_bwd_args(grad_y_in, grad_final_in, x_in, weight, bias, initial_state);
  const at::Tensor x = conv1d_channels_last(x_in);
  const at::Tensor grad_y = conv1d_channels_last(grad_y_in);
  std::optional<at::Tensor> grad_final;
  if (grad_final_in.has_value()) grad_final = grad_final_in->contiguous();
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2), K = weight.size(1);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_x = conv1d_empty_like_output(x, x.scalar_type());
  at::Tensor grad_init = at::empty({B, C, K - 1}, x.options());
  const int64_t blocks = (L + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t tasks = B * blocks;
  // Per-task partial sums of grad_w (K x C) and grad_bias (C), reduced below.
  at::Tensor partial =
      at::zeros({std::max<int64_t>(tasks, 1), K + 1, C}, x.options().dtype(acc_dtype));
  if (B > 0 && C > 0) {
    const at::Tensor wt = conv1d_weight_table(weight, x);
    const at::Tensor bv = conv1d_bias_vector(bias, x);
    const at::Tensor prefix = conv1d_prefix_rows(initial_state, x, K);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv1d_bwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const ConvBackward<scalar_t, acc_t> bw{x,
                                             grad_y,
                                             prefix,
                                             wt.const_data_ptr<acc_t>(),
                                             bv.const_data_ptr<acc_t>(),
                                             grad_final,
                                             C,
                                             L,
                                             K,
                                             activation};
      scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
      acc_t* part = partial.mutable_data_ptr<acc_t>();
      at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        Buf<acc_t> g((kRowsPerTask + K - 1) * C), pre(C), e(C), out(C);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / blocks, t0 = (task % blocks) * kRowsPerTask;
          const int64_t t1 = std::min(L, t0 + kRowsPerTask);
          // grad_x[t] needs g[t .. t + K - 1]; the partial sums need g[t0 .. t1).
          const int64_t g1 = std::min(L, t1 + K - 1);
          bw.g_rows(b, t0, g1, g.data(), pre.data(), e.data());
          const Rows<scalar_t> rows = rows_of<scalar_t>(x, prefix, b, K);
          acc_t* pw = part + task * (K + 1) * C;
          for (int64_t t = t0; t < t1; ++t) {
            const acc_t* gr = g.data() + (t - t0) * C;
            for (int64_t k = 0; k < K; ++k) {
              const scalar_t* r = rows.row(t + k - (K - 1));
              acc_t* pk = pw + k * C;
              for (int64_t c = 0; c < C; ++c) pk[c] += gr[c] * static_cast<acc_t>(r[c]);
            }
            acc_t* pb = pw + K * C;
            for (int64_t c = 0; c < C; ++c) pb[c] += gr[c];
            bw.grad_xx_row(b, t, g.data(), t0, g1 - t0, out.data());
            scalar_t* gxr = gx + (b * L + t) * C;
            for (int64_t c = 0; c < C; ++c) gxr[c] = static_cast<scalar_t>(out[c]);
          }
        }
      });
      // grad_initial_state: extended rows s in [-(K-1), 0) read g[0 .. K - 1).
      scalar_t* gi = grad_init.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        const int64_t n = std::min(L, K - 1);
        Buf<acc_t> g(std::max<int64_t>(n, 1) * C), pre(C), e(C), out(C);
        for (int64_t b = begin; b < end; ++b) {
          bw.g_rows(b, 0, n, g.data(), pre.data(), e.data());
          for (int64_t j = 0; j < K - 1; ++j) {
            bw.grad_xx_row(b, j - (K - 1), g.data(), 0, n, out.data());
            for (int64_t c = 0; c < C; ++c) {
              gi[(b * C + c) * (K - 1) + j] = static_cast<scalar_t>(out[c]);
            }
          }
        }
      });
    });
  } else {
    grad_init.zero_();
  }
  const at::Tensor sums = partial.sum(0);  // (K + 1, C)
  // Fresh tensors (copy=true): views into `sums` would not match the fake's metadata.
  at::Tensor grad_w = sums.narrow(0, 0, K).t().to(weight.scalar_type(), false, true).contiguous();
  at::Tensor grad_b = bias.has_value() ? sums[K].to(bias->scalar_type(), false, true)
                                       : at::empty({0}, x.options().dtype(weight.scalar_type()));
  return {grad_x, grad_w, grad_b, grad_init};
}

at::Tensor conv1d_update_cpu(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, bool activation) {
  check_conv1d_update_args(x, conv_state, weight, bias);
  const int64_t B = x.size(0), C = x.size(1), K = weight.size(1);
  at::Tensor y = at::empty({B, C}, x.options());
  if (B == 0 || C == 0) return y;
  const at::Tensor wt = conv1d_weight_table(weight, x);
  const at::Tensor bv = conv1d_bias_vector(bias, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv1d_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* w = wt.const_data_ptr<acc_t>();
    const acc_t* bp = bv.const_data_ptr<acc_t>();
    scalar_t* st = conv_state.mutable_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t sb = conv_state.stride(0), sc = conv_state.stride(1), sk = conv_state.stride(2);
    at::parallel_for(0, B * C, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / C, c = i % C;
        scalar_t* s = st + b * sb + c * sc;
        const acc_t xv = static_cast<acc_t>(xp[b * x.stride(0) + c * x.stride(1)]);
        acc_t acc = bp[c] + w[(K - 1) * C + c] * xv;
        for (int64_t k = 0; k < K - 1; ++k) acc += w[k * C + c] * static_cast<acc_t>(s[k * sk]);
        for (int64_t k = 0; k + 1 < K - 1; ++k) s[k * sk] = s[(k + 1) * sk];
        if (K > 1) s[(K - 2) * sk] = static_cast<scalar_t>(xv);
        if (activation) acc = acc / (acc_t(1) + std::exp(-acc));
        yp[i] = static_cast<scalar_t>(acc);
      }
    });
  });
  return y;
}

}  // namespace

}  // namespace mblm

TORCH_LIBRARY_IMPL(mblm, CPU, m) {
  m.impl("conv1d_fwd", &mblm::conv1d_fwd_cpu);
  m.impl("conv1d_bwd", &mblm::conv1d_bwd_cpu);
  m.impl("conv1d_update", &mblm::conv1d_update_cpu);
}
