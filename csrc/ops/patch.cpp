// Patch family: schemas, the argument checks shared by the CPU and CUDA kernels, and C++ front
// functions that call the ops through the dispatcher. Semantics: mblm/ops/reference.py
// (patch_pad_ref, stage_input_ref, patch_unpatch_ref).
#include "mblm/patch.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

namespace mblm {

namespace {

bool is_kernel_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool is_id_integer(at::ScalarType t) {
  return t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong;
}

// The inclusive range of values an integer id dtype holds.
std::pair<int64_t, int64_t> id_range(at::ScalarType t) {
  switch (t) {
    case at::kByte:
      return {0, std::numeric_limits<uint8_t>::max()};
    case at::kChar:
      return {std::numeric_limits<int8_t>::min(), std::numeric_limits<int8_t>::max()};
    case at::kShort:
      return {std::numeric_limits<int16_t>::min(), std::numeric_limits<int16_t>::max()};
    case at::kInt:
      return {std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()};
    default:
      return {std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()};
  }
}

// x/start/pos/prev share one dtype and device: the first argument given is the reference.
void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "mblm: stage_input ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "mblm: stage_input ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type(),
              " (x, start, pos and prev must share one dtype)");
}

}  // namespace

int64_t patch_inner_numel(at::IntArrayRef inner_sizes) {
  int64_t numel = 1;
  for (const int64_t s : inner_sizes) numel *= s;
  return numel;
}

int64_t patch_unpatch_rows(at::IntArrayRef y_shape, bool with_start) {
  const int64_t ndim = static_cast<int64_t>(y_shape.size());
  int64_t groups = 1;
  for (int64_t d = 1; d < ndim - 2; ++d) groups *= y_shape[d];
  const int64_t per_group = y_shape[ndim - 2] - 1;
  return groups * per_group + (with_start && groups > 0 ? 1 : 0);
}

void check_patch_pad_args(const at::Tensor& ids, at::IntArrayRef inner_sizes) {
  TORCH_CHECK(ids.dim() == 2, "mblm: patch_pad ids must have 2 dims (B, L), got shape ",
              ids.sizes());
  TORCH_CHECK(is_id_integer(ids.scalar_type()),
              "mblm: patch_pad ids must be an integer tensor (uint8/int8/int16/int32/int64), got "
              "dtype ",
              ids.scalar_type());
  uint64_t numel = 1;
  for (const int64_t s : inner_sizes) {
    TORCH_CHECK(s >= 1, "mblm: patch_pad inner_sizes must all be >= 1, got ", inner_sizes);
    TORCH_CHECK(!c10::mul_overflows(numel, static_cast<uint64_t>(s), &numel) &&
                    numel <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max() / 2),
                "mblm: patch_pad inner_sizes ", inner_sizes, " have a product too large");
  }
  const int64_t inner = static_cast<int64_t>(numel);
  const int64_t length = ids.size(1);
  TORCH_CHECK(length <= std::numeric_limits<int64_t>::max() - inner,
              "mblm: patch_pad ids length L = ", length, " is too large to pad to a multiple of ",
              inner);
}

void check_patch_pad_value(const at::Tensor& ids, int64_t pad_id) {
  const auto [lo, hi] = id_range(ids.scalar_type());
  TORCH_CHECK(pad_id >= lo && pad_id <= hi, "mblm: patch_pad pad_id = ", pad_id,
              " does not fit ids of dtype ", ids.scalar_type(), " (range ", lo, " to ", hi, ")");
}

void check_stage_input_args(const at::Tensor& x, const at::Tensor& start,
                            const std::optional<at::Tensor>& pos,
                            const std::optional<at::Tensor>& prev) {
  TORCH_CHECK(x.dim() == 3, "mblm: stage_input x must have 3 dims (N, S, D), got shape ",
              x.sizes());
  TORCH_CHECK(is_kernel_float(x.scalar_type()),
              "mblm: stage_input x must be float64/float32/float16/bfloat16, got dtype ",
              x.scalar_type());
  const int64_t n = x.size(0), s = x.size(1), d = x.size(2);
  check_like_x(start, "start", x);
  TORCH_CHECK(start.dim() == 1 && start.size(0) == d,
              "mblm: stage_input start must have shape (D,) = (", d, ",), got ", start.sizes());
  if (pos.has_value()) {
    check_like_x(*pos, "pos", x);
    TORCH_CHECK(pos->dim() == 2 && pos->size(0) == s && pos->size(1) == d,
                "mblm: stage_input pos must have shape (S, D) = (", s, ", ", d, "), got ",
                pos->sizes());
  }
  if (prev.has_value()) {
    check_like_x(*prev, "prev", x);
    TORCH_CHECK(prev->dim() == 3 && prev->size(0) == n && prev->size(1) == s && prev->size(2) == d,
                "mblm: stage_input prev must have the shape of x (N, S, D) = (", n, ", ", s, ", ",
                d, "), got ", prev->sizes());
  }
}

void check_stage_input_bwd_args(const at::Tensor& grad) {
  TORCH_CHECK(grad.dim() == 3 && grad.size(1) >= 1,
              "mblm: stage_input_bwd grad must have 3 dims (N, 1 + S, D) with 1 + S >= 1, got "
              "shape ",
              grad.sizes());
  TORCH_CHECK(is_kernel_float(grad.scalar_type()),
              "mblm: stage_input_bwd grad must be float64/float32/float16/bfloat16, got dtype ",
              grad.scalar_type());
}

void check_patch_unpatch_args(const at::Tensor& y, int64_t length, bool with_start) {
  TORCH_CHECK(y.dim() >= 3, "mblm: patch_unpatch y must have at least 3 dims (B, ..., 1 + P, D), ",
              "got shape ", y.sizes());
  TORCH_CHECK(is_kernel_float(y.scalar_type()),
              "mblm: patch_unpatch y must be float64/float32/float16/bfloat16, got dtype ",
              y.scalar_type());
  TORCH_CHECK(y.size(-2) >= 1,
              "mblm: patch_unpatch y.size(-2) must be >= 1 (the start position plus P patch "
              "positions), got shape ",
              y.sizes());
  TORCH_CHECK(length >= 0, "mblm: patch_unpatch length must be >= 0, got ", length);
  const int64_t rows = patch_unpatch_rows(y.sizes(), with_start);
  TORCH_CHECK(length <= rows, "mblm: patch_unpatch length = ", length,
              " exceeds the rows that y of shape ", y.sizes(), " holds (", rows,
              with_start ? ", start row included)" : ", start rows dropped)");
}

void check_patch_unpatch_bwd_args(const at::Tensor& grad, at::IntArrayRef y_shape,
                                  bool with_start) {
  TORCH_CHECK(y_shape.size() >= 3,
              "mblm: patch_unpatch_bwd y_shape must have at least 3 entries (B, ..., 1 + P, D), "
              "got ",
              y_shape);
  for (const int64_t s : y_shape) {
    TORCH_CHECK(s >= 0, "mblm: patch_unpatch_bwd y_shape must be non-negative, got ", y_shape);
  }
  TORCH_CHECK(y_shape[y_shape.size() - 2] >= 1,
              "mblm: patch_unpatch_bwd y_shape[-2] must be >= 1 (1 + P), got ", y_shape);
  TORCH_CHECK(is_kernel_float(grad.scalar_type()),
              "mblm: patch_unpatch_bwd grad must be float64/float32/float16/bfloat16, got dtype ",
              grad.scalar_type());
  const int64_t batch = y_shape[0], dim = y_shape[y_shape.size() - 1];
  const int64_t rows = patch_unpatch_rows(y_shape, with_start);
  TORCH_CHECK(
      grad.dim() == 3 && grad.size(0) == batch && grad.size(1) <= rows && grad.size(2) == dim,
      "mblm: patch_unpatch_bwd grad must have shape (B, length, D) = (", batch, ", <= ", rows, ", ",
      dim, ") for y_shape ", y_shape, ", got ", grad.sizes());
}

at::Tensor patch_pad(const at::Tensor& ids, at::IntArrayRef inner_sizes, int64_t pad_id) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mblm::patch_pad", "")
                             .typed<at::Tensor(const at::Tensor&, at::IntArrayRef, int64_t)>();
  return op.call(ids, inner_sizes, pad_id);
}

at::Tensor stage_input_fwd(const at::Tensor& x, const at::Tensor& start,
                           const std::optional<at::Tensor>& pos,
                           const std::optional<at::Tensor>& prev) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mblm::stage_input_fwd", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&)>();
  return op.call(x, start, pos, prev);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stage_input_bwd(const at::Tensor& grad,
                                                                           bool has_pos,
                                                                           bool has_prev) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mblm::stage_input_bwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, bool, bool)>();
  return op.call(grad, has_pos, has_prev);
}

at::Tensor patch_unpatch_fwd(const at::Tensor& y, int64_t length, bool with_start) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mblm::patch_unpatch_fwd", "")
                             .typed<at::Tensor(const at::Tensor&, c10::SymInt, bool)>();
  return op.call(y, c10::SymInt(length), with_start);
}

at::Tensor patch_unpatch_bwd(const at::Tensor& grad, at::IntArrayRef y_shape, bool with_start) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mblm::patch_unpatch_bwd", "")
                             .typed<at::Tensor(const at::Tensor&, c10::SymIntArrayRef, bool)>();
  return op.call(grad, c10::fromIntArrayRefSlow(y_shape), with_start);
}

}  // namespace mblm

TORCH_LIBRARY_FRAGMENT(mblm, m) {
  m.set_python_module("mblm.ops.patch");
  // ids: (B, L) integer, any strides -> (B, ceil(L / prod(inner_sizes)), *inner_sizes), ids'
  // dtype, contiguous, right-padded with pad_id. Empty inner_sizes: (B, L).
  m.def("patch_pad(Tensor ids, int[] inner_sizes, int pad_id) -> Tensor");
  // x: (N, S, D), start: (D), pos: (S, D) or None, prev: (N, S, D) or None; one dtype, any
  // strides. -> (N, 1 + S, D) contiguous: row 0 = start, row j + 1 = (x[:, j] + pos[j]) +
  // prev[:, j].
  m.def("stage_input_fwd(Tensor x, Tensor start, Tensor? pos, Tensor? prev) -> Tensor");
  // grad: (N, 1 + S, D). grad_x = grad[:, 1:] (contiguous copy), grad_start = sum_n grad[:, 0],
  // grad_pos = sum_n grad[:, 1:] ((S, D); 0 elements unless has_pos), grad_prev = grad[:, 1:]
  // (a second copy; 0 elements unless has_prev). Sums accumulate in float32 (float64 for
  // float64).
  m.def(
      "stage_input_bwd(Tensor grad, bool has_pos, bool has_prev) "
      "-> (Tensor grad_x, Tensor grad_start, Tensor grad_pos, Tensor grad_prev)");
  // y: (B, ..., 1 + P, D) -> (B, length, D) contiguous: the start row of the first local
  // sequence (with_start) then every non-start row, middle dims flattened row-major.
  m.def("patch_unpatch_fwd(Tensor y, SymInt length, bool with_start) -> Tensor");
  // grad: (B, length, D) -> (y_shape) contiguous, zeros at the rows patch_unpatch_fwd skips.
  m.def("patch_unpatch_bwd(Tensor grad, SymInt[] y_shape, bool with_start) -> Tensor");
}
