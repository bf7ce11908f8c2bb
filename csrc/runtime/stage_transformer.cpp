// The Transformer stage (MEGABYTE layer tree of mblm/model/transformer.py) and its key/value cache
// (TransformerCache of mblm/model/cache.py), on the same kernels (RMSNorm, attention, decode).
//
// Per layer: x = attn(norm(shift(x))) + x; x = ff(norm(shift(x))) + x; then RMSNorm (the causal
// TransformerDecoder; the bidirectional encoder stage belongs to MBLMEncoder, not run here).
// The norm is MEGABYTE's (x / max(||x|| / sqrt(D), 1e-8) * g), attention has one K and V per head
// and a half-split rotary embedding, the feed-forward is Linear -> GELU -> Linear.
#include <ATen/TensorIndexing.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cos.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/outer.h>
#include <ATen/ops/sin.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "kernels.h"
#include "stage.h"

namespace mblm::runtime {

namespace {

constexpr double kNormEps = 1e-8;

struct Layer {
  at::Tensor attn_norm;             // (D,)
  at::Tensor to_q;                  // (H * Dh, D)
  at::Tensor to_kv;                 // (2 * H * Dh, D)
  at::Tensor w_qkv;                 // [to_q; to_kv]: one matmul per decode step
  at::Tensor to_out;                // (D, H * Dh)
  at::Tensor ff_norm;               // (D,)
  at::Tensor ff_up_w, ff_up_b;      // (D * mult, D), (D * mult,)
  at::Tensor ff_down_w, ff_down_b;  // (D, D * mult), (D,)
};

// RMSNorm without token shift (the decode path shifts with the cached previous input itself).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& g, double scale) {
  return kernels::rms_norm(x, g, scale, kNormEps, /*shift=*/false);
}

at::Tensor take_rows(const at::Tensor& t, const Rows& rows) {
  return rows.has_value() ? t.index_select(0, *rows) : t;
}

void put_rows(at::Tensor& dst, const Rows& rows, const at::Tensor& src) {
  if (rows.has_value()) {
    dst.index_put_({*rows}, src);
  } else {
    dst.copy_(src);
  }
}

class TransformerStage;

class TransformerCache final : public StageCache {
 public:
  TransformerCache(const TransformerStage& stage, int64_t batch, int64_t capacity);
  at::Tensor extend(const at::Tensor& x, const Rows& rows) override;
  void load_start(const Rows& rows, const StageCache& start) override;

 private:
  // token_shift(x) (R, S, D) continuing sequences whose previous input is `prev` (rows); stores
  // x's last position into `prev`.
  at::Tensor shifted(const at::Tensor& x, at::Tensor& prev, const Rows& rows) const;
  int64_t held_positions() const;

  const TransformerStage& stage_;
  std::vector<at::Tensor> k_, v_;                  // (B, C, H, Dh) per layer
  std::vector<at::Tensor> shift_attn_, shift_ff_;  // (B, D): the last input of every row
  at::Tensor lens_;                                // (B,) int64: cached positions per row
  std::optional<int64_t> uniform_len_ = 0;         // lens_ while every row holds the same
  at::Tensor cos_, sin_;                           // (C, Dh) rotary tables, or undefined
};

class TransformerStage final : public Stage {
 public:
  TransformerStage(const TransformerBlockConfig& block, int64_t dim, int64_t num_layers,
                   const Weights& weights, const std::string& prefix)
      : dim_(dim),
        heads_(block.attn_num_heads),
        head_dim_(block.attn_head_dims),
        norm_scale_(std::pow(static_cast<double>(dim), -0.5)),
        attn_scale_(std::pow(static_cast<double>(block.attn_head_dims), -0.5)) {
    const int64_t inner = heads_ * head_dim_;
    const int64_t hidden = dim * block.ff_multiplier;
    if (block.attn_use_rot_embs) {
      inv_freq_ = weights.get(prefix + "rotary_emb.inv_freq", {(head_dim_ + 1) / 2});
    }
    for (int64_t l = 0; l < num_layers; ++l) {
      const std::string p = prefix + "layers." + std::to_string(l) + ".";
      Layer layer;
      layer.attn_norm = weights.get(p + "0.norm.g", {dim});
      layer.to_q = weights.get(p + "0.to_q.weight", {inner, dim});
      layer.to_kv = weights.get(p + "0.to_kv.weight", {2 * inner, dim});
      layer.to_out = weights.get(p + "0.to_out.weight", {dim, inner});
      layer.ff_norm = weights.get(p + "1.0.g", {dim});
      layer.ff_up_w = weights.get(p + "1.1.weight", {hidden, dim});
      layer.ff_up_b = weights.get(p + "1.1.bias", {hidden});
      layer.ff_down_w = weights.get(p + "1.4.weight", {dim, hidden});
      layer.ff_down_b = weights.get(p + "1.4.bias", {dim});
      layer.w_qkv = at::cat({layer.to_q, layer.to_kv}, 0);
      layers_.push_back(std::move(layer));
    }
    norm_ = weights.get(prefix + "norm.g", {dim});
  }

  at::Tensor forward(const at::Tensor& input) const override {
    auto x = input;
    std::optional<at::Tensor> cos, sin;
    if (inv_freq_.defined()) {
      auto [c, s] = rotary_tables(x.size(-2));
      cos = std::move(c);
      sin = std::move(s);
    }
    for (const auto& layer : layers_) {
      const auto normed = kernels::rms_norm(x, layer.attn_norm, norm_scale_, kNormEps, true);
      const auto q = at::linear(normed, layer.to_q).unflatten(-1, {heads_, -1});
      const auto kv = at::linear(normed, layer.to_kv).unflatten(-1, {2, heads_, -1});
      const auto out = kernels::attention_kv(q, kv, cos, sin, /*causal=*/true, attn_scale_);
      x = at::linear(out.flatten(-2), layer.to_out) + x;
      const auto h = at::linear(kernels::rms_norm(x, layer.ff_norm, norm_scale_, kNormEps, true),
                                layer.ff_up_w, layer.ff_up_b);
      x = at::linear(at::gelu(h), layer.ff_down_w, layer.ff_down_b) + x;
    }
    return kernels::rms_norm(x, norm_, norm_scale_, kNormEps, false);
  }

  bool skips_unused_last_input() const override { return true; }

  std::unique_ptr<StageCache> make_cache(int64_t batch, int64_t capacity) const override {
    return std::make_unique<TransformerCache>(*this, batch, capacity);
  }

  friend class TransformerCache;

 private:
  // cos/sin (S, Dh) of positions 0..S-1 as RotaryEmbedding.cos_sin computes them: angles
  // p * inv_freq in float32 (float64 for a float64 model), duplicated over both halves.
  std::pair<at::Tensor, at::Tensor> rotary_tables(int64_t length) const {
    const auto dtype =
        layers_.empty() || layers_[0].to_q.scalar_type() != at::kDouble ? at::kFloat : at::kDouble;
    const auto positions = at::arange(length, inv_freq_.options().dtype(dtype));
    const auto freqs = at::outer(positions, inv_freq_.to(dtype));
    const auto angles = at::cat({freqs, freqs}, -1);
    return {angles.cos(), angles.sin()};
  }

  int64_t dim_, heads_, head_dim_;
  double norm_scale_, attn_scale_;
  at::Tensor inv_freq_;  // (ceil(Dh / 2),) or undefined without rotary embedding
  std::vector<Layer> layers_;
  at::Tensor norm_;  // (D,)
};

TransformerCache::TransformerCache(const TransformerStage& stage, int64_t batch, int64_t capacity)
    : stage_(stage) {
  const auto& any = stage.norm_;
  const auto opts = any.options();
  for (size_t l = 0; l < stage.layers_.size(); ++l) {
    k_.push_back(at::zeros({batch, capacity, stage.heads_, stage.head_dim_}, opts));
    v_.push_back(at::zeros({batch, capacity, stage.heads_, stage.head_dim_}, opts));
    shift_attn_.push_back(at::zeros({batch, stage.dim_}, opts));
    shift_ff_.push_back(at::zeros({batch, stage.dim_}, opts));
  }
  lens_ = at::zeros({batch}, opts.dtype(at::kLong));
  if (stage.inv_freq_.defined()) {
    std::tie(cos_, sin_) = stage.rotary_tables(capacity);
  }
}

at::Tensor TransformerCache::shifted(const at::Tensor& x, at::Tensor& prev,
                                     const Rows& rows) const {
  const int64_t keep = (stage_.dim_ + 1) / 2;  // token_shift moves the last floor(D / 2) features
  const int64_t moved = stage_.dim_ - keep, length = x.size(1);
  auto before = take_rows(prev, rows).narrow(-1, keep, moved).unsqueeze(1);
  if (length > 1) before = at::cat({before, x.narrow(1, 0, length - 1).narrow(-1, keep, moved)}, 1);
  auto out = at::cat({x.narrow(-1, 0, keep), before}, -1);  // before prev changes
  put_rows(prev, rows, x.select(1, length - 1));
  return out;
}

at::Tensor TransformerCache::extend(const at::Tensor& input, const Rows& rows) {
  const int64_t length = input.size(1);
  const auto lens = take_rows(lens_, rows);
  std::optional<at::Tensor> cos, sin;
  if (cos_.defined()) {
    auto positions = lens.unsqueeze(1);
    if (length > 1) positions = positions + at::arange(length, lens.options());
    cos = cos_.index({positions});
    sin = sin_.index({positions});
  }
  const int64_t inner = stage_.heads_ * stage_.head_dim_;
  const int64_t heads = stage_.heads_;
  auto x = input;
  for (size_t i = 0; i < stage_.layers_.size(); ++i) {
    const auto& layer = stage_.layers_[i];
    const auto normed =
        rms_norm(shifted(x, shift_attn_[i], rows), layer.attn_norm, stage_.norm_scale_);
    const auto qkv = at::linear(normed, layer.w_qkv);
    const auto out =
        kernels::attn_decode(qkv.narrow(-1, 0, inner).unflatten(-1, {heads, -1}),
                             qkv.narrow(-1, inner, inner).unflatten(-1, {heads, -1}),
                             qkv.narrow(-1, 2 * inner, inner).unflatten(-1, {heads, -1}), k_[i],
                             v_[i], lens, rows, cos, sin, stage_.attn_scale_);
    x = at::linear(out.flatten(-2), layer.to_out) + x;
    const auto normed_ff =
        rms_norm(shifted(x, shift_ff_[i], rows), layer.ff_norm, stage_.norm_scale_);
    const auto hidden = at::gelu(at::linear(normed_ff, layer.ff_up_w, layer.ff_up_b));
    x = at::linear(hidden, layer.ff_down_w, layer.ff_down_b) + x;
  }
  if (rows.has_value()) {
    lens_.index_put_({*rows}, lens + length);
    uniform_len_.reset();
  } else {
    lens_ += length;
    if (uniform_len_.has_value()) *uniform_len_ += length;
  }
  return rms_norm(x, stage_.norm_, stage_.norm_scale_);
}

int64_t TransformerCache::held_positions() const {
  return uniform_len_.has_value() ? *uniform_len_ : lens_[0].item<int64_t>();
}

void TransformerCache::load_start(const Rows& rows, const StageCache& start) {
  using at::indexing::Slice;
  const auto& from = dynamic_cast<const TransformerCache&>(start);
  const int64_t n = from.held_positions();
  for (size_t i = 0; i < k_.size(); ++i) {
    for (auto [dst, src] : {std::pair{&k_[i], &from.k_[i]}, std::pair{&v_[i], &from.v_[i]}}) {
      if (rows.has_value()) {
        dst->index_put_({*rows, Slice(0, n)}, src->index({0, Slice(0, n)}));
      } else {
        dst->index({Slice(), Slice(0, n)}).copy_(src->index({Slice(), Slice(0, n)}));
      }
    }
    for (auto [dst, src] : {std::pair{&shift_attn_[i], &from.shift_attn_[i]},
                            std::pair{&shift_ff_[i], &from.shift_ff_[i]}}) {
      if (rows.has_value()) {
        dst->index_put_({*rows}, *src);
      } else {
        dst->copy_(src->expand_as(*dst));
      }
    }
  }
  if (rows.has_value()) {
    lens_.index_put_({*rows}, n);
    uniform_len_.reset();
  } else {
    lens_.fill_(n);
    uniform_len_ = n;
  }
}

}  // namespace

std::unique_ptr<Stage> make_transformer_stage(const TransformerBlockConfig& block, int64_t dim,
                                              int64_t num_layers, const Weights& weights,
                                              const std::string& prefix) {
  return std::make_unique<TransformerStage>(block, dim, num_layers, weights, prefix);
}

}  // namespace mblm::runtime
