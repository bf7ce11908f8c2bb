// The Mamba2 stage (mamba_ssm's tree, mblm/model/mamba2.py): x_{l+1} = x_l +
// mixer_l(rmsnorm_l(x_l)), out = rmsnorm_f(x_L). The mixer: in_proj -> [z, xBC, dt]; causal
// depthwise conv + SiLU on xBC; the SSD scan over heads (dt_bias and the softplus inside, D skip);
// the gated RMSNorm rmsnorm(y * silu(z)); out_proj. One group (ngroups = 1), D per head, as the
// Python stage builds.
#include <ATen/TensorOperators.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/zeros.h>

#include <string>
#include <tuple>
#include <vector>

#include "mblm/conv.h"
#include "mblm/ssd.h"
#include "stage_mamba.h"

namespace mblm::runtime {

namespace {

constexpr double kNormEps = 1e-5;
constexpr int64_t kGroups = 1;

struct Mamba2Layer {
  at::Tensor norm;            // (D,)
  at::Tensor in_proj;         // (2 * Di + 2 * G * N + H, D)
  at::Tensor conv_w, conv_b;  // (Di + 2 * G * N, K), (Di + 2 * G * N,)
  at::Tensor dt_bias;         // (H,) float32
  at::Tensor A;               // (H,) float32: -exp(A_log)
  at::Tensor D;               // (H,) float32
  at::Tensor gate_norm;       // (Di,)
  at::Tensor out_proj;        // (D, Di)
};

// mamba_ssm's RMSNorm in float32 (float64 for float64 x), cast back to x's dtype.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight) {
  const auto cdt = mamba_state_dtype(x.scalar_type());
  const auto xc = x.to(cdt);
  return (xc * at::rsqrt(xc.square().mean(-1, /*keepdim=*/true) + kNormEps) * weight.to(cdt))
      .to(x.scalar_type());
}

class Mamba2Stage final : public MambaStack {
 public:
  Mamba2Stage(const MambaBlockConfig& block, int64_t dim, int64_t num_layers,
              const Weights& weights, const std::string& prefix)
      : inner_(block.expand * dim),
        heads_(inner_ / block.headdim),
        headdim_(block.headdim),
        d_state_(block.d_state),
        d_conv_(block.d_conv),
        conv_dim_(inner_ + 2 * kGroups * block.d_state) {
    for (int64_t l = 0; l < num_layers; ++l) {
      const std::string p = prefix + "layers." + std::to_string(l) + ".";
      const std::string m = p + "mixer.";
      Mamba2Layer layer;
      layer.norm = weights.get(p + "norm.weight", {dim});
      layer.dt_bias = weights.get(m + "dt_bias", {heads_}).to(at::kFloat);
      layer.A = -at::exp(weights.get(m + "A_log", {heads_}).to(at::kFloat));
      layer.D = weights.get(m + "D", {heads_}).to(at::kFloat);
      layer.in_proj = weights.get(m + "in_proj.weight", {inner_ + conv_dim_ + heads_, dim});
      layer.conv_w = weights.get(m + "conv1d.weight", {conv_dim_, 1, d_conv_}).select(1, 0);
      layer.conv_b = weights.get(m + "conv1d.bias", {conv_dim_});
      layer.gate_norm = weights.get(m + "norm.weight", {inner_});
      layer.out_proj = weights.get(m + "out_proj.weight", {dim, inner_});
      layers_.push_back(std::move(layer));
    }
    norm_f_ = weights.get(prefix + "norm_f.weight", {dim});
    options_ = norm_f_.options();
  }

  at::Tensor run(const at::Tensor& x, std::vector<LayerState>* state) const override {
    const bool step = state != nullptr && x.size(1) == 1;
    // mamba_ssm's residual stream: residual_l = hidden_{l-1} + residual_{l-1}, hidden_l =
    // mixer_l(norm_l(residual_l)); out = norm_f(hidden_L + residual_L).
    at::Tensor hidden = x, residual;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const auto& layer = layers_[l];
      residual = residual.defined() ? hidden + residual : hidden;
      const auto normed = rms_norm(residual, layer.norm);
      hidden = step ? mixer_step(layer, normed, (*state)[l])
                    : mixer(layer, normed, state != nullptr ? &(*state)[l] : nullptr);
    }
    residual = residual.defined() ? hidden + residual : hidden;
    return rms_norm(residual, norm_f_).to(hidden.scalar_type());
  }

  std::vector<LayerState> zero_state(int64_t batch) const override {
    std::vector<LayerState> state;
    for (size_t l = 0; l < layers_.size(); ++l) {
      state.push_back(
          {at::zeros({batch, conv_dim_, d_conv_ - 1}, options_),
           at::zeros({batch, heads_, headdim_, d_state_},
                     options_.dtype(mamba_state_dtype(options_.dtype().toScalarType())))});
    }
    return state;
  }

 private:
  // rmsnorm(y * silu(z)) over all Di channels (one group), in float32, cast back.
  static at::Tensor gated_norm(const at::Tensor& y, const at::Tensor& z, const at::Tensor& weight) {
    const auto cdt = mamba_state_dtype(y.scalar_type());
    const auto gated = y.to(cdt) * at::silu(z.to(cdt));
    const auto grouped = gated.unflatten(-1, {-1, gated.size(-1) / kGroups});
    const auto normed = grouped * at::rsqrt(grouped.square().mean(-1, /*keepdim=*/true) + kNormEps);
    return (normed.flatten(-2) * weight.to(cdt)).to(y.scalar_type());
  }

  // u (B, L, D) from `state` (nullptr: zeros, not kept).
  at::Tensor mixer(const Mamba2Layer& layer, const at::Tensor& u, LayerState* state) const {
    const int64_t batch = u.size(0), length = u.size(1), gn = kGroups * d_state_;
    const auto proj = at::linear(u, layer.in_proj);
    const auto z = proj.narrow(-1, 0, inner_);
    const auto xbc = proj.narrow(-1, inner_, conv_dim_);
    const auto dt = proj.narrow(-1, inner_ + conv_dim_, heads_);
    std::optional<at::Tensor> conv0, ssm0;
    if (state != nullptr) {
      conv0 = state->conv;
      ssm0 = state->ssm;
    }
    auto [conv_out, conv_state] =
        mblm::conv1d_fwd(xbc.transpose(1, 2), layer.conv_w, layer.conv_b, conv0, true);
    const auto xbc_rows = conv_out.transpose(1, 2);
    auto [y, ssm_state, checkpoints] = mblm::ssd_fwd(
        xbc_rows.narrow(-1, 0, inner_).reshape({batch, length, heads_, headdim_}), dt, layer.A,
        xbc_rows.narrow(-1, inner_, gn).reshape({batch, length, kGroups, d_state_}),
        xbc_rows.narrow(-1, inner_ + gn, gn).reshape({batch, length, kGroups, d_state_}), layer.D,
        layer.dt_bias, /*dt_softplus=*/true, ssm0);
    if (state != nullptr) *state = {conv_state, ssm_state};
    const auto gated = gated_norm(y.reshape({batch, length, inner_}), z, layer.gate_norm);
    return at::linear(gated, layer.out_proj);
  }

  // One position u (B, 1, D): advances `state` in place.
  at::Tensor mixer_step(const Mamba2Layer& layer, const at::Tensor& u, LayerState& state) const {
    const int64_t batch = u.size(0), gn = kGroups * d_state_;
    const auto proj = at::linear(u.select(1, 0), layer.in_proj);
    const auto xbc = mblm::conv1d_update(proj.narrow(-1, inner_, conv_dim_), state.conv,
                                         layer.conv_w, layer.conv_b, true);
    const auto y =
        mblm::ssd_update(state.ssm, xbc.narrow(-1, 0, inner_).reshape({batch, heads_, headdim_}),
                         proj.narrow(-1, inner_ + conv_dim_, heads_), layer.A,
                         xbc.narrow(-1, inner_, gn).reshape({batch, kGroups, d_state_}),
                         xbc.narrow(-1, inner_ + gn, gn).reshape({batch, kGroups, d_state_}),
                         layer.D, layer.dt_bias, /*dt_softplus=*/true);
    const auto gated = gated_norm(y.reshape({batch, 1, inner_}),
                                  proj.narrow(-1, 0, inner_).unsqueeze(1), layer.gate_norm);
    return at::linear(gated, layer.out_proj);
  }

  int64_t inner_, heads_, headdim_, d_state_, d_conv_, conv_dim_;
  at::TensorOptions options_;
  std::vector<Mamba2Layer> layers_;
  at::Tensor norm_f_;  // (D,)
};

}  // namespace

std::unique_ptr<Stage> make_mamba2_stage(const MambaBlockConfig& block, int64_t dim,
                                         int64_t num_layers, const Weights& weights,
                                         const std::string& prefix) {
  return std::make_unique<Mamba2Stage>(block, dim, num_layers, weights, prefix);
}

}  // namespace mblm::runtime
