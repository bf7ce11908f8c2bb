// SSD family, CPU forward scan ssd_fwd. Checks: csrc/ops/ssd.cpp. Semantics:
// mblm/ops/reference.py (ssd_ref). Backward: csrc/cpu/ssd_bwd.cpp; decode step:
// csrc/cpu/ssd_update.cpp.
//
// Algorithm: the sequential recurrence S_t = a_t S_{t-1} + d_t x_t B_t^T, y_t = S_t C_t + D x_t
// per head, its (P x N) state kept as tiles of N rows (n) x 16 lanes (p) that go through blocks
// of 64 steps in registers (ssd_tile.h), rescaled so that a step costs one FMA per state element
// for the update and one for the read-out (ssd_steps.h). That is fewer operations than the
// chunked SSD algorithm (no intra-chunk quadratic term), with the numerics of the plain
// recurrence. The state is stored every kSsdCheckpointSteps steps (the backward restarts from
// those). Parallel over (batch, range of (head, p tile) pairs).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "mblm/ssd.h"
#include "ssd_cpu.h"
#include "ssd_layout.h"

namespace mblm {

namespace {

using namespace cpu_ssd;

template <typename scalar_t, typename acc_t>
void ssd_fwd_kernel(const Dims& dm, const at::Tensor& x, const GroupOperand<acc_t>& Bop,
                    const GroupOperand<acc_t>& Cop, const HeadParams<acc_t>& hp,
                    const StepTables<acc_t>& st, const at::Tensor& init, const at::Tensor& y,
                    const at::Tensor& final_state, const at::Tensor& checkpoints) {
  const Strided4<scalar_t> xs(x);
  const acc_t* Dp = hp.D_ptr();
  const acc_t* init_p = init.defined() ? init.const_data_ptr<acc_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  acc_t* fin = final_state.data_ptr<acc_t>();
  acc_t* ck = checkpoints.data_ptr<acc_t>();
  const int64_t P = dm.headdim, N = dm.dstate, H = dm.heads, L = dm.length;
  const int64_t PN = P * N, TN = N * kTileLanes, TL = kStepBlock * kTileLanes;
  const Ranges rg = split_ranges(H * dm.p_tiles, dm.batch);

  at::parallel_for(0, dm.batch * rg.count, 1, [&](int64_t begin, int64_t end) {
    const FlushSubnormals flush;
    std::vector<acc_t> tiles(rg.per * TN), V(TL), acc(TL);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / rg.count, k0 = (task % rg.count) * rg.per;
      const int64_t k1 = std::min(H * dm.p_tiles, k0 + rg.per);
      // tile k: head h = k / p_tiles, lanes p0 + j, rows n: tile[n][j] = state[h][p0 + j][n];
      // fn(tile element, b * H + h, (p0 + j) * N + n)
      auto for_tile_state = [&](int64_t k, auto&& fn) {
        const int64_t h = k / dm.p_tiles, p0 = (k % dm.p_tiles) * kTileLanes;
        const int64_t pw = std::min(kTileLanes, P - p0);
        acc_t* tile = tiles.data() + (k - k0) * TN;
        for (int64_t j = 0; j < pw; ++j)
          for (int64_t n = 0; n < N; ++n) fn(tile[n * kTileLanes + j], b * H + h, (p0 + j) * N + n);
      };
      std::fill(tiles.begin(), tiles.end(), acc_t(0));
      for (int64_t k = k0; k < k1; ++k) {
        if (init_p) {
          for_tile_state(k, [&](acc_t& v, int64_t bh, int64_t pn) { v = init_p[bh * PN + pn]; });
        }
        if (dm.chunks > 0) {  // checkpoint 0: the initial state
          for_tile_state(
              k, [&](acc_t& v, int64_t bh, int64_t pn) { ck[bh * dm.chunks * PN + pn] = v; });
        }
      }
      for (int64_t blk = 0; blk < dm.blocks; ++blk) {
        const int64_t t0 = blk * kStepBlock, steps = dm.block_steps(blk);
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t h = k / dm.p_tiles, p0 = (k % dm.p_tiles) * kTileLanes;
          const int64_t pw = std::min(kTileLanes, P - p0);
          {  // the rows of the next tile (or of the first tile of the next block)
            const int64_t kn = k + 1 < k1 ? k + 1 : k0, bn = k + 1 < k1 ? blk : blk + 1;
            if (bn < dm.blocks) {
              const int64_t hn = kn / dm.p_tiles, pn = (kn % dm.p_tiles) * kTileLanes;
              const int64_t tn = bn * kStepBlock, wn = std::min(kTileLanes, P - pn);
              prefetch_rows(xs.row(b, tn, hn) + pn, xs.s1, dm.block_steps(bn), wn, false);
              prefetch_rows(yp + ((b * L + tn) * H + hn) * P + pn, H * P, dm.block_steps(bn), wn,
                            true);
            }
          }
          const int64_t g = h / dm.per_group, sb = (b * H + h) * L;
          gather_lanes(V.data(), xs, b, t0, h, steps, p0, pw, st.wsc + sb + t0);
          // tile[n][p] += B_t[n] * (d_t / lam_t) x_t[p];  acc_t[p] += C_t[n] tile[n][p]
          const auto op = operands<acc_t>(Bop.blk(dm, b, g, blk), kStepBlock, V.data(), kTileLanes,
                                          Cop.blk(dm, b, g, blk), kStepBlock, st.pre + sb + t0,
                                          acc.data(), steps);
          scan_tile<acc_t, ScanOrder{}>(tiles.data() + (k - k0) * TN, N, op);
          for (int64_t i = 0; i < steps; ++i) {
            const scalar_t* xr = xs.row(b, t0 + i, h) + p0;
            scalar_t* yr = yp + ((b * L + t0 + i) * H + h) * P + p0;
            const acc_t o = st.osc[sb + t0 + i];
            const acc_t* a = acc.data() + i * kTileLanes;
            if (Dp) {
              const acc_t* dr = Dp + h * P + p0;
              for (int64_t j = 0; j < pw; ++j)
                yr[j] = static_cast<scalar_t>(o * a[j] + dr[j] * static_cast<acc_t>(xr[j]));
            } else {
              for (int64_t j = 0; j < pw; ++j) yr[j] = static_cast<scalar_t>(o * a[j]);
            }
          }
        }
        const int64_t t_end = t0 + steps;
        if (t_end % kSsdCheckpointSteps == 0 || t_end == L) {
          for (int64_t k = k0; k < k1; ++k) {
            const int64_t h = k / dm.p_tiles;
            const acc_t scale = st.osc[(b * H + h) * L + t_end - 1];  // back to the true state
            acc_t* tile = tiles.data() + (k - k0) * TN;
            if (scale != acc_t(1)) {
              for (int64_t e = 0; e < TN; ++e) tile[e] *= scale;
            }
            if (t_end < L) {
              const int64_t c = t_end / kSsdCheckpointSteps;
              for_tile_state(k, [&](acc_t& v, int64_t bh, int64_t pn) {
                ck[(bh * dm.chunks + c) * PN + pn] = v;
              });
            }
          }
        }
      }
      for (int64_t k = k0; k < k1; ++k) {
        for_tile_state(k, [&](acc_t& v, int64_t bh, int64_t pn) { fin[bh * PN + pn] = v; });
      }
    }
  });
}

}  // namespace
}  // namespace mblm

namespace mblm::cpu_ssd {
inline namespace MBLM_CPU_ISA {

std::tuple<at::Tensor, at::Tensor, at::Tensor> ssd_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B_in,
    const at::Tensor& C_in, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
    const std::optional<at::Tensor>& initial_state) {
  check_ssd_fwd_args(x_in, dt, A, B_in, C_in, D, dt_bias, initial_state, /*check_values=*/true);
  const at::Tensor x = last_dim_contiguous(x_in);
  const at::Tensor B = last_dim_contiguous(B_in);
  const at::Tensor C = last_dim_contiguous(C_in);
  const Dims dm(x, B);
  const auto cdt = ssd_compute_dtype(x.scalar_type());
  const auto opts = x.options().dtype(cdt);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor final_state = at::empty({dm.batch, dm.heads, dm.headdim, dm.dstate}, opts);
  at::Tensor checkpoints = at::empty({dm.batch, dm.heads, dm.chunks, dm.headdim, dm.dstate}, opts);
  if (final_state.numel() == 0) {
    // No state elements (B, H, P or N is 0): y = D x, or zeros.
    final_state.zero_();
    checkpoints.zero_();
    if (y.numel() > 0) {
      if (D.has_value()) {
        const at::Tensor Dc = D->to(cdt);
        y.copy_(at::mul(x.to(cdt), Dc.dim() == 1 ? Dc.view({dm.heads, 1}) : Dc));
      } else {
        y.zero_();
      }
    }
    return {y, final_state, checkpoints};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ssd_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const HeadParams<acc_t> hp(dt, A, D, dt_bias, dm.heads, dm.headdim);
    const Tables<acc_t> tab(dm, hp, dt_softplus, /*reverse=*/false, opts);
    const auto Bop = prepare_group_operand<scalar_t, acc_t>(B, dm, opts);
    const auto Cop = prepare_group_operand<scalar_t, acc_t>(C, dm, opts);
    at::Tensor init;
    if (initial_state.has_value()) init = initial_state->to(cdt).contiguous();
    ssd_fwd_kernel<scalar_t, acc_t>(dm, x, Bop, Cop, hp, tab.t, init, y, final_state, checkpoints);
  });
  return {y, final_state, checkpoints};
}

}  // namespace MBLM_CPU_ISA
}  // namespace mblm::cpu_ssd
