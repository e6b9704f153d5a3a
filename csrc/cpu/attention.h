// Grouped-query attention over a paged KV cache, for a batch of tokens from several sequences.
//
// The cache of one layer is a pool of blocks; a block holds `block_tokens` consecutive positions of
// one sequence, for every KV head, K and V apart:
//   k: [num_blocks][kv_heads][head_dim][block_tokens], v: [num_blocks][kv_heads][block_tokens][head_dim],
//   elements of `dtype`. Keys are stored transposed, as the tile kernel reads them: each key is written
//   once, and read again at every later step.
// A sequence owns a list of blocks (its block table): position p lives in block table[p / block_tokens]
// at slot p % block_tokens. Sequences of different lengths share the pool without copying.
//
// Determinism contract: the output of a query row is one fixed computation over its visible keys,
// whatever else is in the batch, however the step's tokens were chunked, and however the work is split
// over threads. Keys are taken in spans of a few of the cache's blocks, at fixed absolute positions
// (blocks [i * span, (i + 1) * span) of a sequence's table). Each span gives a partial softmax (max, sum
// of exponentials, weighted sum of V), computed alone, and the partials are merged from the first span
// to the last. A long decode computes its spans' partials in parallel and merges them afterwards in the
// same order: the same bits as the streaming form.
#pragma once
#include <atomic>
#include <cstdint>

#include "../core/dtype.h"
#include "attention_kernels.h"

namespace fmoe {

// A cache block holds every KV head's part, head after head: a block's heads are one run of memory. (Each
// head's blocks together instead ran attention after 4,000 positions 1.17-1.31 times as fast, and at 16
// short streams 0.81-0.96 times: bench/RESULTS.md, twenty-eighth run; groups of 8 blocks head by head, each
// sequence handed runs of ids, 1.17 and 0.79-0.93 times: twenty-ninth run.)
struct KvCacheView {
  void* k = nullptr;          // [num_blocks][kv_heads][head_dim][block_tokens]
  void* v = nullptr;          // [num_blocks][kv_heads][block_tokens][head_dim]
  int64_t num_blocks = 0;     // blocks in the pool
  int64_t kv_heads = 0;       // KV heads
  int64_t head_dim = 0;       // D
  int64_t block_tokens = 0;   // positions per block
  DType dtype = DType::BF16;  // element type of k and v
};

// Where KV head `head`'s part of cache block `block` starts, in elements of k (and of v).
inline size_t kv_block_offset(const KvCacheView& c, int64_t block, int64_t head) {
  return size_t((block * c.kv_heads + head) * c.block_tokens * c.head_dim);
}

// One sequence's share of a step: `count` new tokens at positions past .. past + count - 1, whose
// rows in the step's q/k/v/out arrays start at `row`.
struct AttentionSeq {
  const int32_t* blocks = nullptr;  // block table, at least ceil((past + count) / block_tokens) entries
  int64_t num_blocks = 0;           // entries in `blocks`
  int64_t past = 0;                 // positions already in the cache before this step
  int64_t count = 0;                // new tokens in this step
  int64_t row = 0;                  // first row of this sequence in the step's arrays
};

struct AttentionParams {
  int64_t heads = 0;   // query heads; a multiple of kv_heads (head h reads KV head h / (heads / kv_heads))
  float scale = 0;     // multiplies q . k, usually 1 / sqrt(head_dim)
  int64_t window = 0;  // sliding window: a query at p sees keys in (p - window, p]; 0: every key <= p
  int threads = 0;     // at most this many pool threads (0: all)
  // Decode-like sequences (at most 4 new tokens) split over their keys: -1 where it pays (attention.cpp),
  // 0 never, 1 always (the tests take both paths; they give the same bits).
  int split_decode = -1;
  // The tile kernel set; nullptr: the one for the process's expert kernels (select_kernels()).
  const AttentionTileKernels* kernels = nullptr;
};

// Whether each span's kernel call asks for the next span's keys and values while it computes
// (attention.cpp). A run-time value only so that a benchmark can compare both settings in one process
// (`bench/ab-model.js`, through binding.bench.setTuning('attentionPrefetch')); nothing else changes it.
std::atomic<int>& attention_prefetch();
// Whether bf16 tiles are read where they lie in the cache (attention.cpp, partials_bf16) rather than
// widened into a scratch first; run-time for the same reason ('attentionInPlace').
std::atomic<int>& attention_in_place();
// Cache blocks the tile kernel takes in one call (attention.cpp, StepGeometry::span), 1 to
// kMaxSpanBlocks, 8 by default; run-time for the same reason ('attentionSpan'). The bits depend on it.
constexpr int kMaxSpanBlocks = 16;
std::atomic<int>& attention_span_blocks();

// Checks a step's sequences against the cache: block ids in range, tables long enough, rows inside
// [0, rows). Throws MoeException(Invalid) naming what is wrong.
void attention_check(const KvCacheView& cache, const AttentionSeq* seqs, int64_t num_seqs, int64_t rows);

// Stores the step's keys and values (k, v: [rows][kv_heads * head_dim] float32) at each sequence's new
// positions, converted to the cache's dtype (round to nearest even).
void kv_cache_write(const KvCacheView& cache, const AttentionSeq* seqs, int64_t num_seqs, const float* k,
                    const float* v);

// out[t][h * D + d] = sum_j softmax_j(scale * q_t,h . K_j) V_j[d] over the keys j the token sees (its
// own position and earlier ones, within the window), for every new token of every sequence. q and out
// are [rows][heads * head_dim]; the step's keys must already be written (kv_cache_write). Runs on the
// shared thread pool.
void attention(const KvCacheView& cache, const AttentionSeq* seqs, int64_t num_seqs, const AttentionParams& p,
               const float* q, float* out);

}  // namespace fmoe
