#include "reference.h"

#include <algorithm>
#include <cmath>
#include <functional>

#include "harness.h"

namespace fmoe_selftest {

RefRoute ref_route_raw(const float* gate, int64_t H, int64_t E, int64_t k, int routing, const float* xt) {
  std::vector<double> logit(static_cast<size_t>(E)), p(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; e++) {
    double s = 0;
    for (int64_t i = 0; i < H; i++) s += double(gate[size_t(e * H + i)]) * double(xt[i]);
    logit[size_t(e)] = s;
  }
  double mx = -INFINITY;
  for (double l : logit)
    if (!std::isnan(l) && l > mx) mx = l;
  double sum = 0;
  for (int64_t e = 0; e < E; e++) {
    const double l = logit[size_t(e)];
    double v = std::isnan(l) ? NAN : (std::isinf(mx) && mx > 0) ? (l == mx ? 1.0 : 0.0) : std::exp(l - mx);
    p[size_t(e)] = v;
    if (!std::isnan(v)) sum += v;
  }
  for (auto& v : p) v /= sum;
  std::vector<int> order(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; e++) order[size_t(e)] = int(e);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    const bool na = std::isnan(p[size_t(a)]), nb = std::isnan(p[size_t(b)]);
    if (na != nb) return nb;
    if (!na && p[size_t(a)] != p[size_t(b)]) return p[size_t(a)] > p[size_t(b)];
    return a < b;
  });
  RefRoute R;
  double picked = 0;
  for (int64_t j = 0; j < k; j++) {
    R.ids.push_back(order[size_t(j)]);
    picked += p[size_t(order[size_t(j)])];
  }
  for (int64_t j = 0; j < k; j++) {
    const double v = p[size_t(R.ids[size_t(j)])];
    R.w.push_back(routing == 0 ? v / picked : v);
  }
  R.margin = 1.0;
  for (int64_t j = 0; j < k && j + 1 < E; j++) {
    const double a = p[size_t(order[size_t(j)])], b = p[size_t(order[size_t(j + 1)])];
    if (std::isnan(a) || std::isnan(b) || a == b) continue;
    R.margin = std::min(R.margin, a - b);
  }
  R.p = p;
  return R;
}

RefRoute ref_route(const HostLayer& L, const float* xt) {
  return ref_route_raw(L.gate.data(), L.c.H, L.c.E, L.c.k, L.c.routing, xt);
}

std::vector<double> ref_weights_for(const HostLayer& L, const float* xt, const int32_t* ids) {
  const RefRoute R = ref_route(L, xt);
  double picked = 0;
  for (int64_t j = 0; j < L.c.k; j++) picked += R.p[size_t(ids[j])];
  std::vector<double> w(size_t(L.c.k));
  for (int64_t j = 0; j < L.c.k; j++) {
    const double v = R.p[size_t(ids[j])];
    w[size_t(j)] = L.c.routing == 0 ? v / picked : v;
  }
  return w;
}

// One token's output row in float64, with experts ids[0..k). `inner` runs a loop over [0, n): in parallel
// for a single token at full size, serially when the caller already spreads tokens over the cores.
static void ref_token(const HostLayer& L, const float* xt, const int32_t* ids, double* out,
                      const std::function<void(int64_t, const std::function<void(int64_t)>&)>& inner) {
  const Case& c = L.c;
  std::vector<double> h(size_t(c.F));
  const std::vector<double> w = ref_weights_for(L, xt, ids);
  for (int64_t j = 0; j < c.k; j++) {
    const size_t e = c.shared_experts ? 0 : size_t(ids[j]);
    const float* w1 = L.x1[e].data();
    const float* w3 = L.x3[e].data();
    const float* w2 = L.x2[e].data();
    inner(c.F, [&](int64_t f) {
      double a = 0, b = 0;
      for (int64_t i = 0; i < c.H; i++) {
        a += double(w1[f * c.H + i]) * xt[i];
        b += double(w3[f * c.H + i]) * xt[i];
      }
      h[size_t(f)] = a / (1.0 + std::exp(-a)) * b;
    });
    const double wj = w[size_t(j)];
    inner(c.H, [&](int64_t o) {
      double s = 0;
      for (int64_t f = 0; f < c.F; f++) s += double(w2[o * c.F + f]) * h[size_t(f)];
      out[o] += wj * s;
    });
  }
}

std::vector<double> ref_forward(const HostLayer& L, const std::vector<float>& x, const std::vector<int32_t>& ids) {
  const Case& c = L.c;
  std::vector<double> out(size_t(c.T * c.H), 0.0);
  auto serial = [](int64_t n, const std::function<void(int64_t)>& fn) {
    for (int64_t i = 0; i < n; i++) fn(i);
  };
  if (c.T >= 16) {
    parallel_for(c.T, [&](int64_t t) {
      ref_token(L, &x[size_t(t * c.H)], &ids[size_t(t * c.k)], &out[size_t(t * c.H)], serial);
    });
  } else {
    for (int64_t t = 0; t < c.T; t++)
      ref_token(L, &x[size_t(t * c.H)], &ids[size_t(t * c.k)], &out[size_t(t * c.H)], parallel_for);
  }
  return out;
}

std::vector<double> ref_expert_rows(const HostLayer& L, const std::vector<float>& x,
                                    const std::vector<int32_t>& picks) {
  const int64_t H = L.c.H, F = L.c.F, k = L.c.k;
  const int dtype = L.c.dtype;
  const int64_t n_rows = int64_t(picks.size());
  std::vector<double> yref(size_t(n_rows * H));
  parallel_for(n_rows, [&](int64_t row) {
    const int64_t t = row / k;
    const size_t e = size_t(picks[size_t(row)]);
    const float* xt = &x[size_t(t * H)];
    std::vector<double> h(static_cast<size_t>(F));
    for (int64_t f = 0; f < F; f++) {
      double a = 0, b = 0;
      for (int64_t i = 0; i < H; i++) {
        a += double(L.x1[e][size_t(f * H + i)]) * xt[i];
        b += double(L.x3[e][size_t(f * H + i)]) * xt[i];
      }
      double v = a / (1.0 + std::exp(-a)) * b;
      if (dtype == 1) v = bf16_to_f32(f32_to_bf16(float(v)));
      if (dtype == 2) v = f16_to_f32(f32_to_f16(float(v)));
      h[size_t(f)] = v;
    }
    for (int64_t o = 0; o < H; o++) {
      double s = 0;
      for (int64_t f = 0; f < F; f++) s += double(L.x2[e][size_t(o * F + f)]) * h[size_t(f)];
      yref[size_t(row * H + o)] = s;
    }
  });
  return yref;
}

double rel_l2(const float* y, const double* ref, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    num += (double(y[i]) - ref[i]) * (double(y[i]) - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}
double rel_l2(const std::vector<float>& y, const std::vector<double>& ref) {
  return rel_l2(y.data(), ref.data(), ref.size());
}

HostDispatch ref_dispatch(const std::vector<int32_t>& experts, int64_t E, int64_t bm) {
  HostDispatch D;
  std::vector<int64_t> count(size_t(E), 0), base(size_t(E), 0), next(size_t(E), 0);
  for (int32_t e : experts) count[size_t(e)]++;
  int64_t total = 0;
  for (int64_t e = 0; e < E; e++) {
    base[size_t(e)] = total;
    total += (count[size_t(e)] + bm - 1) / bm * bm;
  }
  D.num_tiles = int32_t(total / bm);
  D.sorted_rows.assign(size_t(total), -1);
  D.inv.assign(experts.size(), -1);
  D.tile_expert.assign(size_t(D.num_tiles), -1);
  for (int64_t e = 0; e < E; e++)
    for (int64_t t = base[size_t(e)] / bm; t < (base[size_t(e)] + (count[size_t(e)] + bm - 1) / bm * bm) / bm; t++)
      D.tile_expert[size_t(t)] = int32_t(e);
  for (size_t r = 0; r < experts.size(); r++) {
    const int32_t e = experts[r];
    const int64_t pos = base[size_t(e)] + next[size_t(e)]++;
    D.sorted_rows[size_t(pos)] = int32_t(r);
    D.inv[r] = int32_t(pos);
  }
  return D;
}

}  // namespace fmoe_selftest
