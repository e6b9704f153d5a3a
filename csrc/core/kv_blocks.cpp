#include "kv_blocks.h"

#include <algorithm>
#include <functional>
#include <string>

#include "error.h"

namespace fmoe {

KvBlockPool::KvBlockPool(int64_t num_blocks) {
  if (num_blocks < 0 || num_blocks > (int64_t(1) << 31) - 1)
    fail(ErrorCode::Invalid, "KV cache: the number of blocks must be in [0, 2^31), got " + std::to_string(num_blocks));
  refs_.assign(size_t(num_blocks), 0);
  free_.reserve(size_t(num_blocks));
  for (int64_t b = 0; b < num_blocks; b++) free_.push_back(int32_t(b));  // ascending: already a min-heap
}

int64_t KvBlockPool::free_blocks() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return int64_t(free_.size());
}

bool KvBlockPool::allocate(int64_t n, std::vector<int32_t>& out) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (n < 0 || n > int64_t(free_.size())) return false;
  for (int64_t i = 0; i < n; i++) {
    std::pop_heap(free_.begin(), free_.end(), std::greater<int32_t>());
    const int32_t b = free_.back();
    free_.pop_back();
    refs_[size_t(b)] = 1;
    out.push_back(b);
  }
  return true;
}

void KvBlockPool::check(int32_t block, const char* what) const {
  if (block < 0 || block >= int32_t(refs_.size()))
    fail(ErrorCode::Internal, std::string(what) + ": block " + std::to_string(block) + " is not in the pool");
  if (refs_[size_t(block)] == 0)
    fail(ErrorCode::Internal, std::string(what) + ": block " + std::to_string(block) + " is free");
}

void KvBlockPool::retain(int32_t block) {
  std::lock_guard<std::mutex> lock(mutex_);
  check(block, "KV cache retain");
  refs_[size_t(block)]++;
}

void KvBlockPool::release(int32_t block) {
  std::lock_guard<std::mutex> lock(mutex_);
  check(block, "KV cache release");
  if (--refs_[size_t(block)] > 0) return;
  free_.push_back(block);
  std::push_heap(free_.begin(), free_.end(), std::greater<int32_t>());
}

int32_t KvBlockPool::holders(int32_t block) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (block < 0 || block >= int32_t(refs_.size())) return 0;
  return refs_[size_t(block)];
}

}  // namespace fmoe
