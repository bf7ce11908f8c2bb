// The CPU SSD scan kernels as compiled for one instruction set: ssd_fwd.cpp and ssd_bwd.cpp
// define them in the namespace of the instruction set of their build (vec.h's MBLM_CPU_ISA; the
// AVX-512 copy is csrc/cpu/avx512/), ssd_dispatch.cpp registers the op and calls one of them.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "mblm/ssd.h"
#include "vec.h"

// Argument checks: csrc/ops/ssd.cpp; semantics: mblm/ops/reference.py (ssd_ref).
#define MBLM_SSD_CPU_KERNELS                                                                       \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> ssd_fwd_cpu(                                      \
      const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,         \
      const at::Tensor& C, const std::optional<at::Tensor>& D,                                     \
      const std::optional<at::Tensor>& dt_bias, bool dt_softplus,                                  \
      const std::optional<at::Tensor>& initial_state);                                             \
  SsdGrads ssd_bwd_cpu(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_final_state, \
                       const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,             \
                       const at::Tensor& B, const at::Tensor& C,                                   \
                       const std::optional<at::Tensor>& D,                                         \
                       const std::optional<at::Tensor>& dt_bias, bool dt_softplus,                 \
                       const std::optional<at::Tensor>& initial_state,                             \
                       const at::Tensor& checkpoints);

namespace mblm::cpu_ssd {
inline namespace MBLM_CPU_ISA {
MBLM_SSD_CPU_KERNELS
}  // namespace MBLM_CPU_ISA
#if !MBLM_CPU_AVX512
namespace avx512 {
MBLM_SSD_CPU_KERNELS
}  // namespace avx512
#endif
}  // namespace mblm::cpu_ssd

#undef MBLM_SSD_CPU_KERNELS
