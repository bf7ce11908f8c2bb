// Patch family, CUDA kernels: patch_pad, stage_input_fwd/bwd, patch_unpatch_fwd/bwd.
// Checks: csrc/ops/patch.cpp. Semantics: mblm/ops/reference.py.
//
// All kernels are memory bound and read any strides (no contiguous() copies). Row-wise kernels
// use 2-D blocks: threadIdx.x walks the feature dim D (coalesced), threadIdx.y and a grid-stride
// loop over blockIdx.x walk the rows, so one 64-bit row decomposition serves D / blockDim.x
// elements. The pure copies (patch_pad, patch_unpatch_*) are dispatched on the element size;
// stage_input_* once over float64/float32/float16/bfloat16. stage_input_bwd reduces over N with
// per-chunk float32 (float64) partial sums and a second small kernel: deterministic, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "mblm/patch.h"

namespace mblm {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxGridYZ = 65535;
// Upper bound on the partial sums of stage_input_bwd (elements).
constexpr int64_t kPartialBudget = int64_t{1} << 24;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.get_device()));
  return std::max(count, 1);
}

// Block shape for a (rows x dim) problem: x covers up to 128 features, y the rest of 256.
struct RowLaunch {
  dim3 grid, block;
};

RowLaunch row_launch(int64_t rows, int64_t dim, int sms) {
  const int bx = dim <= 32 ? 32 : (dim <= 64 ? 64 : 128);
  const int by = kThreads / bx;
  const int64_t blocks = std::min<int64_t>({ceil_div(rows, by), int64_t{sms} * 32, kMaxGridX});
  return {dim3(static_cast<unsigned>(std::max<int64_t>(blocks, 1))), dim3(bx, by)};
}

// q, r = a / b, a % b with a 32-bit fast path (64-bit division is emulated on the GPU).
__device__ __forceinline__ void divmod(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if (a <= UINT32_MAX && b <= UINT32_MAX) {
    const uint32_t qa = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    q = qa;
    r = a - static_cast<int64_t>(qa) * b;
  } else {
    q = a / b;
    r = a - q * b;
  }
}

// ------------------------------------------------------------------------------------------
// patch_pad
// ------------------------------------------------------------------------------------------

template <typename bits_t>
__global__ void patch_pad_kernel(const bits_t* __restrict__ in, bits_t* __restrict__ out,
                                 int64_t total, int64_t padded_len, int64_t length, int64_t s0,
                                 int64_t s1, bits_t pad) {
  const int64_t step = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total; i += step) {
    int64_t b, t;
    divmod(i, padded_len, b, t);
    out[i] = t < length ? in[b * s0 + t * s1] : pad;
  }
}

template <typename bits_t>
void launch_patch_pad(const at::Tensor& ids, const at::Tensor& out, int64_t padded_len,
                      int64_t pad_id, cudaStream_t stream) {
  const int64_t total = out.numel();
  if (total == 0) return;
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), int64_t{sm_count(ids)} * 32);
  patch_pad_kernel<bits_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const bits_t*>(ids.const_data_ptr()), static_cast<bits_t*>(out.data_ptr()), total,
      padded_len, ids.size(1), ids.stride(0), ids.stride(1), static_cast<bits_t>(pad_id));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor patch_pad_cuda(const at::Tensor& ids, at::IntArrayRef inner_sizes, int64_t pad_id) {
  check_patch_pad_args(ids, inner_sizes);
  check_patch_pad_value(ids, pad_id);
  const c10::cuda::CUDAGuard guard(ids.device());
  const int64_t batch = ids.size(0), length = ids.size(1);
  const int64_t inner = patch_inner_numel(inner_sizes);
  const int64_t patches = ceil_div(length, inner);
  std::vector<int64_t> shape{batch, patches};
  shape.insert(shape.end(), inner_sizes.begin(), inner_sizes.end());
  at::Tensor out = at::empty(shape, ids.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (ids.element_size()) {
    case 1:
      launch_patch_pad<uint8_t>(ids, out, patches * inner, pad_id, stream);
      break;
    case 2:
      launch_patch_pad<uint16_t>(ids, out, patches * inner, pad_id, stream);
      break;
    case 4:
      launch_patch_pad<uint32_t>(ids, out, patches * inner, pad_id, stream);
      break;
    default:
      launch_patch_pad<uint64_t>(ids, out, patches * inner, pad_id, stream);
      break;
  }
  return out;
}

// ------------------------------------------------------------------------------------------
// stage_input
// ------------------------------------------------------------------------------------------

// a + b rounded once to scalar_t (computed in float32 for 16-bit types), as torch's add.
template <typename scalar_t>
__device__ __forceinline__ scalar_t add_round(scalar_t a, scalar_t b) {
  using acc_t = at::opmath_type<scalar_t>;
  return static_cast<scalar_t>(static_cast<acc_t>(a) + static_cast<acc_t>(b));
}

template <typename scalar_t>
struct StageInputFwdParams {
  const scalar_t* x;
  const scalar_t* start;
  const scalar_t* pos;   // nullptr: none
  const scalar_t* prev;  // nullptr: none
  scalar_t* out;
  int64_t n, s, dim;
  int64_t xs0, xs1, xs2, ss0, ps0, ps1, vs0, vs1, vs2;
};

template <typename scalar_t>
__global__ void stage_input_fwd_kernel(const StageInputFwdParams<scalar_t> p) {
  const int64_t rows_per_seq = p.s + 1, rows = p.n * rows_per_seq;
  const int64_t step = int64_t{gridDim.x} * blockDim.y;
  for (int64_t row = int64_t{blockIdx.x} * blockDim.y + threadIdx.y; row < rows; row += step) {
    int64_t b, r;
    divmod(row, rows_per_seq, b, r);
    scalar_t* o = p.out + row * p.dim;
    if (r == 0) {
      for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) o[d] = p.start[d * p.ss0];
      continue;
    }
    const int64_t j = r - 1;
    const scalar_t* xr = p.x + b * p.xs0 + j * p.xs1;
    const scalar_t* pr = p.pos ? p.pos + j * p.ps0 : nullptr;
    const scalar_t* vr = p.prev ? p.prev + b * p.vs0 + j * p.vs1 : nullptr;
    for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) {
      scalar_t v = xr[d * p.xs2];
      if (pr) v = add_round(v, pr[d * p.ps1]);
      if (vr) v = add_round(v, vr[d * p.vs2]);
      o[d] = v;
    }
  }
}

at::Tensor stage_input_fwd_cuda(const at::Tensor& x, const at::Tensor& start,
                                const std::optional<at::Tensor>& pos,
                                const std::optional<at::Tensor>& prev) {
  check_stage_input_args(x, start, pos, prev);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), s = x.size(1), dim = x.size(2);
  at::Tensor out = at::empty({n, s + 1, dim}, x.options());
  if (out.numel() == 0) return out;
  const RowLaunch launch = row_launch(n * (s + 1), dim, sm_count(x));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "stage_input_fwd_cuda", [&] {
        StageInputFwdParams<scalar_t> p{};
        p.x = x.const_data_ptr<scalar_t>();
        p.start = start.const_data_ptr<scalar_t>();
        p.out = out.data_ptr<scalar_t>();
        p.n = n, p.s = s, p.dim = dim;
        p.xs0 = x.stride(0), p.xs1 = x.stride(1), p.xs2 = x.stride(2);
        p.ss0 = start.stride(0);
        if (pos.has_value()) {
          p.pos = pos->const_data_ptr<scalar_t>();
          p.ps0 = pos->stride(0), p.ps1 = pos->stride(1);
        }
        if (prev.has_value()) {
          p.prev = prev->const_data_ptr<scalar_t>();
          p.vs0 = prev->stride(0), p.vs1 = prev->stride(1);
          p.vs2 = prev->stride(2);
        }
        stage_input_fwd_kernel<scalar_t><<<launch.grid, launch.block, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

template <typename scalar_t>
struct StageInputBwdParams {
  const scalar_t* grad;
  scalar_t* grad_x;
  scalar_t* grad_prev;  // nullptr: not requested
  scalar_t* grad_start;
  scalar_t* grad_pos;                  // nullptr: not requested
  at::opmath_type<scalar_t>* partial;  // (n_chunks, acc_rows, dim)
  int64_t n, rows, dim, acc_rows, chunk, n_chunks;
  int64_t gs0, gs1, gs2;
};

// grid: x = feature tiles of 32, y = row blocks of 8 (grid-stride), z = chunks of N.
template <typename scalar_t>
__global__ void stage_input_bwd_copy_sum_kernel(const StageInputBwdParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (d >= p.dim) return;
  const int64_t c = blockIdx.z;
  const int64_t n0 = c * p.chunk, n1 = min(p.n, n0 + p.chunk);
  const int64_t s = p.rows - 1;
  const int64_t step = int64_t{gridDim.y} * blockDim.y;
  for (int64_t r = int64_t{blockIdx.y} * blockDim.y + threadIdx.y; r < p.rows; r += step) {
    const bool sum = r < p.acc_rows;
    acc_t acc = 0;
    for (int64_t b = n0; b < n1; ++b) {
      const scalar_t v = p.grad[b * p.gs0 + r * p.gs1 + d * p.gs2];
      if (sum) acc += static_cast<acc_t>(v);
      if (r > 0) {
        const int64_t o = (b * s + r - 1) * p.dim + d;
        p.grad_x[o] = v;
        if (p.grad_prev) p.grad_prev[o] = v;
      }
    }
    if (sum) p.partial[(c * p.acc_rows + r) * p.dim + d] = acc;
  }
}

template <typename scalar_t>
__global__ void stage_input_bwd_reduce_kernel(const StageInputBwdParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = p.acc_rows * p.dim;
  const int64_t step = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total; i += step) {
    acc_t sum = 0;
    for (int64_t c = 0; c < p.n_chunks; ++c) sum += p.partial[c * total + i];
    if (i < p.dim) {
      p.grad_start[i] = static_cast<scalar_t>(sum);
    } else {
      p.grad_pos[i - p.dim] = static_cast<scalar_t>(sum);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stage_input_bwd_cuda(
    const at::Tensor& grad, bool has_pos, bool has_prev) {
  check_stage_input_bwd_args(grad);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t n = grad.size(0), rows = grad.size(1), dim = grad.size(2), s = rows - 1;
  const auto opts = grad.options();
  at::Tensor grad_x = at::empty({n, s, dim}, opts);
  at::Tensor grad_start = at::empty({dim}, opts);
  at::Tensor grad_pos = has_pos ? at::empty({s, dim}, opts) : at::empty({0}, opts);
  at::Tensor grad_prev = has_prev ? at::empty({n, s, dim}, opts) : at::empty({0}, opts);
  if (dim == 0) return {grad_x, grad_start, grad_pos, grad_prev};

  const int64_t acc_rows = has_pos ? rows : 1;
  const int sms = sm_count(grad);
  const dim3 block(32, 8);
  const int64_t gx = ceil_div(dim, 32);
  const int64_t gy = std::min(ceil_div(rows, 8), kMaxGridYZ);
  // Enough chunks of N to fill the GPU, each at least 16 sequences long, within the budget.
  const int64_t target_blocks = int64_t{sms} * 16;
  int64_t n_chunks = std::max<int64_t>(1, ceil_div(target_blocks, gx * gy));
  n_chunks = std::min({n_chunks, std::max<int64_t>(1, ceil_div(n, 16)), kMaxGridYZ,
                       std::max<int64_t>(1, kPartialBudget / (acc_rows * dim))});
  const int64_t chunk = std::max<int64_t>(1, ceil_div(n, n_chunks));
  n_chunks = std::max<int64_t>(1, ceil_div(n, chunk));
  const at::ScalarType acc_type = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = at::empty({n_chunks, acc_rows, dim}, opts.dtype(acc_type));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "stage_input_bwd_cuda", [&] {
        StageInputBwdParams<scalar_t> p{};
        p.grad = grad.const_data_ptr<scalar_t>();
        p.grad_x = grad_x.data_ptr<scalar_t>();
        p.grad_prev = has_prev ? grad_prev.data_ptr<scalar_t>() : nullptr;
        p.grad_start = grad_start.data_ptr<scalar_t>();
        p.grad_pos = has_pos ? grad_pos.data_ptr<scalar_t>() : nullptr;
        p.partial = partial.data_ptr<at::opmath_type<scalar_t>>();
        p.n = n, p.rows = rows, p.dim = dim, p.acc_rows = acc_rows;
        p.chunk = chunk, p.n_chunks = n_chunks;
        p.gs0 = grad.stride(0), p.gs1 = grad.stride(1), p.gs2 = grad.stride(2);
        const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
                        static_cast<unsigned>(n_chunks));
        stage_input_bwd_copy_sum_kernel<scalar_t><<<grid, block, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const int64_t reduce_blocks =
            std::min<int64_t>(ceil_div(acc_rows * dim, kThreads), int64_t{sms} * 32);
        stage_input_bwd_reduce_kernel<scalar_t>
            <<<static_cast<unsigned>(reduce_blocks), kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_x, grad_start, grad_pos, grad_prev};
}

// ------------------------------------------------------------------------------------------
// patch_unpatch
// ------------------------------------------------------------------------------------------

struct UnpatchParams {
  const void* src;
  void* dst;
  int64_t batch, groups, rows, dim, length, offset;
  int64_t s0, s1, s2, s3;  // strides of y (fwd: (B, G, 1 + P, D)) or grad (bwd: (B, length, D))
};

// out (B, length, D) row (b, t) <- y[b, g, r] with t - offset = g * P + (r - 1); t - offset ==
// -1 reads the start row y[b, 0, 0].
template <typename bits_t>
__global__ void patch_unpatch_fwd_kernel(const UnpatchParams p) {
  const bits_t* src = static_cast<const bits_t*>(p.src);
  bits_t* dst = static_cast<bits_t*>(p.dst);
  const int64_t total = p.batch * p.length, per_group = p.rows - 1;
  const int64_t step = int64_t{gridDim.x} * blockDim.y;
  for (int64_t row = int64_t{blockIdx.x} * blockDim.y + threadIdx.y; row < total; row += step) {
    int64_t b, t, g = 0, r = 0;
    divmod(row, p.length, b, t);
    t -= p.offset;
    if (t >= 0) {
      divmod(t, per_group, g, r);
      r += 1;
    }
    const bits_t* in = src + b * p.s0 + g * p.s1 + r * p.s2;
    bits_t* o = dst + row * p.dim;
    for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) o[d] = in[d * p.s3];
  }
}

// grad_y (B, G, 1 + P, D) contiguous: row (b, g, r) <- grad[b, t] when it was read, else 0.
template <typename bits_t>
__global__ void patch_unpatch_bwd_kernel(const UnpatchParams p) {
  const bits_t* src = static_cast<const bits_t*>(p.src);
  bits_t* dst = static_cast<bits_t*>(p.dst);
  const int64_t total = p.batch * p.groups * p.rows, per_group = p.rows - 1;
  const int64_t step = int64_t{gridDim.x} * blockDim.y;
  for (int64_t row = int64_t{blockIdx.x} * blockDim.y + threadIdx.y; row < total; row += step) {
    int64_t bg, r, b, g;
    divmod(row, p.rows, bg, r);
    divmod(bg, p.groups, b, g);
    int64_t t = -1;
    if (r > 0) {
      t = g * per_group + (r - 1) + p.offset;
    } else if (p.offset == 1 && g == 0) {
      t = 0;
    }
    bits_t* o = dst + row * p.dim;
    if (t >= 0 && t < p.length) {
      const bits_t* in = src + b * p.s0 + t * p.s1;
      for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) o[d] = in[d * p.s2];
    } else {
      for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) o[d] = bits_t{0};
    }
  }
}

enum class UnpatchDir { kFwd, kBwd };

void launch_unpatch(UnpatchDir dir, const UnpatchParams& p, int64_t element_size, int64_t rows,
                    int sms, cudaStream_t stream) {
  if (rows == 0 || p.dim == 0) return;
  const RowLaunch launch = row_launch(rows, p.dim, sms);
#define MBLM_UNPATCH_LAUNCH(bits_t)                                                \
  if (dir == UnpatchDir::kFwd) {                                                   \
    patch_unpatch_fwd_kernel<bits_t><<<launch.grid, launch.block, 0, stream>>>(p); \
  } else {                                                                         \
    patch_unpatch_bwd_kernel<bits_t><<<launch.grid, launch.block, 0, stream>>>(p); \
  }
  switch (element_size) {
    case 2:
      MBLM_UNPATCH_LAUNCH(uint16_t);
      break;
    case 4:
      MBLM_UNPATCH_LAUNCH(uint32_t);
      break;
    default:
      MBLM_UNPATCH_LAUNCH(uint64_t);
      break;
  }
#undef MBLM_UNPATCH_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor patch_unpatch_fwd_cuda(const at::Tensor& y_in, int64_t length, bool with_start) {
  check_patch_unpatch_args(y_in, length, with_start);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const int64_t batch = y_in.size(0), rows = y_in.size(-2), dim = y_in.size(-1);
  int64_t groups = 1;
  for (int64_t d = 1; d < y_in.dim() - 2; ++d) groups *= y_in.size(d);
  const at::Tensor y = y_in.reshape({batch, groups, rows, dim});  // a view when strides allow
  at::Tensor out = at::empty({batch, length, dim}, y.options());
  UnpatchParams p{};
  p.src = y.const_data_ptr();
  p.dst = out.data_ptr();
  p.batch = batch, p.groups = groups, p.rows = rows, p.dim = dim, p.length = length;
  p.offset = with_start ? 1 : 0;
  p.s0 = y.stride(0), p.s1 = y.stride(1), p.s2 = y.stride(2), p.s3 = y.stride(3);
  launch_unpatch(UnpatchDir::kFwd, p, y.element_size(), batch * length, sm_count(y),
                 c10::cuda::getCurrentCUDAStream());
  return out;
}

at::Tensor patch_unpatch_bwd_cuda(const at::Tensor& grad, at::IntArrayRef y_shape,
                                  bool with_start) {
  check_patch_unpatch_bwd_args(grad, y_shape, with_start);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty(y_shape, grad.options());
  const int64_t ndim = static_cast<int64_t>(y_shape.size());
  int64_t groups = 1;
  for (int64_t d = 1; d < ndim - 2; ++d) groups *= y_shape[d];
  UnpatchParams p{};
  p.src = grad.const_data_ptr();
  p.dst = out.data_ptr();
  p.batch = y_shape[0], p.groups = groups, p.rows = y_shape[ndim - 2];
  p.dim = y_shape[ndim - 1], p.length = grad.size(1), p.offset = with_start ? 1 : 0;
  p.s0 = grad.stride(0), p.s1 = grad.stride(1), p.s2 = grad.stride(2);
  launch_unpatch(UnpatchDir::kBwd, p, grad.element_size(), p.batch * groups * p.rows,
                 sm_count(grad), c10::cuda::getCurrentCUDAStream());
  return out;
}

}  // namespace

}  // namespace mblm

TORCH_LIBRARY_IMPL(mblm, CUDA, m) {
  m.impl("patch_pad", &mblm::patch_pad_cuda);
  m.impl("stage_input_fwd", &mblm::stage_input_fwd_cuda);
  m.impl("stage_input_bwd", &mblm::stage_input_bwd_cuda);
  m.impl("patch_unpatch_fwd", &mblm::patch_unpatch_fwd_cuda);
  m.impl("patch_unpatch_bwd", &mblm::patch_unpatch_bwd_cuda);
}
