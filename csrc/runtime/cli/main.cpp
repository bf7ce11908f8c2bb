// mblm-run: generation and scoring with an MBLM model on the C++ runtime, without Python.
// Usage: mblm-run --help (csrc/runtime/run_options.cpp).
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/ops/tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <iostream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "config.h"
#include "file_io.h"
#include "model.h"
#include "run_options.h"
#include "weights.h"

namespace {

using mblm::runtime::Model;
using mblm::runtime::ModelConfig;
using mblm::runtime::RunOptions;
using mblm::runtime::Weights;
using Clock = std::chrono::steady_clock;

// Bad input (arguments, files, configs, weights): exit status 2.
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

ModelConfig model_config(const RunOptions& o, const Weights& weights) {
  if (!o.config_path.empty()) return mblm::runtime::load_model_config(o.config_path);
  const auto params = weights.metadata().find("params");
  if (params == weights.metadata().end()) {
    throw InputError("no model config: " + o.weights_path +
                     " has no \"params\" metadata (mblm-export writes it); pass --config");
  }
  return mblm::runtime::parse_model_config_text(params->second,
                                                o.weights_path + " metadata \"params\"");
}

Model load_model(const RunOptions& o, const c10::Device& device) {
  Weights weights = [&] {
    try {
      return Weights::load_safetensors(o.weights_path);
    } catch (const std::runtime_error& err) {
      throw InputError(err.what());
    }
  }();
  ModelConfig config = [&] {
    try {
      return model_config(o, weights);
    } catch (const std::invalid_argument& err) {
      throw InputError(err.what());
    }
  }();
  weights.to(at::TensorOptions().device(device));
  try {
    return Model(std::move(config), weights);
  } catch (const std::invalid_argument& err) {
    throw InputError(o.weights_path + " does not fit the model config: " + err.what());
  }
}

at::Tensor byte_tensor(const std::string& bytes, const c10::Device& device) {
  std::vector<int64_t> ids(bytes.begin(), bytes.end());
  for (int64_t& id : ids) id &= 0xFF;  // char may be signed
  return at::tensor(ids, at::TensorOptions().dtype(at::kLong)).to(device);
}

int score(const RunOptions& o, const Model& model, const c10::Device& device) {
  const std::string bytes = mblm::runtime::read_file(o.score_path, "--score file");
  if (bytes.empty()) throw InputError("--score file " + o.score_path + " is empty");
  const int64_t window = model.config().context_length();
  const auto start = Clock::now();
  double total = 0.0;  // nats, summed over bytes
  for (size_t a = 0; a < bytes.size(); a += static_cast<size_t>(window)) {
    const std::string piece = bytes.substr(a, static_cast<size_t>(window));
    const at::Tensor ids = byte_tensor(piece, device).unsqueeze(0);
    total += model.loss(ids).item<double>() * static_cast<double>(piece.size());
  }
  const double loss = total / static_cast<double>(bytes.size());
  std::printf("loss %.6f nats, %.6f bits per byte over %zu bytes\n", loss, loss / std::log(2.0),
              bytes.size());
  if (o.stats) {
    const double secs = seconds_since(start);
    std::fprintf(stderr, "mblm-run: scored %zu bytes in %.3f s (%.1f bytes/s)\n", bytes.size(),
                 secs, static_cast<double>(bytes.size()) / secs);
  }
  return 0;
}

int generate(const RunOptions& o, const Model& model, const c10::Device& device) {
  const std::string prompt =
      o.prompt ? *o.prompt : mblm::runtime::read_file(*o.prompt_file, "--prompt-file");
  const int64_t context = model.config().context_length();
  const int64_t prompt_len = static_cast<int64_t>(prompt.size());
  if (prompt_len >= context) {
    throw InputError("the prompt has " + std::to_string(prompt_len) +
                     " bytes; the model's context is " + std::to_string(context));
  }
  if (o.eos >= model.config().num_tokens) {
    throw InputError("--eos " + std::to_string(o.eos) + " is not a token id (num_tokens = " +
                     std::to_string(model.config().num_tokens) + ")");
  }
  mblm::runtime::SamplingOptions sampling;
  sampling.temperature = o.temperature;
  sampling.filter_thres = o.filter_thres;
  sampling.end_of_gen_token_id = o.eos;
  sampling.seed = o.seed ? *o.seed : std::random_device{}();

  const bool to_stdout = o.output_path.empty();
  std::string generated;
  int64_t count = 0;
  const auto on_byte = [&](int64_t /*row*/, int64_t token) {
    ++count;
    if (token > 255) return;  // no byte (the pad id, ids of vocabularies beyond bytes): dropped
    const char byte = static_cast<char>(token);  // as Python's ByteStreamer does
    if (to_stdout) {
      std::fwrite(&byte, 1, 1, stdout);
      std::fflush(stdout);
    } else {
      generated += byte;
    }
  };
  const int64_t num = std::min(o.num_tokens, context - prompt_len);
  const auto start = Clock::now();
  model.generate({byte_tensor(prompt, device)}, num, sampling, on_byte);
  const double secs = seconds_since(start);
  if (!to_stdout) mblm::runtime::write_file_atomically(o.output_path, generated);
  if (o.stats) {
    std::fprintf(stderr,
                 "mblm-run: generated %lld bytes in %.3f s (%.1f bytes/s) after a %lld-byte "
                 "prompt\n",
                 static_cast<long long>(count), secs, static_cast<double>(count) / secs,
                 static_cast<long long>(prompt_len));
  }
  return 0;
}

int run(const RunOptions& o) {
  const c10::Device device(o.device);
  // The runtime's CUDA path has not run on a GPU yet: it is opt-in until its tests pass there
  // (the Python wrappers hold back the same unproven kernels; see mblm/ops/_common.py).
  const char* opt_in = std::getenv("MBLM_CUDA_UNPROVEN");
  if (device.is_cuda() && (opt_in == nullptr || std::string(opt_in) != "1")) {
    throw InputError("--device " + o.device +
                     ": the runtime's CUDA path has not been validated on a GPU yet; set "
                     "MBLM_CUDA_UNPROVEN=1 to run it anyway");
  }
  if (device.is_cuda() && !at::hasCUDA()) {
    throw InputError("--device " + o.device + ": CUDA is not available (no GPU, or a CPU build)");
  }
  if (o.threads > 0) at::set_num_threads(static_cast<int>(o.threads));
  if (!o.score_path.empty()) {
    // Check the input file before the (slow) model load.
    if (!std::filesystem::is_regular_file(o.score_path)) {
      throw InputError("--score file " + o.score_path + " does not exist or is not a file");
    }
  }
  if (o.prompt_file && !std::filesystem::is_regular_file(*o.prompt_file)) {
    throw InputError("--prompt-file " + *o.prompt_file + " does not exist or is not a file");
  }
  const auto start = Clock::now();
  const Model model = load_model(o, device);
  if (o.stats) std::fprintf(stderr, "mblm-run: loaded the model in %.3f s\n", seconds_since(start));
  return o.score_path.empty() ? generate(o, model, device) : score(o, model, device);
}

}  // namespace

int main(int argc, char** argv) {
  RunOptions options;
  try {
    options = mblm::runtime::parse_run_options(std::vector<std::string>(argv + 1, argv + argc));
  } catch (const mblm::runtime::UsageError& err) {
    std::cerr << "mblm-run: error: " << err.what() << "\n(mblm-run --help lists the options)\n";
    return 2;
  }
  if (options.help) {
    std::cout << mblm::runtime::run_usage();
    return 0;
  }
  try {
    return run(options);
  } catch (const InputError& err) {
    std::cerr << "mblm-run: error: " << err.what() << "\n";
    return 2;
  } catch (const std::invalid_argument& err) {  // requests the model cannot serve
    std::cerr << "mblm-run: error: " << err.what() << "\n";
    return 2;
  } catch (const std::runtime_error& err) {  // unreadable files, failed writes
    std::cerr << "mblm-run: error: " << err.what() << "\n";
    return 2;
  } catch (const c10::Error& err) {
    std::cerr << "mblm-run: error: " << err.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& err) {
    std::cerr << "mblm-run: error: " << err.what() << "\n";
    return 1;
  }
}
