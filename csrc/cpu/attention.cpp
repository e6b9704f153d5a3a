#include "attention.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "../core/error.h"
#include "../core/thread_pool.h"

namespace fmoe {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Query tokens per prefill work item: with G query heads per KV head, 64 * G rows share each K/V tile
// (its loads, and its widening where it is widened).
constexpr int64_t kQueryTokensPerItem = 64;
// A sequence with at most this many new tokens (a decode step) is split over its keys instead.
constexpr int64_t kSplitMaxTokens = 4;

// Stores n floats, src[i * src_stride], as elements [offset, offset + n) of the cache (its dtype).
void store_elems(void* base, DType dt, size_t offset, int64_t n, const float* src, int64_t src_stride) {
  switch (dt) {
    case DType::F32: {
      float* d = static_cast<float*>(base) + offset;
      for (int64_t i = 0; i < n; i++) d[i] = src[i * src_stride];
      return;
    }
    case DType::BF16: {
      uint16_t* d = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16(src[i * src_stride]);
      return;
    }
    case DType::F16: {
      uint16_t* d = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; i++) d[i] = f32_to_f16(src[i * src_stride]);
      return;
    }
  }
}

int64_t round_up(int64_t n, int64_t w) { return (n + w - 1) / w * w; }

// Per-thread scratch of one work item, kept across calls and only grown: its query rows gathered, one
// span's keys (transposed) and values widened to float and padded for the tile kernel, block by block
// (or where the bf16 blocks lie in the cache), the span's scores and partials of every row, and the
// rows' running state (m, l, acc).
struct TileScratch {
  int64_t ldk = 0, ldv = 0, lds = 0;
  std::array<const float*, kMaxSpanBlocks> kf{}, vf{};     // the span's blocks, widened
  std::array<const uint16_t*, kMaxSpanBlocks> kb{}, vb{};  // or in the cache (StepGeometry::in_place)
  std::array<const char*, 2 * kMaxSpanBlocks> ahead{};     // the next span's blocks (fetch_ahead)
  std::vector<float> q, kt, v, s, m, l, acc, run_m, run_l, run_acc;
  std::vector<int32_t> lo, hi;
  void prepare(const AttentionTileKernels& kern, int64_t block_tokens, int64_t span, int64_t D, int64_t rows) {
    ldk = round_up(block_tokens, kern.width);
    ldv = round_up(D, kern.width);
    lds = span * ldk;
    auto grow = [](auto& buf, int64_t n) {
      if (buf.size() < size_t(n)) buf.resize(size_t(n));
    };
    grow(q, rows * D);
    grow(kt, span * D * ldk);
    if (ldv > D)
      v.assign(size_t(span * block_tokens * ldv), 0.0f);  // the padding past D must be zero
    else
      grow(v, span * block_tokens * ldv);
    grow(s, rows * lds);
    grow(m, rows);
    grow(l, rows);
    grow(acc, rows * ldv);
    grow(run_m, rows);
    grow(run_l, rows);
    grow(run_acc, rows * ldv);
    grow(lo, rows);
    grow(hi, rows);
  }
};

struct StepGeometry {
  const KvCacheView* cache;
  const AttentionParams* p;
  const AttentionTileKernels* kern;
  int64_t G;  // query heads per KV head
  int64_t D;
  int64_t Bt;
  // bf16 tiles whose rows are whole vectors (block_tokens and head_dim multiples of the width) are read
  // in the cache by partials_bf16; others are widened into the scratch first. Same bits either way
  // (test_attention.cpp). The widening copy stored and loaded every key and value once more: in place,
  // the attention part of a step took 0.88-0.93 of its time at 16 to 1,216 positions (`node
  // bench/ab-model.js qwen3moe int4 attentionInPlace 0 1 300 --part attention`, both orders) and
  // 0.83-0.86 with 16 streams (`mixtral int4 attentionInPlace 0 1 40 16`).
  bool in_place;
  // Cache blocks per span: the tile kernel takes a span's keys in one call, with one softmax and one
  // merge, where the blocks' keys are whole vectors (block_tokens a multiple of the width); else 1.
  // Per block, the merge (two exponentials, a pass over the row's values) and the softmax's bookkeeping
  // cost as much as a third of the products. `node bench/ab-model.js qwen3moe int4 attentionSpan`
  // (paired, 2 Zen 5 cores), the attention part of a decode step after a 4,000-token prefix: 2 blocks
  // 1.12x the time of 4, 8 blocks 0.94-0.95x, 16 blocks 0.97-0.98x of 8; 8 blocks against 1: 0.80 at
  // 16 to 1,216 positions, 0.94 with 16 streams; the attention of a 512- or 2,048-token prompt
  // (`--prompt 512`, `--prompt 2048`): 0.69x, 0.63x.
  int64_t span;
};

// The blocks [first, last] of span `sp` that a call sees: those of [sp * span, sp * span + span) within
// [b_first, b_last]. A row's keys lie in the same spans whichever call computes it, and within a span
// the kernel gives a row the same bits whichever of its blocks before the row's first key are included.
struct SpanBlocks {
  int64_t first, last;
};
SpanBlocks span_blocks(const StepGeometry& g, int64_t sp, int64_t b_first, int64_t b_last) {
  return {std::max(sp * g.span, b_first), std::min(sp * g.span + g.span - 1, b_last)};
}

// The first position a query at `pos` sees.
int64_t first_visible(int64_t pos, int64_t window) { return window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0; }

// Where block `b` of a sequence's table holds KV head j's keys and values in the cache.
struct TileInCache {
  const char *k, *v;
};
TileInCache tile_in_cache(const StepGeometry& g, const AttentionSeq& s, int64_t b, int64_t j) {
  const size_t at = kv_block_offset(*g.cache, s.blocks[b], j) * dtype_size(g.cache->dtype);
  return {static_cast<const char*>(g.cache->k) + at, static_cast<const char*>(g.cache->v) + at};
}

// Widens blocks [f, e] of a sequence's table, KV head j, into the scratch (the keys are already
// transposed in the cache, so each of their D rows is a run of contiguous elements), or notes where
// they lie for partials_bf16. `end`: the positions written so far (the last block may be partial).
void load_span(const StepGeometry& g, const AttentionSeq& s, SpanBlocks sb, int64_t j, int64_t end, TileScratch& t) {
  const int64_t D = g.D;
  const DType dt = g.cache->dtype;
  const size_t es = dtype_size(dt);
  for (int64_t i = 0; i <= sb.last - sb.first; i++) {
    const int64_t b = sb.first + i;
    const auto [k, v] = tile_in_cache(g, s, b, j);
    if (g.in_place) {
      t.kb[size_t(i)] = reinterpret_cast<const uint16_t*>(k);
      t.vb[size_t(i)] = reinterpret_cast<const uint16_t*>(v);
      continue;
    }
    const int64_t n = std::min(g.Bt, end - b * g.Bt);
    float* kt = t.kt.data() + i * D * t.ldk;
    float* vt = t.v.data() + i * g.Bt * t.ldv;
    t.kf[size_t(i)] = kt;
    t.vf[size_t(i)] = vt;
    // Rows as long as the scratch's (a full block of a width-multiple size, a width-multiple D) are one run.
    if (n == g.Bt && t.ldk == g.Bt)
      g.kern->widen(k, dt, D * n, kt);
    else
      for (int64_t d = 0; d < D; d++) g.kern->widen(k + size_t(d * g.Bt) * es, dt, n, kt + d * t.ldk);
    if (t.ldv == D)
      g.kern->widen(v, dt, n * D, vt);
    else
      for (int64_t r = 0; r < n; r++) g.kern->widen(v + size_t(r * D) * es, dt, D, vt + r * t.ldv);
  }
}

// The next span's keys and values (blocks [f, e] of KV head j), for the kernel to fetch while it
// computes this one. The blocks of one sequence and head are 4 KiB runs far apart (the pool interleaves
// heads and sequences), where the hardware prefetchers start afresh at every block. With spans of one
// block, fetching the next block ahead took 0.88 of the attention time and further ahead or into L2
// only gained nothing more (`bench/ab-model.js qwen3moe int4 attentionPrefetch 0 1 300 --part
// attention`, 16 to 1,216 positions). A span's worth asked for at once, before the kernel, stalled the
// loads behind it (the prefetch loop stood out in a profile of a decode after 4,000 positions, and the
// attention took 0.94 of its time without fetching ahead); spread over the scores' loop, 0.75;
// over the whole call (scores and weighted values), 0.64-0.65 (`node bench/ab-model.js qwen3moe int4
// attentionPrefetch 0 1 40 --part attention --prefix 4000`, both orders), 0.80 at 16 to 1,216
// positions, 1.00 with 16 streams (`mixtral int4 attentionPrefetch 0 1 40 16`).
FetchAhead fetch_ahead(const StepGeometry& g, const AttentionSeq& s, SpanBlocks sb, int64_t j, TileScratch& t) {
  if (!attention_prefetch().load(std::memory_order_relaxed)) return {};
  int64_t n = 0;
  for (int64_t b = sb.first; b <= sb.last; b++) {
    const auto [k, v] = tile_in_cache(g, s, b, j);
    t.ahead[size_t(n++)] = k;
    t.ahead[size_t(n++)] = v;
  }
  return {t.ahead.data(), n, g.Bt * g.D * int64_t(dtype_size(g.cache->dtype))};
}

// Gathers the query rows of new tokens [t0, t1) of sequence s for KV head j: row (i - t0) * G + r is
// head j * G + r of token i.
void gather_queries(const StepGeometry& g, const AttentionSeq& s, int64_t j, int64_t t0, int64_t t1, const float* q,
                    TileScratch& t) {
  const int64_t D = g.D, G = g.G, H = g.p->heads;
  for (int64_t i = t0; i < t1; i++)
    std::memcpy(t.q.data() + (i - t0) * G * D, q + (s.row + i) * H * D + j * G * D, size_t(G * D) * sizeof(float));
}

// The span partials of the gathered rows (tokens [t0, t1)) over blocks [f, e] (positions f * Bt on,
// `end` of them written so far), each row over the keys it sees; rows [r0, r1) are the ones that see any.
void span_partials(const StepGeometry& g, const AttentionSeq& s, int64_t t0, int64_t t1, SpanBlocks sb, int64_t end,
                   const FetchAhead& ahead, TileScratch& t, int64_t& r0, int64_t& r1) {
  const int64_t G = g.G, R = (t1 - t0) * G;
  const int64_t span_pos = sb.first * g.Bt;
  const int64_t n = std::min(end, (sb.last + 1) * g.Bt) - span_pos;  // keys written in the span
  r0 = R;
  r1 = 0;
  for (int64_t i = t0; i < t1; i++) {
    const int64_t pos = s.past + i;
    const int64_t lo = std::max<int64_t>(first_visible(pos, g.p->window) - span_pos, 0);
    const int64_t hi = std::min<int64_t>(pos - span_pos + 1, n);  // keys [lo, hi) are visible
    for (int64_t r = (i - t0) * G; r < (i - t0 + 1) * G; r++) {
      t.lo[size_t(r)] = int32_t(lo);
      t.hi[size_t(r)] = int32_t(hi);
      if (lo < hi) {
        r0 = std::min(r0, r);
        r1 = r + 1;
      }
    }
  }
  if (r0 >= r1) return;
  if (g.in_place)
    g.kern->partials_bf16(t.q.data() + r0 * g.D, g.D, r1 - r0, g.D, g.p->scale, t.kb.data(), t.vb.data(), g.Bt, g.D,
                          t.lo.data() + r0, t.hi.data() + r0, t.s.data() + r0 * t.lds, t.lds, t.m.data() + r0,
                          t.l.data() + r0, t.acc.data() + r0 * t.ldv, t.ldv, ahead);
  else
    g.kern->partials(t.q.data() + r0 * g.D, g.D, r1 - r0, g.D, g.p->scale, t.kf.data(), t.vf.data(), t.ldk, t.ldv,
                     t.lo.data() + r0, t.hi.data() + r0, t.s.data() + r0 * t.lds, t.lds, t.m.data() + r0,
                     t.l.data() + r0, t.acc.data() + r0 * t.ldv, t.ldv, ahead);
}

// Rows [t0, t1) of sequence s (all G heads of KV head j), every visible span streamed and merged in
// order; writes the normalised output.
void attend_streaming(const StepGeometry& g, const AttentionSeq& s, int64_t j, int64_t t0, int64_t t1, const float* q,
                      float* out, TileScratch& t) {
  const int64_t D = g.D, G = g.G, H = g.p->heads, ldv = t.ldv;
  const int64_t rows = (t1 - t0) * G;
  float *m = t.run_m.data(), *l = t.run_l.data(), *acc = t.run_acc.data();
  std::fill(m, m + rows, kNegInf);
  std::fill(l, l + rows, 0.0f);
  std::fill(acc, acc + rows * ldv, 0.0f);
  gather_queries(g, s, j, t0, t1, q, t);
  const int64_t pos_first = s.past + t0, pos_last = s.past + t1 - 1;
  const int64_t b_first = first_visible(pos_first, g.p->window) / g.Bt, b_last = pos_last / g.Bt;
  const int64_t end = s.past + s.count;  // positions written so far
  for (int64_t sp = b_first / g.span; sp <= b_last / g.span; sp++) {
    const SpanBlocks sb = span_blocks(g, sp, b_first, b_last);
    load_span(g, s, sb, j, end, t);
    const FetchAhead ahead =
        sb.last < b_last ? fetch_ahead(g, s, span_blocks(g, sp + 1, b_first, b_last), j, t) : FetchAhead{};
    int64_t r0, r1;
    span_partials(g, s, t0, t1, sb, end, ahead, t, r0, r1);
    for (int64_t row = r0; row < r1; row++)
      g.kern->merge(m + row, l + row, acc + row * ldv, t.m[size_t(row)], t.l[size_t(row)], t.acc.data() + row * ldv,
                    ldv);
  }
  for (int64_t i = t0; i < t1; i++)
    for (int64_t r = 0; r < G; r++) {
      const int64_t row = (i - t0) * G + r;
      float* o = out + (s.row + i) * H * D + (j * G + r) * D;
      const float inv = 1.0f / l[row];
      for (int64_t d = 0; d < D; d++) o[d] = acc[row * ldv + d] * inv;
    }
}

struct Item {
  int64_t seq, head;     // sequence, KV head
  int64_t t0, t1;        // new tokens [t0, t1) of the sequence
  int64_t p0, p1;        // split items: spans [p0, p1) of the table; streaming items: unused
  int64_t partial_base;  // split items: index of span p0's partials in the step's store, -1 otherwise
};

}  // namespace

std::atomic<int>& attention_prefetch() {
  static std::atomic<int> on{1};
  return on;
}

std::atomic<int>& attention_in_place() {
  static std::atomic<int> on{1};
  return on;
}

std::atomic<int>& attention_span_blocks() {
  static std::atomic<int> blocks{8};
  return blocks;
}

const AttentionTileKernels* attention_kernels_for(Isa isa) {
  const AttentionTileKernels* k = nullptr;
  if (isa == Isa::Avx512 || isa == Isa::Avx512Bf16) k = attention_kernels_avx512();
  if (!k && (isa == Isa::Avx512 || isa == Isa::Avx512Bf16 || isa == Isa::Avx2)) k = attention_kernels_avx2();
  if (isa == Isa::Neon) k = attention_kernels_neon();
  return k ? k : attention_kernels_scalar();
}

void attention_check(const KvCacheView& c, const AttentionSeq* seqs, int64_t num_seqs, int64_t rows) {
  if (c.kv_heads <= 0 || c.head_dim <= 0 || c.block_tokens <= 0 || c.num_blocks < 0 || (!c.k && c.num_blocks) ||
      (!c.v && c.num_blocks))
    fail(ErrorCode::Invalid, "KV cache: kv_heads, head_dim and block_tokens must be positive");
  for (int64_t i = 0; i < num_seqs; i++) {
    const AttentionSeq& s = seqs[i];
    const std::string who = "sequence " + std::to_string(i);
    if (s.past < 0 || s.count < 0 || s.row < 0 || s.row + s.count > rows)
      fail(ErrorCode::Invalid, who + ": past, count and row must be >= 0 with row + count <= " + std::to_string(rows));
    const int64_t need = (s.past + s.count + c.block_tokens - 1) / c.block_tokens;
    if (s.num_blocks < need || (need > 0 && !s.blocks))
      fail(ErrorCode::Invalid, who + ": needs " + std::to_string(need) + " blocks for " +
                                   std::to_string(s.past + s.count) + " positions, has " +
                                   std::to_string(s.num_blocks));
    for (int64_t b = 0; b < need; b++)
      if (s.blocks[b] < 0 || s.blocks[b] >= c.num_blocks)
        fail(ErrorCode::Invalid, who + ": block " + std::to_string(s.blocks[b]) + " is outside the cache's " +
                                     std::to_string(c.num_blocks) + " blocks");
  }
}

void kv_cache_write(const KvCacheView& c, const AttentionSeq* seqs, int64_t num_seqs, const float* k, const float* v) {
  const int64_t KV = c.kv_heads, D = c.head_dim, Bt = c.block_tokens;
  for (int64_t i = 0; i < num_seqs; i++) {
    const AttentionSeq& s = seqs[i];
    // Runs of the new tokens that fall in one block: a key row of the block ([head_dim][block_tokens])
    // takes the run's values of one d in one pass.
    for (int64_t t0 = 0; t0 < s.count;) {
      const int64_t pos = s.past + t0;
      const int64_t block = s.blocks[pos / Bt], slot = pos % Bt;
      const int64_t run = std::min(s.count - t0, Bt - slot);
      for (int64_t j = 0; j < KV; j++) {
        const size_t head = kv_block_offset(c, block, j);  // the block's part for KV head j
        const int64_t src = (s.row + t0) * KV * D + j * D;
        for (int64_t d = 0; d < D; d++)
          store_elems(c.k, c.dtype, head + size_t(d * Bt + slot), run, k + src + d, KV * D);
        for (int64_t t = 0; t < run; t++)
          store_elems(c.v, c.dtype, head + size_t((slot + t) * D), D, v + src + t * KV * D, 1);
      }
      t0 += run;
    }
  }
}

void attention(const KvCacheView& c, const AttentionSeq* seqs, int64_t num_seqs, const AttentionParams& p,
               const float* q, float* out) {
  if (p.heads <= 0 || p.heads % c.kv_heads != 0)
    fail(ErrorCode::Invalid, "attention: heads (" + std::to_string(p.heads) +
                                 ") must be a positive multiple of "
                                 "kv_heads (" +
                                 std::to_string(c.kv_heads) + ")");
  if (p.window < 0) fail(ErrorCode::Invalid, "attention: window must be >= 0");
  const AttentionTileKernels* kern = p.kernels ? p.kernels : attention_kernels_for(select_kernels()->isa);
  const bool in_place = c.dtype == DType::BF16 && c.block_tokens % kern->width == 0 && c.head_dim % kern->width == 0 &&
                        attention_in_place().load(std::memory_order_relaxed) != 0;
  const int64_t span = c.block_tokens % kern->width == 0 ? attention_span_blocks().load(std::memory_order_relaxed) : 1;
  const StepGeometry g{&c, &p, kern, p.heads / c.kv_heads, c.head_dim, c.block_tokens, in_place, span};
  const int64_t KV = c.kv_heads, D = g.D, G = g.G, H = p.heads;
  ThreadPool& pool = ThreadPool::instance();
  const int64_t nthreads = std::max(1, pool.size());

  // Decode-like sequences (few new tokens) are split over their spans so a long context keeps every
  // thread busy; their partials are stored, then merged in span order by a second pass. That pays only
  // where one (sequence, KV head) could hold up the step, its work (tiles x new tokens) over half a
  // thread's share; otherwise the store and the second pass cost more than they spread (`node
  // bench/model.js --models qwen3moe --formats int4 --engines ours`, the attention part of a decode step
  // with its KV cache write: 0.197 and 0.218 ms split, 0.162 and 0.163 streamed). Either way, the same bits.
  // The cache blocks (tiles) the new tokens of s see: [first block, last block].
  auto visible_blocks = [&](const AttentionSeq& s) {
    return std::make_pair(first_visible(s.past, p.window) / g.Bt, (s.past + s.count - 1) / g.Bt);
  };
  const int64_t used = p.threads > 0 ? std::min<int64_t>(p.threads, nthreads) : nthreads;
  int64_t total_work = 0, largest_split = 0;
  for (int64_t i = 0; i < num_seqs; i++) {
    const AttentionSeq& s = seqs[i];
    if (s.count == 0) continue;
    const auto [b_first, b_last] = visible_blocks(s);
    const int64_t tiles = b_last - b_first + 1;
    total_work += KV * tiles * s.count;
    if (s.count <= kSplitMaxTokens) largest_split = std::max(largest_split, tiles * s.count);
  }
  const bool split = p.split_decode > 0 || (p.split_decode < 0 && used > 1 && largest_split * 2 * used > total_work);
  std::vector<Item> items;
  int64_t partials = 0;  // (row, span) partials stored, rows being G per token
  std::vector<Item> merges;
  for (int64_t i = 0; i < num_seqs; i++) {
    const AttentionSeq& s = seqs[i];
    if (s.count == 0) continue;
    const auto [b_first, b_last] = visible_blocks(s);
    const int64_t sp_first = b_first / span, spans = b_last / span - sp_first + 1;
    if (split && s.count <= kSplitMaxTokens && spans > 1) {
      const int64_t want = std::max<int64_t>(1, 4 * nthreads / std::max<int64_t>(1, KV * num_seqs));
      const int64_t per = std::max<int64_t>(1, (spans + want - 1) / want);
      for (int64_t j = 0; j < KV; j++) {
        merges.push_back({i, j, 0, s.count, sp_first, sp_first + spans, partials});
        for (int64_t sp = sp_first; sp < sp_first + spans; sp += per)
          items.push_back(
              {i, j, 0, s.count, sp, std::min(sp + per, sp_first + spans), partials + (sp - sp_first) * s.count * G});
        partials += spans * s.count * G;
      }
    } else {
      for (int64_t j = 0; j < KV; j++)
        for (int64_t t0 = 0; t0 < s.count; t0 += kQueryTokensPerItem)
          items.push_back({i, j, t0, std::min(s.count, t0 + kQueryTokensPerItem), 0, 0, -1});
    }
  }
  // Stored partials: m, l, then the padded row of values, per (row, span), span-major within a
  // (sequence, KV head).
  const int64_t ldv = round_up(D, kern->width), slot_floats = ldv + 2;
  std::vector<float> store(size_t(partials * slot_floats));

  int64_t max_rows = 0;
  for (const Item& it : items) max_rows = std::max(max_rows, (it.t1 - it.t0) * G);
  pool.parallel_for(int64_t(items.size()), 1, p.threads, [&](int64_t begin, int64_t end, int) {
    static thread_local TileScratch t;
    t.prepare(*kern, g.Bt, span, D, max_rows);
    for (int64_t w = begin; w < end; w++) {
      const Item& it = items[size_t(w)];
      const AttentionSeq& s = seqs[it.seq];
      if (it.partial_base < 0) {
        attend_streaming(g, s, it.head, it.t0, it.t1, q, out, t);
        continue;
      }
      gather_queries(g, s, it.head, 0, s.count, q, t);
      const int64_t end_pos = s.past + s.count;
      const auto [b_first, b_last] = visible_blocks(s);
      for (int64_t sp = it.p0; sp < it.p1; sp++) {
        const SpanBlocks sb = span_blocks(g, sp, b_first, b_last);
        load_span(g, s, sb, it.head, end_pos, t);
        const FetchAhead ahead =
            sp + 1 < it.p1 ? fetch_ahead(g, s, span_blocks(g, sp + 1, b_first, b_last), it.head, t) : FetchAhead{};
        int64_t r0, r1;
        span_partials(g, s, 0, s.count, sb, end_pos, ahead, t, r0, r1);
        for (int64_t row = 0; row < s.count * G; row++) {
          float* slot = store.data() + (it.partial_base + (sp - it.p0) * s.count * G + row) * slot_floats;
          const bool seen = row >= r0 && row < r1 && t.lo[size_t(row)] < t.hi[size_t(row)];
          slot[0] = seen ? t.m[size_t(row)] : kNegInf;
          slot[1] = seen ? t.l[size_t(row)] : 0.0f;
          if (seen) std::memcpy(slot + 2, t.acc.data() + row * ldv, size_t(ldv) * sizeof(float));
        }
      }
    }
  });

  if (merges.empty()) return;
  pool.parallel_for(int64_t(merges.size()), 1, p.threads, [&](int64_t begin, int64_t end, int) {
    std::vector<float> acc(static_cast<size_t>(ldv));
    for (int64_t w = begin; w < end; w++) {
      const Item& it = merges[size_t(w)];
      const AttentionSeq& s = seqs[it.seq];
      const int64_t rows = s.count * G;
      for (int64_t row = 0; row < rows; row++) {
        float m = kNegInf, l = 0;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t sp = it.p0; sp < it.p1; sp++) {
          const float* slot = store.data() + (it.partial_base + (sp - it.p0) * rows + row) * slot_floats;
          kern->merge(&m, &l, acc.data(), slot[0], slot[1], slot + 2, ldv);
        }
        const int64_t i = row / G, r = row % G;
        float* o = out + (s.row + i) * H * D + (it.head * G + r) * D;
        const float inv = 1.0f / l;
        for (int64_t d = 0; d < D; d++) o[d] = acc[size_t(d)] * inv;
      }
    }
  });
}

}  // namespace fmoe
