// The MoE families through the library's C ABI: sigmoid scores, a choice bias, group-limited top-k, the
// routed scale and a shared expert (whole slices of F and a partial one, with and without its gate),
// against a float64 reference written here from the rules (README, "What it computes"): the choice is a
// sort, the library scans.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "data.h"
#include "harness.h"
#include "reference.h"
#include "suites.h"

namespace fmoe_selftest {
namespace {

struct FamilyCase {
  std::string name;
  int64_t H, F, E, k, T, Fs;
  int routing;  // fmoe_cuda_routing
  int dtype;
  double scale;
  int groups, group_topk, top2;
  bool bias, shared_gate;
  uint64_t seed;
};

struct FamilyLayer {
  FamilyCase f;
  HostLayer L;  // the routed experts and the router
  HostLayer S;  // the shared expert as a one-expert layer of width Fs
  std::vector<float> bias, sgate;
};

FamilyLayer make_family(const FamilyCase& f) {
  FamilyLayer m;
  m.f = f;
  m.L = make_layer(Case{f.name, f.H, f.F, f.E, f.k, f.T, 0, f.dtype, f.seed});
  if (f.Fs > 0) m.S = make_layer(Case{f.name + "_shared", f.H, f.Fs, 1, 1, f.T, 0, f.dtype, f.seed * 3 + 1});
  Rng r(f.seed * 5 + 2);
  if (f.bias)
    for (int64_t e = 0; e < f.E; e++) m.bias.push_back(r.uniform(0.05f));
  if (f.shared_gate)
    for (int64_t i = 0; i < f.H; i++) m.sgate.push_back(r.uniform(2.0f / std::sqrt(float(f.H))));
  return m;
}

fmoe_cuda_layer* create_family(const FamilyLayer& m) {
  const FamilyCase& f = m.f;
  fmoe_cuda_config cfg{};
  cfg.hidden = f.H;
  cfg.intermediate = f.F;
  cfg.num_experts = f.E;
  cfg.top_k = f.k;
  cfg.routing = f.routing;
  cfg.weight_dtype = f.dtype;
  cfg.group_count = f.groups;
  cfg.group_topk = f.group_topk;
  cfg.group_top2 = f.top2;
  cfg.shared_gate = f.shared_gate;
  cfg.routed_scale = f.scale;
  cfg.shared_intermediate = f.Fs;
  fmoe_cuda_extras x{};
  x.score_bias = f.bias ? m.bias.data() : nullptr;
  if (f.Fs > 0) {
    x.shared_w1 = m.S.p1[0];
    x.shared_w3 = m.S.p3[0];
    x.shared_w2 = m.S.p2[0];
  }
  x.shared_gate = f.shared_gate ? m.sgate.data() : nullptr;
  char err[512] = {0};
  fmoe_cuda_layer* layer = nullptr;
  const int rc =
      api.create(&cfg, m.L.gate.data(), m.L.p1.data(), m.L.p3.data(), m.L.p2.data(), &x, &layer, err, sizeof err);
  if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_create (family)", err);
  return layer;
}

bool sigmoid_routing(int r) {
  return r == FMOE_CUDA_ROUTING_SIGMOID_TOPK || r == FMOE_CUDA_ROUTING_SIGMOID_TOPK_RENORM;
}
bool renorm_routing(int r) {
  return r == FMOE_CUDA_ROUTING_SOFTMAX_TOPK_RENORM || r == FMOE_CUDA_ROUTING_SIGMOID_TOPK_RENORM;
}

struct FamilyRoute {
  std::vector<double> score, choice;
  std::vector<int> ids;
  double margin = INFINITY;  // smallest gap between neighbours of the orders the choice depends on
};

// Sort order of the picks: larger first, ties to the lower index (no NaN in these inputs).
void rank(std::vector<int>& idx, const std::vector<double>& v) {
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return v[size_t(a)] > v[size_t(b)]; });
}

double gap(const std::vector<int>& idx, const std::vector<double>& v, size_t n) {
  double m = INFINITY;
  for (size_t i = 0; i + 1 < std::min(n, idx.size()); i++) {
    const double d = v[size_t(idx[i])] - v[size_t(idx[i + 1])];
    if (d != 0) m = std::min(m, d);
  }
  return m;
}

FamilyRoute family_route(const FamilyLayer& m, const float* xt) {
  const FamilyCase& f = m.f;
  FamilyRoute R;
  std::vector<double> logit(size_t(f.E));
  for (int64_t e = 0; e < f.E; e++) {
    double s = 0;
    for (int64_t i = 0; i < f.H; i++) s += double(m.L.gate[size_t(e * f.H + i)]) * xt[i];
    logit[size_t(e)] = s;
  }
  const double mx = *std::max_element(logit.begin(), logit.end());
  double sum = 0;
  for (double l : logit) sum += std::exp(l - mx);
  for (int64_t e = 0; e < f.E; e++) {
    const double l = logit[size_t(e)];
    R.score.push_back(sigmoid_routing(f.routing) ? 1 / (1 + std::exp(-l)) : std::exp(l - mx) / sum);
    R.choice.push_back(R.score.back() + (f.bias ? m.bias[size_t(e)] : 0.0));
  }
  std::vector<int> candidates(size_t(f.E));
  std::iota(candidates.begin(), candidates.end(), 0);
  if (f.groups > 0) {
    const int per = int(f.E / f.groups);
    std::vector<double> gs(size_t(f.groups));
    for (int g = 0; g < f.groups; g++) {
      std::vector<int> members(static_cast<size_t>(per));
      std::iota(members.begin(), members.end(), g * per);
      rank(members, R.choice);
      R.margin = std::min(R.margin, gap(members, R.choice, 3));
      gs[size_t(g)] = R.choice[size_t(members[0])] + (f.top2 ? R.choice[size_t(members[1])] : 0.0);
    }
    std::vector<int> order(size_t(f.groups));
    std::iota(order.begin(), order.end(), 0);
    rank(order, gs);
    R.margin = std::min(R.margin, gap(order, gs, size_t(f.group_topk) + 1));
    std::vector<int> kept;
    for (int e : candidates)
      if (std::find(order.begin(), order.begin() + f.group_topk, e / per) != order.begin() + f.group_topk)
        kept.push_back(e);
    candidates = kept;
  }
  rank(candidates, R.choice);
  R.margin = std::min(R.margin, gap(candidates, R.choice, size_t(f.k) + 1));
  R.ids.assign(candidates.begin(), candidates.begin() + f.k);
  return R;
}

// The weights of the experts ids (the library's picks) by the reference's scores.
std::vector<double> family_weights(const FamilyLayer& m, const FamilyRoute& R, const int32_t* ids) {
  const FamilyCase& f = m.f;
  double sum = 0;
  for (int64_t j = 0; j < f.k; j++) sum += R.score[size_t(ids[j])];
  const double denom = renorm_routing(f.routing) ? sum + (sigmoid_routing(f.routing) ? 1e-20 : 0.0) : 1.0;
  std::vector<double> w;
  for (int64_t j = 0; j < f.k; j++) w.push_back(R.score[size_t(ids[j])] / denom * f.scale);
  return w;
}

void run_family(FamilyCase f) {
  f.seed = fresh_seed(f.seed);
  say("family %s: H=%lld F=%lld E=%lld k=%lld T=%lld Fs=%lld %s\n", f.name.c_str(), (long long)f.H, (long long)f.F,
      (long long)f.E, (long long)f.k, (long long)f.T, (long long)f.Fs, dtype_name(f.dtype));
  const FamilyLayer m = make_family(f);
  const std::vector<float> x = make_input(m.L.c, f.seed * 7 + 1);
  fmoe_cuda_layer* layer = create_family(m);
  const std::string tag = "family/" + f.name + "/";
  const std::vector<float> y = forward(layer, x.data(), f.T, f.H);

  std::vector<int32_t> ids(size_t(f.T * f.k), -1);
  std::vector<float> w(size_t(f.T * f.k), NAN);
  char err[512] = {0};
  const int rc = api.route(layer, x.data(), f.T, ids.data(), w.data(), err, sizeof err);
  if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_route (family)", err);

  // The routing: the reference's picks where no near tie could flip them, and the weights of the
  // library's own picks.
  int64_t compared = 0, mismatched = 0, out_of_range = 0;
  double max_dw = 0;
  std::vector<std::vector<double>> ref_w(size_t(f.T));
  for (int64_t t = 0; t < f.T; t++) {
    const int32_t* it = &ids[size_t(t * f.k)];
    for (int64_t j = 0; j < f.k; j++)
      if (it[j] < 0 || it[j] >= f.E) out_of_range++;
    if (out_of_range) break;
    const FamilyRoute R = family_route(m, &x[size_t(t * f.H)]);
    ref_w[size_t(t)] = family_weights(m, R, it);
    for (int64_t j = 0; j < f.k; j++)
      max_dw = std::max(max_dw, std::fabs(double(w[size_t(t * f.k + j)]) - ref_w[size_t(t)][size_t(j)]) /
                                    std::max(1.0, std::fabs(f.scale)));
    if (R.margin < 1e-5) continue;
    compared++;
    for (int64_t j = 0; j < f.k; j++)
      if (it[j] != R.ids[size_t(j)]) mismatched++;
  }
  check(out_of_range == 0 && mismatched == 0 && max_dw < 1e-5, tag + "route",
        std::to_string(compared) + " tokens compared, " + std::to_string(mismatched) + " id mismatches, " +
            std::to_string(out_of_range) + " out of range, max |dw| " + fmt("%.2e", max_dw));
  if (out_of_range) {
    api.destroy(layer);
    return;
  }

  // The block: the library's picks with the reference's weights, plus the (gated) shared expert.
  const std::vector<double> rows = ref_expert_rows(m.L, x, ids);
  std::vector<double> ref(size_t(f.T * f.H), 0.0);
  std::vector<double> shared_rows;
  if (f.Fs > 0) shared_rows = ref_expert_rows(m.S, x, std::vector<int32_t>(size_t(f.T), 0));
  for (int64_t t = 0; t < f.T; t++) {
    double g = 1;
    if (f.shared_gate) {
      double s = 0;
      for (int64_t i = 0; i < f.H; i++) s += double(m.sgate[size_t(i)]) * x[size_t(t * f.H + i)];
      g = 1 / (1 + std::exp(-s));
    }
    for (int64_t o = 0; o < f.H; o++) {
      double v = 0;
      for (int64_t j = 0; j < f.k; j++) v += ref_w[size_t(t)][size_t(j)] * rows[size_t((t * f.k + j) * f.H + o)];
      if (f.Fs > 0) v += g * shared_rows[size_t(t * f.H + o)];
      ref[size_t(t * f.H + o)] = v;
    }
  }
  const double e = rel_l2(y, ref);
  const double tol = f.dtype == 0 ? 1e-5 : 1e-2;
  check(std::isfinite(e) && e < tol, tag + "rel_l2", fmt("%.3e", e) + " (tolerance " + fmt("%.0e", tol) + ")");

  bool invariant = true;
  for (int64_t t : {int64_t(0), f.T - 1}) {
    const std::vector<float> one = forward(layer, &x[size_t(t * f.H)], 1, f.H);
    invariant = invariant && same_bits(one.data(), &y[size_t(t * f.H)], size_t(f.H) * 4);
  }
  check(invariant, tag + "batch_invariant", "tokens 0 and T-1 alone vs in the batch");
  api.destroy(layer);
}

}  // namespace

void run_family_tests() {
  say("\nthe MoE families (C ABI) against float64\n");
  const int sig_renorm = FMOE_CUDA_ROUTING_SIGMOID_TOPK_RENORM, soft = FMOE_CUDA_ROUTING_SOFTMAX_TOPK;
  std::vector<FamilyCase> cases;
  for (int dt = 0; dt < 3; dt++) {
    const std::string d = dtype_name(dt);
    const uint64_t s = 700 + uint64_t(dt) * 10;
    // DeepSeek-V3: sigmoid, bias, 8 groups by top-2 sum, 4 kept, scale 2.5, a shared expert of 2 slices.
    cases.push_back({"deepseek_v3_" + d, 72, 40, 64, 6, 37, 80, sig_renorm, dt, 2.5, 8, 4, 1, true, false, s + 1});
    cases.push_back(
        {"deepseek_v3_e256_" + d, 40, 24, 256, 8, 21, 24, sig_renorm, dt, 2.5, 8, 4, 1, true, false, s + 2});
    // DeepSeek-V2: softmax, 8 groups by max, 3 kept, scale 16, one slice.
    cases.push_back({"deepseek_v2_" + d, 72, 40, 64, 6, 37, 40, soft, dt, 16.0, 8, 3, 0, false, false, s + 3});
    // Qwen2-MoE: softmax without renormalisation, a gated shared expert of 2.5 slices.
    cases.push_back({"qwen2_moe_" + d, 72, 40, 60, 4, 37, 100, soft, dt, 1.0, 0, 0, 0, false, true, s + 4});
    // k = 1 sigmoid without renormalisation, no shared expert.
    cases.push_back(
        {"sigmoid_k1_" + d, 33, 17, 8, 1, 19, 0, FMOE_CUDA_ROUTING_SIGMOID_TOPK, dt, 1.0, 0, 0, 0, true, false, s + 5});
  }
  for (const FamilyCase& f : cases) run_family(f);
}

}  // namespace fmoe_selftest
