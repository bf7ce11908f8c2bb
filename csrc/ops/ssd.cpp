// SSD family: schemas, the argument checks shared by the CPU and CUDA kernels, and C++ front
// functions that call the ops through the dispatcher. Semantics: mblm/ops/reference.py (ssd_ref).
#include "mblm/ssd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/all.h>
#include <ATen/ops/isfinite.h>
#include <torch/library.h>

namespace mblm {

namespace {

bool is_kernel_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "mblm: ssd ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

// A, D and dt_bias: float32, or float64 with float64 x.
void check_param_dtype(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == at::kFloat ||
                  (t.scalar_type() == at::kDouble && x.scalar_type() == at::kDouble),
              "mblm: ssd ", name, " must be float32 (or float64 with float64 x), got ",
              t.scalar_type(), " with x of dtype ", x.scalar_type());
}

// dt: x's dtype or the compute dtype.
void check_dt_dtype(const at::Tensor& dt, const at::Tensor& x) {
  const auto cdt = ssd_compute_dtype(x.scalar_type());
  TORCH_CHECK(dt.scalar_type() == x.scalar_type() || dt.scalar_type() == cdt,
              "mblm: ssd dt must have x's dtype (", x.scalar_type(), ") or ", cdt, ", got ",
              dt.scalar_type());
}

// The per-head parameters A, D, dt_bias (shared by the scan and the step).
void check_head_params(const at::Tensor& A, const std::optional<at::Tensor>& D,
                       const std::optional<at::Tensor>& dt_bias, const at::Tensor& x, int64_t heads,
                       int64_t headdim, bool check_values) {
  check_device(A, "A", x);
  check_param_dtype(A, "A", x);
  TORCH_CHECK(A.dim() == 1 && A.size(0) == heads, "mblm: ssd A must have shape (H,) = (", heads,
              ",), got ", A.sizes());
  if (check_values && A.numel() > 0) {
    TORCH_CHECK(at::isfinite(A).all().item<bool>(),
                "mblm: ssd A must be finite (one real decay rate per head), got non-finite "
                "values");
  }
  if (D.has_value()) {
    check_device(*D, "D", x);
    check_param_dtype(*D, "D", x);
    TORCH_CHECK((D->dim() == 1 && D->size(0) == heads) ||
                    (D->dim() == 2 && D->size(0) == heads && D->size(1) == headdim),
                "mblm: ssd D must have shape (H,) = (", heads, ",) or (H, P) = (", heads, ", ",
                headdim, "), got ", D->sizes());
  }
  if (dt_bias.has_value()) {
    check_device(*dt_bias, "dt_bias", x);
    check_param_dtype(*dt_bias, "dt_bias", x);
    TORCH_CHECK(dt_bias->dim() == 1 && dt_bias->size(0) == heads,
                "mblm: ssd dt_bias must have shape (H,) = (", heads, ",), got ", dt_bias->sizes());
  }
}

void check_groups(int64_t heads, int64_t groups, const at::Tensor& B) {
  TORCH_CHECK(groups >= 1 && heads % groups == 0,
              "mblm: ssd the number of groups G = B.size(2) must divide the number of heads H = ",
              heads, ", got B of shape ", B.sizes());
}

void check_state_shape(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t batch,
                       int64_t heads, int64_t headdim, int64_t dstate) {
  check_device(t, name, x);
  TORCH_CHECK(is_kernel_float(t.scalar_type()), "mblm: ssd ", name,
              " must be float64/float32/float16/bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4 && t.size(0) == batch && t.size(1) == heads && t.size(2) == headdim &&
                  t.size(3) == dstate,
              "mblm: ssd ", name, " must have shape (B, H, P, N) = (", batch, ", ", heads, ", ",
              headdim, ", ", dstate, "), got ", t.sizes());
}

}  // namespace

void check_ssd_fwd_args(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C,
                        const std::optional<at::Tensor>& D,
                        const std::optional<at::Tensor>& dt_bias,
                        const std::optional<at::Tensor>& initial_state, bool check_values) {
  TORCH_CHECK(x.dim() == 4, "mblm: ssd x must have 4 dims (B, L, H, P), got shape ", x.sizes());
  TORCH_CHECK(is_kernel_float(x.scalar_type()),
              "mblm: ssd x must be float64/float32/float16/bfloat16, got ", x.scalar_type());
  const int64_t batch = x.size(0), length = x.size(1), heads = x.size(2), headdim = x.size(3);

  check_device(dt, "dt", x);
  check_dt_dtype(dt, x);
  TORCH_CHECK(dt.dim() == 3 && dt.size(0) == batch && dt.size(1) == length && dt.size(2) == heads,
              "mblm: ssd dt must have shape (B, L, H) = (", batch, ", ", length, ", ", heads,
              "), got ", dt.sizes());

  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{B, "B"}, {C, "C"}}) {
    check_device(t, name, x);
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "mblm: ssd ", name, " has dtype ",
                t.scalar_type(), " but x has dtype ", x.scalar_type());
    TORCH_CHECK(t.dim() == 4 && t.size(0) == batch && t.size(1) == length, "mblm: ssd ", name,
                " must have shape (B, L, G, N) with (B, L) = (", batch, ", ", length, "), got ",
                t.sizes());
  }
  TORCH_CHECK(C.sizes() == B.sizes(), "mblm: ssd C must have the shape of B ", B.sizes(),
              " (B, L, G, N), got ", C.sizes());
  check_groups(heads, B.size(2), B);
  check_head_params(A, D, dt_bias, x, heads, headdim, check_values);
  if (initial_state.has_value()) {
    check_state_shape(*initial_state, "initial_state", x, batch, heads, headdim, B.size(3));
  }
}

void check_ssd_bwd_args(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
                        const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C,
                        const std::optional<at::Tensor>& D,
                        const std::optional<at::Tensor>& dt_bias,
                        const std::optional<at::Tensor>& initial_state,
                        const at::Tensor& checkpoints, bool check_values) {
  check_ssd_fwd_args(x, dt, A, B, C, D, dt_bias, initial_state, check_values);
  const int64_t batch = x.size(0), heads = x.size(2), headdim = x.size(3), dstate = B.size(3);
  check_device(grad_y, "grad_y", x);
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "mblm: ssd grad_y has dtype ",
              grad_y.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "mblm: ssd grad_y must have the shape of x ", x.sizes(),
              " (B, L, H, P), got ", grad_y.sizes());
  if (grad_final_state.has_value()) {
    check_state_shape(*grad_final_state, "grad_final_state", x, batch, heads, headdim, dstate);
  }
  check_device(checkpoints, "checkpoints", x);
  const auto cdt = ssd_compute_dtype(x.scalar_type());
  TORCH_CHECK(checkpoints.scalar_type() == cdt, "mblm: ssd checkpoints must be ", cdt,
              " for x of dtype ", x.scalar_type(), ", got ", checkpoints.scalar_type());
  const int64_t chunks = ssd_num_checkpoints(x.size(1));
  TORCH_CHECK(checkpoints.dim() == 5 && checkpoints.size(0) == batch &&
                  checkpoints.size(1) == heads && checkpoints.size(2) == chunks &&
                  checkpoints.size(3) == headdim && checkpoints.size(4) == dstate,
              "mblm: ssd checkpoints must have shape (B, H, ceil(L / ", kSsdCheckpointSteps,
              "), P, N) = (", batch, ", ", heads, ", ", chunks, ", ", headdim, ", ", dstate,
              "), got ", checkpoints.sizes());
}

void check_ssd_update_args(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                           const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                           const std::optional<at::Tensor>& D,
                           const std::optional<at::Tensor>& dt_bias, bool check_values) {
  TORCH_CHECK(x.dim() == 3, "mblm: ssd x must have 3 dims (B, H, P), got shape ", x.sizes());
  TORCH_CHECK(is_kernel_float(x.scalar_type()),
              "mblm: ssd x must be float64/float32/float16/bfloat16, got ", x.scalar_type());
  const int64_t batch = x.size(0), heads = x.size(1), headdim = x.size(2);
  check_device(dt, "dt", x);
  check_dt_dtype(dt, x);
  TORCH_CHECK(dt.dim() == 2 && dt.size(0) == batch && dt.size(1) == heads,
              "mblm: ssd dt must have shape (B, H) = (", batch, ", ", heads, "), got ", dt.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{B, "B"}, {C, "C"}}) {
    check_device(t, name, x);
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "mblm: ssd ", name, " has dtype ",
                t.scalar_type(), " but x has dtype ", x.scalar_type());
    TORCH_CHECK(t.dim() == 3 && t.size(0) == batch, "mblm: ssd ", name,
                " must have shape (B, G, N) with B = ", batch, ", got ", t.sizes());
  }
  TORCH_CHECK(C.sizes() == B.sizes(), "mblm: ssd C must have the shape of B ", B.sizes(),
              " (B, G, N), got ", C.sizes());
  check_groups(heads, B.size(1), B);
  check_head_params(A, D, dt_bias, x, heads, headdim, check_values);
  check_state_shape(state, "state", x, batch, heads, headdim, B.size(2));
  const auto cdt = ssd_compute_dtype(x.scalar_type());
  TORCH_CHECK(state.scalar_type() == cdt || state.scalar_type() == x.scalar_type(),
              "mblm: ssd state must be ", cdt, " or x's dtype ", x.scalar_type(), ", got ",
              state.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ssd_fwd(
    const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
    const std::optional<at::Tensor>& initial_state) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mblm::ssd_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              bool, const std::optional<at::Tensor>&)>();
  return op.call(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state);
}

SsdGrads ssd_bwd(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
                 const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                 const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                 const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                 const std::optional<at::Tensor>& initial_state, const at::Tensor& checkpoints) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mblm::ssd_bwd", "")
          .typed<SsdGrads(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&,
                          const at::Tensor&)>();
  return op.call(grad_y, grad_final_state, x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state,
                 checkpoints);
}

at::Tensor ssd_update(at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                      const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                      const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& dt_bias,
                      bool dt_softplus) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mblm::ssd_update", "")
          .typed<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, bool)>();
  return op.call(state, x, dt, A, B, C, D, dt_bias, dt_softplus);
}

}  // namespace mblm

TORCH_LIBRARY_FRAGMENT(mblm, m) {
  m.set_python_module("mblm.ops.ssd");
  // x (B, L, H, P), dt (B, L, H), A (H,), B and C (B, L, G, N), D (H,) / (H, P) / None,
  // dt_bias (H,) / None, initial_state (B, H, P, N) / None; any strides.
  // y: (B, L, H, P) contiguous in x's dtype; final_state: (B, H, P, N) in the compute dtype;
  // checkpoints: (B, H, ceil(L / 256), P, N) in the compute dtype, the state entering every
  // block of 256 steps (what ssd_bwd recomputes from).
  m.def(
      "ssd_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? dt_bias, "
      "bool dt_softplus, Tensor? initial_state) "
      "-> (Tensor y, Tensor final_state, Tensor checkpoints)");
  // Gradients w.r.t. every forward input, each in its input's dtype and shape (grad_dt in dt's
  // dtype); grad_D / grad_dt_bias / grad_initial_state have 0 elements when that input is None.
  // grad_final_state None counts as zeros. No double backward.
  m.def(
      "ssd_bwd(Tensor grad_y, Tensor? grad_final_state, Tensor x, Tensor dt, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? dt_bias, bool dt_softplus, Tensor? initial_state, "
      "Tensor checkpoints) -> (Tensor grad_x, Tensor grad_dt, Tensor grad_A, Tensor grad_B, "
      "Tensor grad_C, Tensor grad_D, Tensor grad_dt_bias, Tensor grad_initial_state)");
  // One decode step: state (B, H, P, N) advanced in place, x (B, H, P), dt (B, H), B and C
  // (B, G, N). Returns y (B, H, P) in x's dtype. No autograd.
  m.def(
      "ssd_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? dt_bias, bool dt_softplus) -> Tensor");
}
