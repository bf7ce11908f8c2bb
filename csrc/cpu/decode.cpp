// CPU kernel of the decode family (attn_decode). Semantics: attn_decode_ref in
// mblm/ops/reference.py.
//
// Two passes: first the new keys (rotated) and values are written into the caches, then every
// (row, head, block of up to kBlockQ new queries) attends to its cache row with an online
// softmax over tiles of kBlockK keys. Products go through the register-blocked micro-kernel of
// attention_vec.h, in fp32 (fp64 for fp64 inputs); the softmax scale and the rotary embedding are
// applied while the queries are loaded. With one new position per row (generation), a work item
// is one (row, head) pair reading lens + 1 cached keys.
#include "mblm/decode.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_vec.h"

namespace mblm {

namespace {

using cpu_attn::gemm;
using cpu_attn::transpose;
using cpu_attn::Vec;

// Up to this many new positions per row, every query reads its keys directly (attend_few);
// more (prefill, chunked scoring) take query blocks x key tiles through the GEMM micro-kernel.
constexpr int64_t kFewQueries = 4;
constexpr int64_t kBlockQ = 32;
constexpr int64_t kBlockK = 64;
// Work per at::parallel_for chunk, in multiply-adds: small problems stay on one thread.
constexpr int64_t kGrainFlops = int64_t{1} << 16;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// Element pointer and strides (in elements) of a 4-D tensor with stride(-1) == 1.
template <typename T>
struct Rows4 {
  T* ptr;
  int64_t s0, s1, s2;
  T* row(int64_t a, int64_t b, int64_t c) const { return ptr + a * s0 + b * s1 + c * s2; }
};

template <typename T>
Rows4<T> rows4(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// dst[0:d] = rotary(src) * scale in the accumulation type; the rotary tables are rows of (Dh,)
// (nullptr: none). rotary([a, b]) = [a cos - b sin, b cos + a sin] on the two halves.
template <typename scalar_t, typename acc_t>
inline void load_rotated(const scalar_t* src, acc_t* dst, int64_t d, const acc_t* c, const acc_t* s,
                         acc_t scale) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(src, src + d, dst);
  } else {
    cpu_attn::cvt_load(src, dst, d);
  }
  if (c != nullptr) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; ++i) {
      const acc_t a = dst[i], b = dst[i + half];
      dst[i] = (a * c[i] - b * s[i]) * scale;
      dst[i + half] = (b * c[i + half] + a * s[i + half]) * scale;
    }
  } else if (scale != acc_t(1)) {
    for (int64_t i = 0; i < d; ++i) dst[i] *= scale;
  }
}

template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* src, scalar_t* dst, int64_t d) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(src, src + d, dst);
  } else {
    cpu_attn::cvt_store(src, dst, d);
  }
}

template <typename scalar_t>
struct DecodeArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Rows4<const scalar_t> q, k, v;
  Rows4<scalar_t> k_cache, v_cache, out;
  const int64_t* lens;
  const int64_t* rows;  // nullptr: row r
  const acc_t* cos;     // (R, S, Dh) contiguous, or nullptr
  const acc_t* sin;
  int64_t n_rows, seq, heads, dim;
  acc_t scale;

  int64_t cache_row(int64_t r) const { return rows != nullptr ? rows[r] : r; }
  const acc_t* table(const acc_t* t, int64_t r, int64_t s) const {
    return t != nullptr ? t + (r * seq + s) * dim : nullptr;
  }
};

// Pass 1: k_cache[row, lens[r] + s, h] = rotary(k[r, s, h]); v_cache[...] = v[r, s, h].
template <typename scalar_t>
void write_cache(const DecodeArgs<scalar_t>& a) {
  using acc_t = typename DecodeArgs<scalar_t>::acc_t;
  const int64_t items = a.n_rows * a.seq * a.heads;
  at::parallel_for(0, items, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, a.dim)),
                   [&](int64_t begin, int64_t end) {
                     std::vector<acc_t> tmp(a.dim);
                     for (int64_t item = begin; item < end; ++item) {
                       const int64_t h = item % a.heads, s = (item / a.heads) % a.seq,
                                     r = item / (a.heads * a.seq);
                       const int64_t row = a.cache_row(r), pos = a.lens[r] + s;
                       const scalar_t* src = a.k.row(r, s, h);
                       scalar_t* kdst = a.k_cache.row(row, pos, h);
                       if (a.cos != nullptr) {
                         load_rotated(src, tmp.data(), a.dim, a.table(a.cos, r, s),
                                      a.table(a.sin, r, s), acc_t(1));
                         store_row(tmp.data(), kdst, a.dim);
                       } else {
                         std::copy(src, src + a.dim, kdst);
                       }
                       const scalar_t* vsrc = a.v.row(r, s, h);
                       std::copy(vsrc, vsrc + a.dim, a.v_cache.row(row, pos, h));
                     }
                   });
}

// Pass 2 for a few new positions per row (generation): every (row, new position, head) is one
// work item that reads its cache row directly: scores by dot products, one softmax, then the
// weighted sum of the values. No tiles, no transposes: with one query per key row, copying the
// keys would cost more than the products.
template <typename scalar_t>
void attend_few(const DecodeArgs<scalar_t>& a) {
  using acc_t = typename DecodeArgs<scalar_t>::acc_t;
  using V = Vec<acc_t>;
  constexpr int64_t W = V::kWidth;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t d = a.dim, dv = d / W * W;
  const int64_t items = a.n_rows * a.seq * a.heads;
  int64_t max_keys = 0, total_keys = 0;
  for (int64_t r = 0; r < a.n_rows; ++r) {
    max_keys = std::max(max_keys, a.lens[r] + a.seq);
    total_keys += a.lens[r] + a.seq;
  }
  const int64_t flops_per_item =
      std::max<int64_t>(1, 4 * d * (total_keys / std::max<int64_t>(1, a.n_rows)));
  const int64_t grain = std::max<int64_t>(1, kGrainFlops / flops_per_item);
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qv(d), row(kConvert ? d : 0), o(d), sc(max_keys);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item % a.heads, s = (item / a.heads) % a.seq, r = item / (a.heads * a.seq);
      const int64_t cache_row = a.cache_row(r), keys = a.lens[r] + s + 1;
      load_rotated(a.q.row(r, s, h), qv.data(), d, a.table(a.cos, r, s), a.table(a.sin, r, s),
                   a.scale);
      acc_t mx = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < keys; ++j) {
        const acc_t* kr;
        if constexpr (kConvert) {
          cpu_attn::cvt_load(a.k_cache.row(cache_row, j, h), row.data(), d);
          kr = row.data();
        } else {
          kr = a.k_cache.row(cache_row, j, h);
        }
        V acc = V::zero();
        int64_t i = 0;
        for (; i < dv; i += W) acc = fmadd(V::load(qv.data() + i), V::load(kr + i), acc);
        acc_t dot = acc.sum();
        for (; i < d; ++i) dot += qv[i] * kr[i];
        sc[j] = dot;
        mx = std::max(mx, dot);
      }
      acc_t sum = 0;
      {
        const V shift = V::broadcast(mx);
        V vsum = V::zero();
        int64_t j = 0;
        for (; j + W <= keys; j += W) {
          const V e = (V::load(sc.data() + j) - shift).exp();
          e.store(sc.data() + j);
          vsum = vsum + e;
        }
        sum = vsum.sum();
        for (; j < keys; ++j) sum += (sc[j] = std::exp(sc[j] - mx));
      }
      std::fill(o.begin(), o.end(), acc_t(0));
      for (int64_t j = 0; j < keys; ++j) {
        const acc_t* vr;
        if constexpr (kConvert) {
          cpu_attn::cvt_load(a.v_cache.row(cache_row, j, h), row.data(), d);
          vr = row.data();
        } else {
          vr = a.v_cache.row(cache_row, j, h);
        }
        const V pj = V::broadcast(sc[j]);
        int64_t i = 0;
        for (; i < dv; i += W)
          fmadd(pj, V::load(vr + i), V::load(o.data() + i)).store(o.data() + i);
        for (; i < d; ++i) o[i] += sc[j] * vr[i];
      }
      const acc_t inv = acc_t(1) / sum;
      for (int64_t i = 0; i < d; ++i) o[i] *= inv;
      store_row(o.data(), a.out.row(r, s, h), d);
    }
  });
}

// Pass 2: the attention of every (row, head, query block) over its cache row.
template <typename scalar_t>
void attend(const DecodeArgs<scalar_t>& a) {
  using acc_t = typename DecodeArgs<scalar_t>::acc_t;
  using V = Vec<acc_t>;
  constexpr int64_t W = V::kWidth;
  const int64_t d = a.dim, dp = round_up(std::max<int64_t>(d, 1), W);
  const int64_t bq = std::min(kBlockQ, a.seq), n_qblocks = ceil_div(a.seq, bq);
  const int64_t items = a.n_rows * a.heads * n_qblocks;
  int64_t total_keys = 0;
  for (int64_t r = 0; r < a.n_rows; ++r) total_keys += a.lens[r] + a.seq;
  const int64_t flops_per_item =
      std::max<int64_t>(1, 2 * bq * dp * (total_keys / std::max<int64_t>(1, a.n_rows)));
  const int64_t grain = std::max<int64_t>(1, kGrainFlops / flops_per_item);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qs(bq * dp), kb(kBlockK * dp), kt(dp * kBlockK), vb(kBlockK * dp),
        sc(bq * kBlockK), o(bq * dp), m(bq), l(bq);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % n_qblocks, h = (item / n_qblocks) % a.heads,
                    r = item / (n_qblocks * a.heads);
      const int64_t row = a.cache_row(r), base = a.lens[r];
      const int64_t s0 = qb * bq, mq = std::min(bq, a.seq - s0);
      std::fill(qs.begin(), qs.end(), acc_t(0));
      std::fill(o.begin(), o.end(), acc_t(0));
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), acc_t(0));
      for (int64_t i = 0; i < mq; ++i) {
        load_rotated(a.q.row(r, s0 + i, h), qs.data() + i * dp, d, a.table(a.cos, r, s0 + i),
                     a.table(a.sin, r, s0 + i), a.scale);
      }
      // keys 0 .. base + s0 + mq - 1 are visible to some query of the block
      const int64_t kend = base + s0 + mq;
      for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, kend - j0), nkp = round_up(nk, W);
        for (int64_t j = 0; j < nkp; ++j) {
          acc_t* kr = kb.data() + j * dp;
          acc_t* vr = vb.data() + j * dp;
          if (j < nk) {
            const scalar_t* ks = a.k_cache.row(row, j0 + j, h);
            const scalar_t* vs = a.v_cache.row(row, j0 + j, h);
            if constexpr (std::is_same_v<scalar_t, acc_t>) {
              std::copy(ks, ks + d, kr);
              std::copy(vs, vs + d, vr);
            } else {
              cpu_attn::cvt_load(ks, kr, d);
              cpu_attn::cvt_load(vs, vr, d);
            }
            std::fill(kr + d, kr + dp, acc_t(0));
            std::fill(vr + d, vr + dp, acc_t(0));
          } else {
            std::fill(kr, kr + dp, acc_t(0));
            std::fill(vr, vr + dp, acc_t(0));
          }
        }
        transpose(kb.data(), nkp, dp, dp, kt.data(), nkp);
        gemm<acc_t>(mq, nkp, d, qs.data(), dp, 1, kt.data(), nkp, sc.data(), nkp, false);
        for (int64_t i = 0; i < mq; ++i) {
          acc_t* srow = sc.data() + i * nkp;
          const int64_t valid = std::clamp<int64_t>(base + s0 + i - j0 + 1, 0, nk);
          if (valid == 0) {
            std::fill(srow, srow + nkp, acc_t(0));
            continue;
          }
          acc_t mb = neg_inf;
          for (int64_t j = 0; j < valid; ++j) mb = std::max(mb, srow[j]);
          const acc_t m_new = std::max(m[i], mb);
          const acc_t alpha = m[i] == neg_inf ? acc_t(0) : std::exp(m[i] - m_new);
          acc_t sum = 0;
          int64_t j = 0;
          const V shift = V::broadcast(m_new);
          V vsum = V::zero();
          for (; j + W <= valid; j += W) {
            const V e = (V::load(srow + j) - shift).exp();
            e.store(srow + j);
            vsum = vsum + e;
          }
          sum = vsum.sum();
          for (; j < valid; ++j) {
            srow[j] = std::exp(srow[j] - m_new);
            sum += srow[j];
          }
          std::fill(srow + valid, srow + nkp, acc_t(0));
          l[i] = l[i] * alpha + sum;
          if (alpha != acc_t(1)) {
            acc_t* orow = o.data() + i * dp;
            const V av = V::broadcast(alpha);
            for (int64_t c = 0; c < dp; c += W) (V::load(orow + c) * av).store(orow + c);
          }
          m[i] = m_new;
        }
        gemm<acc_t>(mq, dp, nk, sc.data(), nkp, 1, vb.data(), dp, o.data(), dp, true);
      }
      for (int64_t i = 0; i < mq; ++i) {
        acc_t* orow = o.data() + i * dp;
        const acc_t inv = acc_t(1) / l[i];
        for (int64_t c = 0; c < d; ++c) orow[c] *= inv;
        store_row(orow, a.out.row(r, s0 + i, h), d);
      }
    }
  });
}

// lens and rows as host int64 arrays, with their values checked against the cache.
struct Index {
  at::Tensor lens, rows;
};

Index checked_index(const at::Tensor& lens, const std::optional<at::Tensor>& rows, int64_t seq,
                    const at::Tensor& k_cache) {
  Index idx{lens.contiguous(), rows.has_value() ? rows->contiguous() : at::Tensor()};
  const int64_t n = lens.size(0), batch = k_cache.size(0), cap = k_cache.size(1);
  const int64_t* lp = idx.lens.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(lp[r] >= 0 && lp[r] + seq <= cap, "mblm: attn_decode lens[", r, "] = ", lp[r],
                " leaves no room for S = ", seq, " new positions in a cache of C = ", cap,
                " positions (need 0 <= lens[r] and lens[r] + S <= C)");
  }
  if (idx.rows.defined()) {
    const int64_t* rp = idx.rows.const_data_ptr<int64_t>();
    std::vector<char> seen(batch, 0);
    for (int64_t r = 0; r < n; ++r) {
      TORCH_CHECK(rp[r] >= 0 && rp[r] < batch, "mblm: attn_decode rows[", r, "] = ", rp[r],
                  " is not a row of the cache (B = ", batch, ")");
      TORCH_CHECK(!seen[rp[r]], "mblm: attn_decode rows must be distinct, row ", rp[r],
                  " appears twice");
      seen[rp[r]] = 1;
    }
  }
  return idx;
}

at::Tensor attn_decode_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& lens,
                           const std::optional<at::Tensor>& rows,
                           const std::optional<at::Tensor>& cos,
                           const std::optional<at::Tensor>& sin, double scale) {
  check_attn_decode_args(q, k, v, k_cache, v_cache, lens, rows, cos, sin);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  const Index idx = checked_index(lens, rows, q.size(1), k_cache);
  if (q.numel() == 0) return out;
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor cos_t, sin_t;
  if (cos.has_value()) {
    cos_t = cos->to(acc).contiguous();
    sin_t = sin->to(acc).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "attn_decode_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const DecodeArgs<scalar_t> args{
            rows4<const scalar_t>(q),
            rows4<const scalar_t>(k),
            rows4<const scalar_t>(v),
            rows4<scalar_t>(k_cache),
            rows4<scalar_t>(v_cache),
            rows4<scalar_t>(out),
            idx.lens.const_data_ptr<int64_t>(),
            idx.rows.defined() ? idx.rows.const_data_ptr<int64_t>() : nullptr,
            cos_t.defined() ? cos_t.const_data_ptr<acc_t>() : nullptr,
            sin_t.defined() ? sin_t.const_data_ptr<acc_t>() : nullptr,
            q.size(0),
            q.size(1),
            q.size(2),
            q.size(3),
            static_cast<acc_t>(scale)};
        write_cache(args);
        if (args.seq <= kFewQueries) {
          attend_few(args);
        } else {
          attend(args);
        }
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mblm, CPU, m) { m.impl("attn_decode", &attn_decode_cpu); }

}  // namespace mblm
