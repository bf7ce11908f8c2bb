// Patch family, CPU kernels: patch_pad, stage_input_fwd/bwd, patch_unpatch_fwd/bwd.
// Checks: csrc/ops/patch.cpp. Semantics: mblm/ops/reference.py.
//
// Every kernel is one memory pass. The pure copies (patch_pad, patch_unpatch_*) move bytes and
// are dispatched on the element size, not the dtype; stage_input_* is dispatched once per op over
// float64/float32/float16/bfloat16.
#include "mblm/patch.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace mblm {

namespace {

// Bytes moved per at::parallel_for chunk: small problems stay on one thread.
constexpr int64_t kGrainBytes = 32 * 1024;
// Upper bound on the per-chunk partial sums of stage_input_bwd (elements of the accumulator).
constexpr int64_t kPartialBudget = int64_t{1} << 22;

int64_t row_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(1, row_bytes));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tensor itself when its last dim is contiguous, else a contiguous copy.
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// ------------------------------------------------------------------------------------------
// patch_pad
// ------------------------------------------------------------------------------------------

template <typename bits_t>
void patch_pad_kernel(const at::Tensor& ids, const at::Tensor& out, int64_t padded_len,
                      int64_t pad_id) {
  const int64_t batch = ids.size(0), length = ids.size(1);
  const int64_t s0 = ids.stride(0), s1 = ids.stride(1);
  const bits_t pad = static_cast<bits_t>(pad_id);  // modular: the two's complement bit pattern
  const auto* in = static_cast<const bits_t*>(ids.const_data_ptr());
  auto* dst_base = static_cast<bits_t*>(out.data_ptr());
  const int64_t total = batch * padded_len;
  at::parallel_for(0, total, kGrainBytes / int64_t{sizeof(bits_t)},
                   [&](int64_t begin, int64_t end) {
                     for (int64_t i = begin; i < end;) {
                       const int64_t b = i / padded_len, t0 = i % padded_len;
                       const int64_t t1 = std::min(padded_len, t0 + (end - i));
                       const bits_t* src = in + b * s0;
                       bits_t* dst = dst_base + b * padded_len;
                       const int64_t copy_end = std::min(t1, length);
                       if (s1 == 1) {
                         if (copy_end > t0)
                           std::memcpy(dst + t0, src + t0, (copy_end - t0) * sizeof(bits_t));
                       } else {
                         for (int64_t t = t0; t < copy_end; ++t) dst[t] = src[t * s1];
                       }
                       for (int64_t t = std::max(t0, length); t < t1; ++t) dst[t] = pad;
                       i += t1 - t0;
                     }
                   });
}

at::Tensor patch_pad_cpu(const at::Tensor& ids, at::IntArrayRef inner_sizes, int64_t pad_id) {
  check_patch_pad_args(ids, inner_sizes);
  check_patch_pad_value(ids, pad_id);
  const int64_t batch = ids.size(0), length = ids.size(1);
  const int64_t inner = patch_inner_numel(inner_sizes);
  const int64_t patches = ceil_div(length, inner);
  std::vector<int64_t> shape{batch, patches};
  shape.insert(shape.end(), inner_sizes.begin(), inner_sizes.end());
  at::Tensor out = at::empty(shape, ids.options());
  const int64_t padded_len = patches * inner;
  switch (ids.element_size()) {
    case 1:
      patch_pad_kernel<uint8_t>(ids, out, padded_len, pad_id);
      break;
    case 2:
      patch_pad_kernel<uint16_t>(ids, out, padded_len, pad_id);
      break;
    case 4:
      patch_pad_kernel<uint32_t>(ids, out, padded_len, pad_id);
      break;
    default:
      patch_pad_kernel<uint64_t>(ids, out, padded_len, pad_id);
      break;
  }
  return out;
}

// ------------------------------------------------------------------------------------------
// stage_input
// ------------------------------------------------------------------------------------------

// a + b rounded to scalar_t (for float16/bfloat16: computed in float32, rounded once, as
// torch's elementwise add does), so the result is bit-identical to the reference.
template <typename scalar_t>
inline scalar_t add_round(scalar_t a, scalar_t b) {
  using acc_t = at::opmath_type<scalar_t>;
  return static_cast<scalar_t>(static_cast<acc_t>(a) + static_cast<acc_t>(b));
}

template <typename scalar_t>
void stage_input_fwd_kernel(const at::Tensor& x, const at::Tensor& start,
                            const std::optional<at::Tensor>& pos,
                            const std::optional<at::Tensor>& prev, const at::Tensor& out) {
  const int64_t n = x.size(0), s = x.size(1), dim = x.size(2), rows_per_seq = s + 1;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* sp = start.const_data_ptr<scalar_t>();
  const scalar_t* pp = pos.has_value() ? pos->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* vp = prev.has_value() ? prev->const_data_ptr<scalar_t>() : nullptr;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  const int64_t ps0 = pos.has_value() ? pos->stride(0) : 0;
  const int64_t vs0 = prev.has_value() ? prev->stride(0) : 0;
  const int64_t vs1 = prev.has_value() ? prev->stride(1) : 0;
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t grain = row_grain(dim * static_cast<int64_t>(sizeof(scalar_t)));
  at::parallel_for(0, n * rows_per_seq, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* __restrict o = op + row * dim;
      const int64_t b = row / rows_per_seq, r = row % rows_per_seq;
      if (r == 0) {
        std::memcpy(o, sp, dim * sizeof(scalar_t));
        continue;
      }
      const int64_t j = r - 1;
      const scalar_t* __restrict xr = xp + b * xs0 + j * xs1;
      const scalar_t* __restrict pr = pp ? pp + j * ps0 : nullptr;
      const scalar_t* __restrict vr = vp ? vp + b * vs0 + j * vs1 : nullptr;
      if (pr && vr) {
        for (int64_t d = 0; d < dim; ++d) o[d] = add_round(add_round(xr[d], pr[d]), vr[d]);
      } else if (pr) {
        for (int64_t d = 0; d < dim; ++d) o[d] = add_round(xr[d], pr[d]);
      } else if (vr) {
        for (int64_t d = 0; d < dim; ++d) o[d] = add_round(xr[d], vr[d]);
      } else {
        std::memcpy(o, xr, dim * sizeof(scalar_t));
      }
    }
  });
}

at::Tensor stage_input_fwd_cpu(const at::Tensor& x_in, const at::Tensor& start_in,
                               const std::optional<at::Tensor>& pos_in,
                               const std::optional<at::Tensor>& prev_in) {
  check_stage_input_args(x_in, start_in, pos_in, prev_in);
  const at::Tensor x = last_dim_contiguous(x_in);
  const at::Tensor start = last_dim_contiguous(start_in);
  std::optional<at::Tensor> pos, prev;
  if (pos_in.has_value()) pos = last_dim_contiguous(*pos_in);
  if (prev_in.has_value()) prev = last_dim_contiguous(*prev_in);
  at::Tensor out = at::empty({x.size(0), x.size(1) + 1, x.size(2)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "stage_input_fwd_cpu",
      [&] { stage_input_fwd_kernel<scalar_t>(x, start, pos, prev, out); });
  return out;
}

// One pass over grad: copies its rows 1.. into grad_x (and grad_prev) and accumulates the sums
// over N of rows 0 (grad_start) and 1.. (grad_pos) into per-chunk partial sums, reduced at the
// end. Work is split into (chunk of N) x (block of rows) tasks, so both the global stage (N = B
// small, S long) and the local stage (N huge, S short) use every thread; the result depends on
// the thread count only through the summation order of the partial sums.
template <typename scalar_t>
void stage_input_bwd_kernel(const at::Tensor& grad, const at::Tensor& grad_x,
                            const at::Tensor& grad_start, const at::Tensor* grad_pos,
                            const at::Tensor* grad_prev) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = grad.size(0), rows = grad.size(1), dim = grad.size(2), s = rows - 1;
  const int64_t acc_rows = grad_pos ? rows : 1;
  const int64_t threads = at::get_num_threads();

  int64_t n_chunks = std::clamp<int64_t>(
      std::min(n, threads), 1,
      std::max<int64_t>(1, kPartialBudget / std::max<int64_t>(1, acc_rows * dim)));
  const int64_t chunk = std::max<int64_t>(1, ceil_div(n, n_chunks));
  n_chunks = std::max<int64_t>(1, ceil_div(n, chunk));
  const int64_t row_blocks = std::clamp<int64_t>(ceil_div(4 * threads, n_chunks), 1, rows);
  const int64_t block = ceil_div(rows, row_blocks);
  const int64_t n_blocks = ceil_div(rows, block);

  at::Tensor partial = at::zeros({n_chunks, acc_rows, dim},
                                 grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* acc = partial.data_ptr<acc_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1);
  scalar_t* gx = grad_x.data_ptr<scalar_t>();
  scalar_t* gv = grad_prev ? grad_prev->data_ptr<scalar_t>() : nullptr;

  at::parallel_for(0, n_chunks * n_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / n_blocks, rb = task % n_blocks;
      const int64_t n0 = c * chunk, n1 = std::min(n, n0 + chunk);
      const int64_t r0 = rb * block, r1 = std::min(rows, r0 + block);
      for (int64_t b = n0; b < n1; ++b) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* __restrict src = gp + b * gs0 + r * gs1;
          acc_t* __restrict a = r < acc_rows ? acc + (c * acc_rows + r) * dim : nullptr;
          if (r == 0) {
            for (int64_t d = 0; d < dim; ++d) a[d] += static_cast<acc_t>(src[d]);
            continue;
          }
          scalar_t* __restrict dx = gx + (b * s + r - 1) * dim;
          if (a) {
            for (int64_t d = 0; d < dim; ++d) {
              const scalar_t v = src[d];
              dx[d] = v;
              a[d] += static_cast<acc_t>(v);
            }
          } else {
            std::memcpy(dx, src, dim * sizeof(scalar_t));
          }
          if (gv) std::memcpy(gv + (b * s + r - 1) * dim, dx, dim * sizeof(scalar_t));
        }
      }
    }
  });

  scalar_t* gs = grad_start.data_ptr<scalar_t>();
  scalar_t* gpos = grad_pos ? grad_pos->data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, acc_rows * dim, kGrainBytes / 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t sum = 0;
      for (int64_t c = 0; c < n_chunks; ++c) sum += acc[c * acc_rows * dim + i];
      if (i < dim) {
        gs[i] = static_cast<scalar_t>(sum);
      } else {
        gpos[i - dim] = static_cast<scalar_t>(sum);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stage_input_bwd_cpu(
    const at::Tensor& grad_in, bool has_pos, bool has_prev) {
  check_stage_input_bwd_args(grad_in);
  const at::Tensor grad = last_dim_contiguous(grad_in);
  const int64_t n = grad.size(0), s = grad.size(1) - 1, dim = grad.size(2);
  const auto opts = grad.options();
  at::Tensor grad_x = at::empty({n, s, dim}, opts);
  at::Tensor grad_start = at::empty({dim}, opts);
  at::Tensor grad_pos = has_pos ? at::empty({s, dim}, opts) : at::empty({0}, opts);
  at::Tensor grad_prev = has_prev ? at::empty({n, s, dim}, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "stage_input_bwd_cpu", [&] {
        stage_input_bwd_kernel<scalar_t>(grad, grad_x, grad_start, has_pos ? &grad_pos : nullptr,
                                         has_prev ? &grad_prev : nullptr);
      });
  return {grad_x, grad_start, grad_pos, grad_prev};
}

// ------------------------------------------------------------------------------------------
// patch_unpatch
// ------------------------------------------------------------------------------------------

// y viewed as (B, G, 1 + P, D) with a contiguous last dim (a view when the strides allow).
at::Tensor as_groups(const at::Tensor& y) {
  const int64_t batch = y.size(0), rows = y.size(-2), dim = y.size(-1);
  int64_t groups = 1;
  for (int64_t d = 1; d < y.dim() - 2; ++d) groups *= y.size(d);
  return last_dim_contiguous(y).reshape({batch, groups, rows, dim});
}

at::Tensor patch_unpatch_fwd_cpu(const at::Tensor& y_in, int64_t length, bool with_start) {
  check_patch_unpatch_args(y_in, length, with_start);
  const at::Tensor y = as_groups(y_in);
  const int64_t batch = y.size(0), per_group = y.size(2) - 1, dim = y.size(3);
  const int64_t ys0 = y.stride(0), ys1 = y.stride(1), ys2 = y.stride(2);
  at::Tensor out = at::empty({batch, length, dim}, y.options());
  const int64_t row_bytes = dim * y.element_size();
  const auto* src = static_cast<const char*>(y.const_data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  const int64_t esize = y.element_size();
  const int64_t offset = with_start ? 1 : 0;
  at::parallel_for(0, batch * length, row_grain(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / length, t = row % length - offset;
      int64_t g = 0, r = 0;  // t == -1: the start row of the first local sequence
      if (t >= 0) g = t / per_group, r = 1 + t % per_group;
      std::memcpy(dst + row * row_bytes, src + (b * ys0 + g * ys1 + r * ys2) * esize, row_bytes);
    }
  });
  return out;
}

at::Tensor patch_unpatch_bwd_cpu(const at::Tensor& grad_in, at::IntArrayRef y_shape,
                                 bool with_start) {
  check_patch_unpatch_bwd_args(grad_in, y_shape, with_start);
  const at::Tensor grad = last_dim_contiguous(grad_in);
  const int64_t length = grad.size(1);
  at::Tensor out = at::empty(y_shape, grad.options());
  const int64_t ndim = static_cast<int64_t>(y_shape.size());
  const int64_t rows = y_shape[ndim - 2], per_group = rows - 1, dim = y_shape[ndim - 1];
  const int64_t total_rows = dim > 0 ? out.numel() / dim : 0;
  const int64_t groups_per_batch =
      y_shape[0] > 0 && rows > 0 ? total_rows / (y_shape[0] * rows) : 0;
  const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1);
  const int64_t esize = grad.element_size(), row_bytes = dim * esize;
  const auto* src = static_cast<const char*>(grad.const_data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  const int64_t offset = with_start ? 1 : 0;
  at::parallel_for(0, total_rows, row_grain(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t r = row % rows, bg = row / rows;
      const int64_t b = bg / groups_per_batch, g = bg % groups_per_batch;
      int64_t t = -1;  // the position in grad this row was read to, -1 if none
      if (r > 0) {
        t = g * per_group + (r - 1) + offset;
      } else if (with_start && g == 0) {
        t = 0;
      }
      char* o = dst + row * row_bytes;
      if (t >= 0 && t < length) {
        std::memcpy(o, src + (b * gs0 + t * gs1) * esize, row_bytes);
      } else {
        std::memset(o, 0, row_bytes);  // all-zero bits: +0.0 in every float format
      }
    }
  });
  return out;
}

}  // namespace

}  // namespace mblm

TORCH_LIBRARY_IMPL(mblm, CPU, m) {
  m.impl("patch_pad", &mblm::patch_pad_cpu);
  m.impl("stage_input_fwd", &mblm::stage_input_fwd_cpu);
  m.impl("stage_input_bwd", &mblm::stage_input_bwd_cpu);
  m.impl("patch_unpatch_fwd", &mblm::patch_unpatch_fwd_cpu);
  m.impl("patch_unpatch_bwd", &mblm::patch_unpatch_bwd_cpu);
}
