// The AVX-512 copy of the CPU SSD forward: CMakeLists.txt compiles this file with
// -march=x86-64-v4, so that ssd_fwd.cpp's kernels land in namespace mblm::cpu_ssd::avx512
// (vec.h); csrc/cpu/ssd_dispatch.cpp calls them on CPUs that have AVX-512.
#include "../ssd_fwd.cpp"
