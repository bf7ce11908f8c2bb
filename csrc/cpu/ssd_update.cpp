// SSD family, CPU kernel of the decode step ssd_update: one step of the recurrence of ssd_fwd
// with the state advanced in place. Checks: csrc/ops/ssd.cpp. Semantics: ssd_ref with L = 1.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "mblm/ssd.h"
#include "ssd_steps.h"

namespace mblm {

namespace {

// state: (B, H, P, N) with a contiguous last dim, in state_t (the compute dtype or x's dtype).
// x: (B, H, P), B and C: (B, G, N) with contiguous last dims; dt (B, H), A, D (H, P) expanded,
// dt_bias in acc_t.
template <typename scalar_t, typename acc_t, typename state_t>
void ssd_update_kernel(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                       const at::Tensor& A, const at::Tensor& Bm, const at::Tensor& Cm,
                       const at::Tensor& D, const at::Tensor& dt_bias, bool dt_softplus,
                       const at::Tensor& y) {
  const int64_t batch = x.size(0), heads = x.size(1), P = x.size(2), N = Bm.size(2);
  const int64_t per_group = heads / Bm.size(1);
  state_t* sp = state.data_ptr<state_t>();
  const int64_t ss0 = state.stride(0), ss1 = state.stride(1), ss2 = state.stride(2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  const scalar_t* bp = Bm.const_data_ptr<scalar_t>();
  const scalar_t* cp = Cm.const_data_ptr<scalar_t>();
  const int64_t bs0 = Bm.stride(0), bs1 = Bm.stride(1), cs0 = Cm.stride(0), cs1 = Cm.stride(1);
  const acc_t* dtp = dt.const_data_ptr<acc_t>();
  const acc_t* Ap = A.const_data_ptr<acc_t>();
  const acc_t* Dp = D.defined() ? D.const_data_ptr<acc_t>() : nullptr;
  const acc_t* biasp = dt_bias.defined() ? dt_bias.const_data_ptr<acc_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, P * N));
  at::parallel_for(0, batch * heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> Bv(N), Cv(N);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads, g = h / per_group;
      acc_t d = dtp[bh] + (biasp ? biasp[h] : acc_t(0));
      if (dt_softplus) d = cpu_ssd::softplus(d);
      const acc_t a = std::exp(d * Ap[h]);
      for (int64_t n = 0; n < N; ++n) {
        Bv[n] = static_cast<acc_t>(bp[b * bs0 + g * bs1 + n]);
        Cv[n] = static_cast<acc_t>(cp[b * cs0 + g * cs1 + n]);
      }
      for (int64_t p = 0; p < P; ++p) {
        const acc_t xv = static_cast<acc_t>(xp[b * xs0 + h * xs1 + p]);
        const acc_t u = d * xv;
        state_t* row = sp + b * ss0 + h * ss1 + p * ss2;
        acc_t out = 0;
        for (int64_t n = 0; n < N; ++n) {
          const acc_t s = a * static_cast<acc_t>(row[n]) + u * Bv[n];
          row[n] = static_cast<state_t>(s);
          out += s * Cv[n];
        }
        if (Dp) out += Dp[h * P + p] * xv;
        yp[bh * P + p] = static_cast<scalar_t>(out);
      }
    }
  });
}

at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

at::Tensor ssd_update_cpu(at::Tensor& state, const at::Tensor& x_in, const at::Tensor& dt,
                          const at::Tensor& A, const at::Tensor& B_in, const at::Tensor& C_in,
                          const std::optional<at::Tensor>& D_in,
                          const std::optional<at::Tensor>& dt_bias_in, bool dt_softplus) {
  check_ssd_update_args(state, x_in, dt, A, B_in, C_in, D_in, dt_bias_in, /*check_values=*/true);
  const at::Tensor x = last_dim_contiguous(x_in);
  const at::Tensor B = last_dim_contiguous(B_in);
  const at::Tensor C = last_dim_contiguous(C_in);
  const auto cdt = ssd_compute_dtype(x.scalar_type());
  const int64_t heads = x.size(1), P = x.size(2);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0 && state.numel() == 0) return y;
  // The state is written in place; a non-contiguous last dim is computed on a copy.
  const bool direct = state.size(-1) <= 1 || state.stride(-1) == 1;
  at::Tensor work = direct ? state : state.contiguous();
  const at::Tensor dtc = dt.to(cdt).contiguous();
  const at::Tensor Ac = A.to(cdt).contiguous();
  at::Tensor Dc, biasc;
  if (D_in.has_value()) {
    Dc = D_in->to(cdt);
    Dc = (Dc.dim() == 1 ? Dc.view({heads, 1}).expand({heads, P}) : Dc).contiguous();
  }
  if (dt_bias_in.has_value()) biasc = dt_bias_in->to(cdt).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ssd_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (work.scalar_type() == cdt) {
      ssd_update_kernel<scalar_t, acc_t, acc_t>(work, x, dtc, Ac, B, C, Dc, biasc, dt_softplus, y);
    } else {
      ssd_update_kernel<scalar_t, acc_t, scalar_t>(work, x, dtc, Ac, B, C, Dc, biasc, dt_softplus,
                                                   y);
    }
  });
  if (!direct) state.copy_(work);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mblm, CPU, m) { m.impl("ssd_update", &ssd_update_cpu); }

}  // namespace mblm
