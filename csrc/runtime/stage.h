// One stage model of the hierarchy (a Transformer or Mamba stack mapping (N, S, D) to (N, S, D))
// and its inference cache, the runtime's counterparts of mblm/model/{transformer,mamba1,mamba2}.py
// and mblm/model/cache.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "config.h"
#include "weights.h"

namespace mblm::runtime {

// Row selections are (R,) int64 tensors of distinct row indices, or nullopt for all rows in order.
using Rows = std::optional<at::Tensor>;

// The state a stage needs to continue the sequences of `batch` rows (keys/values or SSM states).
class StageCache {
 public:
  virtual ~StageCache() = default;
  // Feeds the next S positions x (R, S, D) of the selected rows; returns their outputs (R, S, D).
  // Feeding a sequence in pieces gives the outputs of one full run (up to float rounding).
  virtual at::Tensor extend(const at::Tensor& x, const Rows& rows) = 0;
  // Resets the selected rows to the state of `start`, a 1-row cache of the same stage.
  virtual void load_start(const Rows& rows, const StageCache& start) = 0;
};

class Stage {
 public:
  virtual ~Stage() = default;
  // x (N, S, D) -> (N, S, D).
  virtual at::Tensor forward(const at::Tensor& x) const = 0;
  // True when output i depends on inputs 0..i only and the stage may skip an unused last input
  // (the causal Transformer stage; the forward pass then runs one position less, as Python's).
  virtual bool skips_unused_last_input() const = 0;
  // An empty cache for `batch` rows of up to `capacity` positions.
  virtual std::unique_ptr<StageCache> make_cache(int64_t batch, int64_t capacity) const = 0;
};

// The stage kinds (stage_transformer.cpp, stage_mamba1.cpp, stage_mamba2.cpp); make_stage picks.
std::unique_ptr<Stage> make_transformer_stage(const TransformerBlockConfig& block, int64_t dim,
                                              int64_t num_layers, const Weights& weights,
                                              const std::string& prefix);
std::unique_ptr<Stage> make_mamba1_stage(const MambaBlockConfig& block, int64_t dim,
                                         int64_t num_layers, const Weights& weights,
                                         const std::string& prefix);
std::unique_ptr<Stage> make_mamba2_stage(const MambaBlockConfig& block, int64_t dim,
                                         int64_t num_layers, const Weights& weights,
                                         const std::string& prefix);

// Builds stage `index` of width `dim` with `num_layers` layers from the tensors named
// "<prefix>..." (prefix e.g. "stage_models.0."). Throws std::invalid_argument for a missing tensor,
// a shape mismatch or a block the runtime cannot run.
std::unique_ptr<Stage> make_stage(const StageBlockConfig& block, int64_t index, int64_t dim,
                                  int64_t num_layers, const Weights& weights,
                                  const std::string& prefix);

}  // namespace mblm::runtime
