// Attention family through the dispatcher (CPU kernels): the forward against naive loops in
// double, the backward against central finite differences of the forward, and bad inputs.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cos.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/sin.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "mblm/attention.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> attn_fwd(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const OptTensor& cos,
                                            const OptTensor& sin, bool causal, double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mblm::attn_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const OptTensor&, const OptTensor&, bool, double)>();
  return op.call(q, k, v, cos, sin, causal, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(const at::Tensor& g, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out,
                                                        const at::Tensor& lse, const OptTensor& cos,
                                                        const OptTensor& sin, bool causal,
                                                        double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mblm::attn_bwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const OptTensor&, const OptTensor&, bool, double)>();
  return op.call(g, q, k, v, out, lse, cos, sin, causal, scale);
}

// q (N, S, H, Dh) and k, v as the two halves of one (N, S, 2 H Dh) tensor, as the model has them.
struct Inputs {
  at::Tensor q, k, v, cos, sin;
};

Inputs make_inputs(int64_t n, int64_t s, int64_t h, int64_t d, at::ScalarType dtype) {
  const auto opts = at::TensorOptions().dtype(dtype);
  Inputs in;
  in.q = at::randn({n, s, h * d}, opts).view({n, s, h, d});
  const auto kv = at::randn({n, s, 2 * h * d}, opts);
  in.k = kv.narrow(2, 0, h * d).view({n, s, h, d});
  in.v = kv.narrow(2, h * d, h * d).view({n, s, h, d});
  const auto angles = at::randn({s, d / 2}, opts.dtype(at::kDouble)).repeat({1, 2});
  const auto table = dtype == at::kDouble ? at::kDouble : at::kFloat;
  in.cos = at::cos(angles).to(table);
  in.sin = at::sin(angles).to(table);
  return in;
}

// The meaning of attention, in double with plain loops: rotary on q and k, scaled scores, causal
// mask, softmax, P.V. Returns out (N, S, H, Dh) and lse (N, H, S) as flat vectors.
void naive_attention(const Inputs& in, bool rotary, bool causal, double scale,
                     std::vector<double>& out, std::vector<double>& lse) {
  const auto q = in.q.to(at::kDouble), k = in.k.to(at::kDouble), v = in.v.to(at::kDouble);
  const auto cs = in.cos.to(at::kDouble).contiguous(), sn = in.sin.to(at::kDouble).contiguous();
  const int64_t n_seq = q.size(0), seq = q.size(1), heads = q.size(2), d = q.size(3);
  const auto qa = q.accessor<double, 4>(), ka = k.accessor<double, 4>(),
             va = v.accessor<double, 4>();
  const auto ca = cs.accessor<double, 2>(), sa = sn.accessor<double, 2>();
  auto rot = [&](const at::TensorAccessor<double, 4>& t, int64_t b, int64_t s, int64_t h,
                 int64_t i) {
    if (!rotary) return t[b][s][h][i];
    const int64_t half = d / 2;
    const double other = i < half ? -t[b][s][h][i + half] : t[b][s][h][i - half];
    return t[b][s][h][i] * ca[s][i] + other * sa[s][i];
  };
  out.assign(n_seq * seq * heads * d, 0.0);
  lse.assign(n_seq * heads * seq, 0.0);
  std::vector<double> p(seq);
  for (int64_t b = 0; b < n_seq; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t i = 0; i < seq; ++i) {
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < seq; ++j) {
          double dot = 0;
          for (int64_t c = 0; c < d; ++c) dot += rot(qa, b, i, h, c) * rot(ka, b, j, h, c);
          p[j] = (causal && j > i) ? -std::numeric_limits<double>::infinity() : dot * scale;
          mx = std::max(mx, p[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < seq; ++j) sum += (p[j] = std::exp(p[j] - mx));
        lse[(b * heads + h) * seq + i] = mx + std::log(sum);
        for (int64_t c = 0; c < d; ++c) {
          double acc = 0;
          for (int64_t j = 0; j < seq; ++j) acc += p[j] / sum * va[b][j][h][c];
          out[((b * seq + i) * heads + h) * d + c] = acc;
        }
      }
    }
  }
}

void expect_near_all(const at::Tensor& got, const std::vector<double>& expected, double tol,
                     const std::string& what) {
  const auto g = got.to(at::kDouble).contiguous();
  ASSERT_EQ(g.numel(), static_cast<int64_t>(expected.size())) << what;
  const double* p = g.const_data_ptr<double>();
  double worst = 0;
  for (size_t i = 0; i < expected.size(); ++i)
    worst = std::max(worst, std::abs(p[i] - expected[i]));
  EXPECT_LE(worst, tol) << what;
}

TEST(Attention, ForwardMatchesNaiveLoops) {
  // S = 9 / 65: one block per head (local stages); S = 150: the tiled path with a partial tile.
  for (int64_t seq : {1, 9, 65, 150}) {
    for (bool causal : {true, false}) {
      for (bool rotary : {true, false}) {
        for (auto dtype : {at::kFloat, at::kDouble}) {
          const Inputs in = make_inputs(2, seq, 3, 16, dtype);
          const double scale = 0.3;
          auto [out, lse] = attn_fwd(in.q, in.k, in.v, rotary ? OptTensor(in.cos) : std::nullopt,
                                     rotary ? OptTensor(in.sin) : std::nullopt, causal, scale);
          std::vector<double> ref_out, ref_lse;
          naive_attention(in, rotary, causal, scale, ref_out, ref_lse);
          const double tol = dtype == at::kDouble ? 1e-12 : 2e-5;
          const std::string what =
              "S=" + std::to_string(seq) + " causal=" + std::to_string(causal) +
              " rotary=" + std::to_string(rotary) + " " + std::string(c10::toString(dtype));
          EXPECT_TRUE(out.is_contiguous()) << what;
          EXPECT_EQ(out.scalar_type(), dtype) << what;
          expect_near_all(out, ref_out, tol, "out " + what);
          expect_near_all(lse, ref_lse, tol, "lse " + what);
        }
      }
    }
  }
}

TEST(Attention, BackwardMatchesFiniteDifferences) {
  // d loss / d x for loss = sum(out * g), at a few elements of q, k and v, in double.
  for (int64_t seq : {7, 140}) {
    const Inputs in = make_inputs(1, seq, 2, 8, at::kDouble);
    const bool causal = true;
    const double scale = 0.5;
    const auto g = at::randn(in.q.sizes(), at::TensorOptions().dtype(at::kDouble));
    auto loss = [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
      auto [out, lse] = attn_fwd(q, k, v, in.cos, in.sin, causal, scale);
      return out.mul(g).sum().item<double>();
    };
    auto [out, lse] = attn_fwd(in.q, in.k, in.v, in.cos, in.sin, causal, scale);
    auto [gq, gk, gv] = attn_bwd(g, in.q, in.k, in.v, out, lse, in.cos, in.sin, causal, scale);
    const std::vector<at::Tensor> grads{gq, gk, gv};
    for (int which = 0; which < 3; ++which) {
      for (int64_t idx : {int64_t{0}, seq / 2 * 16 + 5, (seq - 1) * 16 + 15}) {
        std::vector<at::Tensor> xs{in.q.clone(), in.k.clone(), in.v.clone()};
        auto flat = xs[which].view(-1);
        const double x0 = flat[idx].item<double>(), eps = 1e-6;
        flat[idx].fill_(x0 + eps);
        const double up = loss(xs[0], xs[1], xs[2]);
        flat[idx].fill_(x0 - eps);
        const double down = loss(xs[0], xs[1], xs[2]);
        const double numeric = (up - down) / (2 * eps);
        const double analytic = grads[which].reshape(-1)[idx].item<double>();
        EXPECT_NEAR(analytic, numeric, 1e-6 * std::max(1.0, std::abs(numeric)))
            << "S=" << seq << " input "
            << "qkv"[which] << " element " << idx;
      }
    }
  }
}

void expect_error_mentions(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected an error mentioning '" << needle << "'";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Attention, BadInputsNameTheArgument) {
  const Inputs in = make_inputs(2, 9, 2, 8, at::kFloat);
  expect_error_mentions([&] { attn_fwd(in.q[0], in.k, in.v, {}, {}, true, 1.0); },
                        "q must have 4 dims");
  expect_error_mentions([&] { attn_fwd(in.q, in.k.to(at::kDouble), in.v, {}, {}, true, 1.0); },
                        "k has dtype");
  expect_error_mentions([&] { attn_fwd(in.q, in.k, in.v.narrow(1, 0, 4), {}, {}, true, 1.0); },
                        "v must have the shape of q");
  expect_error_mentions([&] { attn_fwd(in.q, in.k, in.v, in.cos, {}, true, 1.0); },
                        "cos and sin must be given together");
  expect_error_mentions(
      [&] { attn_fwd(in.q, in.k, in.v, in.cos.narrow(1, 0, 4), in.sin, true, 1.0); },
      "cos must have shape (S, Dh)");
  auto [out, lse] = attn_fwd(in.q, in.k, in.v, {}, {}, true, 1.0);
  expect_error_mentions(
      [&] { attn_bwd(out, in.q, in.k, in.v, out, lse.to(at::kDouble), {}, {}, true, 1.0); },
      "lse must be");
  // The check functions are callable directly (shared by the CPU and CUDA kernels).
  EXPECT_NO_THROW(mblm::check_attn_fwd_args(in.q, in.k, in.v, in.cos, in.sin));
  expect_error_mentions([&] { mblm::check_attn_fwd_args(in.q, in.k, in.v, {}, in.sin); },
                        "cos and sin must be given together");
}

}  // namespace
