// Patch family through the dispatcher (CPU kernels) against naive index loops.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/randn.h>
#include <c10/core/Scalar.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "mblm/patch.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

at::Tensor call_patch_pad(const at::Tensor& ids, std::vector<int64_t> inner, int64_t pad) {
  return op("mblm::patch_pad")
      .typed<at::Tensor(const at::Tensor&, at::IntArrayRef, int64_t)>()
      .call(ids, inner, pad);
}

at::Tensor call_stage_input_fwd(const at::Tensor& x, const at::Tensor& start, const OptTensor& pos,
                                const OptTensor& prev) {
  return op("mblm::stage_input_fwd")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&)>()
      .call(x, start, pos, prev);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_stage_input_bwd(
    const at::Tensor& grad, bool has_pos, bool has_prev) {
  return op("mblm::stage_input_bwd")
      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, bool,
                                                                        bool)>()
      .call(grad, has_pos, has_prev);
}

at::Tensor call_unpatch_fwd(const at::Tensor& y, int64_t length, bool with_start) {
  return op("mblm::patch_unpatch_fwd")
      .typed<at::Tensor(const at::Tensor&, c10::SymInt, bool)>()
      .call(y, c10::SymInt(length), with_start);
}

at::Tensor call_unpatch_bwd(const at::Tensor& grad, std::vector<int64_t> y_shape, bool with_start) {
  return op("mblm::patch_unpatch_bwd")
      .typed<at::Tensor(const at::Tensor&, c10::SymIntArrayRef, bool)>()
      .call(grad, c10::fromIntArrayRefSlow(y_shape), with_start);
}

at::Tensor randn(std::vector<int64_t> shape, at::ScalarType dtype = at::kFloat) {
  return at::randn(shape, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

// ------------------------------------------------------------------------------------------

TEST(PatchPad, MatchesNaiveLoops) {
  for (const auto dtype : {at::kLong, at::kInt, at::kByte}) {
    for (const int64_t length : {0, 1, 5, 6, 7, 13}) {
      const at::Tensor ids = at::randint(0, 100, {3, length}, at::TensorOptions().dtype(dtype));
      const std::vector<int64_t> inner{3, 2};
      const int64_t pad = 99;
      const at::Tensor out = call_patch_pad(ids, inner, pad);
      const int64_t patches = (length + 5) / 6;
      ASSERT_EQ(out.sizes(), (std::vector<int64_t>{3, patches, 3, 2}));
      ASSERT_EQ(out.scalar_type(), dtype);
      const at::Tensor flat = out.reshape({3, patches * 6}).to(at::kLong);
      const at::Tensor ids64 = ids.to(at::kLong);
      for (int64_t b = 0; b < 3; ++b) {
        for (int64_t t = 0; t < patches * 6; ++t) {
          const int64_t want = t < length ? ids64[b][t].item<int64_t>() : pad;
          EXPECT_EQ(flat[b][t].item<int64_t>(), want) << "b=" << b << " t=" << t;
        }
      }
    }
  }
}

TEST(PatchPad, StridedIdsAndFrontFunction) {
  const at::Tensor base = at::randint(0, 256, {7, 4}, at::TensorOptions().dtype(at::kLong));
  const at::Tensor ids = base.t();  // (4, 7), non-contiguous
  const at::Tensor out = mblm::patch_pad(ids, {4}, -5);
  ASSERT_EQ(out.sizes(), (std::vector<int64_t>{4, 2, 4}));
  for (int64_t b = 0; b < 4; ++b) {
    for (int64_t t = 0; t < 8; ++t) {
      const int64_t want = t < 7 ? base[t][b].item<int64_t>() : -5;
      EXPECT_EQ(out[b][t / 4][t % 4].item<int64_t>(), want);
    }
  }
}

TEST(StageInput, ForwardMatchesNaiveLoops) {
  const int64_t n = 3, s = 4, d = 5;
  for (const int variant : {0, 1, 2, 3}) {
    const bool with_pos = variant & 1, with_prev = variant & 2;
    const at::Tensor x = randn({n, s, d});
    const at::Tensor start = randn({d});
    const OptTensor pos = with_pos ? OptTensor(randn({s, d})) : std::nullopt;
    const OptTensor prev = with_prev ? OptTensor(randn({n, s, d})) : std::nullopt;
    const at::Tensor out = call_stage_input_fwd(x, start, pos, prev);
    ASSERT_EQ(out.sizes(), (std::vector<int64_t>{n, s + 1, d}));
    const auto o = out.accessor<float, 3>();
    const auto xa = x.accessor<float, 3>();
    const auto sa = start.accessor<float, 1>();
    for (int64_t b = 0; b < n; ++b) {
      for (int64_t k = 0; k < d; ++k) EXPECT_EQ(o[b][0][k], sa[k]);
      for (int64_t j = 0; j < s; ++j) {
        for (int64_t k = 0; k < d; ++k) {
          float want = xa[b][j][k];
          if (with_pos) want = want + pos->accessor<float, 2>()[j][k];
          if (with_prev) want = want + prev->accessor<float, 3>()[b][j][k];
          EXPECT_EQ(o[b][j + 1][k], want) << "variant " << variant;
        }
      }
    }
  }
}

TEST(StageInput, ForwardStridedInputs) {
  const at::Tensor x = randn({6, 2, 8}, at::kDouble).transpose(0, 1).slice(2, 0, 8, 2);  // (2,6,4)
  const at::Tensor start = randn({8}, at::kDouble).slice(0, 0, 8, 2);
  const at::Tensor pos = randn({4, 6}, at::kDouble).t();
  const at::Tensor out = mblm::stage_input_fwd(x, start, pos, std::nullopt);
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t j = 0; j < 6; ++j) {
      for (int64_t k = 0; k < 4; ++k) {
        EXPECT_EQ(out[b][j + 1][k].item<double>(),
                  x[b][j][k].item<double>() + pos[j][k].item<double>());
      }
    }
  }
}

TEST(StageInput, BackwardMatchesNaiveLoops) {
  const int64_t n = 37, rows = 5, d = 6;
  const at::Tensor grad = randn({n, rows, d}, at::kDouble);
  const auto [gx, gs, gp, gv] = call_stage_input_bwd(grad, true, true);
  ASSERT_EQ(gx.sizes(), (std::vector<int64_t>{n, rows - 1, d}));
  ASSERT_EQ(gp.sizes(), (std::vector<int64_t>{rows - 1, d}));
  const auto g = grad.accessor<double, 3>();
  for (int64_t k = 0; k < d; ++k) {
    double sum0 = 0;
    for (int64_t b = 0; b < n; ++b) sum0 += g[b][0][k];
    EXPECT_NEAR(gs[k].item<double>(), sum0, 1e-12);
    for (int64_t r = 1; r < rows; ++r) {
      double sum = 0;
      for (int64_t b = 0; b < n; ++b) {
        sum += g[b][r][k];
        EXPECT_EQ(gx[b][r - 1][k].item<double>(), g[b][r][k]);
        EXPECT_EQ(gv[b][r - 1][k].item<double>(), g[b][r][k]);
      }
      EXPECT_NEAR(gp[r - 1][k].item<double>(), sum, 1e-12);
    }
  }
  const auto [gx2, gs2, gp2, gv2] = mblm::stage_input_bwd(grad, false, false);
  EXPECT_EQ(gp2.numel(), 0);
  EXPECT_EQ(gv2.numel(), 0);
  EXPECT_TRUE(gx2.equal(gx));
}

TEST(StageInput, BackwardHalfAccumulatesInFloat32) {
  // 2048 * 1.0 is exact in float32; a bfloat16 running sum would stall at 256.
  const at::Tensor grad =
      at::empty({2048, 2, 4}, at::TensorOptions().dtype(at::kBFloat16)).fill_(1);
  const auto [gx, gs, gp, gv] = call_stage_input_bwd(grad, true, false);
  for (int64_t k = 0; k < 4; ++k) {
    EXPECT_EQ(gs[k].item<float>(), 2048.0f);
    EXPECT_EQ(gp[0][k].item<float>(), 2048.0f);
  }
}

// out[b, t] as patch_unpatch defines it, from y viewed as (B, G, 1 + P, D).
at::Tensor unpatch_naive(const at::Tensor& y4, int64_t length, bool with_start) {
  const int64_t batch = y4.size(0), groups = y4.size(1), rows = y4.size(2), d = y4.size(3);
  at::Tensor out = at::empty({batch, length, d}, y4.options());
  for (int64_t b = 0; b < batch; ++b) {
    int64_t t = 0;
    if (with_start && length > 0) out[b][t++].copy_(y4[b][0][0]);
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t r = 1; r < rows && t < length; ++r) out[b][t++].copy_(y4[b][g][r]);
    }
  }
  return out;
}

TEST(PatchUnpatch, ForwardAndBackwardMatchNaiveLoops) {
  const at::Tensor y = randn({2, 3, 5, 4});
  for (const bool with_start : {true, false}) {
    const int64_t rows = 3 * 4 + (with_start ? 1 : 0);
    for (const int64_t length : {int64_t{0}, int64_t{1}, rows - 1, rows}) {
      const at::Tensor out = call_unpatch_fwd(y, length, with_start);
      EXPECT_TRUE(out.equal(unpatch_naive(y, length, with_start))) << length;
      // backward: the adjoint of the read-back (each y row gets the grad row it was read to)
      const at::Tensor grad = randn({2, length, 4});
      const at::Tensor gy = call_unpatch_bwd(grad, {2, 3, 5, 4}, with_start);
      ASSERT_EQ(gy.sizes(), y.sizes());
      for (int64_t b = 0; b < 2; ++b) {
        for (int64_t g = 0; g < 3; ++g) {
          for (int64_t r = 0; r < 5; ++r) {
            int64_t t = -1;
            if (r > 0) t = g * 4 + (r - 1) + (with_start ? 1 : 0);
            if (r == 0 && with_start && g == 0) t = 0;
            for (int64_t k = 0; k < 4; ++k) {
              const float want = (t >= 0 && t < length) ? grad[b][t][k].item<float>() : 0.0f;
              EXPECT_EQ(gy[b][g][r][k].item<float>(), want);
            }
          }
        }
      }
    }
  }
}

TEST(PatchUnpatch, RankThreeAndStridedY) {
  const at::Tensor y3 = randn({2, 6, 3});  // (B, 1 + P, D): one local sequence per batch row
  EXPECT_TRUE(mblm::patch_unpatch_fwd(y3, 6, true).equal(unpatch_naive(y3.unsqueeze(1), 6, true)));
  const at::Tensor y = randn({3, 2, 5, 8}).transpose(0, 1).slice(3, 0, 8, 2);  // (2, 3, 5, 4)
  EXPECT_TRUE(mblm::patch_unpatch_fwd(y, 11, false).equal(unpatch_naive(y, 11, false)));
}

// ------------------------------------------------------------------------------------------

TEST(PatchBadInputs, ThrowC10Error) {
  const auto longs = at::TensorOptions().dtype(at::kLong);
  EXPECT_THROW(call_patch_pad(at::empty({5}, longs), {2}, 0), c10::Error);
  EXPECT_THROW(call_patch_pad(at::empty({2, 5}), {2}, 0), c10::Error);
  EXPECT_THROW(call_patch_pad(at::empty({2, 5}, longs), {0}, 0), c10::Error);
  EXPECT_THROW(call_patch_pad(at::empty({2, 5}, at::TensorOptions().dtype(at::kByte)), {2}, 300),
               c10::Error);

  const at::Tensor x = randn({2, 3, 4});
  EXPECT_THROW(call_stage_input_fwd(randn({2, 3}), randn({4}), std::nullopt, std::nullopt),
               c10::Error);
  EXPECT_THROW(call_stage_input_fwd(x, randn({5}), std::nullopt, std::nullopt), c10::Error);
  EXPECT_THROW(call_stage_input_fwd(x, randn({4}), randn({4, 4}), std::nullopt), c10::Error);
  EXPECT_THROW(call_stage_input_fwd(x, randn({4}), std::nullopt, randn({2, 3, 5})), c10::Error);
  EXPECT_THROW(call_stage_input_fwd(x, randn({4}, at::kDouble), std::nullopt, std::nullopt),
               c10::Error);
  EXPECT_THROW(call_stage_input_bwd(randn({3, 4}), true, true), c10::Error);
  EXPECT_THROW(call_stage_input_bwd(at::empty({3, 2, 4}, longs), true, true), c10::Error);

  const at::Tensor y = randn({2, 3, 5, 4});
  EXPECT_THROW(call_unpatch_fwd(y, 14, true), c10::Error);
  EXPECT_THROW(call_unpatch_fwd(y, -1, true), c10::Error);
  EXPECT_THROW(call_unpatch_fwd(randn({5, 4}), 1, true), c10::Error);
  EXPECT_THROW(call_unpatch_bwd(randn({2, 5, 4}), {3, 3, 5, 4}, true), c10::Error);
  EXPECT_THROW(call_unpatch_bwd(randn({2, 5, 4}), {2, 4}, true), c10::Error);

  // The message names the argument and the expected shape.
  try {
    call_unpatch_fwd(y, 14, true);
    FAIL() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("length = 14 exceeds"),
              std::string::npos);
  }
  try {
    call_stage_input_fwd(x, randn({5}), std::nullopt, std::nullopt);
    FAIL() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("start must have shape (D,) = (4,)"),
              std::string::npos);
  }
}

}  // namespace
