#include "decoder.h"

#include <ATen/TensorIndexing.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

namespace mblm::runtime {

using at::indexing::Slice;

HierarchicalDecoder::HierarchicalDecoder(const Hierarchy& model, int64_t batch, int64_t max_len)
    : model_(model), num_stages_(model.num_stages()), batch_(batch), max_len_(max_len) {
  const auto& seq_lens = model.config().seq_lens;
  start_prev_.resize(num_stages_);
  prev_.resize(num_stages_);
  for (int64_t k = 0; k < num_stages_; ++k) {
    const int64_t capacity = k == 0 ? max_len / model.patch_bytes(0) + 2 : seq_lens[k] + 1;
    caches_.push_back(model.stage(k).make_cache(batch, capacity));
    starts_.push_back(model.stage(k).make_cache(1, 1));
    const auto out = starts_[k]->extend(model.start_token(k).view({1, 1, -1}), std::nullopt);
    if (k + 1 < num_stages_) {
      start_prev_[k + 1] = model.project(k, out);
      prev_[k + 1] = at::zeros({batch, seq_lens[k + 1], start_prev_[k + 1].size(-1)},
                               start_prev_[k + 1].options());
    }
  }
  const auto long_opts = model.options().dtype(at::kLong);
  ids_ = at::full({batch, std::max<int64_t>(max_len, 1)}, model.config().pad_token_id, long_opts);
  length_.assign(batch, 0);
  all_rows_ = at::arange(batch, long_opts);
}

int64_t HierarchicalDecoder::position(int64_t k, int64_t t) const {
  const int64_t u = t / model_.patch_bytes(k);
  return k > 0 ? u % model_.config().seq_lens[k] : u;
}

Rows HierarchicalDecoder::index(const std::vector<int64_t>& rows) const {
  bool all = static_cast<int64_t>(rows.size()) == batch_;
  for (size_t i = 0; all && i < rows.size(); ++i) all = rows[i] == static_cast<int64_t>(i);
  if (all) return std::nullopt;
  return at::tensor(rows, model_.options().dtype(at::kLong));
}

at::Tensor HierarchicalDecoder::rows_tensor(const Rows& index) const {
  return index.has_value() ? *index : all_rows_;
}

at::Tensor HierarchicalDecoder::column(const std::vector<int64_t>& values) const {
  const auto opts = model_.options().dtype(at::kLong);
  const bool same =
      std::all_of(values.begin(), values.end(), [&](int64_t v) { return v == values[0]; });
  if (same) return at::full({static_cast<int64_t>(values.size()), 1}, values[0], opts);
  return at::tensor(values, opts).unsqueeze(1);
}

void HierarchicalDecoder::start(int64_t k, const Rows& index) {
  caches_[k]->load_start(index, *starts_[k]);
  if (k + 1 < num_stages_) {
    auto& next = prev_[k + 1];
    if (index.has_value()) {
      next.index_put_({*index}, start_prev_[k + 1]);
    } else {
      next.copy_(start_prev_[k + 1].expand_as(next));
    }
  }
}

at::Tensor HierarchicalDecoder::inputs(int64_t k, const at::Tensor& ids,
                                       const at::Tensor& positions, const Rows& index,
                                       int64_t max_position) const {
  at::Tensor prev;
  if (k > 0) prev = prev_[k].index({rows_tensor(index).unsqueeze(1), positions});
  return model_.stage_tokens(k, model_.embed(k, ids), positions, max_position, prev);
}

at::Tensor HierarchicalDecoder::feed(int64_t k, const at::Tensor& x, const Rows& index) {
  auto y = caches_[k]->extend(x, index);
  if (k + 1 < num_stages_) {
    const auto projected = model_.project(k, y.narrow(1, y.size(1) - 1, 1));
    if (index.has_value()) {
      prev_[k + 1].index_put_({*index}, projected);
    } else {
      prev_[k + 1].copy_(projected);
    }
  }
  return y;
}

void HierarchicalDecoder::check_room(const std::vector<int64_t>& rows, int64_t extra) const {
  for (const int64_t r : rows) {
    if (length_[r] + extra > max_len_) {
      throw std::invalid_argument("HierarchicalDecoder: row " + std::to_string(r) + " would hold " +
                                  std::to_string(length_[r] + extra) +
                                  " bytes, more than max_len = " + std::to_string(max_len_));
    }
  }
}

at::Tensor HierarchicalDecoder::prefill(const std::vector<at::Tensor>& prompts,
                                        const std::vector<int64_t>& rows) {
  if (prompts.size() != rows.size()) {
    throw std::invalid_argument("prefill: " + std::to_string(prompts.size()) + " prompts for " +
                                std::to_string(rows.size()) + " rows");
  }
  std::vector<size_t> order(rows.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return prompts[a].numel() < prompts[b].numel(); });
  std::vector<at::Tensor> out(rows.size());
  for (size_t begin = 0; begin < order.size();) {
    const int64_t length = prompts[order[begin]].numel();
    size_t end = begin;
    while (end < order.size() && prompts[order[end]].numel() == length) ++end;
    std::vector<int64_t> group_rows;
    std::vector<at::Tensor> group_prompts;
    for (size_t i = begin; i < end; ++i) {
      group_rows.push_back(rows[order[i]]);
      group_prompts.push_back(prompts[order[i]]);
    }
    check_room(group_rows, length);
    const auto count = static_cast<int64_t>(group_rows.size());
    at::Tensor logits;
    if (length == 0) {
      logits = model_.forward_empty(count).select(1, -1);
    } else {
      const auto idx = index(group_rows);
      ids_.index_put_({rows_tensor(idx), Slice(0, length)}, at::stack(group_prompts));
      logits = prefill_group(idx, length, count);
    }
    for (size_t i = begin; i < end; ++i) {
      out[order[i]] = logits[static_cast<int64_t>(i - begin)];
      length_[rows[order[i]]] = length;
    }
    begin = end;
  }
  return at::stack(out);
}

at::Tensor HierarchicalDecoder::prefill_group(const Rows& idx, int64_t length, int64_t count) {
  const int64_t t = length - 1;  // the last byte: each stage holds what was fed up to its boundary
  const auto ids = ids_.index({rows_tensor(idx)});
  at::Tensor y;
  for (int64_t k = 0; k < num_stages_; ++k) {
    start(k, idx);
    const int64_t size = model_.patch_bytes(k), p = position(k, t);
    const bool local = k == num_stages_ - 1;
    const int64_t m = local ? p + 1 : p;  // tokens fed after the start token
    if (m == 0) continue;
    const int64_t first = t / size - p;  // the first token of the current stage-k sequence
    auto tokens = ids.narrow(1, first * size, m * size);
    if (!local) tokens = tokens.reshape({count, m, size});
    const auto positions = at::arange(m, ids.options()).expand({count, m});
    y = feed(k, inputs(k, tokens, positions, idx, m - 1), idx);
  }
  return model_.to_logits(y.select(1, -1));
}

at::Tensor HierarchicalDecoder::step(const at::Tensor& tokens, const std::vector<int64_t>& rows) {
  check_room(rows, 1);
  const auto idx = index(rows);
  const auto rows_t = rows_tensor(idx);
  std::vector<int64_t> where;  // the new byte's position in each row
  for (const int64_t r : rows) where.push_back(length_[r]);
  const auto long_opts = model_.options().dtype(at::kLong);
  if (std::all_of(where.begin(), where.end(), [&](int64_t w) { return w == where[0]; })) {
    ids_.index_put_({rows_t, where[0]}, tokens);
  } else {
    ids_.index_put_({rows_t, at::tensor(where, long_opts)}, tokens);
  }
  for (int64_t k = 0; k + 1 < num_stages_; ++k) {
    const int64_t size = model_.patch_bytes(k);
    std::vector<int64_t> starting, cont_rows, ends, token_pos;
    for (size_t i = 0; i < rows.size(); ++i) {
      if (where[i] % size != 0) continue;  // no stage-k patch completes with this byte
      const int64_t p = position(k, where[i]);
      if (p == 0) {
        starting.push_back(rows[i]);
      } else {
        cont_rows.push_back(rows[i]);
        ends.push_back(where[i]);
        token_pos.push_back(p - 1);
      }
    }
    if (!starting.empty()) start(k, index(starting));
    if (cont_rows.empty()) continue;
    // the completed patch (the `size` bytes before the new one) becomes stage k's next token
    const auto cont_idx = index(cont_rows);
    const auto cont_t = rows_tensor(cont_idx);
    at::Tensor patch_ids;
    if (std::all_of(ends.begin(), ends.end(), [&](int64_t e) { return e == ends[0]; })) {
      patch_ids = ids_.index({cont_t, Slice(ends[0] - size, ends[0])});
    } else {
      const auto cols = at::tensor(ends, long_opts).unsqueeze(1) - size;
      patch_ids = ids_.index({cont_t.unsqueeze(1), cols + at::arange(size, long_opts)});
    }
    const int64_t max_pos = *std::max_element(token_pos.begin(), token_pos.end());
    feed(k, inputs(k, patch_ids.unsqueeze(1), column(token_pos), cont_idx, max_pos), cont_idx);
  }
  const int64_t local = num_stages_ - 1;
  std::vector<int64_t> positions, starting;
  for (size_t i = 0; i < rows.size(); ++i) {
    positions.push_back(position(local, where[i]));
    if (positions.back() == 0) starting.push_back(rows[i]);
  }
  if (!starting.empty()) start(local, index(starting));
  const int64_t max_pos = *std::max_element(positions.begin(), positions.end());
  const auto y =
      feed(local, inputs(local, tokens.unsqueeze(1), column(positions), idx, max_pos), idx);
  for (const int64_t r : rows) ++length_[r];
  return model_.to_logits(y.select(1, -1));
}

}  // namespace mblm::runtime
