// SSD family through the dispatcher (CPU kernels): the forward against the recurrence in plain
// double loops, the decode step against one forward step, the backward against central finite
// differences of the forward, and bad inputs.
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randn.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "mblm/ssd.h"

namespace {

struct Inputs {
  at::Tensor x, dt, A, B, C, D, bias, s0;
};

// x, B, C slices of one (B, L, conv_dim) tensor as the Mamba2 layer has them.
Inputs make_inputs(int64_t b, int64_t l, int64_t h, int64_t p, int64_t g, int64_t n,
                   at::ScalarType dtype) {
  const auto opts = at::TensorOptions().dtype(dtype);
  const auto param = at::TensorOptions().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat);
  Inputs in;
  const auto xbc = at::randn({b, l, h * p + 2 * g * n}, opts);
  in.x = xbc.narrow(2, 0, h * p).view({b, l, h, p});
  in.B = xbc.narrow(2, h * p, g * n).view({b, l, g, n});
  in.C = xbc.narrow(2, h * p + g * n, g * n).view({b, l, g, n});
  in.dt = at::randn({b, l, h}, opts) - 1.0;
  in.A = -(at::rand({h}, param) * 3.0 + 0.2);
  in.D = at::randn({h, p}, param);
  in.bias = at::randn({h}, param) * 0.5;
  in.s0 = at::randn({b, h, p, n}, param);
  return in;
}

// The recurrence with softplus(dt + bias), in double: y (B, L, H, P) and the final state.
void naive_ssd(const Inputs& in, std::vector<double>& y, std::vector<double>& final_state) {
  const auto x = in.x.to(at::kDouble).contiguous(), dt = in.dt.to(at::kDouble).contiguous();
  const auto A = in.A.to(at::kDouble).contiguous(), B = in.B.to(at::kDouble).contiguous();
  const auto C = in.C.to(at::kDouble).contiguous(), D = in.D.to(at::kDouble).contiguous();
  const auto bias = in.bias.to(at::kDouble).contiguous();
  const auto s0 = in.s0.to(at::kDouble).contiguous();
  const int64_t batch = x.size(0), len = x.size(1), heads = x.size(2), hd = x.size(3);
  const int64_t groups = B.size(2), ns = B.size(3);
  const auto xa = x.accessor<double, 4>(), Ba = B.accessor<double, 4>();
  const auto Ca = C.accessor<double, 4>();
  const auto dta = dt.accessor<double, 3>();
  const auto Aa = A.accessor<double, 1>();
  const auto Da = D.accessor<double, 2>();
  const auto ba = bias.accessor<double, 1>();
  const auto sa = s0.accessor<double, 4>();
  y.assign(batch * len * heads * hd, 0.0);
  final_state.assign(batch * heads * hd * ns, 0.0);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t g = h / (heads / groups);
      std::vector<double> S(hd * ns);
      for (int64_t p = 0; p < hd; ++p)
        for (int64_t n = 0; n < ns; ++n) S[p * ns + n] = sa[b][h][p][n];
      for (int64_t t = 0; t < len; ++t) {
        const double raw = dta[b][t][h] + ba[h];
        const double d = raw > 20 ? raw : std::log1p(std::exp(raw));
        const double a = std::exp(d * Aa[h]);
        for (int64_t p = 0; p < hd; ++p) {
          double out = 0;
          for (int64_t n = 0; n < ns; ++n) {
            double& s = S[p * ns + n];
            s = a * s + d * xa[b][t][h][p] * Ba[b][t][g][n];
            out += s * Ca[b][t][g][n];
          }
          y[((b * len + t) * heads + h) * hd + p] = out + Da[h][p] * xa[b][t][h][p];
        }
      }
      for (int64_t i = 0; i < hd * ns; ++i) final_state[(b * heads + h) * hd * ns + i] = S[i];
    }
  }
}

void expect_near_all(const at::Tensor& got, const std::vector<double>& expected, double tol,
                     const std::string& what) {
  const auto g = got.to(at::kDouble).contiguous();
  ASSERT_EQ(g.numel(), static_cast<int64_t>(expected.size())) << what;
  const double* p = g.const_data_ptr<double>();
  double worst = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    worst = std::max(worst, std::abs(p[i] - expected[i]) / (1.0 + std::abs(expected[i])));
  }
  EXPECT_LT(worst, tol) << what;
}

TEST(Ssd, ForwardMatchesTheRecurrence) {
  for (const auto dtype : {at::kDouble, at::kFloat}) {
    // L = 300 crosses a checkpoint block; N = 20 a partial tile of 16 lanes
    const Inputs in = make_inputs(2, 300, 4, 8, 2, 20, dtype);
    const auto [y, final_state, checkpoints] =
        mblm::ssd_fwd(in.x, in.dt, in.A, in.B, in.C, in.D, in.bias, true, in.s0);
    std::vector<double> ey, es;
    naive_ssd(in, ey, es);
    const double tol = dtype == at::kDouble ? 1e-10 : 1e-4;
    expect_near_all(y, ey, tol, "y");
    expect_near_all(final_state, es, tol, "final state");
    EXPECT_EQ(checkpoints.sizes(), (std::vector<int64_t>{2, 4, 2, 8, 20}));
  }
}

TEST(Ssd, StepEqualsOneForwardStep) {
  const Inputs in = make_inputs(2, 1, 4, 8, 1, 16, at::kDouble);
  const auto [y, final_state, checkpoints] =
      mblm::ssd_fwd(in.x, in.dt, in.A, in.B, in.C, in.D, in.bias, true, in.s0);
  at::Tensor state = in.s0.clone();
  const at::Tensor ys = mblm::ssd_update(state, in.x.select(1, 0), in.dt.select(1, 0), in.A,
                                         in.B.select(1, 0), in.C.select(1, 0), in.D, in.bias, true);
  EXPECT_TRUE(ys.allclose(y.select(1, 0), 1e-12, 1e-12));
  EXPECT_TRUE(state.allclose(final_state, 1e-12, 1e-12));
}

// sum(y * w) + sum(final_state * v) as a function of the inputs, for finite differences.
double objective(const Inputs& in, const at::Tensor& w, const at::Tensor& v) {
  const auto [y, s, ck] = mblm::ssd_fwd(in.x, in.dt, in.A, in.B, in.C, in.D, in.bias, true, in.s0);
  return (y * w).sum().item<double>() + (s * v).sum().item<double>();
}

TEST(Ssd, BackwardMatchesFiniteDifferences) {
  Inputs in = make_inputs(1, 270, 2, 3, 1, 4, at::kDouble);
  for (auto* t : {&in.x, &in.B, &in.C}) *t = t->contiguous();
  const auto [y, s, ck] = mblm::ssd_fwd(in.x, in.dt, in.A, in.B, in.C, in.D, in.bias, true, in.s0);
  const auto w = at::randn(y.sizes(), y.options());
  const auto v = at::randn(s.sizes(), s.options());
  const auto grads =
      mblm::ssd_bwd(w, v, in.x, in.dt, in.A, in.B, in.C, in.D, in.bias, true, in.s0, ck);
  const std::vector<std::pair<at::Tensor*, at::Tensor>> checks = {
      {&in.x, std::get<0>(grads)},    {&in.dt, std::get<1>(grads)}, {&in.A, std::get<2>(grads)},
      {&in.B, std::get<3>(grads)},    {&in.C, std::get<4>(grads)},  {&in.D, std::get<5>(grads)},
      {&in.bias, std::get<6>(grads)}, {&in.s0, std::get<7>(grads)}};
  const double eps = 1e-6;
  for (const auto& [input, grad] : checks) {
    ASSERT_EQ(grad.sizes(), input->sizes());
    const auto flat_grad = grad.contiguous().view(-1);
    for (const int64_t idx : {int64_t{0}, input->numel() / 2, input->numel() - 1}) {
      at::Tensor flat = input->view(-1);
      const double orig = flat[idx].item<double>();
      flat[idx] = orig + eps;
      const double up = objective(in, w, v);
      flat[idx] = orig - eps;
      const double down = objective(in, w, v);
      flat[idx] = orig;
      const double numeric = (up - down) / (2 * eps);
      EXPECT_NEAR(flat_grad[idx].item<double>(), numeric, 1e-5 * (1.0 + std::abs(numeric)))
          << "input of shape " << input->sizes() << " element " << idx;
    }
  }
}

TEST(Ssd, BadInputsNameTheArgument) {
  const Inputs in = make_inputs(2, 5, 4, 8, 2, 16, at::kFloat);
  try {
    mblm::ssd_fwd(in.x, in.dt, in.A, in.B.narrow(3, 0, 8), in.C, in.D, in.bias, true, in.s0);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("C must have the shape of B"), std::string::npos);
  }
  try {
    mblm::ssd_fwd(in.x, in.dt, in.A.narrow(0, 0, 3), in.B, in.C, in.D, in.bias, true, in.s0);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("A must have shape (H,)"), std::string::npos);
  }
}

}  // namespace
