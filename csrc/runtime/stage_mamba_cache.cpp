// The per-row (conv, SSM) states of a Mamba stage during cached decoding.
#include <ATen/TensorIndexing.h>
#include <ATen/TensorOperators.h>

#include <utility>
#include <vector>

#include "stage_mamba.h"

namespace mblm::runtime {

namespace {

class MambaCache final : public StageCache {
 public:
  MambaCache(const MambaStack& stack, int64_t batch)
      : stack_(stack), state_(stack.zero_state(batch)) {}

  at::Tensor extend(const at::Tensor& x, const Rows& rows) override {
    if (!rows.has_value()) return stack_.run(x, &state_);
    std::vector<LayerState> selected;
    selected.reserve(state_.size());
    for (const auto& s : state_) {
      selected.push_back({s.conv.index_select(0, *rows), s.ssm.index_select(0, *rows)});
    }
    auto y = stack_.run(x, &selected);
    for (size_t l = 0; l < state_.size(); ++l) {
      state_[l].conv.index_copy_(0, *rows, selected[l].conv.to(state_[l].conv.scalar_type()));
      state_[l].ssm.index_copy_(0, *rows, selected[l].ssm.to(state_[l].ssm.scalar_type()));
    }
    return y;
  }

  void load_start(const Rows& rows, const StageCache& start) override {
    const auto& from = dynamic_cast<const MambaCache&>(start);
    for (size_t l = 0; l < state_.size(); ++l) {
      for (auto [dst, src] : {std::pair{&state_[l].conv, &from.state_[l].conv},
                              std::pair{&state_[l].ssm, &from.state_[l].ssm}}) {
        if (rows.has_value()) {
          dst->index_put_({*rows}, src->to(dst->scalar_type()));
        } else {
          dst->copy_(src->expand_as(*dst));
        }
      }
    }
  }

 private:
  const MambaStack& stack_;
  std::vector<LayerState> state_;
};

}  // namespace

std::unique_ptr<StageCache> MambaStack::make_cache(int64_t batch, int64_t /*capacity*/) const {
  return std::make_unique<MambaCache>(*this, batch);
}

}  // namespace mblm::runtime
