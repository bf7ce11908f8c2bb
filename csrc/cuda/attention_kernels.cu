// Attention family: CUDA device code (the ATen side is attention.cu).
//
// Design
// ------
// Meaning: mblm/ops/reference.py (attention_ref, rotary_half_ref). q, k, v are (N, S, H, Dh) with
// any strides and a contiguous last dim; every (n, h) pair is an independent attention problem.
// Work is always a 1-D grid over (pair, block) tiles with a grid-stride loop and 64-bit index
// math, so any number of sequences works. attn_plan() below is the one place that picks the path.
//
// Tensor-core path (float16 / bfloat16, Dh <= 128; head dim bucketed to 32, 64 or 128 and the
// tail zero-filled):
//  * forward: flash-attention-2 style. A block holds 16 query rows per warp (1..8 warps);
//    mma.sync m16n8k16 (bf16/f16 in, fp32 accumulators) for S = Q K^T and O += P V, online
//    softmax in registers (exp2 with the scale folded in), 16-byte cp.async loads, ldmatrix from
//    shared rows padded by 8 elements (conflict-free). Local sequences (S <= 128): one block per
//    (n, h) pair with ceil(S/16) warps and all of K and V resident in shared memory, loaded with Q
//    in a single round trip (nothing is padded beyond the next multiple of 16). Long sequences:
//    64-row query blocks, keys streamed in 64-row tiles (V of a tile loads while its scores are
//    computed, the next K while P V runs); causal blocks stop at the diagonal. Rotary is applied
//    in shared memory after a tile lands (rounded back to the input type). lse is float32.
//  * backward: flash-attention-2 style, parallel over key blocks (16 keys per warp). For every
//    query tile (32 rows for local sequences, else 64, 32 for Dh = 128) a warp recomputes
//    S^T = K Q^T and P^T from lse, dP^T = V dO^T, dS^T = P^T (dP^T - delta), and accumulates
//    dV += P^T dO, dK += dS^T Q in registers; dS^T goes to shared memory and the block computes
//    dQ_tile = dS K. Local sequences (one key block per pair): dQ is complete and written
//    directly, and delta = rowsum(dO * O) is computed in the kernel from the O tile. Long
//    sequences: a small kernel computes delta first, dQ is added to a float32 workspace with
//    atomics, and a last kernel applies the rotary backward and casts. Outputs are staged in
//    shared memory (float32) and written with 16-byte stores.
// CUDA-core path (float32, float64, and 16-bit types with 128 < Dh <= 256): the same tiling with
//    one query row (or key row) per lane-group: 4 warps x 4 rows per block, 32 keys per tile (16
//    for float64) in shared memory, one key per lane for the scores, one head-dim column per lane
//    for the outputs; accumulation in float32 (float64 for float64). Backward: one kernel for dQ
//    (per query block, loop over keys) and one for dK/dV (per key block, loop over queries): no
//    atomics, deterministic.
// Rotary backward: rot is linear per (d, d + Dh/2) pair, so grad_t[d] = g[d] cos[d] +
// g[d + Dh/2] sin[d + Dh/2] and grad_t[d + Dh/2] = g[d + Dh/2] cos[d + Dh/2] - g[d] sin[d].
//
// Only the params header, CUDA headers and c10's Half/BFloat16 are included here.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "mblm/attention_params.h"

namespace mblm {

// ---------------------------------------------------------------------------------------------
// the one place that picks the kernels
// ---------------------------------------------------------------------------------------------

AttnPlan attn_plan(int elem_bytes, int64_t S, int64_t Dh) {
  AttnPlan plan;
  plan.tensor_cores = elem_bytes == 2 && Dh > 0 && Dh <= 128;
  if (!plan.tensor_cores) return plan;
  plan.head_dim_bucket = Dh <= 32 ? 32 : (Dh <= 64 ? 64 : 128);
  const int64_t s16 = (S + 15) / 16;  // 16-row groups
  const bool local = S <= 128;        // one block covers the whole sequence
  plan.fwd_warps = local ? static_cast<int>(s16 < 1 ? 1 : s16) : 4;
  plan.fwd_tile_n = local ? static_cast<int>(s16 < 1 ? 16 : s16 * 16) : 64;
  plan.bwd_warps = local ? static_cast<int>(s16 < 1 ? 1 : s16) : 4;
  plan.bwd_dq_accum = S > 16 * static_cast<int64_t>(plan.bwd_warps);
  plan.bwd_fused_delta = !plan.bwd_dq_accum;
  return plan;
}

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kSmemDefault = 48 * 1024;

// ---------------------------------------------------------------------------------------------
// types
// ---------------------------------------------------------------------------------------------

template <typename T>
struct Native {
  using type = T;
};
template <>
struct Native<c10::Half> {
  using type = __half;
};
template <>
struct Native<c10::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_type<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two adjacent 16-bit values.
template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using type = __half2;
  static __device__ __forceinline__ float2 to_float2(type v) { return __half22float2(v); }
  static __device__ __forceinline__ type make(float a, float b) { return __floats2half2_rn(a, b); }
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(type v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ type make(float a, float b) {
    return __floats2bfloat162_rn(a, b);
  }
};

// a in the low half (the lower column index), b in the high half: the mma operand layout.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  typename Pair<T>::type v = Pair<T>::make(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float fast_exp2(float x) { return exp2f(x); }
__device__ __forceinline__ double fast_exp2(double x) { return exp2(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -INFINITY;
}

template <typename A>
__device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__host__ __device__ __forceinline__ int round_up16(int x) { return (x + 15) & ~15; }

// ---------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+): cp.async, ldmatrix, mma.sync
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; zero-fills the destination when !pred (src is then not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

// c += a (16x16, row) * b (16x8, col), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------------
// rotary helpers (cos, sin: (S, Dh) contiguous, accumulation type)
// ---------------------------------------------------------------------------------------------

// Rotated element d of row `pos` (reads the row's partner element too).
template <typename T, typename A>
__device__ __forceinline__ A load_rot(const T* row, int d, int Dh, const A* cosp, const A* sinp,
                                      int64_t pos) {
  const A x = to_acc(row[d]);
  if (cosp == nullptr) return x;
  const int half = Dh >> 1;
  const A partner = d < half ? -to_acc(row[d + half]) : to_acc(row[d - half]);
  return x * cosp[pos * Dh + d] + partner * sinp[pos * Dh + d];
}

// Rotary backward of element d, given the gradient row g (w.r.t. the rotated values).
template <typename A>
__device__ __forceinline__ A rot_bwd(const A* g, int d, int Dh, const A* cosp, const A* sinp,
                                     int64_t pos) {
  if (cosp == nullptr) return g[d];
  const int half = Dh >> 1;
  const A* c = cosp + pos * Dh;
  const A* s = sinp + pos * Dh;
  return d < half ? g[d] * c[d] + g[d + half] * s[d + half]
                  : g[d] * c[d] - g[d - half] * s[d - half];
}

// ---------------------------------------------------------------------------------------------
// small kernels shared by both paths
// ---------------------------------------------------------------------------------------------

// delta[n, h, i] = sum_d dout[n, i, h, d] * out[n, i, h, d]; one warp per row.
template <typename T>
__global__ void __launch_bounds__(256) delta_kernel(const AttnBwdParams p) {
  using A = acc_type<T>;
  const T* dout = static_cast<const T*>(p.dout);
  const T* o = static_cast<const T*>(p.o);
  A* delta = static_cast<A*>(p.delta);
  const int S = p.f.S, H = p.f.H, Dh = p.f.Dh;
  const int lane = threadIdx.x & 31;
  const int64_t rows = p.f.N * S * H;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
       r < rows; r += warps) {
    const int h = static_cast<int>(r % H);
    const int64_t ni = r / H;  // n * S + i
    const int i = static_cast<int>(ni % S);
    const int64_t n = ni / S;
    const T* drow = dout + n * p.do_sn + i * p.do_ss + h * p.do_sh;
    const T* orow = o + n * p.o_sn + i * p.o_ss + h * p.o_sh;
    A acc = 0;
    for (int d = lane; d < Dh; d += 32) acc += to_acc(drow[d]) * to_acc(orow[d]);
    acc = warp_sum(acc);
    if (lane == 0) delta[(n * H + h) * S + i] = acc;
  }
}

// dq[n, i, h, :] = rotary_bwd(dq_accum[n, i, h, :]) in the input type; one warp per row.
template <typename T>
__global__ void __launch_bounds__(256) dq_convert_kernel(const AttnBwdParams p) {
  const float* acc = p.dq_accum;
  T* dq = static_cast<T*>(p.dq);
  const float* cosp = static_cast<const float*>(p.f.cos);
  const float* sinp = static_cast<const float*>(p.f.sin);
  const int S = p.f.S, H = p.f.H, Dh = p.f.Dh;
  const int lane = threadIdx.x & 31;
  const int64_t rows = p.f.N * S * H;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
       r < rows; r += warps) {
    const int64_t i = (r / H) % S;
    const float* g = acc + r * Dh;
    for (int d = lane; d < Dh; d += 32) {
      dq[r * Dh + d] = from_acc<T>(rot_bwd(g, d, Dh, cosp, sinp, i));
    }
  }
}

// =============================================================================================
// tensor-core path
// =============================================================================================
namespace tc {

constexpr int kMaxWarps = 8;
constexpr int kBlockN = 64;  // forward: keys per shared-memory tile (at most)

// Rows [row0, row0 + rows) of a (., Dh) matrix (row i at g + i * row_stride) into shared memory
// rows of kD + 8 elements; rows >= S and columns >= Dh are zero-filled.
template <typename T, int kD>
__device__ __forceinline__ void load_rows(T* s, const T* g, int64_t row_stride, int row0, int rows,
                                          int S, int Dh, int tid, int nthreads) {
  constexpr int kChunks = kD / 8;
  for (int c = tid; c < rows * kChunks; c += nthreads) {
    const int r = c / kChunks;
    const int cc = c - r * kChunks;
    const int row = row0 + r;
    const bool ok = row < S && cc * 8 < Dh;
    const T* src = ok ? g + row * row_stride + cc * 8 : g;
    cp_async_16(s + r * (kD + 8) + cc * 8, src, ok);
  }
}

// In-place rotary of shared-memory rows [0, rows) holding sequence positions row0 + r. Work
// unit: 4 adjacent columns m..m+3 of the first half with their partners m+half.. (half = Dh / 2
// is a multiple of 4, so the tables are read as float4).
template <typename T, int kD>
__device__ __forceinline__ void rotary_rows(T* s, int rows, int row0, int S, int Dh,
                                            const float* cosp, const float* sinp, int tid,
                                            int nthreads) {
  using P = Pair<T>;
  using P2 = typename P::type;
  constexpr int kGroups = kD / 8;  // 4-column groups in the first half of the bucket
  const int half = Dh >> 1;
  for (int u = tid; u < rows * kGroups; u += nthreads) {
    const int r = u / kGroups;
    const int m = (u - r * kGroups) * 4;
    const int pos = row0 + r;
    if (pos >= S || m >= half) continue;
    P2* pa = reinterpret_cast<P2*>(s + r * (kD + 8) + m);
    P2* pb = reinterpret_cast<P2*>(s + r * (kD + 8) + m + half);
    const int64_t off = static_cast<int64_t>(pos) * Dh + m;
    const float4 c1 = *reinterpret_cast<const float4*>(cosp + off);
    const float4 s1 = *reinterpret_cast<const float4*>(sinp + off);
    const float4 c2 = *reinterpret_cast<const float4*>(cosp + off + half);
    const float4 s2 = *reinterpret_cast<const float4*>(sinp + off + half);
    const float2 a0 = P::to_float2(pa[0]), a1 = P::to_float2(pa[1]);
    const float2 b0 = P::to_float2(pb[0]), b1 = P::to_float2(pb[1]);
    pa[0] = P::make(a0.x * c1.x - b0.x * s1.x, a0.y * c1.y - b0.y * s1.y);
    pa[1] = P::make(a1.x * c1.z - b1.x * s1.z, a1.y * c1.w - b1.y * s1.w);
    pb[0] = P::make(b0.x * c2.x + a0.x * s2.x, b0.y * c2.y + a0.y * s2.y);
    pb[1] = P::make(b1.x * c2.z + a1.x * s2.z, b1.y * c2.w + a1.y * s2.w);
  }
}

// Rows [0, rows) of a float32 staging tile (row stride kD + 8) -> dst (row r at dst + r * stride,
// positions pos0 + r), through the rotary backward when cosp; 8 columns (16 bytes) per store.
// For columns d..d+3 (a 4-group lies on one side of half = Dh / 2, a multiple of 4):
// grad[d] = g[d] cos[d] + g[d + half] sin[d + half] (d < half), g[d] cos[d] - g[d - half]
// sin[d - half] (d >= half).
template <typename T, int kD>
__device__ __forceinline__ void store_rows(const float* stg, int rows, int pos0, int S, int Dh,
                                           T* dst, int64_t stride, const float* cosp,
                                           const float* sinp, int idx, int nidx) {
  constexpr int kChunks = kD / 8;
  const int half = Dh >> 1;
  for (int c = idx; c < rows * kChunks; c += nidx) {
    const int r = c / kChunks;
    const int d = (c - r * kChunks) * 8;
    const int pos = pos0 + r;
    if (pos >= S || d >= Dh) continue;
    const float* g = stg + r * (kD + 8);
    float4 y[2];
#pragma unroll
    for (int gi = 0; gi < 2; ++gi) {
      const int dd = d + 4 * gi;
      const float4 gv = *reinterpret_cast<const float4*>(g + dd);
      if (cosp == nullptr) {
        y[gi] = gv;
      } else {
        const bool first = dd < half;
        const int pd = first ? dd + half : dd - half;
        const float sg = first ? 1.f : -1.f;
        const float4 gp = *reinterpret_cast<const float4*>(g + pd);
        const int64_t row = static_cast<int64_t>(pos) * Dh;
        const float4 cv = *reinterpret_cast<const float4*>(cosp + row + dd);
        const float4 sv = *reinterpret_cast<const float4*>(sinp + row + pd);
        y[gi] = make_float4(gv.x * cv.x + sg * gp.x * sv.x, gv.y * cv.y + sg * gp.y * sv.y,
                            gv.z * cv.z + sg * gp.z * sv.z, gv.w * cv.w + sg * gp.w * sv.w);
      }
    }
    uint4 packed;
    packed.x = pack2<T>(y[0].x, y[0].y);
    packed.y = pack2<T>(y[0].z, y[0].w);
    packed.z = pack2<T>(y[1].x, y[1].y);
    packed.w = pack2<T>(y[1].z, y[1].w);
    *reinterpret_cast<uint4*>(dst + r * stride + d) = packed;
  }
}

// Forward. Block: `warps` warps, 16 query rows each; dynamic shared memory:
// Q [16 * warps][kD + 8], K [tile_n][kD + 8], V [tile_n][kD + 8] in T. tile_n is either
// kBlockN (keys stream through in tiles) or covers all keys of the sequence (resident).
template <typename T, int kD>
__global__ void __launch_bounds__(kMaxWarps * 32)
    fwd_kernel(const AttnFwdParams p, const int tile_n) {
  constexpr int kStride = kD + 8;
  constexpr int kChunks = kD / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int warps = nthreads >> 5;
  const int warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int bm = warps * 16;
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + bm * kStride;
  T* sV = sK + tile_n * kStride;

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  float* lse = static_cast<float*>(p.lse);
  const float* cosp = static_cast<const float*>(p.cos);
  const float* sinp = static_cast<const float*>(p.sin);
  const bool rotary = cosp != nullptr;
  const bool causal = p.causal;
  const int S = p.S, H = p.H, Dh = p.Dh;
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const int64_t m_blocks = (S + bm - 1) / bm;
  const int64_t total = p.N * H * m_blocks;

  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const int64_t pair = tile / m_blocks;
    const int m0 = static_cast<int>(tile - pair * m_blocks) * bm;
    const int64_t n = pair / H;
    const int h = static_cast<int>(pair - n * H);
    const T* qb = q + n * p.q_sn + h * p.q_sh;
    const T* kb = k + n * p.k_sn + h * p.k_sh;
    const T* vb = v + n * p.v_sn + h * p.v_sh;
    // keys that can matter for this block: [0, n_end)
    const int n_end = causal ? min(S, m0 + bm) : S;
    // Resident: every key this block needs fits in the K / V buffers (the local stages), loaded
    // once; otherwise the keys stream through them in tiles of kBlockN (tile_n == kBlockN).
    const bool resident = n_end <= tile_n;
    const int nt = (n_end + kBlockN - 1) / kBlockN;

    // prologue: the Q block and the first keys (K and V) in one round trip
    int cur_n = resident ? round_up16(n_end) : kBlockN;
    load_rows<T, kD>(sQ, qb, p.q_ss, m0, bm, S, Dh, tid, nthreads);
    load_rows<T, kD>(sK, kb, p.k_ss, 0, cur_n, S, Dh, tid, nthreads);
    load_rows<T, kD>(sV, vb, p.v_ss, 0, cur_n, S, Dh, tid, nthreads);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    if (rotary) {
      rotary_rows<T, kD>(sQ, bm, m0, S, Dh, cosp, sinp, tid, nthreads);
      rotary_rows<T, kD>(sK, cur_n, 0, S, Dh, cosp, sinp, tid, nthreads);
      __syncthreads();
    }

    const int wrow0 = m0 + warp * 16;  // first query row of this warp
    const int row_lo = wrow0 + g, row_hi = row_lo + 8;
    float o[kD / 8][4];
#pragma unroll
    for (int nb = 0; nb < kD / 8; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.f;
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

    for (int jt = 0; jt < nt; ++jt) {
      const int j0 = jt * kBlockN;
      cur_n = min(kBlockN, round_up16(n_end - j0));
      const T* sKt = resident ? sK + j0 * kStride : sK;
      const T* sVt = resident ? sV + j0 * kStride : sV;
      if (!resident && jt > 0) {  // V of this tile loads while its scores are computed
        load_rows<T, kD>(sV, vb, p.v_ss, j0, cur_n, S, Dh, tid, nthreads);
        cp_async_commit();
      }

      // warp-uniform: does this warp have a query row that sees a key of this tile?
      const bool active = wrow0 < S && (!causal || j0 <= wrow0 + 15);
      float s[kBlockN / 8][4];
      if (active) {
#pragma unroll
        for (int nb = 0; nb < kBlockN / 8; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
          // S = Q K^T
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
          if (kk * 16 < Dh) {
            uint32_t a[4];
            ldsm_x4(a, sQ + (warp * 16 + (lane & 15)) * kStride + kk * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int nb2 = 0; nb2 < kBlockN / 16; ++nb2) {
              if (nb2 * 16 < cur_n) {
                uint32_t b[4];
                ldsm_x4(b, sKt + (nb2 * 16 + (lane & 7) + (lane >> 4) * 8) * kStride + kk * 16 +
                               ((lane >> 3) & 1) * 8);
                mma16816<T>(s[2 * nb2], a, b[0], b[1]);
                mma16816<T>(s[2 * nb2 + 1], a, b[2], b[3]);
              }
            }
          }
        }
        // scale (log2 domain) and mask: keys >= n_lim, causal (key > query)
        const int n_lim = min(S, j0 + cur_n);
        const bool need_mask = j0 + kBlockN > n_lim || (causal && j0 + kBlockN - 1 > wrow0);
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
        for (int nb = 0; nb < kBlockN / 8; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float x = s[nb][e] * scale_log2;
            if (need_mask) {
              const int col = j0 + nb * 8 + 2 * t + (e & 1);
              const int row = e < 2 ? row_lo : row_hi;
              if (col >= n_lim || (causal && col > row)) x = -INFINITY;
            }
            s[nb][e] = x;
          }
          mx_lo = fmaxf(mx_lo, fmaxf(s[nb][0], s[nb][1]));
          mx_hi = fmaxf(mx_hi, fmaxf(s[nb][2], s[nb][3]));
        }
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
        // online softmax
        const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
        const float mu_lo = mn_lo == -INFINITY ? 0.f : mn_lo;
        const float mu_hi = mn_hi == -INFINITY ? 0.f : mn_hi;
        const float alpha_lo = exp2f(m_lo - mu_lo), alpha_hi = exp2f(m_hi - mu_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
        for (int nb = 0; nb < kBlockN / 8; ++nb) {
          s[nb][0] = exp2f(s[nb][0] - mu_lo);
          s[nb][1] = exp2f(s[nb][1] - mu_lo);
          s[nb][2] = exp2f(s[nb][2] - mu_hi);
          s[nb][3] = exp2f(s[nb][3] - mu_hi);
          sum_lo += s[nb][0] + s[nb][1];
          sum_hi += s[nb][2] + s[nb][3];
        }
        l_lo = l_lo * alpha_lo + sum_lo;
        l_hi = l_hi * alpha_hi + sum_hi;
#pragma unroll
        for (int nb = 0; nb < kD / 8; ++nb) {
          o[nb][0] *= alpha_lo;
          o[nb][1] *= alpha_lo;
          o[nb][2] *= alpha_hi;
          o[nb][3] *= alpha_hi;
        }
      }

      const bool stream_next = !resident && jt + 1 < nt;
      int next_n = 0;
      if (!resident) {
        cp_async_wait_all();
        __syncthreads();  // V tile visible; every warp is done reading this K tile
      }
      if (stream_next) {
        next_n = min(kBlockN, round_up16(n_end - j0 - kBlockN));
        load_rows<T, kD>(sK, kb, p.k_ss, j0 + kBlockN, next_n, S, Dh, tid, nthreads);
        cp_async_commit();
      }

      if (active) {
        // O += P V
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          if (kk * 16 < cur_n) {
            uint32_t a[4];
            a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int db = 0; db < kD / 16; ++db) {
              if (db * 16 < Dh) {
                uint32_t b[4];
                ldsm_x4_t(b, sVt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride +
                                 db * 16 + (lane >> 4) * 8);
                mma16816<T>(o[2 * db], a, b[0], b[1]);
                mma16816<T>(o[2 * db + 1], a, b[2], b[3]);
              }
            }
          }
        }
      }

      if (stream_next) {
        cp_async_wait_all();
        __syncthreads();  // next K tile visible; every warp is done reading this V tile
        if (rotary) {
          rotary_rows<T, kD>(sK, next_n, j0 + kBlockN, S, Dh, cosp, sinp, tid, nthreads);
          __syncthreads();
        }
      }
    }

    // epilogue: normalise, lse, stage O in this warp's Q rows, 16-byte stores
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
    if (wrow0 < S) {
      const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f;
      const float inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
      if (t == 0) {
        float* lrow = lse + (n * H + h) * S;
        if (row_lo < S) lrow[row_lo] = l_lo > 0.f ? (m_lo + log2f(l_lo)) * kLn2 : -INFINITY;
        if (row_hi < S) lrow[row_hi] = l_hi > 0.f ? (m_hi + log2f(l_hi)) * kLn2 : -INFINITY;
      }
      __syncwarp();  // every lane is done reading this warp's Q rows
      T* sO = sQ + warp * 16 * kStride;
      using P2 = typename Pair<T>::type;
#pragma unroll
      for (int nb = 0; nb < kD / 8; ++nb) {
        *reinterpret_cast<P2*>(sO + g * kStride + nb * 8 + 2 * t) =
            Pair<T>::make(o[nb][0] * inv_lo, o[nb][1] * inv_lo);
        *reinterpret_cast<P2*>(sO + (g + 8) * kStride + nb * 8 + 2 * t) =
            Pair<T>::make(o[nb][2] * inv_hi, o[nb][3] * inv_hi);
      }
      __syncwarp();
      for (int c = lane; c < 16 * kChunks; c += 32) {
        const int r = c / kChunks;
        const int cc = c - r * kChunks;
        const int row = wrow0 + r;
        if (row < S && cc * 8 < Dh) {
          *reinterpret_cast<uint4*>(out + ((n * S + row) * H + h) * Dh + cc * 8) =
              *reinterpret_cast<const uint4*>(sO + r * kStride + cc * 8);
        }
      }
    }
    __syncthreads();  // shared memory is reused by the next tile
  }
}

// Backward epilogue of one warp: mul * acc (16 keys x kD, mma accumulator layout) staged in
// float32 at stg (16 rows of kD + 8), then through the rotary backward (when cosp) into
// dst[(key * H) * Dh + d] for keys key0 + r < S.
template <typename T, int kD>
__device__ __forceinline__ void store_key_rows(const float (&acc)[kD / 8][4], float mul, float* stg,
                                               T* dst, int key0, int S, int H, int Dh,
                                               const float* cosp, const float* sinp) {
  constexpr int kStride = kD + 8;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  __syncwarp();  // the previous use of stg is complete
#pragma unroll
  for (int nb = 0; nb < kD / 8; ++nb) {
    *reinterpret_cast<float2*>(stg + g * kStride + nb * 8 + 2 * t) =
        make_float2(acc[nb][0] * mul, acc[nb][1] * mul);
    *reinterpret_cast<float2*>(stg + (g + 8) * kStride + nb * 8 + 2 * t) =
        make_float2(acc[nb][2] * mul, acc[nb][3] * mul);
  }
  __syncwarp();
  store_rows<T, kD>(stg, 16, key0, S, Dh, dst + static_cast<int64_t>(key0) * H * Dh,
                    static_cast<int64_t>(H) * Dh, cosp, sinp, lane, 32);
}

// Backward. Block: `warps` warps, 16 keys each (bc = 16 * warps keys per block), query tiles of
// kBM rows (32 for the local stages: fewer registers, more resident blocks); dynamic shared
// memory: K [bc][kD + 8], V [bc][kD + 8], Q [kBM][kD + 8], dO [kBM][kD + 8], O [kBM][kD + 8]
// (fused delta only), dS^T [bc][kBM + 8] in T, then lse [kBM] and delta [kBM] in float. The K|V
// region is reused at the end to stage dK / dV in float32, the Q|dO region to stage a direct dQ
// tile.
template <typename T, int kD, int kBM>
__global__ void __launch_bounds__(kMaxWarps * 32) bwd_kernel(const AttnBwdParams p) {
  constexpr int kStride = kD + 8;
  constexpr int kSStride = kBM + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int warps = nthreads >> 5;
  const int warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int bc = warps * 16;
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + bc * kStride;
  T* sQ = sV + bc * kStride;
  T* sdO = sQ + kBM * kStride;
  T* sO = sdO + kBM * kStride;  // out tile, only for the fused delta
  T* sdS = sO + kBM * kStride;
  float* sLse = reinterpret_cast<float*>(sdS + bc * kSStride);
  float* sDelta = sLse + kBM;
  float* stage_q = reinterpret_cast<float*>(sQ);   // [kBM][kStride]
  float* stage_kv = reinterpret_cast<float*>(sK);  // [bc][kStride]

  const AttnFwdParams& f = p.f;
  const T* q = static_cast<const T*>(f.q);
  const T* k = static_cast<const T*>(f.k);
  const T* v = static_cast<const T*>(f.v);
  const T* dout = static_cast<const T*>(p.dout);
  const float* lse = static_cast<const float*>(f.lse);
  const float* delta = static_cast<const float*>(p.delta);
  T* dq = static_cast<T*>(p.dq);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
  float* dq_accum = p.dq_accum;
  const bool direct_dq = dq_accum == nullptr;  // one key block per pair: dQ tiles are complete
  const bool fused_delta = delta == nullptr;   // delta computed here from dO and O
  const float* cosp = static_cast<const float*>(f.cos);
  const float* sinp = static_cast<const float*>(f.sin);
  const bool rotary = cosp != nullptr;
  const bool causal = f.causal;
  const int S = f.S, H = f.H, Dh = f.Dh;
  const float scale = static_cast<float>(f.scale);
  const float scale_log2 = scale * kLog2e;
  const int64_t k_blocks = (S + bc - 1) / bc;
  const int64_t total = f.N * H * k_blocks;
  using P2 = typename Pair<T>::type;

  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const int64_t pair = tile / k_blocks;
    const int j0 = static_cast<int>(tile - pair * k_blocks) * bc;
    const int64_t n = pair / H;
    const int h = static_cast<int>(pair - n * H);
    const T* qb = q + n * f.q_sn + h * f.q_sh;
    const T* kb = k + n * f.k_sn + h * f.k_sh;
    const T* vb = v + n * f.v_sn + h * f.v_sh;
    const T* dob = dout + n * p.do_sn + h * p.do_sh;
    const float* lse_row = lse + (n * H + h) * S;
    const float* delta_row = fused_delta ? nullptr : delta + (n * H + h) * S;
    const T* ob = static_cast<const T*>(p.o) + n * p.o_sn + h * p.o_sh;
    const int kb_n = min(bc, round_up16(S - j0));  // key rows of this block that can be valid

    // K and V of the block travel in the same cp.async group as the first query tile
    load_rows<T, kD>(sK, kb, f.k_ss, j0, bc, S, Dh, tid, nthreads);
    load_rows<T, kD>(sV, vb, f.v_ss, j0, bc, S, Dh, tid, nthreads);

    const int wkey0 = j0 + warp * 16;  // first key of this warp
    const int key_lo = wkey0 + g, key_hi = key_lo + 8;
    float dk_acc[kD / 8][4], dv_acc[kD / 8][4];
#pragma unroll
    for (int nb = 0; nb < kD / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dk_acc[nb][e] = dv_acc[nb][e] = 0.f;
    }

    const int i_begin = causal ? (j0 / kBM) * kBM : 0;
    for (int i0 = i_begin; i0 < S; i0 += kBM) {
      const int cur_m = min(kBM, round_up16(S - i0));
      load_rows<T, kD>(sQ, qb, f.q_ss, i0, cur_m, S, Dh, tid, nthreads);
      load_rows<T, kD>(sdO, dob, p.do_ss, i0, cur_m, S, Dh, tid, nthreads);
      if (fused_delta) load_rows<T, kD>(sO, ob, p.o_ss, i0, cur_m, S, Dh, tid, nthreads);
      cp_async_commit();
      for (int r = tid; r < kBM; r += nthreads) {
        const int i = i0 + r;
        sLse[r] = i < S ? lse_row[i] * kLog2e : 0.f;
        if (!fused_delta) sDelta[r] = i < S ? delta_row[i] : 0.f;
      }
      cp_async_wait_all();
      __syncthreads();
      if (rotary) {
        if (i0 == i_begin) rotary_rows<T, kD>(sK, bc, j0, S, Dh, cosp, sinp, tid, nthreads);
        rotary_rows<T, kD>(sQ, cur_m, i0, S, Dh, cosp, sinp, tid, nthreads);
      }
      if (fused_delta) {
        // delta = rowsum(dO * O) for the tile: kChunks consecutive threads per row (a divisor
        // of 32, and the trip count is warp-uniform since kBM * kChunks % 32 == 0)
        constexpr int kChunks = kD / 8;
        static_assert(32 % kChunks == 0 && kBM * kChunks % 32 == 0, "delta reduction layout");
        for (int c = tid; c < kBM * kChunks; c += nthreads) {
          const int r = c / kChunks;
          const int cc = c - r * kChunks;
          const int i = i0 + r;
          float part = 0.f;
          if (i < S && cc * 8 < Dh) {
            using P = Pair<T>;
            const auto* o8 = reinterpret_cast<const typename P::type*>(sO + r * kStride + cc * 8);
            const auto* d8 = reinterpret_cast<const typename P::type*>(sdO + r * kStride + cc * 8);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float2 x = P::to_float2(o8[e]), y = P::to_float2(d8[e]);
              part += x.x * y.x + x.y * y.y;
            }
          }
#pragma unroll
          for (int o = 1; o < kChunks; o <<= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
          if (cc == 0) sDelta[r] = part;
        }
      }
      if (rotary || fused_delta) __syncthreads();

      // warp-uniform: can a key of this warp be seen by a query of this tile?
      const bool active = wkey0 < S && (!causal || i0 + cur_m - 1 >= wkey0);
      if (active) {
        float st[kBM / 8][4], dpt[kBM / 8][4];
#pragma unroll
        for (int nb = 0; nb < kBM / 8; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) st[nb][e] = dpt[nb][e] = 0.f;
        }
        // S^T = K_w Q^T and dP^T = V_w dO^T (16 keys x kBM queries)
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
          if (kk * 16 < Dh) {
            uint32_t ak[4], av[4];
            ldsm_x4(ak, sK + (warp * 16 + (lane & 15)) * kStride + kk * 16 + (lane >> 4) * 8);
            ldsm_x4(av, sV + (warp * 16 + (lane & 15)) * kStride + kk * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int nb2 = 0; nb2 < kBM / 16; ++nb2) {
              if (nb2 * 16 < cur_m) {
                const int off = (nb2 * 16 + (lane & 7) + (lane >> 4) * 8) * kStride + kk * 16 +
                                ((lane >> 3) & 1) * 8;
                uint32_t b[4];
                ldsm_x4(b, sQ + off);
                mma16816<T>(st[2 * nb2], ak, b[0], b[1]);
                mma16816<T>(st[2 * nb2 + 1], ak, b[2], b[3]);
                ldsm_x4(b, sdO + off);
                mma16816<T>(dpt[2 * nb2], av, b[0], b[1]);
                mma16816<T>(dpt[2 * nb2 + 1], av, b[2], b[3]);
              }
            }
          }
        }
        // P^T from lse; dS^T = P^T (dP^T - delta) (kept in dpt)
#pragma unroll
        for (int nb = 0; nb < kBM / 8; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = nb * 8 + 2 * t + (e & 1);
            const int i = i0 + r;
            const int key = e < 2 ? key_lo : key_hi;
            const bool ok = i < S && key < S && (!causal || key <= i);
            const float pv = ok ? exp2f(st[nb][e] * scale_log2 - sLse[r]) : 0.f;
            st[nb][e] = pv;
            dpt[nb][e] = pv * (dpt[nb][e] - sDelta[r]);
          }
        }
        // dV += P^T dO and dK += dS^T Q (k = queries)
#pragma unroll
        for (int kk = 0; kk < kBM / 16; ++kk) {
          if (kk * 16 < cur_m) {
            uint32_t ap[4], as[4];
            ap[0] = pack2<T>(st[2 * kk][0], st[2 * kk][1]);
            ap[1] = pack2<T>(st[2 * kk][2], st[2 * kk][3]);
            ap[2] = pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
            ap[3] = pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
            as[0] = pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]);
            as[1] = pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]);
            as[2] = pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
            as[3] = pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
#pragma unroll
            for (int db = 0; db < kD / 16; ++db) {
              if (db * 16 < Dh) {
                const int off = (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride + db * 16 +
                                (lane >> 4) * 8;
                uint32_t b[4];
                ldsm_x4_t(b, sdO + off);
                mma16816<T>(dv_acc[2 * db], ap, b[0], b[1]);
                mma16816<T>(dv_acc[2 * db + 1], ap, b[2], b[3]);
                ldsm_x4_t(b, sQ + off);
                mma16816<T>(dk_acc[2 * db], as, b[0], b[1]);
                mma16816<T>(dk_acc[2 * db + 1], as, b[2], b[3]);
              }
            }
            // dS^T rows of this warp -> shared memory (input type, as the mma operands)
            *reinterpret_cast<P2*>(sdS + (warp * 16 + g) * kSStride + kk * 16 + 2 * t) =
                Pair<T>::make(dpt[2 * kk][0], dpt[2 * kk][1]);
            *reinterpret_cast<P2*>(sdS + (warp * 16 + g + 8) * kSStride + kk * 16 + 2 * t) =
                Pair<T>::make(dpt[2 * kk][2], dpt[2 * kk][3]);
            *reinterpret_cast<P2*>(sdS + (warp * 16 + g) * kSStride + kk * 16 + 8 + 2 * t) =
                Pair<T>::make(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
            *reinterpret_cast<P2*>(sdS + (warp * 16 + g + 8) * kSStride + kk * 16 + 8 + 2 * t) =
                Pair<T>::make(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
          }
        }
      } else {
        // no contribution: this warp's dS^T rows are zero for the dQ product
        for (int c = lane; c < 16 * (kBM / 2); c += 32) {
          const int r = c / (kBM / 2);
          const int cc = (c - r * (kBM / 2)) * 2;
          *reinterpret_cast<P2*>(sdS + (warp * 16 + r) * kSStride + cc) = Pair<T>::make(0.f, 0.f);
        }
      }
      __syncthreads();  // dS^T complete; every warp is done reading Q and dO

      // dQ tile (cur_m x Dh) = dS K: units of 16 queries x 32 columns spread over the warps
      constexpr int kCU = kD / 32;
      const int units = (cur_m / 16) * kCU;
      for (int u = warp; u < units; u += warps) {
        const int mt = u / kCU;
        const int cu = u - mt * kCU;
        if (cu * 32 >= Dh) continue;
        float acc[4][4];
#pragma unroll
        for (int nb = 0; nb < 4; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < kMaxWarps; ++kk) {
          if (kk * 16 < kb_n) {
            uint32_t a[4], b[4];
            ldsm_x4_t(a, sdS + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * kSStride + mt * 16 +
                             ((lane >> 3) & 1) * 8);
            const int koff = (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride + cu * 32 +
                             (lane >> 4) * 8;
            ldsm_x4_t(b, sK + koff);
            mma16816<T>(acc[0], a, b[0], b[1]);
            mma16816<T>(acc[1], a, b[2], b[3]);
            ldsm_x4_t(b, sK + koff + 16);
            mma16816<T>(acc[2], a, b[0], b[1]);
            mma16816<T>(acc[3], a, b[2], b[3]);
          }
        }
        const int r_lo = mt * 16 + g, r_hi = r_lo + 8;  // rows within the tile
        if (direct_dq) {
#pragma unroll
          for (int nb = 0; nb < 4; ++nb) {
            const int col = cu * 32 + nb * 8 + 2 * t;
            *reinterpret_cast<float2*>(stage_q + r_lo * kStride + col) =
                make_float2(acc[nb][0] * scale, acc[nb][1] * scale);
            *reinterpret_cast<float2*>(stage_q + r_hi * kStride + col) =
                make_float2(acc[nb][2] * scale, acc[nb][3] * scale);
          }
        } else {
#pragma unroll
          for (int nb = 0; nb < 4; ++nb) {
            const int col = cu * 32 + nb * 8 + 2 * t;
            if (col >= Dh) continue;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int i = i0 + (half ? r_hi : r_lo);
              if (i >= S) continue;
              float* dst = dq_accum + ((n * S + i) * H + h) * Dh + col;
              const float x0 = acc[nb][2 * half] * scale, x1 = acc[nb][2 * half + 1] * scale;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
              atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x0, x1));
#else
              atomicAdd(dst, x0);
              atomicAdd(dst + 1, x1);
#endif
            }
          }
        }
      }
      if (direct_dq) {
        __syncthreads();  // the staged dQ tile is complete
        store_rows<T, kD>(stage_q, cur_m, i0, S, Dh, dq + ((n * S + i0) * H + h) * Dh,
                          static_cast<int64_t>(H) * Dh, cosp, sinp, tid, nthreads);
      }
      __syncthreads();  // shared memory is reused by the next query tile
    }

    // epilogue: dV, then scale * dK through the rotary backward; each warp stages its own keys
    if (wkey0 < S) {
      float* stg = stage_kv + warp * 16 * kStride;
      T* dv_rows = dv + (n * S * H + h) * Dh;
      T* dk_rows = dk + (n * S * H + h) * Dh;
      store_key_rows<T, kD>(dv_acc, 1.f, stg, dv_rows, wkey0, S, H, Dh, nullptr, nullptr);
      store_key_rows<T, kD>(dk_acc, scale, stg, dk_rows, wkey0, S, H, Dh, cosp, sinp);
    }
    __syncthreads();  // shared memory is reused by the next tile
  }
}

}  // namespace tc

// =============================================================================================
// CUDA-core path
// =============================================================================================
namespace simt {

constexpr int kWarps = 4;
constexpr int kRows = 4;                     // rows per warp
constexpr int kBM = kWarps * kRows;          // rows per block
constexpr int kMaxC = kAttnMaxHeadDim / 32;  // head-dim columns per lane
template <typename A>
constexpr int tile_n() {  // keys (or queries) per shared-memory tile
  return sizeof(A) == 8 ? 16 : 32;
}

template <typename T>
size_t fwd_smem(int Dh) {
  using A = acc_type<T>;
  return (static_cast<size_t>(kBM) * Dh + 2 * static_cast<size_t>(tile_n<A>()) * (Dh + 1)) *
         sizeof(A);
}
template <typename T>
size_t bwd_smem(int Dh) {
  using A = acc_type<T>;
  return (2 * static_cast<size_t>(kBM) * Dh + 2 * static_cast<size_t>(tile_n<A>()) * (Dh + 1) +
          2 * tile_n<A>()) *
         sizeof(A);
}

// Forward: block = kBM query rows (kRows per warp); tiles of kBN keys, one key per lane.
// Shared: Q [kBM][Dh] (rotated), K [kBN][Dh + 1] (rotated), V [kBN][Dh + 1].
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) fwd_kernel(const AttnFwdParams p) {
  using A = acc_type<T>;
  constexpr int kBN = tile_n<A>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int S = p.S, H = p.H, Dh = p.Dh, ld = Dh + 1;
  A* sQ = reinterpret_cast<A*>(smem_raw);
  A* sK = sQ + kBM * Dh;
  A* sV = sK + kBN * ld;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  A* lse = static_cast<A*>(p.lse);
  const A* cosp = static_cast<const A*>(p.cos);
  const A* sinp = static_cast<const A*>(p.sin);
  const bool causal = p.causal;
  const A scale_log2 = static_cast<A>(p.scale) * static_cast<A>(1.4426950408889634);
  const int64_t m_blocks = (S + kBM - 1) / kBM;
  const int64_t total = p.N * H * m_blocks;

  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const int64_t pair = tile / m_blocks;
    const int m0 = static_cast<int>(tile - pair * m_blocks) * kBM;
    const int64_t n = pair / H;
    const int h = static_cast<int>(pair - n * H);
    const T* qb = q + n * p.q_sn + h * p.q_sh;
    const T* kb = k + n * p.k_sn + h * p.k_sh;
    const T* vb = v + n * p.v_sn + h * p.v_sh;
    const int n_end = causal ? min(S, m0 + kBM) : S;

    __syncthreads();  // the previous tile is done with shared memory
    for (int e = tid; e < kBM * Dh; e += kWarps * 32) {
      const int r = e / Dh, d = e - r * Dh, i = m0 + r;
      sQ[e] = i < S ? load_rot(qb + i * p.q_ss, d, Dh, cosp, sinp, i) : A(0);
    }

    A o[kRows][kMaxC];
    A m_run[kRows], l_part[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      m_run[r] = neg_inf<A>();
      l_part[r] = 0;
#pragma unroll
      for (int c = 0; c < kMaxC; ++c) o[r][c] = 0;
    }
    const A* qrow = sQ + warp * kRows * Dh;

    for (int j0 = 0; j0 < n_end; j0 += kBN) {
      __syncthreads();  // Q visible; the previous key tile is consumed
      for (int e = tid; e < kBN * Dh; e += kWarps * 32) {
        const int r = e / Dh, d = e - r * Dh, j = j0 + r;
        sK[r * ld + d] = j < S ? load_rot(kb + j * p.k_ss, d, Dh, cosp, sinp, j) : A(0);
        sV[r * ld + d] = j < S ? to_acc(vb[j * p.v_ss + d]) : A(0);
      }
      __syncthreads();

      const int j = j0 + lane;
      const bool key_ok = lane < kBN && j < S;
      A s[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) s[r] = 0;
      if (lane < kBN) {
        const A* krow = sK + lane * ld;
#pragma unroll 4
        for (int d = 0; d < Dh; ++d) {
          const A kv = krow[d];
#pragma unroll
          for (int r = 0; r < kRows; ++r) s[r] += qrow[r * Dh + d] * kv;
        }
      }
      A pr[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int i = m0 + warp * kRows + r;
        const bool ok = key_ok && (!causal || j <= i);
        const A x = ok ? s[r] * scale_log2 : neg_inf<A>();
        const A mn = max(m_run[r], warp_max(x));
        const A mu = mn == neg_inf<A>() ? A(0) : mn;
        const A alpha = fast_exp2(m_run[r] - mu);
        pr[r] = ok ? fast_exp2(x - mu) : A(0);
        m_run[r] = mn;
        l_part[r] = l_part[r] * alpha + pr[r];
#pragma unroll
        for (int c = 0; c < kMaxC; ++c) o[r][c] *= alpha;
      }
      const int jn = min(kBN, n_end - j0);
      for (int jj = 0; jj < jn; ++jj) {
        A pj[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) pj[r] = __shfl_sync(0xffffffffu, pr[r], jj);
        const A* vrow = sV + jj * ld;
#pragma unroll
        for (int c = 0; c < kMaxC; ++c) {
          const int d = c * 32 + lane;
          if (d < Dh) {
            const A vv = vrow[d];
#pragma unroll
            for (int r = 0; r < kRows; ++r) o[r][c] += pj[r] * vv;
          }
        }
      }
    }

#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = m0 + warp * kRows + r;
      const A l = warp_sum(l_part[r]);
      if (i >= S) continue;
      const A inv = l > A(0) ? A(1) / l : A(0);
      T* orow = out + ((n * S + i) * H + h) * Dh;
#pragma unroll
      for (int c = 0; c < kMaxC; ++c) {
        const int d = c * 32 + lane;
        if (d < Dh) orow[d] = from_acc<T>(o[r][c] * inv);
      }
      if (lane == 0) {
        lse[(n * H + h) * S + i] =
            l > A(0) ? m_run[r] / static_cast<A>(1.4426950408889634) + acc_log(l) : neg_inf<A>();
      }
    }
  }
}

// dQ: block = kBM query rows; loop over key tiles (one key per lane for the scores).
// Shared: Q [kBM][Dh] (rotated; reused to stage dQ), dO [kBM][Dh], K [kBN][Dh + 1] (rotated),
// V [kBN][Dh + 1].
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) dq_kernel(const AttnBwdParams p) {
  using A = acc_type<T>;
  constexpr int kBN = tile_n<A>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const AttnFwdParams& f = p.f;
  const int S = f.S, H = f.H, Dh = f.Dh, ld = Dh + 1;
  A* sQ = reinterpret_cast<A*>(smem_raw);
  A* sdO = sQ + kBM * Dh;
  A* sK = sdO + kBM * Dh;
  A* sV = sK + kBN * ld;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const T* q = static_cast<const T*>(f.q);
  const T* k = static_cast<const T*>(f.k);
  const T* v = static_cast<const T*>(f.v);
  const T* dout = static_cast<const T*>(p.dout);
  const A* lse = static_cast<const A*>(f.lse);
  const A* delta = static_cast<const A*>(p.delta);
  T* dq = static_cast<T*>(p.dq);
  const A* cosp = static_cast<const A*>(f.cos);
  const A* sinp = static_cast<const A*>(f.sin);
  const bool causal = f.causal;
  const A log2e = static_cast<A>(1.4426950408889634);
  const A scale = static_cast<A>(f.scale);
  const A scale_log2 = scale * log2e;
  const int64_t m_blocks = (S + kBM - 1) / kBM;
  const int64_t total = f.N * H * m_blocks;

  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const int64_t pair = tile / m_blocks;
    const int m0 = static_cast<int>(tile - pair * m_blocks) * kBM;
    const int64_t n = pair / H;
    const int h = static_cast<int>(pair - n * H);
    const T* qb = q + n * f.q_sn + h * f.q_sh;
    const T* kb = k + n * f.k_sn + h * f.k_sh;
    const T* vb = v + n * f.v_sn + h * f.v_sh;
    const T* dob = dout + n * p.do_sn + h * p.do_sh;
    const int n_end = causal ? min(S, m0 + kBM) : S;

    __syncthreads();  // the previous tile is done with shared memory
    for (int e = tid; e < kBM * Dh; e += kWarps * 32) {
      const int r = e / Dh, d = e - r * Dh, i = m0 + r;
      sQ[e] = i < S ? load_rot(qb + i * f.q_ss, d, Dh, cosp, sinp, i) : A(0);
      sdO[e] = i < S ? to_acc(dob[i * p.do_ss + d]) : A(0);
    }
    A lse_r[kRows], delta_r[kRows], dqa[kRows][kMaxC];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = m0 + warp * kRows + r;
      lse_r[r] = i < S ? lse[(n * H + h) * S + i] * log2e : A(0);
      delta_r[r] = i < S ? delta[(n * H + h) * S + i] : A(0);
#pragma unroll
      for (int c = 0; c < kMaxC; ++c) dqa[r][c] = 0;
    }
    const A* qrow = sQ + warp * kRows * Dh;
    const A* dorow = sdO + warp * kRows * Dh;

    for (int j0 = 0; j0 < n_end; j0 += kBN) {
      __syncthreads();
      for (int e = tid; e < kBN * Dh; e += kWarps * 32) {
        const int r = e / Dh, d = e - r * Dh, j = j0 + r;
        sK[r * ld + d] = j < S ? load_rot(kb + j * f.k_ss, d, Dh, cosp, sinp, j) : A(0);
        sV[r * ld + d] = j < S ? to_acc(vb[j * f.v_ss + d]) : A(0);
      }
      __syncthreads();

      const int j = j0 + lane;
      A s[kRows], dp[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) s[r] = dp[r] = 0;
      if (lane < kBN) {
        const A* krow = sK + lane * ld;
        const A* vrow = sV + lane * ld;
#pragma unroll 2
        for (int d = 0; d < Dh; ++d) {
          const A kv = krow[d], vv = vrow[d];
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            s[r] += qrow[r * Dh + d] * kv;
            dp[r] += dorow[r * Dh + d] * vv;
          }
        }
      }
      A ds[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int i = m0 + warp * kRows + r;
        const bool ok = lane < kBN && j < S && i < S && (!causal || j <= i);
        const A pv = ok ? fast_exp2(s[r] * scale_log2 - lse_r[r]) : A(0);
        ds[r] = pv * (dp[r] - delta_r[r]);
      }
      const int jn = min(kBN, n_end - j0);
      for (int jj = 0; jj < jn; ++jj) {
        A dsj[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) dsj[r] = __shfl_sync(0xffffffffu, ds[r], jj);
        const A* krow = sK + jj * ld;
#pragma unroll
        for (int c = 0; c < kMaxC; ++c) {
          const int d = c * 32 + lane;
          if (d < Dh) {
            const A kv = krow[d];
#pragma unroll
            for (int r = 0; r < kRows; ++r) dqa[r][c] += dsj[r] * kv;
          }
        }
      }
    }

    // stage scale * dQ in this warp's Q rows, then the rotary backward
    __syncwarp();
    A* stg = sQ + warp * kRows * Dh;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < kMaxC; ++c) {
        const int d = c * 32 + lane;
        if (d < Dh) stg[r * Dh + d] = dqa[r][c] * scale;
      }
    }
    __syncwarp();
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = m0 + warp * kRows + r;
      if (i >= S) continue;
      T* dst = dq + ((n * S + i) * H + h) * Dh;
      for (int d = lane; d < Dh; d += 32) {
        dst[d] = from_acc<T>(rot_bwd(stg + r * Dh, d, Dh, cosp, sinp, i));
      }
    }
  }
}

// dK, dV: block = kBM keys; loop over query tiles (one query per lane for the scores).
// Shared: K [kBM][Dh] (rotated; reused to stage dK), V [kBM][Dh], Q [kBN][Dh + 1] (rotated),
// dO [kBN][Dh + 1], lse * log2(e) [kBN], delta [kBN].
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) dkdv_kernel(const AttnBwdParams p) {
  using A = acc_type<T>;
  constexpr int kBN = tile_n<A>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const AttnFwdParams& f = p.f;
  const int S = f.S, H = f.H, Dh = f.Dh, ld = Dh + 1;
  A* sK = reinterpret_cast<A*>(smem_raw);
  A* sV = sK + kBM * Dh;
  A* sQ = sV + kBM * Dh;
  A* sdO = sQ + kBN * ld;
  A* sL = sdO + kBN * ld;
  A* sDl = sL + kBN;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const T* q = static_cast<const T*>(f.q);
  const T* k = static_cast<const T*>(f.k);
  const T* v = static_cast<const T*>(f.v);
  const T* dout = static_cast<const T*>(p.dout);
  const A* lse = static_cast<const A*>(f.lse);
  const A* delta = static_cast<const A*>(p.delta);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
  const A* cosp = static_cast<const A*>(f.cos);
  const A* sinp = static_cast<const A*>(f.sin);
  const bool causal = f.causal;
  const A log2e = static_cast<A>(1.4426950408889634);
  const A scale = static_cast<A>(f.scale);
  const A scale_log2 = scale * log2e;
  const int64_t k_blocks = (S + kBM - 1) / kBM;
  const int64_t total = f.N * H * k_blocks;

  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const int64_t pair = tile / k_blocks;
    const int j0 = static_cast<int>(tile - pair * k_blocks) * kBM;
    const int64_t n = pair / H;
    const int h = static_cast<int>(pair - n * H);
    const T* qb = q + n * f.q_sn + h * f.q_sh;
    const T* kb = k + n * f.k_sn + h * f.k_sh;
    const T* vb = v + n * f.v_sn + h * f.v_sh;
    const T* dob = dout + n * p.do_sn + h * p.do_sh;
    const A* lse_row = lse + (n * H + h) * S;
    const A* delta_row = delta + (n * H + h) * S;

    __syncthreads();  // the previous tile is done with shared memory
    for (int e = tid; e < kBM * Dh; e += kWarps * 32) {
      const int r = e / Dh, d = e - r * Dh, j = j0 + r;
      sK[e] = j < S ? load_rot(kb + j * f.k_ss, d, Dh, cosp, sinp, j) : A(0);
      sV[e] = j < S ? to_acc(vb[j * f.v_ss + d]) : A(0);
    }
    A dka[kRows][kMaxC], dva[kRows][kMaxC];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < kMaxC; ++c) dka[r][c] = dva[r][c] = 0;
    }
    const A* krow = sK + warp * kRows * Dh;
    const A* vrow = sV + warp * kRows * Dh;

    for (int i0 = causal ? j0 : 0; i0 < S; i0 += kBN) {
      __syncthreads();
      for (int e = tid; e < kBN * Dh; e += kWarps * 32) {
        const int r = e / Dh, d = e - r * Dh, i = i0 + r;
        sQ[r * ld + d] = i < S ? load_rot(qb + i * f.q_ss, d, Dh, cosp, sinp, i) : A(0);
        sdO[r * ld + d] = i < S ? to_acc(dob[i * p.do_ss + d]) : A(0);
      }
      for (int r = tid; r < kBN; r += kWarps * 32) {
        const int i = i0 + r;
        sL[r] = i < S ? lse_row[i] * log2e : A(0);
        sDl[r] = i < S ? delta_row[i] : A(0);
      }
      __syncthreads();

      const int i = i0 + lane;
      A s[kRows], dp[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) s[r] = dp[r] = 0;
      if (lane < kBN) {
        const A* qr = sQ + lane * ld;
        const A* dr = sdO + lane * ld;
#pragma unroll 2
        for (int d = 0; d < Dh; ++d) {
          const A qv = qr[d], dv_ = dr[d];
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            s[r] += krow[r * Dh + d] * qv;
            dp[r] += vrow[r * Dh + d] * dv_;
          }
        }
      }
      A pr[kRows], ds[kRows];
      const A l_i = lane < kBN ? sL[lane] : A(0);
      const A d_i = lane < kBN ? sDl[lane] : A(0);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int j = j0 + warp * kRows + r;
        const bool ok = lane < kBN && i < S && j < S && (!causal || j <= i);
        pr[r] = ok ? fast_exp2(s[r] * scale_log2 - l_i) : A(0);
        ds[r] = pr[r] * (dp[r] - d_i);
      }
      const int in = min(kBN, S - i0);
      for (int ii = 0; ii < in; ++ii) {
        A pi[kRows], dsi[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          pi[r] = __shfl_sync(0xffffffffu, pr[r], ii);
          dsi[r] = __shfl_sync(0xffffffffu, ds[r], ii);
        }
        const A* qr = sQ + ii * ld;
        const A* dr = sdO + ii * ld;
#pragma unroll
        for (int c = 0; c < kMaxC; ++c) {
          const int d = c * 32 + lane;
          if (d < Dh) {
            const A qv = qr[d], dov = dr[d];
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
              dva[r][c] += pi[r] * dov;
              dka[r][c] += dsi[r] * qv;
            }
          }
        }
      }
    }

    // dV directly; scale * dK staged in this warp's K rows, then the rotary backward
    __syncwarp();
    A* stg = sK + warp * kRows * Dh;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int j = j0 + warp * kRows + r;
#pragma unroll
      for (int c = 0; c < kMaxC; ++c) {
        const int d = c * 32 + lane;
        if (d < Dh) {
          stg[r * Dh + d] = dka[r][c] * scale;
          if (j < S) dv[((n * S + j) * H + h) * Dh + d] = from_acc<T>(dva[r][c]);
        }
      }
    }
    __syncwarp();
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int j = j0 + warp * kRows + r;
      if (j >= S) continue;
      T* dst = dk + ((n * S + j) * H + h) * Dh;
      for (int d = lane; d < Dh; d += 32) {
        dst[d] = from_acc<T>(rot_bwd(stg + r * Dh, d, Dh, cosp, sinp, j));
      }
    }
  }
}

}  // namespace simt

// ---------------------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------------------

unsigned grid_for(int64_t tiles) {
  return static_cast<unsigned>(tiles < INT_MAX ? tiles : INT_MAX);
}

// Allows `bytes` of dynamic shared memory for `kernel` when above the default 48 KiB.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= static_cast<size_t>(kSmemDefault)) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

// Row-wise helper kernels: one warp per row, 8 warps per block.
unsigned row_grid(int64_t rows) { return grid_for((rows + 7) / 8); }

template <typename NT, int kD>
cudaError_t launch_tc_fwd(const AttnFwdParams& p, const AttnPlan& plan, cudaStream_t stream) {
  const int bm = plan.fwd_warps * 16;
  const size_t smem = static_cast<size_t>(bm + 2 * plan.fwd_tile_n) * (kD + 8) * sizeof(NT);
  const int64_t tiles = p.N * p.H * ((p.S + bm - 1) / bm);
  auto kernel = tc::fwd_kernel<NT, kD>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid_for(tiles), plan.fwd_warps * 32, smem, stream>>>(p, plan.fwd_tile_n);
  return cudaGetLastError();
}

template <typename NT, int kD, int kBM>
cudaError_t launch_tc_bwd(const AttnBwdParams& p, const AttnPlan& plan, cudaStream_t stream) {
  const int bc = plan.bwd_warps * 16;
  const size_t smem = static_cast<size_t>(2 * bc + 3 * kBM) * (kD + 8) * sizeof(NT) +
                      static_cast<size_t>(bc) * (kBM + 8) * sizeof(NT) + 2 * kBM * sizeof(float);
  const int64_t tiles = p.f.N * p.f.H * ((p.f.S + bc - 1) / bc);
  auto kernel = tc::bwd_kernel<NT, kD, kBM>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid_for(tiles), plan.bwd_warps * 32, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.dq_accum == nullptr) return err;
  dq_convert_kernel<NT><<<row_grid(p.f.N * p.f.S * p.f.H), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename NT>
cudaError_t launch_simt_fwd(const AttnFwdParams& p, cudaStream_t stream) {
  const size_t smem = simt::fwd_smem<NT>(p.Dh);
  const int64_t tiles = p.N * p.H * ((p.S + simt::kBM - 1) / simt::kBM);
  auto kernel = simt::fwd_kernel<NT>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid_for(tiles), simt::kWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename NT>
cudaError_t launch_simt_bwd(const AttnBwdParams& p, cudaStream_t stream) {
  const size_t smem = simt::bwd_smem<NT>(p.f.Dh);
  const int64_t tiles = p.f.N * p.f.H * ((p.f.S + simt::kBM - 1) / simt::kBM);
  auto kq = simt::dq_kernel<NT>;
  auto kkv = simt::dkdv_kernel<NT>;
  cudaError_t err = allow_smem(kq, smem);
  if (err == cudaSuccess) err = allow_smem(kkv, smem);
  if (err != cudaSuccess) return err;
  kq<<<grid_for(tiles), simt::kWarps * 32, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  kkv<<<grid_for(tiles), simt::kWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t run_attn_fwd(const AttnFwdParams& p, cudaStream_t stream) {
  using NT = typename Native<T>::type;
  if (p.N == 0 || p.S == 0 || p.H == 0) return cudaSuccess;
  if constexpr (sizeof(T) == 2) {
    const AttnPlan plan = attn_plan(2, p.S, p.Dh);
    if (plan.tensor_cores) {
      switch (plan.head_dim_bucket) {
        case 32:
          return launch_tc_fwd<NT, 32>(p, plan, stream);
        case 64:
          return launch_tc_fwd<NT, 64>(p, plan, stream);
        default:
          return launch_tc_fwd<NT, 128>(p, plan, stream);
      }
    }
  }
  return launch_simt_fwd<NT>(p, stream);
}

template <typename T>
cudaError_t run_attn_bwd(const AttnBwdParams& p, cudaStream_t stream) {
  using NT = typename Native<T>::type;
  if (p.f.N == 0 || p.f.S == 0 || p.f.H == 0) return cudaSuccess;
  const AttnPlan plan = attn_plan(sizeof(T), p.f.S, p.f.Dh);
  if (!plan.bwd_fused_delta) {
    delta_kernel<NT><<<row_grid(p.f.N * p.f.S * p.f.H), 256, 0, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if constexpr (sizeof(T) == 2) {
    if (plan.tensor_cores) {
      AttnBwdParams pt = p;
      if (plan.bwd_fused_delta) pt.delta = nullptr;  // the kernel computes delta itself
      // query tile: 32 rows for local sequences (one key block), else 64 (32 for Dh > 64)
      const bool local = !plan.bwd_dq_accum;
      switch (plan.head_dim_bucket) {
        case 32:
          return local ? launch_tc_bwd<NT, 32, 32>(pt, plan, stream)
                       : launch_tc_bwd<NT, 32, 64>(pt, plan, stream);
        case 64:
          return local ? launch_tc_bwd<NT, 64, 32>(pt, plan, stream)
                       : launch_tc_bwd<NT, 64, 64>(pt, plan, stream);
        default:
          return launch_tc_bwd<NT, 128, 32>(pt, plan, stream);
      }
    }
  }
  return launch_simt_bwd<NT>(p, stream);
}

template cudaError_t run_attn_fwd<float>(const AttnFwdParams&, cudaStream_t);
template cudaError_t run_attn_fwd<double>(const AttnFwdParams&, cudaStream_t);
template cudaError_t run_attn_fwd<c10::Half>(const AttnFwdParams&, cudaStream_t);
template cudaError_t run_attn_fwd<c10::BFloat16>(const AttnFwdParams&, cudaStream_t);
template cudaError_t run_attn_bwd<float>(const AttnBwdParams&, cudaStream_t);
template cudaError_t run_attn_bwd<double>(const AttnBwdParams&, cudaStream_t);
template cudaError_t run_attn_bwd<c10::Half>(const AttnBwdParams&, cudaStream_t);
template cudaError_t run_attn_bwd<c10::BFloat16>(const AttnBwdParams&, cudaStream_t);

}  // namespace mblm
