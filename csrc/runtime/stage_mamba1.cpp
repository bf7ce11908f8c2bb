// The Mamba1 stage (mambapy's tree, mblm/model/mamba1.py): residual layers
// x = mixer(rmsnorm(x)) + x, no final norm. The mixer: in_proj -> [x, z]; causal depthwise conv +
// SiLU on x; x_proj -> [dt, B, C]; dt_proj's matmul; selective scan (dt_proj's bias and the
// softplus inside) with D skip and SiLU(z) gating; out_proj.
#include <ATen/TensorOperators.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/zeros.h>

#include <string>
#include <tuple>
#include <vector>

#include "mblm/conv.h"
#include "mblm/scan.h"
#include "stage_mamba.h"

namespace mblm::runtime {

namespace {

constexpr double kNormEps = 1e-5;

struct Mamba1Layer {
  at::Tensor norm;            // (D,)
  at::Tensor in_proj;         // (2 * ED, D)
  at::Tensor conv_w, conv_b;  // (ED, K), (ED,)
  at::Tensor x_proj;          // (R + 2 * N, ED)
  at::Tensor dt_proj_t;       // (R, ED): dt_proj.weight transposed
  at::Tensor dt_bias;         // (ED,) float32
  at::Tensor A;               // (ED, N) float32: -exp(A_log)
  at::Tensor D;               // (ED,) float32
  at::Tensor out_proj;        // (D, ED)
};

class Mamba1Stage final : public MambaStack {
 public:
  Mamba1Stage(const MambaBlockConfig& block, int64_t dim, int64_t num_layers,
              const Weights& weights, const std::string& prefix)
      : inner_(block.expand * dim),
        rank_((dim + 15) / 16),
        d_state_(block.d_state),
        d_conv_(block.d_conv) {
    for (int64_t l = 0; l < num_layers; ++l) {
      const std::string p = prefix + "layers." + std::to_string(l) + ".";
      const std::string m = p + "mixer.";
      Mamba1Layer layer;
      layer.norm = weights.get(p + "norm.weight", {dim});
      const auto& a_log = weights.get(m + "A_log", {inner_, d_state_});
      const auto& d = weights.get(m + "D", {inner_});
      layer.in_proj = weights.get(m + "in_proj.weight", {2 * inner_, dim});
      layer.conv_w = weights.get(m + "conv1d.weight", {inner_, 1, d_conv_}).select(1, 0);
      layer.conv_b = weights.get(m + "conv1d.bias", {inner_});
      layer.x_proj = weights.get(m + "x_proj.weight", {rank_ + 2 * d_state_, inner_});
      layer.dt_proj_t = weights.get(m + "dt_proj.weight", {inner_, rank_}).t();
      layer.dt_bias = weights.get(m + "dt_proj.bias", {inner_}).to(at::kFloat);
      layer.out_proj = weights.get(m + "out_proj.weight", {dim, inner_});
      layer.A = -at::exp(a_log.to(at::kFloat));
      layer.D = d.to(at::kFloat);
      layers_.push_back(std::move(layer));
    }
    if (!layers_.empty()) options_ = layers_[0].in_proj.options();
  }

  at::Tensor run(const at::Tensor& input, std::vector<LayerState>* state) const override {
    auto x = input;
    const bool step = state != nullptr && x.size(1) == 1;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const auto& layer = layers_[l];
      const auto normed =
          x * at::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + kNormEps) * layer.norm;
      const auto y = step ? mixer_step(layer, normed, (*state)[l])
                          : mixer(layer, normed, state != nullptr ? &(*state)[l] : nullptr);
      x = y + x;
    }
    return x;
  }

  std::vector<LayerState> zero_state(int64_t batch) const override {
    std::vector<LayerState> state;
    for (size_t l = 0; l < layers_.size(); ++l) {
      state.push_back(
          {at::zeros({batch, inner_, d_conv_ - 1}, options_),
           at::zeros({batch, inner_, d_state_},
                     options_.dtype(mamba_state_dtype(options_.dtype().toScalarType())))});
    }
    return state;
  }

 private:
  // u (B, L, D) from `state` (nullptr: zeros, not kept).
  at::Tensor mixer(const Mamba1Layer& layer, const at::Tensor& u, LayerState* state) const {
    const auto xz = at::linear(u, layer.in_proj);
    const auto xs = xz.narrow(-1, 0, inner_);
    const auto z = xz.narrow(-1, inner_, inner_);
    std::optional<at::Tensor> conv0, ssm0;
    if (state != nullptr) {
      conv0 = state->conv;
      ssm0 = state->ssm;
    }
    auto [conv_out, conv_state] =
        mblm::conv1d_fwd(xs.transpose(1, 2), layer.conv_w, layer.conv_b, conv0, true);
    const auto dbc = at::linear(conv_out.transpose(1, 2), layer.x_proj);
    const auto delta = at::matmul(dbc.narrow(-1, 0, rank_), layer.dt_proj_t).transpose(1, 2);
    auto [y, ssm_state, checkpoints] =
        mblm::scan_fwd(conv_out, delta, layer.A, dbc.narrow(-1, rank_, d_state_).transpose(1, 2),
                       dbc.narrow(-1, rank_ + d_state_, d_state_).transpose(1, 2), layer.D,
                       z.transpose(1, 2), layer.dt_bias, /*delta_softplus=*/true, ssm0);
    if (state != nullptr) *state = {conv_state, ssm_state};
    return at::linear(y.transpose(1, 2), layer.out_proj);
  }

  // One position u (B, 1, D): advances `state` in place.
  at::Tensor mixer_step(const Mamba1Layer& layer, const at::Tensor& u, LayerState& state) const {
    const auto xz = at::linear(u.select(1, 0), layer.in_proj);
    const auto conv_out =
        mblm::conv1d_update(xz.narrow(-1, 0, inner_), state.conv, layer.conv_w, layer.conv_b, true);
    const auto dbc = at::linear(conv_out, layer.x_proj);
    const auto delta = at::matmul(dbc.narrow(-1, 0, rank_), layer.dt_proj_t);
    const auto y =
        mblm::scan_update(state.ssm, conv_out, delta, layer.A, dbc.narrow(-1, rank_, d_state_),
                          dbc.narrow(-1, rank_ + d_state_, d_state_), layer.D,
                          xz.narrow(-1, inner_, inner_), layer.dt_bias, true);
    return at::linear(y, layer.out_proj).unsqueeze(1);
  }

  int64_t inner_, rank_, d_state_, d_conv_;
  at::TensorOptions options_;
  std::vector<Mamba1Layer> layers_;
};

}  // namespace

std::unique_ptr<Stage> make_mamba1_stage(const MambaBlockConfig& block, int64_t dim,
                                         int64_t num_layers, const Weights& weights,
                                         const std::string& prefix) {
  return std::make_unique<Mamba1Stage>(block, dim, num_layers, weights, prefix);
}

}  // namespace mblm::runtime
