// CPU kernels of the norm family (rms_norm_fwd, rms_norm_bwd). Semantics: rms_norm_ref in
// mblm/ops/reference.py.
//
// Both are one memory pass over the rows. A row's (shifted) input u is assembled in a small
// per-thread buffer in the accumulation type (fp32; fp64 for fp64), zero padded to the vector
// width, so the arithmetic runs in full vectors without tails. The token shift is only an
// addressing rule: u[s] = [x[s, :keep], x[s - 1, keep:]] (zero at s = 0), and its adjoint sends
// the gradient of u[s, keep:] to row s - 1, written by the thread that owns row s (no two threads
// write the same element). The backward reduces grad_g over fixed blocks of rows (partial sums
// per block, then summed in block order): the result does not depend on the thread count.
#include "mblm/norm.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "attention_vec.h"

namespace mblm {

namespace {

using cpu_attn::cvt_load;
using cpu_attn::cvt_store;
using cpu_attn::Vec;

// Elements per at::parallel_for chunk (forward) and per grad_g block (backward).
constexpr int64_t kGrainElems = int64_t{1} << 15;
// At most this many grad_g partial sums (blocks) per backward.
constexpr int64_t kMaxBlocks = 4096;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// Row geometry: rows of d features in sequences of seq rows; u keeps features [0, keep) of its
// own row and takes [keep, d) from the previous row of its sequence (keep == d: no shift).
struct Geometry {
  int64_t rows, seq, d, keep, dp;
};

template <typename scalar_t, typename acc_t>
inline void load_u(const scalar_t* x, int64_t r, const Geometry& geo, acc_t* u) {
  const int64_t d = geo.d, keep = geo.keep;
  cvt_load(x + r * d, u, keep);
  if (keep < d) {
    if (r % geo.seq != 0) {
      cvt_load(x + (r - 1) * d + keep, u + keep, d - keep);
    } else {
      std::fill(u + keep, u + d, acc_t(0));
    }
  }
}

template <typename acc_t>
inline acc_t sum_squares(const acc_t* u, int64_t dp) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::kWidth;
  V a0 = V::zero(), a1 = V::zero();
  int64_t j = 0;
  for (; j + 2 * W <= dp; j += 2 * W) {
    const V x0 = V::load(u + j), x1 = V::load(u + j + W);
    a0 = fmadd(x0, x0, a0);
    a1 = fmadd(x1, x1, a1);
  }
  if (j < dp) {
    const V x0 = V::load(u + j);
    a0 = fmadd(x0, x0, a0);
  }
  return (a0 + a1).sum();
}

template <typename scalar_t>
void rms_norm_fwd_impl(const scalar_t* x, const scalar_t* g, scalar_t* y,
                       at::opmath_type<scalar_t>* rms, const Geometry& geo, double scale_d,
                       double eps_d) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t W = V::kWidth;
  const acc_t scale = static_cast<acc_t>(scale_d), eps = static_cast<acc_t>(eps_d);
  const int64_t d = geo.d, dp = geo.dp;
  std::vector<acc_t> gb(dp, acc_t(0));
  cvt_load(g, gb.data(), d);
  at::parallel_for(0, geo.rows, std::max<int64_t>(1, kGrainElems / d), [&](int64_t b, int64_t e) {
    std::vector<acc_t> u(dp, acc_t(0)), out(dp);
    for (int64_t r = b; r < e; ++r) {
      load_u(x, r, geo, u.data());
      const acc_t norm = std::sqrt(sum_squares(u.data(), dp)) * scale;
      const V inv = V::broadcast(acc_t(1) / std::max(norm, eps));
      for (int64_t j = 0; j < dp; j += W) {
        (V::load(u.data() + j) * inv * V::load(gb.data() + j)).store(out.data() + j);
      }
      cvt_store(out.data(), y + r * d, d);
      rms[r] = norm;
    }
  });
}

template <typename scalar_t>
void rms_norm_bwd_impl(const scalar_t* gy_ptr, const scalar_t* x, const scalar_t* g,
                       const at::opmath_type<scalar_t>* rms, scalar_t* gx,
                       at::opmath_type<scalar_t>* partial, int64_t block_rows, int64_t n_blocks,
                       const Geometry& geo, double scale_d, double eps_d) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t W = V::kWidth;
  const acc_t scale2 = static_cast<acc_t>(scale_d * scale_d), eps = static_cast<acc_t>(eps_d);
  const int64_t d = geo.d, dp = geo.dp, keep = geo.keep;
  std::vector<acc_t> gb(dp, acc_t(0));
  cvt_load(g, gb.data(), d);
  at::parallel_for(0, n_blocks, 1, [&](int64_t bb, int64_t be) {
    std::vector<acc_t> u(dp, acc_t(0)), gy(dp, acc_t(0)), gu(dp);
    for (int64_t blk = bb; blk < be; ++blk) {
      acc_t* gg = partial + blk * dp;
      std::fill(gg, gg + dp, acc_t(0));
      const int64_t r1 = std::min(geo.rows, (blk + 1) * block_rows);
      for (int64_t r = blk * block_rows; r < r1; ++r) {
        load_u(x, r, geo, u.data());
        cvt_load(gy_ptr + r * d, gy.data(), d);
        const acc_t inv_s = acc_t(1) / std::max(rms[r], eps);
        const V inv = V::broadcast(inv_s);
        V dot = V::zero();
        for (int64_t j = 0; j < dp; j += W) {
          const V gyj = V::load(gy.data() + j);
          const V a = gyj * V::load(gb.data() + j);
          const V n = V::load(u.data() + j) * inv;
          dot = fmadd(a, n, dot);
          fmadd(gyj, n, V::load(gg + j)).store(gg + j);
          a.store(gu.data() + j);
        }
        // A clamped RMS is a constant: no radial term.
        const V radial = V::broadcast(rms[r] < eps ? acc_t(0) : dot.sum() * scale2);
        for (int64_t j = 0; j < dp; j += W) {
          const V n = V::load(u.data() + j) * inv;
          ((V::load(gu.data() + j) - n * radial) * inv).store(gu.data() + j);
        }
        cvt_store(gu.data(), gx + r * d, keep);
        if (keep < d) {
          const int64_t s = r % geo.seq;
          if (s != 0) cvt_store(gu.data() + keep, gx + (r - 1) * d + keep, d - keep);
          if (s == geo.seq - 1) std::fill(gx + r * d + keep, gx + (r + 1) * d, scalar_t(0));
        }
      }
    }
  });
}

Geometry geometry_of(const at::Tensor& x, bool shift) {
  const int64_t d = x.size(-1);
  Geometry geo{};
  geo.d = d;
  geo.rows = d == 0 ? 0 : x.numel() / d;
  geo.seq = shift ? x.size(-2) : 1;
  geo.keep = shift ? token_shift_keep(d) : d;
  return geo;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x_in, const at::Tensor& g,
                                                    double scale, double eps, bool shift) {
  check_rms_norm_fwd_args(x_in, g, scale, eps, shift);
  const auto x = x_in.contiguous();
  auto y = at::empty(x.sizes(), x.options());
  auto rms = at::zeros(x.sizes().slice(0, x.dim() - 1),
                       x.options().dtype(rms_norm_stat_dtype(x.scalar_type())));
  Geometry geo = geometry_of(x, shift);
  if (geo.rows == 0) return {y, rms};
  const auto gc = g.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_fwd_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        geo.dp = round_up(geo.d, Vec<acc_t>::kWidth);
        rms_norm_fwd_impl<scalar_t>(x.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                                    y.mutable_data_ptr<scalar_t>(), rms.mutable_data_ptr<acc_t>(),
                                    geo, scale, eps);
      });
  return {y, rms};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& grad_y_in,
                                                    const at::Tensor& x_in, const at::Tensor& g,
                                                    const at::Tensor& rms_in, double scale,
                                                    double eps, bool shift) {
  check_rms_norm_bwd_args(grad_y_in, x_in, g, rms_in, scale, eps, shift);
  const auto x = x_in.contiguous();
  const auto grad_y = grad_y_in.contiguous();
  const auto rms = rms_in.contiguous();
  auto grad_x = at::empty(x.sizes(), x.options());
  Geometry geo = geometry_of(x, shift);
  if (geo.rows == 0) return {grad_x, at::zeros(g.sizes(), g.options())};
  const int64_t block_rows =
      std::max({int64_t{1}, kGrainElems / geo.d, ceil_div(geo.rows, kMaxBlocks)});
  const int64_t n_blocks = ceil_div(geo.rows, block_rows);
  const auto acc = rms_norm_stat_dtype(x.scalar_type());
  const auto gc = g.contiguous();
  at::Tensor grad_g;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_bwd_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        geo.dp = round_up(geo.d, Vec<acc_t>::kWidth);
        auto partial = at::empty({n_blocks, geo.dp}, x.options().dtype(acc));
        rms_norm_bwd_impl<scalar_t>(grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                    gc.const_data_ptr<scalar_t>(), rms.const_data_ptr<acc_t>(),
                                    grad_x.mutable_data_ptr<scalar_t>(),
                                    partial.mutable_data_ptr<acc_t>(), block_rows, n_blocks, geo,
                                    scale, eps);
        // Block sums in block order (deterministic).
        std::vector<acc_t> total(geo.dp, acc_t(0));
        const acc_t* p = partial.const_data_ptr<acc_t>();
        for (int64_t blk = 0; blk < n_blocks; ++blk) {
          for (int64_t j = 0; j < geo.dp; ++j) {
            total[j] += p[blk * geo.dp + j];
          }
        }
        grad_g = at::empty(g.sizes(), g.options());
        cvt_store(total.data(), grad_g.mutable_data_ptr<scalar_t>(), geo.d);
      });
  return {grad_x, grad_g};
}

}  // namespace

TORCH_LIBRARY_IMPL(mblm, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
}

}  // namespace mblm
