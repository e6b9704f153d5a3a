// C++ tests of the core, no Node: routing rules, dispatch order, dtype conversions, the thread pool,
// the quantizer's edge cases, and every CPU kernel set this machine runs against a float64 reference.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sched.h>
#endif

#include "core/backend.h"
#include "core/dispatch.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/options.h"
#include "core/quant.h"
#include "core/routing.h"
#include "core/thread_pool.h"
#include "cpu/kernels.h"
#include "cpu/sampler.h"
#include "tests/check.h"

using namespace fmoe;

static void test_routing() {
  // Ties go to the lower index; renormalised weights sum to 1.
  const float logits[6] = {1.0f, 3.0f, 3.0f, 0.5f, 3.0f, -1.0f};
  int32_t ids[4];
  float w[4];
  route_topk(logits, 1, 6, 3, Routing::SoftmaxTopkRenorm, ids, w);
  CHECK(ids[0] == 1 && ids[1] == 2 && ids[2] == 4);
  CHECK(std::fabs(w[0] + w[1] + w[2] - 1.0f) < 1e-6f);
  // Without renormalisation the weights are the softmax probabilities.
  route_topk(logits, 1, 6, 1, Routing::SoftmaxTopk, ids, w);
  double sum = 0;
  for (float l : logits) sum += std::exp(double(l) - 3.0);
  CHECK(ids[0] == 1 && std::fabs(w[0] - 1.0 / sum) < 1e-6);
  // NaN is never picked over a number; all-NaN still yields in-range ids.
  const float with_nan[4] = {NAN, -2.0f, NAN, -5.0f};
  route_topk(with_nan, 1, 4, 2, Routing::SoftmaxTopkRenorm, ids, w);
  CHECK(ids[0] == 1 && ids[1] == 3);
  const float all_nan[4] = {NAN, NAN, NAN, NAN};
  route_topk(all_nan, 1, 4, 4, Routing::SoftmaxTopkRenorm, ids, w);
  for (int j = 0; j < 4; j++) CHECK(ids[j] >= 0 && ids[j] < 4);
  const float infs[3] = {INFINITY, 0.0f, INFINITY};
  route_topk(infs, 1, 3, 2, Routing::SoftmaxTopkRenorm, ids, w);
  CHECK(ids[0] == 0 && ids[1] == 2 && w[0] == 0.5f);
  // Many experts (past 64, the bitmask fast path).
  std::vector<float> many(300);
  for (int e = 0; e < 300; e++) many[e] = float((e * 37) % 300);
  int32_t top[4];
  float tw[4];
  route_topk(many.data(), 1, 300, 4, Routing::SoftmaxTopkRenorm, top, tw);
  for (int j = 0; j < 4; j++) CHECK(many[top[j]] == float(299 - j));
}

// route_topk's picks against a plain reference: every expert sorted by (a number above NaN, larger
// score, lower index), the first k taken. Random sizes and k, logits drawn from a pool with many equal
// values (sigmoid saturates to exactly 1 past 37, so large logits tie too), NaN and infinities, a bias
// on half the cases.
static void test_routing_random() {
  std::mt19937 gen(77);
  const float pool[] = {NAN, INFINITY, -INFINITY, 40.0f, 50.0f, 0.0f, -1.0f, 1.0f, 2.5f};
  for (int trial = 0; trial < 400; trial++) {
    const int64_t E = 1 + int64_t(gen() % 300), k = 1 + int64_t(gen() % uint32_t(std::min<int64_t>(E, 16)));
    std::vector<float> l(static_cast<size_t>(E)), bias(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; e++) {
      l[size_t(e)] = gen() % 3 == 0 ? pool[gen() % 9] : float(int(gen() % 2001) - 1000) / 100.0f;
      bias[size_t(e)] = float(int(gen() % 5) - 2) / 4.0f;
    }
    RouteSpec s;
    s.num_experts = E;
    s.top_k = k;
    s.routing = trial % 2 ? Routing::SigmoidTopk : Routing::SigmoidTopkRenorm;
    s.bias = trial % 4 < 2 ? bias.data() : nullptr;
    std::vector<int32_t> ids(static_cast<size_t>(k));
    std::vector<float> w(static_cast<size_t>(k));
    route_topk(l.data(), 1, s, ids.data(), w.data());
    std::vector<double> score(static_cast<size_t>(E)), choice(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; e++) {
      score[size_t(e)] = 1.0 / (1.0 + std::exp(-double(l[size_t(e)])));
      choice[size_t(e)] = s.bias ? score[size_t(e)] + s.bias[e] : score[size_t(e)];
    }
    std::vector<int32_t> order(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; e++) order[size_t(e)] = int32_t(e);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      const double va = choice[size_t(a)], vb = choice[size_t(b)];
      if (std::isnan(va) != std::isnan(vb)) return std::isnan(vb);
      if (!std::isnan(va) && va != vb) return va > vb;
      return a < b;
    });
    double sum = 0;
    for (int64_t j = 0; j < k; j++) sum += score[size_t(order[size_t(j)])];
    for (int64_t j = 0; j < k; j++) {
      CHECK(ids[size_t(j)] == order[size_t(j)]);
      const double want =
          score[size_t(order[size_t(j)])] / (s.routing == Routing::SigmoidTopkRenorm ? sum + 1e-20 : 1.0);
      CHECK(std::isnan(want) ? std::isnan(w[size_t(j)])
                             : std::fabs(double(w[size_t(j)]) - want) <= 1e-6 * std::fabs(want));
    }
  }
}

// Sigmoid scores, the bias, groups and the scale (the float64 reference of every case is in
// test/families*.test.ts; these pin the rules).
static void test_routing_families() {
  int32_t ids[4];
  float w[4];
  // Sigmoid-renorm: weights are the picked sigmoids over their sum, then scaled.
  const float l[4] = {0.5f, -1.0f, 2.0f, 0.0f};
  RouteSpec s;
  s.num_experts = 4;
  s.top_k = 2;
  s.routing = Routing::SigmoidTopkRenorm;
  s.scale = 2.5;
  route_topk(l, 1, s, ids, w);
  const double a = 1 / (1 + std::exp(-2.0)), b = 1 / (1 + std::exp(-0.5));
  CHECK(ids[0] == 2 && ids[1] == 0);
  CHECK(std::fabs(w[0] - 2.5 * a / (a + b)) < 1e-6 && std::fabs(w[1] - 2.5 * b / (a + b)) < 1e-6);
  // A bias flips the choice, the weights stay the unbiased scores.
  const float bias[4] = {0.0f, 0.9f, 0.0f, 0.0f};
  s.routing = Routing::SigmoidTopk;
  s.scale = 1;
  s.bias = bias;
  route_topk(l, 1, s, ids, w);
  CHECK(ids[0] == 1 && ids[1] == 2);
  CHECK(std::fabs(w[0] - 1 / (1 + std::exp(1.0))) < 1e-7);
  // Groups of two: {0,1} {2,3} {4,5}; one group kept. By max the last group wins, by top-2 sum the first.
  const float g[6] = {1.0f, 0.9f, -3.0f, -3.0f, 1.2f, -2.0f};
  s.num_experts = 6;
  s.bias = nullptr;
  s.groups.count = 3;
  s.groups.top_k = 1;
  s.groups.score = GroupScore::Max;
  route_topk(g, 1, s, ids, w);
  CHECK(ids[0] == 4 && ids[1] == 5);
  s.groups.score = GroupScore::Top2Sum;
  route_topk(g, 1, s, ids, w);
  CHECK(ids[0] == 0 && ids[1] == 1);
  // A NaN inside the kept group is picked before any expert of a dropped group.
  const float n[6] = {NAN, 5.0f, -2.0f, -3.0f, -1.0f, -1.0f};
  s.groups.score = GroupScore::Max;
  route_topk(n, 1, s, ids, w);
  CHECK(ids[0] == 1 && ids[1] == 0);
}

// gate_logits reads the rows of a block far apart: every logit must still be its own row's dot product,
// in the same bits whatever range of experts a call covers (one expert per call takes the plain
// one-row path) and close to a float64 reference. A kernel set's own router kernel (prefill) must give
// the same bits.
static void test_gate_logits() {
  std::mt19937 gen(1234);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int64_t E : {1, 3, 4, 5, 7, 60, 64, 129})
    for (int64_t H : {1, 7, 8, 13, 2051}) {
      const int64_t T = 1 + (E + H) % 11;
      std::vector<float> x(size_t(T * H)), g(size_t(E * H)), whole(size_t(T * E)), single(size_t(T * E)),
          split(size_t(T * E));
      for (float& v : x) v = u(gen);
      for (float& v : g) v = u(gen);
      gate_logits(x.data(), T, H, g.data(), E, whole.data());
      for (int64_t e = 0; e < E; e++) gate_logits(x.data(), T, H, g.data() + e * H, 1, single.data() + e, E);
      const int64_t cut = E / 3;  // two calls of uneven size
      gate_logits(x.data(), T, H, g.data(), cut, split.data(), E);
      gate_logits(x.data(), T, H, g.data() + cut * H, E - cut, split.data() + cut, E);
      CHECK(std::memcmp(whole.data(), single.data(), whole.size() * sizeof(float)) == 0);
      CHECK(std::memcmp(whole.data(), split.data(), whole.size() * sizeof(float)) == 0);
      for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Neon}) {
        const KernelSet* ks = kernels_for(isa);
        if (!ks || !ks->gate_logits) continue;
        std::vector<float> mine(size_t(T * E), -1.0f);
        ks->gate_logits(x.data(), T, H, g.data(), E, mine.data());
        CHECK(std::memcmp(whole.data(), mine.data(), whole.size() * sizeof(float)) == 0);
        // One token (decode: four far-apart streams), over two uneven ranges of experts.
        std::vector<float> one(size_t(E), -1.0f);
        ks->gate_logits(x.data(), 1, H, g.data(), cut, one.data());
        ks->gate_logits(x.data(), 1, H, g.data() + cut * H, E - cut, one.data() + cut);
        CHECK(std::memcmp(whole.data(), one.data(), one.size() * sizeof(float)) == 0);
      }
      // float32 partial sums: a few ulps of the sum of magnitudes
      CHECK(worst_dot_error(x.data(), g.data(), whole.data(), T, E, H) < 1e-5);
    }
}

// A router of bf16 values kept as bf16 (the CPU layer does so for every bf16 checkpoint) must give the
// bits of the same values as float32, over any range of experts and in every kernel set's router kernel;
// the values are fresh random bf16 values (not rounded floats that happen to agree in float32).
static void test_gate_logits_bf16() {
  std::mt19937 gen(4321);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int64_t E : {1, 4, 6, 64, 129})
    for (int64_t H : {1, 9, 16, 2053}) {
      const int64_t T = 1 + (E + 2 * H) % 9;
      std::vector<float> x(size_t(T * H)), g(size_t(E * H)), want(size_t(T * E)), mine(size_t(T * E), -1.0f),
          split(size_t(T * E), -1.0f);
      std::vector<uint16_t> gb(size_t(E * H));
      for (float& v : x) v = u(gen);
      for (size_t i = 0; i < gb.size(); i++) {
        gb[i] = f32_to_bf16(u(gen));
        g[i] = bf16_to_f32(gb[i]);
      }
      gate_logits(x.data(), T, H, g.data(), E, want.data());
      gate_logits_bf16(x.data(), T, H, gb.data(), E, mine.data());
      CHECK(std::memcmp(want.data(), mine.data(), want.size() * sizeof(float)) == 0);
      const int64_t cut = (E + 1) / 2;
      gate_logits_bf16(x.data(), T, H, gb.data(), cut, split.data(), E);
      gate_logits_bf16(x.data(), T, H, gb.data() + cut * H, E - cut, split.data() + cut, E);
      CHECK(std::memcmp(want.data(), split.data(), want.size() * sizeof(float)) == 0);
      for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Neon}) {
        const KernelSet* ks = kernels_for(isa);
        if (!ks || !ks->gate_logits_bf16) continue;
        std::vector<float> set(size_t(T * E), -1.0f);
        ks->gate_logits_bf16(x.data(), T, H, gb.data(), E, set.data());
        CHECK(std::memcmp(want.data(), set.data(), want.size() * sizeof(float)) == 0);
        std::vector<float> one(size_t(E), -1.0f);
        ks->gate_logits_bf16(x.data(), 1, H, gb.data(), cut, one.data());
        ks->gate_logits_bf16(x.data(), 1, H, gb.data() + cut * H, E - cut, one.data() + cut);
        CHECK(std::memcmp(want.data(), one.data(), one.size() * sizeof(float)) == 0);
      }
    }
}

static void test_dispatch() {
  const int32_t experts[8] = {2, 0, 1, 2, 0, 2, 1, 0};  // T=4, k=2
  Dispatch d;
  dispatch_by_expert(experts, 4, 2, 3, d);
  const int64_t want_off[4] = {0, 3, 5, 8};
  const int64_t want_rows[8] = {1, 4, 7, 2, 6, 0, 3, 5};
  for (int i = 0; i < 4; i++) CHECK(d.offsets[i] == want_off[i]);
  for (int i = 0; i < 8; i++) CHECK(d.rows[i] == want_rows[i]);
}

static void test_dtypes() {
  CHECK(bf16_to_f32(f32_to_bf16(1.5f)) == 1.5f);
  CHECK(f32_to_bf16(1.0f + 1.0f / 256) == f32_to_bf16(1.0f));  // ties to even
  CHECK(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
  CHECK(f16_to_f32(0x3c00) == 1.0f);
  CHECK(f16_to_f32(0xc000) == -2.0f);
  CHECK(f16_to_f32(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(std::isinf(f16_to_f32(0x7c00)));
  CHECK(std::isnan(f16_to_f32(0x7e00)));
  CHECK(f16_to_f32(0x7bff) == 65504.0f);
  // float -> half: ties to even, subnormals in units of 2^-24, overflow past the midpoint 65520.
  CHECK(f32_to_f16(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);      // tie between 1 and 1 + 2^-10: even
  CHECK(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);  // tie between odd and even: even
  CHECK(f32_to_f16(std::ldexp(1.5f, -24)) == 0x0002);             // subnormal tie 1.5 -> 2
  CHECK(f32_to_f16(std::ldexp(1.0f, -25)) == 0x0000);             // half the smallest subnormal -> 0
  CHECK(f32_to_f16(std::ldexp(1.25f, -25)) == 0x0001);
  CHECK(f32_to_f16(65519.0f) == 0x7bff && f32_to_f16(65520.0f) == 0x7c00 && f32_to_f16(-1e6f) == 0xfc00);
  CHECK(std::isnan(f16_to_f32(f32_to_f16(NAN))));
}

// quant.h's rule at the edges of the half scale. Expected scales are worked out from the definition:
// the float32 quotient amax / qmax, then its nearest half.
static void test_quantizer() {
  int8_t codes[8];
  // 0.1f / 7 = 0.0142857...: in [2^-7, 2^-6) a half step is 2^-17, and 1872.46 steps round to 1872.
  const float a[4] = {0.1f, -0.1f, 0.05f, 0.0714285f};
  const float s4 = quantize_group(a, 4, 7, codes);
  CHECK(s4 == 1872.0f * std::ldexp(1.0f, -17));
  // v / s: 7.0017 -> 7, 3.5008 -> 4, 5.0013 -> 5 (the codes follow the rounded scale).
  CHECK(codes[0] == 7 && codes[1] == -7 && codes[2] == 4 && codes[3] == 5);
  // A rounded-down scale can put amax past qmax: amax / 127 = 1.00048 rounds to 1 (the half step there
  // is 2^-10), and 127.06 clamps to 127.
  const float b[2] = {127.0f * 1.00048f, 1.0f};
  CHECK(quantize_group(b, 2, 127, codes) == 1.0f && codes[0] == 127 && codes[1] == 1);
  // A subnormal half scale: 1e-5 / 127 = 7.87e-8 is 1.32 units of 2^-24 -> one unit; every value past
  // 127 units clamps.
  const float c[3] = {1e-5f, -1e-5f, 3e-6f};
  const float ssub = quantize_group(c, 3, 127, codes);
  CHECK(ssub == std::ldexp(1.0f, -24) && codes[0] == 127 && codes[1] == -127 && codes[2] == 50);
  // Too small for a half: scale 0, codes 0 (2^-25 * 7 rounds to 0 as amax / 7).
  const float d[2] = {std::ldexp(1.0f, -25) * 7.0f, -1e-9f};
  codes[0] = codes[1] = 99;
  CHECK(quantize_group(d, 2, 7, codes) == 0.0f && codes[0] == 0 && codes[1] == 0);
  // Past half's range: an infinite scale and codes 0 (int8: amax / 127 >= 65520).
  const float e[3] = {65520.0f * 127.0f, 1.0f, -3.0f};
  codes[0] = codes[1] = codes[2] = 99;
  const float sinf = quantize_group(e, 3, 127, codes);
  CHECK(std::isinf(sinf) && sinf > 0 && codes[0] == 0 && codes[1] == 0 && codes[2] == 0);
  // Just inside the range: the largest finite half.
  const float f[1] = {65519.0f * 127.0f};
  CHECK(quantize_group(f, 1, 127, codes) == 65504.0f && codes[0] == 127);
  // NaN / Inf: NaN scale; zero: scale 0.
  const float g[2] = {1.0f, INFINITY}, z[2] = {0.0f, -0.0f};
  CHECK(std::isnan(quantize_group(g, 2, 7, codes)) && codes[0] == 0);
  CHECK(quantize_group(z, 2, 7, codes) == 0.0f && codes[0] == 0 && codes[1] == 0);
  // Random groups over twelve decades: the scale is a half value, each code within half a step of its
  // weight unless clamped at +-qmax, and the extreme weight lands on +-qmax.
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f), ex(-8.0f, 4.0f);
  for (int qmax : {127, 7})
    for (int trial = 0; trial < 400; trial++) {
      float v[32];
      const float mag = std::pow(10.0f, ex(gen));
      for (float& x : v) x = u(gen) * mag;
      int8_t q[32];
      const float s = quantize_group(v, 32, qmax, q);
      if (s == 0.0f) continue;  // the tiniest groups
      CHECK(f16_to_f32(f32_to_f16(s)) == s);
      double amax = 0;
      int cmax = 0;
      for (int i = 0; i < 32; i++) {
        amax = std::fmax(amax, std::fabs(double(v[i])));
        cmax = std::max(cmax, std::abs(int(q[i])));
        // Half a step, and the float32 quotient's rounding (|v / s| <= 128 units of 2^-24).
        if (std::abs(q[i]) < qmax) CHECK(std::fabs(double(v[i]) - double(q[i]) * s) <= (0.5 + 1e-5) * s);
      }
      // Half's relative rounding (2^-11 where normal, 2^-25 absolute where subnormal) plus float32's.
      const double rel_bound = std::ldexp(1.0, -11) + std::ldexp(1.0, -22);
      CHECK(std::fabs(double(s) - amax / qmax) <= amax / qmax * rel_bound + std::ldexp(1.0, -25));
      // A normal scale is within 2^-11 of amax / qmax, so amax lands on qmax; a subnormal one can be far off.
      if (s >= std::ldexp(1.0f, -14)) CHECK(cmax == qmax);
    }
}

// Every quantized kernel set: the packed size is the codes plus one 16-bit scale per group, and a group
// whose scale overflows half turns exactly the outputs it feeds into NaN, with no trap.
static void test_quant_kernels(Isa isa) {
  const KernelSet* ks = kernels_for(isa);
  if (!ks) return;
  for (Quant q : {Quant::Int8, Quant::Int4}) {
    const double code_bytes = q == Quant::Int8 ? 1.0 : 0.5;
    // Sizes every panel width (at most 64) and the group divide: no padding in the count.
    const int64_t H = 256, F = 512, g = 32;
    CHECK(double(ks->w13_quant_bytes(H, F, q, g)) == 2.0 * F * H * (code_bytes + 2.0 / g));
    CHECK(double(ks->w2_quant_bytes(H, F, q, g)) == double(H) * F * (code_bytes + 2.0 / g));

    // w2 [Hs, Fs] with one huge weight in row 3, second group; every other weight ordinary.
    const int64_t Hs = 40, Fs = 72, M = 3;
    std::mt19937 gen(unsigned(int(isa) * 10 + int(q)));
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> w2(Hs * Fs), act(M * Fs), y(M * Hs, 0.0f);
    for (auto& v : w2) v = u(gen) * 0.1f;
    for (auto& v : act) v = u(gen);
    w2[3 * Fs + 40] = 1e7f;  // int8: 1e7 / 127 > 65504; int4 likewise
    std::vector<char> packed(ks->w2_quant_bytes(Hs, Fs, q, g) + 64);
    ks->pack_w2_quant(w2.data(), Hs, Fs, DType::F32, q, g, packed.data());
    ks->down_quant(act.data(), Fs, M, Hs, Fs, packed.data(), q, g, 0, Hs, y.data(), Hs, kNoActCache);
    for (int64_t m = 0; m < M; m++)
      for (int64_t h = 0; h < Hs; h++) CHECK(h == 3 ? std::isnan(y[m * Hs + h]) : std::isfinite(y[m * Hs + h]));
    // The other rows against float64 on the dequantized weights (code * scale): a scale read with the
    // wrong width or offset is off by orders of magnitude. Sets that quantize the activations differ by
    // that rounding too (int8 activations about 1%, int16 about 1e-5).
    const char* acts = q == Quant::Int8 ? ks->int8_activations : ks->int4_activations;
    const double tol = std::strcmp(acts, "float32") == 0 ? 1e-5 : std::strcmp(acts, "int16") == 0 ? 1e-4 : 3e-2;
    double num = 0, den = 0;
    for (int64_t h = 0; h < Hs; h++) {
      if (h == 3) continue;
      std::vector<double> deq(Fs);
      for (int64_t k0 = 0; k0 < Fs; k0 += g) {
        const int64_t n = std::min(g, Fs - k0);
        int8_t c[32];
        const float sc = quantize_group(w2.data() + h * Fs + k0, n, quant_qmax(q), c);
        for (int64_t i = 0; i < n; i++) deq[k0 + i] = double(c[i]) * sc;
      }
      for (int64_t m = 0; m < M; m++) {
        double r = 0;
        for (int64_t f = 0; f < Fs; f++) r += deq[f] * act[m * Fs + f];
        num += (y[m * Hs + h] - r) * (y[m * Hs + h] - r), den += r * r;
      }
    }
    const double rel = std::sqrt(num / den);
    if (!(rel < tol)) std::fprintf(stderr, "%s %s: rel L2 %g\n", ks->name, quant_name(q), rel);
    CHECK(rel < tol);
  }
}

// Every enum value has a name that parses back to it; unknown names and values are refused with the
// field's name; the limits are the ones validate_config applies.
template <class E, size_t N>
static void check_names(const EnumName<E> (&table)[N], const char* field) {
  for (const EnumName<E>& n : table) {
    CHECK(parse_enum(table, field, n.name) == n.value);
    CHECK(std::strcmp(enum_name(table, n.value), n.name) == 0);
  }
  bool threw = false;
  try {
    parse_enum(table, field, std::string(table[0].name) + "x");
  } catch (const MoeException& e) {
    threw = e.code() == ErrorCode::Invalid && std::string(e.what()).find(field) == 0 &&
            std::string(e.what()).find(table[N - 1].name) != std::string::npos;
  }
  CHECK(threw);
  CHECK(!enum_known(table, E(N + 7)));
}

static bool config_ok(const MoeConfig& c) {
  try {
    validate_config(c);
    return true;
  } catch (const MoeException& e) {
    return false;
  }
}

static void test_options() {
  check_names(kRoutingNames, "routing");
  check_names(kDTypeNames, "weightDtype");
  check_names(kQuantNames, "quantize");
  check_names(kDeviceNames, "device");
  MoeConfig c;
  c.hidden = kMaxDim, c.intermediate = 1, c.num_experts = kMaxExperts, c.top_k = kMaxExperts;
  CHECK(config_ok(c));
  c.hidden = kMaxDim + 1;
  CHECK(!config_ok(c));
  c.hidden = 8, c.num_experts = kMaxExperts + 1;
  CHECK(!config_ok(c));
  c.num_experts = 4, c.top_k = 2, c.threads = int(kMaxThreads);
  CHECK(config_ok(c));
  c.threads = int(kMaxThreads) + 1;
  CHECK(!config_ok(c));
  c.threads = 0;
  for (int64_t g = 0; g <= 256; g++) {
    c.quant_group = g;
    bool listed = false;
    for (int64_t s : kQuantGroupSizes) listed = listed || s == g;
    CHECK(config_ok(c) == listed);
  }
  c.quant_group = kDefaultQuantGroup;
  c.routing = Routing(9);
  CHECK(!config_ok(c));
  c.routing = Routing::SoftmaxTopk;
  c.hidden = kMaxDim, c.intermediate = kMaxDim, c.num_experts = kMaxExperts;  // E*F*H = 2^50: fits
  CHECK(config_ok(c));
  CHECK(checked_mul(kMaxElements, 1, "n") == kMaxElements);
  bool threw = false;
  try {
    checked_mul(kMaxElements / 2 + 1, 2, "n");
  } catch (const MoeException&) {
    threw = true;
  }
  CHECK(threw);
}

// The factory: 'cpu' builds on the CPU; 'auto' stays there with a reason when CUDA cannot run (or the
// experts are quantized); 'cuda' without a usable device fails with NoDevice.
static void test_factory() {
  MoeConfig c;
  c.hidden = 8, c.intermediate = 16, c.num_experts = 2, c.top_k = 1;
  const BackendChoice cpu = choose_backend(c, DeviceRequest::Cpu);
  CHECK(!cpu.cuda && cpu.fallback_reason.empty());
  const BackendChoice automatic = choose_backend(c, DeviceRequest::Auto);
  CHECK(automatic.cuda == cuda_available());
  CHECK(automatic.cuda || automatic.fallback_reason == cuda_unavailable_reason());
  c.quant = Quant::Int8;
  const BackendChoice quant = choose_backend(c, DeviceRequest::Auto);
  CHECK(!quant.cuda && quant.fallback_reason.find("int8") != std::string::npos);
  c.quant = Quant::None;
  std::vector<float> gate(16, 0.5f), w(2 * 16 * 8, 0.25f);
  WeightsView wv;
  wv.gate = gate.data();
  for (int e = 0; e < 2; e++) {
    wv.w1.push_back(w.data() + e * 128), wv.w3.push_back(w.data() + e * 128), wv.w2.push_back(w.data() + e * 128);
  }
  BuiltBackend built = make_backend(c, wv, DeviceRequest::Auto, 0);
  CHECK(built.backend->name() == (cuda_available() ? "cuda" : "cpu"));
  CHECK(built.fallback_reason == automatic.fallback_reason);
  if (!cuda_available()) {
    bool no_device = false;
    try {
      make_backend(c, wv, DeviceRequest::Cuda, 0);
    } catch (const MoeException& e) {
      no_device = e.code() == ErrorCode::NoDevice;
    }
    CHECK(no_device);
  }
}

static void test_pool() {
  ThreadPool pool(3);
  // Chunks: two a thread of those allowed, within [least, most].
  CHECK(pool.chunk_for(60, 0, 4) == 10);
  CHECK(pool.chunk_for(60, 2, 4) == 15);
  CHECK(pool.chunk_for(60, 2, 4, 12) == 12);
  CHECK(pool.chunk_for(7, 0, 4, 16) == 4);
  CHECK(pool.chunk_for(60, 9, 1) == 10);  // more threads asked for than the pool has
  std::vector<int> hit(1000, 0);
  pool.parallel_for(1000, 7, 0, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; i++) hit[i]++;
  });
  for (int v : hit) CHECK(v == 1);
  // Back-to-back jobs with different chunk sizes: every item of each must be done when parallel_for
  // returns, whatever a worker that woke late for an earlier job is doing. (A worker once mixed the
  // chunk size of the job it woke for with the claims of the next one and skipped items: a forward
  // then read activations that no one had written.)
  std::vector<int> item(64, -1);
  int incomplete = 0;
  for (int job = 0; job < 20000; job++) {
    pool.parallel_for(64, 1 + job % 13, 0, [&](int64_t b, int64_t e, int) {
      for (int64_t i = b; i < e; i++) item[i] = job;
    });
    for (int v : item) incomplete += v != job;
  }
  CHECK(incomplete == 0);
  bool threw = false;
  try {
    pool.parallel_for(100, 1, 0, [&](int64_t b, int64_t, int) {
      if (b == 50) fail(ErrorCode::Internal, "boom");
    });
  } catch (const MoeException& e) {
    threw = std::strcmp(e.what(), "boom") == 0;
  }
  CHECK(threw);
  // Each thread starts on a share of its own; the others take over the share of a thread that is held
  // up. The caller (worker 0) waits in its first item until every other item is done: that only happens
  // if the workers took the rest of its share.
  for (int64_t n : {3, 10, 101}) {
    std::atomic<int64_t> done{0};
    std::vector<int> once(size_t(n), 0);
    bool stuck = false;
    pool.parallel_for(n, 1, 0, [&](int64_t b, int64_t e, int w) {
      for (int64_t i = b; i < e; i++) {
        once[size_t(i)]++;
        if (w == 0 && i == 0) {
          const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
          while (done.load() < n - 1 && std::chrono::steady_clock::now() < until) std::this_thread::yield();
          stuck = done.load() < n - 1;
        } else {
          done.fetch_add(1);
        }
      }
    });
    CHECK(!stuck);
    for (int v : once) CHECK(v == 1);
  }
  // try_parallel_for runs a job when the pool is free, and refuses at once (running nothing) while
  // another thread's job holds it.
  std::vector<int> tried(50, 0);
  CHECK(pool.try_parallel_for(50, 1, 0, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; i++) tried[size_t(i)]++;
  }));
  for (int v : tried) CHECK(v == 1);
  std::atomic<bool> holding{false}, release{false};
  std::thread holder([&] {
    pool.parallel_for(4, 1, 0, [&](int64_t b, int64_t, int) {
      if (b != 0) return;
      holding.store(true);
      while (!release.load()) std::this_thread::yield();
    });
  });
  while (!holding.load()) std::this_thread::yield();
  bool ran = false;
  CHECK(!pool.try_parallel_for(8, 1, 0, [&](int64_t, int64_t, int) { ran = true; }));
  CHECK(!ran);
  release.store(true);
  holder.join();
  CHECK(pool.try_parallel_for(8, 1, 0, [&](int64_t, int64_t, int) { ran = true; }));
  CHECK(ran);
}

// A pool the size of the cores pins each worker to a core of its own; a larger one pins nothing and
// still does every item.
static void test_pool_pinning() {
  const int cores = ThreadPool::default_threads();
  ThreadPool bigger(cores + 1);
  CHECK(!bigger.pinned());
  std::vector<int> hit(500, 0);
  bigger.parallel_for(500, 3, 0, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; i++) hit[i]++;
  });
  for (int v : hit) CHECK(v == 1);
#ifdef __linux__
  if (cores < 2 || !ThreadPool::pin_requested() || std::getenv("FUSED_MOE_THREADS")) return;
  ThreadPool pool(cores);
  CHECK(pool.pinned());
  // Per job, the CPU each worker ran items on (workers only; the caller is not pinned). A worker may
  // trade its core for the free one when it finds the caller on it, but each is pinned to one core,
  // and no two workers share one in a job.
  std::mutex m;
  int wide_masks = 0, shared_cores = 0;
  for (int job = 0; job < 200; job++) {
    std::vector<int> cpu_of(static_cast<size_t>(cores), -1);
    pool.parallel_for(64, 1, 0, [&](int64_t, int64_t, int w) {
      const int cpu = sched_getcpu();
      cpu_set_t mask;
      CPU_ZERO(&mask);
      const bool one = sched_getaffinity(0, sizeof mask, &mask) == 0 && CPU_COUNT(&mask) == 1;
      std::lock_guard<std::mutex> lock(m);
      if (w > 0 && !one) wide_masks++;
      if (w > 0) cpu_of[size_t(w)] = cpu;
    });
    for (int a = 1; a < cores; a++)
      for (int b = a + 1; b < cores; b++)
        if (cpu_of[size_t(a)] >= 0 && cpu_of[size_t(a)] == cpu_of[size_t(b)]) shared_cores++;
  }
  CHECK(wide_masks == 0);
  CHECK(shared_cores == 0);
#endif
}

// A caller that runs on a worker's core still gets that worker's help at once: the worker is moved to
// the free core before it is woken, instead of waiting, pinned, for the caller to stop (a decode step
// then ran whole layers on the caller alone). The caller is confined to each core in turn; each job's
// items busy-wait 20 µs, so a worker that can run takes a good share of them, and none on the caller's
// core.
static void test_pool_caller_on_worker_core() {
#ifdef __linux__
  const int cores = ThreadPool::default_threads();
  if (cores < 2 || !ThreadPool::pin_requested() || std::getenv("FUSED_MOE_THREADS")) return;
  cpu_set_t saved;
  CPU_ZERO(&saved);
  if (sched_getaffinity(0, sizeof saved, &saved) != 0) return;
  ThreadPool pool(cores);
  CHECK(pool.pinned());
  int jobs = 0, helped = 0, on_caller_core = 0;
  for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
    if (!CPU_ISSET(cpu, &saved)) continue;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    if (sched_setaffinity(0, sizeof one, &one) != 0) continue;
    for (int job = 0; job < 10; job++) {
      std::atomic<int> by_workers{0}, there{0};
      pool.parallel_for(64, 1, 0, [&](int64_t, int64_t, int w) {
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(20);
        while (std::chrono::steady_clock::now() < until) {
        }
        if (w > 0) {
          by_workers++;
          if (sched_getcpu() == cpu) there++;
        }
      });
      jobs++;
      if (by_workers.load() >= 64 / cores / 2) helped++;
      on_caller_core += there.load();
    }
  }
  sched_setaffinity(0, sizeof saved, &saved);
  CHECK(jobs > 0);
  CHECK(on_caller_core == 0);
  CHECK(helped * 4 >= jobs * 3);  // three jobs in four or more: the machine may be busy with other work
#endif
}

// Float64 reference of one token through the whole layer.
static void reference(const MoeConfig& c, const std::vector<float>& gate, const std::vector<double>& w1,
                      const std::vector<double>& w3, const std::vector<double>& w2, const float* x, double* out) {
  const int64_t H = c.hidden, F = c.intermediate, E = c.num_experts, k = c.top_k;
  std::vector<float> logits(E);
  for (int64_t e = 0; e < E; e++) {
    double s = 0;
    for (int64_t i = 0; i < H; i++) s += double(gate[e * H + i]) * x[i];
    logits[e] = float(s);
  }
  std::vector<int32_t> ids(k);
  std::vector<float> w(k);
  route_topk(logits.data(), 1, E, k, c.routing, ids.data(), w.data());
  std::vector<double> h(F);
  for (int64_t i = 0; i < H; i++) out[i] = 0;
  for (int64_t j = 0; j < k; j++) {
    const int64_t e = ids[j];
    for (int64_t f = 0; f < F; f++) {
      double a = 0, b = 0;
      for (int64_t i = 0; i < H; i++) {
        a += w1[(e * F + f) * H + i] * x[i];
        b += w3[(e * F + f) * H + i] * x[i];
      }
      h[f] = a / (1 + std::exp(-a)) * b;
    }
    for (int64_t o = 0; o < H; o++) {
      double s = 0;
      for (int64_t f = 0; f < F; f++) s += w2[(e * H + o) * F + f] * h[f];
      out[o] += w[j] * s;
    }
  }
}

static void test_backend(Isa isa, DType dt, int64_t H, int64_t F, int64_t E, int64_t k, int64_t T) {
  const KernelSet* ks = kernels_for(isa);
  if (!ks) return;
  MoeConfig c;
  c.hidden = H, c.intermediate = F, c.num_experts = E, c.top_k = k, c.weight_dtype = dt;
  std::mt19937 gen(unsigned(H * 131 + F * 7 + E + k + T));
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> gate(E * H), x(T * H);
  for (auto& v : gate) v = u(gen) * 2.0f / std::sqrt(float(H));
  for (auto& v : x) v = u(gen);
  auto make = [&](int64_t n, float scale, std::vector<uint16_t>& bits, std::vector<float>& f32,
                  std::vector<double>& exact) {
    bits.resize(n), f32.resize(n), exact.resize(n);
    for (int64_t i = 0; i < n; i++) {
      const float v = u(gen) * scale;
      f32[i] = v;
      if (dt == DType::BF16)
        bits[i] = f32_to_bf16(v), exact[i] = bf16_to_f32(bits[i]);
      else
        exact[i] = v;
    }
  };
  std::vector<uint16_t> b1, b3, b2;
  std::vector<float> f1, f3, f2;
  std::vector<double> e1, e3, e2;
  make(E * F * H, 1.0f / std::sqrt(float(H)), b1, f1, e1);
  make(E * F * H, 1.0f / std::sqrt(float(H)), b3, f3, e3);
  make(E * H * F, 1.0f / std::sqrt(float(F)), b2, f2, e2);
  WeightsView wv;
  wv.gate = gate.data();
  for (int64_t e = 0; e < E; e++) {
    if (dt == DType::BF16) {
      wv.w1.push_back(b1.data() + e * F * H), wv.w3.push_back(b3.data() + e * F * H),
          wv.w2.push_back(b2.data() + e * H * F);
    } else {
      wv.w1.push_back(f1.data() + e * F * H), wv.w3.push_back(f3.data() + e * F * H),
          wv.w2.push_back(f2.data() + e * H * F);
    }
  }
  // The backend uses the process-wide choice; test the chosen set only when it is this one.
  if (select_kernels() != ks) return;
  auto backend = make_backend(c, wv, DeviceRequest::Cpu, 0).backend;
  std::vector<float> y(T * H);
  backend->forward(x.data(), T, y.data(), nullptr);
  std::vector<double> ref(H);
  double num = 0, den = 0;
  for (int64_t t = 0; t < T; t++) {
    reference(c, gate, e1, e3, e2, x.data() + t * H, ref.data());
    for (int64_t i = 0; i < H; i++) num += (y[t * H + i] - ref[i]) * (y[t * H + i] - ref[i]), den += ref[i] * ref[i];
  }
  const double rel = std::sqrt(num / den);
  const double tol = dt == DType::F32 ? 1e-5 : 1e-2;
  if (!(rel < tol))
    std::fprintf(stderr, "%s %s H=%lld F=%lld: rel L2 %g\n", ks->name, dtype_name(dt), (long long)H, (long long)F, rel);
  CHECK(rel < tol);
  // Batch invariance: the last token alone gives the same bits.
  std::vector<float> alone(H);
  backend->forward(x.data() + (T - 1) * H, 1, alone.data(), nullptr);
  CHECK(std::memcmp(alone.data(), y.data() + (T - 1) * H, H * sizeof(float)) == 0);
}

// The sampler's exponentials in every kernel set against std::exp in float64, at odd and round lengths
// (the vector tail), with the values the sampler must give 0: -inf (a masked token), NaN, and weights
// below 1e-307 of the top's; and the sum against a float64 sum of the outputs.
static void test_exp_weights() {
  std::mt19937_64 gen(99);
  std::uniform_real_distribution<double> u(-40.0, 0.0);
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Neon}) {
    const KernelSet* ks = kernels_for(isa);
    if (!ks) continue;
    for (int64_t n : {1, 2, 3, 7, 8, 9, 17, 64, 1001, 4096}) {
      const double top = 3.25, scale = 1.0 / 0.7;
      std::vector<double> x(static_cast<size_t>(n)), ref(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; i++) {
        double v = top + u(gen) / scale;
        switch (i % 13) {
          case 3:
            v = -INFINITY;
            break;
          case 5:
            v = NAN;
            break;
          case 7:
            v = top - 800.0 / scale;
            break;  // exp(-800): below the cut, 0
          case 11:
            v = top;
            break;  // exactly 1
          default:
            break;
        }
        x[size_t(i)] = v;
        const double z = (v - top) * scale;
        ref[size_t(i)] = z >= -708.0 ? std::exp(z) : 0.0;  // false for NaN and -inf
      }
      const double total = ks->exp_weights(x.data(), n, top, scale);
      double sum = 0, worst = 0;
      for (int64_t i = 0; i < n; i++) {
        const double r = ref[size_t(i)], g = x[size_t(i)];
        if (r == 0) {
          CHECK(g == 0);
        } else {
          worst = std::max(worst, std::fabs(g - r) / r);
        }
        sum += g;
      }
      CHECK(worst < 1e-15);  // a few ulps
      CHECK(std::fabs(total - sum) <= 1e-14 * sum);
      if (n > 11) CHECK(x[11] == 1.0);
      // From float logits: the same bits and sum as from their float64 copy (NaN and -inf among them).
      std::vector<float> xf(static_cast<size_t>(n));
      std::vector<double> copy(static_cast<size_t>(n)), out(static_cast<size_t>(n), 42.0);
      for (int64_t i = 0; i < n; i++) {
        xf[size_t(i)] = i % 13 == 5 ? NAN : i % 13 == 3 ? -INFINITY : float(top + u(gen) / scale);
        copy[size_t(i)] = xf[size_t(i)];
      }
      const double from_copy = ks->exp_weights(copy.data(), n, top, scale);
      const double from_floats = ks->exp_weights_f32(xf.data(), out.data(), n, top, scale);
      CHECK(from_floats == from_copy);
      CHECK(std::memcmp(out.data(), copy.data(), size_t(n) * sizeof(double)) == 0);
    }
  }
}

// argmax_logits: the first of equal largest values, NaN never the largest, -1 for a row with nothing
// above -inf or a +inf, at every position across the 512-value blocks it reduces, against a plain loop.
static void test_argmax_logits() {
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> u(-5.0f, 5.0f);
  // The first index of the largest (-1 with nothing above -inf) and the largest.
  auto plain = [](const std::vector<float>& x) {
    int64_t best = -1;
    float top = -INFINITY;
    for (size_t i = 0; i < x.size(); i++)
      if (x[i] > top) top = x[i], best = int64_t(i);
    return std::make_pair(best, top);
  };
  for (int64_t n : {1, 2, 5, 8, 9, 511, 512, 513, 1030, 2051}) {
    for (int rep = 0; rep < 40; rep++) {
      std::vector<float> x(static_cast<size_t>(n));
      for (float& v : x) v = std::round(u(gen) * 4) / 4;  // a grid: many ties
      if (rep % 5 == 1) x[size_t(gen() % n)] = NAN;
      if (rep % 5 == 2) x[size_t(gen() % n)] = 9.0f, x[size_t(gen() % n)] = 9.0f;
      if (rep % 7 == 3) x[size_t(gen() % n)] = INFINITY;
      if (rep % 11 == 4) std::fill(x.begin(), x.end(), -INFINITY);
      if (rep % 13 == 5) std::fill(x.begin(), x.end(), NAN);
      const auto [want, want_top] = plain(x);
      CHECK(argmax_logits(x.data(), n) == (want_top == INFINITY ? -1 : want));
      // Every kernel set's first_max_f32: the same index (-1 with nothing above -inf) and value.
      for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Neon}) {
        const KernelSet* ks = kernels_for(isa);
        if (!ks) continue;
        float top = 0;
        CHECK(ks->first_max_f32(x.data(), n, &top) == want);
        CHECK(top == want_top);
        // The float64 forms: the logits widened (NaN as -inf, the rest exactly), and their largest.
        std::vector<double> wide(static_cast<size_t>(n), 42.0);
        ks->widen_logits(x.data(), wide.data(), n);
        bool widened = true;
        for (int64_t i = 0; i < n; i++)
          widened = widened && wide[size_t(i)] == (std::isnan(x[size_t(i)]) ? -INFINITY : double(x[size_t(i)]));
        CHECK(widened);
        double top64 = 0;
        CHECK(ks->first_max_f64(wide.data(), n, &top64) == want);
        CHECK(top64 == double(want_top));
      }
    }
  }
}

// TokenSampler at temperature 0 with a mask, a bias and penalties is the argmax of the adjusted logits;
// at temperature 1 over equal logits each draw is floor(u * V) of the PRNG's stream; history and output
// cleared and added again give the draws of a fresh sampler.
static void test_token_sampler() {
  const int64_t V = 1000;
  std::vector<float> logits(static_cast<size_t>(V));
  std::mt19937 gen(11);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  for (float& v : logits) v = u(gen);
  SamplerParams p;
  p.temperature = 0;
  p.repetition_penalty = 1.7;
  p.presence_penalty = 0.5;
  p.frequency_penalty = 0.25;
  p.bias = {{3, 2.0}, {5000, 7.0}};  // an id past the vocabulary is left out
  std::vector<uint8_t> allowed(static_cast<size_t>(V), 1);
  for (int64_t i = 0; i < V; i += 3) allowed[size_t(i)] = 0;
  // Ids past the vocabulary (up to 2^31 - 1) are left out, and hold no table of that size.
  const std::vector<int32_t> history = {1, 2, 2, 4, 999, 7000, 2147483647}, output = {2, 2, 4, -1, 2147483000};
  TokenSampler s(p);
  s.add_history(history.data(), int64_t(history.size()));
  s.add_output(output.data(), int64_t(output.size()));
  std::vector<double> x(logits.begin(), logits.end());
  for (int64_t i = 0; i < V; i++)
    if (!allowed[size_t(i)]) x[size_t(i)] = -INFINITY;
  x[3] += 2.0;
  for (int32_t t : {1, 2, 4, 999})
    if (std::isfinite(x[size_t(t)])) x[size_t(t)] = x[size_t(t)] < 0 ? x[size_t(t)] * 1.7 : x[size_t(t)] / 1.7;
  x[2] -= 0.5 + 0.25 * 2;
  x[4] -= 0.5 + 0.25 * 1;
  const int64_t want = std::max_element(x.begin(), x.end()) - x.begin();
  CHECK(s.sample(logits.data(), V, allowed.data()) == want);

  SamplerParams q;
  q.seed = 2.0 * 4294967296.0 + 5;  // the high part of the seed counts
  TokenSampler a(q), b(q);
  q.seed = 5;
  TokenSampler c(q);
  std::vector<float> flat(static_cast<size_t>(V), 0.5f);
  Prng ref(2.0 * 4294967296.0 + 5);
  bool differs = false;
  for (int i = 0; i < 200; i++) {
    const int64_t t = a.sample(flat.data(), V, nullptr);
    CHECK(t == int64_t(std::floor(ref.next() * double(V))));
    CHECK(b.sample(flat.data(), V, nullptr) == t);
    differs = differs || c.sample(flat.data(), V, nullptr) != t;
  }
  CHECK(differs);

  // A row with no finite largest logit: -1.
  std::vector<float> bad(static_cast<size_t>(V), -INFINITY);
  bad[7] = NAN;
  TokenSampler d(q);
  CHECK(d.sample(bad.data(), V, nullptr) == -1);
}

// log_sum_exp and top_ids against float64 and a full sort: logits on a grid (ties keep the lower id
// first), NaN never listed and counted as -inf, -inf listed last, k beyond the listable values.
static void test_log_softmax_stats() {
  std::mt19937 gen(5);
  std::uniform_real_distribution<float> u(-8.0f, 8.0f);
  for (int64_t n : {1, 3, 31, 512, 1027}) {
    for (int rep = 0; rep < 20; rep++) {
      std::vector<float> x(static_cast<size_t>(n));
      for (float& v : x) v = std::round(u(gen) * 2) / 2;
      if (rep % 3 == 1) x[size_t(gen() % n)] = NAN;
      if (rep % 4 == 2) x[size_t(gen() % n)] = -INFINITY;
      double top = -INFINITY, sum = 0;
      for (float v : x)
        if (v == v) top = std::max(top, double(v));
      for (float v : x)
        if (v == v && top > -INFINITY) sum += std::exp(double(v) - top);
      const double ref = top + std::log(sum);
      const double got = log_sum_exp(x.data(), n);
      if (top == -INFINITY)  // nothing above -inf: no probability anywhere
        CHECK(got == -INFINITY);
      else
        CHECK(std::fabs(got - ref) <= 1e-12 * std::max(1.0, std::fabs(ref)));
      std::vector<int32_t> order;
      for (int64_t i = 0; i < n; i++)
        if (x[size_t(i)] == x[size_t(i)]) order.push_back(int32_t(i));
      std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return x[size_t(a)] > x[size_t(b)]; });
      for (int64_t k : {int64_t(0), int64_t(1), int64_t(5), n + 2}) {
        std::vector<int32_t> ids(static_cast<size_t>(k) + 1, -7);
        const int64_t m = top_ids(x.data(), n, k, ids.data());
        CHECK(m == std::min<int64_t>(k, int64_t(order.size())));
        for (int64_t i = 0; i < m; i++) CHECK(ids[size_t(i)] == order[size_t(i)]);
      }
    }
  }
}

int main() {
  test_routing();
  test_routing_families();
  test_routing_random();
  test_gate_logits();
  test_gate_logits_bf16();
  test_dispatch();
  test_dtypes();
  test_options();
  test_factory();
  test_pool();
  test_pool_pinning();
  test_pool_caller_on_worker_core();
  test_quantizer();
  test_exp_weights();
  test_argmax_logits();
  test_token_sampler();
  test_log_softmax_stats();
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Neon}) test_quant_kernels(isa);
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Neon})
    for (DType dt : {DType::F32, DType::BF16}) {
      test_backend(isa, dt, 72, 200, 6, 2, 37);
      test_backend(isa, dt, 33, 17, 3, 3, 5);
    }
  std::printf("%s (%d failures), kernels: %s\n", failures ? "FAILED" : "ok", failures, select_kernels()->name);
  return failures ? 1 : 0;
}
