// Which instruction set the CPU kernels that exist in more than one build run with.
#pragma once

#include <string>

namespace mblm {

// The SSD scan's (ssd_fwd, ssd_bwd) in this process: "avx512", "avx2" or "portable"; chosen at
// first use from the CPU and the environment variable MBLM_CPU_ISA (csrc/cpu/ssd_dispatch.cpp).
// Throws when MBLM_CPU_ISA is invalid.
std::string ssd_cpu_isa();

}  // namespace mblm
