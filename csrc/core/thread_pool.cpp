#include "thread_pool.h"

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <set>
#include <string>
#include <utility>

namespace fmoe {

// Physical cores from sysfs topology (hyper-threads share FMA units, so they add little here).
static int physical_cores() {
  unsigned logical = std::thread::hardware_concurrency();
  if (logical == 0) logical = 1;
#ifdef __linux__
  std::set<std::pair<std::string, std::string>> cores;
  for (unsigned cpu = 0; cpu < logical; cpu++) {
    std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
    std::ifstream pkg(base + "physical_package_id"), core(base + "core_id");
    std::string p, c;
    if (!(pkg >> p) || !(core >> c)) return int(logical);
    cores.insert({p, c});
  }
  if (!cores.empty()) return int(cores.size());
#endif
  return int(logical);
}

int ThreadPool::default_threads() {
  if (const char* env = std::getenv("FUSED_MOE_THREADS")) {
    int v = std::atoi(env);
    if (v >= 1 && v <= 1024) return v;
  }
  return physical_cores();
}

int ThreadPool::spin_us() {
  static const int us = [] {
    const char* env = std::getenv("FUSED_MOE_SPIN_US");
    const int v = env ? std::atoi(env) : -1;
    return v >= 0 && v <= 10000 ? v : 100;
  }();
  return us;
}

// A hint to the core that this is a spin-wait loop (frees the sibling hyper-thread, saves power).
static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until ready() or spin_us() have passed; returns ready(). The clock is read every 64 turns.
template <class Ready>
static bool spin_until(const Ready& ready) {
  const int us = ThreadPool::spin_us();
  if (us == 0) return ready();
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
  for (unsigned i = 1;; i++) {
    if (ready()) return true;
    cpu_relax();
    if (i % 64 == 0 && std::chrono::steady_clock::now() >= until) return ready();
  }
}

ThreadPool& ThreadPool::instance() {
  // Never destroyed: worker threads may still be parked when the process exits.
  static ThreadPool* pool = new ThreadPool(default_threads());
  return *pool;
}

ThreadPool::ThreadPool(int threads) {
  if (threads < 1) threads = 1;
  for (int i = 1; i < threads; i++) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_chunks(Job& job, int worker) {
  for (;;) {
    const int64_t begin = job.next.fetch_add(job.chunk);
    if (begin >= job.n) return;
    const int64_t end = begin + job.chunk < job.n ? begin + job.chunk : job.n;
    // After an error the remaining items are skipped but still counted, so the caller's wait ends.
    if (!job.failed.load()) {
      try {
        (*job.fn)(begin, end, worker);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!job.error) job.error = std::current_exception();
        job.failed.store(true);
      }
    }
    if (job.done.fetch_add(end - begin) + (end - begin) == job.n) {
      std::lock_guard<std::mutex> lock(mutex_);  // pairs with the caller's wait: no lost wake-up
      done_.notify_all();
    }
  }
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen = 0;
  for (;;) {
    spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      job = job_;
    }
    if (job && index < job->limit) run_chunks(*job, index);
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t chunk, int max_threads, const RangeFn& fn) {
  if (n <= 0) return;
  if (chunk < 1) chunk = 1;
  int limit = size();
  if (max_threads > 0 && max_threads < limit) limit = max_threads;
  if (limit == 1 || n <= chunk) {
    fn(0, n, 0);
    return;
  }
  struct Turn {  // waits for this job's ticket; passes the turn on when the job ends
    ThreadPool& p;
    explicit Turn(ThreadPool& pool) : p(pool) {
      std::unique_lock<std::mutex> lock(p.ticket_mutex_);
      const uint64_t mine = p.next_ticket_++;
      p.ticket_cv_.wait(lock, [&] { return p.now_serving_ == mine; });
    }
    ~Turn() {
      {
        std::lock_guard<std::mutex> lock(p.ticket_mutex_);
        p.now_serving_++;
      }
      p.ticket_cv_.notify_all();
    }
  } turn(*this);
  auto job = std::make_shared<Job>();
  job->fn = &fn;
  job->n = n;
  job->chunk = chunk;
  job->limit = limit;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = job;
    generation_++;
  }
  wake_.notify_all();
  run_chunks(*job, 0);
  spin_until([&] { return job->done.load(std::memory_order_acquire) == n; });
  std::exception_ptr err;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return job->done.load() == n; });
    err = job->error;
    job_.reset();
  }
  if (err) std::rethrow_exception(err);
}

}  // namespace fmoe
