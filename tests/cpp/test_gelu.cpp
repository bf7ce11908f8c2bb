// GELU family through the dispatcher (CPU kernel) against libm in double.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/randn.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "mblm/gelu.h"

namespace {

std::tuple<at::Tensor, at::Tensor> call_gelu_bwd(const at::Tensor& g, const at::Tensor& h) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("mblm::gelu_bwd", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>()
      .call(g, h);
}

TEST(GeluBwd, Float32MatchesLibm) {
  const at::Tensor h = at::randn({1000}).mul_(4.0);
  const at::Tensor g = at::randn({1000});
  const auto [grad_h, act] = call_gelu_bwd(g, h);
  for (int64_t i = 0; i < 1000; ++i) {
    const double x = h[i].item<float>(), gi = g[i].item<float>();
    const double cdf = 0.5 * (1 + std::erf(x / std::sqrt(2.0)));
    const double pdf = std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI);
    EXPECT_NEAR(act[i].item<float>(), x * cdf, 1e-6 * (1 + std::abs(x)));
    EXPECT_NEAR(grad_h[i].item<float>(), gi * (cdf + x * pdf), 1e-6 * (1 + std::abs(gi)));
  }
}

TEST(GeluBwd, BadInputsThrow) {
  EXPECT_THROW(call_gelu_bwd(at::randn({3}), at::randn({4})), c10::Error);
  EXPECT_THROW(call_gelu_bwd(at::randn({3}).to(at::kDouble), at::randn({3})), c10::Error);
}

}  // namespace
