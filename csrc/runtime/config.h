// Model config of the C++ runtime: the same YAML schema as the Python package's MBLMModelConfig
// (mblm/model/config.py) and its stage blocks (TransformerBlock, TransformerEncoderBlock,
// MambaBlock), same field names and defaults. Parsing errors name the field (e.g.
// "params.block[1].d_state: expected an integer, got 'x'"). The structs need nothing but the
// standard library; the parsers below (config.cpp) need yaml-cpp and live in mblm_runtime, not
// in mblm_runtime_core (the Python binding fills the structs itself).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

namespace YAML {
class Node;
}

namespace mblm::runtime {

enum class PosEmbType { kNone, kFixed, kRope };

struct TransformerBlockConfig {
  int64_t attn_head_dims = 0;
  int64_t attn_num_heads = 0;
  bool attn_use_rot_embs = false;
  double attn_dropout = 0.0;  // inference: unused
  int64_t ff_multiplier = 2;
  double ff_dropout = 0.0;  // inference: unused
  bool use_flash_attn = false;
  bool causal = true;  // false for block_type "transformerEncoder"
};

struct MambaBlockConfig {
  int64_t d_state = 0;
  int64_t d_conv = 0;
  int64_t expand = 0;
  int64_t headdim = 0;
  double dropout = 0.0;      // inference: unused
  bool mamba1 = false;       // block_type "mamba1" (mambapy tree) vs "mamba2" (mamba_ssm tree)
};

struct StageBlockConfig {
  std::string block_type;  // "transformer" | "transformerEncoder" | "mamba1" | "mamba2"
  PosEmbType pos_emb_type = PosEmbType::kNone;
  std::variant<TransformerBlockConfig, MambaBlockConfig> block;

  bool is_mamba() const { return std::holds_alternative<MambaBlockConfig>(block); }
  const TransformerBlockConfig& transformer() const { return std::get<TransformerBlockConfig>(block); }
  const MambaBlockConfig& mamba() const { return std::get<MambaBlockConfig>(block); }
};

struct ModelConfig {
  int64_t num_tokens = 0;
  int64_t pad_token_id = 0;
  std::vector<int64_t> hidden_dims;  // global -> local
  std::vector<int64_t> num_layers;
  std::vector<int64_t> seq_lens;
  std::vector<StageBlockConfig> blocks;  // one per stage (a single YAML block is repeated)

  int64_t num_stages() const { return static_cast<int64_t>(hidden_dims.size()); }
  int64_t context_length() const {  // product of seq_lens
    int64_t product = 1;
    for (const int64_t len : seq_lens) product *= len;
    return product;
  }
};

// Parses a model config node (the fields of MBLMModelConfig). `where` prefixes field names in
// errors. Throws std::invalid_argument.
ModelConfig parse_model_config(const YAML::Node& node, const std::string& where = "");

// Reads a YAML (or JSON) file holding either a bare model config or a training config whose
// `params` entry is the model config (what mblm-train writes as config.yaml).
ModelConfig load_model_config(const std::string& path);

// Parses YAML/JSON text (e.g. the "params" metadata entry of an exported safetensors file).
ModelConfig parse_model_config_text(const std::string& text, const std::string& where = "");

}  // namespace mblm::runtime
