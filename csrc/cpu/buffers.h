// Aligned buffers for packed weights, caches and workspaces.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

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
// TLB miss every 4 KiB. Buffers from kMappedBytes up are mapped too, on ordinary pages: mapping (not malloc)
// gives the memory back to the system the moment a layer is freed, where malloc would keep it in its
// heap once its mmap threshold has grown (a small layer's experts are one buffer of a few hundred KiB).
constexpr size_t kMappedBytes = size_t(64) << 10;  // buffers from this size up are mapped (zeroed pages)
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
  if (bytes >= kMappedBytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) oom();
    return AlignedBuffer(p, AlignedFree{bytes});
  }
#endif
  void* p = std::aligned_alloc(64, bytes == 0 ? 64 : (bytes + 63) / 64 * 64);
  if (!p) oom();
  return AlignedBuffer(p, AlignedFree{0});
}

// alloc_aligned, every byte zero: a mapping comes zeroed, a small buffer from the heap is cleared (large
// ones are not written here, so their pages are only committed as they are used).
inline AlignedBuffer alloc_zeroed(size_t bytes, const char* what) {
  AlignedBuffer buf = alloc_aligned(bytes, what);
#ifdef __linux__
  if (bytes < kMappedBytes) std::memset(buf.get(), 0, bytes);
#else
  std::memset(buf.get(), 0, bytes);
#endif
  return buf;
}

// Workspaces of the forward passes, kept between calls. Mapping and unmapping tens of megabytes per
// forward made the kernel clear fresh pages (clear_page) on every call. A Workspace hands its buffer back to the pool
// when it goes; the pool keeps the kKeepIdle largest idle ones (one forward nests at most two: the layer's and its
// shared expert's) and frees them all when the last user goes (WorkspaceUser), so a disposed model holds nothing.
class WorkspacePool {
 public:
  static WorkspacePool& instance() {
    static WorkspacePool* pool = new WorkspacePool();  // never destroyed: outlives every user
    return *pool;
  }
  struct Block {
    AlignedBuffer buf;
    size_t bytes = 0;
  };
  // The smallest idle block of at least `bytes`, or a new one.
  Block take(size_t bytes, const char* what) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      size_t best = idle_.size();
      for (size_t i = 0; i < idle_.size(); i++)
        if (idle_[i].bytes >= bytes && (best == idle_.size() || idle_[i].bytes < idle_[best].bytes)) best = i;
      if (best < idle_.size()) {
        Block b = std::move(idle_[best]);
        idle_.erase(idle_.begin() + std::ptrdiff_t(best));
        return b;
      }
    }
    Block b;
    b.buf = alloc_aligned(bytes, what);
    b.bytes = bytes;
    return b;
  }
  void give_back(Block b) {
    std::lock_guard<std::mutex> lock(mu_);
    if (users_ == 0) return;  // the last user is gone: b is freed here
    idle_.push_back(std::move(b));
    if (idle_.size() > kKeepIdle) {  // drop the smallest
      size_t smallest = 0;
      for (size_t i = 1; i < idle_.size(); i++)
        if (idle_[i].bytes < idle_[smallest].bytes) smallest = i;
      idle_.erase(idle_.begin() + std::ptrdiff_t(smallest));
    }
  }
  void add_user() {
    std::lock_guard<std::mutex> lock(mu_);
    users_++;
  }
  void remove_user() {
    std::vector<Block> freed;
    std::lock_guard<std::mutex> lock(mu_);
    if (--users_ == 0) freed.swap(idle_);
  }

 private:
  static constexpr size_t kKeepIdle = 2;
  std::mutex mu_;
  std::vector<Block> idle_;
  int64_t users_ = 0;
};

// Registers an owner of forwards (a layer) with the pool for its lifetime.
struct WorkspaceUser {
  WorkspaceUser() { WorkspacePool::instance().add_user(); }
  ~WorkspaceUser() { WorkspacePool::instance().remove_user(); }
  WorkspaceUser(const WorkspaceUser&) = delete;
  WorkspaceUser& operator=(const WorkspaceUser&) = delete;
};

// A forward's scratch memory of at least `bytes`, from the pool and back to it on destruction. Its
// contents are whatever the last user left.
class Workspace {
 public:
  Workspace(size_t bytes, const char* what) : block_(WorkspacePool::instance().take(bytes, what)) {}
  ~Workspace() {
    if (block_.buf) WorkspacePool::instance().give_back(std::move(block_));
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  float* floats() const { return static_cast<float*>(block_.buf.get()); }

 private:
  WorkspacePool::Block block_;
};

}  // namespace fmoe
