#include "thread_pool.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <fstream>
#include <set>
#include <string>
#include <utility>

#include "error.h"
#include "timeline.h"

#ifdef __linux__
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fmoe {

// The CPUs this process may run on (its affinity mask), one per physical core: the first allowed
// hyper-thread of each, in CPU order (siblings share FMA units, so they add little here). Empty where
// the mask is unknown; each allowed CPU counts as a core where the topology is.
static std::vector<int> core_cpus() {
  std::vector<int> cpus;
#ifdef __linux__
  cpu_set_t mask;
  CPU_ZERO(&mask);
  if (sched_getaffinity(0, sizeof mask, &mask) != 0) return cpus;
  std::set<std::pair<std::string, std::string>> cores;
  bool topology = true;
  for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
    if (!CPU_ISSET(cpu, &mask)) continue;
    std::string p, c;
    if (topology) {
      const std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
      std::ifstream pkg(base + "physical_package_id"), core(base + "core_id");
      topology = bool(pkg >> p) && bool(core >> c);
    }
    if (!topology || cores.insert({p, c}).second) cpus.push_back(cpu);
  }
  if (!topology) {  // unreadable after all: every allowed CPU, once
    cpus.clear();
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++)
      if (CPU_ISSET(cpu, &mask)) cpus.push_back(cpu);
  }
#endif
  return cpus;
}

static const std::vector<int>& cached_core_cpus() {
  static const std::vector<int> cpus = core_cpus();
  return cpus;
}

int ThreadPool::default_threads() {
  if (const char* env = std::getenv("FUSED_MOE_THREADS")) {
    int v = std::atoi(env);
    if (v >= 1 && v <= 1024) return v;
  }
  const size_t cores = cached_core_cpus().size();
  if (cores > 0) return int(cores);
  const unsigned logical = std::thread::hardware_concurrency();
  return logical > 0 ? int(logical) : 1;
}

bool ThreadPool::pin_requested() {
  const char* env = std::getenv("FUSED_MOE_PIN_THREADS");
  return !(env && std::string(env) == "0");
}

std::atomic<int>& ThreadPool::spin_setting() {
  static std::atomic<int> us{[] {
    const char* env = std::getenv("FUSED_MOE_SPIN_US");
    const int v = env ? std::atoi(env) : -1;
    return v >= 0 && v <= 10000 ? v : kDefaultSpinUs;
  }()};
  return us;
}

int ThreadPool::spin_us() { return spin_setting().load(std::memory_order_relaxed); }

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

// Takes the lock's mutex, trying for a few microseconds before it sleeps: the pool's critical sections
// last nanoseconds, and std::mutex puts a thread that finds it held to sleep in the kernel at once, to
// be woken by the holder's unlock. A worker that saw a job's generation change found the submitting
// thread still holding the mutex, and a caller done spinning for its job's end found the last worker
// holding it to notify. Against lock() there (`node bench/ab-model.js qwen3moe int4 build OLD NEW 150`,
// both orders, Zen 5, 2 cores): a decode step 0.997 and 0.990 (Q/K/V 0.982-0.987, output
// 0.978-0.988).
static std::unique_lock<std::mutex> lock_spinning(std::mutex& m) {
  std::unique_lock<std::mutex> lock(m, std::defer_lock);
  for (int i = 0; i < 256; i++) {
    if (lock.try_lock()) return lock;
    cpu_relax();
  }
  lock.lock();
  return lock;
}

ThreadPool& ThreadPool::instance() {
  // Never destroyed: worker threads may still be parked when the process exits.
  static ThreadPool* pool = new ThreadPool(default_threads());
  return *pool;
}

ThreadPool::ThreadPool(int threads) {
  if (threads < 1) threads = 1;
  const std::vector<int>& cpus = cached_core_cpus();
  pinned_ = threads > 1 && pin_requested() && size_t(threads) <= cpus.size();
  if (pinned_) home_.assign(cpus.begin(), cpus.begin() + threads);
  tids_.reset(new std::atomic<int>[size_t(threads)]);
  for (int i = 0; i < threads; i++) tids_[size_t(i)].store(0);
  for (int i = 1; i < threads; i++)
    workers_.emplace_back([this, i, cpu = pinned_ ? cpus[size_t(i)] : -1] {
#ifdef __linux__
      tids_[size_t(i)].store(int(syscall(SYS_gettid)));
#endif
      if (cpu >= 0) pin_to(cpu);
      worker_loop(i);
    });
}

// Worker i starts on core i and stays on one core (move_worker_off may trade it). Unpinned, the
// scheduler often woke a worker on the core of the caller that had just woken it after an idle spell,
// and the phase then ran on one core until it moved one of them. The callers (the JavaScript thread,
// libuv's threads) stay free: holding them off the workers' cores (confined, or moved at each job) did
// not make the decode faster, and confined callers of several processes crowded one core.
bool ThreadPool::pin_to(int cpu, int tid) {
#ifdef __linux__
  cpu_set_t mask;
  CPU_ZERO(&mask);
  CPU_SET(cpu, &mask);
  return sched_setaffinity(tid, sizeof mask, &mask) == 0;  // a failure leaves the thread where it was
#else
  (void)cpu;
  (void)tid;
  return false;
#endif
}

// The scheduler often leaves a caller on a worker's core after a sleep or a read probe, while the core
// no worker holds idles: the two then share one core, and the worker, pinned there, waits for the
// caller to stop. The caller moves that worker, before it wakes it, to the core no worker holds, which
// takes the worker's old core as the free one. A worker that moved itself once it ran, as before, had
// first to wait for the caller to stop: over 1,000 decode steps of one Qwen3 int4 stream, the worker ran
// no item of 16-20% of the jobs (`node bench/timeline.js qwen3moe int4 1000`), 0% since. Mean decode
// step, new / old (a trial build's run-time switch, `bench/ab-model.js MODEL int4 NAME 0 1 PAIRS --part
// all`, Zen 5, 2 cores): one Qwen3 int4 stream 0.950 (300 pairs), one Mixtral int4 stream 0.956 (200);
// the medians moved 1-2%, as the lost steps are a few. Moving the caller instead (once per job, its
// mask given back at once) failed the fairness test of test/server.test.ts beside other processes: a
// caller forced onto a busy core waited there at each job. Under mutex_.
void ThreadPool::move_worker_off(int caller_cpu) {
  if (!pinned_ || caller_cpu < 0 || home_[0] == caller_cpu) return;
  for (size_t w = 1; w < home_.size(); w++) {
    if (home_[w] != caller_cpu) continue;
    const int tid = tids_[w].load();
    if (tid > 0 && pin_to(home_[0], tid)) std::swap(home_[0], home_[w]);
    return;
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

// The next chunk for `worker`: the front of its own share, else the back of the largest share left.
bool ThreadPool::claim(Job& job, int worker, int64_t& begin, int64_t& end) {
  const auto front = [](uint64_t s) { return int64_t(s >> 32); };
  const auto back = [](uint64_t s) { return int64_t(s & 0xffffffffu); };
  std::atomic<uint64_t>& own = job.shares[size_t(worker)].span;
  for (uint64_t s = own.load(std::memory_order_relaxed); front(s) < back(s);) {
    const int64_t f = front(s), e = std::min(back(s), f + job.chunk);
    if (own.compare_exchange_weak(s, (uint64_t(e) << 32) | uint64_t(back(s)), std::memory_order_relaxed)) {
      begin = f, end = e;
      return true;
    }
  }
  for (;;) {
    int victim = -1;
    int64_t most = 0;
    for (int w = 0; w < job.limit; w++) {
      const uint64_t s = job.shares[size_t(w)].span.load(std::memory_order_relaxed);
      if (back(s) - front(s) > most) most = back(s) - front(s), victim = w;
    }
    if (victim < 0) return false;
    std::atomic<uint64_t>& other = job.shares[size_t(victim)].span;
    uint64_t s = other.load(std::memory_order_relaxed);
    if (front(s) >= back(s)) continue;
    const int64_t e = back(s), b = std::max(front(s), e - job.chunk);
    if (other.compare_exchange_weak(s, (uint64_t(front(s)) << 32) | uint64_t(b), std::memory_order_relaxed)) {
      begin = b, end = e;
      return true;
    }
  }
}

// Each thread counts its items and adds them to job.done once, when no chunk is left to claim: one
// shared counter written by every thread after every chunk moved its cache line between the cores
// each time, 100-200 ns between two items. A decode step (`node bench/ab-model.js qwen3moe int4 build
// OLD NEW 120-150`, both orders, Zen 5, 2 cores): 0.991 and 0.993 (Q/K/V 0.971-0.985, output
// 0.957-0.991); the median gap between two items of a thread 320-410 ns before, 200-240 after.
void ThreadPool::run_chunks(Job& job, int worker) {
  int64_t finished = 0;
  for (;;) {
    int64_t begin, end;
    if (!claim(job, worker, begin, end)) break;
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
    finished += end - begin;
  }
  if (finished > 0 && job.done.fetch_add(finished) + finished == job.n) {
    const auto lock = lock_spinning(mutex_);  // pairs with the caller's wait: no lost wake-up
    done_.notify_all();
  }
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen = 0;
  for (;;) {
    spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
    std::shared_ptr<Job> job;
    {
      auto lock = lock_spinning(mutex_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      job = job_;
    }
    if (job && index < job->limit) run_chunks(*job, index);
  }
}

class ThreadPool::Turn {
 public:
  // wait: stand in line for the pool; else take it only when no job holds it or waits for it.
  Turn(ThreadPool& pool, bool wait) : p_(pool) {
    std::unique_lock<std::mutex> lock(p_.ticket_mutex_);
    if (!wait && p_.next_ticket_ != p_.now_serving_) return;
    const uint64_t mine = p_.next_ticket_++;
    p_.ticket_cv_.wait(lock, [&] { return p_.now_serving_ == mine; });
    held_ = true;
  }
  ~Turn() {
    if (!held_) return;
    {
      std::lock_guard<std::mutex> lock(p_.ticket_mutex_);
      p_.now_serving_++;
    }
    p_.ticket_cv_.notify_all();
  }
  Turn(const Turn&) = delete;
  Turn& operator=(const Turn&) = delete;
  bool held() const { return held_; }

 private:
  ThreadPool& p_;
  bool held_ = false;
};

namespace {
// The job on the timeline (timeline.h), when it records: from its start to its last item.
struct TracedJob {
  int64_t n, t0 = timeline::recording() ? timeline::now() : -1;
  ~TracedJob() {
    if (t0 >= 0) timeline::record(timeline::Kind::Job, 0, t0, timeline::now(), 0, int(n));
  }
};
}  // namespace

void ThreadPool::parallel_for(int64_t n, int64_t chunk, int max_threads, const RangeFn& fn) {
  submit(n, chunk, max_threads, fn, true);
}

bool ThreadPool::try_parallel_for(int64_t n, int64_t chunk, int max_threads, const RangeFn& fn) {
  return submit(n, chunk, max_threads, fn, false);
}

bool ThreadPool::submit(int64_t n, int64_t chunk, int max_threads, const RangeFn& fn, bool wait) {
  if (n <= 0) return true;
  if (n > int64_t(INT32_MAX)) fail(ErrorCode::Internal, "parallel_for: more than 2^31 - 1 items");
  TracedJob traced{n};
  if (chunk < 1) chunk = 1;
  const int limit = threads_for(max_threads);
  if (limit == 1 || n <= chunk) {
    fn(0, n, 0);
    return true;
  }
  Turn turn(*this, wait);
  if (!turn.held()) return false;
  auto job = std::make_shared<Job>();
  job->fn = &fn;
  job->n = n;
  job->chunk = chunk;
  job->limit = limit;
  job->shares.reset(new Job::Share[size_t(limit)]);
  for (int w = 0; w < limit; w++)
    job->shares[size_t(w)].span.store((uint64_t(n * w / limit) << 32) | uint64_t(n * (w + 1) / limit),
                                      std::memory_order_relaxed);
  {
    auto lock = lock_spinning(mutex_);
#ifdef __linux__
    if (pinned_) move_worker_off(sched_getcpu());
#endif
    job_ = job;
    generation_++;
  }
  wake_.notify_all();
  run_chunks(*job, 0);
  spin_until([&] { return job->done.load(std::memory_order_acquire) == n; });
  std::exception_ptr err;
  {
    auto lock = lock_spinning(mutex_);
    done_.wait(lock, [&] { return job->done.load() == n; });
    err = job->error;
    job_.reset();
  }
  if (err) std::rethrow_exception(err);
  return true;
}

}  // namespace fmoe
