// Drawing the next token from a row of logits: greedy, or temperature with top-k, top-p and min-p,
// after a JSON mode's mask, a logit bias, the repetition penalty and the presence and frequency
// penalties (lib/generate/sampling.ts checks the parameters and documents them; this is its math).
//
// Every running generation draws once per step on the JavaScript thread, so a step of 16 streams waits
// for 16 draws: in JavaScript a draw at temperature 1 over Qwen3's 151,936 logits took 2.4 ms and one
// with top-p 11 ms (`node bench/sampling.js`), as long as the step itself.
//
// Deterministic: the same seed, logits and tokens give the same draw on every run of one build and
// kernel set, whatever else runs (the PRNG is the generation's own). The distribution is the
// definitions', computed in float64; the exponentials are the kernel set's (KernelSet::exp_weights, about
// one ulp) and a top-p nucleus is weighed by buckets (draw_nucleus), so a draw may differ from a float64
// reference only where the uniform number or the nucleus's limit falls within about 1e-15 of a boundary.
#pragma once
#include <atomic>
#include <cstdint>
#include <exception>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace fmoe {

struct SamplerParams {
  double temperature = 1;         // 0: greedy
  int64_t top_k = 0;              // 0: off
  double top_p = 1;               // in (0, 1]; 1: off
  double min_p = 0;               // in [0, 1]
  double repetition_penalty = 1;  // > 0
  double presence_penalty = 0;
  double frequency_penalty = 0;
  double seed = 0;                               // a non-negative integer below 2^53
  std::vector<std::pair<int64_t, double>> bias;  // token id -> added to its logit (ids may be >= vocab)
};

// xoshiro128** seeded through splitmix32 from a seed of up to 53 bits: small, fast, and the same
// stream on every platform.
class Prng {
 public:
  explicit Prng(double seed);
  // A uniform number in [0, 1), a multiple of 2^-32.
  double next();

 private:
  uint32_t s_[4];
};

// The first index of the largest of x[0, n) (NaN is never the largest), or -1 when no value is above
// -infinity or the largest is +infinity (no token can come from such a row).
int64_t argmax_logits(const float* x, int64_t n);

// log(sum over i of exp(x[i])) in float64 for the logits x[0, n), NaN counted as -infinity: the
// log-softmax's normaliser, for log probabilities (lib/generate/logprobs.ts).
double log_sum_exp(const float* x, int64_t n);

// The k largest of x[0, n) into ids, largest first, the lower id first among equals; NaN never listed.
// Returns how many were written (fewer than k when fewer values are not NaN).
int64_t top_ids(const float* x, int64_t n, int64_t k, int32_t* ids);

class TokenSampler {
 public:
  explicit TokenSampler(const SamplerParams& p);

  // The tokens the repetition penalty sees (the prompt and the output so far) and those the presence
  // and frequency penalties count (the output): each grows by appending; clear_*() starts it over.
  // Ids outside the vocabulary of a draw are left out of it.
  void clear_history();
  void add_history(const int32_t* tokens, int64_t n);
  void clear_output();
  void add_output(const int32_t* tokens, int64_t n);

  // The next token from logits[0, vocab); where `allowed` (vocab bytes) is given, only tokens where it
  // is not 0. -1 when no token can be drawn (no finite largest logit).
  int64_t sample(const float* logits, int64_t vocab, const uint8_t* allowed);

  // Whether a draw is the plain argmax of the logits (greedy, nothing that changes them).
  bool plain_greedy() const;

 private:
  // A draw among the whole vocabulary (no top-k or top-p) from the weights p[0, V), min-p applied.
  int64_t draw_all(double* p, int64_t V);
  // A draw among the top-p nucleus (no top-k) of the weights p[0, V) that sum to total, min-p applied.
  int64_t draw_nucleus(double* p, int64_t V, double total);

  SamplerParams p_;
  Prng prng_;
  // Sets, not tables by id: an id may be anything up to 2^31 - 1 (those past a draw's vocabulary are
  // left out of it), and a table would grow to the largest.
  std::vector<int32_t> history_;  // distinct ids, first seen first
  std::unordered_set<int32_t> in_history_;
  std::vector<int32_t> output_ids_;  // distinct ids of the output, first seen first
  std::unordered_map<int32_t, int64_t> output_count_;
};

// One draw of a batch (sample_all): the sampler, its row of logits and mask, and the result.
struct BatchDraw {
  TokenSampler* sampler = nullptr;
  const float* logits = nullptr;
  int64_t vocab = 0;
  const uint8_t* allowed = nullptr;  // or null
  int64_t token = -1;                // sample()'s result
  std::exception_ptr error;          // what the draw threw, if it did (token -1 then)
};

// Each draw of draws[0, n), on the shared pool's threads when it is free (ThreadPool::try_parallel_for)
// and the draws have enough to read, else one after the other on the calling thread. The samplers must be distinct:
// each draw touches only its own sampler (its PRNG, its history) and its thread's working memory, so a draw is the same
// wherever it runs.
void sample_all(BatchDraw* draws, int64_t n);
// Whether sample_all may spread its draws over the pool (1, the default). Run-time only so that a
// benchmark can compare both ways in one process (`bench/sampled-generation.js`, through
// binding.bench.setTuning('spreadDraws')); nothing else changes it.
std::atomic<int>& spread_draws();

}  // namespace fmoe
