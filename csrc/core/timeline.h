// A timeline of the pool's work, for profiling (`bench/timeline.js`): while recording, each thread
// appends what it did to a buffer of its own: the jobs a caller ran on the pool, the items of the
// weight-streaming jobs (which thread, how long, how many weight bytes, how many rows), and a decode
// step's phases. Off, it costs a relaxed load per job and per step phase. bench/RESULTS.md,
// thirty-second run, is what it was made for: how much of a short job each thread is busy, how fast
// its items stream, the time between jobs.
#pragma once
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace fmoe {
namespace timeline {

enum class Kind : int32_t {
  Job = 0,    // a parallel_for call, on its caller: tag = its item count
  Item = 1,   // a column tile of a dense projection or of an expert: bytes = its weight bytes, tag = rows;
              // or a range of the router's rows at decode: tag = 0
  Phase = 2,  // a part of a decode step (decoder.h StepPhase): tag = the phase
};

struct Event {
  int64_t t0 = 0, t1 = 0;  // steady clock, nanoseconds
  int64_t bytes = 0;
  int32_t kind = 0;
  int32_t thread = 0;  // the pool thread that did it (0: the caller of the job)
  int32_t tag = 0;
};

// Whether events are being recorded.
bool recording();

inline int64_t now() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Appends an event to the calling thread's buffer while recording (dropped past the capacity start() gave).
void record(Kind kind, int thread, int64_t t0, int64_t t1, int64_t bytes, int tag);

// Clears every buffer and starts recording, at most `capacity` events a thread.
void start(size_t capacity);

// Stops recording; every thread's events, in order of their start, and how many were dropped.
std::vector<Event> stop(size_t* dropped);

}  // namespace timeline
}  // namespace fmoe
