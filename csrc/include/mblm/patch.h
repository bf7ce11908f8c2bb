// Patch family: hierarchical padding/reshaping of byte ids, stage-input assembly and the
// read-back of the local stage's outputs. Semantics: mblm/ops/reference.py (patch_*_ref,
// stage_input_ref).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace mblm {

void check_patch_pad_args(const at::Tensor& ids, at::IntArrayRef inner_sizes);
void check_stage_input_args(const at::Tensor& x, const at::Tensor& start,
                            const std::optional<at::Tensor>& pos,
                            const std::optional<at::Tensor>& prev);
void check_patch_unpatch_args(const at::Tensor& y, int64_t length, bool with_start);

}  // namespace mblm
