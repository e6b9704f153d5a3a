// C++ tests of paged grouped-query attention (csrc/cpu/attention.*): a float64 reference at odd sizes,
// every cache dtype, sliding windows, and the determinism contract (a sequence alone or in a batch,
// a prompt in one call or in chunks, a decode split over keys or streamed: the same bits).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "cpu/attention.h"
#include "tests/check.h"

using namespace fmoe;

// One sequence's whole history: q, k, v for every position, [positions][heads or kv_heads][D].
struct History {
  std::vector<float> q, k, v;
  std::vector<int32_t> blocks;
};

struct Cache {
  KvCacheView view;
  std::vector<uint8_t> kbuf, vbuf;
  Cache(int64_t num_blocks, int64_t kv_heads, int64_t D, int64_t Bt, DType dt) {
    const size_t bytes = size_t(num_blocks * kv_heads * Bt * D) * dtype_size(dt);
    kbuf.assign(bytes, 0xA5);  // garbage where nothing was written: no output may depend on it
    vbuf.assign(bytes, 0x5A);
    view.k = kbuf.data();
    view.v = vbuf.data();
    view.num_blocks = num_blocks;
    view.kv_heads = kv_heads;
    view.head_dim = D;
    view.block_tokens = Bt;
    view.dtype = dt;
  }
};

static float round_to(DType dt, float x) {
  if (dt == DType::BF16) return bf16_to_f32(f32_to_bf16(x));
  if (dt == DType::F16) return f16_to_f32(f32_to_f16(x));
  return x;
}

// float64 attention of one query (position pos, head h) over the history, with K/V as the cache stores them.
static void reference_row(const History& s, int64_t pos, int64_t h, int64_t H, int64_t KV, int64_t D, double scale,
                          int64_t window, DType dt, double* out) {
  const int64_t G = H / KV, j = h / G;
  const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
  std::vector<double> sc(size_t(pos - lo + 1));
  double mx = -INFINITY;
  for (int64_t p = lo; p <= pos; p++) {
    double d = 0;
    for (int64_t i = 0; i < D; i++)
      d += double(s.q[size_t((pos * H + h) * D + i)]) * double(round_to(dt, s.k[size_t((p * KV + j) * D + i)]));
    sc[size_t(p - lo)] = d * scale;
    mx = std::max(mx, d * scale);
  }
  double sum = 0;
  for (double& x : sc) sum += (x = std::exp(x - mx));
  for (int64_t i = 0; i < D; i++) {
    double a = 0;
    for (int64_t p = lo; p <= pos; p++)
      a += sc[size_t(p - lo)] * double(round_to(dt, s.v[size_t((p * KV + j) * D + i)]));
    out[i] = a / sum;
  }
}

struct Shape {
  int64_t H, KV, D, Bt, window;
  DType dt;
  const AttentionTileKernels* kern;  // the tile kernel set under test
};

static History make_history(std::mt19937& rng, const Shape& sh, int64_t len, std::vector<int32_t>& free_blocks) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  History s;
  s.q.resize(size_t(len * sh.H * sh.D));
  s.k.resize(size_t(len * sh.KV * sh.D));
  s.v.resize(size_t(len * sh.KV * sh.D));
  for (float& x : s.q) x = nd(rng);
  for (float& x : s.k) x = nd(rng);
  for (float& x : s.v) x = nd(rng);
  const int64_t nb = (len + sh.Bt - 1) / sh.Bt;
  for (int64_t b = 0; b < nb; b++) {
    s.blocks.push_back(free_blocks.back());
    free_blocks.pop_back();
  }
  return s;
}

// Runs one step over `seqs` (each: history, past, count) and returns out [rows][H * D].
struct StepSeq {
  const History* h;
  int64_t past, count;
};

static std::vector<float> run_step(Cache& c, const Shape& sh, const std::vector<StepSeq>& step, int threads = 0,
                                   int split_decode = -1) {
  const int64_t H = sh.H, KV = sh.KV, D = sh.D;
  int64_t rows = 0;
  for (const StepSeq& s : step) rows += s.count;
  std::vector<float> q(size_t(rows * H * D)), k(size_t(rows * KV * D)), v(size_t(rows * KV * D));
  std::vector<AttentionSeq> seqs;
  int64_t row = 0;
  for (const StepSeq& s : step) {
    AttentionSeq a;
    a.blocks = s.h->blocks.data();
    a.num_blocks = int64_t(s.h->blocks.size());
    a.past = s.past;
    a.count = s.count;
    a.row = row;
    std::memcpy(&q[size_t(row * H * D)], &s.h->q[size_t(s.past * H * D)], size_t(s.count * H * D) * 4);
    std::memcpy(&k[size_t(row * KV * D)], &s.h->k[size_t(s.past * KV * D)], size_t(s.count * KV * D) * 4);
    std::memcpy(&v[size_t(row * KV * D)], &s.h->v[size_t(s.past * KV * D)], size_t(s.count * KV * D) * 4);
    seqs.push_back(a);
    row += s.count;
  }
  attention_check(c.view, seqs.data(), int64_t(seqs.size()), rows);
  kv_cache_write(c.view, seqs.data(), int64_t(seqs.size()), k.data(), v.data());
  AttentionParams p;
  p.heads = H;
  p.scale = float(1.0 / std::sqrt(double(D)));
  p.window = sh.window;
  p.threads = threads;
  p.split_decode = split_decode;
  p.kernels = sh.kern;
  std::vector<float> out(size_t(rows * H * D), NAN);
  attention(c.view, seqs.data(), int64_t(seqs.size()), p, q.data(), out.data());
  return out;
}

// Largest relative L2 error of any (token, head) row of `out` (the step's rows for s, from `row`).
static double row_error(const std::vector<float>& out, int64_t row, const StepSeq& s, const Shape& sh) {
  double worst = 0;
  std::vector<double> ref(size_t(sh.D));
  for (int64_t i = 0; i < s.count; i++)
    for (int64_t h = 0; h < sh.H; h++) {
      reference_row(*s.h, s.past + i, h, sh.H, sh.KV, sh.D, 1.0 / std::sqrt(double(sh.D)), sh.window, sh.dt,
                    ref.data());
      double num = 0, den = 0;
      for (int64_t d = 0; d < sh.D; d++) {
        const double got = out[size_t(((row + i) * sh.H + h) * sh.D + d)];
        num += (got - ref[size_t(d)]) * (got - ref[size_t(d)]);
        den += ref[size_t(d)] * ref[size_t(d)];
      }
      worst = std::max(worst, std::sqrt(num / std::max(den, 1e-300)));
      if (!(worst == worst)) return INFINITY;
    }
  return worst;
}

static bool same_bits(const float* a, const float* b, size_t n) { return std::memcmp(a, b, n * 4) == 0; }

static void test_shape(const Shape& sh, uint64_t seed) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  const int64_t H = sh.H, D = sh.D;
  const size_t row_floats = size_t(H * D);
  // Three sequences: a prompt of 23 tokens, a long one decoded at position 41, a short one of 3 + 2.
  const int64_t pool_blocks = 160;
  std::vector<int32_t> free_blocks(pool_blocks);
  std::iota(free_blocks.begin(), free_blocks.end(), 0);
  std::shuffle(free_blocks.begin(), free_blocks.end(), rng);  // tables are not contiguous
  History a = make_history(rng, sh, 23, free_blocks);
  History b = make_history(rng, sh, 42, free_blocks);
  History c = make_history(rng, sh, 5, free_blocks);
  History d = make_history(rng, sh, 150, free_blocks);  // several prefill work items

  // Step 1: b's first 41 tokens and c's first 3, in one call.
  Cache cache(pool_blocks, sh.KV, D, sh.Bt, sh.dt);
  std::vector<float> s1 = run_step(cache, sh, {{&b, 0, 41}, {&c, 0, 3}});
  const double e1 = std::max(row_error(s1, 0, {&b, 0, 41}, sh), row_error(s1, 41, {&c, 0, 3}, sh));
  // Step 2: a's whole prompt, b's decode at 41 (split over keys), c's two more tokens.
  std::vector<float> s2 = run_step(cache, sh, {{&a, 0, 23}, {&b, 41, 1}, {&c, 3, 2}}, 0, 1);
  const double e2 = std::max(
      {row_error(s2, 0, {&a, 0, 23}, sh), row_error(s2, 23, {&b, 41, 1}, sh), row_error(s2, 24, {&c, 3, 2}, sh)});
  // float32 scores and sums over at most 42 keys of D products.
  const double tol = 2e-6 * std::sqrt(double(D));
  // A long prompt in one call, and in chunks of 70 and 80 tokens.
  Cache long_cache(pool_blocks, sh.KV, D, sh.Bt, sh.dt);
  std::vector<float> dw = run_step(long_cache, sh, {{&d, 0, 150}});
  const double e3 = row_error(dw, 0, {&d, 0, 150}, sh);
  if (e1 > tol || e2 > tol || e3 > tol)
    std::fprintf(stderr, "%s H=%lld KV=%lld D=%lld Bt=%lld window=%lld dtype=%s: errors %.3g %.3g %.3g (tol %.3g)\n",
                 isa_name(sh.kern->isa), (long long)H, (long long)sh.KV, (long long)D, (long long)sh.Bt,
                 (long long)sh.window, dtype_name(sh.dt), e1, e2, e3, tol);
  CHECK(e1 <= tol && e2 <= tol && e3 <= tol);
  Cache long_chunks(pool_blocks, sh.KV, D, sh.Bt, sh.dt);
  std::vector<float> d1 = run_step(long_chunks, sh, {{&d, 0, 70}});
  std::vector<float> d2 = run_step(long_chunks, sh, {{&d, 70, 80}}, 1);
  CHECK(same_bits(d1.data(), dw.data(), 70 * row_floats));
  CHECK(same_bits(d2.data(), dw.data() + 70 * row_floats, 80 * row_floats));

  // Alone instead of in a batch: the same bits.
  Cache alone(pool_blocks, sh.KV, D, sh.Bt, sh.dt);
  std::vector<float> a_alone = run_step(alone, sh, {{&a, 0, 23}}, 1);
  CHECK(same_bits(a_alone.data(), s2.data(), 23 * row_floats));
  // a's prompt in chunks of 7, 1 and 15 tokens: the same bits.
  Cache chunked(pool_blocks, sh.KV, D, sh.Bt, sh.dt);
  std::vector<float> c1 = run_step(chunked, sh, {{&a, 0, 7}});
  std::vector<float> c2 = run_step(chunked, sh, {{&a, 7, 1}});
  std::vector<float> c3 = run_step(chunked, sh, {{&a, 8, 15}});
  CHECK(same_bits(c1.data(), s2.data(), 7 * row_floats));
  CHECK(same_bits(c2.data(), s2.data() + 7 * row_floats, row_floats));
  CHECK(same_bits(c3.data(), s2.data() + 8 * row_floats, 15 * row_floats));
  // b's token 41 decoded alone (split over keys) and streamed within a 42-token prompt: the same bits.
  Cache whole(pool_blocks, sh.KV, D, sh.Bt, sh.dt);
  std::vector<float> bw = run_step(whole, sh, {{&b, 0, 42}});
  CHECK(same_bits(bw.data() + 41 * row_floats, s2.data() + 23 * row_floats, row_floats));
  CHECK(same_bits(bw.data(), s1.data(), 41 * row_floats));
  // bf16 tiles read where they lie in the cache, and widened into the scratch first: the same bits.
  if (sh.dt == DType::BF16) {
    const int in_place = attention_in_place().exchange(0);
    Cache widened(pool_blocks, sh.KV, D, sh.Bt, sh.dt);
    std::vector<float> w1 = run_step(widened, sh, {{&b, 0, 41}, {&c, 0, 3}});
    std::vector<float> w2 = run_step(widened, sh, {{&a, 0, 23}, {&b, 41, 1}, {&c, 3, 2}}, 0, 1);
    attention_in_place().store(in_place);
    CHECK(same_bits(w1.data(), s1.data(), s1.size()));
    CHECK(same_bits(w2.data(), s2.data(), s2.size()));
  }
}

static void test_f16_conversion() {
  CHECK(f32_to_f16(1.0f) == 0x3c00);
  CHECK(f32_to_f16(-2.0f) == 0xc000);
  CHECK(f32_to_f16(65504.0f) == 0x7bff);
  CHECK(f32_to_f16(65519.0f) == 0x7bff);
  CHECK(f32_to_f16(65520.0f) == 0x7c00);
  CHECK(f32_to_f16(std::ldexp(1.0f, -24)) == 0x0001);
  CHECK(f32_to_f16(std::ldexp(1.0f, -25)) == 0x0000);  // a tie, to even
  CHECK(f32_to_f16(std::ldexp(1.5f, -25)) == 0x0001);
  CHECK(f32_to_f16(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);      // a tie, to even
  CHECK(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);  // a tie, to even (up)
  CHECK(std::isnan(f16_to_f32(f32_to_f16(NAN))));
  // Every half value survives the round trip.
  for (uint32_t h = 0; h < 0x10000; h++) {
    const float f = f16_to_f32(uint16_t(h));
    if (std::isnan(f)) continue;
    if (f32_to_f16(f) != uint16_t(h)) {
      std::fprintf(stderr, "f16 round trip fails at 0x%04x\n", h);
      failures++;
      break;
    }
  }
  // Rounding agrees with a float64 nearest-value search on random floats.
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-70000.0f, 70000.0f);
  for (int i = 0; i < 20000; i++) {
    const float x = i % 2 ? u(rng) : u(rng) * 1e-6f;
    const uint16_t h = f32_to_f16(x);
    const double got = f16_to_f32(h);
    if (std::isinf(got)) {
      CHECK(std::fabs(double(x)) >= 65520.0);
      continue;
    }
    const uint16_t up = uint16_t(h + 1), down = uint16_t(h - 1);
    const double e = std::fabs(got - double(x));
    CHECK(e <= std::fabs(double(f16_to_f32(up)) - double(x)) || std::isnan(f16_to_f32(up)));
    CHECK(e <= std::fabs(double(f16_to_f32(down)) - double(x)) || std::isnan(f16_to_f32(down)));
  }
}

static void test_bad_input() {
  Cache c(4, 2, 8, 4, DType::F32);
  const int32_t table[2] = {0, 7};
  AttentionSeq s;
  s.blocks = table;
  s.num_blocks = 2;
  s.past = 0;
  s.count = 6;
  s.row = 0;
  bool threw = false;
  try {
    attention_check(c.view, &s, 1, 6);  // block 7 of 4
  } catch (const MoeException&) {
    threw = true;
  }
  CHECK(threw);
  threw = false;
  s.count = 9;  // needs 3 blocks, has 2
  try {
    attention_check(c.view, &s, 1, 9);
  } catch (const MoeException&) {
    threw = true;
  }
  CHECK(threw);
  threw = false;
  const int32_t ok[2] = {0, 1};
  s.blocks = ok;
  s.count = 6;
  try {
    attention_check(c.view, &s, 1, 5);  // rows past the step
  } catch (const MoeException&) {
    threw = true;
  }
  CHECK(threw);
}

// The layout attention.h documents: every (block, KV head) part inside the cache and apart from the
// others, a block's heads adjacent, and kv_cache_write putting each key and value where the attention
// reads it (kv_block_offset; keys [head_dim][block_tokens], values [block_tokens][head_dim]).
static void test_cache_layout() {
  const int64_t N = 5, KV = 3, D = 4, Bt = 2, part = Bt * D;
  Cache c(N, KV, D, Bt, DType::F32);
  std::vector<int> owner(size_t(N * KV * part), -1);
  for (int64_t b = 0; b < N; b++)
    for (int64_t j = 0; j < KV; j++) {
      const size_t off = kv_block_offset(c.view, b, j);
      CHECK(off % size_t(part) == 0 && off + size_t(part) <= owner.size());
      if (off + size_t(part) > owner.size()) continue;
      for (int64_t e = 0; e < part; e++) {
        CHECK(owner[off + size_t(e)] < 0);
        owner[off + size_t(e)] = int(b * KV + j);
      }
      if (j + 1 < KV) CHECK(kv_block_offset(c.view, b, j + 1) == off + size_t(part));
    }
  // Three tokens at positions 1..3 of a sequence on blocks {3, 1}: slots 1 of block 3, 0 and 1 of block 1.
  const int32_t table[2] = {3, 1};
  const AttentionSeq s{table, 2, /*past*/ 1, /*count*/ 3, /*row*/ 0};
  std::vector<float> k(size_t(3 * KV * D)), v(k.size());
  for (size_t i = 0; i < k.size(); i++) k[i] = float(i) + 0.25f, v[i] = -float(i) - 0.5f;
  kv_cache_write(c.view, &s, 1, k.data(), v.data());
  const float* kc = reinterpret_cast<const float*>(c.kbuf.data());
  const float* vc = reinterpret_cast<const float*>(c.vbuf.data());
  for (int64_t t = 0; t < 3; t++) {
    const int64_t pos = 1 + t, block = table[pos / Bt], slot = pos % Bt;
    for (int64_t j = 0; j < KV; j++) {
      const size_t off = kv_block_offset(c.view, block, j);
      for (int64_t d = 0; d < D; d++) {
        CHECK(kc[off + size_t(d * Bt + slot)] == k[size_t((t * KV + j) * D + d)]);
        CHECK(vc[off + size_t(slot * D + d)] == v[size_t((t * KV + j) * D + d)]);
      }
    }
  }
}

int main() {
  test_f16_conversion();
  test_bad_input();
  test_cache_layout();
  // Every tile kernel set this CPU runs.
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon}) {
    if (isa != Isa::Scalar && !cpu_supports(isa)) continue;
    const AttentionTileKernels* kern = attention_kernels_for(isa);
    if (kern->isa != isa) continue;  // not built for this architecture
    uint64_t seed = 1;
    for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
      test_shape({6, 2, 40, 5, 0, dt, kern}, seed++);    // 3 query heads per KV head, odd block size
      test_shape({4, 4, 17, 8, 0, dt, kern}, seed++);    // no grouping, odd head size
      test_shape({8, 1, 64, 16, 0, dt, kern}, seed++);   // one KV head (multi-query)
      test_shape({6, 3, 24, 4, 9, dt, kern}, seed++);    // sliding window of 9
      test_shape({2, 1, 128, 32, 0, dt, kern}, seed++);  // head_dim 128, blocks of 32
      test_shape({10, 2, 6, 21, 0, dt, kern}, seed++);   // 5 heads per KV head, tiny head, 21-key blocks
      test_shape({4, 2, 32, 16, 40, dt, kern}, seed++);  // a window that starts inside a span of blocks
    }
  }
  if (failures) {
    std::fprintf(stderr, "%d attention check(s) failed\n", failures);
    return 1;
  }
  std::printf("attention: all checks passed\n");
  return 0;
}
