#include "sampler.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#include "../core/thread_pool.h"
#include "kernels.h"

namespace fmoe {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

inline uint32_t rotl(uint32_t x, int k) { return (x << k) | (x >> (32 - k)); }

// Working memory of the draws on one thread (the JavaScript thread, and the pool's threads for a batch of
// draws: sample_all): a vocabulary of 151,936 needs about 4 MB, which each sampler would otherwise hold.
struct Scratch {
  std::vector<double> x, keys, spare_keys, weights, bucket_mass;
  std::vector<int32_t> order, spare_ids;
  std::vector<uint16_t> bucket;  // each token's nucleus bucket (bucket_of)
};

Scratch& scratch_for(int64_t vocab) {
  thread_local Scratch s;
  if (int64_t(s.x.size()) < vocab) {
    s.x.resize(size_t(vocab));
    s.order.resize(size_t(vocab));
  }
  return s;
}

// Fewer candidates than this are sorted by comparisons (any doubles, negative ones too), more by the
// bits of their probabilities (sort_by_likelihood).
constexpr int64_t kSortedByComparison = 512;

// p[i], NaN read as -inf (float logits read in place; the float64 copies hold -inf already).
template <typename T>
inline T value_at(const T* p, int32_t i) {
  const T v = p[i];
  return v == v ? v : -std::numeric_limits<T>::infinity();
}

// Less likely first; ties: the higher id first, so that the lower id is kept.
template <typename T>
inline bool less_likely(const T* p, int32_t a, int32_t b) {
  const T va = value_at(p, a), vb = value_at(p, b);
  return va < vb || (va == vb && a > b);
}

// Sorts order[0, n) most likely first, ties lower id first, by comparisons: any values, negative too.
template <typename T>
void sort_by_comparison(const T* p, int32_t* order, int64_t n) {
  std::sort(order, order + n, [p](int32_t a, int32_t b) { return less_likely(p, b, a); });
}

// Sorts order[0, n) (ids in ascending order on entry) most likely first, ties lower id first. Many ids
// (a top-k of thousands, a nucleus bucket of a flat distribution) go through a stable radix sort of
// the probabilities' bits (non-negative doubles order as their bit patterns), 8 bits a pass, the lowest
// first, skipping the passes whose digit every key shares.
void sort_by_likelihood(const double* p, int32_t* order, int64_t n, Scratch& sc) {
  if (n < kSortedByComparison) return sort_by_comparison(p, order, n);
  sc.keys.resize(size_t(n));
  sc.spare_keys.resize(size_t(n));
  sc.spare_ids.resize(size_t(n));
  int32_t* ids = order;
  int32_t* spare = sc.spare_ids.data();
  uint64_t* keys = reinterpret_cast<uint64_t*>(sc.keys.data());
  uint64_t* spare_keys = reinterpret_cast<uint64_t*>(sc.spare_keys.data());
  for (int64_t i = 0; i < n; i++) std::memcpy(&keys[i], &p[ids[i]], 8);
  int64_t counts[257];
  for (int pass = 0; pass < 8; pass++) {
    const int shift = 8 * pass;
    std::fill(counts, counts + 257, 0);
    // Bucket 255 - digit: the largest digit first, so the largest probability ends first.
    for (int64_t i = 0; i < n; i++) counts[256 - ((keys[i] >> shift) & 0xff)]++;
    bool trivial = false;
    for (int b = 1; b <= 256; b++) trivial = trivial || counts[b] == n;
    if (trivial) continue;
    for (int b = 1; b <= 256; b++) counts[b] += counts[b - 1];
    for (int64_t i = 0; i < n; i++) {
      const int64_t to = counts[255 - ((keys[i] >> shift) & 0xff)]++;
      spare[to] = ids[i];
      spare_keys[to] = keys[i];
    }
    std::swap(ids, spare);
    std::swap(keys, spare_keys);
  }
  if (ids != order) std::memcpy(order, ids, size_t(n) * sizeof(int32_t));
}

// The k most likely ids into order[0, k), most likely first: a min-heap over one pass of the vocabulary.
// From float logits (NaN as -inf) for k below kSortedByComparison, whose sort is by comparisons.
template <typename T>
int64_t top_k_of(const T* p, int64_t V, int32_t* order, int64_t k, Scratch& sc) {
  int32_t* heap = order;  // order[0, k) holds the heap, the least likely at the root
  auto down = [&](int64_t at) {
    for (;;) {
      const int64_t l = 2 * at + 1;
      if (l >= k) return;
      const int64_t c = l + 1 < k && less_likely(p, heap[l + 1], heap[l]) ? l + 1 : l;
      if (!less_likely(p, heap[c], heap[at])) return;
      std::swap(heap[c], heap[at]);
      at = c;
    }
  };
  for (int64_t i = 0; i < k; i++) heap[i] = int32_t(i);
  for (int64_t i = k / 2 - 1; i >= 0; i--) down(i);
  // Every id in the heap is below i, so an equal value never displaces the root: only a larger one
  // (NaN compares false, as -inf would).
  T root = value_at(p, heap[0]);
  for (int64_t i = k; i < V; i++)
    if (p[i] > root) {
      heap[0] = int32_t(i);
      down(0);
      root = value_at(p, heap[0]);
    }
  std::sort(heap, heap + k);  // ids in ascending order, as sort_by_likelihood takes them
  if constexpr (sizeof(T) == sizeof(double))
    sort_by_likelihood(p, order, k, sc);
  else
    sort_by_comparison(p, order, k);
  return k;
}

double mass_of(const double* p, const int32_t* order, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; i++) m += p[order[i]];
  return m;
}

// A nucleus draw's buckets: each weight (in [0, 1], the most likely token 1) by its exponent and the
// 8 highest bits of its mantissa, which order the buckets as their weights (non-negative doubles order
// as their bits); every weight below 2^-32 shares bucket 0, 0 included. 33 exponents of 256 buckets
// each: a Qwen3 vocabulary at temperature 1 and logits within 0.5 of each other (most of it in a 0.9
// nucleus) puts about 750 tokens in a bucket.
constexpr int kBucketMantissaBits = 8;
constexpr int64_t kTailExponent = 1023 - 32;
constexpr int64_t kBuckets = ((1023 - kTailExponent + 1) << kBucketMantissaBits) + 1;

inline uint16_t bucket_of(double w) {
  uint64_t bits;
  std::memcpy(&bits, &w, sizeof bits);
  const int64_t b = int64_t(bits >> (52 - kBucketMantissaBits)) - (kTailExponent << kBucketMantissaBits) + 1;
  return uint16_t(b < 0 ? 0 : b >= kBuckets ? kBuckets - 1 : b);
}

// The tokens of bucket b with a weight into out, most likely first (ties: lower id first); their count.
int64_t sorted_bucket(const double* p, const uint16_t* bucket, int64_t V, int64_t b, int32_t* out, Scratch& sc) {
  int64_t n = 0;
  for (int64_t i = 0; i < V; i++)
    if (bucket[i] == b && p[i] > 0) out[n++] = int32_t(i);
  sort_by_likelihood(p, out, n, sc);
  return n;
}

}  // namespace

Prng::Prng(double seed) {
  const uint64_t v = uint64_t(seed);
  uint32_t x = uint32_t(v) ^ (uint32_t(v >> 32) * 0x9e3779b9u);
  for (int i = 0; i < 4; i++) {
    x += 0x9e3779b9u;
    uint32_t z = x;
    z = (z ^ (z >> 16)) * 0x85ebca6bu;
    z = (z ^ (z >> 13)) * 0xc2b2ae35u;
    s_[i] = z ^ (z >> 16);
  }
}

double Prng::next() {
  const uint32_t r = rotl(s_[1] * 5u, 7) * 9u;
  const uint32_t t = s_[1] << 9;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 11);
  return double(r) / 4294967296.0;
}

int64_t argmax_logits(const float* x, int64_t n) {
  float top;
  const int64_t best = select_kernels()->first_max_f32(x, n, &top);
  return top == std::numeric_limits<float>::infinity() ? -1 : best;
}

double log_sum_exp(const float* x, int64_t n) {
  if (n <= 0) return -kInf;
  float top_f;
  select_kernels()->first_max_f32(x, n, &top_f);
  const double top = top_f;
  Scratch& sc = scratch_for(n);
  // exp(x - top): 0 for NaN and -inf; with no finite largest value the sum is 0 (or NaN below).
  const double sum = select_kernels()->exp_weights_f32(x, sc.x.data(), n, top, 1.0);
  return top + std::log(sum);
}

int64_t top_ids(const float* x, int64_t n, int64_t k, int32_t* ids) {
  // Kept sorted, largest first: most values fail the first comparison with the smallest kept.
  int64_t m = 0;
  if (k <= 0) return 0;
  for (int64_t i = 0; i < n; i++) {
    const float v = x[i];
    if (!(v >= -std::numeric_limits<float>::infinity()) || (m == k && !(v > x[ids[k - 1]]))) continue;
    int64_t at = m == k ? k - 1 : m;
    while (at > 0 && v > x[ids[at - 1]]) at--;  // after equal values: the lower id stays first
    const int64_t end = m == k ? k - 1 : m;
    for (int64_t j = end; j > at; j--) ids[j] = ids[j - 1];
    ids[at] = int32_t(i);
    if (m < k) m++;
  }
  return m;
}

TokenSampler::TokenSampler(const SamplerParams& p) : p_(p), prng_(p.seed) {}

bool TokenSampler::plain_greedy() const {
  return p_.temperature == 0 && p_.repetition_penalty == 1 && p_.presence_penalty == 0 && p_.frequency_penalty == 0 &&
         p_.bias.empty();
}

void TokenSampler::clear_history() {
  in_history_.clear();
  history_.clear();
}

void TokenSampler::add_history(const int32_t* tokens, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (tokens[i] >= 0 && in_history_.insert(tokens[i]).second) history_.push_back(tokens[i]);
}

void TokenSampler::clear_output() {
  output_count_.clear();
  output_ids_.clear();
}

void TokenSampler::add_output(const int32_t* tokens, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (tokens[i] >= 0 && output_count_[tokens[i]]++ == 0) output_ids_.push_back(tokens[i]);
}

int64_t TokenSampler::sample(const float* logits, int64_t V, const uint8_t* allowed) {
  if (V <= 0) return -1;
  if (!allowed && plain_greedy()) return argmax_logits(logits, V);  // nothing to copy
  Scratch& sc = scratch_for(V);
  double* x = sc.x.data();
  const bool penalised = p_.presence_penalty != 0 || p_.frequency_penalty != 0;
  const bool adjusted = allowed || !p_.bias.empty() || p_.repetition_penalty != 1 || penalised;
  const int64_t top_k = p_.top_k;
  const bool use_k = top_k > 0 && top_k < V;
  const bool few_k = use_k && top_k < kSortedByComparison;
  // The logits in float64 (NaN as -inf: no weight either way) where they change; else the draw reads
  // the floats themselves, a pass over the vocabulary less (Qwen3's 151,936 logits: a draw with a
  // temperature 0.16 ms instead of 0.19-0.24, `node bench/sampling.js`, Zen 5).
  const KernelSet* ks = select_kernels();
  if (adjusted) ks->widen_logits(logits, x, V);
  // A constraint's mask goes first: every filter then works among the tokens it allows.
  if (allowed)
    for (int64_t i = 0; i < V; i++)
      if (!allowed[i]) x[i] = -kInf;
  for (const auto& [t, b] : p_.bias)
    if (t >= 0 && t < V) x[t] += b;
  if (p_.repetition_penalty != 1) {
    const double rp = p_.repetition_penalty;
    for (int32_t t : history_) {
      // An extreme penalty saturates at the largest double rather than overflowing: an infinite logit
      // reads as the model's own overflow. A masked token stays -inf.
      if (t >= V || !std::isfinite(x[t])) continue;
      const double v = x[t] < 0 ? x[t] * rp : x[t] / rp;
      x[t] = std::min(DBL_MAX, std::max(-DBL_MAX, v));
    }
  }
  if (penalised)
    for (int32_t t : output_ids_)
      if (t < V) x[t] -= p_.presence_penalty + p_.frequency_penalty * double(output_count_.at(t));
  double top;
  int64_t best;
  if (adjusted) {
    best = ks->first_max_f64(x, V, &top);
  } else {  // the logits' own largest, read in floats
    float top_f;
    best = ks->first_max_f32(logits, V, &top_f);
    top = top_f;
  }
  if (best < 0 || top == kInf) return -1;
  if (p_.temperature == 0) return best;

  int32_t* order = sc.order.data();
  int64_t n;
  if (few_k) {
    // The top-k candidates by their logits, which order them as their weights do (the exponential
    // increases), then the weights of those k alone, not of the whole vocabulary: the same weights,
    // each computed alike wherever it lies in the array. Qwen3's 151,936 logits with top-k 40: 0.09
    // ms a draw (its logits read in place) instead of 0.25-0.39 (`node bench/sampling.js`, Zen 5).
    n = adjusted ? top_k_of(x, V, order, top_k, sc) : top_k_of(logits, V, order, top_k, sc);
    sc.weights.resize(size_t(n));
    for (int64_t i = 0; i < n; i++) sc.weights[size_t(i)] = adjusted ? x[order[i]] : value_at(logits, order[i]);
    ks->exp_weights(sc.weights.data(), n, top, 1.0 / p_.temperature);
    for (int64_t i = 0; i < n; i++) x[order[i]] = sc.weights[size_t(i)];
  } else {
    // Probabilities relative to the most likely token (which has 1); -inf logits get 0.
    const double total = adjusted ? ks->exp_weights(x, V, top, 1.0 / p_.temperature)
                                  : ks->exp_weights_f32(logits, x, V, top, 1.0 / p_.temperature);
    if (!use_k) return p_.top_p >= 1 ? draw_all(x, V) : draw_nucleus(x, V, total);
    // Top-k of 512 or more: the k most likely, most likely first.
    n = top_k_of(x, V, order, top_k, sc);
  }
  // Top-k's nucleus: top-p of the k's weight.
  if (p_.top_p < 1) {
    const double limit = p_.top_p * mass_of(x, order, n);
    double mass = 0;
    for (int64_t i = 0; i < n; i++)
      if ((mass += x[order[i]]) >= limit) {
        n = i + 1;
        break;
      }
  }
  // min-p keeps tokens at least min_p as likely as the best one, which has 1 here.
  int64_t kept = 0;
  double mass = 0;
  for (int64_t i = 0; i < n; i++) {
    const int32_t id = order[i];
    if (x[id] >= p_.min_p) {
      order[kept++] = id;
      mass += x[id];
    }
  }
  double u = prng_.next() * mass;
  for (int64_t i = 0; i < kept; i++) {
    u -= x[order[i]];
    if (u < 0) return order[i];
  }
  return order[kept - 1];
}

int64_t TokenSampler::draw_all(double* p, int64_t V) {
  // min-p: a token below it weighs nothing.
  if (p_.min_p > 0)
    for (int64_t i = 0; i < V; i++) p[i] = p[i] >= p_.min_p ? p[i] : 0.0;
  // The walk down the vocabulary, in id order, by blocks: each block's sum (four blocks at a time, four
  // independent chains of additions), then the walk inside the block the uniform number falls in.
  constexpr int64_t kBlock = 64;
  const int64_t nb = (V + kBlock - 1) / kBlock;
  Scratch& sc = scratch_for(V);
  sc.keys.resize(size_t(nb));
  double* sums = sc.keys.data();
  int64_t b = 0;
  for (; b + 4 <= nb && (b + 4) * kBlock <= V; b += 4) {
    const double* q = p + b * kBlock;
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t i = 0; i < kBlock; i++) {
      s0 += q[i];
      s1 += q[kBlock + i];
      s2 += q[2 * kBlock + i];
      s3 += q[3 * kBlock + i];
    }
    sums[b] = s0, sums[b + 1] = s1, sums[b + 2] = s2, sums[b + 3] = s3;
  }
  for (; b < nb; b++) {
    double s0 = 0;
    for (int64_t i = b * kBlock; i < std::min(V, (b + 1) * kBlock); i++) s0 += p[i];
    sums[b] = s0;
  }
  double mass = 0;
  for (int64_t j = 0; j < nb; j++) mass += sums[j];
  double u = prng_.next() * mass;
  int64_t last = -1;  // the last token with a weight: where a rounding lets the walk run past its block
  for (int64_t j = 0; j < nb; j++) {
    if (sums[j] <= 0) continue;
    if (u >= sums[j]) {
      u -= sums[j];
      for (int64_t i = std::min(V, (j + 1) * kBlock) - 1; i >= j * kBlock; i--)
        if (p[i] > 0) {
          last = i;
          break;
        }
      continue;
    }
    for (int64_t i = j * kBlock; i < std::min(V, (j + 1) * kBlock); i++) {
      if (p[i] <= 0) continue;
      last = i;
      u -= p[i];
      if (u < 0) return i;
    }
  }
  return last;
}

int64_t TokenSampler::draw_nucleus(double* p, int64_t V, double total) {
  // The nucleus is the shortest run of the most likely tokens (ties: lower id first) whose weight
  // reaches top_p of the total, the draw a walk down that run. Sorting the run took 1.5-2.5 ms for
  // Qwen3's vocabulary when most of it was in the nucleus; instead, one pass weighs buckets of similar
  // weights (bucket_of), and only the buckets where the run ends and where the walk stops are sorted.
  // The buckets' weights are summed in id order, not along the run: a draw can differ from the sorted
  // walk's only where the uniform number falls within rounding (about 1e-15) of a boundary.
  Scratch& sc = scratch_for(V);
  sc.bucket.resize(size_t(V));
  uint16_t* bucket = sc.bucket.data();
  sc.bucket_mass.assign(size_t(kBuckets), 0.0);
  double* mass = sc.bucket_mass.data();
  for (int64_t i = 0; i < V; i++) {
    const uint16_t b = bucket_of(p[i]);
    bucket[i] = b;
    mass[b] += p[i];
  }
  int32_t* order = sc.order.data();
  // The nucleus ends in bucket `last`, whose first last_n sorted tokens (order[0, last_n)) it keeps;
  // every bucket above is whole. A bucket whose sorted sum falls short of where its id-order sum
  // reached the limit (rounding) is whole, and the search goes on below it.
  const double limit = p_.top_p * total;
  double run = 0;
  int64_t last = -1, last_members = 0, last_n = 0;
  for (int64_t b = kBuckets - 1; b >= 0 && last < 0; b--) {
    if (mass[b] == 0) continue;
    if (run + mass[b] < limit) {
      run += mass[b];
      continue;
    }
    last_members = sorted_bucket(p, bucket, V, b, order, sc);
    for (int64_t j = 0; j < last_members; j++)
      if ((run += p[order[j]]) >= limit) {
        last = b;
        last_n = j + 1;
        break;
      }
  }
  if (last < 0) {                             // the limit not reached (rounding): every token with a weight
    for (last = 0; mass[last] == 0;) last++;  // the most likely token has weight 1: a bucket has mass
    last_n = last_members = sorted_bucket(p, bucket, V, last, order, sc);
  }
  // min-p keeps tokens at least min_p as likely as the best one (which has 1): a bucket above min-p's
  // is whole, one below it is out, and in min-p's own the kept tokens are a prefix of its order.
  if (p_.min_p > 0) {
    const int64_t b_min = bucket_of(p_.min_p);
    if (b_min > last) {
      last = b_min;
      last_n = last_members = sorted_bucket(p, bucket, V, b_min, order, sc);
    }
    if (b_min == last)
      while (last_n > 0 && !(p[order[last_n - 1]] >= p_.min_p)) last_n--;
  }
  double kept = 0;
  for (int64_t b = kBuckets - 1; b > last; b--) kept += mass[b];
  for (int64_t j = 0; j < last_n; j++) kept += p[order[j]];
  // The walk: whole buckets by their weights, then down the sorted tokens of the bucket it stops in.
  double u = prng_.next() * kept;
  int32_t* drawn = order + last_members;  // room for another bucket's tokens (buckets are disjoint)
  int64_t least = -1;                     // the least likely kept token walked past: where rounding runs out
  for (int64_t b = kBuckets - 1; b > last; b--) {
    if (mass[b] == 0) continue;
    if (u >= mass[b]) {
      u -= mass[b];
      continue;
    }
    const int64_t n = sorted_bucket(p, bucket, V, b, drawn, sc);
    for (int64_t j = 0; j < n; j++)
      if ((u -= p[drawn[j]]) < 0) return drawn[j];
    least = drawn[n - 1];  // rounding ran past this bucket's tokens: on to the next one
  }
  for (int64_t j = 0; j < last_n; j++)
    if ((u -= p[order[j]]) < 0) return order[j];
  if (last_n > 0) return order[last_n - 1];
  if (least >= 0) return least;
  // Rounding ran past every bucket without a sort (min-p kept none of the last): the least likely
  // token of the lowest whole bucket.
  int64_t b = last + 1;
  while (mass[b] == 0) b++;
  return drawn[sorted_bucket(p, bucket, V, b, drawn, sc) - 1];
}

std::atomic<int>& spread_draws() {
  static std::atomic<int> on{1};
  return on;
}

void sample_all(BatchDraw* draws, int64_t n) {
  const auto draw = [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; i++) {
      BatchDraw& d = draws[i];
      try {
        d.token = d.sampler->sample(d.logits, d.vocab, d.allowed);
      } catch (...) {
        d.token = -1;
        d.error = std::current_exception();
      }
    }
  };
  // The logits the draws read, four passes for each draw that does more than an argmax (in float64
  // after the first): below about a million (two Qwen3 draws, eight Mixtral ones) waking the pool costs
  // about what it saves. Greedy draws do not count: 16 greedy Qwen3 streams spread over the pool ran no
  // faster (a step 0.984, `node bench/sampled-generation.js qwen3moe int4 16 32 4`, Zen 5, 2 cores).
  int64_t work = 0;
  for (int64_t i = 0; i < n; i++)
    if (draws[i].allowed || !draws[i].sampler->plain_greedy()) work += 4 * draws[i].vocab;
  if (work >= (int64_t(1) << 20) && spread_draws().load(std::memory_order_relaxed) &&
      ThreadPool::instance().try_parallel_for(n, 1, 0, draw))
    return;
  draw(0, n, 0);
}

}  // namespace fmoe
