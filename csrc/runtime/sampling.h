// Next-byte sampling of the Python package (sample_next in mblm/model/decoding.py): keep the
// max(int((1 - filter_thres) * V), 1) largest logits, add Gumbel noise to logits / temperature and
// take the argmax; one kept logit is greedy decoding.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace mblm::runtime {

int64_t num_kept_logits(double filter_thres, int64_t vocab);

// Throws std::invalid_argument for a negative or NaN filter_thres, or a temperature <= 0 while
// sampling (more than one logit kept).
void check_sampling(double temperature, double filter_thres, int64_t vocab);

// logits (R, V) -> (R,) int64. The noise is one uniform number per logit drawn from `generator`
// (a CPU generator) in the order of torch.zeros_like(logits).uniform_(0, 1, generator=...), so a
// generator seeded like Python's gives Python's samples. Greedy decoding draws the noise too and
// ignores it, as Python does: the generator ends in Python's state.
at::Tensor sample_next(const at::Tensor& logits, double filter_thres, double temperature,
                       at::Generator& generator);

}  // namespace mblm::runtime
