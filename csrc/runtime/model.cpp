// Model: input checks (with the Python package's messages), inference mode, and the three entry
// points on top of Hierarchy (forward pass) and generate_cached (cached decoding).
#include "model.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/isnan.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/InferenceMode.h>

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "generate.h"
#include "hierarchy.h"
#include "kernels.h"
#include "mblm/patch.h"
#include "sampling.h"

namespace mblm::runtime {

namespace {

std::string shape_text(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

bool is_integer(at::ScalarType t) { return at::isIntegralType(t, /*includeBool=*/false); }

// Throws when ids (any shape) hold values outside [0, vocab); `what` names them.
void check_id_range(const at::Tensor& ids, int64_t vocab, const std::string& what) {
  if (ids.numel() == 0) return;
  const auto [lo_t, hi_t] = at::aminmax(ids);
  const int64_t lo = lo_t.item<int64_t>(), hi = hi_t.item<int64_t>();
  if (lo < 0 || hi >= vocab) {
    throw std::invalid_argument(what + " must lie in [0, num_tokens) = [0, " +
                                std::to_string(vocab) + "), got values in [" + std::to_string(lo) +
                                ", " + std::to_string(hi) + "]");
  }
}

void check_unused(const Weights& weights) {
  const auto unused = weights.unused();
  if (unused.empty()) return;
  std::string names;
  for (size_t i = 0; i < unused.size() && i < 10; ++i) names += (i ? ", '" : "'") + unused[i] + "'";
  if (unused.size() > 10) names += ", ... (" + std::to_string(unused.size()) + " in all)";
  throw std::invalid_argument(
      "unexpected tensors that the model config has no place for: " + names +
      " (a checkpoint of another model, or a config that does not match it)");
}

}  // namespace

struct Model::Impl {
  Impl(ModelConfig config, const Weights& weights) : model(config, weights) {}

  // (B, L) ids on the model's device as int64, checked like MBLM.forward.
  at::Tensor checked_ids(const at::Tensor& input_ids) const {
    if (!input_ids.defined()) throw std::invalid_argument("input_ids is an undefined tensor");
    if (!is_integer(input_ids.scalar_type())) {
      std::ostringstream msg;
      msg << "input_ids must be an integer tensor (torch.long) of byte/token ids, got dtype "
          << input_ids.scalar_type();
      throw std::invalid_argument(msg.str());
    }
    if (input_ids.dim() != 2) {
      throw std::invalid_argument("input_ids must have 2 dims (B, L), got shape " +
                                  shape_text(input_ids.sizes()));
    }
    if (input_ids.size(0) == 0 || input_ids.size(1) == 0) {
      throw std::invalid_argument(
          "input_ids must hold at least one byte per row (B, L) with B, "
          "L > 0, got shape " +
          shape_text(input_ids.sizes()));
    }
    check_id_range(input_ids, model.config().num_tokens, "input_ids");
    return input_ids.to(model.options().device(), at::kLong);
  }

  // (B, L) -> (B, P0', P_1, ..., P_{n-1}) right-padded with pad_token_id.
  at::Tensor nest(const at::Tensor& ids) const {
    const auto& seq_lens = model.config().seq_lens;
    const std::vector<int64_t> inner(seq_lens.begin() + 1, seq_lens.end());
    auto nested = mblm::patch_pad(ids, inner, model.config().pad_token_id);
    const int64_t patches = nested.size(1);
    if (model.fixed_global_positions() && patches > seq_lens[0]) {
      throw std::invalid_argument(
          "Because you are using a fixed global patch embedding, the input sequence length (" +
          std::to_string(patches) + ") must be less than the first tuple element of seq_lens (" +
          std::to_string(seq_lens[0]) + ")");
    }
    return nested;
  }

  // The local stage's outputs as (B, P0' * ... * P_{n-2}, 1 + P_{n-1}, D) patches.
  at::Tensor local_patches(const at::Tensor& nested) const {
    const auto y = model.run_stages(nested);
    return y.view({nested.size(0), -1, y.size(-2), y.size(-1)});
  }

  Hierarchy model;
};

Model::Model(ModelConfig config, const Weights& weights) {
  c10::InferenceMode guard;
  impl_ = std::make_unique<Impl>(std::move(config), weights);
  check_unused(weights);
}

Model::~Model() = default;
Model::Model(Model&&) noexcept = default;

const ModelConfig& Model::config() const { return impl_->model.config(); }

at::Tensor Model::logits(const at::Tensor& input_ids) const {
  c10::InferenceMode guard;
  const auto ids = impl_->checked_ids(input_ids);
  const auto patches = impl_->local_patches(impl_->nest(ids));
  return impl_->model.to_logits(mblm::patch_unpatch_fwd(patches, ids.size(1), false));
}

at::Tensor Model::loss(const at::Tensor& input_ids) const {
  c10::InferenceMode guard;
  const auto ids = impl_->checked_ids(input_ids);
  const auto nested = impl_->nest(ids);
  const int64_t batch = ids.size(0), length = ids.size(1);
  // preds[:, t] predicts byte t: the first start position's output, then the output after every
  // byte; pad targets count 0 and leave the mean (the original's reduction over non-zero terms)
  const auto preds =
      impl_->model.to_logits(mblm::patch_unpatch_fwd(impl_->local_patches(nested), length, true));
  const auto targets = nested.reshape({batch, -1}).narrow(1, 0, length);
  const auto ce = kernels::cross_entropy(preds.reshape({batch * length, -1}), targets.reshape({-1}),
                                         config().pad_token_id)
                      .view({batch, length});
  const auto loss = ce.sum() / (ce != 0).sum();
  return at::isnan(loss).item<bool>() ? at::zeros_like(loss) : loss;
}

std::vector<at::Tensor> Model::generate(
    const std::vector<at::Tensor>& prompts, int64_t num_tokens_to_generate,
    const SamplingOptions& sampling, const std::function<void(int64_t, int64_t)>& on_byte) const {
  if (num_tokens_to_generate < 0) {
    throw std::invalid_argument(
        "num_tokens_to_generate must be >= 0 (0 fills the context, prod(seq_lens) bytes), got " +
        std::to_string(num_tokens_to_generate));
  }
  const int64_t context = config().context_length();
  std::vector<int64_t> steps;
  for (const auto& p : prompts) {
    // a bad prompt has no length to fill the context from: the checks below name it
    const int64_t length = p.defined() ? p.numel() : 0;
    steps.push_back(num_tokens_to_generate != 0 ? num_tokens_to_generate : context - length);
  }
  return generate(prompts, steps, sampling, on_byte);
}

std::vector<at::Tensor> Model::generate(
    const std::vector<at::Tensor>& prompts, const std::vector<int64_t>& steps,
    const SamplingOptions& sampling, const std::function<void(int64_t, int64_t)>& on_byte) const {
  c10::InferenceMode guard;
  const auto& cfg = config();
  if (prompts.empty()) {
    throw std::invalid_argument("prime is an empty batch: pass at least one prompt");
  }
  if (steps.size() != prompts.size()) {
    throw std::invalid_argument("steps: one count per prompt expected (" +
                                std::to_string(prompts.size()) + "), got " +
                                std::to_string(steps.size()));
  }
  if (sampling.generator && (!sampling.generator->defined() ||
                             sampling.generator->device().type() != at::kCPU)) {
    throw std::invalid_argument(
        "the sampling noise is drawn on the CPU: pass a CPU generator, got " +
        (sampling.generator->defined() ? "one on " + sampling.generator->device().str()
                                       : std::string("an undefined one")));
  }
  std::vector<at::Tensor> ids;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto& p = prompts[i];
    const std::string which = "prime[" + std::to_string(i) + "]";
    if (!p.defined() || p.dim() != 1) {
      throw std::invalid_argument(which + " must be a 1-D tensor of byte ids, got shape " +
                                  (p.defined() ? shape_text(p.sizes()) : "undefined"));
    }
    if (!is_integer(p.scalar_type())) {
      std::ostringstream msg;
      msg << "prime must hold integer byte ids, got dtype " << p.scalar_type();
      throw std::invalid_argument(msg.str());
    }
    check_id_range(p, cfg.num_tokens, which + " ids");
    ids.push_back(p.to(impl_->model.options().device(), at::kLong));
  }
  check_sampling(sampling.temperature, sampling.filter_thres, cfg.num_tokens);
  const int64_t context = cfg.context_length();
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t n = steps[i];
    // with a learned global position the context cannot grow past prod(seq_lens) bytes
    const int64_t needed = ids[i].numel() + n - 1;  // the last generated byte is never fed
    if (impl_->model.fixed_global_positions() && n > 0 && needed > context) {
      const std::string which =
          ids.size() > 1 ? "prompt " + std::to_string(i) : std::string("the prompt");
      throw std::invalid_argument(
          "Because you are using a fixed global patch embedding, the context is limited to "
          "prod(seq_lens) = " +
          std::to_string(context) + " bytes: generating " + std::to_string(n) + " bytes after " +
          which + " of " + std::to_string(ids[i].numel()) + " bytes would feed " +
          std::to_string(needed) + " bytes");
    }
  }
  return generate_cached(impl_->model, ids, steps, sampling, on_byte);
}

}  // namespace mblm::runtime
