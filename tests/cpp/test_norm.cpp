// Norm family through the dispatcher (CPU kernels) against naive loops in double.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "mblm/norm.h"

namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;

Pair call_fwd(const at::Tensor& x, const at::Tensor& g, double scale, double eps, bool shift) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("mblm::rms_norm_fwd", "")
      .typed<Pair(const at::Tensor&, const at::Tensor&, double, double, bool)>()
      .call(x, g, scale, eps, shift);
}

Pair call_bwd(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& g, const at::Tensor& rms,
              double scale, double eps, bool shift) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("mblm::rms_norm_bwd", "")
      .typed<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  double, double, bool)>()
      .call(gy, x, g, rms, scale, eps, shift);
}

// u[b][s][i] of the token shift (keep = ceil(d / 2)).
double u_at(const at::TensorAccessor<double, 3>& x, int64_t b, int64_t s, int64_t i, int64_t d,
            bool shift) {
  if (!shift || i < (d + 1) / 2) return x[b][s][i];
  return s == 0 ? 0.0 : x[b][s - 1][i];
}

TEST(RmsNorm, ForwardMatchesNaiveLoops) {
  const int64_t n = 3, s = 5, d = 7;
  const double scale = 0.4, eps = 1e-8;
  for (const bool shift : {false, true}) {
    const at::Tensor x = at::randn({n, s, d}, at::TensorOptions().dtype(at::kDouble));
    const at::Tensor g = at::randn({d}, at::TensorOptions().dtype(at::kDouble));
    const auto [y, rms] = call_fwd(x, g, scale, eps, shift);
    const auto xa = x.accessor<double, 3>();
    for (int64_t b = 0; b < n; ++b) {
      for (int64_t t = 0; t < s; ++t) {
        double ss = 0;
        for (int64_t i = 0; i < d; ++i) ss += std::pow(u_at(xa, b, t, i, d, shift), 2);
        const double r = std::sqrt(ss) * scale;
        EXPECT_NEAR(rms[b][t].item<double>(), r, 1e-12);
        for (int64_t i = 0; i < d; ++i) {
          const double want = u_at(xa, b, t, i, d, shift) / std::max(r, eps) * g[i].item<double>();
          EXPECT_NEAR(y[b][t][i].item<double>(), want, 1e-12) << "shift " << shift;
        }
      }
    }
  }
}

TEST(RmsNorm, BackwardShiftAdjointAndGradG) {
  // With g = 1 and a zero-norm row (clamped), grad_u = grad_y / eps on that row: the shifted
  // half of grad_y at row s lands in grad_x at row s - 1, the last row's shifted half is 0.
  const int64_t s = 4, d = 4;
  const double eps = 0.5;
  const at::Tensor x = at::zeros({1, s, d}, at::TensorOptions().dtype(at::kDouble));
  const at::Tensor g = at::ones({d}, at::TensorOptions().dtype(at::kDouble));
  const at::Tensor gy = at::randn({1, s, d}, at::TensorOptions().dtype(at::kDouble));
  const auto [y, rms] = call_fwd(x, g, 1.0, eps, true);
  const auto [gx, gg] = call_bwd(gy, x, g, rms, 1.0, eps, true);
  for (int64_t t = 0; t < s; ++t) {
    for (int64_t i = 0; i < d; ++i) {
      double want = i < 2 ? gy[0][t][i].item<double>() / eps
                          : (t + 1 < s ? gy[0][t + 1][i].item<double>() / eps : 0.0);
      EXPECT_NEAR(gx[0][t][i].item<double>(), want, 1e-12) << t << "," << i;
    }
  }
  for (int64_t i = 0; i < d; ++i) EXPECT_EQ(gg[i].item<double>(), 0.0);  // u = 0
}

TEST(RmsNorm, BadInputsThrow) {
  const at::Tensor x = at::randn({2, 3});
  EXPECT_THROW(call_fwd(x, at::randn({4}), 1.0, 1e-8, false), c10::Error);
  EXPECT_THROW(call_fwd(at::randn({3}), at::randn({3}), 1.0, 1e-8, true), c10::Error);
  EXPECT_THROW(call_fwd(x, at::randn({3}), -1.0, 1e-8, false), c10::Error);
}

}  // namespace
