// safetensors reading and writing: round trips of every dtype, and clear errors (never a crash)
// for truncated and malformed files.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>
#include <string>

#include "config.h"
#include "weights.h"

namespace mblm::runtime {
namespace {

namespace fs = std::filesystem;

// The tensors of tests/golden/runtime/python_written.safetensors, as
// tests/runtime/test_safetensors_interop.py defines them: arange(-3, 3) as (2, 3) in every dtype.
std::map<std::string, at::Tensor> fixture_tensors() {
  const at::Tensor base = at::arange(-3, 3, at::kLong).reshape({2, 3});
  std::map<std::string, at::Tensor> t;
  t["f64"] = base.to(at::kDouble) * 0.5;
  t["f32"] = base.to(at::kFloat) * 0.25;
  t["f16"] = base.to(at::kHalf) * 0.5;
  t["bf16"] = base.to(at::kBFloat16) * 2;
  t["i64"] = base * 1'000'000'000'000LL;
  t["i32"] = base.to(at::kInt) * 100'000;
  t["i16"] = base.to(at::kShort) * 1000;
  t["i8"] = base.to(at::kChar) * 40;
  t["u8"] = (base + 3).to(at::kByte) * 50;
  t["bool"] = base.remainder(2).eq(0);
  t["scalar"] = at::scalar_tensor(1.5, at::kFloat);
  t["empty"] = at::zeros({0, 4}, at::kFloat);
  t["stage_models.0.layers.1.weight"] = at::arange(12, at::kFloat).reshape({3, 4});
  return t;
}

void expect_same(const std::map<std::string, at::Tensor>& expected, const Weights& w) {
  ASSERT_EQ(w.tensors().size(), expected.size());
  for (const auto& [name, tensor] : expected) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(w.contains(name));
    const at::Tensor& got = w.tensors().at(name);
    EXPECT_EQ(got.scalar_type(), tensor.scalar_type());
    EXPECT_EQ(got.sizes(), tensor.sizes());
    EXPECT_TRUE(at::equal(got, tensor));
  }
}

std::string temp_path(const std::string& name) {
  return (fs::temp_directory_path() /
          ("mblm_st_" + std::to_string(::getpid()) + "_" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name() + "_" + name))
      .string();
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

// A file with `header` (JSON) as its header and `data_bytes` zero bytes of data.
std::string file_with_header(const std::string& header, size_t data_bytes) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(header.size() >> (8 * i));
  return out + header + std::string(data_bytes, '\0');
}

// The message of the std::runtime_error loading `bytes` as a file throws.
std::string load_error(const std::string& bytes) {
  const std::string path = temp_path("bad.safetensors");
  write_bytes(path, bytes);
  std::string message;
  try {
    Weights::load_safetensors(path);
  } catch (const std::runtime_error& err) {
    message = err.what();
  }
  fs::remove(path);
  EXPECT_FALSE(message.empty()) << "no error";
  if (!message.empty()) {
    EXPECT_NE(message.find(path), std::string::npos) << "the message does not name the file";
  }
  return message;
}

::testing::AssertionResult contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "'" << text << "' does not contain '" << part << "'";
}

TEST(RuntimeWeights, RoundTripEveryDtype) {
  const std::string path = temp_path("rt.safetensors");
  const std::map<std::string, std::string> metadata{
      {"format", "mblm"},
      {"params", "{\"a\": [1, 2], \"q\": \"\\\"x\\\"\\n\\u00e9\"}"},
      {"tab\tkey", "caf\xc3\xa9"}};
  save_safetensors(path, fixture_tensors(), metadata);
  const Weights w = Weights::load_safetensors(path);
  expect_same(fixture_tensors(), w);
  EXPECT_EQ(w.metadata(), metadata);
  // The data starts 8-byte aligned, as the format asks.
  const std::string bytes = read_bytes(path);
  uint64_t header = 0;
  for (int i = 7; i >= 0; --i) header = (header << 8) | static_cast<unsigned char>(bytes[i]);
  EXPECT_EQ(header % 8, 0u);
  fs::remove(path);
}

TEST(RuntimeWeights, NonContiguousAndEmptyInputs) {
  const std::string path = temp_path("nc.safetensors");
  const at::Tensor t = at::arange(12, at::kFloat).reshape({3, 4}).t();
  save_safetensors(path, {{"t", t}});
  const Weights w = Weights::load_safetensors(path);
  EXPECT_TRUE(at::equal(w.get("t", {4, 3}), t));
  EXPECT_TRUE(w.metadata().empty());
  save_safetensors(path, {});
  EXPECT_TRUE(Weights::load_safetensors(path).tensors().empty());
  fs::remove(path);
}

TEST(RuntimeWeights, SaveIsAtomicAndLeavesNoTemporaryFiles) {
  const fs::path dir = temp_path("dir");
  fs::create_directories(dir);
  const std::string path = (dir / "w.safetensors").string();
  save_safetensors(path, {{"a", at::ones({2})}});
  save_safetensors(path, {{"b", at::zeros({3})}});  // replaces the file
  const Weights w = Weights::load_safetensors(path);
  EXPECT_FALSE(w.contains("a"));
  EXPECT_TRUE(w.contains("b"));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
  // An unsupported dtype fails before anything is written.
  EXPECT_THROW(save_safetensors(path, {{"c", at::ones({2}, at::kComplexFloat)}}),
               std::invalid_argument);
  EXPECT_THROW(save_safetensors(path, {{"__metadata__", at::ones({2})}}), std::invalid_argument);
  EXPECT_TRUE(Weights::load_safetensors(path).contains("b"));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
  EXPECT_THROW(save_safetensors((dir / "missing" / "w.safetensors").string(), {}),
               std::runtime_error);
  fs::remove_all(dir);
}

TEST(RuntimeWeights, TruncatedFilesFailClearly) {
  const std::string path = temp_path("full.safetensors");
  save_safetensors(path, fixture_tensors(), {{"format", "mblm"}});
  const std::string full = read_bytes(path);
  fs::remove(path);
  uint64_t header = 0;
  for (int i = 7; i >= 0; --i) header = (header << 8) | static_cast<unsigned char>(full[i]);
  for (size_t cut :
       {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{9}, size_t{8 + header / 2},
        size_t{8 + header - 1}, size_t{8 + header}, size_t{8 + header + 5}, full.size() - 1}) {
    SCOPED_TRACE("cut at " + std::to_string(cut));
    const std::string message = load_error(full.substr(0, cut));
    if (cut < 8) {
      EXPECT_TRUE(contains(message, "fewer than the 8-byte header length"));
    } else if (cut < 8 + header) {
      EXPECT_TRUE(contains(message, "reaches beyond the end of the file"));
    } else {
      EXPECT_TRUE(contains(message, "reach beyond the data buffer"));
      EXPECT_TRUE(contains(message, "truncated"));
    }
  }
}

TEST(RuntimeWeights, MalformedHeadersFailClearly) {
  std::string huge(8, '\xff');
  EXPECT_TRUE(contains(load_error(huge + "{}"), "reaches beyond the end of the file"));
  EXPECT_TRUE(
      contains(load_error(file_with_header("{\"a\": ", 0)), "the header is not valid JSON"));
  EXPECT_TRUE(contains(load_error(file_with_header("{\"a\": 1} x", 0)), "not valid JSON"));
  EXPECT_TRUE(contains(load_error(file_with_header("[1, 2]", 0)), "not a JSON object"));
  EXPECT_TRUE(
      contains(load_error(file_with_header("{\"a\": 5}", 0)), "tensor 'a': expected an object"));
  const auto entry = [](const std::string& name, const std::string& dtype, const std::string& shape,
                        const std::string& offsets) {
    return "\"" + name + "\": {\"dtype\": \"" + dtype + "\", \"shape\": " + shape +
           ", \"data_offsets\": " + offsets + "}";
  };
  EXPECT_TRUE(
      contains(load_error(file_with_header("{" + entry("w", "X99", "[2]", "[0, 8]") + "}", 8)),
               "tensor 'w': unknown dtype 'X99'"));
  EXPECT_TRUE(
      contains(load_error(file_with_header("{" + entry("w", "U16", "[2]", "[0, 4]") + "}", 4)),
               "tensor 'w': dtype U16 is not supported"));
  EXPECT_TRUE(
      contains(load_error(file_with_header("{" + entry("w", "F32", "[2]", "[0, 4]") + "}", 8)),
               "tensor 'w': data_offsets [0, 4] span 4 bytes, but shape [2] of F32 needs 8"));
  EXPECT_TRUE(
      contains(load_error(file_with_header("{" + entry("w", "F32", "[2]", "[8, 0]") + "}", 8)),
               "end before they begin"));
  EXPECT_TRUE(
      contains(load_error(file_with_header("{" + entry("w", "F32", "[2]", "[8, 16]") + "}", 8)),
               "tensor 'w': data_offsets [8, 16] reach beyond the data buffer (8 bytes"));
  EXPECT_TRUE(
      contains(load_error(file_with_header("{" + entry("w", "F32", "[-2]", "[0, 8]") + "}", 8)),
               "every shape entry must be a non-negative integer, got -2"));
  EXPECT_TRUE(
      contains(load_error(file_with_header("{" + entry("w", "F32", "[2.0]", "[0, 8]") + "}", 8)),
               "got 2.0"));
  EXPECT_TRUE(contains(load_error(file_with_header("{" + entry("w", "F32", "[2]", "[0]") + "}", 8)),
                       "data_offsets must be [begin, end]"));
  EXPECT_TRUE(contains(load_error(file_with_header(
                           "{" + entry("w", "F32", "[4611686018427387904, 4]", "[0, 8]") + "}", 8)),
                       "too large"));
  EXPECT_TRUE(
      contains(load_error(file_with_header("{\"w\": {\"dtype\": \"F32\", \"shape\": [2]}}", 8)),
               "tensor 'w': no data_offsets entry"));
  EXPECT_TRUE(contains(load_error(file_with_header("{" + entry("a", "F32", "[2]", "[0, 8]") + ", " +
                                                       entry("b", "F32", "[2]", "[4, 12]") + "}",
                                                   12)),
                       "tensors 'a' and 'b' overlap"));
  EXPECT_TRUE(contains(load_error(file_with_header("{" + entry("a", "F32", "[2]", "[0, 8]") + ", " +
                                                       entry("a", "F32", "[2]", "[8, 16]") + "}",
                                                   16)),
                       "tensor 'a' appears twice"));
  EXPECT_TRUE(contains(load_error(file_with_header("{\"__metadata__\": {\"k\": 1}}", 0)),
                       "__metadata__['k'] must be a string"));
  EXPECT_TRUE(
      contains(load_error(file_with_header("{" + entry("b", "BOOL", "[2]", "[0, 2]") + "}", 0) +
                          std::string("\x01\x07", 2)),
               "neither 0 nor 1"));
  EXPECT_TRUE(contains(load_error(file_with_header(std::string(70, '['), 0)), "nested deeper"));
}

// Random byte changes in the header and the length field: the reader either loads something
// consistent or throws std::runtime_error; it never crashes or reads out of bounds.
TEST(RuntimeWeights, CorruptedHeadersNeverCrash) {
  const std::string path = temp_path("fuzz.safetensors");
  save_safetensors(path, fixture_tensors(), {{"format", "mblm"}});
  const std::string full = read_bytes(path);
  uint64_t header = 0;
  for (int i = 7; i >= 0; --i) header = (header << 8) | static_cast<unsigned char>(full[i]);
  std::mt19937 rng(1234);
  int rejected = 0;
  for (int trial = 0; trial < 300; ++trial) {
    std::string bytes = full;
    const int edits = 1 + static_cast<int>(rng() % 3);
    for (int e = 0; e < edits; ++e) {
      const size_t at = rng() % (8 + header);
      bytes[at] = static_cast<char>(rng() % 256);
    }
    write_bytes(path, bytes);
    try {
      const Weights w = Weights::load_safetensors(path);
      for (const auto& [name, t] : w.tensors()) EXPECT_TRUE(t.defined()) << name;
    } catch (const std::runtime_error& err) {
      EXPECT_NE(std::string(err.what()).find(path), std::string::npos);
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 100);
  fs::remove(path);
}

TEST(RuntimeWeights, MissingFile) {
  try {
    Weights::load_safetensors("/nonexistent/w.safetensors");
    FAIL() << "no error";
  } catch (const std::runtime_error& err) {
    EXPECT_TRUE(contains(err.what(), "safetensors file /nonexistent/w.safetensors: cannot open"));
  }
}

TEST(RuntimeWeights, GetNamesMissingTensorsAndShapeMismatches) {
  const Weights w = Weights::from_map(fixture_tensors());
  EXPECT_EQ(w.unused().size(), fixture_tensors().size());
  EXPECT_TRUE(at::equal(w.get("f32", {2, 3}), fixture_tensors()["f32"]));
  try {
    w.get("stage_models.0.layers.1.mixer.A_log");
    FAIL() << "no error";
  } catch (const std::invalid_argument& err) {
    EXPECT_EQ(std::string(err.what()), "missing tensor 'stage_models.0.layers.1.mixer.A_log'");
  }
  try {
    w.get("stage_models.0.layers.1.weight", {4, 3});
    FAIL() << "no error";
  } catch (const std::invalid_argument& err) {
    EXPECT_EQ(std::string(err.what()),
              "tensor 'stage_models.0.layers.1.weight' has shape [3, 4], expected [4, 3]");
  }
  const std::vector<std::string> unused = w.unused();
  EXPECT_EQ(unused.size(), fixture_tensors().size() - 2);
  EXPECT_EQ(std::count(unused.begin(), unused.end(), "f32"), 0);
  EXPECT_EQ(std::count(unused.begin(), unused.end(), "f64"), 1);
}

TEST(RuntimeWeights, ToCastsOnlyFloatingTensors) {
  Weights w = Weights::from_map(fixture_tensors());
  w.to(at::TensorOptions().dtype(at::kDouble));
  EXPECT_EQ(w.get("f16").scalar_type(), at::kDouble);
  EXPECT_EQ(w.get("bf16").scalar_type(), at::kDouble);
  EXPECT_EQ(w.get("i64").scalar_type(), at::kLong);
  EXPECT_EQ(w.get("bool").scalar_type(), at::kBool);
  EXPECT_TRUE(at::equal(w.get("f16"), fixture_tensors()["f16"].to(at::kDouble)));
}

// A file Python's safetensors wrote (tests/golden/runtime, or the one pytest passes in
// MBLM_RUNTIME_READ) holds the fixture tensors.
TEST(RuntimeWeightsInterop, ReadsPythonWrittenFile) {
  const char* env = std::getenv("MBLM_RUNTIME_READ");
  const std::string path =
      env ? env : MBLM_SOURCE_DIR "/tests/golden/runtime/python_written.safetensors";
  const Weights w = Weights::load_safetensors(path);
  expect_same(fixture_tensors(), w);
  EXPECT_EQ(w.metadata().at("format"), "mblm");
  if (w.metadata().count("params") != 0) {  // mblm-export's model params (JSON)
    EXPECT_NO_THROW(parse_model_config_text(w.metadata().at("params"), path + " params"));
  }
}

// Writes the fixture where pytest asks (MBLM_RUNTIME_WRITE) for Python's safetensors to read.
TEST(RuntimeWeightsInterop, WritesFileForPython) {
  const char* env = std::getenv("MBLM_RUNTIME_WRITE");
  const std::string path = env ? env : temp_path("cpp_written.safetensors");
  save_safetensors(path, fixture_tensors(), {{"format", "mblm"}, {"writer", "mblm_runtime"}});
  expect_same(fixture_tensors(), Weights::load_safetensors(path));
  if (!env) fs::remove(path);
}

}  // namespace
}  // namespace mblm::runtime
