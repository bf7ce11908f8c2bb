// Model config parsing: the fields, defaults and parse order of mblm/model/config.py, and errors
// that name the field.
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>

#include "config.h"
#include "json.h"

namespace mblm::runtime {
namespace {

const std::string kStages = R"(
num_tokens: 257
pad_token_id: 256
hidden_dims: [64, 32]
num_layers: [2, 1]
seq_lens: [16, 8]
train_checkpoint_chunks: null
)";

const std::string kTransformer = R"(
  attn_head_dims: 16
  attn_num_heads: 2
  attn_use_rot_embs: true
)";

const std::string kMamba = R"(
  d_state: 16
  d_conv: 4
  expand: 2
  headdim: 16
)";

ModelConfig parse(const std::string& text) { return parse_model_config(YAML::Load(text)); }

ModelConfig parse_block(const std::string& block_fields) {
  return parse(kStages + "block:\n" + block_fields);
}

// The message of the std::invalid_argument `fn` throws ("" when it throws none).
template <typename Fn>
std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const std::invalid_argument& err) {
    return err.what();
  }
  return "";
}

std::string block_error(const std::string& block_fields) {
  return error_of([&] { parse_block(block_fields); });
}

::testing::AssertionResult contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "'" << text << "' does not contain '" << part << "'";
}

TEST(RuntimeConfig, TransformerDefaults) {
  const ModelConfig c = parse_block(kTransformer);
  EXPECT_EQ(c.num_tokens, 257);
  EXPECT_EQ(c.pad_token_id, 256);
  EXPECT_EQ(c.hidden_dims, (std::vector<int64_t>{64, 32}));
  EXPECT_EQ(c.num_layers, (std::vector<int64_t>{2, 1}));
  EXPECT_EQ(c.seq_lens, (std::vector<int64_t>{16, 8}));
  EXPECT_EQ(c.num_stages(), 2);
  EXPECT_EQ(c.context_length(), 128);
  ASSERT_EQ(c.blocks.size(), 2u);  // a single block serves every stage
  for (const StageBlockConfig& b : c.blocks) {
    EXPECT_EQ(b.block_type, "transformer");
    EXPECT_EQ(b.pos_emb_type, PosEmbType::kNone);
    ASSERT_FALSE(b.is_mamba());
    const TransformerBlockConfig& t = b.transformer();
    EXPECT_EQ(t.attn_head_dims, 16);
    EXPECT_EQ(t.attn_num_heads, 2);
    EXPECT_TRUE(t.attn_use_rot_embs);
    EXPECT_EQ(t.attn_dropout, 0.0);
    EXPECT_EQ(t.ff_multiplier, 2);
    EXPECT_EQ(t.ff_dropout, 0.0);
    EXPECT_FALSE(t.use_flash_attn);
    EXPECT_TRUE(t.causal);
  }
}

TEST(RuntimeConfig, TransformerAllFields) {
  const ModelConfig c = parse_block(kTransformer + R"(
  attn_dropout: 0.25
  ff_multiplier: 4
  ff_dropout: 0.5
  use_flash_attn: true
  pos_emb_type: fixed
)");
  const TransformerBlockConfig& t = c.blocks[1].transformer();
  EXPECT_EQ(t.attn_dropout, 0.25);
  EXPECT_EQ(t.ff_multiplier, 4);
  EXPECT_EQ(t.ff_dropout, 0.5);
  EXPECT_TRUE(t.use_flash_attn);
  EXPECT_EQ(c.blocks[1].pos_emb_type, PosEmbType::kFixed);
}

TEST(RuntimeConfig, EncoderBlockByType) {
  const ModelConfig c = parse_block(kTransformer + "  block_type: transformerEncoder\n");
  EXPECT_EQ(c.blocks[0].block_type, "transformerEncoder");
  EXPECT_FALSE(c.blocks[0].transformer().causal);
}

TEST(RuntimeConfig, MambaDefaultsAndVariants) {
  ModelConfig c = parse_block(kMamba);
  ASSERT_TRUE(c.blocks[0].is_mamba());
  EXPECT_EQ(c.blocks[0].block_type, "mamba2");
  const MambaBlockConfig& m = c.blocks[0].mamba();
  EXPECT_EQ(m.d_state, 16);
  EXPECT_EQ(m.d_conv, 4);
  EXPECT_EQ(m.expand, 2);
  EXPECT_EQ(m.headdim, 16);
  EXPECT_EQ(m.dropout, 0.0);
  EXPECT_FALSE(m.mamba1);
  c = parse_block(kMamba + "  block_type: mamba1\n  dropout: 0.1\n");
  EXPECT_EQ(c.blocks[0].block_type, "mamba1");
  EXPECT_TRUE(c.blocks[0].mamba().mamba1);
  EXPECT_EQ(c.blocks[0].mamba().dropout, 0.1);
}

// Python tries TransformerBlock, MambaBlock, TransformerEncoderBlock and keeps the first that
// validates: fields of both kinds without block_type make a transformer; with block_type mamba2,
// a Mamba block.
TEST(RuntimeConfig, RegistryParseOrder) {
  EXPECT_EQ(parse_block(kTransformer + kMamba).blocks[0].block_type, "transformer");
  EXPECT_EQ(parse_block(kTransformer + kMamba + "  block_type: mamba2\n").blocks[0].block_type,
            "mamba2");
  EXPECT_EQ(parse_block(kTransformer + kMamba + "  block_type: transformerEncoder\n")
                .blocks[0]
                .block_type,
            "transformerEncoder");
}

TEST(RuntimeConfig, BlockListAndPositionalEmbeddings) {
  const ModelConfig c = parse(kStages + "block:\n  - " + R"(d_state: 8
    d_conv: 4
    expand: 2
    headdim: 32
    pos_emb_type: null
  - attn_head_dims: 8
    attn_num_heads: 4
    attn_use_rot_embs: false
    pos_emb_type: rope
)");
  ASSERT_EQ(c.blocks.size(), 2u);
  EXPECT_TRUE(c.blocks[0].is_mamba());
  EXPECT_EQ(c.blocks[0].pos_emb_type, PosEmbType::kNone);
  EXPECT_EQ(c.blocks[1].block_type, "transformer");
  EXPECT_EQ(c.blocks[1].pos_emb_type, PosEmbType::kRope);
}

// pydantic's lax coercion of what yaml.safe_load produces.
TEST(RuntimeConfig, ScalarCoercionLikePydantic) {
  ModelConfig c = parse_block(R"(
  attn_head_dims: 16.0
  attn_num_heads: "2"
  attn_use_rot_embs: "yes"
  attn_dropout: "1e-1"
  ff_multiplier: 1_0
  use_flash_attn: 1
)");
  const TransformerBlockConfig& t = c.blocks[0].transformer();
  EXPECT_EQ(t.attn_head_dims, 16);
  EXPECT_EQ(t.attn_num_heads, 2);
  EXPECT_TRUE(t.attn_use_rot_embs);
  EXPECT_DOUBLE_EQ(t.attn_dropout, 0.1);
  EXPECT_EQ(t.ff_multiplier, 10);
  EXPECT_TRUE(t.use_flash_attn);
  c = parse_block(kTransformer + "  use_flash_attn: off\n  ff_multiplier: 0x4\n");
  EXPECT_FALSE(c.blocks[0].transformer().use_flash_attn);
  EXPECT_EQ(c.blocks[0].transformer().ff_multiplier, 4);
}

TEST(RuntimeConfig, ExtraKeysAreIgnored) {
  const ModelConfig c = parse(kStages + "input_seq_len: 128\nsomething: [1, 2]\nblock:\n" +
                              kTransformer + "  unknown_field: 3\n");
  EXPECT_EQ(c.num_tokens, 257);
}

TEST(RuntimeConfig, MissingFieldsAreNamed) {
  for (const char* field : {"num_tokens", "pad_token_id", "hidden_dims", "num_layers", "seq_lens",
                            "train_checkpoint_chunks"}) {
    YAML::Node node = YAML::Load(kStages + "block:\n" + kTransformer);
    node.remove(field);
    const std::string err = error_of([&] { parse_model_config(node, "params"); });
    EXPECT_TRUE(contains(err, std::string("params.") + field + ": field required"));
  }
  EXPECT_TRUE(contains(error_of([&] { parse(kStages); }), "block: field required"));
  for (const char* field : {"attn_head_dims", "attn_num_heads", "attn_use_rot_embs"}) {
    YAML::Node node = YAML::Load(kStages + "block:\n" + kTransformer);
    node["block"].remove(field);
    EXPECT_TRUE(contains(error_of([&] { parse_model_config(node); }),
                         std::string("block.") + field + ": field required"));
  }
  for (const char* field : {"d_state", "d_conv", "expand", "headdim"}) {
    YAML::Node node = YAML::Load(kStages + "block:\n" + kMamba);
    node["block"].remove(field);
    EXPECT_TRUE(contains(error_of([&] { parse_model_config(node); }),
                         std::string("block.") + field + ": field required"));
  }
}

TEST(RuntimeConfig, BadValuesAreNamed) {
  EXPECT_TRUE(contains(block_error(kTransformer + "  ff_multiplier: 2.5\n"),
                       "block.ff_multiplier: expected an integer"));
  EXPECT_TRUE(contains(block_error(kTransformer + "  ff_multiplier: abc\n"),
                       "block.ff_multiplier: expected an integer, got 'abc'"));
  EXPECT_TRUE(contains(block_error(kTransformer + "  use_flash_attn: 2\n"),
                       "block.use_flash_attn: expected a boolean"));
  EXPECT_TRUE(contains(block_error(kTransformer + "  attn_dropout: high\n"),
                       "block.attn_dropout: expected a number"));
  EXPECT_TRUE(contains(block_error(kTransformer + "  attn_dropout: null\n"),
                       "block.attn_dropout: expected a number, got null"));
  EXPECT_TRUE(contains(block_error(kTransformer + "  pos_emb_type: learned\n"),
                       "block.pos_emb_type: expected null, 'fixed' or 'rope', got 'learned'"));
  EXPECT_TRUE(contains(block_error(kTransformer + "  block_type: 5\n"),
                       "block.block_type: expected a string, got '5'"));
  EXPECT_TRUE(contains(block_error(kMamba + "  d_state: [1]\n"),
                       "block.d_state: expected an integer, got a list"));
  EXPECT_TRUE(contains(block_error(kMamba + "  block_type: mamba3\n"),
                       "block.block_type: unknown Mamba variant 'mamba3'"));
  EXPECT_TRUE(contains(error_of([] { parse(kStages + "block: 5\n"); }),
                       "block: expected a mapping of stage block fields, got '5'"));
  EXPECT_TRUE(contains(error_of([] {
                         parse(
                             "num_tokens: 257\npad_token_id: 0\nhidden_dims: 64\nnum_layers: [1]\n"
                             "seq_lens: [8]\ntrain_checkpoint_chunks: null\nblock:\n" +
                             kTransformer);
                       }),
                       "hidden_dims: expected a list of integers, got '64'"));
  EXPECT_TRUE(contains(error_of([] {
                         parse(
                             "num_tokens: 257\npad_token_id: 0\nhidden_dims: [64, x]\n"
                             "num_layers: [1]\nseq_lens: [8]\ntrain_checkpoint_chunks: null\n"
                             "block:\n" +
                             kTransformer);
                       }),
                       "hidden_dims[1]: expected an integer, got 'x'"));
  EXPECT_TRUE(contains(
      error_of([] { parse(kStages + "train_checkpoint_chunks: 3\nblock:\n" + kTransformer); }),
      "train_checkpoint_chunks: expected a list of integers"));
  EXPECT_TRUE(contains(
      error_of([] { parse(kStages + "train_checkpoint_chunks: [a]\nblock:\n" + kTransformer); }),
      "train_checkpoint_chunks[0]: expected an integer, got 'a'"));
  EXPECT_TRUE(contains(block_error(kTransformer + "  pos_emb_type: [fixed]\n"),
                       "block.pos_emb_type: expected null, 'fixed' or 'rope', got a list"));
  EXPECT_TRUE(contains(error_of([] { parse("num_tokens: 99999999999999999999\n"); }),
                       "num_tokens: '99999999999999999999' is out of the range"));
}

TEST(RuntimeConfig, CustomBlockIsRejectedClearly) {
  const std::string err = block_error("  block_type: lstm\n  hidden: 3\n");
  EXPECT_TRUE(contains(err, "block.block_type: unsupported stage block 'lstm'"));
  EXPECT_TRUE(contains(err, "'transformer', 'transformerEncoder', 'mamba1' and 'mamba2'"));
}

TEST(RuntimeConfig, StageCountsMustAgree) {
  EXPECT_TRUE(
      contains(error_of([] {
                 parse(
                     "num_tokens: 257\npad_token_id: 0\nhidden_dims: [64, 32]\nnum_layers: [1]\n"
                     "seq_lens: [8, 8]\ntrain_checkpoint_chunks: null\nblock:\n" +
                     kTransformer);
               }),
               "hidden_dims, num_layers and seq_lens are not of the same length (2, 1, 2)"));
  EXPECT_TRUE(contains(error_of([] {
                         parse(kStages +
                               "block:\n  - {attn_head_dims: 8, attn_num_heads: 2, "
                               "attn_use_rot_embs: true}\n");
                       }),
                       "block: a list of blocks must hold one block per stage (2), got 1"));
  EXPECT_TRUE(contains(
      error_of([] {
        parse(
            "num_tokens: 257\npad_token_id: 0\nhidden_dims: []\nnum_layers: []\nseq_lens: []\n"
            "train_checkpoint_chunks: null\nblock: []\n");
      }),
      "hidden_dims: the model needs at least one stage"));
}

TEST(RuntimeConfig, SizesTheModelCannotUse) {
  const auto stages = [](const std::string& top) {
    return top +
           "\nhidden_dims: [64, 32]\nnum_layers: [2, 1]\nseq_lens: [16, 8]\n"
           "train_checkpoint_chunks: null\nblock:\n" +
           kTransformer;
  };
  EXPECT_TRUE(contains(error_of([&] { parse(stages("num_tokens: 0\npad_token_id: 0")); }),
                       "num_tokens: must be positive, got 0"));
  EXPECT_TRUE(contains(error_of([&] { parse(stages("num_tokens: 257\npad_token_id: 257")); }),
                       "pad_token_id: must lie in [0, num_tokens) = [0, 257), got 257"));
  EXPECT_TRUE(contains(error_of([&] { parse(stages("num_tokens: 257\npad_token_id: -1")); }),
                       "pad_token_id: must lie in [0, num_tokens)"));
  EXPECT_TRUE(contains(error_of([] {
                         parse(
                             "num_tokens: 257\npad_token_id: 0\nhidden_dims: [64, 0]\n"
                             "num_layers: [1, 1]\nseq_lens: [8, 8]\n"
                             "train_checkpoint_chunks: null\nblock:\n" +
                             kTransformer);
                       }),
                       "hidden_dims[1]: must be positive, got 0"));
  EXPECT_TRUE(contains(error_of([] {
                         parse(
                             "num_tokens: 257\npad_token_id: 0\nhidden_dims: [64, 32]\n"
                             "num_layers: [1, 1]\nseq_lens: [8, -2]\n"
                             "train_checkpoint_chunks: null\nblock:\n" +
                             kTransformer);
                       }),
                       "seq_lens[1]: must be positive, got -2"));
  EXPECT_TRUE(contains(block_error(R"(
  attn_head_dims: 0
  attn_num_heads: 2
  attn_use_rot_embs: false
)"),
                       "block.attn_head_dims: must be positive, got 0"));
  EXPECT_TRUE(contains(
      block_error(R"(
  attn_head_dims: 15
  attn_num_heads: 2
  attn_use_rot_embs: true
)"),
      "block.attn_head_dims: rotary embeddings (attn_use_rot_embs) need an even head width"));
  EXPECT_TRUE(contains(block_error(kTransformer + "  ff_dropout: 1.5\n"),
                       "block.ff_dropout: a dropout probability must lie in [0, 1], got 1.5"));
  EXPECT_TRUE(
      contains(block_error(kMamba + "  d_conv: 0\n"), "block.d_conv: must be positive, got 0"));
  // expand * hidden_dims[1] = 2 * 32 = 64 is no multiple of 48.
  EXPECT_TRUE(contains(block_error(kMamba + "  headdim: 48\n"),
                       "block.headdim: must divide expand * hidden_dims[0] = 2 * 64, got 48"));
  EXPECT_NO_THROW(parse_block(kMamba + "  headdim: 48\n  block_type: mamba1\n"));
  EXPECT_TRUE(contains(error_of([] {
                         parse(
                             "num_tokens: 257\npad_token_id: 0\nhidden_dims: [63]\n"
                             "num_layers: [1]\nseq_lens: [8]\ntrain_checkpoint_chunks: null\n"
                             "block:\n  - " +
                             std::string(R"(attn_head_dims: 8
    attn_num_heads: 2
    attn_use_rot_embs: true
    pos_emb_type: rope
)"));
                       }),
                       "block[0].pos_emb_type: 'rope' rotates pairs of hidden_dims[0] = 63"));
}

TEST(RuntimeConfig, JsonText) {
  const std::string json =
      R"({"num_tokens": 257, "pad_token_id": 256, "input_seq_len": 64, "seq_lens": [8, 8],
          "hidden_dims": [32, 16], "num_layers": [1, 1], "train_checkpoint_chunks": [2],
          "block": [{"block_type": "mamba1", "d_state": 8, "d_conv": 4, "expand": 2,
                     "headdim": 8, "pos_emb_type": null},
                    {"attn_head_dims": 8, "attn_num_heads": 2, "attn_use_rot_embs": true,
                     "attn_dropout": 1e-05, "pos_emb_type": "fixed"}]})";
  const ModelConfig c = parse_model_config_text(json);
  EXPECT_EQ(c.blocks[0].block_type, "mamba1");
  EXPECT_EQ(c.blocks[1].pos_emb_type, PosEmbType::kFixed);
  EXPECT_DOUBLE_EQ(c.blocks[1].transformer().attn_dropout, 1e-5);
  EXPECT_TRUE(contains(error_of([] { parse_model_config_text("{\"num_tokens\": ", "meta"); }),
                       "meta: not valid YAML/JSON"));
  EXPECT_TRUE(contains(error_of([] { parse_model_config_text("[1, 2]", "meta"); }),
                       "meta: expected a mapping"));
  EXPECT_TRUE(contains(error_of([] { parse_model_config_text("{\"num_tokens\": 5}", "meta"); }),
                       "meta: pad_token_id: field required"));
}

class TempFile {
 public:
  explicit TempFile(const std::string& text)
      : path_(std::filesystem::temp_directory_path() /
              ("mblm_cfg_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
               "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name() + ".yaml")) {
    std::ofstream(path_) << text;
  }
  ~TempFile() { std::filesystem::remove(path_); }
  std::string path() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

TEST(RuntimeConfig, LoadTrainingConfigFile) {
  const ModelConfig c = load_model_config(MBLM_SOURCE_DIR "/configs/demo.yaml");
  EXPECT_EQ(c.num_tokens, 257);
  EXPECT_EQ(c.pad_token_id, 256);
  EXPECT_EQ(c.seq_lens, (std::vector<int64_t>{32, 8}));
  EXPECT_EQ(c.blocks[0].block_type, "mamba2");
  EXPECT_EQ(c.blocks[0].mamba().headdim, 32);
  EXPECT_EQ(c.blocks[1].block_type, "transformer");
  EXPECT_EQ(c.blocks[1].pos_emb_type, PosEmbType::kFixed);
}

// The parsed fields as JSON (tests/runtime/test_config_parity.py compares them with pydantic's).
std::string dump(const ModelConfig& c) {
  const auto ints = [](const std::vector<int64_t>& v) {
    std::string out = "[";
    for (size_t i = 0; i < v.size(); ++i) out += (i ? "," : "") + std::to_string(v[i]);
    return out + "]";
  };
  const auto number = [](double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.17g", v);
    return std::string(buf);
  };
  const auto boolean = [](bool v) { return std::string(v ? "true" : "false"); };
  std::string out = "{\"num_tokens\":" + std::to_string(c.num_tokens) +
                    ",\"pad_token_id\":" + std::to_string(c.pad_token_id) +
                    ",\"hidden_dims\":" + ints(c.hidden_dims) +
                    ",\"num_layers\":" + ints(c.num_layers) + ",\"seq_lens\":" + ints(c.seq_lens) +
                    ",\"blocks\":[";
  for (size_t k = 0; k < c.blocks.size(); ++k) {
    const StageBlockConfig& b = c.blocks[k];
    const char* pos = b.pos_emb_type == PosEmbType::kNone    ? "null"
                      : b.pos_emb_type == PosEmbType::kFixed ? "\"fixed\""
                                                             : "\"rope\"";
    out += std::string(k ? "," : "") + "{\"block_type\":" + json::quote(b.block_type) +
           ",\"pos_emb_type\":" + pos;
    if (b.is_mamba()) {
      const MambaBlockConfig& m = b.mamba();
      out += ",\"d_state\":" + std::to_string(m.d_state) +
             ",\"d_conv\":" + std::to_string(m.d_conv) + ",\"expand\":" + std::to_string(m.expand) +
             ",\"headdim\":" + std::to_string(m.headdim) + ",\"dropout\":" + number(m.dropout);
    } else {
      const TransformerBlockConfig& t = b.transformer();
      out += ",\"attn_head_dims\":" + std::to_string(t.attn_head_dims) +
             ",\"attn_num_heads\":" + std::to_string(t.attn_num_heads) +
             ",\"attn_use_rot_embs\":" + boolean(t.attn_use_rot_embs) +
             ",\"attn_dropout\":" + number(t.attn_dropout) +
             ",\"ff_multiplier\":" + std::to_string(t.ff_multiplier) +
             ",\"ff_dropout\":" + number(t.ff_dropout) +
             ",\"use_flash_attn\":" + boolean(t.use_flash_attn);
    }
    out += "}";
  }
  return out + "]}";
}

// Parses every *.yaml of MBLM_RUNTIME_CONFIG_DIR (default: configs/) and, when
// MBLM_RUNTIME_CONFIG_OUT names a directory, writes <name>.json there: the parsed fields or
// {"error": message}. Without the variables, every shipped config must parse.
TEST(RuntimeConfigInterop, ParsesConfigDirectory) {
  const char* in = std::getenv("MBLM_RUNTIME_CONFIG_DIR");
  const char* out = std::getenv("MBLM_RUNTIME_CONFIG_OUT");
  const std::filesystem::path dir = in ? in : MBLM_SOURCE_DIR "/configs";
  int parsed = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() != ".yaml") continue;
    std::string result;
    try {
      result = dump(load_model_config(entry.path().string()));
    } catch (const std::invalid_argument& err) {
      result = "{\"error\":" + json::quote(err.what()) + "}";
      if (out == nullptr) ADD_FAILURE() << err.what();
    }
    if (out != nullptr) {
      std::ofstream(std::filesystem::path(out) / (entry.path().stem().string() + ".json"))
          << result;
    }
    ++parsed;
  }
  EXPECT_GT(parsed, 0);
}

TEST(RuntimeConfig, LoadBareConfigAndFileErrors) {
  TempFile bare(kStages + "block:\n" + kTransformer);
  EXPECT_EQ(load_model_config(bare.path()).num_tokens, 257);

  TempFile bad("io:\n  name_model: x\nparams:\n" + std::string(R"(  num_tokens: 257
  pad_token_id: 0
  hidden_dims: [16]
  num_layers: [1]
  seq_lens: [8]
  train_checkpoint_chunks: null
  block:
    - d_state: x
      d_conv: 4
      expand: 2
      headdim: 8
)"));
  EXPECT_EQ(error_of([&] { load_model_config(bad.path()); }),
            bad.path() + ": params.block[0].d_state: expected an integer, got 'x'");

  TempFile broken("params: [unclosed\n");
  EXPECT_TRUE(contains(error_of([&] { load_model_config(broken.path()); }),
                       broken.path() + ": not valid YAML/JSON"));
  TempFile unrelated("io:\n  name_model: x\n");
  EXPECT_TRUE(contains(error_of([&] { load_model_config(unrelated.path()); }),
                       "holds neither a params section nor model fields"));
  EXPECT_TRUE(contains(error_of([] { load_model_config("/nonexistent/config.yaml"); }),
                       "config file /nonexistent/config.yaml does not exist"));
}

}  // namespace
}  // namespace mblm::runtime
