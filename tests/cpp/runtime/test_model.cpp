// The runtime's Model against the Python package on the fixtures of
// tests/runtime/make_runtime_fixtures.py (tests/golden/runtime/<name>.*): logits within 1e-5,
// the loss, greedy and seeded sampled generation byte for byte; and clear errors for weights that
// do not fit the config and for bad inputs.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "config.h"
#include "model.h"
#include "weights.h"

namespace mblm::runtime {
namespace {

const std::string kGolden = MBLM_SOURCE_DIR "/tests/golden/runtime/";

struct Fixture {
  ModelConfig config;
  Weights weights;
  Weights expected;

  int64_t meta_int(const std::string& key) const { return std::stoll(expected.metadata().at(key)); }
  double meta_double(const std::string& key) const {
    return std::stod(expected.metadata().at(key));
  }
  const at::Tensor& tensor(const std::string& name) const { return expected.get(name); }
  std::vector<at::Tensor> prompts() const {
    std::vector<at::Tensor> out;
    for (int64_t i = 0; i < meta_int("num_prompts"); ++i) {
      out.push_back(tensor("prompt." + std::to_string(i)));
    }
    return out;
  }
};

Fixture load_fixture(const std::string& name) {
  return {load_model_config(kGolden + name + ".yaml"),
          Weights::load_safetensors(kGolden + name + ".safetensors"),
          Weights::load_safetensors(kGolden + name + ".expected.safetensors")};
}

template <typename Fn>
void expect_invalid(Fn&& fn, const std::string& part) {
  try {
    fn();
    ADD_FAILURE() << "expected std::invalid_argument containing '" << part << "'";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
        << "message '" << e.what() << "' lacks '" << part << "'";
  }
}

void expect_rows(const std::vector<at::Tensor>& got, const Fixture& f, const std::string& key) {
  for (size_t i = 0; i < got.size(); ++i) {
    const auto& want = f.tensor(key + "." + std::to_string(i));
    EXPECT_TRUE(at::equal(got[i], want))
        << key << " row " << i << ": got " << got[i] << " want " << want;
  }
}

SamplingOptions greedy() { return SamplingOptions{}; }

class ModelFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(ModelFixture, LogitsAndLossMatchPython) {
  const auto f = load_fixture(GetParam());
  const Model model(f.config, f.weights);
  const auto logits = model.logits(f.tensor("ids"));
  const auto& want = f.tensor("logits");
  ASSERT_EQ(logits.sizes(), want.sizes());
  EXPECT_LE((logits - want).abs().max().item<double>(), 1e-5);
  EXPECT_NEAR(model.loss(f.tensor("ids")).item<double>(), f.tensor("loss").item<double>(), 1e-5);
}

TEST_P(ModelFixture, Float64LogitsMatchPython) {
  auto f = load_fixture(GetParam());
  f.weights.to(at::TensorOptions().dtype(at::kDouble));
  const Model model(f.config, f.weights);
  const auto logits = model.logits(f.tensor("ids"));
  EXPECT_EQ(logits.scalar_type(), at::kDouble);
  EXPECT_LE((logits - f.tensor("logits").to(at::kDouble)).abs().max().item<double>(), 1e-5);
}

TEST_P(ModelFixture, BFloat16RunsCloseToFloat32) {
  auto f = load_fixture(GetParam());
  f.weights.to(at::TensorOptions().dtype(at::kBFloat16));
  const Model model(f.config, f.weights);
  const auto logits = model.logits(f.tensor("ids"));
  EXPECT_EQ(logits.scalar_type(), at::kBFloat16);
  // bf16 keeps 8 bits of mantissa: the logits (about +-1) move by up to 0.017 here
  EXPECT_LE((logits.to(at::kFloat) - f.tensor("logits")).abs().max().item<double>(), 0.05);
  const auto got = model.generate(f.prompts(), 4, greedy());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i].numel(), f.prompts()[i].numel() + 4);
}

TEST_P(ModelFixture, GreedyGenerationMatchesPython) {
  const auto f = load_fixture(GetParam());
  const Model model(f.config, f.weights);
  const auto prompts = f.prompts();
  const int64_t n = f.meta_int("gen_tokens");
  std::vector<std::vector<int64_t>> streamed(prompts.size());
  const auto got = model.generate(
      prompts, n, greedy(), [&](int64_t row, int64_t byte) { streamed[row].push_back(byte); });
  expect_rows(got, f, "greedy");
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto tail = got[i].narrow(0, prompts[i].numel(), n);
    EXPECT_TRUE(at::equal(at::tensor(streamed[i], at::kLong), tail)) << "streamed row " << i;
  }
  // a row alone gives the bytes it gets in the batch
  const auto alone = model.generate({prompts.back()}, n, greedy());
  EXPECT_TRUE(at::equal(alone[0], got.back()));
}

TEST_P(ModelFixture, EndTokenStopsEachRow) {
  const auto f = load_fixture(GetParam());
  const Model model(f.config, f.weights);
  auto options = greedy();
  options.end_of_gen_token_id = f.meta_int("end_token");
  expect_rows(model.generate(f.prompts(), f.meta_int("gen_tokens"), options), f, "stopped");
}

TEST_P(ModelFixture, ZeroTokensFillTheContext) {
  const auto f = load_fixture(GetParam());
  const Model model(f.config, f.weights);
  const auto got = model.generate({f.prompts().back()}, 0, greedy());
  EXPECT_EQ(got[0].numel(), f.config.context_length());
  EXPECT_TRUE(at::equal(got[0], f.tensor("fill")));
}

TEST_P(ModelFixture, SeededSamplingMatchesPython) {
  const auto f = load_fixture(GetParam());
  const Model model(f.config, f.weights);
  SamplingOptions options;
  options.temperature = f.meta_double("temperature");
  options.filter_thres = f.meta_double("filter_thres");
  options.seed = static_cast<uint64_t>(f.meta_int("seed"));
  const auto got = model.generate(f.prompts(), f.meta_int("gen_tokens"), options);
  expect_rows(got, f, "sampled");
  // another seed draws other bytes
  options.seed += 1;
  const auto other = model.generate(f.prompts(), f.meta_int("gen_tokens"), options);
  bool differs = false;
  for (size_t i = 0; i < got.size(); ++i) differs = differs || !at::equal(got[i], other[i]);
  EXPECT_TRUE(differs);
}

TEST_P(ModelFixture, GivenGeneratorIsDrawnFromAsPythonDraws) {
  const auto f = load_fixture(GetParam());
  const Model model(f.config, f.weights);
  SamplingOptions options;
  options.temperature = f.meta_double("temperature");
  options.filter_thres = f.meta_double("filter_thres");
  const auto seed = static_cast<uint64_t>(f.meta_int("seed"));
  options.generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  expect_rows(model.generate(f.prompts(), f.meta_int("gen_tokens"), options), f, "sampled");
  // one uniform number per logit and step, greedy included (Python draws the noise then too)
  const auto drawn = [&](const SamplingOptions& o, int64_t steps) {
    auto expected = at::make_generator<at::CPUGeneratorImpl>(seed);
    at::empty({steps, f.config.num_tokens}).uniform_(0, 1, expected);
    return o.generator->current_seed() == expected.current_seed() &&
           at::equal(o.generator->get_state(), expected.get_state());
  };
  options.generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  options.filter_thres = 1.0;
  model.generate({f.prompts().back()}, 3, options);
  EXPECT_TRUE(drawn(options, 3));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ModelFixture,
                         ::testing::Values("transformer_fixed_2stage", "transformer_rope_3stage",
                                           "mamba1_2stage", "mamba2_2stage",
                                           "hybrid_mamba2_transformer",
                                           "hybrid_mamba1_transformer_3stage"));

// ------------------------------------------------------------------------------ weights errors

std::map<std::string, at::Tensor> tensors_of(const std::string& name) {
  return Weights::load_safetensors(kGolden + name + ".safetensors").tensors();
}

TEST(ModelWeights, MissingTensorIsNamed) {
  const auto f = load_fixture("hybrid_mamba2_transformer");
  auto tensors = f.weights.tensors();
  tensors.erase("stage_models.0.layers.1.mixer.A_log");
  expect_invalid([&] { Model(f.config, Weights::from_map(tensors)); },
                 "stage_models.0.layers.1.mixer.A_log");
}

TEST(ModelWeights, UnexpectedTensorIsNamed) {
  const auto f = load_fixture("mamba1_2stage");
  auto tensors = f.weights.tensors();
  tensors["stage_models.1.extra.weight"] = at::zeros({3});
  expect_invalid([&] { Model(f.config, Weights::from_map(tensors)); },
                 "stage_models.1.extra.weight");
}

TEST(ModelWeights, ShapeMismatchIsNamed) {
  const auto f = load_fixture("transformer_fixed_2stage");
  auto tensors = f.weights.tensors();
  tensors["to_logits.weight"] = at::zeros({257, 15});
  expect_invalid([&] { Model(f.config, Weights::from_map(tensors)); }, "to_logits.weight");
}

TEST(ModelWeights, OtherMambaLayoutIsRefused) {
  // mamba2 weights under a config that asks for mamba1 stages
  auto f = load_fixture("mamba2_2stage");
  for (auto& block : f.config.blocks) {
    block.block_type = "mamba1";
    std::get<MambaBlockConfig>(block.block).mamba1 = true;
  }
  expect_invalid([&] { Model(f.config, f.weights); }, "Set block_type: mamba2 for this stage");
}

TEST(ModelWeights, UnsupportedStageBlocks) {
  auto f = load_fixture("transformer_fixed_2stage");
  f.config.blocks[1].block_type = "myCustomBlock";
  expect_invalid([&] { Model(f.config, f.weights); }, "unknown stage block");
  f.config.blocks[1].block_type = "transformerEncoder";
  std::get<TransformerBlockConfig>(f.config.blocks[1].block).causal = false;
  expect_invalid([&] { Model(f.config, f.weights); }, "MBLMEncoder");
}

TEST(ModelWeights, LegacyTokenEmbeddingNamesLoad) {
  // mblm 0.4.0 stored the local table as token_embs_rev.0.weight and the global embeddings as
  // Sequential(Embedding, Rearrange, LayerNorm, Linear, LayerNorm)
  const auto f = load_fixture("transformer_fixed_2stage");
  auto tensors = f.weights.tensors();
  const std::map<std::string, std::string> renames = {
      {"token_embs_rev.0.embedding.weight", "token_embs_rev.0.weight"},
      {"token_embs_rev.1.embedding.weight", "token_embs_rev.1.0.weight"},
      {"token_embs_rev.1._post.1.weight", "token_embs_rev.1.2.weight"},
      {"token_embs_rev.1._post.1.bias", "token_embs_rev.1.2.bias"},
      {"token_embs_rev.1._post.2.weight", "token_embs_rev.1.3.weight"},
      {"token_embs_rev.1._post.2.bias", "token_embs_rev.1.3.bias"},
      {"token_embs_rev.1._post.3.weight", "token_embs_rev.1.4.weight"},
      {"token_embs_rev.1._post.3.bias", "token_embs_rev.1.4.bias"}};
  for (const auto& [now, old] : renames) {
    tensors[old] = tensors.at(now);
    tensors.erase(now);
  }
  const Model model(f.config, Weights::from_map(tensors));
  EXPECT_TRUE(
      at::equal(model.logits(f.tensor("ids")), Model(f.config, f.weights).logits(f.tensor("ids"))));
}

// ------------------------------------------------------------------------------- input errors

TEST(ModelInputs, BadIds) {
  const auto f = load_fixture("transformer_fixed_2stage");
  const Model model(f.config, f.weights);
  expect_invalid([&] { model.logits(at::full({1, 4}, 257, at::kLong)); },
                 "input_ids must lie in [0, num_tokens) = [0, 257), got values in [257, 257]");
  expect_invalid([&] { model.logits(at::full({1, 4}, -1, at::kLong)); }, "[-1, -1]");
  expect_invalid([&] { model.loss(at::zeros({1, 4}, at::kFloat)); }, "integer tensor");
  expect_invalid([&] { model.logits(at::zeros({4}, at::kLong)); }, "2 dims (B, L)");
  expect_invalid([&] { model.logits(at::zeros({0, 4}, at::kLong)); }, "at least one byte");
  expect_invalid([&] { model.logits(at::zeros({2, 0}, at::kLong)); }, "at least one byte");
  // 33 bytes need 9 global patches; the learned global positions cover 8
  expect_invalid([&] { model.logits(at::zeros({1, 33}, at::kLong)); },
                 "fixed global patch embedding");
  // other integer dtypes are accepted
  const auto ids = f.tensor("ids");
  EXPECT_TRUE(at::equal(model.logits(ids.to(at::kInt)), model.logits(ids)));
}

TEST(ModelInputs, RopeGlobalStageTakesLongerInputs) {
  const auto f = load_fixture("transformer_rope_3stage");
  const Model model(f.config, f.weights);
  ASSERT_GT(f.tensor("ids").size(1), f.config.context_length());  // the fixture's own check
  const auto logits = model.logits(at::zeros({1, 3 * f.config.context_length()}, at::kLong));
  EXPECT_EQ(logits.size(1), 3 * f.config.context_length());
}

TEST(ModelInputs, BadGenerationRequests) {
  const auto f = load_fixture("transformer_fixed_2stage");
  const Model model(f.config, f.weights);
  const auto prompt = at::arange(5, at::kLong);
  expect_invalid([&] { model.generate({}, 4, greedy()); }, "prime is an empty batch");
  expect_invalid([&] { model.generate({prompt, at::full({2}, 300, at::kLong)}, 4, greedy()); },
                 "prime[1] ids must lie in [0, num_tokens) = [0, 257)");
  expect_invalid([&] { model.generate({prompt.reshape({1, 5})}, 4, greedy()); },
                 "prime[0] must be a 1-D tensor");
  expect_invalid([&] { model.generate({prompt.to(at::kFloat)}, 4, greedy()); }, "integer byte ids");
  expect_invalid([&] { model.generate({prompt}, -1, greedy()); }, "num_tokens_to_generate");
  SamplingOptions sampling;
  sampling.filter_thres = 0.5;
  sampling.temperature = 0.0;
  expect_invalid([&] { model.generate({prompt}, 4, sampling); },
                 "temperature must be > 0 when sampling");
  sampling.temperature = 1.0;
  sampling.filter_thres = -0.5;
  expect_invalid([&] { model.generate({prompt}, 4, sampling); }, "filter_thres must be >= 0");
  // greedy decoding ignores the temperature
  auto zero_temperature = greedy();
  zero_temperature.temperature = 0.0;
  EXPECT_EQ(model.generate({prompt}, 4, zero_temperature)[0].numel(), 9);
  // 32 bytes of context: 5 + 28 - 1 = 32 bytes fed is fine, 29 is one too many
  EXPECT_EQ(model.generate({prompt}, 28, greedy())[0].numel(), 33);
  expect_invalid([&] { model.generate({prompt}, 29, greedy()); },
                 "the context is limited to prod(seq_lens) = 32 bytes");
}

TEST(ModelInputs, PromptsBeyondTheContextGetNothingByDefault) {
  const auto f = load_fixture("mamba2_2stage");
  const Model model(f.config, f.weights);
  const auto long_prompt = at::zeros({f.config.context_length() + 3}, at::kLong);
  const auto got = model.generate({long_prompt}, 0, greedy());
  EXPECT_TRUE(at::equal(got[0], long_prompt));
}

}  // namespace
}  // namespace mblm::runtime
