// Conv family: depthwise causal conv1d over time with an optional SiLU, as the Mamba mixers use
// it, its backward and the one-step decode update. Semantics: mblm/ops/reference.py
// (causal_conv1d_ref).
//
// Layout contract shared by the CPU and CUDA kernels: x (B, C, L) is read through a
// channel-contiguous view (x.stride(1) == 1, any batch/time strides: the transpose of a (B, L, C)
// projection output, which is what the models pass); any other x is copied into that layout.
// y and grad_x are returned as the transpose of a (B, L, C)-contiguous tensor, whatever x's
// layout, so the next (B, L, C) consumer reads them without a copy.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace mblm {

void check_conv1d_fwd_args(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& initial_state);
void check_conv1d_bwd_args(const at::Tensor& grad_y,
                           const std::optional<at::Tensor>& grad_final_state, const at::Tensor& x,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& initial_state);
void check_conv1d_update_args(const at::Tensor& x, const at::Tensor& conv_state,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// x viewed channel-contiguous (a copy only when x.stride(1) != 1).
at::Tensor conv1d_channels_last(const at::Tensor& x);
// An uninitialised (B, C, L) tensor that is the transpose of a (B, L, C)-contiguous one.
at::Tensor conv1d_empty_like_output(const at::Tensor& x, at::ScalarType dtype);
// weight (C, K) as a (K, C)-contiguous table in the compute dtype (float64 for float64 x,
// else float32), and bias (C,) in the compute dtype (zeros when absent).
at::Tensor conv1d_weight_table(const at::Tensor& weight, const at::Tensor& x);
at::Tensor conv1d_bias_vector(const std::optional<at::Tensor>& bias, const at::Tensor& x);
// The K - 1 rows before t = 0 of every batch, (B, K - 1, C) contiguous in x's dtype
// (initial_state transposed, or zeros).
at::Tensor conv1d_prefix_rows(const std::optional<at::Tensor>& initial_state, const at::Tensor& x,
                              int64_t width);
// The last K - 1 elements of [prefix, x] along time: final_state (B, C, K - 1) contiguous.
at::Tensor conv1d_final_state(const at::Tensor& prefix, const at::Tensor& x, int64_t width);

// C++ front functions (through the dispatcher).
std::tuple<at::Tensor, at::Tensor> conv1d_fwd(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& initial_state,
                                              bool activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv1d_bwd(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_state, bool activation);
at::Tensor conv1d_update(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, bool activation);

}  // namespace mblm
