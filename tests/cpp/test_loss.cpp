// Loss family through the dispatcher (CPU kernels) against naive loops in double.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/tensor.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "mblm/loss.h"

namespace {

std::tuple<at::Tensor, at::Tensor> call_fwd(const at::Tensor& logits, const at::Tensor& target,
                                            int64_t ignore) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("mblm::cross_entropy_fwd", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>()
      .call(logits, target, ignore);
}

at::Tensor call_bwd(const at::Tensor& g, const at::Tensor& logits, const at::Tensor& target,
                    const at::Tensor& lse, int64_t ignore) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("mblm::cross_entropy_bwd", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        int64_t)>()
      .call(g, logits, target, lse, ignore);
}

TEST(CrossEntropy, MatchesNaiveLoops) {
  const int64_t rows = 5, vocab = 11, ignore = 3;
  const at::Tensor logits = at::randn({rows, vocab}, at::TensorOptions().dtype(at::kDouble));
  const at::Tensor target = at::tensor(std::vector<int64_t>{0, 3, 10, 7, 3});
  const at::Tensor g = at::randn({rows}, at::TensorOptions().dtype(at::kDouble));
  const auto [loss, lse] = call_fwd(logits, target, ignore);
  const at::Tensor grad = call_bwd(g, logits, target, lse, ignore);
  const auto la = logits.accessor<double, 2>();
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0;
    for (int64_t j = 0; j < vocab; ++j) s += std::exp(la[r][j]);
    const int64_t t = target[r].item<int64_t>();
    const bool ignored = t == ignore;
    EXPECT_NEAR(lse[r].item<double>(), std::log(s), 1e-12);
    EXPECT_NEAR(loss[r].item<double>(), ignored ? 0.0 : std::log(s) - la[r][t], 1e-12);
    for (int64_t j = 0; j < vocab; ++j) {
      const double gr = g[r].item<double>();
      const double want = ignored ? 0.0 : gr * (std::exp(la[r][j]) / s - (j == t ? 1.0 : 0.0));
      EXPECT_NEAR(grad[r][j].item<double>(), want, 1e-12) << r << "," << j;
    }
  }
}

TEST(CrossEntropy, BadTargetsThrow) {
  const at::Tensor logits = at::randn({2, 4});
  EXPECT_THROW(call_fwd(logits, at::tensor(std::vector<int64_t>{0, 4}), -100), c10::Error);
  EXPECT_THROW(call_fwd(logits, at::tensor(std::vector<int64_t>{-1, 0}), -100), c10::Error);
  EXPECT_NO_THROW(call_fwd(logits, at::tensor(std::vector<int64_t>{-100, 0}), -100));
}

}  // namespace
