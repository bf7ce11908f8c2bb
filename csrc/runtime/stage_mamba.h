// What the Mamba1 and Mamba2 stages share: a stack run from per-layer (conv, SSM) states, and the
// cache that keeps those states per row (MambaCache of mblm/model/cache.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "stage.h"

namespace mblm::runtime {

struct LayerState {
  at::Tensor conv;  // (B, C, d_conv - 1): the last conv inputs, in the model dtype
  at::Tensor ssm;   // (B, ...) the SSM state, float32 (float64 for a float64 model)
};

class MambaStack : public Stage {
 public:
  // Runs x (B, L, D). With `state` (one entry per layer), starts from it and leaves the state
  // after the last step in it (one position: the single-step update kernels, in place); without,
  // starts from zeros.
  virtual at::Tensor run(const at::Tensor& x, std::vector<LayerState>* state) const = 0;
  // Zero states for `batch` rows.
  virtual std::vector<LayerState> zero_state(int64_t batch) const = 0;

  at::Tensor forward(const at::Tensor& x) const override { return run(x, nullptr); }
  bool skips_unused_last_input() const override { return false; }
  // Mamba states do not grow with the sequence: `capacity` is not used.
  std::unique_ptr<StageCache> make_cache(int64_t batch, int64_t capacity) const override;
};

// The SSM state dtype of a model whose weights have dtype `dtype`.
inline at::ScalarType mamba_state_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace mblm::runtime
