#include "timeline.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>

namespace fmoe {
namespace timeline {
namespace {

// One thread's events. Its own thread appends under the lock, stop() takes them under it: both only
// while recording, so the lock is never taken otherwise.
struct Buffer {
  std::mutex mutex;
  std::vector<Event> events;
  size_t dropped = 0;
  uint64_t session = 0;  // the start() these events belong to
};

struct Registry {
  std::mutex mutex;
  std::vector<std::shared_ptr<Buffer>> buffers;  // every thread that recorded, kept while it lives or longer
  std::atomic<bool> on{false};
  std::atomic<uint64_t> session{0};
  std::atomic<size_t> capacity{0};
};

Registry& registry() {
  static Registry* r = new Registry;  // never destroyed: threads may record while the process exits
  return *r;
}

Buffer& own_buffer() {
  thread_local std::shared_ptr<Buffer> mine = [] {
    auto b = std::make_shared<Buffer>();
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    r.buffers.push_back(b);
    return b;
  }();
  return *mine;
}

}  // namespace

bool recording() { return registry().on.load(std::memory_order_relaxed); }

void record(Kind kind, int thread, int64_t t0, int64_t t1, int64_t bytes, int tag) {
  Registry& r = registry();
  if (!r.on.load(std::memory_order_relaxed)) return;
  Buffer& b = own_buffer();
  std::lock_guard<std::mutex> lock(b.mutex);
  const uint64_t session = r.session.load(std::memory_order_relaxed);
  if (b.session != session) {  // the first event of this recording: the last one's are stale
    b.events.clear();
    b.dropped = 0;
    b.session = session;
  }
  if (b.events.size() >= r.capacity.load(std::memory_order_relaxed)) {
    b.dropped++;
    return;
  }
  b.events.push_back(Event{t0, t1, bytes, int32_t(kind), int32_t(thread), int32_t(tag)});
}

void start(size_t capacity) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.capacity.store(capacity, std::memory_order_relaxed);
  r.session.fetch_add(1, std::memory_order_relaxed);
  r.on.store(true, std::memory_order_release);
}

std::vector<Event> stop(size_t* dropped) {
  Registry& r = registry();
  std::vector<Event> all;
  size_t lost = 0;
  std::lock_guard<std::mutex> lock(r.mutex);
  r.on.store(false, std::memory_order_release);
  const uint64_t session = r.session.load(std::memory_order_relaxed);
  for (const auto& b : r.buffers) {
    std::lock_guard<std::mutex> hold(b->mutex);
    if (b->session != session) continue;
    all.insert(all.end(), b->events.begin(), b->events.end());
    lost += b->dropped;
    b->events.clear();
    b->events.shrink_to_fit();
    b->dropped = 0;
  }
  std::sort(all.begin(), all.end(), [](const Event& a, const Event& b) { return a.t0 < b.t0; });
  if (dropped) *dropped = lost;
  return all;
}

}  // namespace timeline
}  // namespace fmoe
