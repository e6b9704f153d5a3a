// The whole layer through the library's C ABI (dlopen, as the addon does) against the float64 reference:
// odd sizes, the expert counts and top-k of the field, both routings, every weight dtype, ties, a NaN
// router row, non-finite tokens, route(), the device-pointer entry points and batch invariance.
#include <cmath>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "data.h"
#include "harness.h"
#include "reference.h"
#include "suites.h"

namespace fmoe_selftest {

fmoe_cuda_layer* create(const HostLayer& L) {
  fmoe_cuda_config cfg{};
  cfg.hidden = L.c.H;
  cfg.intermediate = L.c.F;
  cfg.num_experts = L.c.E;
  cfg.top_k = L.c.k;
  cfg.routing = L.c.routing;
  cfg.weight_dtype = L.c.dtype;
  cfg.device = 0;
  cfg.routed_scale = 1.0;  // zero is rejected: the ABI has no implicit defaults
  char err[512] = {0};
  fmoe_cuda_layer* layer = nullptr;
  const int rc =
      api.create(&cfg, L.gate.data(), L.p1.data(), L.p3.data(), L.p2.data(), nullptr, &layer, err, sizeof err);
  if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_create", err);
  return layer;
}

std::vector<float> forward(fmoe_cuda_layer* layer, const float* x, int64_t T, int64_t H) {
  std::vector<float> y(size_t(T * H));
  memset(y.data(), 0xFF, y.size() * 4);
  char err[512] = {0};
  const int rc = api.forward(layer, x, T, y.data(), err, sizeof err);
  if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_forward", err);
  return y;
}

namespace {

// The library's routing of x: ids and weights [T, k], both poisoned before the call.
void route(fmoe_cuda_layer* layer, const std::vector<float>& x, const Case& c, std::vector<int32_t>& ids,
           std::vector<float>& w) {
  ids.assign(size_t(c.T * c.k), 0);
  w.assign(size_t(c.T * c.k), 0.0f);
  memset(ids.data(), 0x7F, ids.size() * 4);
  memset(w.data(), 0xFF, w.size() * 4);
  char err[512] = {0};
  const int rc = api.route(layer, x.data(), c.T, ids.data(), w.data(), err, sizeof err);
  if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_route", err);
}

bool ids_in_range(const std::vector<int32_t>& ids, int64_t E) {
  for (int32_t id : ids)
    if (id < 0 || id >= E) return false;
  return true;
}

// Relative L2 error of y against the float64 layer run with the experts the library picked (ids from
// route, which runs the forward's router kernel); NaN when an id is out of range.
double rel_l2_given_routing(const HostLayer& L, const std::vector<float>& x, const std::vector<int32_t>& ids,
                            const std::vector<float>& y) {
  if (!ids_in_range(ids, L.c.E)) return NAN;
  return rel_l2(y, ref_forward(L, x, ids));
}

void run_case(Case c) {
  c.seed = fresh_seed(c.seed);
  say("case %s: H=%lld F=%lld E=%lld k=%lld T=%lld %s routing=%d%s%s\n", c.name.c_str(), (long long)c.H, (long long)c.F,
      (long long)c.E, (long long)c.k, (long long)c.T, dtype_name(c.dtype), c.routing, c.ties ? " ties" : "",
      c.nan_gate ? " nan-router-row" : "");
  const HostLayer L = make_layer(c);
  const std::vector<float> x = make_input(c, c.seed * 7 + 1);
  fmoe_cuda_layer* layer = create(L);
  const std::string tag = "layer/" + c.name + "/";

  const std::vector<float> y = forward(layer, x.data(), c.T, c.H);
  std::vector<int32_t> ids;
  std::vector<float> w;
  route(layer, x, c, ids, w);
  // The FFN and combine are checked with the GPU's choice of experts, and that choice separately below
  // (with a margin for near ties), so one expert flipped by float32 rounding cannot fail a run.
  const double err = rel_l2_given_routing(L, x, ids, y);
  const double tol = c.dtype == 0 ? 1e-5 : 1e-2;
  check(std::isfinite(err) && err < tol, tag + "rel_l2", fmt("%.3e", err) + " (tolerance " + fmt("%.0e", tol) + ")");

  const std::vector<float> y2 = forward(layer, x.data(), c.T, c.H);
  check(same_bits(y.data(), y2.data(), y.size() * 4), tag + "repeatable", "second forward, same bits");

  bool invariant = true;
  for (int64_t t : {int64_t(0), c.T / 2, c.T - 1}) {
    const std::vector<float> one = forward(layer, &x[size_t(t * c.H)], 1, c.H);
    invariant = invariant && same_bits(one.data(), &y[size_t(t * c.H)], size_t(c.H) * 4);
  }
  check(invariant, tag + "batch_invariant", "tokens 0, T/2, T-1 alone vs in the batch");

  int64_t compared = 0, mismatched = 0, bad_sets = 0;
  double max_werr = 0;
  for (int64_t t = 0; t < c.T; t++) {
    std::set<int32_t> distinct;
    for (int64_t j = 0; j < c.k; j++) {
      const int32_t id = ids[size_t(t * c.k + j)];
      if (id < 0 || id >= c.E) bad_sets++;
      distinct.insert(id);
    }
    if (int64_t(distinct.size()) != c.k) bad_sets++;
    const RefRoute R = ref_route(L, &x[size_t(t * c.H)]);
    if (R.margin < 1e-5) continue;  // near tie: float32 and float64 may legitimately disagree
    compared++;
    for (int64_t j = 0; j < c.k; j++) {
      if (ids[size_t(t * c.k + j)] != R.ids[size_t(j)]) mismatched++;
      const double d = std::fabs(double(w[size_t(t * c.k + j)]) - R.w[size_t(j)]);
      max_werr = std::isnan(d) ? INFINITY : std::max(max_werr, d);
    }
  }
  check(mismatched == 0 && bad_sets == 0 && max_werr < 1e-5, tag + "route",
        std::to_string(compared) + " tokens compared, " + std::to_string(mismatched) + " id mismatches, " +
            std::to_string(bad_sets) + " bad id sets, max |dw| " + fmt("%.2e", max_werr));

  // The device-pointer entry point gives the same bits as the host one.
  {
    char errbuf[512] = {0};
    int rc;
    Dev dx(x.size() * 4), dy(y.size() * 4);
    dx.put(x.data(), x.size() * 4);
    dy.poison(0xFF);
    rc = api.forward_device(layer, dx.as<float>(), c.T, dy.as<float>(), errbuf, sizeof errbuf);
    if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_forward_device", errbuf);
    const std::vector<float> y3 = dy.get<float>(y.size());
    check(same_bits(y.data(), y3.data(), y.size() * 4), tag + "device_entry", "forward_device, same bits");
    // Queued twice without waiting (the second overwrites the first in stream order), then waited for.
    dy.poison(0xFF);
    for (int i = 0; i < 2; i++) {
      rc = api.enqueue_device(layer, dx.as<float>(), c.T, dy.as<float>(), errbuf, sizeof errbuf);
      if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_enqueue_device", errbuf);
    }
    rc = api.synchronize(layer, errbuf, sizeof errbuf);
    if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_synchronize", errbuf);
    const std::vector<float> y4 = dy.get<float>(y.size());
    check(same_bits(y.data(), y4.data(), y.size() * 4), tag + "enqueue_entry",
          "enqueue_device + synchronize, same bits");
  }
  api.destroy(layer);
}

// Non-finite input: no crash, ids in range, the other tokens unchanged.
void run_nonfinite(int dtype) {
  Case c{std::string("nonfinite_") + dtype_name(dtype), 64, 128, 8, 2, 8, 0, dtype, fresh_seed(99 + uint64_t(dtype))};
  say("case %s\n", c.name.c_str());
  const HostLayer L = make_layer(c);
  std::vector<float> x = make_input(c, c.seed + 5);
  fmoe_cuda_layer* layer = create(L);
  const std::vector<float> clean = forward(layer, x.data(), c.T, c.H);
  x[size_t(2 * c.H + 3)] = NAN;
  x[size_t(5 * c.H + 1)] = INFINITY;
  for (int64_t i = 0; i < c.H; i++) x[size_t(6 * c.H + i)] = -INFINITY;
  const std::vector<float> y = forward(layer, x.data(), c.T, c.H);
  const std::vector<float> y2 = forward(layer, x.data(), c.T, c.H);
  bool others = true;
  for (int64_t t = 0; t < c.T; t++)
    if (t != 2 && t != 5 && t != 6)
      others = others && same_bits(&y[size_t(t * c.H)], &clean[size_t(t * c.H)], size_t(c.H) * 4);
  check(others, "layer/" + c.name + "/others_unchanged", "finite tokens keep their bits");
  check(same_bits(y.data(), y2.data(), y.size() * 4), "layer/" + c.name + "/repeatable", "second forward, same bits");
  std::vector<int32_t> ids(size_t(c.T * c.k));
  std::vector<float> w(size_t(c.T * c.k));
  memset(ids.data(), 0x7F, ids.size() * 4);
  char err[512] = {0};
  const int rc = api.route(layer, x.data(), c.T, ids.data(), w.data(), err, sizeof err);
  bool in_range = rc == FMOE_CUDA_OK;
  for (int32_t id : ids) in_range = in_range && id >= 0 && id < c.E;
  for (int64_t t = 0; t < c.T; t++) in_range = in_range && ids[size_t(t * c.k)] != ids[size_t(t * c.k + 1)];
  check(in_range, "layer/" + c.name + "/ids_in_range", "route ids in [0, E) and distinct per token");
  api.destroy(layer);
}

// The Mixtral-8x7B shape at T = 3 against float64 (one set of expert weights shared by all experts, to
// keep the host reference small; the device holds E separate copies).
void run_mixtral_check() {
  Case c{"mixtral_bf16", 4096, 14336, 8, 2, 3, 0, 1, fresh_seed(1234), true};
  say("case %s: H=4096 F=14336 E=8 k=2 T=3 bf16\n", c.name.c_str());
  const double t0 = now_s();
  const HostLayer L = make_layer(c);
  fmoe_cuda_layer* layer = create(L);
  const std::vector<float> x = make_input(c, c.seed + 77);
  const std::vector<float> y = forward(layer, x.data(), c.T, c.H);
  const std::vector<float> y2 = forward(layer, x.data(), c.T, c.H);
  std::vector<int32_t> ids;
  std::vector<float> w;
  route(layer, x, c, ids, w);
  const double err = rel_l2_given_routing(L, x, ids, y);
  check(std::isfinite(err) && err < 1e-2, "layer/mixtral_bf16/rel_l2", fmt("%.3e", err) + " (tolerance 1e-02)");
  check(same_bits(y.data(), y2.data(), y.size() * 4), "layer/mixtral_bf16/repeatable", "second forward, same bits");
  api.destroy(layer);
  say("  (%.1f s)\n", now_s() - t0);
}

}  // namespace

void run_layer_tests() {
  say("\nthe whole layer (C ABI) against float64\n");
  std::vector<Case> cases;
  for (int dt = 0; dt < 3; dt++) {
    const std::string d = dtype_name(dt);
    const uint64_t s = uint64_t(dt) * 100;
    cases.push_back({"odd_" + d, 72, 200, 6, 2, 37, 0, dt, s + 1});
    cases.push_back({"odd_k1_" + d, 72, 200, 6, 1, 37, 0, dt, s + 2});
    cases.push_back({"odd_k4_topk_" + d, 72, 200, 6, 4, 37, 1, dt, s + 3});
    cases.push_back({"tiny_" + d, 33, 17, 3, 3, 5, 0, dt, s + 4});
    cases.push_back({"small_T1_" + d, 256, 512, 8, 2, 1, 0, dt, s + 5});
    cases.push_back({"small_T16_" + d, 256, 512, 8, 2, 16, 0, dt, s + 6});
    cases.push_back({"small_T300_" + d, 256, 512, 8, 2, 300, 0, dt, s + 7});
    cases.push_back({"small_T700_" + d, 256, 512, 8, 2, 700, 1, dt, s + 8});  // 128-row tiles (16-bit)
    cases.push_back({"many_experts_" + d, 40, 24, 256, 8, 9, 0, dt, s + 9});
    cases.push_back({"e1024_" + d, 64, 64, 1024, 6, 40, 0, dt, s + 10});
    // The expert counts and top-k of the field (Mixtral 8/2, DeepSeek/Qwen 60-64/4-8), odd sizes, both
    // routings, exact ties and a NaN router row.
    uint64_t n = 20;
    for (int64_t E : {8, 16, 60, 64})
      for (int64_t k : {1, 2, 4, 8}) {
        if (k > E) continue;
        const int routing = int((E + k) % 2);
        Case c{"E" + std::to_string(E) + "_k" + std::to_string(k) + "_r" + std::to_string(routing) + "_" + d,
               137,
               203,
               E,
               k,
               k >= 4 ? 41 : 131,
               routing,
               dt,
               s + n++};
        c.ties = (k % 2) == 0;
        c.nan_gate = E > k + 1 && k != 2;
        if (c.ties) c.name += "_ties";
        if (c.nan_gate) c.name += "_nan";
        cases.push_back(c);
      }
  }
  cases.push_back({"chunked_bf16", 64, 96, 8, 2, 5000, 0, 1, 500});  // more than one chunk
  for (const Case& c : cases) run_case(c);
  for (int dt = 0; dt < 3; dt++) run_nonfinite(dt);
  run_mixtral_check();
}

}  // namespace fmoe_selftest
