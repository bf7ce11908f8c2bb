// Cached hierarchical decoding (HierarchicalDecoder of mblm/model/decoding.py): every stage keeps
// the cache of its current sequence and runs only when its input changes. A global stage k feeds
// one token when a patch of S_k bytes is complete, and its projected output becomes the
// previous-stage term of the child sequence that patch starts; the local stage feeds every byte.
// Every stage sequence starts with the stage's start token alone, so the state after it is
// computed once and copied.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "hierarchy.h"
#include "stage.h"

namespace mblm::runtime {

class HierarchicalDecoder {
 public:
  // Caches for `batch` rows of at most `max_len` bytes each.
  HierarchicalDecoder(const Hierarchy& model, int64_t batch, int64_t max_len);

  // Feeds whole prompts (1-D int64 on the model's device) to the given fresh rows; returns the
  // next-byte logits (R, V) in the order of `rows`. Empty prompts get forward_empty's logits.
  at::Tensor prefill(const std::vector<at::Tensor>& prompts, const std::vector<int64_t>& rows);
  // Appends tokens (R,) (one byte per row) to the given rows; returns the next-byte logits (R, V).
  at::Tensor step(const at::Tensor& tokens, const std::vector<int64_t>& rows);

 private:
  int64_t position(int64_t k, int64_t t) const;  // index of byte t's token in its stage-k sequence
  Rows index(const std::vector<int64_t>& rows) const;
  at::Tensor rows_tensor(const Rows& index) const;
  at::Tensor column(const std::vector<int64_t>& values) const;
  void start(int64_t k, const Rows& index);
  at::Tensor inputs(int64_t k, const at::Tensor& ids, const at::Tensor& positions,
                    const Rows& index, int64_t max_position) const;
  at::Tensor feed(int64_t k, const at::Tensor& x, const Rows& index);
  void check_room(const std::vector<int64_t>& rows, int64_t extra) const;
  at::Tensor prefill_group(const Rows& index, int64_t length, int64_t count);

  const Hierarchy& model_;
  int64_t num_stages_, batch_, max_len_;
  std::vector<std::unique_ptr<StageCache>> caches_;
  std::vector<std::unique_ptr<StageCache>> starts_;  // 1-row caches fed the start token
  std::vector<at::Tensor> start_prev_;  // [k]: (1, P_k, D_k) projection of stage k-1's start
  std::vector<at::Tensor> prev_;        // [k]: (B, P_k, D_k) previous-stage term of each row
  at::Tensor ids_;                      // (B, max_len) the bytes fed so far
  std::vector<int64_t> length_;         // bytes fed per row
  at::Tensor all_rows_;                 // arange(B)
};

}  // namespace mblm::runtime
