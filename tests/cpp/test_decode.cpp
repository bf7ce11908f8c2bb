// Decode family through the dispatcher (CPU kernel): attn_decode against naive loops in double
// (cache writes and outputs), and bad inputs.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cos.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/sin.h>
#include <ATen/ops/tensor.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "mblm/decode.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

at::Tensor attn_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& lens,
                       const OptTensor& rows, const OptTensor& cos, const OptTensor& sin,
                       double scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mblm::attn_decode", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                            at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                            const OptTensor&, double)>();
  return op.call(q, k, v, k_cache, v_cache, lens, rows, cos, sin, scale);
}

struct Case {
  at::Tensor q, k, v, k_cache, v_cache, lens, rows, cos, sin;
};

// R query rows with S new positions each, a (B, C, H, Dh) cache, rows[r] = B - 1 - r.
Case make_case(int64_t r, int64_t s, int64_t h, int64_t d, int64_t b, int64_t c,
               std::vector<int64_t> lens, at::ScalarType dtype) {
  const auto opts = at::TensorOptions().dtype(dtype);
  Case in;
  in.q = at::randn({r, s, h, d}, opts);
  in.k = at::randn({r, s, h, d}, opts);
  in.v = at::randn({r, s, h, d}, opts);
  in.k_cache = at::randn({b, c, h, d}, opts);
  in.v_cache = at::randn({b, c, h, d}, opts);
  in.lens = at::tensor(lens, at::TensorOptions().dtype(at::kLong));
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < r; ++i) rows.push_back(b - 1 - i);
  in.rows = at::tensor(rows, at::TensorOptions().dtype(at::kLong));
  const auto angles = at::randn({r, s, d / 2}, opts.dtype(at::kDouble)).repeat({1, 1, 2});
  const auto table = dtype == at::kDouble ? at::kDouble : at::kFloat;
  in.cos = at::cos(angles).to(table);
  in.sin = at::sin(angles).to(table);
  return in;
}

// The meaning, in double with plain loops: rotate k into the cache copy, then for every query
// rotate it and attend to positions 0 .. lens[r] + s of its cache row.
void naive_decode(const Case& in, double scale, std::vector<double>& out, at::Tensor& kc,
                  at::Tensor& vc) {
  const auto q = in.q.to(at::kDouble), k = in.k.to(at::kDouble), v = in.v.to(at::kDouble);
  kc = in.k_cache.to(at::kDouble).clone();
  vc = in.v_cache.to(at::kDouble).clone();
  const auto cs = in.cos.to(at::kDouble), sn = in.sin.to(at::kDouble);
  const int64_t n = q.size(0), seq = q.size(1), heads = q.size(2), d = q.size(3);
  auto ca = cs.accessor<double, 3>(), sa = sn.accessor<double, 3>();
  const auto qa = q.accessor<double, 4>(), ka_in = k.accessor<double, 4>(),
             va_in = v.accessor<double, 4>();
  auto rotate = [&](const at::TensorAccessor<double, 4>& t, int64_t r, int64_t s, int64_t h) {
    std::vector<double> x(d);
    const int64_t half = d / 2;
    for (int64_t i = 0; i < d; ++i) {
      const double other = i < half ? -t[r][s][h][i + half] : t[r][s][h][i - half];
      x[i] = t[r][s][h][i] * ca[r][s][i] + other * sa[r][s][i];
    }
    return x;
  };
  const auto lens = in.lens.accessor<int64_t, 1>();
  const auto rows = in.rows.accessor<int64_t, 1>();
  auto kw = kc.accessor<double, 4>(), vw = vc.accessor<double, 4>();
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t s = 0; s < seq; ++s) {
      for (int64_t h = 0; h < heads; ++h) {
        const auto kr = rotate(ka_in, r, s, h);
        for (int64_t i = 0; i < d; ++i) {
          kw[rows[r]][lens[r] + s][h][i] = kr[i];
          vw[rows[r]][lens[r] + s][h][i] = va_in[r][s][h][i];
        }
      }
    }
  }
  const auto ka = kc.accessor<double, 4>(), va = vc.accessor<double, 4>();
  out.assign(n * seq * heads * d, 0.0);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t s = 0; s < seq; ++s) {
      for (int64_t h = 0; h < heads; ++h) {
        const auto qr = rotate(qa, r, s, h);
        const int64_t keys = lens[r] + s + 1;
        std::vector<double> p(keys);
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < keys; ++j) {
          double dot = 0;
          for (int64_t i = 0; i < d; ++i) dot += qr[i] * ka[rows[r]][j][h][i];
          mx = std::max(mx, p[j] = dot * scale);
        }
        double sum = 0;
        for (double& x : p) sum += (x = std::exp(x - mx));
        for (int64_t i = 0; i < d; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < keys; ++j) acc += p[j] / sum * va[rows[r]][j][h][i];
          out[((r * seq + s) * heads + h) * d + i] = acc;
        }
      }
    }
  }
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  const auto x = a.to(at::kDouble).contiguous(), y = b.to(at::kDouble).contiguous();
  const double *p = x.const_data_ptr<double>(), *q = y.const_data_ptr<double>();
  double worst = 0;
  for (int64_t i = 0; i < x.numel(); ++i) worst = std::max(worst, std::abs(p[i] - q[i]));
  return worst;
}

double max_abs_diff(const at::Tensor& got, const std::vector<double>& expected) {
  const auto g = got.to(at::kDouble).contiguous();
  const double* p = g.const_data_ptr<double>();
  double worst = 0;
  for (size_t i = 0; i < expected.size(); ++i)
    worst = std::max(worst, std::abs(p[i] - expected[i]));
  return worst;
}

TEST(Decode, MatchesNaiveLoops) {
  // one new position (generation) and 70 (prefill: several query blocks, several key tiles)
  for (int64_t seq : {1, 70}) {
    for (auto dtype : {at::kFloat, at::kDouble}) {
      Case in = make_case(2, seq, 2, 16, 3, 200, {0, 100}, dtype);
      std::vector<double> expected;
      at::Tensor kc, vc;
      naive_decode(in, 0.3, expected, kc, vc);
      const auto out = attn_decode(in.q, in.k, in.v, in.k_cache, in.v_cache, in.lens, in.rows,
                                   in.cos, in.sin, 0.3);
      const double tol = dtype == at::kDouble ? 1e-12 : 2e-5;
      const std::string what = "S=" + std::to_string(seq) + " " + c10::toString(dtype);
      EXPECT_TRUE(out.is_contiguous()) << what;
      EXPECT_LE(max_abs_diff(out, expected), tol) << what;
      EXPECT_LE(max_abs_diff(in.k_cache, kc), tol) << what;
      EXPECT_LE(max_abs_diff(in.v_cache, vc), tol) << what;
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

TEST(Decode, BadInputsNameTheArgument) {
  Case in = make_case(2, 1, 2, 8, 3, 10, {0, 4}, at::kFloat);
  auto call = [&](const at::Tensor& lens, const OptTensor& rows) {
    attn_decode(in.q, in.k, in.v, in.k_cache, in.v_cache, lens, rows, in.cos, in.sin, 1.0);
  };
  expect_error_mentions([&] { call(in.lens.to(at::kInt), in.rows); }, "lens must be int64");
  expect_error_mentions(
      [&] {
        call(at::tensor(std::vector<int64_t>{0, 10}), in.rows);
      },
      "leaves no room");
  expect_error_mentions(
      [&] {
        call(in.lens, at::tensor(std::vector<int64_t>{1, 1}));
      },
      "rows must be distinct");
  expect_error_mentions([&] { call(in.lens, std::nullopt); }, "one cache row per query row");
  EXPECT_NO_THROW(mblm::check_attn_decode_args(in.q, in.k, in.v, in.k_cache, in.v_cache, in.lens,
                                               in.rows, in.cos, in.sin));
  expect_error_mentions(
      [&] {
        mblm::check_attn_decode_args(in.q, in.k, in.v, in.k_cache, in.v_cache, in.lens, in.rows,
                                     std::nullopt, in.sin);
      },
      "cos and sin must be given together");
}

}  // namespace
