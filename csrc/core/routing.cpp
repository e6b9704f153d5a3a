#include "routing.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "dtype.h"
#include "error.h"

namespace fmoe {

namespace {

// Four float lanes (GCC's vector extension: one SSE or NEON register); a sum's eight lanes are two.
typedef float Lanes4 __attribute__((vector_size(16)));

inline Lanes4 load4(const float* p) {
  Lanes4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Eight values as two groups of four lanes: from float32, or from bf16 widened exactly (each value the
// high half of its float's bits: interleaved after a zero half on these little-endian targets, one
// unpack per group on SSE2 and NEON).
inline void load8(const float* p, Lanes4& lo, Lanes4& hi) {
  lo = load4(p);
  hi = load4(p + 4);
}

inline void load8(const uint16_t* p, Lanes4& lo, Lanes4& hi) {
  typedef uint16_t Half8 __attribute__((vector_size(16)));
  Half8 h;
  std::memcpy(&h, p, sizeof h);
  const Half8 zero = {};
  const Half8 l = __builtin_shufflevector(zero, h, 0, 8, 1, 9, 2, 10, 3, 11);
  const Half8 u = __builtin_shufflevector(zero, h, 4, 12, 5, 13, 6, 14, 7, 15);
  std::memcpy(&lo, &l, sizeof lo);
  std::memcpy(&hi, &u, sizeof hi);
}

inline float value_at(const float* g, int64_t i) { return g[i]; }
inline float value_at(const uint16_t* g, int64_t i) { return bf16_to_f32(g[i]); }

// NB experts' logits for one token, each summed exactly as gate_logits documents: expert q's row at
// g + q * rows_apart rows of H, its logit at out[q * rows_apart]. The token's values are loaded once for
// the NB experts and the 8 * NB sums run side by side; one expert at a time left each sum waiting on its
// previous add (`bench/ab-builds.js`, Zen 5, 2 cores: qwen3-decode-bf16 0.92 / 0.94,
// dsv2lite-decode-bf16 0.95, qwen3-prefill-f32 0.96).
template <int NB, class G>
inline void gate_block(const float* xt, int64_t H, const G* g, int64_t rows_apart, float* out) {
  const int64_t stride = rows_apart * H;
  Lanes4 lo[NB], hi[NB];  // lanes 0-3 and 4-7 of each expert's eight sums
  for (int q = 0; q < NB; q++) lo[q] = hi[q] = Lanes4{};
  int64_t h = 0;
  // At decode the rows come from memory, four streams of a few rows each (32 KiB a stream for Qwen3's
  // 128 experts, 4 items): each stream's line 2 KiB ahead is asked for, non-temporally (past a row's
  // end: the stream's next row, which the next block reads). One Qwen3-width layer at one token
  // (`FUSED_MOE_ISA=avx512bf16 node bench/ab-builds.js OLD NEW qwen3-decode-int4 150 32`, both orders):
  // 0.984 and 0.965; a Qwen3 int4 step (`bench/ab-model.js`), 0.996.
  constexpr int64_t kLine = 64 / sizeof(G), kAhead = 2048 / sizeof(G);
  for (; h + 8 <= H; h += 8) {
    const Lanes4 xl = load4(xt + h), xh = load4(xt + h + 4);
    if (NB > 1 && h % kLine == 0)
      for (int q = 0; q < NB; q++) __builtin_prefetch(g + q * stride + h + kAhead, 0, 0);
    for (int q = 0; q < NB; q++) {
      Lanes4 gl, gh;
      load8(g + q * stride + h, gl, gh);
      lo[q] += xl * gl;
      hi[q] += xh * gh;
    }
  }
  for (int q = 0; q < NB; q++) {
    double sum = 0;
    for (int j = 0; j < 4; j++) sum += lo[q][j];
    for (int j = 0; j < 4; j++) sum += hi[q][j];
    for (int64_t i = h; i < H; i++) sum += double(xt[i]) * value_at(g, q * stride + i);
    out[q * rows_apart] = float(sum);
  }
}

template <class G>
void gate_logits_of(const float* x, int64_t T, int64_t H, const G* gate, int64_t E, float* logits, int64_t ld) {
  if (ld == 0) ld = E;
  for (int64_t t = 0; t < T; t++) {
    const float* xt = x + t * H;
    float* out = logits + t * ld;
    // The four rows of a block are a quarter of the experts apart, so that a router read from memory at
    // decode is four long streams, not runs of four adjacent rows a few KiB long, which the prefetchers
    // barely start on (`node bench/model.js --models qwen3moe --formats int4 --engines ours`, builds in
    // turn: the mlp part, 1 MiB of router a layer, read 63-70% of the probe before, 66-75% after). The
    // bits do not change: each logit is still its own row's sum.
    const int64_t quarter = E / 4;
    for (int64_t e = 0; e < quarter; e++) gate_block<4>(xt, H, gate + e * H, quarter, out + e);
    for (int64_t e = 4 * quarter; e < E; e++) gate_block<1>(xt, H, gate + e * H, 1, out + e);
  }
}

}  // namespace

void gate_logits(const float* x, int64_t T, int64_t H, const float* gate, int64_t E, float* logits, int64_t ld) {
  gate_logits_of(x, T, H, gate, E, logits, ld);
}

void gate_logits_bf16(const float* x, int64_t T, int64_t H, const uint16_t* gate, int64_t E, float* logits,
                      int64_t ld) {
  gate_logits_of(x, T, H, gate, E, logits, ld);
}

// a is a better pick than b: larger value, NaN ranks below every number, ties to the lower index.
static inline bool better(double va, int64_t ia, double vb, int64_t ib) {
  bool na = std::isnan(va), nb = std::isnan(vb);
  if (na != nb) return nb;
  if (!na && va != vb) return va > vb;
  return ia < ib;
}

RouteSpec route_spec(const MoeConfig& cfg, const float* bias) {
  RouteSpec s;
  s.num_experts = cfg.num_experts;
  s.top_k = cfg.top_k;
  s.routing = cfg.routing;
  s.scale = cfg.routed_scale;
  s.groups = cfg.groups;
  s.bias = bias;
  return s;
}

// Softmax in double over the finite-or-inf logits; NaN logits get NaN probability. The sum is 0 only
// when every logit is -inf or NaN: p becomes NaN and the output follows.
static void softmax_row(const float* l, int64_t E, double* p) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t e = 0; e < E; e++)
    if (!std::isnan(l[e]) && l[e] > mx) mx = l[e];
  double sum = 0;
  for (int64_t e = 0; e < E; e++) {
    double v;
    if (std::isnan(l[e]))
      v = NAN;
    else if (std::isinf(mx) && mx > 0)
      v = (l[e] == mx) ? 1.0 : 0.0;  // +inf logits share the mass
    else
      v = std::exp(double(l[e]) - mx);
    p[e] = v;
    if (!std::isnan(v)) sum += v;
  }
  for (int64_t e = 0; e < E; e++) p[e] = p[e] / sum;
}

static void sigmoid_row(const float* l, int64_t E, double* p) {
  for (int64_t e = 0; e < E; e++) p[e] = 1.0 / (1.0 + std::exp(-double(l[e])));  // NaN stays NaN
}

// The best of [begin, end) not yet excluded, by `better`; -1 when all are.
static int64_t best_of(const double* v, const uint8_t* excluded, int64_t begin, int64_t end) {
  int64_t best = -1;
  for (int64_t e = begin; e < end; e++) {
    if (excluded[e]) continue;
    if (best < 0 || better(v[e], e, v[best], best)) best = e;
  }
  return best;
}

// The k best of [0, E) not excluded, best first, by `better` (a strict total order: no two experts
// rank alike), into ids: one pass that keeps the best k so far in order, the same picks as k scans for
// the best one left, with about E comparisons instead of k * E (1,024 at Qwen3's 128 experts and k = 8,
// each token of each layer, on the calling thread). Returns how many it found (fewer than k where fewer
// are left).
static int64_t best_k(const double* v, const uint8_t* excluded, int64_t E, int64_t k, int32_t* ids) {
  int64_t n = 0;
  for (int64_t e = 0; e < E; e++) {
    if (excluded[e] || (n == k && !better(v[e], e, v[ids[k - 1]], ids[k - 1]))) continue;
    int64_t at = n < k ? n++ : k - 1;
    for (; at > 0 && better(v[e], e, v[ids[at - 1]], ids[at - 1]); at--) ids[at] = ids[at - 1];
    ids[at] = int32_t(e);
  }
  return n;
}

void route_topk(const float* logits, int64_t T, const RouteSpec& spec, int32_t* experts, float* weights) {
  const int64_t E = spec.num_experts, k = spec.top_k;
  const int64_t G = spec.groups.count, per_group = G > 0 ? E / G : E;
  std::vector<double> score(static_cast<size_t>(E)), choice(static_cast<size_t>(E)),
      group_score(static_cast<size_t>(G));
  std::vector<uint8_t> excluded(static_cast<size_t>(E)), group_out(static_cast<size_t>(G)),
      group_taken(static_cast<size_t>(G));
  for (int64_t t = 0; t < T; t++) {
    const float* l = logits + t * E;
    if (routing_sigmoid(spec.routing))
      sigmoid_row(l, E, score.data());
    else
      softmax_row(l, E, score.data());
    for (int64_t e = 0; e < E; e++) choice[size_t(e)] = spec.bias ? score[size_t(e)] + spec.bias[e] : score[size_t(e)];
    std::fill(excluded.begin(), excluded.end(), uint8_t(0));
    if (G > 0) {
      // Rank the groups, keep the best groups.top_k and exclude the experts of the others outright, so a
      // NaN score inside a kept group still ranks above them.
      for (int64_t g = 0; g < G; g++) {
        // The best and second best of the group, by the same order as the picks.
        int64_t first = g * per_group, second = -1;
        for (int64_t e = first + 1; e < (g + 1) * per_group; e++) {
          if (better(choice[size_t(e)], e, choice[size_t(first)], first)) {
            second = first;
            first = e;
          } else if (second < 0 || better(choice[size_t(e)], e, choice[size_t(second)], second)) {
            second = e;
          }
        }
        group_score[size_t(g)] = spec.groups.score == GroupScore::Top2Sum
                                     ? choice[size_t(first)] + choice[size_t(second)]
                                     : choice[size_t(first)];
      }
      std::fill(group_out.begin(), group_out.end(), uint8_t(1));
      std::fill(group_taken.begin(), group_taken.end(), uint8_t(0));
      for (int64_t j = 0; j < spec.groups.top_k; j++) {
        const int64_t g = best_of(group_score.data(), group_taken.data(), 0, G);
        group_taken[size_t(g)] = 1;
        group_out[size_t(g)] = 0;
      }
      for (int64_t e = 0; e < E; e++) excluded[size_t(e)] = group_out[size_t(e / per_group)];
    }
    int32_t* ids = experts + t * k;
    float* w = weights + t * k;
    if (best_k(choice.data(), excluded.data(), E, k, ids) < k)
      fail(ErrorCode::Internal, "route_topk: fewer experts left than top_k");
    double picked_sum = 0;
    for (int64_t j = 0; j < k; j++) picked_sum += score[size_t(ids[j])];
    // Sigmoid scores may all be tiny: the epsilon keeps the division finite, as the reference models do.
    const double denom = spec.routing == Routing::SigmoidTopkRenorm   ? picked_sum + 1e-20
                         : spec.routing == Routing::SoftmaxTopkRenorm ? picked_sum
                                                                      : 1.0;
    for (int64_t j = 0; j < k; j++) w[j] = float(score[size_t(ids[j])] / denom * spec.scale);
  }
}

void route_topk(const float* logits, int64_t T, int64_t E, int64_t k, Routing routing, int32_t* experts,
                float* weights) {
  RouteSpec s;
  s.num_experts = E;
  s.top_k = k;
  s.routing = routing;
  route_topk(logits, T, s, experts, weights);
}

}  // namespace fmoe
