// The CPU registrations of ssd_fwd and ssd_bwd: each call goes to the kernels of the instruction
// set chosen once per process (ssd_cpu.h). The build's own copy (AVX2 on x86-64) always exists;
// the AVX-512 copy when MBLM_SSD_AVX512 is defined (CMakeLists.txt), chosen where the CPU has
// AVX-512 F/VL/BW/DQ/CD unless the environment variable MBLM_CPU_ISA says "avx2".
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "mblm/cpu_isa.h"
#include "mblm/ssd.h"
#include "ssd_cpu.h"

#define MBLM_STR_(x) #x
#define MBLM_STR(x) MBLM_STR_(x)

namespace mblm {

namespace {

constexpr const char* kBaseIsa = MBLM_STR(MBLM_CPU_ISA);

bool cpu_has_avx512() {
#if defined(MBLM_SSD_AVX512) && (defined(__x86_64__) || defined(_M_X64))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512cd");
#else
  return false;
#endif
}

// true: the AVX-512 copy. Throws on a bad MBLM_CPU_ISA (every call then throws again).
bool choose_avx512() {
  const char* env = std::getenv("MBLM_CPU_ISA");
  const std::string want = env ? env : "";
  TORCH_CHECK(want.empty() || want == "avx2" || want == "avx512" || want == kBaseIsa,
              "MBLM_CPU_ISA must be unset, 'avx2' or 'avx512' (the SSD CPU kernels to use), got '",
              want, "'");
  if (want == "avx512") {
#ifndef MBLM_SSD_AVX512
    TORCH_CHECK(false, "MBLM_CPU_ISA=avx512: this build has no AVX-512 SSD kernels (",
                kBaseIsa, " only)");
#endif
    TORCH_CHECK(cpu_has_avx512(),
                "MBLM_CPU_ISA=avx512: this CPU lacks AVX-512 (F, VL, BW, DQ and CD are needed)");
    return true;
  }
  return want.empty() && cpu_has_avx512();
}

bool use_avx512() {
  static const bool avx512 = choose_avx512();
  return avx512;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ssd_fwd_dispatch(
    const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
    const std::optional<at::Tensor>& initial_state) {
#ifdef MBLM_SSD_AVX512
  if (use_avx512()) {
    return cpu_ssd::avx512::ssd_fwd_cpu(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state);
  }
#endif
  use_avx512();  // a bad MBLM_CPU_ISA is an error in every build
  return cpu_ssd::ssd_fwd_cpu(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state);
}

SsdGrads ssd_bwd_dispatch(const at::Tensor& grad_y,
                          const std::optional<at::Tensor>& grad_final_state, const at::Tensor& x,
                          const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                          const at::Tensor& C, const std::optional<at::Tensor>& D,
                          const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                          const std::optional<at::Tensor>& initial_state,
                          const at::Tensor& checkpoints) {
#ifdef MBLM_SSD_AVX512
  if (use_avx512()) {
    return cpu_ssd::avx512::ssd_bwd_cpu(grad_y, grad_final_state, x, dt, A, B, C, D, dt_bias,
                                        dt_softplus, initial_state, checkpoints);
  }
#endif
  use_avx512();
  return cpu_ssd::ssd_bwd_cpu(grad_y, grad_final_state, x, dt, A, B, C, D, dt_bias, dt_softplus,
                              initial_state, checkpoints);
}

}  // namespace

std::string ssd_cpu_isa() { return use_avx512() ? "avx512" : kBaseIsa; }

TORCH_LIBRARY_IMPL(mblm, CPU, m) {
  m.impl("ssd_fwd", &ssd_fwd_dispatch);
  m.impl("ssd_bwd", &ssd_bwd_dispatch);
}

}  // namespace mblm
