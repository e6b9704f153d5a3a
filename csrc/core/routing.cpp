#include "routing.h"

#include <cmath>
#include <limits>
#include <vector>

namespace fmoe {

void gate_logits(const float* x, int64_t T, int64_t H, const float* gate, int64_t E, float* logits) {
  for (int64_t t = 0; t < T; t++) {
    const float* xt = x + t * H;
    for (int64_t e = 0; e < E; e++) {
      const float* g = gate + e * H;
      // Eight float32 partial sums (one vector of lanes, so the loop vectorises), each over H/8
      // products; they and the tail are then added in double.
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t h = 0;
      for (; h + 8 <= H; h += 8)
        for (int j = 0; j < 8; j++) acc[j] += xt[h + j] * g[h + j];
      double sum = 0;
      for (int j = 0; j < 8; j++) sum += acc[j];
      for (; h < H; h++) sum += double(xt[h]) * g[h];
      logits[t * E + e] = float(sum);
    }
  }
}

// a is a better pick than b: larger value, NaN ranks below every number, ties to the lower index.
static inline bool better(double va, int64_t ia, double vb, int64_t ib) {
  bool na = std::isnan(va), nb = std::isnan(vb);
  if (na != nb) return nb;
  if (!na && va != vb) return va > vb;
  return ia < ib;
}

void route_topk(const float* logits, int64_t T, int64_t E, int64_t k, Routing routing, int32_t* experts,
                float* weights) {
  std::vector<double> p(E);
  for (int64_t t = 0; t < T; t++) {
    const float* l = logits + t * E;
    // Softmax in double over the finite-or-inf logits; NaN logits get NaN probability.
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
    // sum is 0 only when every logit is -inf or NaN: p becomes NaN and the output follows.
    for (int64_t e = 0; e < E; e++) p[e] = p[e] / sum;
    // Selection by repeated scans: k is small, and this keeps the tie and NaN rules obvious.
    int32_t* ids = experts + t * k;
    float* w = weights + t * k;
    uint64_t taken_small = 0;
    std::vector<bool> taken(E > 64 ? E : 0, false);
    auto is_taken = [&](int64_t e) { return E > 64 ? bool(taken[e]) : bool((taken_small >> e) & 1u); };
    auto set_taken = [&](int64_t e) {
      if (E > 64)
        taken[e] = true;
      else
        taken_small |= uint64_t(1) << e;
    };
    double picked_sum = 0;
    for (int64_t j = 0; j < k; j++) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; e++) {
        if (is_taken(e)) continue;
        if (best < 0 || better(p[e], e, p[best], best)) best = e;
      }
      set_taken(best);
      ids[j] = int32_t(best);
      w[j] = float(p[best]);
      picked_sum += p[best];
    }
    if (routing == Routing::SoftmaxTopkRenorm) {
      for (int64_t j = 0; j < k; j++) w[j] = float(p[ids[j]] / picked_sum);
    }
  }
}

}  // namespace fmoe
