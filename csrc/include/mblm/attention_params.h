// Attention family, CUDA side: plain parameter structs shared by the ATen front end
// (csrc/cuda/attention.cu) and the device code (csrc/cuda/attention_kernels.cu), plus the launcher
// declarations. Raw pointers, sizes, strides in elements; no ATen types.
#pragma once

#include <cstdint>

namespace mblm {

// attn_fwd. q, k, v: (N, S, H, Dh) with a contiguous last dimension; cos, sin: (S, Dh)
// contiguous in the accumulation type (float32, float64 for float64 inputs) or null; out:
// (N, S, H, Dh) contiguous in the input type; lse: (N, H, S) contiguous in the accumulation type.
struct AttnFwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_sn = 0, q_ss = 0, q_sh = 0;
  int64_t k_sn = 0, k_ss = 0, k_sh = 0;
  int64_t v_sn = 0, v_ss = 0, v_sh = 0;
  const void* cos = nullptr;
  const void* sin = nullptr;
  void* out = nullptr;
  void* lse = nullptr;
  int64_t N = 0;
  int S = 0, H = 0, Dh = 0;
  double scale = 1.0;
  bool causal = false;
};

// attn_bwd. The forward's inputs plus grad_out and out ((N, S, H, Dh), contiguous last dimension)
// and lse. dq, dk, dv: (N, S, H, Dh) contiguous in the input type. delta: (N, H, S) workspace in
// the accumulation type (rowsum(grad_out * out)), unused (may be null) when
// attn_plan().bwd_fused_delta. dq_accum: (N, S, H, Dh) float32 workspace,
// zero-filled, needed when attn_bwd_needs_dq_accum() says so (null otherwise).
struct AttnBwdParams {
  AttnFwdParams f;  // q, k, v, cos, sin, lse (read), sizes, scale, causal; f.out unused
  const void* dout = nullptr;
  int64_t do_sn = 0, do_ss = 0, do_sh = 0;
  const void* o = nullptr;
  int64_t o_sn = 0, o_ss = 0, o_sh = 0;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* delta = nullptr;
  float* dq_accum = nullptr;
};

// Largest head dim the kernels take; every head dim must be a positive multiple of 8 up to it.
inline constexpr int kAttnMaxHeadDim = 256;

// Which kernels run for a problem: the one place that picks the regime (csrc/cuda/
// attention_kernels.cu defines it). `elem_bytes` is the input element size (2, 4 or 8).
struct AttnPlan {
  bool tensor_cores = false;  // mma.sync path (float16/bfloat16, Dh <= 128); else CUDA cores
  int head_dim_bucket = 0;    // compile-time head dim of the tensor-core kernels (32, 64, 128)
  int fwd_warps = 0;          // tensor-core forward: warps per block (16 query rows each)
  int fwd_tile_n = 0;         // tensor-core forward: K / V rows in shared memory (all keys of a
                              // local sequence, else a streamed tile of 64)
  int bwd_warps = 0;          // tensor-core backward: warps per block (16 keys each)
  bool bwd_dq_accum = false;  // backward accumulates dq with float32 atomics (several key blocks)
  bool bwd_fused_delta = false;  // backward computes delta = rowsum(dO * O) in its own kernel
};
AttnPlan attn_plan(int elem_bytes, int64_t S, int64_t Dh);

}  // namespace mblm

#ifdef __CUDACC__
#include <cuda_runtime_api.h>

namespace mblm {

// T: float, double, c10::Half or c10::BFloat16. They launch on `stream` and return the first
// launch error (cudaSuccess when all launches went out).
template <typename T>
cudaError_t run_attn_fwd(const AttnFwdParams& p, cudaStream_t stream);
template <typename T>
cudaError_t run_attn_bwd(const AttnBwdParams& p, cudaStream_t stream);

}  // namespace mblm
#endif
