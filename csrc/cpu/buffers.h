// Aligned buffers for packed weights, caches and workspaces.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../core/error.h"

namespace fmoe {

// Frees what alloc_aligned gave: munmap for mapped buffers (their size is kept here), free otherwise.
struct AlignedFree {
  size_t mapped = 0;
  void operator()(void* p) const {
#ifdef __linux__
    if (mapped) {
      munmap(p, mapped);
      return;
    }
#endif
    std::free(p);
  }
};
using AlignedBuffer = std::unique_ptr<void, AlignedFree>;

// Large buffers (packed weights, big workspaces) are mapped directly, 2 MiB aligned and asked to live
// on transparent huge pages: the decode kernels stream gigabytes through them, and 4 KiB pages cost a
// TLB miss every 4 KiB. Mapping them (not malloc) also gives the memory back to the system the moment
// a layer is freed; malloc would keep it in its heap once its mmap threshold has grown.
inline AlignedBuffer alloc_aligned(size_t bytes, const char* what) {
  constexpr size_t kHuge = size_t(2) << 20;
  auto oom = [&] {
    fail(ErrorCode::OutOfMemory, std::string("could not allocate ") + std::to_string(bytes) + " bytes for " + what);
  };
#ifdef __linux__
  if (bytes >= 2 * kHuge) {
    const size_t size = (bytes + kHuge - 1) / kHuge * kHuge;
    void* raw = mmap(nullptr, size + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) oom();
    // Trim the mapping to a 2 MiB aligned window of `size` bytes.
    char* base = static_cast<char*>(raw);
    char* aligned = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(base) + kHuge - 1) & ~(uintptr_t(kHuge) - 1));
    if (aligned > base) munmap(base, size_t(aligned - base));
    const size_t tail = size_t(base + size + kHuge - (aligned + size));
    if (tail) munmap(aligned + size, tail);
#ifdef MADV_HUGEPAGE
    madvise(aligned, size, MADV_HUGEPAGE);
#endif
    return AlignedBuffer(aligned, AlignedFree{size});
  }
#endif
  void* p = std::aligned_alloc(64, bytes == 0 ? 64 : (bytes + 63) / 64 * 64);
  if (!p) oom();
  return AlignedBuffer(p, AlignedFree{0});
}

}  // namespace fmoe
