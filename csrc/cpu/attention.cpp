#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../core/error.h"
#include "../core/thread_pool.h"

namespace fmoe {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Query tokens per prefill work item: with G query heads per KV head, 16 * G rows share each K/V tile.
constexpr int64_t kQueryTokensPerItem = 16;
// A sequence with at most this many new tokens (a decode step) is split over its keys instead.
constexpr int64_t kSplitMaxTokens = 4;

// Widens n elements of the cache to float.
void load_row(const void* base, DType dt, size_t offset, int64_t n, float* dst) {
  switch (dt) {
    case DType::F32:
      std::memcpy(dst, static_cast<const float*>(base) + offset, size_t(n) * 4);
      return;
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32(s[i]);
      return;
    }
  }
}

void store_row(void* base, DType dt, size_t offset, int64_t n, const float* src) {
  switch (dt) {
    case DType::F32:
      std::memcpy(static_cast<float*>(base) + offset, src, size_t(n) * 4);
      return;
    case DType::BF16: {
      uint16_t* d = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
      return;
    }
    case DType::F16: {
      uint16_t* d = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; i++) d[i] = f32_to_f16(src[i]);
      return;
    }
  }
}

// A fixed-order dot product: eight running sums (lane = index mod 8), added pairwise at the end. The
// compiler may vectorise it but not reorder it, so every caller gets the same bits.
float dot(const float* a, const float* b, int64_t n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; l++) s[l] += a[i + l] * b[i + l];
  for (int l = 0; i < n; i++, l++) s[l] += a[i] * b[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// Merges one tile's partial (mt, lt, acct) into a row's state. An empty state (m = -inf, l = 0,
// acc = 0) takes the partial's values exactly, so a stored partial merged later gives the same bits
// as one merged as soon as it is computed.
void merge_partial(float& m, float& l, float* acc, float mt, float lt, const float* acct, int64_t D) {
  if (mt == kNegInf) return;  // the row sees no key of this tile
  const float mn = std::max(m, mt);
  const float a = std::exp(m - mn), b = std::exp(mt - mn);
  for (int64_t d = 0; d < D; d++) acc[d] = acc[d] * a + acct[d] * b;
  l = l * a + lt * b;
  m = mn;
}

// Per-thread scratch for one tile: the block's keys and values widened to float, and one row's scores.
struct TileScratch {
  std::vector<float> k, v, s, acc;
  void reserve(int64_t block_tokens, int64_t D) {
    k.resize(size_t(block_tokens * D));
    v.resize(size_t(block_tokens * D));
    s.resize(size_t(block_tokens));
    acc.resize(size_t(D));
  }
};

struct StepGeometry {
  const KvCacheView* cache;
  const AttentionParams* p;
  int64_t G;  // query heads per KV head
  int64_t D;
  int64_t Bt;
};

// The first position a query at `pos` sees.
int64_t first_visible(int64_t pos, int64_t window) { return window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0; }

// Loads block `b` of a sequence's table, KV head j, into the scratch (slots [0, n)).
void load_tile(const StepGeometry& g, const AttentionSeq& s, int64_t b, int64_t j, int64_t n, TileScratch& t) {
  const int64_t block = s.blocks[b];
  const size_t base = size_t(((block * g.cache->kv_heads + j) * g.Bt) * g.D);
  load_row(g.cache->k, g.cache->dtype, base, n * g.D, t.k.data());
  load_row(g.cache->v, g.cache->dtype, base, n * g.D, t.v.data());
}

// One row's partial over the loaded tile (positions block_pos .. block_pos + n - 1): its max score, sum of
// exponentials and weighted values, over the keys visible from `pos`. mt = -inf when none is.
void tile_partial(const StepGeometry& g, const float* q, int64_t pos, int64_t block_pos, int64_t n, TileScratch& t,
                  float& mt, float& lt, float* acct) {
  const int64_t D = g.D;
  const int64_t lo = std::max<int64_t>(first_visible(pos, g.p->window) - block_pos, 0);
  const int64_t hi = std::min<int64_t>(pos - block_pos + 1, n);  // slots [lo, hi) are visible
  mt = kNegInf;
  lt = 0;
  if (lo >= hi) return;
  for (int64_t j = lo; j < hi; j++) {
    t.s[size_t(j)] = g.p->scale * dot(q, t.k.data() + j * D, D);
    mt = std::max(mt, t.s[size_t(j)]);
  }
  for (int64_t d = 0; d < D; d++) acct[d] = 0;
  for (int64_t j = lo; j < hi; j++) {
    const float e = std::exp(t.s[size_t(j)] - mt);
    lt += e;
    const float* vj = t.v.data() + j * D;
    for (int64_t d = 0; d < D; d++) acct[d] += e * vj[d];
  }
}

// Rows [t0, t1) of sequence s (all G heads of KV head j), every visible tile streamed and merged in
// order; writes the normalised output.
void attend_streaming(const StepGeometry& g, const AttentionSeq& s, int64_t j, int64_t t0, int64_t t1, const float* q,
                      float* out, TileScratch& t) {
  const int64_t D = g.D, G = g.G, H = g.p->heads;
  const int64_t rows = (t1 - t0) * G;
  std::vector<float> m(size_t(rows), kNegInf), l(size_t(rows), 0.0f), acc(size_t(rows * D), 0.0f);
  const int64_t pos_first = s.past + t0, pos_last = s.past + t1 - 1;
  const int64_t b_first = first_visible(pos_first, g.p->window) / g.Bt, b_last = pos_last / g.Bt;
  const int64_t end = s.past + s.count;  // positions written so far
  for (int64_t b = b_first; b <= b_last; b++) {
    const int64_t block_pos = b * g.Bt;
    const int64_t n = std::min(g.Bt, end - block_pos);
    load_tile(g, s, b, j, n, t);
    for (int64_t i = t0; i < t1; i++) {
      const int64_t pos = s.past + i;
      for (int64_t r = 0; r < G; r++) {
        const int64_t h = j * G + r;
        const int64_t row = (i - t0) * G + r;
        float mt, lt;
        tile_partial(g, q + (s.row + i) * H * D + h * D, pos, block_pos, n, t, mt, lt, t.acc.data());
        merge_partial(m[size_t(row)], l[size_t(row)], acc.data() + row * D, mt, lt, t.acc.data(), D);
      }
    }
  }
  for (int64_t i = t0; i < t1; i++)
    for (int64_t r = 0; r < G; r++) {
      const int64_t row = (i - t0) * G + r;
      float* o = out + (s.row + i) * H * D + (j * G + r) * D;
      const float inv = 1.0f / l[size_t(row)];
      for (int64_t d = 0; d < D; d++) o[d] = acc[size_t(row * D + d)] * inv;
    }
}

struct Item {
  int64_t seq, head;     // sequence, KV head
  int64_t t0, t1;        // new tokens [t0, t1) of the sequence
  int64_t b0, b1;        // split items: tiles [b0, b1) of the table; streaming items: unused
  int64_t partial_base;  // split items: index of tile b0's partials in the step's store, -1 otherwise
};

}  // namespace

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
    for (int64_t t = 0; t < s.count; t++) {
      const int64_t pos = s.past + t;
      const int64_t block = s.blocks[pos / Bt], slot = pos % Bt;
      for (int64_t j = 0; j < KV; j++) {
        const size_t dst = size_t(((block * KV + j) * Bt + slot) * D);
        const size_t src = size_t((s.row + t) * KV * D + j * D);
        store_row(c.k, c.dtype, dst, D, k + src);
        store_row(c.v, c.dtype, dst, D, v + src);
      }
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
  const StepGeometry g{&c, &p, p.heads / c.kv_heads, c.head_dim, c.block_tokens};
  const int64_t KV = c.kv_heads, D = g.D, G = g.G, H = p.heads;
  ThreadPool& pool = ThreadPool::instance();
  const int64_t nthreads = std::max(1, pool.size());

  // Decode-like sequences (few new tokens) are split over their tiles so a long context keeps every
  // thread busy; their partials are stored, then merged in tile order by a second pass.
  std::vector<Item> items;
  int64_t partials = 0;  // (row, tile) partials stored, rows being G per token
  std::vector<Item> merges;
  for (int64_t i = 0; i < num_seqs; i++) {
    const AttentionSeq& s = seqs[i];
    if (s.count == 0) continue;
    const int64_t b_first = first_visible(s.past, p.window) / g.Bt;
    const int64_t b_last = (s.past + s.count - 1) / g.Bt;
    const int64_t tiles = b_last - b_first + 1;
    if (s.count <= kSplitMaxTokens && tiles > 1) {
      const int64_t want = std::max<int64_t>(1, 4 * nthreads / std::max<int64_t>(1, KV * num_seqs));
      const int64_t per = std::max<int64_t>(1, (tiles + want - 1) / want);
      for (int64_t j = 0; j < KV; j++) {
        merges.push_back({i, j, 0, s.count, b_first, b_last + 1, partials});
        for (int64_t b = b_first; b <= b_last; b += per)
          items.push_back({i, j, 0, s.count, b, std::min(b + per, b_last + 1), partials + (b - b_first) * s.count * G});
        partials += tiles * s.count * G;
      }
    } else {
      for (int64_t j = 0; j < KV; j++)
        for (int64_t t0 = 0; t0 < s.count; t0 += kQueryTokensPerItem)
          items.push_back({i, j, t0, std::min(s.count, t0 + kQueryTokensPerItem), 0, 0, -1});
    }
  }
  // Stored partials: m, l, then D values, per (row, tile), tile-major within a (sequence, KV head).
  std::vector<float> store(size_t(partials) * size_t(D + 2));

  pool.parallel_for(int64_t(items.size()), 1, p.threads, [&](int64_t begin, int64_t end, int) {
    TileScratch t;
    t.reserve(g.Bt, D);
    for (int64_t w = begin; w < end; w++) {
      const Item& it = items[size_t(w)];
      const AttentionSeq& s = seqs[it.seq];
      if (it.partial_base < 0) {
        attend_streaming(g, s, it.head, it.t0, it.t1, q, out, t);
        continue;
      }
      const int64_t end_pos = s.past + s.count;
      for (int64_t b = it.b0; b < it.b1; b++) {
        const int64_t block_pos = b * g.Bt;
        const int64_t n = std::min(g.Bt, end_pos - block_pos);
        load_tile(g, s, b, it.head, n, t);
        for (int64_t i = 0; i < s.count; i++)
          for (int64_t r = 0; r < G; r++) {
            const int64_t row = i * G + r;
            float* slot = store.data() + size_t(it.partial_base + ((b - it.b0) * s.count * G + row)) * size_t(D + 2);
            tile_partial(g, q + (s.row + i) * H * D + (it.head * G + r) * D, s.past + i, block_pos, n, t, slot[0],
                         slot[1], slot + 2);
          }
      }
    }
  });

  if (merges.empty()) return;
  pool.parallel_for(int64_t(merges.size()), 1, p.threads, [&](int64_t begin, int64_t end, int) {
    std::vector<float> acc(static_cast<size_t>(D));
    for (int64_t w = begin; w < end; w++) {
      const Item& it = merges[size_t(w)];
      const AttentionSeq& s = seqs[it.seq];
      const int64_t rows = s.count * G;
      for (int64_t row = 0; row < rows; row++) {
        float m = kNegInf, l = 0;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t b = it.b0; b < it.b1; b++) {
          const float* slot = store.data() + size_t(it.partial_base + (b - it.b0) * rows + row) * size_t(D + 2);
          merge_partial(m, l, acc.data(), slot[0], slot[1], slot + 2, D);
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
