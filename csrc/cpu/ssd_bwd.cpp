// SSD family, CPU backward of the scan: ssd_bwd. Checks: csrc/ops/ssd.cpp. Semantics: the
// gradient of mblm/ops/reference.py's ssd_ref. Forward and algorithm: csrc/cpu/ssd_fwd.cpp.
//
// With u_t = d_t x_t and G_t the gradient w.r.t. the state S_t, per head:
//
//   G_t = a_{t+1} G_{t+1} + gy_t C_t^T                (G_{L-1} = grad_final_state + gy C^T)
//   gx_t = d_t G_t B_t + D gy_t      gB_t = d_t G_t^T x_t      gC_t = S_t^T gy_t
//   g(log a)_t = a_t <G_t, S_{t-1}> = sum_{s >= t} dLam_s,
//       dLam_s = C_s . gC_s - u_s . (G_s B_s)   (+ <grad_final_state, S_{L-1}> at s = L-1)
//   gd_t = g(log a)_t A + x_t . (G_t B_t)      gA = sum_t g(log a)_t d_t
//   g initial_state = a_0 G_0
//
// (S_t = sum_{r <= t} exp(Lam_t - Lam_r) u_r B_r^T with Lam the running sum of log a: Lam_s
// enters every output at s with + and every input at s with -). Two things keep the log-decay
// gradient accurate in float32, where a plain reverse running sum of dLam loses digits:
//   - the two terms of dLam_s share (gy_s . u_s)(B_s . C_s), which cancels; the passes read the
//     states before their step's update, a_s S_{s-1}^T gy_s and a_{s+1} G_{s+1} B_s, and
//     dLam_s = C_s . (a_s S_{s-1}^T gy_s) - u_s . (a_{s+1} G_{s+1} B_s) has no such term;
//   - the running sum restarts at every checkpoint block from a_t <G_t, S_{t-1}> computed
//     directly (G from the reverse pass, S_{t-1} the checkpoint), so errors add up over at most
//     kSsdCheckpointSteps steps (as mamba_ssm's chunked backward does).
//
// Passes (tile loops of ssd_tile.h, "rows" x lanes):
//   S pass (p x n): the states, recomputed from the checkpoints -> gC, C . (a S^T gy),
//       a_{L-1} <gSf, S_{L-2}>; parallel over (b, g, checkpoint block, head subset, n tiles)
//   G pass (p x n, reverse, both reductions of G in one walk) -> gB, gx, x . (a G B), x . gy,
//       gD, g initial_state, the checkpoint anchors <G, S>; over (b, g, head subset)
//   dt pass: per (b, h), the reverse running sums (in double) for dt, A and dt_bias.
// Heads of a group share B and C, so gB and gC sum over heads: each head subset of a task
// accumulates into its own buffer, summed at the end.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

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
struct BwdContext {
  const Dims& dm;
  Strided4<scalar_t> x, gy, B, C;
  const HeadParams<acc_t>& hp;
  const StepTables<acc_t>& st;
  const acc_t* gsf;  // grad_final_state (B, H, P, N) or null
  const acc_t* ck;   // checkpoints (B, H, chunks, P, N)
  const acc_t* cb;   // C_t . B_t, (B, G, L)
};

constexpr ScanOrder kStatePass{.step_major = true, .reduce_first = true};
constexpr int64_t kHalf = kStepBlock / 2;

// Work split of the (p x n) passes within a (b, g [, checkpoint block]) unit: subsets of the
// group's heads (each with its own gB / gC buffer) times ranges of n tiles.
struct PnSplit {
  int64_t heads, per_heads;  // subsets, heads per subset
  Ranges tiles;              // n tile ranges
};

PnSplit pn_split(const Dims& dm, int64_t base_units) {
  const int64_t want = 2 * at::get_num_threads();
  const int64_t base = std::max<int64_t>(1, base_units);
  const int64_t G = std::max<int64_t>(1, dm.per_group);
  const int64_t per = ceil_div(G, std::clamp<int64_t>(ceil_div(want, base), 1, G));
  const int64_t heads = ceil_div(G, per);
  return {heads, per, split_ranges(dm.n_tiles, base * heads)};
}

// The (p x n) tiles of a task: heads [h0, h1) x n tiles [nt0, nt1), each P rows x 16 lanes.
struct PnTiles {
  int64_t h0, h1, nt0, nt1, P;
  int64_t index(int64_t h, int64_t nt) const {
    return ((h - h0) * (nt1 - nt0) + nt - nt0) * P * kTileLanes;
  }
};

// src(h): head h's (P x N) matrix, or null for zeros.
template <typename acc_t, typename Source>
void load_pn_tiles(acc_t* tiles, const PnTiles& tl, int64_t N, const Source& src) {
  for (int64_t h = tl.h0; h < tl.h1; ++h) {
    const acc_t* s = src(h);
    for (int64_t nt = tl.nt0; nt < tl.nt1; ++nt) {
      acc_t* tile = tiles + tl.index(h, nt);
      std::fill(tile, tile + tl.P * kTileLanes, acc_t(0));
      if (!s) continue;
      const int64_t n0 = nt * kTileLanes, nw = std::min(kTileLanes, N - n0);
      for (int64_t p = 0; p < tl.P; ++p)
        for (int64_t j = 0; j < nw; ++j) tile[p * kTileLanes + j] = s[p * N + n0 + j];
    }
  }
}

// S pass. The reduction reads the tile before the step's update: lam_t acc_t = a_t S_{t-1}^T gy_t
// =: aR_t. gC_t = aR_t + d_t (gy_t . x_t) B_t into gC (per head subset), C_t . aR_t per head into
// cgc (per n tile), a_{L-1} <gSf, S_{L-2}> into fin (per n tile).
template <typename scalar_t, typename acc_t>
void state_pass(const BwdContext<scalar_t, acc_t>& c, acc_t* gC, const PnSplit& sp, acc_t* cgc,
                acc_t* fin) {
  const Dims& dm = c.dm;
  const int64_t P = dm.headdim, N = dm.dstate, H = dm.heads, L = dm.length, BH = dm.batch * H;
  const int64_t units = dm.batch * dm.groups * dm.chunks * sp.heads * sp.tiles.count;
  const int64_t blocks_per_chunk = kSsdCheckpointSteps / kStepBlock;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    const FlushSubnormals flush;
    std::vector<acc_t> tiles(sp.per_heads * sp.tiles.per * P * kTileLanes), xs(kStepBlock * P),
        gys(kStepBlock * P), V(kStepBlock * kTileLanes), acc(kStepBlock * kTileLanes),
        ugy(kStepBlock);
    for (int64_t u = begin; u < end; ++u) {
      int64_t rest = u;
      const int64_t r = rest % sp.tiles.count;
      rest /= sp.tiles.count;
      const int64_t s = rest % sp.heads;
      rest /= sp.heads;
      const int64_t ch = rest % dm.chunks;
      rest /= dm.chunks;
      const int64_t g = rest % dm.groups, b = rest / dm.groups;
      PnTiles tl{};
      tl.h0 = g * dm.per_group + s * sp.per_heads;
      tl.h1 = std::min((g + 1) * dm.per_group, tl.h0 + sp.per_heads);
      tl.nt0 = r * sp.tiles.per;
      tl.nt1 = std::min(dm.n_tiles, tl.nt0 + sp.tiles.per);
      tl.P = P;
      acc_t* gCs = gC + s * dm.batch * L * dm.groups * N;
      load_pn_tiles<acc_t>(tiles.data(), tl, N, [&](int64_t h) {
        return c.ck + ((b * H + h) * dm.chunks + ch) * P * N;
      });
      const int64_t blk_begin = ch * blocks_per_chunk;
      const int64_t blk_end = std::min(dm.blocks, blk_begin + blocks_per_chunk);
      for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
        const int64_t t0 = blk * kStepBlock, steps = dm.block_steps(blk);
        for (int64_t h = tl.h0; h < tl.h1; ++h) {
          const int64_t bh = b * H + h, sb = bh * L;
          {  // the rows of the next head (or of the first head of the next block)
            const int64_t hn = h + 1 < tl.h1 ? h + 1 : tl.h0, bn = h + 1 < tl.h1 ? blk : blk + 1;
            if (bn < blk_end) {
              const int64_t tn = bn * kStepBlock, sn = dm.block_steps(bn);
              prefetch_rows(c.x.row(b, tn, hn), c.x.s1, sn, P, false);
              prefetch_rows(c.gy.row(b, tn, hn), c.gy.s1, sn, P, false);
            }
          }
          copy_head_block(xs.data(), c.x, b, t0, h, steps, P);
          copy_head_block(gys.data(), c.gy, b, t0, h, steps, P);
          for (int64_t i = 0; i < steps; ++i) {
            const acc_t* xr = xs.data() + i * P;
            const acc_t* gr = gys.data() + i * P;
            acc_t dot = 0;
            // a reduction: vectorized only when allowed to reassociate
#pragma omp simd reduction(+ : dot)
            for (int64_t p = 0; p < P; ++p) dot += xr[p] * gr[p];
            ugy[i] = c.st.d[sb + t0 + i] * dot;
          }
          for (int64_t nt = tl.nt0; nt < tl.nt1; ++nt) {
            const int64_t n0 = nt * kTileLanes, nw = std::min(kTileLanes, N - n0);
            // tile[p][n] += x_t[p] * (d_t / lam_t) B_t[n];  acc_t[n] += gy_t[p] tile[p][n] (before)
            gather_lanes(V.data(), c.B, b, t0, g, steps, n0, nw, c.st.wsc + sb + t0);
            acc_t* tile = tiles.data() + tl.index(h, nt);
            // The block that ends the sequence stops before its last step for the final-state
            // term a_{L-1} <gSf, S_{L-2}> (see dt_pass).
            const bool split = c.gsf && t0 + steps == L;
            const int64_t first = split ? steps - 1 : steps;
            for (int64_t i0 = 0; i0 < first; i0 += kHalf) {  // halves: U and R stay in L1
              const int64_t n_i = std::min(kHalf, first - i0);
              scan_tile<acc_t, kStatePass>(
                  tile, P,
                  operands<acc_t>(xs.data() + i0 * P, P, V.data() + i0 * kTileLanes, kTileLanes,
                                  gys.data() + i0 * P, P, c.st.pre + sb + t0 + i0,
                                  acc.data() + i0 * kTileLanes, n_i));
            }
            if (split) {
              const acc_t pre = c.st.pre[sb + L - 1];
              const acc_t scale = pre != acc_t(1) ? pre : c.st.osc[sb + L - 1];  // a lam_{L-2}
              const acc_t* gs = c.gsf + bh * P * N;
              acc_t dot = 0;
              for (int64_t p = 0; p < P; ++p) {
#pragma omp simd reduction(+ : dot)
                for (int64_t j = 0; j < nw; ++j)
                  dot += gs[p * N + n0 + j] * tile[p * kTileLanes + j];
              }
              fin[nt * BH + bh] = scale * dot;
              const int64_t i = steps - 1;
              scan_tile<acc_t, kStatePass>(
                  tile, P,
                  operands<acc_t>(xs.data() + i * P, P, V.data() + i * kTileLanes, kTileLanes,
                                  gys.data() + i * P, P, c.st.pre + sb + t0 + i,
                                  acc.data() + i * kTileLanes, 1));
            }
            for (int64_t i = 0; i < steps; ++i) {
              const int64_t t = t0 + i;
              const acc_t o = c.st.osc[sb + t], w = ugy[i];
              const acc_t* a = acc.data() + i * kTileLanes;
              const scalar_t* br = c.B.row(b, t, g) + n0;
              const scalar_t* cr = c.C.row(b, t, g) + n0;
              acc_t* gcr = gCs + ((b * L + t) * dm.groups + g) * N + n0;
              acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
              for (int64_t j = 0; j < nw; ++j) {
                const acc_t ar = o * a[j];
                gcr[j] += ar + w * static_cast<acc_t>(br[j]);
                dot += static_cast<acc_t>(cr[j]) * ar;
              }
              cgc[(nt * BH + bh) * L + t] = dot;
            }
          }
        }
      }
    }
  });
}

// G pass (reverse, tiles p rows x n lanes), both of G's reductions in one walk (scan_tile_dual):
//   along the rows, after the update: gB_t = d_t mu_t G~_t^T x_t into gB (per head subset);
//   along the lanes, before the update: mu_t Q_t = a_{t+1} G_{t+1} B_t =: aQ_t, so that
//     G_t B_t = aQ_t + (C_t . B_t) gy_t, gx_t = d_t G_t B_t + D gy_t into gx, x_t . aQ_t into xaq,
//     x_t . gy_t into xgy ((B H, L) each) and sum_t gy_t x_t into gD (B, H, P);
//   the gradient of the initial state, a_0 mu_0 G~_0, into gS0; at the start t of every
//   checkpoint block c >= 1, a_t <G_t, S_{t-1}> with S_{t-1} the checkpoint into anchor
//   (per n tile, (n_tiles, B H, chunks)).
// A task owns every n tile of its heads (the lanes reduction sums over all of them).
template <typename scalar_t, typename acc_t>
void grad_pass(const BwdContext<scalar_t, acc_t>& c, acc_t* gB, const PnSplit& sp, acc_t* gS0,
               acc_t* anchor, scalar_t* gx, acc_t* xaq, acc_t* xgy, acc_t* gD) {
  const Dims& dm = c.dm;
  const int64_t P = dm.headdim, N = dm.dstate, H = dm.heads, L = dm.length;
  const acc_t* Dp = c.hp.D_ptr();
  const int64_t units = dm.batch * dm.groups * sp.heads;
  constexpr int kQLanes = 1;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    const FlushSubnormals flush;
    std::vector<acc_t> tiles(sp.per_heads * dm.n_tiles * P * kTileLanes), xs(kStepBlock * P),
        gys(kStepBlock * P), V(kStepBlock * kTileLanes), W(kStepBlock * kTileLanes),
        acc(kStepBlock * kTileLanes), Q(kStepBlock * P * kQLanes);
    std::vector<double> gd(sp.per_heads * P);  // sums over L steps
    std::vector<acc_t> gd_blk(P);              // the block's share, added to gd once
    for (int64_t u = begin; u < end; ++u) {
      const int64_t s = u % sp.heads, bg = u / sp.heads;
      const int64_t g = bg % dm.groups, b = bg / dm.groups;
      PnTiles tl{};
      tl.h0 = g * dm.per_group + s * sp.per_heads;
      tl.h1 = std::min((g + 1) * dm.per_group, tl.h0 + sp.per_heads);
      tl.nt0 = 0;
      tl.nt1 = dm.n_tiles;
      tl.P = P;
      acc_t* gBs = gB + s * dm.batch * L * dm.groups * N;
      load_pn_tiles<acc_t>(tiles.data(), tl, N, [&](int64_t h) -> const acc_t* {
        return c.gsf ? c.gsf + (b * H + h) * P * N : nullptr;
      });
      std::fill(gd.begin(), gd.end(), 0.0);
      for (int64_t blk = dm.blocks - 1; blk >= 0; --blk) {
        const int64_t t0 = blk * kStepBlock, steps = dm.block_steps(blk);
        for (int64_t h = tl.h0; h < tl.h1; ++h) {
          const int64_t bh = b * H + h, sb = bh * L;
          {  // the rows of the next head (or of the first head of the previous block)
            const int64_t hn = h + 1 < tl.h1 ? h + 1 : tl.h0, bn = h + 1 < tl.h1 ? blk : blk - 1;
            if (bn >= 0) {
              const int64_t tn = bn * kStepBlock, sn = dm.block_steps(bn);
              prefetch_rows(c.gy.row(b, tn, hn), c.gy.s1, sn, P, false);
              prefetch_rows(c.x.row(b, tn, hn), c.x.s1, sn, P, false);
              prefetch_rows(gx + ((b * L + tn) * H + hn) * P, H * P, sn, P, true);
            }
          }
          copy_head_block(gys.data(), c.gy, b, t0, h, steps, P);
          copy_head_block(xs.data(), c.x, b, t0, h, steps, P);
          std::fill(Q.begin(), Q.begin() + steps * P * kQLanes, acc_t(0));
          for (int64_t nt = tl.nt0; nt < tl.nt1; ++nt) {
            const int64_t n0 = nt * kTileLanes, nw = std::min(kTileLanes, N - n0);
            // tile[p][n] += gy_t[p] * C_t[n] / mu_t;  acc_t[n] += x_t[p] tile[p][n] (after);
            // Q_t[p] += tile[p][n] B_t[n] (before)
            gather_lanes(V.data(), c.C, b, t0, g, steps, n0, nw, c.st.gsc + sb + t0);
            gather_lanes<scalar_t, acc_t>(W.data(), c.B, b, t0, g, steps, n0, nw, nullptr);
            const DualOperands<acc_t> op{
                operands<acc_t>(gys.data(), P, V.data(), kTileLanes, xs.data(), P,
                                c.st.rpre + sb + t0, acc.data(), steps),
                W.data(), kTileLanes, Q.data(), P * kQLanes};
            acc_t* tile = tiles.data() + tl.index(h, nt);
            scan_tile_dual<acc_t>(tile, P, op);
            for (int64_t i = 0; i < steps; ++i) {
              const int64_t t = t0 + i;
              const acc_t scale = c.st.d[sb + t] * c.st.rosc[sb + t];
              const acc_t* a = acc.data() + i * kTileLanes;
              acc_t* gr = gBs + ((b * L + t) * dm.groups + g) * N + n0;
              for (int64_t j = 0; j < nw; ++j) gr[j] += scale * a[j];
            }
            if (t0 > 0 && t0 % kSsdCheckpointSteps == 0) {
              const int64_t ch = t0 / kSsdCheckpointSteps;
              const acc_t* S = c.ck + (bh * dm.chunks + ch) * P * N + n0;
              acc_t dot = 0;
              for (int64_t p = 0; p < P; ++p) {
#pragma omp simd reduction(+ : dot)
                for (int64_t j = 0; j < nw; ++j) dot += tile[p * kTileLanes + j] * S[p * N + j];
              }
              anchor[(nt * dm.batch * H + bh) * dm.chunks + ch] =
                  c.st.a[sb + t0] * c.st.rosc[sb + t0] * dot;
            }
          }
          double* gdh = gd.data() + (h - tl.h0) * P;
          const acc_t* dr = Dp ? Dp + h * P : nullptr;
          acc_t* gd_sum = gd_blk.data();
          std::fill(gd_blk.begin(), gd_blk.end(), acc_t(0));
          for (int64_t i = 0; i < steps; ++i) {
            const int64_t t = t0 + i;
            const acc_t mu = c.st.rosc[sb + t], d = c.st.d[sb + t];
            const acc_t cb = c.cb[(b * dm.groups + g) * L + t];
            const acc_t* xr = xs.data() + i * P;
            const acc_t* gr = gys.data() + i * P;
            acc_t* q = Q.data() + i * P * kQLanes;
            scalar_t* out = gx + ((b * L + t) * H + h) * P;
            acc_t dot_q = 0, dot_g = 0;
            // reductions: vectorized only when allowed to reassociate
#pragma omp simd reduction(+ : dot_q, dot_g)
            for (int64_t p = 0; p < P; ++p) {
              const acc_t aq = mu * q[p];
              const acc_t gb = aq + cb * gr[p];
              out[p] = static_cast<scalar_t>(dr ? d * gb + dr[p] * gr[p] : d * gb);
              dot_q += xr[p] * aq;
              dot_g += xr[p] * gr[p];
              gd_sum[p] += gr[p] * xr[p];
            }
            xaq[bh * L + t] = dot_q;
            xgy[bh * L + t] = dot_g;
          }
          for (int64_t p = 0; p < P; ++p) gdh[p] += static_cast<double>(gd_blk[p]);
        }
      }
      for (int64_t h = tl.h0; h < tl.h1; ++h) {
        const int64_t bh = b * H + h, sb = bh * L;
        const acc_t scale = L > 0 ? c.st.a[sb] * c.st.rosc[sb] : acc_t(1);
        acc_t* out = gS0 + bh * P * N;
        for (int64_t nt = tl.nt0; nt < tl.nt1; ++nt) {
          const acc_t* tile = tiles.data() + tl.index(h, nt);
          const int64_t n0 = nt * kTileLanes, nw = std::min(kTileLanes, N - n0);
          for (int64_t p = 0; p < P; ++p)
            for (int64_t j = 0; j < nw; ++j) out[p * N + n0 + j] = scale * tile[p * kTileLanes + j];
        }
        for (int64_t p = 0; p < P; ++p)
          gD[bh * P + p] = static_cast<acc_t>(gd[(h - tl.h0) * P + p]);
      }
    }
  });
}

// Per (b, h): g(log a)_t = sum_{s >= t} dLam_s with dLam_s = C_s . aR_s - d_s x_s . aQ_s, a
// reverse running sum in double started at g(log a)_{L-1} = a_{L-1} <gSf, S_{L-2}> + C . aR
// (the final state's term taken directly: <gSf, S_{L-1}> - u . (gSf B) would cancel) and
// restarted at every checkpoint block from its anchor; then gd_t = g(log a)_t A + x_t . (G_t B_t),
// gA and g dt_bias.
template <typename acc_t>
void dt_pass(const Dims& dm, const HeadParams<acc_t>& hp, bool softplus_dt,
             const StepTables<acc_t>& st, const acc_t* cb, const acc_t* cgc, const acc_t* xaq,
             const acc_t* xgy, const acc_t* fin, const acc_t* anchor, acc_t* gdt, acc_t* gA,
             acc_t* gbias) {
  const int64_t H = dm.heads, L = dm.length, BH = dm.batch * H;
  const acc_t* dt = hp.dt.template const_data_ptr<acc_t>();
  const acc_t* A = hp.A.template const_data_ptr<acc_t>();
  const acc_t* bias = hp.bias_ptr();
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, g = h / dm.per_group, sb = bh * L;
      double run = 0, ga = 0, gb = 0;
      for (int64_t nt = 0; nt < dm.n_tiles; ++nt) run += fin[nt * BH + bh];
      for (int64_t t = L - 1; t >= 0; --t) {
        if (t + 1 < L && (t + 1) % kSsdCheckpointSteps == 0) {
          const int64_t ch = (t + 1) / kSsdCheckpointSteps;
          run = 0;
          for (int64_t nt = 0; nt < dm.n_tiles; ++nt)
            run += anchor[(nt * BH + bh) * dm.chunks + ch];
        }
        double c_ar = 0, x_aq = 0, x_gy = 0;
        for (int64_t nt = 0; nt < dm.n_tiles; ++nt) c_ar += cgc[(nt * BH + bh) * L + t];
        x_aq = xaq[bh * L + t];
        x_gy = xgy[bh * L + t];
        const double d = st.d[sb + t];
        // at L - 1, aQ holds gSf B, whose term is already in fin: a_{L-1} <gSf, S_{L-2}>
        run += t == L - 1 ? c_ar : c_ar - d * x_aq;
        const double x_gb = x_aq + static_cast<double>(cb[(b * dm.groups + g) * L + t]) * x_gy;
        double grad = run * A[h] + x_gb;
        ga += run * d;
        if (softplus_dt) {
          grad *= softplus_grad(dt[(b * L + t) * H + h] + (bias ? bias[h] : acc_t(0)));
        }
        gb += grad;
        gdt[(b * L + t) * H + h] = static_cast<acc_t>(grad);
      }
      gA[bh] = static_cast<acc_t>(ga);
      gbias[bh] = static_cast<acc_t>(gb);
    }
  });
}

// C_t . B_t for every (b, g, t), (B, G, L).
template <typename scalar_t, typename acc_t>
void group_dots(const Dims& dm, const Strided4<scalar_t>& B, const Strided4<scalar_t>& C,
                acc_t* out) {
  const int64_t rows = dm.batch * dm.groups * dm.length;
  at::parallel_for(0, rows, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r % dm.length, bg = r / dm.length;
      const int64_t b = bg / dm.groups, g = bg % dm.groups;
      const scalar_t* br = B.row(b, t, g);
      const scalar_t* cr = C.row(b, t, g);
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t n = 0; n < dm.dstate; ++n) {
        dot += static_cast<acc_t>(br[n]) * static_cast<acc_t>(cr[n]);
      }
      out[r] = dot;
    }
  });
}

// Sums the per-subset (subsets, B, L, G, N) accumulators into (B, L, G, N) in out's dtype.
template <typename scalar_t, typename acc_t>
void reduce_subsets(const acc_t* src, int64_t subsets, const Dims& dm, scalar_t* out) {
  const int64_t total = dm.batch * dm.length * dm.groups * dm.dstate;
  at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      acc_t v = src[e];
      for (int64_t s = 1; s < subsets; ++s) v += src[s * total + e];
      out[e] = static_cast<scalar_t>(v);
    }
  });
}

}  // namespace
}  // namespace mblm

namespace mblm::cpu_ssd {
inline namespace MBLM_CPU_ISA {

SsdGrads ssd_bwd_cpu(const at::Tensor& grad_y_in, const std::optional<at::Tensor>& grad_final_state,
                     const at::Tensor& x_in, const at::Tensor& dt, const at::Tensor& A,
                     const at::Tensor& B_in, const at::Tensor& C_in,
                     const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& dt_bias,
                     bool dt_softplus, const std::optional<at::Tensor>& initial_state,
                     const at::Tensor& checkpoints_in) {
  check_ssd_bwd_args(grad_y_in, grad_final_state, x_in, dt, A, B_in, C_in, D, dt_bias,
                     initial_state, checkpoints_in, /*check_values=*/true);
  const at::Tensor x = last_dim_contiguous(x_in);
  const at::Tensor grad_y = last_dim_contiguous(grad_y_in);
  const at::Tensor B = last_dim_contiguous(B_in);
  const at::Tensor C = last_dim_contiguous(C_in);
  const at::Tensor checkpoints = checkpoints_in.contiguous();
  const Dims dm(x, B);
  const auto cdt = ssd_compute_dtype(x.scalar_type());
  const auto opts = x.options().dtype(cdt);
  const auto contiguous = at::MemoryFormat::Contiguous;

  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(contiguous));
  at::Tensor grad_B = at::empty(B.sizes(), B.options().memory_format(contiguous));
  at::Tensor grad_C = at::empty(C.sizes(), C.options().memory_format(contiguous));
  at::Tensor gdt = at::zeros({dm.batch, dm.length, dm.heads}, opts);
  at::Tensor gA_bh = at::zeros({dm.batch, dm.heads}, opts);
  at::Tensor gbias_bh = at::zeros({dm.batch, dm.heads}, opts);
  at::Tensor gD_bhp = at::zeros({dm.batch, dm.heads, dm.headdim}, opts);
  at::Tensor gS0 = at::zeros({dm.batch, dm.heads, dm.headdim, dm.dstate}, opts);

  if (gS0.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ssd_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const HeadParams<acc_t> hp(dt, A, D, dt_bias, dm.heads, dm.headdim);
      const Tables<acc_t> tab(dm, hp, dt_softplus, /*reverse=*/true, opts);
      at::Tensor gsf;
      if (grad_final_state.has_value()) gsf = grad_final_state->to(cdt).contiguous();
      at::Tensor cb = at::empty({dm.batch, dm.groups, dm.length}, opts);
      group_dots(dm, Strided4<scalar_t>(B), Strided4<scalar_t>(C), cb.data_ptr<acc_t>());
      const BwdContext<scalar_t, acc_t> ctx{dm,
                                            Strided4<scalar_t>(x),
                                            Strided4<scalar_t>(grad_y),
                                            Strided4<scalar_t>(B),
                                            Strided4<scalar_t>(C),
                                            hp,
                                            tab.t,
                                            gsf.defined() ? gsf.const_data_ptr<acc_t>() : nullptr,
                                            checkpoints.const_data_ptr<acc_t>(),
                                            cb.const_data_ptr<acc_t>()};
      const int64_t BH = dm.batch * dm.heads, L = dm.length;

      const PnSplit s_split = pn_split(dm, dm.batch * dm.groups * dm.chunks);
      at::Tensor gC_acc = at::zeros({s_split.heads, dm.batch, L, dm.groups, dm.dstate}, opts);
      at::Tensor cgc = at::empty({dm.n_tiles, BH, L}, opts);
      at::Tensor fin = at::zeros({dm.n_tiles, BH}, opts);
      state_pass(ctx, gC_acc.data_ptr<acc_t>(), s_split, cgc.data_ptr<acc_t>(),
                 fin.data_ptr<acc_t>());
      reduce_subsets(gC_acc.const_data_ptr<acc_t>(), s_split.heads, dm,
                     grad_C.data_ptr<scalar_t>());
      gC_acc.reset();

      // the G pass owns all n tiles of a head: split over head subsets only
      const PnSplit b_split = pn_split(dm, dm.batch * dm.groups);
      at::Tensor gB_acc = at::zeros({b_split.heads, dm.batch, L, dm.groups, dm.dstate}, opts);
      at::Tensor anchor = at::zeros({dm.n_tiles, BH, dm.chunks}, opts);
      at::Tensor xaq = at::empty({BH, L}, opts), xgy = at::empty({BH, L}, opts);
      grad_pass(ctx, gB_acc.data_ptr<acc_t>(), b_split, gS0.data_ptr<acc_t>(),
                anchor.data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(), xaq.data_ptr<acc_t>(),
                xgy.data_ptr<acc_t>(), gD_bhp.data_ptr<acc_t>());
      reduce_subsets(gB_acc.const_data_ptr<acc_t>(), b_split.heads, dm,
                     grad_B.data_ptr<scalar_t>());
      gB_acc.reset();

      dt_pass(dm, hp, dt_softplus, tab.t, cb.const_data_ptr<acc_t>(), cgc.const_data_ptr<acc_t>(),
              xaq.const_data_ptr<acc_t>(), xgy.const_data_ptr<acc_t>(), fin.const_data_ptr<acc_t>(),
              anchor.const_data_ptr<acc_t>(), gdt.data_ptr<acc_t>(), gA_bh.data_ptr<acc_t>(),
              gbias_bh.data_ptr<acc_t>());
    });
  } else {
    // No state elements (B, H, P or N is 0): y = D x only, so only x and D get gradients.
    grad_B.zero_();
    grad_C.zero_();
    if (D.has_value() && x.numel() > 0) {
      at::Tensor Dc = D->to(cdt);
      if (Dc.dim() == 1) Dc = Dc.view({dm.heads, 1});
      grad_x.copy_(at::mul(grad_y.to(cdt), Dc));
      gD_bhp = at::mul(grad_y.to(cdt), x.to(cdt)).sum(1);
    } else {
      grad_x.zero_();
    }
  }

  at::Tensor grad_D = at::empty({0}, opts), grad_bias = at::empty({0}, opts);
  at::Tensor grad_init = at::empty({0}, opts);
  if (D.has_value()) {
    grad_D = (D->dim() == 1 ? gD_bhp.sum({0, 2}) : gD_bhp.sum(0)).to(D->scalar_type());
  }
  if (dt_bias.has_value()) grad_bias = gbias_bh.sum(0).to(dt_bias->scalar_type());
  if (initial_state.has_value()) grad_init = gS0.to(initial_state->scalar_type());
  return {grad_x,
          gdt.to(dt.scalar_type()),
          gA_bh.sum(0).to(A.scalar_type()),
          grad_B,
          grad_C,
          grad_D,
          grad_bias,
          grad_init};
}

}  // namespace MBLM_CPU_ISA
}  // namespace mblm::cpu_ssd
