#include "generate.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/tensor.h>

#include <algorithm>
#include <mutex>

#include "decoder.h"
#include "sampling.h"

namespace mblm::runtime {

namespace {

// While alive on a CPU model, ATen ops skip oneDNN, as mblm/model/decoding.py's decoding does:
// decoding runs many ops on tiny tensors, where oneDNN's per-call thread synchronisation costs
// more than ATen's own kernels (GELU: 15-30% of a decoding step). The setting is process-wide:
// concurrent scopes share one count and the last one out restores it.
class CpuSmallOpScope {
 public:
  explicit CpuSmallOpScope(bool cpu) : active_(cpu) {
    if (!active_) return;
    const std::lock_guard<std::mutex> lock(mutex_);
    if (count_++ == 0) {
      saved_ = at::globalContext().userEnabledMkldnn();
      at::globalContext().setUserEnabledMkldnn(false);
    }
  }
  ~CpuSmallOpScope() {
    if (!active_) return;
    const std::lock_guard<std::mutex> lock(mutex_);
    if (--count_ == 0) at::globalContext().setUserEnabledMkldnn(saved_);
  }
  CpuSmallOpScope(const CpuSmallOpScope&) = delete;
  CpuSmallOpScope& operator=(const CpuSmallOpScope&) = delete;

 private:
  bool active_;
  static inline std::mutex mutex_;
  static inline int count_ = 0;
  static inline bool saved_ = true;
};

}  // namespace

std::vector<at::Tensor> generate_cached(const Hierarchy& model,
                                        const std::vector<at::Tensor>& prompts,
                                        const std::vector<int64_t>& steps,
                                        const SamplingOptions& sampling,
                                        const std::function<void(int64_t, int64_t)>& on_byte) {
  std::vector<std::vector<int64_t>> generated(prompts.size());
  std::vector<int64_t> active;  // prompts with bytes to generate; decoder row i is active[i]
  int64_t max_len = 0;
  for (size_t r = 0; r < prompts.size(); ++r) {
    if (steps[r] <= 0) continue;
    active.push_back(static_cast<int64_t>(r));
    max_len = std::max(max_len, prompts[r].numel() + steps[r]);
  }
  if (!active.empty()) {
    const auto long_opts = model.options().dtype(at::kLong);
    const CpuSmallOpScope small_ops(model.options().device().is_cpu());
    auto generator = sampling.generator ? *sampling.generator
                                        : at::make_generator<at::CPUGeneratorImpl>(sampling.seed);
    HierarchicalDecoder decoder(model, static_cast<int64_t>(active.size()), max_len);
    std::vector<int64_t> rows(active.size());
    std::vector<at::Tensor> active_prompts;
    for (size_t i = 0; i < active.size(); ++i) {
      rows[i] = static_cast<int64_t>(i);
      active_prompts.push_back(prompts[active[i]]);
    }
    auto logits = decoder.prefill(active_prompts, rows);
    while (!rows.empty()) {
      auto sampled = sample_next(logits, sampling.filter_thres, sampling.temperature, generator);
      const auto values = sampled.to(at::kCPU);
      const auto* value = values.const_data_ptr<int64_t>();
      std::vector<int64_t> keep;
      for (size_t i = 0; i < rows.size(); ++i) {
        const int64_t r = active[rows[i]];
        generated[r].push_back(value[i]);
        if (on_byte) on_byte(r, value[i]);
        if (static_cast<int64_t>(generated[r].size()) < steps[r] &&
            value[i] != sampling.end_of_gen_token_id) {
          keep.push_back(static_cast<int64_t>(i));
        }
      }
      if (keep.empty()) break;
      if (keep.size() < rows.size()) {
        sampled = sampled.index_select(0, at::tensor(keep, long_opts));
        std::vector<int64_t> kept_rows;
        for (const int64_t i : keep) kept_rows.push_back(rows[i]);
        rows = std::move(kept_rows);
      }
      logits = decoder.step(sampled, rows);
    }
  }
  std::vector<at::Tensor> out;
  for (size_t r = 0; r < prompts.size(); ++r) {
    const auto tail = at::tensor(generated[r], prompts[r].options());
    out.push_back(at::cat({prompts[r], tail}));
  }
  return out;
}

}  // namespace mblm::runtime
