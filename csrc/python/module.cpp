// The Python extension module mblm._C. Importing it runs the TORCH_LIBRARY registrations of
// every op object linked in; the module reports how it was built and, when the C++ runtime is
// linked in, holds RuntimeModel (runtime_bindings.cpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "mblm/cpu_isa.h"

#include <string>
#include <vector>

namespace py = pybind11;

#ifdef MBLM_WITH_RUNTIME
void register_runtime(py::module_& m);
#endif

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = MBLM_VERSION;
  info["torch"] = MBLM_TORCH_VERSION;
#ifdef MBLM_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(MBLM_CUDA_ARCHS);
  info["cpu_arch"] = std::string(MBLM_CPU_ARCH);
  info["compiler"] = std::string(__VERSION__);
#ifdef MBLM_WITH_RUNTIME
  info["runtime"] = true;
#else
  info["runtime"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mblm-cpp compute core: registers the torch.ops.mblm operators";
  m.def("build_info", &build_info, "How this extension was built (torch, CUDA, CPU arch)");
  m.def("ssd_cpu_isa", &mblm::ssd_cpu_isa,
        "Instruction set of the CPU SSD kernels in use: avx512, avx2 or portable (MBLM_CPU_ISA)");
#ifdef MBLM_WITH_RUNTIME
  register_runtime(m);
#endif
}
