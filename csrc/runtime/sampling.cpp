#include "sampling.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/log.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

namespace mblm::runtime {

namespace {

constexpr double kLogFloor = 1e-20;  // mblm.model.utils.log clamps at this before the log

at::Tensor clamped_log(const at::Tensor& t) { return at::log(t.clamp_min(kLogFloor)); }

std::string number(double v) {
  std::ostringstream out;
  out << v;
  return out.str();
}

}  // namespace

int64_t num_kept_logits(double filter_thres, int64_t vocab) {
  return std::max<int64_t>(static_cast<int64_t>((1.0 - filter_thres) * static_cast<double>(vocab)),
                           1);
}

void check_sampling(double temperature, double filter_thres, int64_t vocab) {
  if (std::isnan(filter_thres) || filter_thres < 0) {
    throw std::invalid_argument(
        "filter_thres must be >= 0 (it keeps the top max(int((1 - filter_thres) * V), 1) logits "
        "of V = " +
        std::to_string(vocab) + "; 1 keeps one: greedy), got " + number(filter_thres));
  }
  const int64_t kept = num_kept_logits(filter_thres, vocab);
  if (kept > 1 && !(temperature > 0)) {
    throw std::invalid_argument(
        "temperature must be > 0 when sampling (filter_thres = " + number(filter_thres) +
        " keeps " + std::to_string(kept) + " logits), got " + number(temperature));
  }
}

at::Tensor sample_next(const at::Tensor& logits, double filter_thres, double temperature,
                       at::Generator& generator) {
  const auto noise =
      at::zeros(logits.sizes(), logits.options().device(at::kCPU)).uniform_(0, 1, generator);
  const int64_t kept = num_kept_logits(filter_thres, logits.size(-1));
  if (kept == 1) return std::get<1>(at::topk(logits, 1, -1)).select(1, 0);
  const auto [values, indices] = at::topk(logits, kept);
  const auto filtered =
      at::full_like(logits, -std::numeric_limits<double>::infinity()).scatter_(1, indices, values);
  const auto gumbel = -clamped_log(-clamped_log(noise)).to(logits.device());
  return (filtered / temperature + gumbel).argmax(-1);
}

}  // namespace mblm::runtime
