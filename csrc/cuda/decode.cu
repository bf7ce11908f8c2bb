// Decode family, CUDA kernels: attn_decode. Checks: csrc/ops/decode.cpp. Semantics:
// attn_decode_ref in mblm/ops/reference.py.
//
// Two kernels, mirroring the CPU algorithm: the first writes the rotated new keys and the new
// values into the caches (one thread per element); the second runs one block per (row, new
// position, head). Each warp of the block walks a strided subset of the visible keys with an
// online softmax (lane l holds head dims l, l + 32, ...; the q.k dot product is a warp
// reduction), and the warps' partial (max, sum, output) triples are merged through shared memory.
// fp32 accumulation (fp64 for fp64). lens and rows are read on the device: a row whose values are
// out of range (which the CPU kernel refuses) gets NaN outputs and no cache writes, never an
// out-of-bounds access.
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
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

#include "mblm/decode.h"

namespace mblm {

namespace {

constexpr int kWarps = 4;
constexpr int kMaxDimsPerLane = 8;  // head dims up to 256
constexpr int kWriteThreads = 256;
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename acc_t>
struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  void* k_cache;
  void* v_cache;
  void* out;
  const int64_t* lens;
  const int64_t* rows;  // nullptr: row r
  const acc_t* cos;     // (R, S, Dh) contiguous or nullptr
  const acc_t* sin;
  int64_t q_s0, q_s1, q_s2;
  int64_t k_s0, k_s1, k_s2;
  int64_t v_s0, v_s1, v_s2;
  int64_t kc_s0, kc_s1, kc_s2;
  int64_t vc_s0, vc_s1, vc_s2;
  int64_t R, S, H, D, B, C;
  acc_t scale;
};

template <typename acc_t>
__device__ __forceinline__ bool row_ok(const DecodeParams<acc_t>& p, int64_t r, int64_t& row,
                                       int64_t& base) {
  row = p.rows != nullptr ? p.rows[r] : r;
  base = p.lens[r];
  return row >= 0 && row < p.B && base >= 0 && base + p.S <= p.C;
}

// rotary(x)[i] = x[i] cos[i] + (i < half ? -x[i + half] : x[i - half]) sin[i]
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t rotated(const scalar_t* x, int64_t i, int64_t d, const acc_t* c,
                                         const acc_t* s) {
  const acc_t xi = static_cast<acc_t>(x[i]);
  if (c == nullptr) return xi;
  const int64_t half = d / 2;
  const acc_t partner =
      i < half ? -static_cast<acc_t>(x[i + half]) : static_cast<acc_t>(x[i - half]);
  return xi * c[i] + partner * s[i];
}

template <typename scalar_t, typename acc_t>
__global__ void write_cache_kernel(DecodeParams<acc_t> p) {
  const int64_t total = p.R * p.S * p.H * p.D;
  const int64_t step = int64_t{gridDim.x} * blockDim.x;
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < total; e += step) {
    const int64_t i = e % p.D;
    const int64_t h = (e / p.D) % p.H;
    const int64_t s = (e / (p.D * p.H)) % p.S;
    const int64_t r = e / (p.D * p.H * p.S);
    int64_t row, base;
    if (!row_ok(p, r, row, base)) continue;
    const int64_t pos = base + s;
    const acc_t* c = p.cos != nullptr ? p.cos + (r * p.S + s) * p.D : nullptr;
    const acc_t* sn = p.sin != nullptr ? p.sin + (r * p.S + s) * p.D : nullptr;
    const scalar_t* k = static_cast<const scalar_t*>(p.k) + r * p.k_s0 + s * p.k_s1 + h * p.k_s2;
    const scalar_t* v = static_cast<const scalar_t*>(p.v) + r * p.v_s0 + s * p.v_s1 + h * p.v_s2;
    scalar_t* kc = static_cast<scalar_t*>(p.k_cache) + row * p.kc_s0 + pos * p.kc_s1 + h * p.kc_s2;
    scalar_t* vc = static_cast<scalar_t*>(p.v_cache) + row * p.vc_s0 + pos * p.vc_s1 + h * p.vc_s2;
    kc[i] = static_cast<scalar_t>(rotated(k, i, p.D, c, sn));
    vc[i] = v[i];
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t exp_acc(acc_t x) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return ::exp(x);
  } else {
    return __expf(x);
  }
}

// One block per (r, s, h); kWarps warps; DPL head dims per lane.
template <typename scalar_t, typename acc_t, int DPL>
__global__ void __launch_bounds__(kWarps * 32) attend_kernel(DecodeParams<acc_t> p) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* sm_acc = reinterpret_cast<acc_t*>(smem_raw);  // kWarps x D
  __shared__ acc_t sm_m[kWarps], sm_l[kWarps];

  const int64_t item = blockIdx.x;
  const int64_t h = item % p.H;
  const int64_t s = (item / p.H) % p.S;
  const int64_t r = item / (p.H * p.S);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  scalar_t* out = static_cast<scalar_t*>(p.out) + ((r * p.S + s) * p.H + h) * p.D;

  int64_t row, base;
  if (!row_ok(p, r, row, base)) {
    for (int64_t i = threadIdx.x; i < p.D; i += blockDim.x) {
      out[i] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
    }
    return;
  }
  const acc_t* c = p.cos != nullptr ? p.cos + (r * p.S + s) * p.D : nullptr;
  const acc_t* sn = p.sin != nullptr ? p.sin + (r * p.S + s) * p.D : nullptr;
  const scalar_t* q = static_cast<const scalar_t*>(p.q) + r * p.q_s0 + s * p.q_s1 + h * p.q_s2;
  acc_t qr[DPL], acc[DPL];
#pragma unroll
  for (int j = 0; j < DPL; ++j) {
    const int64_t i = lane + 32 * j;
    qr[j] = i < p.D ? rotated(q, i, p.D, c, sn) * p.scale : acc_t(0);
    acc[j] = acc_t(0);
  }
  acc_t m = neg_inf, l = acc_t(0);
  const int64_t keys = base + s + 1;
  const scalar_t* kc = static_cast<const scalar_t*>(p.k_cache) + row * p.kc_s0 + h * p.kc_s2;
  const scalar_t* vc = static_cast<const scalar_t*>(p.v_cache) + row * p.vc_s0 + h * p.vc_s2;
  for (int64_t key = warp; key < keys; key += kWarps) {
    const scalar_t* kr = kc + key * p.kc_s1;
    const scalar_t* vr = vc + key * p.vc_s1;
    acc_t dot = acc_t(0);
#pragma unroll
    for (int j = 0; j < DPL; ++j) {
      const int64_t i = lane + 32 * j;
      if (i < p.D) dot += qr[j] * static_cast<acc_t>(kr[i]);
    }
    dot = warp_sum(dot);
    const acc_t m_new = m > dot ? m : dot;  // NaN scores propagate through p below
    const acc_t corr = m == neg_inf ? acc_t(0) : exp_acc(m - m_new);
    const acc_t pr = exp_acc(dot - m_new);
    l = l * corr + pr;
#pragma unroll
    for (int j = 0; j < DPL; ++j) {
      const int64_t i = lane + 32 * j;
      const acc_t vi = i < p.D ? static_cast<acc_t>(vr[i]) : acc_t(0);
      acc[j] = acc[j] * corr + pr * vi;
    }
    m = m_new;
  }
#pragma unroll
  for (int j = 0; j < DPL; ++j) {
    const int64_t i = lane + 32 * j;
    if (i < p.D) sm_acc[warp * p.D + i] = acc[j];
  }
  if (lane == 0) {
    sm_m[warp] = m;
    sm_l[warp] = l;
  }
  __syncthreads();
  acc_t mx = neg_inf;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) mx = sm_m[w] > mx ? sm_m[w] : mx;
  acc_t weight[kWarps];
  acc_t total = acc_t(0);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    weight[w] = sm_m[w] == neg_inf ? acc_t(0) : exp_acc(sm_m[w] - mx);
    total += sm_l[w] * weight[w];
  }
  const acc_t inv = acc_t(1) / total;
  for (int64_t i = threadIdx.x; i < p.D; i += blockDim.x) {
    acc_t o = acc_t(0);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += sm_acc[w * p.D + i] * weight[w];
    out[i] = static_cast<scalar_t>(o * inv);
  }
}

template <typename scalar_t, typename acc_t, int DPL>
void launch_attend(const DecodeParams<acc_t>& p, cudaStream_t stream) {
  const int64_t blocks = p.R * p.S * p.H;
  const size_t smem = sizeof(acc_t) * kWarps * p.D;
  attend_kernel<scalar_t, acc_t, DPL>
      <<<static_cast<unsigned>(blocks), kWarps * 32, smem, stream>>>(p);
}

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d > 0) s += ", ";
    s += std::to_string(t.size(d));
  }
  return s + "]";
}

at::Tensor attn_decode_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& lens,
                            const std::optional<at::Tensor>& rows,
                            const std::optional<at::Tensor>& cos,
                            const std::optional<at::Tensor>& sin, double scale) {
  check_attn_decode_args(q, k, v, k_cache, v_cache, lens, rows, cos, sin);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0) return out;
  TORCH_CHECK(q.size(3) <= 32 * kMaxDimsPerLane,
              std::string("mblm: attn_decode CUDA kernel supports head dims up to ") +
                  std::to_string(32 * kMaxDimsPerLane) + ", got q of shape " + shape_str(q));
  TORCH_CHECK(q.size(0) * q.size(1) * q.size(2) <= kMaxGridX,
              std::string("mblm: attn_decode CUDA kernel needs R * S * H < 2^31, got q of shape ") +
                  shape_str(q));
  const at::Tensor lens_c = lens.contiguous();
  const at::Tensor rows_c = rows.has_value() ? rows->contiguous() : at::Tensor();
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor cos_c, sin_c;
  if (cos.has_value()) {
    cos_c = cos->to(acc).contiguous();
    sin_c = sin->to(acc).contiguous();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "mblm_attn_decode_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        DecodeParams<acc_t> p;
        p.q = q.const_data_ptr();
        p.k = k.const_data_ptr();
        p.v = v.const_data_ptr();
        p.k_cache = k_cache.mutable_data_ptr();
        p.v_cache = v_cache.mutable_data_ptr();
        p.out = out.mutable_data_ptr();
        p.lens = lens_c.const_data_ptr<int64_t>();
        p.rows = rows_c.defined() ? rows_c.const_data_ptr<int64_t>() : nullptr;
        p.cos = cos_c.defined() ? cos_c.const_data_ptr<acc_t>() : nullptr;
        p.sin = sin_c.defined() ? sin_c.const_data_ptr<acc_t>() : nullptr;
        p.q_s0 = q.stride(0), p.q_s1 = q.stride(1), p.q_s2 = q.stride(2);
        p.k_s0 = k.stride(0), p.k_s1 = k.stride(1), p.k_s2 = k.stride(2);
        p.v_s0 = v.stride(0), p.v_s1 = v.stride(1), p.v_s2 = v.stride(2);
        p.kc_s0 = k_cache.stride(0), p.kc_s1 = k_cache.stride(1), p.kc_s2 = k_cache.stride(2);
        p.vc_s0 = v_cache.stride(0), p.vc_s1 = v_cache.stride(1), p.vc_s2 = v_cache.stride(2);
        p.R = q.size(0), p.S = q.size(1), p.H = q.size(2), p.D = q.size(3);
        p.B = k_cache.size(0), p.C = k_cache.size(1);
        p.scale = static_cast<acc_t>(scale);

        const int64_t total = q.numel();
        const int64_t write_blocks =
            std::min<int64_t>(ceil_div(total, kWriteThreads), int64_t{1} << 16);
        write_cache_kernel<scalar_t, acc_t>
            <<<static_cast<unsigned>(write_blocks), kWriteThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const int64_t dims_per_lane = ceil_div(p.D, 32);
        if (dims_per_lane <= 1) {
          launch_attend<scalar_t, acc_t, 1>(p, stream);
        } else if (dims_per_lane <= 2) {
          launch_attend<scalar_t, acc_t, 2>(p, stream);
        } else if (dims_per_lane <= 4) {
          launch_attend<scalar_t, acc_t, 4>(p, stream);
        } else {
          launch_attend<scalar_t, acc_t, 8>(p, stream);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mblm, CUDA, m) { m.impl("attn_decode", &attn_decode_cuda); }

}  // namespace mblm
