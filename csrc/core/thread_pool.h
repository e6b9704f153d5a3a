// A small persistent thread pool shared by every layer in the process.
//
// One job runs at a time, so two layers forwarding at once never oversubscribe the cores. Jobs wait
// in arrival order (a ticket queue), so a small request is never starved by a long prefill that
// keeps submitting phases: it waits for at most the phase running now. A job is a range of items handed out in dynamic
// chunks, so an expert with many tokens does not leave a core idle. Each thread starts on a contiguous
// share of the range and takes its chunks front to back, so consecutive claims read consecutive weights
// (the kernels prefetch past the end of a tile into the next one); a thread whose share is done takes
// chunks from the back of the largest share left. Against chunks handed out in turn (which gave one
// thread every other tile), with that prefetch: decode of one MoE layer 0.91 (qwen3-decode-int4), 0.92
// (int8), 0.95 (bf16, and mixtral-decode-int4), 0.94 (dsv2lite-decode-bf16), prefill 0.96-1.02
// (`bench/ab-builds.js`, Zen 5, 2 cores, time ratios).
//
// Between jobs the threads spin for a short while (FUSED_MOE_SPIN_US, default 100 µs) before they sleep:
// a decode step runs a few dozen phases back to back, many of them tens of microseconds long, and
// waking a sleeping thread through the kernel costs about that much on a virtual machine.
//
// When the pool has no more threads than the process has cores (the default), each worker is pinned to a
// core of its own (FUSED_MOE_PIN_THREADS=0 turns it off); the thread that submits a job is not pinned,
// and a worker that finds it on its core moves to the core no worker holds.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace fmoe {

class ThreadPool {
 public:
  using RangeFn = std::function<void(int64_t begin, int64_t end, int worker)>;

  // The process-wide pool; its size is the count of physical cores the process may run on (or
  // FUSED_MOE_THREADS).
  static ThreadPool& instance();
  static int default_threads();
  // FUSED_MOE_PIN_THREADS is not "0": pin the workers when the pool fits the cores the process may use.
  static bool pin_requested();

  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()) + 1; }

  // How long a thread spins for the next job (a worker) or for the last items of its job (the caller)
  // before it sleeps: FUSED_MOE_SPIN_US microseconds, 0 to 10000 (default 100; 0 never spins).
  static int spin_us();
  static constexpr int kDefaultSpinUs = 100;
  // The value spin_us() reads; bench/ab-model.js flips it (binding.bench.setTuning('spinUs')).
  static std::atomic<int>& spin_setting();

  // Whether each worker is pinned to a core of its own (ThreadPool(), FUSED_MOE_PIN_THREADS).
  bool pinned() const { return pinned_; }

  // The threads a job for at most max_threads threads (0: all) runs on, and splits its items among.
  int threads_for(int max_threads) const { return max_threads > 0 && max_threads < size() ? max_threads : size(); }

  // A chunk size for n items on at most max_threads threads (0: all): two chunks a thread, kept within
  // [least, most]. With n <= least, parallel_for runs them all on the caller.
  int64_t chunk_for(int64_t n, int max_threads, int64_t least, int64_t most = INT64_MAX) const {
    const int64_t t = threads_for(max_threads);
    const int64_t even = (n + 2 * t - 1) / (2 * t);
    return even < least ? least : even > most ? most : even;
  }

  // Runs fn over [0, n) in chunks of `chunk` items on at most max_threads threads (0: all), the caller
  // included. Returns when every item is done. Exceptions from fn are rethrown here (the first one).
  void parallel_for(int64_t n, int64_t chunk, int max_threads, const RangeFn& fn);
  // The same when no other job is running or waiting for the pool; when one is, returns false at once
  // without running fn, so that a thread that must not wait for a job of another layer (the JavaScript
  // thread) does the work itself instead.
  bool try_parallel_for(int64_t n, int64_t chunk, int max_threads, const RangeFn& fn);

 private:
  // One parallel_for call. Workers hold it by shared_ptr, so a worker that wakes late only ever sees
  // its own (finished) job, and the caller waits for every item to be done, not for workers to leave.
  struct Job {
    const RangeFn* fn = nullptr;
    int64_t n = 0, chunk = 1;
    int limit = 0;
    // Per thread: the items of its share not yet claimed, [front, back) packed as (front << 32) | back.
    struct alignas(64) Share {
      std::atomic<uint64_t> span{0};
    };
    std::unique_ptr<Share[]> shares;
    std::atomic<int64_t> done{0};  // items finished (or skipped after an error), added once a thread
    std::atomic<bool> failed{false};
    std::exception_ptr error;  // the first exception, under mutex_
  };

  // Holds the pool for one job: takes a ticket (the next one in line, or only when the pool is free) and
  // passes the turn on when destroyed.
  class Turn;
  // parallel_for (wait: for the pool's turn) and try_parallel_for (else: only when it is free).
  bool submit(int64_t n, int64_t chunk, int max_threads, const RangeFn& fn, bool wait);
  // Pins thread `tid` (0: the calling thread) to `cpu`; false where that failed.
  static bool pin_to(int cpu, int tid = 0);
  void move_worker_off(int caller_cpu);
  void worker_loop(int index);
  void run_chunks(Job& job, int worker);
  static bool claim(Job& job, int worker, int64_t& begin, int64_t& end);

  std::vector<std::thread> workers_;
  // FIFO admission of jobs: take a ticket, run when now_serving_ reaches it.
  std::mutex ticket_mutex_;
  std::condition_variable ticket_cv_;
  uint64_t next_ticket_ = 0, now_serving_ = 0;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::atomic<uint64_t> generation_{0};  // changed under mutex_; read without it while spinning
  bool stop_ = false;
  std::shared_ptr<Job> job_;  // the current job, under mutex_
  bool pinned_ = false;
  // Pinned pools: the core of each thread's place (index 0: the caller's, held by no worker), under
  // mutex_. A worker whose core the caller is on trades places with index 0 (move_worker_off).
  std::vector<int> home_;
  // Each worker's kernel thread id (index 0 unused), 0 until the worker has started.
  std::unique_ptr<std::atomic<int>[]> tids_;
};

}  // namespace fmoe
