// mblm-run's command line: defaults, every option, and errors naming the option.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "run_options.h"

namespace mblm::runtime {
namespace {

RunOptions parse(std::vector<std::string> args) { return parse_run_options(args); }

std::string usage_error(std::vector<std::string> args) {
  try {
    parse_run_options(args);
  } catch (const UsageError& err) {
    return err.what();
  }
  return "";
}

TEST(RunOptions, Defaults) {
  const RunOptions o = parse({"--weights", "w.safetensors", "--prompt", "abc"});
  EXPECT_EQ(o.weights_path, "w.safetensors");
  EXPECT_EQ(o.config_path, "");
  EXPECT_EQ(o.prompt, "abc");
  EXPECT_FALSE(o.prompt_file.has_value());
  EXPECT_EQ(o.num_tokens, 256);
  EXPECT_EQ(o.temperature, 1.0);
  EXPECT_EQ(o.filter_thres, 0.9);
  EXPECT_FALSE(o.seed.has_value());
  EXPECT_EQ(o.eos, -1);
  EXPECT_EQ(o.output_path, "");
  EXPECT_EQ(o.device, "cpu");
  EXPECT_EQ(o.threads, 0);
  EXPECT_EQ(o.score_path, "");
  EXPECT_FALSE(o.stats);
  EXPECT_FALSE(o.help);
}

TEST(RunOptions, EveryOption) {
  const RunOptions o = parse({"--config=c.yaml",
                              "--weights",
                              "w",
                              "--prompt-file",
                              "p.txt",
                              "--num-tokens",
                              "10",
                              "--temperature",
                              "0.5",
                              "--filter-thres=1",
                              "--seed",
                              "42",
                              "--eos",
                              "10",
                              "--output",
                              "out.bin",
                              "--device",
                              "cuda:1",
                              "--threads",
                              "3",
                              "--stats"});
  EXPECT_EQ(o.config_path, "c.yaml");
  EXPECT_EQ(o.prompt_file, "p.txt");
  EXPECT_EQ(o.num_tokens, 10);
  EXPECT_EQ(o.temperature, 0.5);
  EXPECT_EQ(o.filter_thres, 1.0);
  EXPECT_EQ(o.seed, 42u);
  EXPECT_EQ(o.eos, 10);
  EXPECT_EQ(o.output_path, "out.bin");
  EXPECT_EQ(o.device, "cuda:1");
  EXPECT_EQ(o.threads, 3);
  EXPECT_TRUE(o.stats);
  EXPECT_EQ(parse({"--weights", "w", "--score", "f.txt"}).score_path, "f.txt");
  EXPECT_EQ(parse({"--weights", "w", "--prompt", ""}).prompt, "");
}

TEST(RunOptions, Help) {
  EXPECT_TRUE(parse({"--help"}).help);
  EXPECT_TRUE(parse({"--weights", "w", "-h"}).help);
  EXPECT_NE(run_usage().find("--prompt-file FILE"), std::string::npos);
}

TEST(RunOptions, ErrorsNameTheOption) {
  EXPECT_EQ(usage_error({"--prompt", "x"}), "--weights is required");
  EXPECT_EQ(usage_error({"--weights", "w"}),
            "give a prompt (--prompt or --prompt-file) or --score FILE");
  EXPECT_EQ(usage_error({"--weights", "w", "--prompt", "x", "--score", "f"}),
            "--prompt, --prompt-file and --score exclude each other");
  EXPECT_EQ(usage_error({"--weights", "w", "--prompt", "x", "--frobnicate"}),
            "unknown option --frobnicate");
  EXPECT_EQ(usage_error({"--weights", "w", "--prompt", "x", "extra"}),
            "unexpected argument 'extra'");
  EXPECT_EQ(usage_error({"--weights", "w", "--prompt"}), "--prompt expects a value");
  EXPECT_EQ(usage_error({"--weights", "w", "--weights", "v", "--prompt", "x"}),
            "--weights given more than once");
  EXPECT_EQ(usage_error({"--weights", "w", "--prompt", "x", "--num-tokens", "ten"}),
            "--num-tokens expects an integer, got 'ten'");
  EXPECT_EQ(usage_error({"--weights", "w", "--prompt", "x", "--num-tokens", "0"}),
            "--num-tokens must be positive, got 0");
  EXPECT_EQ(usage_error({"--weights", "w", "--prompt", "x", "--temperature", "0"}),
            "--temperature must be positive, got 0.000000");
  EXPECT_EQ(usage_error({"--weights", "w", "--prompt", "x", "--temperature", "nan"}),
            "--temperature expects a finite number, got 'nan'");
  EXPECT_EQ(usage_error({"--weights", "w", "--prompt", "x", "--filter-thres", "1.5"}),
            "--filter-thres must lie in [0, 1], got 1.500000");
  EXPECT_EQ(usage_error({"--weights", "w", "--prompt", "x", "--seed", "-1"}),
            "--seed must be non-negative, got -1");
  EXPECT_EQ(usage_error({"--weights", "w", "--prompt", "x", "--eos", "-2"}),
            "--eos must be a byte id (or -1), got -2");
  EXPECT_EQ(usage_error({"--weights", "w", "--prompt", "x", "--threads", "0"}),
            "--threads must be positive, got 0");
  EXPECT_EQ(usage_error({"--weights", "w", "--prompt", "x", "--device", "gpu"}),
            "--device must be cpu, cuda or cuda:N, got 'gpu'");
  EXPECT_EQ(usage_error({"--weights", "w", "--prompt", "x", "--device", "cuda:"}),
            "--device must be cpu, cuda or cuda:N, got 'cuda:'");
}

}  // namespace
}  // namespace mblm::runtime
