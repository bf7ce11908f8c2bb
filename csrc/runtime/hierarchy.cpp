#include "hierarchy.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/embedding.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/outer.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/stack.h>

#include <stdexcept>
#include <string>
#include <utility>

#include "mblm/patch.h"

namespace mblm::runtime {

namespace {

constexpr double kLayerNormEps = 1e-5;  // nn.LayerNorm's default
constexpr double kRopeBase = 10000.0;

// `name`, or `legacy` (the mblm 0.4.0 layout of token_embs_rev) when only that one is present.
at::Tensor get_either(const Weights& weights, const std::string& name, const std::string& legacy,
                      at::IntArrayRef shape) {
  if (!weights.contains(name) && weights.contains(legacy)) return weights.get(legacy, shape);
  return weights.get(name, shape);
}

void check_config(const ModelConfig& c) {
  const auto n = c.hidden_dims.size();
  if (n == 0) throw std::invalid_argument("hidden_dims: the model needs at least one stage");
  if (c.num_layers.size() != n || c.seq_lens.size() != n) {
    throw std::invalid_argument(
        "hidden_dims, num_layers and seq_lens are not of the same length (" + std::to_string(n) +
        ", " + std::to_string(c.num_layers.size()) + ", " + std::to_string(c.seq_lens.size()) +
        ")");
  }
  if (c.blocks.size() != n) {
    throw std::invalid_argument("block: one stage block per stage expected (" + std::to_string(n) +
                                "), got " + std::to_string(c.blocks.size()));
  }
  if (c.num_tokens <= 0) {
    throw std::invalid_argument("num_tokens must be positive, got " + std::to_string(c.num_tokens));
  }
  for (size_t k = 0; k < n; ++k) {
    if (c.seq_lens[k] <= 0 || c.hidden_dims[k] <= 0) {
      throw std::invalid_argument(
          "stage " + std::to_string(k) + ": seq_lens and hidden_dims must be positive, got " +
          std::to_string(c.seq_lens[k]) + " and " + std::to_string(c.hidden_dims[k]));
    }
  }
}

}  // namespace

Hierarchy::Hierarchy(const ModelConfig& config, const Weights& weights) : config_(config) {
  check_config(config_);
  const int64_t n = config_.num_stages();
  const int64_t vocab = config_.num_tokens;
  const int64_t local_dim = config_.hidden_dims.back();
  patch_bytes_.assign(n, 1);
  for (int64_t k = n - 2; k >= 0; --k)
    patch_bytes_[k] = patch_bytes_[k + 1] * config_.seq_lens[k + 1];

  for (int64_t k = 0; k < n; ++k) {
    start_tokens_.push_back(
        weights.get("start_tokens." + std::to_string(k), {config_.hidden_dims[k]}));
  }
  fixed_pos_.resize(n);
  rope_theta_.resize(n);
  rope_tables_.resize(n);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t dim = config_.hidden_dims[k];
    switch (config_.blocks[k].pos_emb_type) {
      case PosEmbType::kFixed:
        fixed_pos_[k] =
            weights.get("pos_embs." + std::to_string(k) + ".weight", {config_.seq_lens[k], dim});
        break;
      case PosEmbType::kRope: {
        if (dim % 2 != 0) {
          throw std::invalid_argument("stage " + std::to_string(k) +
                                      ": pos_emb_type 'rope' rotates pairs of features and needs "
                                      "an even hidden dim, got " +
                                      std::to_string(dim));
        }
        // RoPE._rope_init: theta_i = 1 / base^(2i / dim) in float32, and the cos/sin table of
        // the stage's P_k positions
        const auto exponents =
            at::arange(0, dim, 2, start_tokens_[k].options().dtype(at::kLong)).to(at::kFloat) / dim;
        rope_theta_[k] = at::reciprocal(at::pow(kRopeBase, exponents)) * 1.0;
        rope_tables_[k] = rope_table(k, config_.seq_lens[k]);
        break;
      }
      case PosEmbType::kNone:
        break;
    }
  }

  token_embs_.resize(n);
  for (int64_t k = n - 1; k >= 0; --k) {
    const std::string p = "token_embs_rev." + std::to_string(n - 1 - k) + ".";
    auto& emb = token_embs_[k];
    const bool local = k == n - 1;
    emb.table = get_either(weights, p + "embedding.weight", p + (local ? "weight" : "0.weight"),
                           {vocab, local_dim});
    if (local) continue;
    const int64_t flat = patch_bytes_[k] * local_dim, dim = config_.hidden_dims[k];
    emb.ln_in_w = get_either(weights, p + "_post.1.weight", p + "2.weight", {flat});
    emb.ln_in_b = get_either(weights, p + "_post.1.bias", p + "2.bias", {flat});
    emb.proj_w = get_either(weights, p + "_post.2.weight", p + "3.weight", {dim, flat});
    emb.proj_b = get_either(weights, p + "_post.2.bias", p + "3.bias", {dim});
    emb.ln_out_w = get_either(weights, p + "_post.3.weight", p + "4.weight", {dim});
    emb.ln_out_b = get_either(weights, p + "_post.3.bias", p + "4.bias", {dim});
  }

  for (int64_t k = 0; k < n; ++k) {
    stages_.push_back(make_stage(config_.blocks[k], k, config_.hidden_dims[k],
                                 config_.num_layers[k], weights,
                                 "stage_models." + std::to_string(k) + "."));
    if (k + 1 < n) {
      const std::string p = "to_next_stage_proj." + std::to_string(k) + ".1.";
      const int64_t out = config_.hidden_dims[k + 1] * config_.seq_lens[k + 1];
      projections_.push_back({weights.get(p + "weight", {out, config_.hidden_dims[k]}),
                              weights.get(p + "bias", {out})});
    }
  }
  logits_w_ = weights.get("to_logits.weight", {vocab, local_dim});
  logits_b_ = weights.get("to_logits.bias", {vocab});
}

at::Tensor Hierarchy::embed(int64_t k, const at::Tensor& ids) const {
  const auto& emb = token_embs_[k];
  const auto bytes = at::embedding(emb.table, ids);
  if (k == num_stages() - 1) return bytes;
  const auto flat = bytes.flatten(-2);
  const auto normed =
      at::layer_norm(flat, {flat.size(-1)}, emb.ln_in_w, emb.ln_in_b, kLayerNormEps);
  const auto projected = at::linear(normed, emb.proj_w, emb.proj_b);
  return at::layer_norm(projected, {projected.size(-1)}, emb.ln_out_w, emb.ln_out_b, kLayerNormEps);
}

std::pair<at::Tensor, at::Tensor> Hierarchy::rope_table(int64_t k, int64_t length) const {
  const auto& theta = rope_theta_[k];
  const auto angles = at::outer(at::arange(length, theta.options()), theta);
  return {angles.cos(), angles.sin()};
}

at::Tensor Hierarchy::rope(int64_t k, const at::Tensor& emb, const at::Tensor& positions,
                           int64_t max_position) const {
  // RoPE.forward: the pair (x[2i], x[2i+1]) at position p rotated by p * theta_i, in float32.
  // Python keeps a table of P_k positions and rebuilds a longer one when it needs it.
  auto [cos_table, sin_table] = max_position < rope_tables_[k].first.size(0)
                                    ? rope_tables_[k]
                                    : rope_table(k, max_position + 1);
  std::vector<int64_t> shape(positions.sizes().begin(), positions.sizes().end());
  shape.push_back(cos_table.size(1));
  const auto flat = positions.flatten();
  const auto cos = cos_table.index_select(0, flat).view(shape);
  const auto sin = sin_table.index_select(0, flat).view(shape);
  const auto pairs = emb.to(at::kFloat).unflatten(-1, {-1, 2});
  const auto even = pairs.select(-1, 0), odd = pairs.select(-1, 1);
  return at::stack({even * cos - odd * sin, odd * cos + even * sin}, -1)
      .flatten(-2)
      .to(emb.scalar_type());
}

at::Tensor Hierarchy::stage_tokens(int64_t k, const at::Tensor& emb, const at::Tensor& positions,
                                   int64_t max_position, const at::Tensor& prev) const {
  at::Tensor x = emb;
  if (rope_theta_[k].defined()) {
    x = rope(k, emb, positions, max_position);
  } else if (fixed_pos_[k].defined()) {
    if (max_position >= fixed_pos_[k].size(0)) {
      throw std::invalid_argument("stage " + std::to_string(k) + ": position " +
                                  std::to_string(max_position) +
                                  " is beyond the learned positional embedding of " +
                                  std::to_string(fixed_pos_[k].size(0)) + " positions");
    }
    x = x + fixed_pos_[k].index_select(0, positions.flatten()).view_as(emb);
  }
  if (prev.defined()) x = x + prev;
  return x;
}

at::Tensor Hierarchy::project(int64_t k, const at::Tensor& y) const {
  const auto& proj = projections_[k];
  const auto out = at::linear(y.reshape({y.size(0), -1, y.size(-1)}), proj.weight, proj.bias);
  const int64_t rows = config_.seq_lens[k + 1];
  return out.reshape({out.size(0) * out.size(1), rows, out.size(2) / rows});
}

at::Tensor Hierarchy::to_logits(const at::Tensor& y) const {
  return at::linear(y, logits_w_, logits_b_);
}

at::Tensor Hierarchy::run_stages(const at::Tensor& ids) const {
  const int64_t n = num_stages();
  std::vector<at::Tensor> embs(n);
  for (int64_t k = n - 1; k >= 0; --k) {
    at::Tensor stage_ids = ids;
    if (k < n - 1) {
      std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().begin() + k + 2);
      shape.push_back(patch_bytes_[k]);
      stage_ids = ids.reshape(shape);
    }
    auto emb = embed(k, stage_ids);
    if (rope_theta_[k].defined()) {
      const int64_t s = emb.size(-2), d = emb.size(-1);
      const auto positions = at::arange(s, ids.options()).unsqueeze(0);
      emb = rope(k, emb.reshape({-1, s, d}), positions, s - 1).view(emb.sizes());
    }
    embs[k] = std::move(emb);
  }
  // Stage k's input (N_k, 1 + s, D_k): the start token, then the patches' embeddings plus learned
  // positions plus the previous stage's projected outputs, over the first `length` patches.
  const auto assemble = [&](int64_t k, int64_t length, const at::Tensor& prev) {
    const auto x = embs[k].reshape({-1, embs[k].size(-2), embs[k].size(-1)}).narrow(1, 0, length);
    std::optional<at::Tensor> pos, previous;
    if (fixed_pos_[k].defined()) pos = fixed_pos_[k].narrow(0, 0, length);
    if (prev.defined()) previous = prev.narrow(1, 0, length);
    return mblm::stage_input_fwd(x, start_tokens_[k], pos, previous);
  };
  at::Tensor prev;
  for (int64_t k = 0; k + 1 < n; ++k) {
    // Output i feeds patch i + 1: the output after the last patch is not used. A causal
    // Transformer stage computes the others without that last input at all.
    const int64_t seq_len = embs[k].size(-2);
    const auto y = stages_[k]->skips_unused_last_input()
                       ? stages_[k]->forward(assemble(k, seq_len - 1, prev))
                       : stages_[k]->forward(assemble(k, seq_len, prev)).narrow(1, 0, seq_len);
    prev = project(k, y);
  }
  return stages_[n - 1]->forward(assemble(n - 1, embs[n - 1].size(-2), prev));
}

at::Tensor Hierarchy::forward_empty(int64_t batch) const {
  at::Tensor prev, tokens;
  for (int64_t k = 0; k < num_stages(); ++k) {
    tokens = start_tokens_[k].repeat({batch, 1, 1});
    if (prev.defined()) tokens = tokens + prev.narrow(-2, 0, tokens.size(-2));
    tokens = stages_[k]->forward(tokens);
    if (k + 1 < num_stages()) prev = project(k, tokens);
  }
  return to_logits(tokens);
}

}  // namespace mblm::runtime
