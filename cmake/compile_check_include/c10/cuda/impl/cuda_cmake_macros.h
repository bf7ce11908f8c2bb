// Stand-in for the header that a CUDA build of torch generates (CPU wheels lack it), so that the
// CUDA compile-only check (MBLM_CUDA_COMPILE_CHECK) can include <c10/cuda/*.h>. Only on the
// include path of the mblm_cuda_compile_check target; never used by a real CUDA build.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
