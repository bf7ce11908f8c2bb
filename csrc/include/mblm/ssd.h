// SSD family: the Mamba2 state-space-dual scan (mamba_ssm's mamba_chunk_scan_combined without z
// and seq_idx), its backward and the single-step decode update. Semantics:
// mblm/ops/reference.py (ssd_ref).
//
// Shapes: x (B, L, H, P); dt (B, L, H); A (H,); B, C (B, L, G, N) with G dividing H (head h reads
// group h / (H / G)); D (H,) or (H, P) or absent; dt_bias (H,) or absent; initial_state
// (B, H, P, N) or absent. x, B and C share one dtype (float64/float32/float16/bfloat16); dt has
// x's dtype or the compute dtype (float64 for float64 x, else float32); A, D and dt_bias are
// float32 (float64 also allowed with float64 x). Any strides: a last dimension that is not
// contiguous is copied inside the op.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

namespace mblm {

// The forward saves the state entering every block of this many steps ("checkpoints", shape
// (B, H, ceil(L / kSsdCheckpointSteps), P, N) in the compute dtype, the first one being the
// initial state); the backward recomputes the states of a block from its checkpoint, so memory
// is O(L / kSsdCheckpointSteps * H * P * N). mblm/ops/ssd.py repeats this constant.
constexpr int64_t kSsdCheckpointSteps = 256;

inline int64_t ssd_num_checkpoints(int64_t length) {
  return (length + kSsdCheckpointSteps - 1) / kSsdCheckpointSteps;
}

// float64 inputs compute in float64, the others in float32.
inline at::ScalarType ssd_compute_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Argument checks shared by the CPU and CUDA kernels; each throws c10::Error naming the argument,
// the expected and the actual shape/dtype/device. check_values also rejects a non-finite A
// (reads A's values: the CUDA front end skips it while a CUDA graph is being captured).
void check_ssd_fwd_args(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C,
                        const std::optional<at::Tensor>& D,
                        const std::optional<at::Tensor>& dt_bias,
                        const std::optional<at::Tensor>& initial_state, bool check_values);
void check_ssd_bwd_args(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
                        const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C,
                        const std::optional<at::Tensor>& D,
                        const std::optional<at::Tensor>& dt_bias,
                        const std::optional<at::Tensor>& initial_state,
                        const at::Tensor& checkpoints, bool check_values);
// ssd_update: state (B, H, P, N) updated in place; x (B, H, P); dt (B, H); B, C (B, G, N).
// state is float32/float64 (the compute dtype) or x's dtype.
void check_ssd_update_args(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                           const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                           const std::optional<at::Tensor>& D,
                           const std::optional<at::Tensor>& dt_bias, bool check_values);

// C++ front functions: call the ops through the dispatcher (any device with a kernel).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ssd_fwd(
    const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
    const std::optional<at::Tensor>& initial_state);

using SsdGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor>;
SsdGrads ssd_bwd(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
                 const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                 const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                 const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                 const std::optional<at::Tensor>& initial_state, const at::Tensor& checkpoints);

at::Tensor ssd_update(at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                      const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                      const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& dt_bias,
                      bool dt_softplus);

}  // namespace mblm
