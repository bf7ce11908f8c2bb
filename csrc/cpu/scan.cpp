// Scan family, CPU kernels: scan_fwd, scan_bwd, scan_update. Checks: csrc/ops/scan.cpp.
// Semantics: mblm/ops/reference.py (selective_scan_ref).
//
// Work is split over (batch, block of K channels): the states h[N][K] of a block stay in L1 and
// every step updates them with K-wide vectors (A[d, n] for the block's channels loaded as a
// vector, B_t[n] and C_t[n] broadcast). Inputs are copied chunk by chunk (kScanChunk steps) into
// small compute-type buffers [t][K], which takes any strides and dtype; for the channel-contiguous
// layout the model passes (stride(1) == 1) each step's K channels are one contiguous read.
//
// Backward: scan_fwd saved the state at the start of each chunk. For every chunk, last to first,
// the chunk's states and decays are recomputed from its checkpoint into a per-thread buffer and
// then walked backwards. grad_B / grad_C (sums over channels) are accumulated per task into
// per-(batch, group) partials and summed at the end; grad_A / grad_D / grad_delta_bias (sums over
// batch and time) per batch row and summed over the batch: no two threads write one location.
#include "mblm/scan.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "vec.h"

namespace mblm {

namespace {

using cpu::Vec;
constexpr int64_t kT = kScanChunk;

// Below this many (step, channel, state) updates a parallel_for chunk is not worth a thread
// wake-up (decoding steps and short chunks stay on the calling thread).
constexpr int64_t kMinParallelWork = int64_t{1} << 16;

// at::parallel_for grain for tasks of `work` updates each.
int64_t task_grain(int64_t work) {
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, work));
}

// A (B, X, L) tensor as raw pointer + strides in elements (any strides, also negative / zero).
template <typename P>
struct View3 {
  P* p = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
  P* at(int64_t b, int64_t x, int64_t t) const { return p + b * s0 + x * s1 + t * s2; }
};

template <typename S>
View3<const S> view3(const at::Tensor& t) {
  return {static_cast<const S*>(t.const_data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}
template <typename S>
View3<S> view3_mut(const at::Tensor& t) {
  return {static_cast<S*>(t.mutable_data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// buf[t * K + k] = T(p[k * sx + t * st]) for t < nt, k < nx; zeros for nx <= k < K.
template <typename S, typename T>
void stage(const S* p, int64_t sx, int64_t st, int64_t nx, int64_t nt, int64_t K, T* buf) {
  if (sx == 1 || nx == 1) {
    for (int64_t t = 0; t < nt; ++t) {
      const S* row = p + t * st;
      T* out = buf + t * K;
      for (int64_t k = 0; k < nx; ++k) out[k] = static_cast<T>(row[k * sx]);
      for (int64_t k = nx; k < K; ++k) out[k] = T(0);
    }
    return;
  }
  std::fill(buf, buf + nt * K, T(0));
  for (int64_t k = 0; k < nx; ++k) {
    const S* col = p + k * sx;
    for (int64_t t = 0; t < nt; ++t) buf[t * K + k] = static_cast<T>(col[t * st]);
  }
}

// p[k * sx + t * st] = S(buf[t * K + k]) for t < nt, k < nx.
template <typename S, typename T>
void unstage(const T* buf, S* p, int64_t sx, int64_t st, int64_t nx, int64_t nt, int64_t K) {
  if (sx == 1 || nx == 1) {
    for (int64_t t = 0; t < nt; ++t) {
      S* row = p + t * st;
      const T* in = buf + t * K;
      for (int64_t k = 0; k < nx; ++k) row[k * sx] = static_cast<S>(in[k]);
    }
    return;
  }
  for (int64_t k = 0; k < nx; ++k) {
    S* col = p + k * sx;
    for (int64_t t = 0; t < nt; ++t) col[t * st] = static_cast<S>(buf[t * K + k]);
  }
}

// Inputs of one scan in the compute type T (A, D, delta_bias, initial_state converted and made
// contiguous by the caller) plus views of the (B, X, L) tensors of storage type S.
template <typename S, typename T>
struct ScanInputs {
  int64_t batch = 0, dim = 0, len = 0, n = 0;
  View3<const S> u, delta, z, B, C;  // z.p null when absent
  const T* A = nullptr;              // (D, N) contiguous
  const T* D = nullptr;              // (D,) or null
  const T* bias = nullptr;           // (D,) or null
  bool softplus = false;
};

template <typename T>
struct BlockWeights {
  std::vector<T> A;        // [N][K]: A[d0 + k, n]
  std::vector<T> D, bias;  // [K]
};

template <typename S, typename T>
void load_block_weights(const ScanInputs<S, T>& in, int64_t d0, int64_t nd, int64_t K,
                        BlockWeights<T>& w) {
  w.A.assign(in.n * K, T(0));
  for (int64_t k = 0; k < nd; ++k) {
    for (int64_t j = 0; j < in.n; ++j) w.A[j * K + k] = in.A[(d0 + k) * in.n + j];
  }
  w.D.assign(K, T(0));
  w.bias.assign(K, T(0));
  for (int64_t k = 0; k < nd; ++k) {
    if (in.D) w.D[k] = in.D[d0 + k];
    if (in.bias) w.bias[k] = in.bias[d0 + k];
  }
}

// dt = delta + bias, then softplus; with dsp non-null also d dt / d(delta + bias).
template <typename T, int NV>
void delta_to_dt(T* dt, T* dsp, const T* bias, int64_t nt, bool softplus) {
  using V = Vec<T>;
  constexpr int W = V::kWidth, K = W * NV;
  for (int64_t t = 0; t < nt; ++t) {
    for (int j = 0; j < NV; ++j) {
      T* p = dt + t * K + j * W;
      const V x = V::load(p) + V::load(bias + j * W);
      (softplus ? x.softplus() : x).store(p);
      if (dsp) (softplus ? x.softplus_grad() : V::broadcast(T(1))).store(dsp + t * K + j * W);
    }
  }
}

// ------------------------------------------------------------------------------------------
// scan_fwd
// ------------------------------------------------------------------------------------------

template <typename S, typename T, int NV>
void scan_fwd_kernel(const ScanInputs<S, T>& in, const T* init, View3<S> y, T* final_state,
                     T* ckpt) {
  using V = Vec<T>;
  constexpr int W = V::kWidth;
  constexpr int64_t K = W * NV;
  const int64_t N = in.n, dim = in.dim, len = in.len;
  const int64_t nblk = (dim + K - 1) / K, nc = scan_num_chunks(len);
  const int64_t grain = task_grain(len * K * std::max<int64_t>(N, 1));
  at::parallel_for(0, in.batch * nblk, grain, [&](int64_t begin, int64_t end) {
    BlockWeights<T> w;
    std::vector<T> h(N * K), us(kT * K), dts(kT * K), zs(kT * K), ys(kT * K), Bs(kT * N),
        Cs(kT * N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, d0 = (task % nblk) * K, nd = std::min(K, dim - d0);
      load_block_weights(in, d0, nd, K, w);
      std::fill(h.begin(), h.end(), T(0));
      if (init) {
        for (int64_t k = 0; k < nd; ++k) {
          for (int64_t j = 0; j < N; ++j) h[j * K + k] = init[((b * dim) + d0 + k) * N + j];
        }
      }
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t t0 = c * kT, nt = std::min(kT, len - t0);
        if (ckpt) {
          T* ck = ckpt + (b * nc + c) * N * dim + d0;
          for (int64_t j = 0; j < N; ++j) std::copy_n(h.data() + j * K, nd, ck + j * dim);
        }
        stage(in.u.at(b, d0, t0), in.u.s1, in.u.s2, nd, nt, K, us.data());
        stage(in.delta.at(b, d0, t0), in.delta.s1, in.delta.s2, nd, nt, K, dts.data());
        delta_to_dt<T, NV>(dts.data(), nullptr, w.bias.data(), nt, in.softplus);
        if (in.z.p) {
          stage(in.z.at(b, d0, t0), in.z.s1, in.z.s2, nd, nt, K, zs.data());
          for (int64_t i = 0; i < nt * K; i += W) {
            const V zv = V::load(zs.data() + i);
            (zv * zv.sigmoid()).store(zs.data() + i);
          }
        }
        stage(in.B.at(b, 0, t0), in.B.s1, in.B.s2, N, nt, N, Bs.data());
        stage(in.C.at(b, 0, t0), in.C.s1, in.C.s2, N, nt, N, Cs.data());
        for (int64_t t = 0; t < nt; ++t) {
          V dt[NV], dtu[NV], acc[NV];
          for (int j = 0; j < NV; ++j) {
            dt[j] = V::load(dts.data() + t * K + j * W);
            dtu[j] = dt[j] * V::load(us.data() + t * K + j * W);
            acc[j] = V::zero();
          }
          const T* Bt = Bs.data() + t * N;
          const T* Ct = Cs.data() + t * N;
          for (int64_t n = 0; n < N; ++n) {
            const V bn = V::broadcast(Bt[n]), cn = V::broadcast(Ct[n]);
            T* hn = h.data() + n * K;
            const T* An = w.A.data() + n * K;
            for (int j = 0; j < NV; ++j) {
              const V dA = (dt[j] * V::load(An + j * W)).exp();
              const V hv = fmadd(dA, V::load(hn + j * W), dtu[j] * bn);
              hv.store(hn + j * W);
              acc[j] = fmadd(hv, cn, acc[j]);
            }
          }
          for (int j = 0; j < NV; ++j) {
            V out = fmadd(V::load(w.D.data() + j * W), V::load(us.data() + t * K + j * W), acc[j]);
            if (in.z.p) out = out * V::load(zs.data() + t * K + j * W);
            out.store(ys.data() + t * K + j * W);
          }
        }
        unstage(ys.data(), y.at(b, d0, t0), y.s1, y.s2, nd, nt, K);
      }
      for (int64_t k = 0; k < nd; ++k) {
        for (int64_t j = 0; j < N; ++j) final_state[((b * dim) + d0 + k) * N + j] = h[j * K + k];
      }
    }
  });
}

template <typename S, typename T>
ScanInputs<S, T> make_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A_c,
                             const at::Tensor& B, const at::Tensor& C,
                             const std::optional<at::Tensor>& D_c,
                             const std::optional<at::Tensor>& z,
                             const std::optional<at::Tensor>& bias_c, bool softplus) {
  ScanInputs<S, T> in;
  in.batch = u.size(0), in.dim = u.size(1), in.len = u.size(2), in.n = A_c.size(1);
  in.u = view3<S>(u), in.delta = view3<S>(delta), in.B = view3<S>(B), in.C = view3<S>(C);
  if (z) in.z = view3<S>(*z);
  in.A = A_c.const_data_ptr<T>();
  in.D = D_c ? D_c->const_data_ptr<T>() : nullptr;
  in.bias = bias_c ? bias_c->const_data_ptr<T>() : nullptr;
  in.softplus = softplus;
  return in;
}

std::optional<at::Tensor> to_compute(const std::optional<at::Tensor>& t, at::ScalarType cdt) {
  if (!t.has_value()) return std::nullopt;
  return t->to(cdt).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_fwd_cpu(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
    const std::optional<at::Tensor>& initial_state) {
  check_scan_fwd_args(u, delta, A, B, C, D, z, delta_bias, initial_state);
  const auto cdt = scan_compute_dtype(u);
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2), n = A.size(1);
  const auto copts = u.options().dtype(cdt);
  at::Tensor y = scan_empty_like(u, u.scalar_type());
  at::Tensor final_state = at::empty({batch, dim, n}, copts);
  at::Tensor ckpt = at::empty({batch, scan_num_chunks(len), n, dim}, copts);
  if (batch * dim == 0) return {y, final_state, ckpt};
  const at::Tensor A_c = A.to(cdt).contiguous();
  const auto D_c = to_compute(D, cdt), bias_c = to_compute(delta_bias, cdt);
  const auto init_c = to_compute(initial_state, cdt);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, u.scalar_type(), "mblm_scan_fwd_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto in =
            make_inputs<scalar_t, acc_t>(u, delta, A_c, B, C, D_c, z, bias_c, delta_softplus);
        scan_fwd_kernel<scalar_t, acc_t, 2>(
            in, init_c ? init_c->const_data_ptr<acc_t>() : nullptr, view3_mut<scalar_t>(y),
            final_state.mutable_data_ptr<acc_t>(), ckpt.mutable_data_ptr<acc_t>());
      });
  return {y, final_state, ckpt};
}

// ------------------------------------------------------------------------------------------
// scan_bwd
// ------------------------------------------------------------------------------------------

template <typename S, typename T>
struct BwdOutputs {
  View3<S> gu, gdelta, gz;  // gz.p null when z is absent
  T* gB_part = nullptr;     // (B, G, L, N): this group's sum over its channels
  T* gC_part = nullptr;
  T* gA_part = nullptr;     // (B, D, N): sum over time for batch row b
  T* gD_part = nullptr;     // (B, D)
  T* gbias_part = nullptr;  // (B, D)
  T* g_init = nullptr;      // (B, D, N): the gradient flowing into the initial state
};

template <typename S, typename T, int NV>
void scan_bwd_kernel(const ScanInputs<S, T>& in, View3<const S> gy_in, const T* g_final,
                     const T* ckpt, int64_t groups, const BwdOutputs<S, T>& out) {
  using V = Vec<T>;
  constexpr int W = V::kWidth;
  constexpr int64_t K = W * NV;
  const int64_t N = in.n, dim = in.dim, len = in.len;
  const int64_t nblk = (dim + K - 1) / K, nc = scan_num_chunks(len);
  const int64_t per_group = (nblk + groups - 1) / groups;
  const bool has_z = in.z.p != nullptr;
  const View3<S>&gu = out.gu, &gdl = out.gdelta, &gz = out.gz;

  const int64_t grain = task_grain(len * per_group * K * std::max<int64_t>(N, 1));
  at::parallel_for(0, in.batch * groups, grain, [&](int64_t begin, int64_t end) {
    BlockWeights<T> w;
    std::vector<T> us(kT * K), dts(kT * K), dsp(kT * K), zs(kT * K), gs(kT * K), yp(kT * K),
        gus(kT * K), gds(kT * K), gzs(kT * K), Bs(kT * N), Cs(kT * N), hbuf((kT + 1) * N * K),
        dAbuf(kT * N * K), gBv(kT * N * W), gCv(kT * N * W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / groups, g = task % groups;
      const int64_t blk0 = g * per_group, blk1 = std::min(nblk, blk0 + per_group);
      if (blk0 >= blk1) continue;
      const int64_t nb = blk1 - blk0;
      // Per block of the group, kept across chunks: the state gradient and the sums over time.
      std::vector<T> gh(nb * N * K, T(0)), gA(nb * N * K, T(0)), gD(nb * K, T(0)),
          gbias(nb * K, T(0));
      if (g_final) {
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t d0 = (blk0 + i) * K, nd = std::min(K, dim - d0);
          for (int64_t k = 0; k < nd; ++k) {
            for (int64_t j = 0; j < N; ++j) {
              gh[(i * N + j) * K + k] = g_final[(b * dim + d0 + k) * N + j];
            }
          }
        }
      }
      for (int64_t c = nc - 1; c >= 0; --c) {
        const int64_t t0 = c * kT, nt = std::min(kT, len - t0);
        stage(in.B.at(b, 0, t0), in.B.s1, in.B.s2, N, nt, N, Bs.data());
        stage(in.C.at(b, 0, t0), in.C.s1, in.C.s2, N, nt, N, Cs.data());
        std::fill(gBv.begin(), gBv.end(), T(0));
        std::fill(gCv.begin(), gCv.end(), T(0));
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t d0 = (blk0 + i) * K, nd = std::min(K, dim - d0);
          load_block_weights(in, d0, nd, K, w);
          stage(in.u.at(b, d0, t0), in.u.s1, in.u.s2, nd, nt, K, us.data());
          stage(in.delta.at(b, d0, t0), in.delta.s1, in.delta.s2, nd, nt, K, dts.data());
          delta_to_dt<T, NV>(dts.data(), dsp.data(), w.bias.data(), nt, in.softplus);
          stage(gy_in.at(b, d0, t0), gy_in.s1, gy_in.s2, nd, nt, K, gs.data());
          if (has_z) stage(in.z.at(b, d0, t0), in.z.s1, in.z.s2, nd, nt, K, zs.data());

          // Recompute the chunk: hbuf[t + 1] = h_t (hbuf[0] = the checkpoint), dAbuf[t] = decay,
          // yp[t] = y_t before the gate.
          std::fill(hbuf.begin(), hbuf.begin() + N * K, T(0));
          const T* ck = ckpt + (b * nc + c) * N * dim + d0;
          for (int64_t j = 0; j < N; ++j) std::copy_n(ck + j * dim, nd, hbuf.data() + j * K);
          for (int64_t t = 0; t < nt; ++t) {
            V dt[NV], dtu[NV], acc[NV];
            for (int j = 0; j < NV; ++j) {
              dt[j] = V::load(dts.data() + t * K + j * W);
              const V uv = V::load(us.data() + t * K + j * W);
              dtu[j] = dt[j] * uv;
              acc[j] = V::load(w.D.data() + j * W) * uv;
            }
            const T* hp = hbuf.data() + t * N * K;
            T* hn = hbuf.data() + (t + 1) * N * K;
            T* da = dAbuf.data() + t * N * K;
            for (int64_t n = 0; n < N; ++n) {
              const V bn = V::broadcast(Bs[t * N + n]), cn = V::broadcast(Cs[t * N + n]);
              for (int j = 0; j < NV; ++j) {
                const int64_t o = n * K + j * W;
                const V dA = (dt[j] * V::load(w.A.data() + o)).exp();
                dA.store(da + o);
                const V hv = fmadd(dA, V::load(hp + o), dtu[j] * bn);
                hv.store(hn + o);
                acc[j] = fmadd(hv, cn, acc[j]);
              }
            }
            for (int j = 0; j < NV; ++j) acc[j].store(yp.data() + t * K + j * W);
          }

          // Walk the chunk backwards.
          T* ghb = gh.data() + i * N * K;
          T* gAb = gA.data() + i * N * K;
          for (int64_t t = nt - 1; t >= 0; --t) {
            V dt[NV], uv[NV], gyv[NV], gdtu[NV], gdt[NV];
            for (int j = 0; j < NV; ++j) {
              const int64_t o = t * K + j * W;
              dt[j] = V::load(dts.data() + o);
              uv[j] = V::load(us.data() + o);
              const V gv = V::load(gs.data() + o);
              if (has_z) {
                const V zv = V::load(zs.data() + o);
                const V sg = zv.sigmoid();
                const V one = V::broadcast(T(1));
                gyv[j] = gv * zv * sg;
                (gv * V::load(yp.data() + o) * sg * fmadd(zv, one - sg, one)).store(gzs.data() + o);
              } else {
                gyv[j] = gv;
              }
              V gDv = V::load(gD.data() + i * K + j * W);
              fmadd(gyv[j], uv[j], gDv).store(gD.data() + i * K + j * W);
              gdtu[j] = V::zero();
              gdt[j] = V::zero();
            }
            const T* hp = hbuf.data() + t * N * K;
            const T* hc = hbuf.data() + (t + 1) * N * K;
            const T* da = dAbuf.data() + t * N * K;
            for (int64_t n = 0; n < N; ++n) {
              const V bn = V::broadcast(Bs[t * N + n]), cn = V::broadcast(Cs[t * N + n]);
              V gBacc = V::load(gBv.data() + (t * N + n) * W);
              V gCacc = V::load(gCv.data() + (t * N + n) * W);
              for (int j = 0; j < NV; ++j) {
                const int64_t o = n * K + j * W;
                const V ghv = fmadd(gyv[j], cn, V::load(ghb + o));
                gCacc = fmadd(gyv[j], V::load(hc + o), gCacc);
                gBacc = fmadd(ghv, dt[j] * uv[j], gBacc);
                gdtu[j] = fmadd(ghv, bn, gdtu[j]);
                const V dA = V::load(da + o);
                const V q = ghv * V::load(hp + o) * dA;
                gdt[j] = fmadd(q, V::load(w.A.data() + o), gdt[j]);
                fmadd(q, dt[j], V::load(gAb + o)).store(gAb + o);
                (ghv * dA).store(ghb + o);
              }
              gBacc.store(gBv.data() + (t * N + n) * W);
              gCacc.store(gCv.data() + (t * N + n) * W);
            }
            for (int j = 0; j < NV; ++j) {
              const int64_t o = t * K + j * W;
              fmadd(gdtu[j], dt[j], gyv[j] * V::load(w.D.data() + j * W)).store(gus.data() + o);
              const V gd = fmadd(gdtu[j], uv[j], gdt[j]) * V::load(dsp.data() + o);
              gd.store(gds.data() + o);
              (V::load(gbias.data() + i * K + j * W) + gd).store(gbias.data() + i * K + j * W);
            }
          }
          unstage(gus.data(), gu.at(b, d0, t0), gu.s1, gu.s2, nd, nt, K);
          unstage(gds.data(), gdl.at(b, d0, t0), gdl.s1, gdl.s2, nd, nt, K);
          if (has_z) unstage(gzs.data(), gz.at(b, d0, t0), gz.s1, gz.s2, nd, nt, K);
        }
        T* pB = out.gB_part + ((b * groups + g) * len + t0) * N;
        T* pC = out.gC_part + ((b * groups + g) * len + t0) * N;
        for (int64_t t = 0; t < nt; ++t) {
          for (int64_t n = 0; n < N; ++n) {
            pB[t * N + n] = V::load(gBv.data() + (t * N + n) * W).sum();
            pC[t * N + n] = V::load(gCv.data() + (t * N + n) * W).sum();
          }
        }
      }
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t d0 = (blk0 + i) * K, nd = std::min(K, dim - d0);
        for (int64_t k = 0; k < nd; ++k) {
          const int64_t d = d0 + k;
          for (int64_t j = 0; j < N; ++j) {
            out.gA_part[(b * dim + d) * N + j] = gA[(i * N + j) * K + k];
            out.g_init[(b * dim + d) * N + j] = gh[(i * N + j) * K + k];
          }
          out.gD_part[b * dim + d] = gD[i * K + k];
          out.gbias_part[b * dim + d] = gbias[i * K + k];
        }
      }
    }
  });
}

// out[b, n, t] = sum_g part[b, g, t, n], cast to S.
template <typename S, typename T>
void reduce_groups(const T* part, int64_t batch, int64_t groups, int64_t len, int64_t n,
                   View3<S> out) {
  at::parallel_for(0, batch * len, task_grain(groups * n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / len, t = i % len;
      for (int64_t j = 0; j < n; ++j) {
        T s = 0;
        for (int64_t g = 0; g < groups; ++g) s += part[((b * groups + g) * len + t) * n + j];
        *out.at(b, j, t) = static_cast<S>(s);
      }
    }
  });
}

at::Tensor empty_grad(const at::Tensor& u) { return at::empty({0}, u.options()); }

ScanGrads scan_bwd_cpu(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
                       const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                       const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                       const std::optional<at::Tensor>& initial_state,
                       const at::Tensor& checkpoints) {
  check_scan_bwd_args(grad_y, grad_final_state, u, delta, A, B, C, D, z, delta_bias, initial_state,
                      checkpoints);
  const auto cdt = scan_compute_dtype(u);
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2), n = A.size(1);
  const auto copts = u.options().dtype(cdt);
  at::Tensor gu = scan_empty_like(u, u.scalar_type());
  at::Tensor gdelta = scan_empty_like(delta, u.scalar_type());
  at::Tensor gB = scan_empty_like(B, u.scalar_type());
  at::Tensor gC = scan_empty_like(C, u.scalar_type());
  at::Tensor gz = z ? scan_empty_like(*z, u.scalar_type()) : empty_grad(u);
  at::Tensor gA_part = at::zeros({batch, dim, n}, copts);
  at::Tensor gD_part = at::zeros({batch, dim}, copts);
  at::Tensor gbias_part = at::zeros({batch, dim}, copts);
  at::Tensor g_init =
      grad_final_state ? grad_final_state->to(cdt).clone() : at::zeros({batch, dim, n}, copts);
  if (batch * dim > 0) {
    const at::Tensor A_c = A.to(cdt).contiguous();
    const auto D_c = to_compute(D, cdt), bias_c = to_compute(delta_bias, cdt);
    const at::Tensor ckpt = checkpoints.contiguous();
    const std::optional<at::Tensor> g_final =
        grad_final_state ? std::optional<at::Tensor>(grad_final_state->contiguous()) : std::nullopt;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, u.scalar_type(), "mblm_scan_bwd_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          constexpr int kNV = 2;
          // Channel groups per batch row: enough tasks for every thread; each group adds one
          // (L, N) partial of grad_B / grad_C.
          const int64_t nblk = (dim + kNV * Vec<acc_t>::kWidth - 1) / (kNV * Vec<acc_t>::kWidth);
          const int64_t threads = at::get_num_threads();
          const int64_t work = len * dim * std::max<int64_t>(n, 1);
          const int64_t groups =
              work < 2 * kMinParallelWork
                  ? 1
                  : std::clamp<int64_t>((2 * threads + batch - 1) / batch, 1, nblk);
          at::Tensor gB_part = at::empty({batch, groups, len, n}, copts);
          at::Tensor gC_part = at::empty({batch, groups, len, n}, copts);
          const auto in =
              make_inputs<scalar_t, acc_t>(u, delta, A_c, B, C, D_c, z, bias_c, delta_softplus);
          BwdOutputs<scalar_t, acc_t> out;
          out.gu = view3_mut<scalar_t>(gu);
          out.gdelta = view3_mut<scalar_t>(gdelta);
          if (z) out.gz = view3_mut<scalar_t>(gz);
          out.gB_part = gB_part.mutable_data_ptr<acc_t>();
          out.gC_part = gC_part.mutable_data_ptr<acc_t>();
          out.gA_part = gA_part.mutable_data_ptr<acc_t>();
          out.gD_part = gD_part.mutable_data_ptr<acc_t>();
          out.gbias_part = gbias_part.mutable_data_ptr<acc_t>();
          out.g_init = g_init.mutable_data_ptr<acc_t>();
          scan_bwd_kernel<scalar_t, acc_t, kNV>(
              in, view3<scalar_t>(grad_y), g_final ? g_final->const_data_ptr<acc_t>() : nullptr,
              ckpt.const_data_ptr<acc_t>(), groups, out);
          reduce_groups<scalar_t, acc_t>(gB_part.const_data_ptr<acc_t>(), batch, groups, len, n,
                                         view3_mut<scalar_t>(gB));
          reduce_groups<scalar_t, acc_t>(gC_part.const_data_ptr<acc_t>(), batch, groups, len, n,
                                         view3_mut<scalar_t>(gC));
        });
  } else {
    gB.zero_();
    gC.zero_();
  }
  at::Tensor gA = gA_part.sum(0).to(A.scalar_type());
  at::Tensor gD = D ? gD_part.sum(0).to(D->scalar_type()) : empty_grad(u);
  at::Tensor gbias = delta_bias ? gbias_part.sum(0).to(delta_bias->scalar_type()) : empty_grad(u);
  at::Tensor ginit = initial_state ? g_init.to(initial_state->scalar_type()) : empty_grad(u);
  return {gu, gdelta, gA, gB, gC, gD, gz, gbias, ginit};
}

// ------------------------------------------------------------------------------------------
// scan_update
// ------------------------------------------------------------------------------------------

at::Tensor scan_update_cpu(const at::Tensor& state, const at::Tensor& u, const at::Tensor& delta,
                           const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                           const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                           const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  check_scan_update_args(state, u, delta, A, B, C, D, z, delta_bias);
  const auto cdt = scan_compute_dtype(u);
  at::Tensor y = at::empty(u.sizes(), u.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  // Work on the state directly when it is contiguous in the compute dtype, else on a copy that
  // is written back.
  const bool direct = state.scalar_type() == cdt && state.is_contiguous();
  at::Tensor st = direct ? state : state.to(cdt).contiguous();
  const at::Tensor A_c = A.to(cdt).contiguous();
  const auto D_c = to_compute(D, cdt), bias_c = to_compute(delta_bias, cdt);
  // One step of scan_fwd (L = 1) that reads its initial state from and writes its final state to
  // the same buffer: each task reads its channels' states before it writes them.
  const auto steps = [](const at::Tensor& t) { return t.unsqueeze(2); };
  const std::optional<at::Tensor> z1 = z ? std::optional<at::Tensor>(steps(*z)) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, u.scalar_type(), "mblm_scan_update_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto in = make_inputs<scalar_t, acc_t>(steps(u), steps(delta), A_c, steps(B),
                                                     steps(C), D_c, z1, bias_c, delta_softplus);
        acc_t* h = st.mutable_data_ptr<acc_t>();
        scan_fwd_kernel<scalar_t, acc_t, 2>(in, h, view3_mut<scalar_t>(steps(y)), h, nullptr);
      });
  if (!direct) state.copy_(st);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mblm, CPU, m) {
  m.impl("scan_fwd", &scan_fwd_cpu);
  m.impl("scan_bwd", &scan_bwd_cpu);
  m.impl("scan_update", &scan_update_cpu);
}

}  // namespace mblm
