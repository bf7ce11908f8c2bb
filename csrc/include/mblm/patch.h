// Patch family: hierarchical padding/reshaping of byte ids, stage-input assembly and the
// read-back of the local stage's outputs. Semantics: mblm/ops/reference.py (patch_*_ref,
// stage_input_ref).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

namespace mblm {

// Argument checks shared by the CPU and CUDA kernels (csrc/ops/patch.cpp). Each throws
// c10::Error naming the argument, the expected and the actual shape/dtype/device/value.
void check_patch_pad_args(const at::Tensor& ids, at::IntArrayRef inner_sizes);
void check_patch_pad_value(const at::Tensor& ids, int64_t pad_id);
void check_stage_input_args(const at::Tensor& x, const at::Tensor& start,
                            const std::optional<at::Tensor>& pos,
                            const std::optional<at::Tensor>& prev);
void check_stage_input_bwd_args(const at::Tensor& grad);
void check_patch_unpatch_args(const at::Tensor& y, int64_t length, bool with_start);
void check_patch_unpatch_bwd_args(const at::Tensor& grad, at::IntArrayRef y_shape, bool with_start);

// Sizes derived from the arguments (valid after the checks above).
// prod(inner_sizes): the number of bytes of one global patch.
int64_t patch_inner_numel(at::IntArrayRef inner_sizes);
// The rows a (B, ..., 1 + P, D) local output can give back: G * P (+1 with the start row),
// where G is the product of the middle dims.
int64_t patch_unpatch_rows(at::IntArrayRef y_shape, bool with_start);

// C++ front functions: call the ops through the dispatcher (any device with a kernel).
at::Tensor patch_pad(const at::Tensor& ids, at::IntArrayRef inner_sizes, int64_t pad_id);
at::Tensor stage_input_fwd(const at::Tensor& x, const at::Tensor& start,
                           const std::optional<at::Tensor>& pos,
                           const std::optional<at::Tensor>& prev);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stage_input_bwd(const at::Tensor& grad,
                                                                           bool has_pos,
                                                                           bool has_prev);
at::Tensor patch_unpatch_fwd(const at::Tensor& y, int64_t length, bool with_start);
at::Tensor patch_unpatch_bwd(const at::Tensor& grad, at::IntArrayRef y_shape, bool with_start);

}  // namespace mblm
