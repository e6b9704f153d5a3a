// Bookkeeping of a paged KV cache: which blocks are free, and how many sequences hold each one (a
// prompt prefix's full blocks can be shared). The storage itself belongs to the backend.
#pragma once
#include <cstdint>
#include <mutex>
#include <vector>

namespace fmoe {

class KvBlockPool {
 public:
  explicit KvBlockPool(int64_t num_blocks);

  int64_t capacity() const { return int64_t(refs_.size()); }
  int64_t free_blocks() const;

  // Appends n free blocks to `out`, each held once, and returns true; or takes none and returns false
  // when fewer than n are free. Blocks come lowest id first, so a run is reproducible.
  bool allocate(int64_t n, std::vector<int32_t>& out);
  // One more holder of a block in use (a sequence that shares it).
  void retain(int32_t block);
  // One fewer holder; the block is free again when none is left.
  void release(int32_t block);
  int32_t holders(int32_t block) const;

 private:
  void check(int32_t block, const char* what) const;
  mutable std::mutex mutex_;
  // A min-heap of the free ids: the lowest is reused first, and freeing a block of a large cache costs
  // O(log n), where a list kept sorted by insertion scanned it whole.
  std::vector<int32_t> free_;
  std::vector<int32_t> refs_;  // holders per block
};

}  // namespace fmoe
