// CPU kernels of the attention family (attn_fwd, attn_bwd). Semantics: attention_ref and
// rotary_half_ref in mblm/ops/reference.py.
//
// FlashAttention-style math (online softmax forward; backward from lse, Dao 2023 Alg. 2) with
// every product through the register-blocked micro-kernel of attention_vec.h, fp32 accumulation
// (fp64 for fp64 inputs), rotary and the softmax scale applied while q and k are loaded. Two
// ways of walking the problem, chosen by the sequence length:
// - Local stages (S <= kSingleBlockMaxS; MEGABYTE's local models run N = 8K+ sequences of
//   S = 9..65): a work item is one sequence n and a group of heads. Its rows of q, k, v (and dO)
//   are first copied, in memory order, into per-thread buffers (contiguous reads the hardware
//   prefetcher follows; reading each (n, h) pair's rows directly is latency-bound: 256-byte pieces
//   4 KiB apart). Each head is then a single block: S x S scores in a buffer, no rescaling, and
//   the causal triangle skipped inside the products.
// - Global stages (long S): tiles of queries x keys (kFwdBlockQ / kBwdBlockQ x kBlockK), O(S)
//   memory per thread, never an S x S matrix. The forward runs in parallel over (n, h, query
//   tile); the backward over (n, h) pairs (dK/dV per key tile, dQ in a per-thread buffer: no two
//   threads write one row), or, with fewer pairs than threads, in two passes split by key tile
//   (dK, dV) and by query tile (dQ).
// q, k, v, grad_out and out are read through their strides (stride(-1) == 1).
#include "mblm/attention.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "attention_vec.h"

namespace mblm {

namespace {

using cpu_attn::copy_out;
using cpu_attn::gemm;
using cpu_attn::store_fence;
using cpu_attn::transpose;
using cpu_attn::Tri;
using cpu_attn::Vec;

// Up to this length a head is one block (the S x S fp32 scores are <= 64 KiB).
constexpr int64_t kSingleBlockMaxS = 128;
// Tile sizes (queries x keys) of the global regime; 128-query forward tiles amortise loading and
// transposing each key tile (measured ~10% faster than 64 at S = 2048 on a Zen 4 core).
constexpr int64_t kFwdBlockQ = 128;
constexpr int64_t kBwdBlockQ = 64;
constexpr int64_t kBlockK = 64;
// Local regime: per-thread staging buffers of a work item stay under this many bytes (an L2
// share), which sets how many heads one item takes.
constexpr int64_t kStageBytes = 768 * 1024;
// Outputs of at least this many bytes are written with non-temporal stores (they cannot stay
// in the caches anyway).
constexpr int64_t kStreamBytes = int64_t{32} << 20;
// Work per at::parallel_for chunk, in multiply-adds: tiny problems stay on one thread.
constexpr int64_t kGrainFlops = int64_t{1} << 17;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

inline int64_t grain_for(int64_t flops_per_item) {
  return std::max<int64_t>(1, kGrainFlops / std::max<int64_t>(1, flops_per_item));
}

// Heads per local work item: as many as fit kStageBytes (given bytes per head), balanced.
inline int64_t heads_per_group(int64_t heads, int64_t bytes_per_head) {
  const int64_t fit =
      std::clamp<int64_t>(kStageBytes / std::max<int64_t>(1, bytes_per_head), 1, heads);
  return ceil_div(heads, ceil_div(heads, fit));
}

// Element pointer and strides (in elements) of a (N, S, H, Dh) tensor, stride(-1) == 1.
template <typename T>
struct Rows {
  T* ptr;
  int64_t sn, ss, sh;
  T* row(int64_t n, int64_t s, int64_t h) const { return ptr + n * sn + s * ss + h * sh; }
};

// Prefetches rows [s0, s1) of heads [h0, h0 + gsize) of sequence n.
template <typename T>
inline void prefetch_rows(const Rows<const T>& t, int64_t n, int64_t s0, int64_t s1, int64_t h0,
                          int64_t gsize, int64_t d) {
  for (int64_t s = s0; s < s1; ++s) {
    for (int64_t g = 0; g < gsize; ++g) cpu_attn::prefetch(t.row(n, s, h0 + g), d * sizeof(T));
  }
}

template <typename T>
Rows<const T> rows_of(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
Rows<T> mutable_rows_of(at::Tensor& t) {
  return {t.mutable_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// The rotary tables in the accumulation dtype, (S, Dh) contiguous; cos == nullptr when absent.
template <typename acc_t>
struct Rotary {
  const acc_t* cos = nullptr;
  const acc_t* sin = nullptr;
  int64_t dim = 0;
};

// dst[0:dp] = rotary(src) * scale, zero padded; src is the (Dh,) row at position pos.
// rotary([a, b]) = [a cos - b sin, b cos + a sin] on the two halves (rotary_half_ref).
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, acc_t* dst, int64_t d, int64_t dp,
                     const Rotary<acc_t>& rot, int64_t pos, acc_t scale) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::kWidth;
  const acc_t* x;  // the row in the accumulation type (converted in place into dst)
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    x = src;
  } else {
    cpu_attn::cvt_load(src, dst, d);
    x = dst;
  }
  if (rot.cos != nullptr) {
    const acc_t* c = rot.cos + pos * rot.dim;
    const acc_t* s = rot.sin + pos * rot.dim;
    const int64_t half = d / 2;
    int64_t i = 0;
    if (half % W == 0) {
      const V sv = V::broadcast(scale);
      for (; i < half; i += W) {
        const V a = V::load(x + i), b = V::load(x + half + i);
        ((a * V::load(c + i) - b * V::load(s + i)) * sv).store(dst + i);
        ((b * V::load(c + half + i) + a * V::load(s + half + i)) * sv).store(dst + half + i);
      }
    }
    for (; i < half; ++i) {
      const acc_t a = x[i], b = x[i + half];
      dst[i] = (a * c[i] - b * s[i]) * scale;
      dst[i + half] = (b * c[i + half] + a * s[i + half]) * scale;
    }
  } else {
    for (int64_t i = 0; i < d; ++i) dst[i] = x[i] * scale;
  }
  for (int64_t i = d; i < dp; ++i) dst[i] = acc_t(0);
}

// dst = rotary^T(g) * scale, converted to the storage type. With rotary this is the gradient
// w.r.t. the un-rotated row given the gradient g w.r.t. the rotated one (rotary is linear; its
// transpose flips the signs of the sin terms); without, a scaled store (outputs, dV).
// tmp: a d-element scratch row.
template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* g, scalar_t* dst, int64_t d, const Rotary<acc_t>& rot,
                      int64_t pos, acc_t scale, acc_t* tmp) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::kWidth;
  acc_t* y;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    y = dst;
  } else {
    y = tmp;
  }
  if (rot.cos != nullptr) {
    const acc_t* c = rot.cos + pos * rot.dim;
    const acc_t* s = rot.sin + pos * rot.dim;
    const int64_t half = d / 2;
    int64_t i = 0;
    if (half % W == 0) {
      const V sv = V::broadcast(scale);
      for (; i < half; i += W) {
        const V ga = V::load(g + i), gb = V::load(g + half + i);
        ((ga * V::load(c + i) + gb * V::load(s + half + i)) * sv).store(y + i);
        ((gb * V::load(c + half + i) - ga * V::load(s + i)) * sv).store(y + half + i);
      }
    }
    for (; i < half; ++i) {
      const acc_t ga = g[i], gb = g[i + half];
      y[i] = (ga * c[i] + gb * s[i + half]) * scale;
      y[i + half] = (gb * c[i + half] - ga * s[i]) * scale;
    }
  } else {
    for (int64_t i = 0; i < d; ++i) y[i] = g[i] * scale;
  }
  if constexpr (!std::is_same_v<scalar_t, acc_t>) cpu_attn::cvt_store(y, dst, d);
}

// kt (dp x ldk) = the transpose of rows [0, rows) of kb (leading dimension dp); rows is a
// multiple of the vector width, rows past the real keys are zero, so kt's padding columns are.
template <typename acc_t>
inline void transpose_block(const acc_t* kb, int64_t rows, int64_t dp, acc_t* kt, int64_t ldk) {
  transpose(kb, rows, dp, dp, kt, ldk);
}

// Entries [valid, np) of x become `fill` (np a multiple of the width).
template <typename acc_t>
inline void mask_tail(acc_t* x, int64_t valid, int64_t np, acc_t fill) {
  using V = Vec<acc_t>;
  const V thr = V::broadcast(acc_t(valid)), fv = V::broadcast(fill), iota = V::iota();
  for (int64_t c = valid / V::kWidth * V::kWidth; c < np; c += V::kWidth) {
    select_ge(iota + V::broadcast(acc_t(c)), thr, V::load(x + c), fv).store(x + c);
  }
}

// x[0:np] = 0, np a multiple of the width.
template <typename acc_t>
inline void fill_zero(acc_t* x, int64_t np) {
  for (int64_t c = 0; c < np; c += Vec<acc_t>::kWidth) Vec<acc_t>::zero().store(x + c);
}

template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t np) {
  using V = Vec<acc_t>;
  V m = V::broadcast(-std::numeric_limits<acc_t>::infinity());
  for (int64_t j = 0; j < np; j += V::kWidth) m = max(m, V::load(x + j));
  return m.hmax();
}

// x = exp(x - shift) in place over np (a multiple of the width) entries; returns their sum.
template <typename acc_t>
inline acc_t exp_shift_sum(acc_t* x, int64_t np, acc_t shift) {
  using V = Vec<acc_t>;
  const V sh = V::broadcast(shift);
  V sum = V::zero();
  for (int64_t j = 0; j < np; j += V::kWidth) {
    const V e = (V::load(x + j) - sh).exp();
    e.store(x + j);
    sum = sum + e;
  }
  return sum.sum();
}

template <typename acc_t>
inline acc_t dot(const acc_t* x, const acc_t* y, int64_t np) {
  using V = Vec<acc_t>;
  V acc = V::zero();
  for (int64_t j = 0; j < np; j += V::kWidth) acc = fmadd(V::load(x + j), V::load(y + j), acc);
  return acc.sum();
}

// Number of keys of block [j0, j0 + nk) visible from query i.
inline int64_t visible_keys(bool causal, int64_t i, int64_t j0, int64_t nk) {
  if (!causal) return nk;
  return std::clamp<int64_t>(i - j0 + 1, 0, nk);
}

// The causal structure of the block (queries from i0, mq of them) x (keys from j0, nk of them).
struct BlockMask {
  Tri upper_n = Tri::kNone, upper_k = Tri::kNone, lower_k = Tri::kNone;
  int64_t diag = 0;
  BlockMask(bool causal, int64_t i0, int64_t j0, int64_t nk) : diag(i0 - j0) {
    if (causal && j0 + nk - 1 > i0) {  // some key of the block is after some query
      upper_n = Tri::kNUpper;
      upper_k = Tri::kKUpper;
      lower_k = Tri::kKLower;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

// One (query block, key block) step of the online softmax. qs: (mq x dp) rotated, scaled
// queries; kt: (d x ldk) transposed keys with zero columns up to nkp; vb: (nk x ldv) values;
// o, m, l: the running output (mq x dp), row max and row sum; s: (mq x ldk), mblk: (mq)
// scratch.
template <typename acc_t>
void fwd_block(const acc_t* qs, int64_t mq, int64_t i0, const acc_t* kt, int64_t ldk,
               const acc_t* vb, int64_t ldv, int64_t nk, int64_t j0, int64_t d, int64_t dp,
               bool causal, bool first, acc_t* s, acc_t* mblk, acc_t* o, acc_t* m, acc_t* l) {
  constexpr int64_t W = Vec<acc_t>::kWidth;
  const int64_t nkp = round_up(nk, W);
  const BlockMask mask(causal, i0, j0, nk);
  gemm<acc_t>(mq, nkp, d, qs, dp, 1, kt, ldk, s, ldk, false, mask.upper_n, mask.diag);
  // Two passes over the rows (mask + max, then exp + sum) keep independent rows in flight. Only
  // the vectors holding visible keys are exponentiated; the rest of a row becomes 0.
  for (int64_t r = 0; r < mq; ++r) {
    acc_t* srow = s + r * ldk;
    const int64_t valid = visible_keys(causal, i0 + r, j0, nk);
    mask_tail(srow, valid, round_up(valid, W), -std::numeric_limits<acc_t>::infinity());
    mblk[r] = row_max(srow, round_up(valid, W));
  }
  for (int64_t r = 0; r < mq; ++r) {
    acc_t* srow = s + r * ldk;
    const int64_t vr = round_up(visible_keys(causal, i0 + r, j0, nk), W);
    const acc_t m_new = first ? mblk[r] : std::max(m[r], mblk[r]);
    const acc_t sum = exp_shift_sum(srow, vr, m_new);
    fill_zero(srow + vr, nkp - vr);
    if (first) {
      l[r] = sum;
    } else {
      // Rescale what was accumulated under the old row max.
      const acc_t alpha = std::exp(m[r] - m_new);
      l[r] = l[r] * alpha + sum;
      if (alpha != acc_t(1)) {
        using V = Vec<acc_t>;
        const V av = V::broadcast(alpha);
        acc_t* orow = o + r * dp;
        for (int64_t c = 0; c < dp; c += W) (V::load(orow + c) * av).store(orow + c);
      }
    }
    m[r] = m_new;
  }
  gemm<acc_t>(mq, dp, nk, s, ldk, 1, vb, ldv, o, dp, !first, mask.upper_k, mask.diag);
}

template <typename scalar_t>
struct FwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Rows<const scalar_t> q, k, v;
  Rows<scalar_t> out;
  acc_t* lse;  // (N, H, S) contiguous
  Rotary<acc_t> rot;
  int64_t n_seq, seq, heads, d;
  bool causal;
  acc_t scale;
};

// Local regime: one item = sequence n x a group of heads, each head a single block.
template <typename scalar_t>
void attn_fwd_local(const FwdArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = Vec<acc_t>::kWidth;
  const int64_t seq = a.seq, d = a.d, dp = round_up(d, W), sp = round_up(seq, W);
  const int64_t head_bytes =
      3 * seq * dp * int64_t(sizeof(acc_t)) + seq * d * int64_t(sizeof(scalar_t));
  const int64_t group = heads_per_group(a.heads, head_bytes);
  const int64_t n_groups = ceil_div(a.heads, group);
  const int64_t flops = group * 2 * seq * (a.causal ? (seq + W) / 2 : sp) * dp;
  const bool stream = a.n_seq * seq * a.heads * d * int64_t(sizeof(scalar_t)) >= kStreamBytes;
  at::parallel_for(0, a.n_seq * n_groups, grain_for(flops), [&](int64_t begin, int64_t end) {
    // Per-chunk (never per-item) buffers: the group's rotated scaled q, rotated k and v rows
    // (head-major, S x dp each), the output rows in memory order, and one head's K^T, scores,
    // output accumulator and row statistics.
    // kb's rows past seq stay zero, so K^T's padding columns are zero.
    std::vector<acc_t> qb(group * seq * dp), kb(group * sp * dp), vb(group * seq * dp), kt(dp * sp),
        sb(seq * sp), ob(seq * dp), mb(seq), lb(seq), mblk(seq), tmp(dp);
    std::vector<scalar_t> out_stage(seq * group * d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / n_groups, h0 = (item % n_groups) * group;
      const int64_t gsize = std::min(group, a.heads - h0);
      for (int64_t s = 0; s < seq; ++s) {
        for (int64_t g = 0; g < gsize; ++g) {
          const int64_t off = (g * seq + s) * dp;
          load_row(a.q.row(n, s, h0 + g), qb.data() + off, d, dp, a.rot, s, a.scale);
          load_row(a.k.row(n, s, h0 + g), kb.data() + (g * sp + s) * dp, d, dp, a.rot, s, acc_t(1));
          load_row(a.v.row(n, s, h0 + g), vb.data() + off, d, dp, Rotary<acc_t>{}, 0, acc_t(1));
        }
      }
      // The next item's rows are fetched while this one computes, a share before each head.
      const int64_t nn = (item + 1) / n_groups, nh0 = ((item + 1) % n_groups) * group;
      const int64_t ngsize = item + 1 < end ? std::min(group, a.heads - nh0) : 0;
      for (int64_t g = 0; g < gsize; ++g) {
        const int64_t off = g * seq * dp;
        const int64_t ps0 = g * seq / gsize, ps1 = (g + 1) * seq / gsize;
        prefetch_rows(a.q, nn, ps0, ps1, nh0, ngsize, d);
        prefetch_rows(a.k, nn, ps0, ps1, nh0, ngsize, d);
        prefetch_rows(a.v, nn, ps0, ps1, nh0, ngsize, d);
        transpose_block(kb.data() + g * sp * dp, sp, dp, kt.data(), sp);
        fwd_block(qb.data() + off, seq, 0, kt.data(), sp, vb.data() + off, dp, seq, 0, d, dp,
                  a.causal, true, sb.data(), mblk.data(), ob.data(), mb.data(), lb.data());
        acc_t* lse = a.lse + (n * a.heads + h0 + g) * seq;
        for (int64_t s = 0; s < seq; ++s) {
          const acc_t inv = acc_t(1) / lb[s];
          const acc_t* orow = ob.data() + s * dp;
          scalar_t* dst = out_stage.data() + (s * group + g) * d;
          store_row(orow, dst, d, Rotary<acc_t>{}, 0, inv, tmp.data());
          lse[s] = mb[s] + std::log(lb[s]);
        }
      }
      for (int64_t s = 0; s < seq; ++s) {
        copy_out(a.out.row(n, s, h0), out_stage.data() + s * group * d,
                 gsize * d * sizeof(scalar_t), stream);
      }
    }
    store_fence();
  });
}

// Global regime: one item = (n, h, query block); key blocks stream past with online softmax.
template <typename scalar_t>
void attn_fwd_tiled(const FwdArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = Vec<acc_t>::kWidth;
  const int64_t seq = a.seq, d = a.d, dp = round_up(d, W);
  const int64_t bq = kFwdBlockQ, bk = kBlockK, bkp = round_up(bk, W);
  const int64_t n_qblocks = ceil_div(seq, bq);
  const int64_t flops = 2 * bq * (a.causal ? seq / 2 : seq) * dp;
  at::parallel_for(
      0, a.n_seq * a.heads * n_qblocks, grain_for(flops), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> qb(bq * dp), kb(bkp * dp), kt(dp * bkp), vb(bk * dp), sb(bq * bkp),
            ob(bq * dp), mb(bq), lb(bq), mblk(bq), tmp(dp);
        for (int64_t item = begin; item < end; ++item) {
          // Query blocks in the order 0, last, 1, last - 1, ...: with a causal mask their costs
          // differ, and each thread's contiguous range of items then gets a fair mix.
          const int64_t t = item % n_qblocks, pair = item / n_qblocks;
          const int64_t qblk = t % 2 == 0 ? t / 2 : n_qblocks - 1 - t / 2;
          const int64_t h = pair % a.heads, n = pair / a.heads;
          const int64_t i0 = qblk * bq, mq = std::min(bq, seq - i0);
          for (int64_t r = 0; r < mq; ++r) {
            load_row(a.q.row(n, i0 + r, h), qb.data() + r * dp, d, dp, a.rot, i0 + r, a.scale);
          }
          const int64_t kend = a.causal ? i0 + mq : seq;
          for (int64_t j0 = 0; j0 < kend; j0 += bk) {
            const int64_t nk = std::min(bk, kend - j0);
            for (int64_t c = 0; c < nk; ++c) {
              load_row(a.k.row(n, j0 + c, h), kb.data() + c * dp, d, dp, a.rot, j0 + c, acc_t(1));
              load_row(a.v.row(n, j0 + c, h), vb.data() + c * dp, d, dp, Rotary<acc_t>{}, 0,
                       acc_t(1));
            }
            const int64_t nkp = round_up(nk, W);
            std::fill(kb.data() + nk * dp, kb.data() + nkp * dp, acc_t(0));
            transpose_block(kb.data(), nkp, dp, kt.data(), bkp);
            fwd_block(qb.data(), mq, i0, kt.data(), bkp, vb.data(), dp, nk, j0, d, dp, a.causal,
                      j0 == 0, sb.data(), mblk.data(), ob.data(), mb.data(), lb.data());
          }
          acc_t* lse = a.lse + (n * a.heads + h) * seq + i0;
          for (int64_t r = 0; r < mq; ++r) {
            const acc_t inv = acc_t(1) / lb[r];
            const acc_t* orow = ob.data() + r * dp;
            scalar_t* dst = a.out.row(n, i0 + r, h);
            store_row(orow, dst, d, Rotary<acc_t>{}, 0, inv, tmp.data());
            lse[r] = mb[r] + std::log(lb[r]);
          }
        }
      });
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

// Which gradients a backward block step accumulates.
constexpr int kGradKV = 1, kGradQ = 2;

// One (query block, key block) step of the backward. qs: (mq x dp) rotated scaled queries; go:
// (mq x dp) dO; dvec, lvec: D = rowsum(dO * O) and lse of the mq queries. With compute_d (only
// when this block holds every key of its queries) D is computed here as rowsum(P * dP), which
// equals dO . O = dO . sum_j P_j V_j without reading O. kt, vt: (d x ldk)
// transposed rotated keys / values (zero columns up to nkp); kr: (nk x dp) rotated keys.
// Accumulates dq (mq x dp, w.r.t. the scaled rotated q), dk, dv (nk x dp); p, ds: (mq x ldk)
// scratch.
template <typename acc_t>
void bwd_block(const acc_t* qs, const acc_t* go, acc_t* dvec, bool compute_d, const acc_t* lvec,
               int64_t mq, int64_t i0, const acc_t* kt, const acc_t* vt, int64_t ldk,
               const acc_t* kr, int64_t nk, int64_t j0, int64_t d, int64_t dp, bool causal,
               bool first_q, bool first_k, acc_t* p, acc_t* ds, acc_t* dq, acc_t* dk, acc_t* dv,
               int parts = kGradKV | kGradQ) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::kWidth;
  const int64_t nkp = round_up(nk, W);
  const BlockMask mask(causal, i0, j0, nk);
  // P = exp(Qs . K^T - lse) (masked entries 0); dP = dO . V^T.
  gemm<acc_t>(mq, nkp, d, qs, dp, 1, kt, ldk, p, ldk, false, mask.upper_n, mask.diag);
  gemm<acc_t>(mq, nkp, d, go, dp, 1, vt, ldk, ds, ldk, false, mask.upper_n, mask.diag);
  for (int64_t r = 0; r < mq; ++r) {
    acc_t* prow = p + r * ldk;
    acc_t* dsrow = ds + r * ldk;
    const int64_t valid = visible_keys(causal, i0 + r, j0, nk), vr = round_up(valid, W);
    mask_tail(prow, valid, vr, -std::numeric_limits<acc_t>::infinity());
    exp_shift_sum(prow, vr, lvec[r]);
    fill_zero(prow + vr, nkp - vr);
    if (compute_d) dvec[r] = dot(prow, dsrow, vr);
    // dS = P * (dP - D), in place of dP (masked entries: P = 0 so dS = 0).
    const V dvr = V::broadcast(dvec[r]);
    for (int64_t c = 0; c < vr; c += W) {
      (V::load(prow + c) * (V::load(dsrow + c) - dvr)).store(dsrow + c);
    }
    fill_zero(dsrow + vr, nkp - vr);
  }
  // dV += P^T . dO;  dK += dS^T . Qs;  dQs += dS . K.
  if (parts & kGradKV) {
    gemm<acc_t>(nk, dp, mq, p, 1, ldk, go, dp, dv, dp, !first_k, mask.lower_k, mask.diag);
    gemm<acc_t>(nk, dp, mq, ds, 1, ldk, qs, dp, dk, dp, !first_k, mask.lower_k, mask.diag);
  }
  if (parts & kGradQ) {
    gemm<acc_t>(mq, dp, nk, ds, ldk, 1, kr, dp, dq, dp, !first_q, mask.upper_k, mask.diag);
  }
}

template <typename scalar_t>
struct BwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Rows<const scalar_t> g, q, k, v, o;
  const acc_t* lse;
  int64_t lse_sn, lse_sh, lse_ss;
  Rows<scalar_t> dq, dk, dv;
  Rotary<acc_t> rot;
  int64_t n_seq, seq, heads, d;
  bool causal;
  acc_t scale;
};

// Loads the rows of q (rotated, scaled) and dO and the lse at position s of head (n, h); with
// orow_buf (a dp scratch row) also D = rowsum(dO * O).
template <typename scalar_t>
inline void load_bwd_row(const BwdArgs<scalar_t>& a, int64_t n, int64_t s, int64_t h,
                         at::opmath_type<scalar_t>* qrow, at::opmath_type<scalar_t>* grow,
                         at::opmath_type<scalar_t>& dval, at::opmath_type<scalar_t>& lval,
                         at::opmath_type<scalar_t>* orow_buf, int64_t dp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d = a.d;
  load_row(a.q.row(n, s, h), qrow, d, dp, a.rot, s, a.scale);
  load_row(a.g.row(n, s, h), grow, d, dp, Rotary<acc_t>{}, 0, acc_t(1));
  if (orow_buf != nullptr) {
    load_row(a.o.row(n, s, h), orow_buf, d, dp, Rotary<acc_t>{}, 0, acc_t(1));
    dval = dot(grow, orow_buf, dp);
  }
  lval = a.lse[n * a.lse_sn + h * a.lse_sh + s * a.lse_ss];
}

// Local regime: one item = sequence n x a group of heads, each head a single block.
template <typename scalar_t>
void attn_bwd_local(const BwdArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = Vec<acc_t>::kWidth;
  const int64_t seq = a.seq, d = a.d, dp = round_up(d, W), sp = round_up(seq, W);
  const int64_t head_bytes = 4 * seq * dp * int64_t(sizeof(acc_t)) +
                             3 * seq * d * int64_t(sizeof(scalar_t)) + 2 * seq * sizeof(acc_t);
  const int64_t group = heads_per_group(a.heads, head_bytes);
  const int64_t n_groups = ceil_div(a.heads, group);
  const int64_t flops = group * 5 * seq * (a.causal ? (seq + W) / 2 : sp) * dp;
  const bool stream = a.n_seq * seq * a.heads * d * int64_t(sizeof(scalar_t)) >= kStreamBytes;
  at::parallel_for(0, a.n_seq * n_groups, grain_for(flops), [&](int64_t begin, int64_t end) {
    // kb's and vb's rows past seq stay zero, so K^T's and V^T's padding columns are.
    std::vector<acc_t> qb(group * seq * dp), kb(group * sp * dp), vb(group * sp * dp),
        gb(group * seq * dp), dvec(group * seq), lvec(group * seq), kt(dp * sp), vt(dp * sp),
        pb(seq * sp), dsb(seq * sp), dqb(seq * dp), dkb(seq * dp), dvb(seq * dp), tmp(dp);
    std::vector<scalar_t> dq_stage(seq * group * d), dk_stage(seq * group * d),
        dv_stage(seq * group * d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / n_groups, h0 = (item % n_groups) * group;
      const int64_t gsize = std::min(group, a.heads - h0);
      for (int64_t s = 0; s < seq; ++s) {
        for (int64_t g = 0; g < gsize; ++g) {
          const int64_t off = (g * seq + s) * dp, poff = (g * sp + s) * dp;
          load_bwd_row(a, n, s, h0 + g, qb.data() + off, gb.data() + off, dvec[g * seq + s],
                       lvec[g * seq + s], nullptr, dp);
          load_row(a.k.row(n, s, h0 + g), kb.data() + poff, d, dp, a.rot, s, acc_t(1));
          load_row(a.v.row(n, s, h0 + g), vb.data() + poff, d, dp, Rotary<acc_t>{}, 0, acc_t(1));
        }
      }
      const int64_t nn = (item + 1) / n_groups, nh0 = ((item + 1) % n_groups) * group;
      const int64_t ngsize = item + 1 < end ? std::min(group, a.heads - nh0) : 0;
      for (int64_t g = 0; g < gsize; ++g) {
        const int64_t off = g * seq * dp;
        const int64_t ps0 = g * seq / gsize, ps1 = (g + 1) * seq / gsize;
        prefetch_rows(a.q, nn, ps0, ps1, nh0, ngsize, d);
        prefetch_rows(a.k, nn, ps0, ps1, nh0, ngsize, d);
        prefetch_rows(a.v, nn, ps0, ps1, nh0, ngsize, d);
        prefetch_rows(a.g, nn, ps0, ps1, nh0, ngsize, d);
        const int64_t poff = g * sp * dp;
        transpose_block(kb.data() + poff, sp, dp, kt.data(), sp);
        transpose_block(vb.data() + poff, sp, dp, vt.data(), sp);
        bwd_block(qb.data() + off, gb.data() + off, dvec.data() + g * seq, true,
                  lvec.data() + g * seq, seq, 0, kt.data(), vt.data(), sp, kb.data() + poff, seq, 0,
                  d, dp, a.causal, true, true, pb.data(), dsb.data(), dqb.data(), dkb.data(),
                  dvb.data());
        for (int64_t s = 0; s < seq; ++s) {
          const int64_t so = (s * group + g) * d;
          store_row(dqb.data() + s * dp, dq_stage.data() + so, d, a.rot, s, a.scale, tmp.data());
          store_row(dkb.data() + s * dp, dk_stage.data() + so, d, a.rot, s, acc_t(1), tmp.data());
          store_row(dvb.data() + s * dp, dv_stage.data() + so, d, Rotary<acc_t>{}, s, acc_t(1),
                    tmp.data());
        }
      }
      const int64_t bytes = gsize * d * sizeof(scalar_t);
      for (int64_t s = 0; s < seq; ++s) {
        copy_out(a.dq.row(n, s, h0), dq_stage.data() + s * group * d, bytes, stream);
        copy_out(a.dk.row(n, s, h0), dk_stage.data() + s * group * d, bytes, stream);
        copy_out(a.dv.row(n, s, h0), dv_stage.data() + s * group * d, bytes, stream);
      }
    }
    store_fence();
  });
}

// Global regime: one item = (n, h) pair; key blocks outer, query blocks inner.
template <typename scalar_t>
void attn_bwd_tiled(const BwdArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = Vec<acc_t>::kWidth;
  const int64_t seq = a.seq, d = a.d, dp = round_up(d, W);
  const int64_t bq = kBwdBlockQ, bk = kBlockK, bkp = round_up(bk, W);
  const int64_t flops = 5 * seq * (a.causal ? seq / 2 : seq) * dp;
  at::parallel_for(0, a.n_seq * a.heads, grain_for(flops), [&](int64_t begin, int64_t end) {
    // Whole-pair rows (O(S) per thread): rotated scaled q, rotated k, dO, the dQ accumulator, D
    // and lse; per key block: V rows, K^T, V^T, the dK / dV accumulators; per block pair: P, dS.
    // kb's rows past seq (up to the vector width) stay zero, so K^T's padding columns are.
    std::vector<acc_t> qb(seq * dp), kb(round_up(seq, W) * dp), gb(seq * dp), dqb(seq * dp),
        dvec(seq), lvec(seq), vb(bkp * dp), kt(dp * bkp), vt(dp * bkp), dkb(bk * dp), dvb(bk * dp),
        pb(bq * bkp), dsb(bq * bkp), orow(dp), tmp(dp);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t h = pair % a.heads, n = pair / a.heads;
      for (int64_t s = 0; s < seq; ++s) {
        load_bwd_row(a, n, s, h, qb.data() + s * dp, gb.data() + s * dp, dvec[s], lvec[s],
                     orow.data(), dp);
        load_row(a.k.row(n, s, h), kb.data() + s * dp, d, dp, a.rot, s, acc_t(1));
      }
      for (int64_t j0 = 0; j0 < seq; j0 += bk) {
        const int64_t nk = std::min(bk, seq - j0), nkp = round_up(nk, W);
        for (int64_t c = 0; c < nk; ++c) {
          load_row(a.v.row(n, j0 + c, h), vb.data() + c * dp, d, dp, Rotary<acc_t>{}, 0, acc_t(1));
        }
        std::fill(vb.data() + nk * dp, vb.data() + nkp * dp, acc_t(0));
        transpose_block(kb.data() + j0 * dp, nkp, dp, kt.data(), bkp);
        transpose_block(vb.data(), nkp, dp, vt.data(), bkp);
        // Causal: queries before j0 see none of these keys.
        const int64_t i_start = a.causal ? j0 / bq * bq : 0;
        for (int64_t i0 = i_start; i0 < seq; i0 += bq) {
          const int64_t mq = std::min(bq, seq - i0);
          bwd_block(qb.data() + i0 * dp, gb.data() + i0 * dp, dvec.data() + i0, false,
                    lvec.data() + i0, mq, i0, kt.data(), vt.data(), bkp, kb.data() + j0 * dp, nk,
                    j0, d, dp, a.causal, j0 == 0, i0 == i_start, pb.data(), dsb.data(),
                    dqb.data() + i0 * dp, dkb.data(), dvb.data());
        }
        for (int64_t c = 0; c < nk; ++c) {
          store_row(dkb.data() + c * dp, a.dk.row(n, j0 + c, h), d, a.rot, j0 + c, acc_t(1),
                    tmp.data());
          store_row(dvb.data() + c * dp, a.dv.row(n, j0 + c, h), d, Rotary<acc_t>{}, 0, acc_t(1),
                    tmp.data());
        }
      }
      for (int64_t s = 0; s < seq; ++s) {
        store_row(dqb.data() + s * dp, a.dq.row(n, s, h), d, a.rot, s, a.scale, tmp.data());
      }
    }
  });
}

// Global regime with fewer (n, h) pairs than a thread pair each: FlashAttention-2's split, which
// parallelises inside a pair. Pass A: one item per (pair, key block) accumulates dK and dV over
// the query blocks; pass B: one item per (pair, query block) accumulates dQ over the key blocks.
// P and dP are computed in both (7 products per block pair instead of 5), no thread idles.
template <typename scalar_t>
void attn_bwd_tiled_split(const BwdArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = Vec<acc_t>::kWidth;
  const int64_t seq = a.seq, d = a.d, dp = round_up(d, W);
  const int64_t bq = kBwdBlockQ, bk = kBlockK, bkp = round_up(bk, W);
  const int64_t pairs = a.n_seq * a.heads;
  const int64_t n_kblocks = ceil_div(seq, bk), n_qblocks = ceil_div(seq, bq);
  // Loads key block j0 (nk rows): rotated K and its transpose, V's transpose.
  auto load_kv_block = [&](int64_t n, int64_t h, int64_t j0, int64_t nk, acc_t* kb, acc_t* vb,
                           acc_t* kt, acc_t* vt) {
    const int64_t nkp = round_up(nk, W);
    for (int64_t c = 0; c < nk; ++c) {
      load_row(a.k.row(n, j0 + c, h), kb + c * dp, d, dp, a.rot, j0 + c, acc_t(1));
      load_row(a.v.row(n, j0 + c, h), vb + c * dp, d, dp, Rotary<acc_t>{}, 0, acc_t(1));
    }
    std::fill(kb + nk * dp, kb + nkp * dp, acc_t(0));
    std::fill(vb + nk * dp, vb + nkp * dp, acc_t(0));
    transpose_block(kb, nkp, dp, kt, bkp);
    transpose_block(vb, nkp, dp, vt, bkp);
  };
  // Block orders 0, last, 1, last - 1, ...: causal costs differ per block; each thread's
  // contiguous range of items gets a fair mix.
  auto zigzag = [](int64_t t, int64_t count) { return t % 2 == 0 ? t / 2 : count - 1 - t / 2; };

  const int64_t flops_a = 4 * bk * (a.causal ? seq / 2 : seq) * dp;
  at::parallel_for(0, pairs * n_kblocks, grain_for(flops_a), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qb(seq * dp), gb(seq * dp), dvec(seq), lvec(seq), kb(bkp * dp), vb(bkp * dp),
        kt(dp * bkp), vt(dp * bkp), dkb(bk * dp), dvb(bk * dp), pb(bq * bkp), dsb(bq * bkp),
        orow(dp), tmp(dp);
    int64_t staged = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pair = item / n_kblocks, h = pair % a.heads, n = pair / a.heads;
      const int64_t j0 = zigzag(item % n_kblocks, n_kblocks) * bk, nk = std::min(bk, seq - j0);
      if (pair != staged) {
        for (int64_t s = 0; s < seq; ++s) {
          load_bwd_row(a, n, s, h, qb.data() + s * dp, gb.data() + s * dp, dvec[s], lvec[s],
                       orow.data(), dp);
        }
        staged = pair;
      }
      load_kv_block(n, h, j0, nk, kb.data(), vb.data(), kt.data(), vt.data());
      const int64_t i_start = a.causal ? j0 / bq * bq : 0;
      for (int64_t i0 = i_start; i0 < seq; i0 += bq) {
        bwd_block(qb.data() + i0 * dp, gb.data() + i0 * dp, dvec.data() + i0, false,
                  lvec.data() + i0, std::min(bq, seq - i0), i0, kt.data(), vt.data(), bkp,
                  kb.data(), nk, j0, d, dp, a.causal, false, i0 == i_start, pb.data(), dsb.data(),
                  static_cast<acc_t*>(nullptr), dkb.data(), dvb.data(), kGradKV);
      }
      for (int64_t c = 0; c < nk; ++c) {
        store_row(dkb.data() + c * dp, a.dk.row(n, j0 + c, h), d, a.rot, j0 + c, acc_t(1),
                  tmp.data());
        store_row(dvb.data() + c * dp, a.dv.row(n, j0 + c, h), d, Rotary<acc_t>{}, 0, acc_t(1),
                  tmp.data());
      }
    }
  });

  const int64_t flops_b = 3 * bq * (a.causal ? seq / 2 : seq) * dp;
  at::parallel_for(0, pairs * n_qblocks, grain_for(flops_b), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qb(bq * dp), gb(bq * dp), dvec(bq), lvec(bq), kb(bkp * dp), vb(bkp * dp),
        kt(dp * bkp), vt(dp * bkp), dqb(bq * dp), pb(bq * bkp), dsb(bq * bkp), orow(dp), tmp(dp);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pair = item / n_qblocks, h = pair % a.heads, n = pair / a.heads;
      const int64_t i0 = zigzag(item % n_qblocks, n_qblocks) * bq, mq = std::min(bq, seq - i0);
      for (int64_t r = 0; r < mq; ++r) {
        load_bwd_row(a, n, i0 + r, h, qb.data() + r * dp, gb.data() + r * dp, dvec[r], lvec[r],
                     orow.data(), dp);
      }
      const int64_t kend = a.causal ? i0 + mq : seq;
      for (int64_t j0 = 0; j0 < kend; j0 += bk) {
        const int64_t nk = std::min(bk, kend - j0);
        load_kv_block(n, h, j0, nk, kb.data(), vb.data(), kt.data(), vt.data());
        bwd_block(qb.data(), gb.data(), dvec.data(), false, lvec.data(), mq, i0, kt.data(),
                  vt.data(), bkp, kb.data(), nk, j0, d, dp, a.causal, j0 == 0, false, pb.data(),
                  dsb.data(), dqb.data(), static_cast<acc_t*>(nullptr),
                  static_cast<acc_t*>(nullptr), kGradQ);
      }
      for (int64_t r = 0; r < mq; ++r) {
        store_row(dqb.data() + r * dp, a.dq.row(n, i0 + r, h), d, a.rot, i0 + r, a.scale,
                  tmp.data());
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// entry points
// ---------------------------------------------------------------------------------------------

// cos / sin in the accumulation dtype (a no-op for the usual float32 tables).
std::pair<at::Tensor, at::Tensor> rotary_tables(const std::optional<at::Tensor>& cos,
                                                const std::optional<at::Tensor>& sin,
                                                at::ScalarType acc) {
  if (!cos.has_value()) return {};
  return {cos->to(acc).contiguous(), sin->to(acc).contiguous()};
}

template <typename acc_t>
Rotary<acc_t> make_rotary(const std::pair<at::Tensor, at::Tensor>& tables) {
  Rotary<acc_t> rot;
  if (tables.first.defined()) {
    rot.cos = tables.first.const_data_ptr<acc_t>();
    rot.sin = tables.second.const_data_ptr<acc_t>();
    rot.dim = tables.first.size(1);
  }
  return rot;
}

// Asks the kernel to back a large fresh output with transparent huge pages (what torch's own
// allocator does under THP_MEM_ALLOC_ENABLE=1): the kernels write every byte of their outputs,
// and first-touch page faults on 4 KiB pages cost as much as the attention itself on some VMs.
// Only the 2 MiB-aligned interior of the buffer is advised; failures are harmless.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const int64_t bytes = t.numel() * t.element_size();
  if (bytes < int64_t{8} << 20) return;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (start + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

at::ScalarType acc_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v,
                                                const std::optional<at::Tensor>& cos,
                                                const std::optional<at::Tensor>& sin, bool causal,
                                                double scale) {
  check_attn_fwd_args(q, k, v, cos, sin);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(acc_dtype(q)));
  if (lse.numel() == 0) return {out, lse};
  advise_huge_pages(out);
  const auto tables = rotary_tables(cos, sin, acc_dtype(q));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attn_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FwdArgs<scalar_t> args{rows_of<scalar_t>(q),
                                 rows_of<scalar_t>(k),
                                 rows_of<scalar_t>(v),
                                 mutable_rows_of<scalar_t>(out),
                                 lse.mutable_data_ptr<acc_t>(),
                                 make_rotary<acc_t>(tables),
                                 q.size(0),
                                 q.size(1),
                                 q.size(2),
                                 q.size(3),
                                 causal,
                                 static_cast<acc_t>(scale)};
    if (args.seq <= kSingleBlockMaxS) {
      attn_fwd_local(args);
    } else {
      attn_fwd_tiled(args);
    }
  });
  return {out, lse};
}

// Runs the backward into grad_q / grad_k / grad_v (fresh tensors of q's shape, any strides with
// stride(-1) == 1: the packed (N, S, 2, H, Dh) gradient of attn_kv_bwd passes two views of one).
void attn_bwd_cpu_into(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                       const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                       bool causal, double scale, at::Tensor& grad_q, at::Tensor& grad_k,
                       at::Tensor& grad_v) {
  if (lse.numel() == 0) return;
  const auto tables = rotary_tables(cos, sin, acc_dtype(q));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attn_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BwdArgs<scalar_t> args{rows_of<scalar_t>(grad_out),
                                 rows_of<scalar_t>(q),
                                 rows_of<scalar_t>(k),
                                 rows_of<scalar_t>(v),
                                 rows_of<scalar_t>(out),
                                 lse.const_data_ptr<acc_t>(),
                                 lse.stride(0),
                                 lse.stride(1),
                                 lse.stride(2),
                                 mutable_rows_of<scalar_t>(grad_q),
                                 mutable_rows_of<scalar_t>(grad_k),
                                 mutable_rows_of<scalar_t>(grad_v),
                                 make_rotary<acc_t>(tables),
                                 q.size(0),
                                 q.size(1),
                                 q.size(2),
                                 q.size(3),
                                 causal,
                                 static_cast<acc_t>(scale)};
    if (args.seq <= kSingleBlockMaxS) {
      attn_bwd_local(args);
    } else if (args.n_seq * args.heads < 2 * at::get_num_threads()) {
      attn_bwd_tiled_split(args);
    } else {
      attn_bwd_tiled(args);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin, bool causal, double scale) {
  check_attn_bwd_args(grad_out, q, k, v, out, lse, cos, sin);
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  auto grad_q = at::empty(q.sizes(), opts);
  auto grad_k = at::empty(q.sizes(), opts);
  auto grad_v = at::empty(q.sizes(), opts);
  if (lse.numel() == 0) return {grad_q, grad_k, grad_v};
  advise_huge_pages(grad_q);
  advise_huge_pages(grad_k);
  advise_huge_pages(grad_v);
  attn_bwd_cpu_into(grad_out, q, k, v, out, lse, cos, sin, causal, scale, grad_q, grad_k, grad_v);
  return {grad_q, grad_k, grad_v};
}

std::tuple<at::Tensor, at::Tensor> attn_kv_fwd_cpu(const at::Tensor& q, const at::Tensor& kv,
                                                   const std::optional<at::Tensor>& cos,
                                                   const std::optional<at::Tensor>& sin,
                                                   bool causal, double scale) {
  check_attn_kv_args(q, kv);
  return attn_fwd_cpu(q, kv.select(2, 0), kv.select(2, 1), cos, sin, causal, scale);
}

// The gradients of k and v land in the two halves of one (N, S, 2, H, Dh) tensor: the gradient
// of the to_kv projection's output as it is, with no concatenation.
std::tuple<at::Tensor, at::Tensor> attn_kv_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                   const at::Tensor& kv, const at::Tensor& out,
                                                   const at::Tensor& lse,
                                                   const std::optional<at::Tensor>& cos,
                                                   const std::optional<at::Tensor>& sin,
                                                   bool causal, double scale) {
  check_attn_kv_args(q, kv);
  const at::Tensor k = kv.select(2, 0), v = kv.select(2, 1);
  check_attn_bwd_args(grad_out, q, k, v, out, lse, cos, sin);
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  auto grad_q = at::empty(q.sizes(), opts);
  auto grad_kv = at::empty(kv.sizes(), opts);
  if (lse.numel() == 0) return {grad_q, grad_kv};
  advise_huge_pages(grad_q);
  advise_huge_pages(grad_kv);
  auto grad_k = grad_kv.select(2, 0), grad_v = grad_kv.select(2, 1);
  attn_bwd_cpu_into(grad_out, q, k, v, out, lse, cos, sin, causal, scale, grad_q, grad_k, grad_v);
  return {grad_q, grad_kv};
}

}  // namespace

TORCH_LIBRARY_IMPL(mblm, CPU, m) {
  m.impl("attn_fwd", &attn_fwd_cpu);
  m.impl("attn_bwd", &attn_bwd_cpu);
  m.impl("attn_kv_fwd", &attn_kv_fwd_cpu);
  m.impl("attn_kv_bwd", &attn_kv_bwd_cpu);
}

}  // namespace mblm
