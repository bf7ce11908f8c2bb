// Scan family: schemas, the argument checks shared by the CPU and CUDA kernels, and C++ front
// functions that call the ops through the dispatcher. Semantics: mblm/ops/reference.py
// (selective_scan_ref).
#include "mblm/scan.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "mblm/scan_params.h"

namespace mblm {

namespace {

bool is_kernel_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& u, const char* op) {
  TORCH_CHECK(t.device() == u.device(), "mblm: ", op, " ", name, " is on ", t.device(),
              " but u is on ", u.device());
}

// delta, z, B, C (and grad_y): the dtype of u.
void check_like_u_dtype(const at::Tensor& t, const char* name, const at::Tensor& u,
                        const char* op) {
  TORCH_CHECK(t.scalar_type() == u.scalar_type(), "mblm: ", op, " ", name, " has dtype ",
              t.scalar_type(), " but u has dtype ", u.scalar_type(), " (u, delta, z, B and C ",
              "must share one dtype)");
}

// A, D, delta_bias: float32, or float32/float64 for float64 u.
void check_weight_dtype(const at::Tensor& t, const char* name, const at::Tensor& u,
                        const char* op) {
  const auto dt = t.scalar_type();
  const bool ok = dt == at::kFloat || (dt == at::kDouble && u.scalar_type() == at::kDouble);
  TORCH_CHECK(ok, "mblm: ", op, " ", name, " must be float32",
              u.scalar_type() == at::kDouble ? " or float64" : "", " for u of dtype ",
              u.scalar_type(), ", got dtype ", dt);
}

void check_shape3(const at::Tensor& t, const char* name, const char* dims, int64_t a, int64_t b,
                  int64_t c, const char* op) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == a && t.size(1) == b && t.size(2) == c, "mblm: ", op, " ",
              name, " must have shape ", dims, " = (", a, ", ", b, ", ", c, "), got ", t.sizes());
}

void check_shape2(const at::Tensor& t, const char* name, const char* dims, int64_t a, int64_t b,
                  const char* op) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == a && t.size(1) == b, "mblm: ", op, " ", name,
              " must have shape ", dims, " = (", a, ", ", b, "), got ", t.sizes());
}

void check_vector(const std::optional<at::Tensor>& t, const char* name, int64_t d,
                  const at::Tensor& u, const char* op) {
  if (!t.has_value()) return;
  check_device(*t, name, u, op);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == d, "mblm: ", op, " ", name,
              " must have shape (D,) = (", d, ",), got ", t->sizes());
  check_weight_dtype(*t, name, u, op);
}

// True when no element has an all-ones exponent (inf / NaN). Integer ops, so the loop vectorizes.
template <typename Bits>
bool all_finite(const void* data, int64_t n, Bits exponent) {
  const auto* p = static_cast<const Bits*>(data);
  Bits bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<Bits>((p[i] & exponent) == exponent);
  return bad == 0;
}

// A is a small float32 / float64 CPU tensor (D x N): a plain loop, no ATen ops per call.
bool all_finite(const at::Tensor& A) {
  const at::Tensor a = A.contiguous();
  if (a.scalar_type() == at::kDouble) {
    return all_finite<uint64_t>(a.const_data_ptr(), a.numel(), 0x7ff0000000000000ull);
  }
  return all_finite<uint32_t>(a.const_data_ptr(), a.numel(), 0x7f800000u);
}

void check_A(const at::Tensor& A, int64_t d, const at::Tensor& u, const char* op) {
  check_device(A, "A", u, op);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == d, "mblm: ", op,
              " A must have shape (D, N) with D = ", d, " (u.size(1)), got ", A.sizes());
  check_weight_dtype(A, "A", u, op);
  if (A.device().is_cpu() && A.numel() > 0) {
    TORCH_CHECK(all_finite(A), "mblm: ", op, " A must be finite (no inf or NaN entries)");
  }
}

void check_state_dtype(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(is_kernel_float(t.scalar_type()), "mblm: ", op, " ", name,
              " must be float64/float32/float16/bfloat16, got dtype ", t.scalar_type());
}

}  // namespace

at::Tensor scan_empty_like(const at::Tensor& t, at::ScalarType dtype) {
  const auto opts = t.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous);
  const int64_t b = t.size(0), x = t.size(1), l = t.size(2);
  if (t.stride(1) < t.stride(2)) return at::empty({b, l, x}, opts).transpose(1, 2);
  return at::empty({b, x, l}, opts);
}

void check_scan_fwd_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                         const at::Tensor& B, const at::Tensor& C,
                         const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                         const std::optional<at::Tensor>& delta_bias,
                         const std::optional<at::Tensor>& initial_state) {
  const char* op = "scan";
  TORCH_CHECK(u.dim() == 3, "mblm: scan u must have 3 dims (B, D, L), got shape ", u.sizes());
  TORCH_CHECK(is_kernel_float(u.scalar_type()),
              "mblm: scan u must be float64/float32/float16/bfloat16, got dtype ", u.scalar_type());
  const int64_t batch = u.size(0), dim = u.size(1), length = u.size(2);
  check_device(delta, "delta", u, op);
  check_shape3(delta, "delta", "(B, D, L)", batch, dim, length, op);
  check_like_u_dtype(delta, "delta", u, op);
  TORCH_CHECK(A.dim() == 2, "mblm: scan A must have 2 dims (D, N), got shape ", A.sizes());
  const int64_t n = A.size(1);
  check_A(A, dim, u, op);
  check_device(B, "B", u, op);
  check_shape3(B, "B", "(B, N, L)", batch, n, length, op);
  check_like_u_dtype(B, "B", u, op);
  check_device(C, "C", u, op);
  check_shape3(C, "C", "(B, N, L)", batch, n, length, op);
  check_like_u_dtype(C, "C", u, op);
  check_vector(D, "D", dim, u, op);
  if (z.has_value()) {
    check_device(*z, "z", u, op);
    check_shape3(*z, "z", "(B, D, L)", batch, dim, length, op);
    check_like_u_dtype(*z, "z", u, op);
  }
  check_vector(delta_bias, "delta_bias", dim, u, op);
  if (initial_state.has_value()) {
    check_device(*initial_state, "initial_state", u, op);
    check_shape3(*initial_state, "initial_state", "(B, D, N)", batch, dim, n, op);
    check_state_dtype(*initial_state, "initial_state", op);
  }
}

void check_scan_bwd_args(const at::Tensor& grad_y,
                         const std::optional<at::Tensor>& grad_final_state, const at::Tensor& u,
                         const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& C, const std::optional<at::Tensor>& D,
                         const std::optional<at::Tensor>& z,
                         const std::optional<at::Tensor>& delta_bias,
                         const std::optional<at::Tensor>& initial_state,
                         const at::Tensor& checkpoints) {
  check_scan_fwd_args(u, delta, A, B, C, D, z, delta_bias, initial_state);
  const char* op = "scan_bwd";
  const int64_t batch = u.size(0), dim = u.size(1), length = u.size(2), n = A.size(1);
  const auto cdt = scan_compute_dtype(u);
  check_device(grad_y, "grad_y", u, op);
  check_shape3(grad_y, "grad_y", "(B, D, L)", batch, dim, length, op);
  check_like_u_dtype(grad_y, "grad_y", u, op);
  if (grad_final_state.has_value()) {
    check_device(*grad_final_state, "grad_final_state", u, op);
    check_shape3(*grad_final_state, "grad_final_state", "(B, D, N)", batch, dim, n, op);
    TORCH_CHECK(grad_final_state->scalar_type() == cdt, "mblm: scan_bwd grad_final_state must ",
                "have the dtype of the final state, ", cdt, ", got ",
                grad_final_state->scalar_type());
  }
  check_device(checkpoints, "checkpoints", u, op);
  const int64_t chunks = scan_num_chunks(length);
  TORCH_CHECK(
      checkpoints.dim() == 4 && checkpoints.size(0) == batch && checkpoints.size(1) == chunks &&
          checkpoints.size(2) == n && checkpoints.size(3) == dim,
      "mblm: scan_bwd checkpoints must have shape (B, ceil(L / ", kScanChunk, "), N, D) = (", batch,
      ", ", chunks, ", ", n, ", ", dim, "), got ", checkpoints.sizes());
  TORCH_CHECK(checkpoints.scalar_type() == cdt, "mblm: scan_bwd checkpoints must have dtype ", cdt,
              ", got ", checkpoints.scalar_type());
}

void check_scan_update_args(const at::Tensor& state, const at::Tensor& u, const at::Tensor& delta,
                            const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                            const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                            const std::optional<at::Tensor>& delta_bias) {
  const char* op = "scan_update";
  TORCH_CHECK(u.dim() == 2, "mblm: scan_update u must have 2 dims (B, D), got shape ", u.sizes());
  TORCH_CHECK(is_kernel_float(u.scalar_type()),
              "mblm: scan_update u must be float64/float32/float16/bfloat16, got dtype ",
              u.scalar_type());
  const int64_t batch = u.size(0), dim = u.size(1);
  check_device(delta, "delta", u, op);
  check_shape2(delta, "delta", "(B, D)", batch, dim, op);
  check_like_u_dtype(delta, "delta", u, op);
  TORCH_CHECK(A.dim() == 2, "mblm: scan_update A must have 2 dims (D, N), got shape ", A.sizes());
  const int64_t n = A.size(1);
  check_A(A, dim, u, op);
  check_device(B, "B", u, op);
  check_shape2(B, "B", "(B, N)", batch, n, op);
  check_like_u_dtype(B, "B", u, op);
  check_device(C, "C", u, op);
  check_shape2(C, "C", "(B, N)", batch, n, op);
  check_like_u_dtype(C, "C", u, op);
  check_vector(D, "D", dim, u, op);
  if (z.has_value()) {
    check_device(*z, "z", u, op);
    check_shape2(*z, "z", "(B, D)", batch, dim, op);
    check_like_u_dtype(*z, "z", u, op);
  }
  check_vector(delta_bias, "delta_bias", dim, u, op);
  check_device(state, "state", u, op);
  check_shape3(state, "state", "(B, D, N)", batch, dim, n, op);
  check_state_dtype(state, "state", op);
  TORCH_CHECK(at::has_internal_overlap(state) != at::MemOverlap::Yes,
              "mblm: scan_update state is updated in place and must not have overlapping memory ",
              "(e.g. an expanded tensor), got strides ", state.strides());
}

void check_scan_cuda_limits(const at::Tensor& u, int64_t n) {
  TORCH_CHECK(u.scalar_type() != at::kDouble,
              "mblm: scan CUDA kernels take float32/float16/bfloat16 u, got float64 (the CPU ",
              "kernels take float64)");
  TORCH_CHECK(n <= kScanMaxStateCuda,
              "mblm: scan CUDA kernels take state sizes N <= ", kScanMaxStateCuda, ", got N = ", n);
  TORCH_CHECK(u.size(0) < (int64_t{1} << 31) && u.size(1) <= 16 * int64_t{65535},
              "mblm: scan CUDA kernels take B < 2^31 and D <= ", 16 * 65535, ", got u of shape ",
              u.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
    const std::optional<at::Tensor>& initial_state) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mblm::scan_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&)>();
  return op.call(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state);
}

ScanGrads scan_bwd(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
                   const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                   const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                   const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                   bool delta_softplus, const std::optional<at::Tensor>& initial_state,
                   const at::Tensor& checkpoints) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mblm::scan_bwd", "")
          .typed<ScanGrads(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
                           const std::optional<at::Tensor>&, const at::Tensor&)>();
  return op.call(grad_y, grad_final_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                 initial_state, checkpoints);
}

at::Tensor scan_update(const at::Tensor& state, const at::Tensor& u, const at::Tensor& delta,
                       const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                       const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mblm::scan_update", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, bool)>();
  return op.call(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus);
}

}  // namespace mblm

TORCH_LIBRARY_FRAGMENT(mblm, m) {
  m.set_python_module("mblm.ops.scan");
  // u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L); D, delta_bias: (D,); initial_state:
  // (B, D, N); any strides. -> y (B, D, L) in u's dtype (laid out like u, see scan_empty_like),
  // final_state (B, D, N) and checkpoints (B, ceil(L / 64), N, D) in the compute dtype
  // (float32; float64 for float64 u). checkpoints[:, c] is the state before step 64 * c.
  m.def(
      "scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus, Tensor? initial_state) "
      "-> (Tensor y, Tensor final_state, Tensor checkpoints)");
  // Gradients of scan_fwd's y and final_state w.r.t. every input, each in its input's dtype and
  // shape; grad_D, grad_z, grad_delta_bias, grad_initial_state have 0 elements when that input
  // is None. No double backward.
  m.def(
      "scan_bwd(Tensor grad_y, Tensor? grad_final_state, Tensor u, Tensor delta, Tensor A, "
      "Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, "
      "Tensor? initial_state, Tensor checkpoints) -> (Tensor grad_u, Tensor grad_delta, "
      "Tensor grad_A, Tensor grad_B, Tensor grad_C, Tensor grad_D, Tensor grad_z, "
      "Tensor grad_delta_bias, Tensor grad_initial_state)");
  // One step: state (B, D, N) updated in place; u, delta, z: (B, D); B, C: (B, N). -> y (B, D)
  // contiguous in u's dtype.
  m.def(
      "scan_update(Tensor(a!) state, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
      "Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus) -> Tensor");
}
