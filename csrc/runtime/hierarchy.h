// The parts of an MBLM (mblm/model/mblm.py) and the pieces of its forward pass that the full
// pass and cached decoding share: per-stage byte embeddings, positional embeddings, stage
// models, next-stage projections and the logits head, read from the state_dict's tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "config.h"
#include "stage.h"
#include "weights.h"

namespace mblm::runtime {

class Hierarchy {
 public:
  // Fetches every tensor of the model from `weights` (shapes checked); throws
  // std::invalid_argument on a missing tensor, a shape mismatch or an unsupported stage.
  Hierarchy(const ModelConfig& config, const Weights& weights);

  int64_t num_stages() const { return static_cast<int64_t>(stages_.size()); }
  const ModelConfig& config() const { return config_; }
  const Stage& stage(int64_t k) const { return *stages_[k]; }
  const at::Tensor& start_token(int64_t k) const { return start_tokens_[k]; }
  // S_k: the bytes in one token of stage k (1 for the local stage).
  int64_t patch_bytes(int64_t k) const { return patch_bytes_[k]; }
  bool fixed_global_positions() const { return fixed_pos_[0].defined(); }
  at::TensorOptions options() const { return start_tokens_[0].options(); }

  // Byte embedding of stage k: ids (..., S_k) for a global stage, (...) for the local one ->
  // (..., D_k).
  at::Tensor embed(int64_t k, const at::Tensor& ids) const;
  // Stage-k inputs of tokens at `positions` (token j sits at sequence position j + 1):
  // emb (R, m, D_k) from embed(), positions (R, m) int64 with maximum `max_position`, prev
  // (R, m, D_k) or undefined. The model-level RoPE rotates emb, a learned position is added,
  // then prev (decoding.py's stage_tokens).
  at::Tensor stage_tokens(int64_t k, const at::Tensor& emb, const at::Tensor& positions,
                          int64_t max_position, const at::Tensor& prev) const;
  // Projection of stage-k outputs y (N, s, D_k) onto the next stage's patches:
  // (N * s, P_{k+1}, D_{k+1}).
  at::Tensor project(int64_t k, const at::Tensor& y) const;
  // (..., D_local) -> (..., V).
  at::Tensor to_logits(const at::Tensor& y) const;

  // The full forward pass of nested ids (B, P0', P_1, ..., P_{n-1}): the local stage's outputs
  // (B * P0' * ... * P_{n-2}, 1 + P_{n-1}, D_local), start positions included.
  at::Tensor run_stages(const at::Tensor& nested_ids) const;
  // Logits (B, 1, V) of an empty input (the original's first distribution, forward_empty).
  at::Tensor forward_empty(int64_t batch) const;

 private:
  struct TokenEmbedding {
    at::Tensor table;               // (V, D_local)
    at::Tensor ln_in_w, ln_in_b;    // (S_k * D_local,) global stages only
    at::Tensor proj_w, proj_b;      // (D_k, S_k * D_local), (D_k,)
    at::Tensor ln_out_w, ln_out_b;  // (D_k,)
  };
  struct Projection {
    at::Tensor weight, bias;  // (D_{k+1} * P_{k+1}, D_k), (D_{k+1} * P_{k+1},)
  };

  // The model-level RoPE of emb (R, s, D) at positions (R or 1, s) (at most max_position).
  at::Tensor rope(int64_t k, const at::Tensor& emb, const at::Tensor& positions,
                  int64_t max_position) const;
  // cos and sin (length, D_k / 2) of the RoPE angles of positions 0..length-1.
  std::pair<at::Tensor, at::Tensor> rope_table(int64_t k, int64_t length) const;

  ModelConfig config_;
  std::vector<int64_t> patch_bytes_;
  std::vector<at::Tensor> start_tokens_;  // (D_k,)
  std::vector<at::Tensor> fixed_pos_;     // (P_k, D_k) for "fixed" stages, else undefined
  std::vector<at::Tensor> rope_theta_;    // (D_k / 2,) for "rope" stages, else undefined
  std::vector<std::pair<at::Tensor, at::Tensor>> rope_tables_;  // cos, sin (P_k, D_k / 2)
  std::vector<TokenEmbedding> token_embs_;                      // per stage, global first
  std::vector<std::unique_ptr<Stage>> stages_;
  std::vector<Projection> projections_;  // stages 0..n-2
  at::Tensor logits_w_, logits_b_;       // (V, D_local), (V,)
};

}  // namespace mblm::runtime
