// CPU kernel of the GELU family (gelu_bwd). Semantics: gelu_bwd_ref in mblm/ops/reference.py.
//
// One pass: read h and grad_act, write grad_h and act. float32 (and the float32 math of half /
// bfloat16) shares one exp between Phi and phi: erf(z) = 1 - P(t) exp(-z^2) with t = 1/(1+pz)
// (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7) at z = |h|/sqrt(2), and exp(-z^2) =
// exp(-h^2/2) = sqrt(2 pi) phi(h). float64 uses libm's erf and exp (the gradcheck dtype).
#include "mblm/gelu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "attention_vec.h"

namespace mblm {

namespace {

using cpu_attn::cvt_load;
using cpu_attn::cvt_store;

constexpr int64_t kBlock = 256;  // elements converted / computed at a time
constexpr int64_t kGrain = int64_t{1} << 15;

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
// Abramowitz & Stegun 7.1.26
constexpr float kP = 0.3275911f, kA1 = 0.254829592f, kA2 = -0.284496736f, kA3 = 1.421413741f,
                kA4 = -1.453152027f, kA5 = 1.061405429f;

inline void gelu_scalar(double h, double g, double& act, double& gh) {
  const double cdf = 0.5 * (1.0 + std::erf(h * kInvSqrt2));
  const double pdf = kInvSqrt2Pi * std::exp(-0.5 * h * h);
  act = h * cdf;
  gh = g * (cdf + h * pdf);
}

inline void gelu_scalar(float h, float g, float& act, float& gh) {
  double a, d;
  gelu_scalar(double(h), double(g), a, d);
  act = float(a), gh = float(d);
}

// n elements of float: act[i], gh[i] from h[i], g[i].
inline void gelu_block(const float* h, const float* g, float* act, float* gh, int64_t n) {
  int64_t i = 0;
#if MBLM_CPU_AVX2
  using V = cpu_attn::Vec<float>;
  const V half = V::broadcast(0.5f), one = V::broadcast(1.0f), zero = V::zero(),
          inv_sqrt2 = V::broadcast(float(kInvSqrt2)),
          inv_sqrt2pi = V::broadcast(float(kInvSqrt2Pi)), p = V::broadcast(kP),
          a1 = V::broadcast(kA1), a2 = V::broadcast(kA2), a3 = V::broadcast(kA3),
          a4 = V::broadcast(kA4), a5 = V::broadcast(kA5), neg_half = V::broadcast(-0.5f);
  for (; i + V::kWidth <= n; i += V::kWidth) {
    const V x = V::load(h + i), gv = V::load(g + i);
    const V e = (neg_half * x * x).exp();  // exp(-x^2/2)
    const V z = abs(x) * inv_sqrt2;
    const V t = one / fmadd(p, z, one);
    const V poly = t * fmadd(fmadd(fmadd(fmadd(a5, t, a4), t, a3), t, a2), t, a1);
    const V tail = half * poly * e;                      // 0.5 erfc(|x|/sqrt2) = Phi(-|x|)
    const V cdf = select_ge(x, zero, tail, one - tail);  // x >= 0: 1 - Phi(-x)
    (x * cdf).store(act + i);
    (gv * fmadd(x, e * inv_sqrt2pi, cdf)).store(gh + i);
  }
#endif
  for (; i < n; ++i) gelu_scalar(h[i], g[i], act[i], gh[i]);
}

inline void gelu_block(const double* h, const double* g, double* act, double* gh, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gelu_scalar(h[i], g[i], act[i], gh[i]);
}

template <typename scalar_t>
void gelu_bwd_impl(const scalar_t* g, const scalar_t* h, scalar_t* gh, scalar_t* act,
                   int64_t numel) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      gelu_block(h + begin, g + begin, act + begin, gh + begin, end - begin);
    } else {
      acc_t hb[kBlock], gb[kBlock], ab[kBlock], db[kBlock];
      for (int64_t i = begin; i < end; i += kBlock) {
        const int64_t n = std::min(kBlock, end - i);
        cvt_load(h + i, hb, n);
        cvt_load(g + i, gb, n);
        gelu_block(hb, gb, ab, db, n);
        cvt_store(ab, act + i, n);
        cvt_store(db, gh + i, n);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gelu_bwd_cpu(const at::Tensor& grad_act_in,
                                                const at::Tensor& h_in) {
  check_gelu_bwd_args(grad_act_in, h_in);
  const auto h = h_in.contiguous();
  const auto grad_act = grad_act_in.contiguous();
  auto grad_h = at::empty(h.sizes(), h.options());
  auto act = at::empty(h.sizes(), h.options());
  if (h.numel() == 0) return {grad_h, act};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "gelu_bwd_cpu", [&] {
    gelu_bwd_impl<scalar_t>(grad_act.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                            grad_h.mutable_data_ptr<scalar_t>(), act.mutable_data_ptr<scalar_t>(),
                            h.numel());
  });
  return {grad_h, act};
}

}  // namespace

TORCH_LIBRARY_IMPL(mblm, CPU, m) { m.impl("gelu_bwd", &gelu_bwd_cpu); }

}  // namespace mblm
