// Named tensors of a model, read from a safetensors file (https://github.com/huggingface/safetensors)
// written by the Python package (mblm-export / mblm.utils.safetensors): same names as the
// state_dict. The reader validates the header, dtypes, shapes and byte ranges; a truncated or
// malformed file throws std::runtime_error naming the file and what is wrong.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace mblm::runtime {

class Weights {
 public:
  Weights() = default;
  static Weights load_safetensors(const std::string& path);  // CPU tensors
  static Weights from_map(std::map<std::string, at::Tensor> tensors,
                          std::map<std::string, std::string> metadata = {});

  bool contains(const std::string& name) const;
  // The tensor `name`; throws std::invalid_argument when it is missing ("missing tensor
  // 'stage_models.0.layers.1.mixer.A_log'") or its shape differs from `shape` (both shapes named).
  // Marks the name as used.
  const at::Tensor& get(const std::string& name, at::IntArrayRef shape) const;
  const at::Tensor& get(const std::string& name) const;  // any shape

  // Names never fetched with get(): the runtime reports them as unexpected tensors.
  std::vector<std::string> unused() const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::map<std::string, at::Tensor>& tensors() const { return tensors_; }
  // Moves every tensor to options' device; casts the floating-point ones to its dtype, if any.
  void to(const at::TensorOptions& options);

 private:
  std::map<std::string, at::Tensor> tensors_;
  std::map<std::string, std::string> metadata_;
  mutable std::set<std::string> used_;
};

// Writes tensors (+ string metadata) as a safetensors file, atomically (temp file + rename).
void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace mblm::runtime
