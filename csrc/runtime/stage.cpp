#include "stage.h"

#include <stdexcept>

namespace mblm::runtime {

namespace {

void check_positive(const std::string& where, const char* field, int64_t value) {
  if (value <= 0) {
    throw std::invalid_argument(where + ": " + field + " must be positive, got " +
                                std::to_string(value));
  }
}

// Refuses Mamba weights of the other layout (mambapy's Mamba1 vs mamba_ssm's Mamba2) with the fix,
// as mblm.model.mamba.check_mamba_variant does, instead of a bare missing-tensor error.
void check_mamba_layout(const std::string& where, const MambaBlockConfig& block,
                        const Weights& weights, const std::string& prefix) {
  const bool has1 = weights.contains(prefix + "layers.0.mixer.x_proj.weight");
  const bool has2 = weights.contains(prefix + "layers.0.mixer.dt_bias") ||
                    weights.contains(prefix + "norm_f.weight");
  if (has1 == has2 || has1 == block.mamba1) return;
  const std::string found = has1 ? "mamba1" : "mamba2";
  const std::string name = has1 ? "mambapy Mamba1" : "mamba_ssm Mamba2";
  throw std::invalid_argument("Checkpoint/config mismatch at " + where + ": the weights hold the " +
                              name + " layout, but the config asks for the other one. Set " +
                              "block_type: " + found + " for this stage in the config.");
}

}  // namespace

std::unique_ptr<Stage> make_stage(const StageBlockConfig& block, int64_t index, int64_t dim,
                                  int64_t num_layers, const Weights& weights,
                                  const std::string& prefix) {
  const std::string where =
      "stage " + std::to_string(index) + " (block_type '" + block.block_type + "')";
  check_positive(where, "hidden_dims", dim);
  if (num_layers < 0) {
    throw std::invalid_argument(where + ": num_layers must be >= 0, got " +
                                std::to_string(num_layers));
  }
  if (block.block_type == "transformer" && !block.is_mamba() && block.transformer().causal) {
    const auto& t = block.transformer();
    check_positive(where, "attn_num_heads", t.attn_num_heads);
    check_positive(where, "attn_head_dims", t.attn_head_dims);
    check_positive(where, "ff_multiplier", t.ff_multiplier);
    if (t.attn_use_rot_embs && t.attn_head_dims % 2 != 0) {
      throw std::invalid_argument(where +
                                  ": the rotary embedding needs an even attn_head_dims, got " +
                                  std::to_string(t.attn_head_dims));
    }
    return make_transformer_stage(t, dim, num_layers, weights, prefix);
  }
  if ((block.block_type == "mamba1" || block.block_type == "mamba2") && block.is_mamba()) {
    const auto& m = block.mamba();
    check_positive(where, "d_state", m.d_state);
    check_positive(where, "d_conv", m.d_conv);
    check_positive(where, "expand", m.expand);
    check_mamba_layout(where, m, weights, prefix);
    if (m.mamba1) return make_mamba1_stage(m, dim, num_layers, weights, prefix);
    check_positive(where, "headdim", m.headdim);
    if ((m.expand * dim) % m.headdim != 0) {
      throw std::invalid_argument(where + ": headdim (" + std::to_string(m.headdim) +
                                  ") must divide expand * d_model (" + std::to_string(m.expand) +
                                  " * " + std::to_string(dim) + ")");
    }
    return make_mamba2_stage(m, dim, num_layers, weights, prefix);
  }
  if (block.block_type == "transformerEncoder") {
    throw std::invalid_argument(
        where +
        ": the bidirectional encoder stage belongs to MBLMEncoder (masked language "
        "modelling); the runtime runs causal MBLM stages: 'transformer', 'mamba1', "
        "'mamba2'");
  }
  throw std::invalid_argument(where +
                              ": unknown stage block; the runtime runs 'transformer', 'mamba1' "
                              "and 'mamba2' stages (custom Python blocks have no C++ counterpart)");
}

}  // namespace mblm::runtime
