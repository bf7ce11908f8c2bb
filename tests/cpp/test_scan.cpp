// Scan family through the dispatcher (CPU kernels) against a naive recurrence.
#include <ATen/core/Tensor.h>
#include <ATen/ops/allclose.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "mblm/scan.h"

namespace {

struct Inputs {
  at::Tensor u, delta, A, B, C, D, z, bias, init;
};

// float64 inputs; u, delta, z channel-contiguous (transposes of (B, L, D)), as the model passes.
Inputs make_inputs(int64_t b, int64_t d, int64_t l, int64_t n) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  Inputs in;
  in.u = at::randn({b, l, d}, f64).transpose(1, 2);
  in.delta = at::randn({b, l, d}, f64).transpose(1, 2);
  in.z = at::randn({b, l, d}, f64).transpose(1, 2);
  in.A = at::rand({d, n}, f64).add_(0.1).neg_();
  in.B = at::randn({b, n, l}, f64);
  in.C = at::randn({b, n, l}, f64);
  in.D = at::randn({d}, f64);
  in.bias = at::randn({d}, f64);
  in.init = at::randn({b, d, n}, f64);
  return in;
}

double softplus(double x) { return x > 20 ? x : std::log1p(std::exp(x)); }

// y[b, d, t] and the final state by the textbook recurrence.
void naive_scan(const Inputs& in, std::vector<double>& y, std::vector<double>& h_out) {
  const int64_t b = in.u.size(0), d = in.u.size(1), l = in.u.size(2), n = in.A.size(1);
  y.assign(b * d * l, 0.0);
  h_out.assign(b * d * n, 0.0);
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t c = 0; c < d; ++c) {
      std::vector<double> h(n);
      for (int64_t j = 0; j < n; ++j) h[j] = in.init[i][c][j].item<double>();
      for (int64_t t = 0; t < l; ++t) {
        const double dt = softplus(in.delta[i][c][t].item<double>() + in.bias[c].item<double>());
        const double u = in.u[i][c][t].item<double>();
        double acc = 0;
        for (int64_t j = 0; j < n; ++j) {
          h[j] = std::exp(dt * in.A[c][j].item<double>()) * h[j] +
                 dt * in.B[i][j][t].item<double>() * u;
          acc += h[j] * in.C[i][j][t].item<double>();
        }
        const double z = in.z[i][c][t].item<double>();
        y[(i * d + c) * l + t] = (acc + in.D[c].item<double>() * u) * z / (1 + std::exp(-z));
      }
      for (int64_t j = 0; j < n; ++j) h_out[(i * d + c) * n + j] = h[j];
    }
  }
}

TEST(ScanCpu, ForwardMatchesNaiveRecurrence) {
  const Inputs in = make_inputs(2, 11, 70, 3);
  const auto [y, h, ckpt] =
      mblm::scan_fwd(in.u, in.delta, in.A, in.B, in.C, in.D, in.z, in.bias, true, in.init);
  std::vector<double> y_ref, h_ref;
  naive_scan(in, y_ref, h_ref);
  ASSERT_EQ(y.sizes(), in.u.sizes());
  EXPECT_EQ(y.stride(1), 1);  // channel-contiguous like u
  for (int64_t i = 0; i < 2; ++i) {
    for (int64_t c = 0; c < 11; ++c) {
      for (int64_t t = 0; t < 70; ++t) {
        EXPECT_NEAR(y[i][c][t].item<double>(), y_ref[(i * 11 + c) * 70 + t], 1e-12);
      }
      for (int64_t j = 0; j < 3; ++j) {
        EXPECT_NEAR(h[i][c][j].item<double>(), h_ref[(i * 11 + c) * 3 + j], 1e-12);
      }
    }
  }
  ASSERT_EQ(ckpt.sizes(), (std::vector<int64_t>{2, 2, 3, 11}));
  // Checkpoint 0 is the initial state; checkpoint 1 the state after kScanChunk steps.
  EXPECT_TRUE(at::allclose(ckpt.select(1, 0), in.init.transpose(1, 2)));
  const auto sl = [](const at::Tensor& t) { return t.slice(2, 0, mblm::kScanChunk); };
  const auto prefix = mblm::scan_fwd(sl(in.u), sl(in.delta), in.A, sl(in.B), sl(in.C), in.D,
                                     sl(in.z), in.bias, true, in.init);
  EXPECT_TRUE(at::allclose(ckpt.select(1, 1), std::get<1>(prefix).transpose(1, 2)));
}

TEST(ScanCpu, UpdateEqualsOneForwardStep) {
  const Inputs in = make_inputs(3, 9, 1, 5);
  const auto [y, h, ckpt] =
      mblm::scan_fwd(in.u, in.delta, in.A, in.B, in.C, in.D, in.z, in.bias, true, in.init);
  at::Tensor state = in.init.clone();
  const auto s = [](const at::Tensor& t) { return t.select(2, 0); };
  const at::Tensor y1 = mblm::scan_update(state, s(in.u), s(in.delta), in.A, s(in.B), s(in.C), in.D,
                                          s(in.z), in.bias, true);
  EXPECT_TRUE(at::allclose(y1, s(y), 1e-12, 1e-12));
  EXPECT_TRUE(at::allclose(state, h, 1e-12, 1e-12));
}

TEST(ScanCpu, BackwardOfZeroGradientsIsZero) {
  const Inputs in = make_inputs(1, 4, 65, 2);
  const auto [y, h, ckpt] =
      mblm::scan_fwd(in.u, in.delta, in.A, in.B, in.C, in.D, in.z, in.bias, true, in.init);
  const auto grads = mblm::scan_bwd(at::zeros_like(y), std::nullopt, in.u, in.delta, in.A, in.B,
                                    in.C, in.D, in.z, in.bias, true, in.init, ckpt);
  EXPECT_EQ(std::get<0>(grads).abs().max().item<double>(), 0.0);
  EXPECT_EQ(std::get<2>(grads).abs().max().item<double>(), 0.0);
  EXPECT_EQ(std::get<8>(grads).sizes(), in.init.sizes());
}

TEST(ScanCpu, BadInputsThrowNamingTheArgument) {
  const Inputs in = make_inputs(1, 4, 5, 2);
  const at::Tensor bad_A = at::full({4, 2}, -INFINITY, in.A.options());
  try {
    mblm::scan_fwd(in.u, in.delta, bad_A, in.B, in.C, in.D, in.z, in.bias, true, in.init);
    FAIL() << "no error for a non-finite A";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("A must be finite"), std::string::npos);
  }
  EXPECT_THROW(mblm::scan_fwd(in.u, in.delta, in.A, in.B.slice(1, 0, 1), in.C, in.D, in.z, in.bias,
                              true, in.init),
               c10::Error);
}

}  // namespace
