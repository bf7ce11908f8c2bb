// Scan family (Mamba1 selective scan): the forward with chunk checkpoints, its backward, and the
// single-step decode update. Semantics: mblm/ops/reference.py (selective_scan_ref).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace mblm {

// scan_fwd saves the state at the start of every chunk of kScanChunk steps (checkpoints of shape
// (B, ceil(L / kScanChunk), N, D)); scan_bwd recomputes the states inside one chunk from its
// checkpoint. Memory of what backward keeps: O(L / kScanChunk * D * N) per sequence.
inline constexpr int64_t kScanChunk = 64;

inline int64_t scan_num_chunks(int64_t length) { return (length + kScanChunk - 1) / kScanChunk; }

// float64 inputs compute in float64, all others in float32 (states, checkpoints, A/D/bias).
inline at::ScalarType scan_compute_dtype(const at::Tensor& u) {
  return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The layout the kernels give an output shaped like a (B, X, L) input `t`: (B, L, X)-contiguous
// (returned transposed) when t is channel-contiguous (stride(1) < stride(2), as the transposes
// the model passes), else (B, X, L)-contiguous. The fakes in mblm/ops/scan.py use the same rule.
at::Tensor scan_empty_like(const at::Tensor& t, at::ScalarType dtype);

// Argument checks shared by the CPU and CUDA kernels (csrc/ops/scan.cpp). Each throws c10::Error
// naming the argument, the expected and the actual shape/dtype/device. A must be finite; that is
// checked for CPU tensors only (on CUDA it would cost a device synchronisation per call).
void check_scan_fwd_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                         const at::Tensor& B, const at::Tensor& C,
                         const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                         const std::optional<at::Tensor>& delta_bias,
                         const std::optional<at::Tensor>& initial_state);
void check_scan_bwd_args(const at::Tensor& grad_y,
                         const std::optional<at::Tensor>& grad_final_state, const at::Tensor& u,
                         const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& C, const std::optional<at::Tensor>& D,
                         const std::optional<at::Tensor>& z,
                         const std::optional<at::Tensor>& delta_bias,
                         const std::optional<at::Tensor>& initial_state,
                         const at::Tensor& checkpoints);
void check_scan_update_args(const at::Tensor& state, const at::Tensor& u, const at::Tensor& delta,
                            const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                            const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                            const std::optional<at::Tensor>& delta_bias);

// What the CUDA kernels take beyond the checks above: float32/float16/bfloat16 u, N <= 64,
// B < 2^31 and D < 16 * 65536 (grid limits).
void check_scan_cuda_limits(const at::Tensor& u, int64_t n);

// C++ front functions: call the ops through the dispatcher (any device with a kernel).
std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
    const std::optional<at::Tensor>& initial_state);

using ScanGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor, at::Tensor>;
ScanGrads scan_bwd(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
                   const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                   const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                   const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                   bool delta_softplus, const std::optional<at::Tensor>& initial_state,
                   const at::Tensor& checkpoints);

at::Tensor scan_update(const at::Tensor& state, const at::Tensor& u, const at::Tensor& delta,
                       const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                       const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& delta_bias, bool delta_softplus);

}  // namespace mblm
