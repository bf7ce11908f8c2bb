// Transparent huge pages for large fresh outputs of the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mblm::cpu {

// Asks the kernel to back a large fresh output with transparent huge pages (what torch's own
// allocator does under THP_MEM_ALLOC_ENABLE=1): the kernels write every byte of their outputs,
// and buffers this large are mapped fresh by malloc on every call, so first-touch page faults on
// 4 KiB pages cost as much as the kernel itself on some VMs (32 MiB: ~9 ms, ~2 ms with 2 MiB
// pages). Only the 2 MiB-aligned interior of the buffer is advised; failures are harmless.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (bytes < int64_t{8} << 20) return;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (start + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

}  // namespace mblm::cpu
