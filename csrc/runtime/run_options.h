// Command-line options of mblm-run (csrc/runtime/cli/main.cpp), parsed and checked before any
// file is opened.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace mblm::runtime {

struct RunOptions {
  std::string config_path;  // empty: the "params" metadata of the weights file
  std::string weights_path;
  std::optional<std::string> prompt;       // --prompt TEXT (UTF-8 bytes as given)
  std::optional<std::string> prompt_file;  // --prompt-file FILE (raw bytes)
  int64_t num_tokens = 256;                // capped by the context
  double temperature = 1.0;
  double filter_thres = 0.9;
  std::optional<uint64_t> seed;  // none: a random seed
  int64_t eos = -1;              // -1: never stop early
  std::string output_path;       // empty: stream to stdout
  std::string device = "cpu";    // "cpu", "cuda" or "cuda:N"
  int64_t threads = 0;           // 0: torch's default
  std::string score_path;        // --score FILE: print the loss of FILE instead of generating
  bool stats = false;
  bool help = false;
};

class UsageError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// Parses the arguments after the program name; throws UsageError naming the option.
RunOptions parse_run_options(const std::vector<std::string>& args);

std::string run_usage();

}  // namespace mblm::runtime
