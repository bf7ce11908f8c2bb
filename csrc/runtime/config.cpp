// Model config parsing, mirroring mblm/model/config.py: MBLMModelConfig's fields, and a stage
// block parsed into the first of TransformerBlock, MambaBlock, TransformerEncoderBlock that
// validates (the registry's order). Unknown keys are ignored, as pydantic does. On top of what
// pydantic checks, sizes the model cannot be built with are rejected here, naming the field.
#include "config.h"

#include <yaml-cpp/yaml.h>

#include <fstream>
#include <functional>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>

#include "yaml_value.h"

namespace mblm::runtime {
namespace {

using yaml_value::join;

const char* const kSupportedBlocks =
    "the C++ runtime supports block_type 'transformer', 'transformerEncoder', 'mamba1' and "
    "'mamba2' (custom Python stage blocks cannot run here)";

// The field `key` of mapping `node` (undefined when absent). A key given twice keeps its last
// value, as yaml.safe_load does (yaml-cpp's lookup would return the first).
YAML::Node field_of(const YAML::Node& node, const char* key) {
  const YAML::Node& lookup = node;
  YAML::Node found = lookup[key];
  if (!found.IsDefined()) return found;
  for (const auto& item : node) {
    if (item.first.IsScalar() && item.first.Scalar() == key) found.reset(item.second);
  }
  return found;
}

[[noreturn]] void missing(const std::string& field) {
  throw std::invalid_argument(field + ": field required");
}

int64_t required_int(const YAML::Node& node, const char* key, const std::string& where) {
  const YAML::Node value = field_of(node, key);
  if (!value.IsDefined()) missing(join(where, key));
  return yaml_value::to_int(value, join(where, key));
}

bool required_bool(const YAML::Node& node, const char* key, const std::string& where) {
  const YAML::Node value = field_of(node, key);
  if (!value.IsDefined()) missing(join(where, key));
  return yaml_value::to_bool(value, join(where, key));
}

template <typename T, typename Read>
T optional_field(const YAML::Node& node, const char* key, const std::string& where, T fallback,
                 Read read) {
  const YAML::Node value = field_of(node, key);
  return value.IsDefined() ? read(value, join(where, key)) : fallback;
}

PosEmbType parse_pos_emb_type(const YAML::Node& block, const std::string& where) {
  const YAML::Node value = field_of(block, "pos_emb_type");
  if (yaml_value::is_null(value)) return PosEmbType::kNone;
  const std::string field = join(where, "pos_emb_type");
  std::string name;
  try {
    name = yaml_value::to_str(value, field);
  } catch (const std::invalid_argument&) {
    name.clear();
  }
  if (name == "fixed") return PosEmbType::kFixed;
  if (name == "rope") return PosEmbType::kRope;
  throw std::invalid_argument(field + ": expected null, 'fixed' or 'rope', got " +
                              yaml_value::describe(value));
}

// block_type as given, or `fallback` when absent.
std::string block_type_of(const YAML::Node& block, const std::string& where,
                          const std::string& fallback) {
  const YAML::Node value = field_of(block, "block_type");
  return value.IsDefined() ? yaml_value::to_str(value, join(where, "block_type")) : fallback;
}

StageBlockConfig parse_transformer(const YAML::Node& block, const std::string& where,
                                   bool encoder) {
  StageBlockConfig out;
  out.pos_emb_type = parse_pos_emb_type(block, where);
  TransformerBlockConfig t;
  t.attn_head_dims = required_int(block, "attn_head_dims", where);
  t.attn_num_heads = required_int(block, "attn_num_heads", where);
  t.attn_use_rot_embs = required_bool(block, "attn_use_rot_embs", where);
  t.attn_dropout = optional_field(block, "attn_dropout", where, 0.0, yaml_value::to_float);
  t.ff_multiplier = optional_field(block, "ff_multiplier", where, int64_t{2}, yaml_value::to_int);
  t.ff_dropout = optional_field(block, "ff_dropout", where, 0.0, yaml_value::to_float);
  t.use_flash_attn = optional_field(block, "use_flash_attn", where, false, yaml_value::to_bool);
  t.causal = !encoder;
  const std::string expected = encoder ? "transformerEncoder" : "transformer";
  out.block_type = block_type_of(block, where, expected);
  if (out.block_type != expected) {
    throw std::invalid_argument(join(where, "block_type") + ": expected '" + expected +
                                "' for this block, got '" + out.block_type + "'");
  }
  out.block = t;
  return out;
}

StageBlockConfig parse_mamba(const YAML::Node& block, const std::string& where) {
  StageBlockConfig out;
  out.pos_emb_type = parse_pos_emb_type(block, where);
  MambaBlockConfig m;
  m.d_state = required_int(block, "d_state", where);
  m.d_conv = required_int(block, "d_conv", where);
  m.expand = required_int(block, "expand", where);
  m.headdim = required_int(block, "headdim", where);
  m.dropout = optional_field(block, "dropout", where, 0.0, yaml_value::to_float);
  out.block_type = block_type_of(block, where, "mamba2");
  if (out.block_type != "mamba1" && out.block_type != "mamba2") {
    throw std::invalid_argument(join(where, "block_type") + ": unknown Mamba variant '" +
                                out.block_type +
                                "': expected 'mamba2' (mamba_ssm parameter tree) or 'mamba1' "
                                "(mambapy parameter tree)");
  }
  m.mamba1 = out.block_type == "mamba1";
  out.block = m;
  return out;
}

bool has_any(const YAML::Node& block, std::initializer_list<const char*> keys) {
  for (const char* key : keys) {
    if (field_of(block, key).IsDefined()) return true;
  }
  return false;
}

// The Python registry tries TransformerBlock, MambaBlock, TransformerEncoderBlock in this order
// and keeps the first that validates. When none does, the error of the class the block was meant
// for (its block_type, else its fields) is the useful one.
StageBlockConfig parse_block(const YAML::Node& block, const std::string& where) {
  if (!block.IsDefined() || !block.IsMap()) {
    throw std::invalid_argument(where + ": expected a mapping of stage block fields, got " +
                                yaml_value::describe(block));
  }
  using Parser = std::function<StageBlockConfig()>;
  const Parser transformer = [&] { return parse_transformer(block, where, false); };
  const Parser mamba = [&] { return parse_mamba(block, where); };
  const Parser encoder = [&] { return parse_transformer(block, where, true); };
  for (const Parser& parse : {transformer, mamba, encoder}) {
    try {
      return parse();
    } catch (const std::invalid_argument&) {
    }
  }
  const YAML::Node type = field_of(block, "block_type");
  if (!type.IsDefined()) {
    const bool looks_mamba = has_any(block, {"d_state", "d_conv", "expand", "headdim"}) &&
                             !has_any(block, {"attn_head_dims", "attn_num_heads"});
    return looks_mamba ? mamba() : transformer();
  }
  const std::string name = yaml_value::to_str(type, join(where, "block_type"));
  if (name == "transformer") return transformer();
  if (name == "transformerEncoder") return encoder();
  if (name.find("mamba") != std::string::npos) return mamba();
  throw std::invalid_argument(join(where, "block_type") + ": unsupported stage block '" + name +
                              "': " + kSupportedBlocks);
}

void require_positive(int64_t value, const std::string& field) {
  if (value <= 0) {
    throw std::invalid_argument(field + ": must be positive, got " + std::to_string(value));
  }
}

void require_probability(double value, const std::string& field) {
  if (!(value >= 0.0 && value <= 1.0)) {
    std::ostringstream msg;
    msg << field << ": a dropout probability must lie in [0, 1], got " << value;
    throw std::invalid_argument(msg.str());
  }
}

// Sizes the stage models cannot be built or run with (Python fails later, in torch).
void check_block(const StageBlockConfig& block, const std::string& where, int64_t hidden_dim,
                 const std::string& hidden_field) {
  if (block.pos_emb_type == PosEmbType::kRope && hidden_dim % 2 != 0) {
    throw std::invalid_argument(join(where, "pos_emb_type") + ": 'rope' rotates pairs of " +
                                hidden_field + " = " + std::to_string(hidden_dim) +
                                ", which must be even");
  }
  if (block.is_mamba()) {
    const MambaBlockConfig& m = block.mamba();
    require_positive(m.d_state, join(where, "d_state"));
    require_positive(m.d_conv, join(where, "d_conv"));
    require_positive(m.expand, join(where, "expand"));
    require_positive(m.headdim, join(where, "headdim"));
    require_probability(m.dropout, join(where, "dropout"));
    if (!m.mamba1 && (m.expand * hidden_dim) % m.headdim != 0) {
      throw std::invalid_argument(join(where, "headdim") + ": must divide expand * " +
                                  hidden_field + " = " + std::to_string(m.expand) + " * " +
                                  std::to_string(hidden_dim) + ", got " +
                                  std::to_string(m.headdim));
    }
    return;
  }
  const TransformerBlockConfig& t = block.transformer();
  require_positive(t.attn_head_dims, join(where, "attn_head_dims"));
  require_positive(t.attn_num_heads, join(where, "attn_num_heads"));
  require_positive(t.ff_multiplier, join(where, "ff_multiplier"));
  require_probability(t.attn_dropout, join(where, "attn_dropout"));
  require_probability(t.ff_dropout, join(where, "ff_dropout"));
  if (t.attn_use_rot_embs && t.attn_head_dims % 2 != 0) {
    throw std::invalid_argument(join(where, "attn_head_dims") +
                                ": rotary embeddings (attn_use_rot_embs) need an even head "
                                "width, got " +
                                std::to_string(t.attn_head_dims));
  }
}

void check_sizes(const ModelConfig& c, const std::string& where) {
  require_positive(c.num_tokens, join(where, "num_tokens"));
  if (c.pad_token_id < 0 || c.pad_token_id >= c.num_tokens) {
    throw std::invalid_argument(
        join(where, "pad_token_id") + ": must lie in [0, num_tokens) = [0, " +
        std::to_string(c.num_tokens) + "), got " + std::to_string(c.pad_token_id));
  }
  if (c.hidden_dims.empty()) {
    throw std::invalid_argument(join(where, "hidden_dims") +
                                ": the model needs at least one stage");
  }
  int64_t context = 1;
  for (size_t k = 0; k < c.hidden_dims.size(); ++k) {
    const std::string index = "[" + std::to_string(k) + "]";
    require_positive(c.hidden_dims[k], join(where, "hidden_dims" + index));
    require_positive(c.num_layers[k], join(where, "num_layers" + index));
    require_positive(c.seq_lens[k], join(where, "seq_lens" + index));
    if (c.seq_lens[k] > std::numeric_limits<int64_t>::max() / context) {
      throw std::invalid_argument(join(where, "seq_lens") +
                                  ": the context length (their product) overflows");
    }
    context *= c.seq_lens[k];
  }
}

}  // namespace

ModelConfig parse_model_config(const YAML::Node& node, const std::string& where) {
  if (!node.IsDefined() || !node.IsMap()) {
    throw std::invalid_argument((where.empty() ? std::string("model config") : where) +
                                ": expected a mapping of model fields, got " +
                                yaml_value::describe(node));
  }
  ModelConfig c;
  c.num_tokens = required_int(node, "num_tokens", where);
  c.pad_token_id = required_int(node, "pad_token_id", where);
  const auto int_list = [&](const char* key) {
    const YAML::Node value = field_of(node, key);
    if (!value.IsDefined()) missing(join(where, key));
    return yaml_value::to_int_list(value, join(where, key));
  };
  c.hidden_dims = int_list("hidden_dims");
  c.num_layers = int_list("num_layers");
  c.seq_lens = int_list("seq_lens");
  // Unused at inference, but required by MBLMModelConfig (null or a list of integers).
  const YAML::Node chunks = field_of(node, "train_checkpoint_chunks");
  if (!chunks.IsDefined()) {
    throw std::invalid_argument(join(where, "train_checkpoint_chunks") +
                                ": field required (null is allowed)");
  }
  if (!yaml_value::is_null(chunks))
    yaml_value::to_int_list(chunks, join(where, "train_checkpoint_chunks"));

  const YAML::Node block = field_of(node, "block");
  if (!block.IsDefined()) missing(join(where, "block"));
  std::vector<StageBlockConfig> blocks;
  const bool given_as_list = block.IsSequence();
  if (given_as_list) {
    for (size_t k = 0; k < block.size(); ++k) {
      blocks.push_back(parse_block(block[k], join(where, "block[" + std::to_string(k) + "]")));
    }
  } else {
    blocks.push_back(parse_block(block, join(where, "block")));
  }

  if (c.hidden_dims.size() != c.num_layers.size() || c.hidden_dims.size() != c.seq_lens.size()) {
    throw std::invalid_argument(join(where, "hidden_dims") +
                                ": hidden_dims, num_layers and seq_lens are not of the same "
                                "length (" +
                                std::to_string(c.hidden_dims.size()) + ", " +
                                std::to_string(c.num_layers.size()) + ", " +
                                std::to_string(c.seq_lens.size()) + ")");
  }
  if (given_as_list && blocks.size() != c.hidden_dims.size()) {
    throw std::invalid_argument(join(where, "block") +
                                ": a list of blocks must hold one block per "
                                "stage (" +
                                std::to_string(c.hidden_dims.size()) + "), got " +
                                std::to_string(blocks.size()));
  }
  check_sizes(c, where);
  for (size_t k = 0; k < c.hidden_dims.size(); ++k) {
    const StageBlockConfig& b = given_as_list ? blocks[k] : blocks[0];
    const std::string block_where =
        given_as_list ? join(where, "block[" + std::to_string(k) + "]") : join(where, "block");
    check_block(b, block_where, c.hidden_dims[k], "hidden_dims[" + std::to_string(k) + "]");
    c.blocks.push_back(b);
  }
  return c;
}

namespace {

// The model fields of a document: its `params` section (a training config) or the document itself
// (a bare model config).
ModelConfig parse_document(const YAML::Node& root, const std::string& source) {
  if (!root.IsMap()) {
    throw std::invalid_argument(source +
                                ": expected a mapping (a model config or a training "
                                "config with a params section), got " +
                                yaml_value::describe(root));
  }
  const YAML::Node params = field_of(root, "params");
  const bool has_model_fields = field_of(root, "num_tokens").IsDefined() ||
                                field_of(root, "hidden_dims").IsDefined() ||
                                field_of(root, "block").IsDefined();
  if (params.IsDefined() && !has_model_fields) return parse_model_config(params, "params");
  if (!has_model_fields) {
    throw std::invalid_argument(source +
                                ": holds neither a params section nor model fields "
                                "(num_tokens, hidden_dims, ..., block)");
  }
  return parse_model_config(root);
}

YAML::Node load_yaml(const std::string& text, const std::string& source) {
  try {
    return YAML::Load(text);
  } catch (const YAML::Exception& err) {
    throw std::invalid_argument(source + ": not valid YAML/JSON: " + err.what());
  }
}

ModelConfig with_source(const std::string& source, const std::function<ModelConfig()>& parse) {
  try {
    return parse();
  } catch (const std::invalid_argument& err) {
    const std::string what = err.what();
    if (what.rfind(source + ":", 0) == 0) throw;
    throw std::invalid_argument(source + ": " + what);
  }
}

}  // namespace

ModelConfig load_model_config(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file)
    throw std::invalid_argument("config file " + path + " does not exist or cannot be read");
  std::ostringstream text;
  text << file.rdbuf();
  if (file.bad()) throw std::invalid_argument("config file " + path + " cannot be read");
  const YAML::Node root = load_yaml(text.str(), path);
  return with_source(path, [&] { return parse_document(root, path); });
}

ModelConfig parse_model_config_text(const std::string& text, const std::string& where) {
  const std::string source = where.empty() ? "model config text" : where;
  const YAML::Node root = load_yaml(text, source);
  return with_source(source, [&] { return parse_document(root, source); });
}

}  // namespace mblm::runtime
