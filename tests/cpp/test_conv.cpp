// Conv family through the dispatcher (CPU kernels) against a naive loop.
#include <ATen/core/Tensor.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cmath>
#include <optional>

#include "mblm/conv.h"

namespace {

// y[b, c, t] = bias[c] + sum_k w[c, k] * xx[b, c, t + k], xx = [state, x], then SiLU.
at::Tensor naive(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                 const at::Tensor& state) {
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2), K = w.size(1);
  at::Tensor y = at::zeros({B, C, L}, x.options());
  auto xa = x.accessor<double, 3>();
  auto sa = state.accessor<double, 3>();
  auto wa = w.accessor<double, 2>();
  auto ba = bias.accessor<double, 1>();
  auto ya = y.accessor<double, 3>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t t = 0; t < L; ++t) {
        double acc = ba[c];
        for (int64_t k = 0; k < K; ++k) {
          const int64_t s = t + k - (K - 1);
          acc += wa[c][k] * (s >= 0 ? xa[b][c][s] : sa[b][c][s + K - 1]);
        }
        ya[b][c][t] = acc / (1.0 + std::exp(-acc));
      }
    }
  }
  return y;
}

TEST(Conv, ForwardMatchesNaiveLoop) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  for (int64_t K : {1, 2, 4}) {
    const at::Tensor x = at::randn({2, 5, 9}, opts);
    const at::Tensor w = at::randn({5, K}, opts);
    const at::Tensor bias = at::randn({5}, opts);
    const at::Tensor state = at::randn({2, 5, K - 1}, opts);
    auto [y, final_state] = mblm::conv1d_fwd(x, w, bias, state, true);
    EXPECT_TRUE(y.allclose(naive(x, w, bias, state), 1e-10, 1e-10)) << "K=" << K;
    EXPECT_TRUE(final_state.equal(x.narrow(2, 9 - (K - 1), K - 1)));
  }
}

TEST(Conv, UpdateRollsTheStateInPlace) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({2, 3, 1}, opts);
  const at::Tensor w = at::randn({3, 4}, opts);
  const at::Tensor bias = at::randn({3}, opts);
  at::Tensor state = at::randn({2, 3, 3}, opts);
  const at::Tensor expected = naive(x, w, bias, state).select(2, 0);
  const at::Tensor old = state.clone();
  const at::Tensor y = mblm::conv1d_update(x.select(2, 0), state, w, bias, true);
  EXPECT_TRUE(y.allclose(expected, 1e-10, 1e-10));
  EXPECT_TRUE(state.narrow(2, 0, 2).equal(old.narrow(2, 1, 2)));
  EXPECT_TRUE(state.select(2, 2).equal(x.select(2, 0)));
}

TEST(Conv, BadWeightShapeNamesTheArgument) {
  const at::Tensor x = at::randn({2, 3, 4});
  try {
    mblm::conv1d_fwd(x, at::randn({4, 3}), std::nullopt, std::nullopt, false);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("weight must have shape (C, K) with C = 3"),
              std::string::npos);
  }
}

}  // namespace
