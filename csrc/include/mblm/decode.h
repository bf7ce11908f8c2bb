// Decode family: attention of S new positions per row against a key/value cache (cached
// generation and chunked scoring of the Transformer stages).
// Layout: q, k, v are (R, S, H, Dh) with a contiguous last dimension; k_cache and v_cache are
// (B, C, H, Dh) with a contiguous last dimension; lens is (R,) int64 (positions already cached in
// each row); rows is (R,) int64 (the cache row of each query row; None: row r, R == B); cos and sin
// are (R, S, Dh) float32 (float64 allowed for float64 q), both given or both absent. The op writes
// rotary(k) and v into the caches at positions lens[r] .. lens[r] + S - 1 and returns the causal
// attention output (R, S, H, Dh), contiguous. Semantics: attn_decode_ref in mblm/ops/reference.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace mblm {

// Validates shapes, dtypes and devices of attn_decode's arguments (not the values of lens and
// rows); shared by the CPU and CUDA kernels.
void check_attn_decode_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& lens, const std::optional<at::Tensor>& rows,
                            const std::optional<at::Tensor>& cos,
                            const std::optional<at::Tensor>& sin);

}  // namespace mblm
