// Scan family, CUDA side: plain parameter structs shared by the ATen front end (csrc/cuda/scan.cu)
// and the device code (csrc/cuda/scan_kernels.cu), plus the launcher declarations. Raw pointers,
// sizes, strides in elements; no ATen types.
#pragma once

#include <cstdint>

namespace mblm {

// Largest state size N the CUDA kernels take: 8 lanes per channel hold up to 8 states each.
inline constexpr int kScanMaxStateCuda = 64;

// A (B, X, L) tensor of the input type (u, delta, z, B, C, y and their gradients) or a (B, X)
// one (scan_update; st unused).
struct ScanStrided {
  const void* p = nullptr;  // null: absent (z)
  int64_t sb = 0, sx = 0, st = 0;
};

// scan_fwd. u, delta, z: (B, D, L); B, C: (B, N, L), any strides, one input type. A: (D, N),
// D, bias: (D,), init: (B, D, N): contiguous float32 (D, bias, init may be null). Outputs: y
// (B, D, L) in the input type (strides given), final_state (B, D, N) and ckpt
// (B, ceil(L / 64), N, D) contiguous float32.
struct ScanFwdParams {
  int64_t batch = 0, dim = 0, len = 0;
  int n = 0;
  ScanStrided u, delta, z, B, C;
  const float* A = nullptr;
  const float* D = nullptr;
  const float* bias = nullptr;
  const float* init = nullptr;
  bool softplus = false;
  ScanStrided y;  // p is written
  float* final_state = nullptr;
  float* ckpt = nullptr;
};

// scan_bwd. The forward's inputs (f.y, f.final_state unused; f.ckpt read), grad_y (B, D, L) any
// strides, g_final (B, D, N) contiguous float32 or null. Outputs: gu, gdelta, gz in the input type
// (strides given; gz.p null without z); gB_acc, gC_acc: (B, L, N) contiguous float32, zero-filled,
// accumulated with atomics; gA_part (B, D, N), gD_part, gbias_part (B, D), g_init (B, D, N):
// contiguous float32, each location written by exactly one thread.
struct ScanBwdParams {
  ScanFwdParams f;
  ScanStrided gy;
  const float* g_final = nullptr;
  ScanStrided gu, gdelta, gz;
  float* gB_acc = nullptr;
  float* gC_acc = nullptr;
  float* gA_part = nullptr;
  float* gD_part = nullptr;
  float* gbias_part = nullptr;
  float* g_init = nullptr;
};

// scan_update. u, delta, z: (B, D); B, C: (B, N), any strides, one input type; state (B, D, N)
// contiguous float32, updated in place; A, D, bias as in ScanFwdParams; y: (B, D) contiguous.
struct ScanUpdateParams {
  int64_t batch = 0, dim = 0;
  int n = 0;
  ScanStrided u, delta, z, B, C;
  const float* A = nullptr;
  const float* D = nullptr;
  const float* bias = nullptr;
  bool softplus = false;
  float* state = nullptr;
  void* y = nullptr;
};

}  // namespace mblm

#ifdef __CUDACC__
#include <cuda_runtime_api.h>

namespace mblm {

// T: float, c10::Half or c10::BFloat16. They launch on `stream` and return the first launch
// error (cudaSuccess when all launches went out).
template <typename T>
cudaError_t run_scan_fwd(const ScanFwdParams& p, cudaStream_t stream);
template <typename T>
cudaError_t run_scan_bwd(const ScanBwdParams& p, cudaStream_t stream);
template <typename T>
cudaError_t run_scan_update(const ScanUpdateParams& p, cudaStream_t stream);

}  // namespace mblm
#endif
