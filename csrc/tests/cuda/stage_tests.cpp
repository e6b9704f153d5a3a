// Each pipeline stage on its own, through the launchers of moe_cuda.cuh linked into this program (its
// own CUDA runtime, default stream), against host references: gating, dispatch, the input conversion to
// 16 bits, the expert FFN in every tile configuration, combine.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "data.h"
#include "harness.h"
#include "moe_cuda.cuh"
#include "reference.h"
#include "suites.h"

namespace fmoe_selftest {
namespace {

// Router: experts and weights of T tokens against ref_route_raw; exact ties, NaN and infinite inputs.
void test_gating(int64_t H, int64_t E, int64_t k, int routing, int64_t T, uint64_t seed) {
  const std::string name = "stage/gating_E" + std::to_string(E) + "_k" + std::to_string(k) + "_r" +
                           std::to_string(routing) + "_T" + std::to_string(T);
  Case c{name, H, 8, E, k, T, routing, 0, fresh_seed(seed)};
  c.ties = true;
  c.nan_gate = E > k + 1;  // the NaN expert must not be needed to fill k picks
  Rng r(c.seed);
  std::vector<float> gate(size_t(E * H));
  for (auto& v : gate) v = r.uniform(2.0f / std::sqrt(float(H)));
  for (int64_t e = 1; e + 1 < E; e += 4)
    std::copy(&gate[size_t((e - 1) * H)], &gate[size_t(e * H)], &gate[size_t(e * H)]);
  if (c.nan_gate) gate[size_t((E - 1) * H + H / 2)] = NAN;
  std::vector<float> x(size_t(T * H));
  for (auto& v : x) v = r.uniform(1.0f);
  // Token 0: zeros (every logit 0, all experts tie); 1: one NaN; 2: one +inf; 3: all -inf.
  if (T > 0) std::fill(x.begin(), x.begin() + H, 0.0f);
  if (T > 1) x[size_t(1 * H + 3)] = NAN;
  if (T > 2) x[size_t(2 * H + 1)] = INFINITY;
  if (T > 3) std::fill(x.begin() + 3 * H, x.begin() + 4 * H, -INFINITY);

  const int64_t Hp = fmoe_round_up(H, FMOE_PAD);
  std::vector<float> xp(size_t(T * Hp), 0.0f), gp(size_t(E * Hp), 0.0f);
  for (int64_t t = 0; t < T; t++) std::copy(&x[size_t(t * H)], &x[size_t(t * H + H)], &xp[size_t(t * Hp)]);
  for (int64_t e = 0; e < E; e++) std::copy(&gate[size_t(e * H)], &gate[size_t(e * H + H)], &gp[size_t(e * Hp)]);
  Dev dx(xp.size() * 4), dg(gp.size() * 4), dids(size_t(T * k) * 4), dw(size_t(T * k) * 4);
  dx.put(xp.data(), xp.size() * 4);
  dg.put(gp.data(), gp.size() * 4);

  std::vector<int32_t> ids[2];
  std::vector<float> w[2];
  for (int run = 0; run < 2; run++) {
    dids.poison(0x7F);
    dw.poison(0xFF);
    gating_params params{};
    params.E = int(E);
    params.k = int(k);
    params.renorm = routing == 0;
    params.scale = 1.0f;
    params.ld_out = int(k);
    stage_sync(
        gating_cuda(dx.as<float>(), Hp, dg.as<float>(), Hp, Hp, T, &params, dids.as<int32_t>(), dw.as<float>(), 0),
        name);
    ids[run] = dids.get<int32_t>(size_t(T * k));
    w[run] = dw.get<float>(size_t(T * k));
  }
  int64_t compared = 0, skipped = 0, bad_ids = 0, bad_w = 0, out_of_range = 0;
  double max_dw = 0;
  for (int64_t t = 0; t < T; t++) {
    std::set<int32_t> distinct;
    for (int64_t j = 0; j < k; j++) {
      const int32_t id = ids[0][size_t(t * k + j)];
      if (id < 0 || id >= E) out_of_range++;
      distinct.insert(id);
    }
    if (int64_t(distinct.size()) != k) out_of_range++;
    const RefRoute R = ref_route_raw(gate.data(), H, E, k, routing, &x[size_t(t * H)]);
    if (R.margin < 1e-5) {
      skipped++;
      continue;
    }
    compared++;
    for (int64_t j = 0; j < k; j++) {
      if (ids[0][size_t(t * k + j)] != R.ids[size_t(j)]) bad_ids++;
      const double g = w[0][size_t(t * k + j)], ref = R.w[size_t(j)];
      if (std::isnan(g) && std::isnan(ref)) continue;
      const double d = std::fabs(g - ref);
      if (!(d <= 1e-5)) bad_w++;
      if (std::isfinite(d)) max_dw = std::max(max_dw, d);
    }
  }
  check(out_of_range == 0 && bad_ids == 0 && bad_w == 0 && compared > 0, name,
        std::to_string(compared) + " tokens compared (" + std::to_string(skipped) + " near ties skipped), " +
            std::to_string(bad_ids) + " id mismatches, " + std::to_string(bad_w) + " weights off, " +
            std::to_string(out_of_range) + " bad id sets, max |dw| " + fmt("%.2e", max_dw));
  check(same_bits(ids[0].data(), ids[1].data(), ids[0].size() * 4) &&
            same_bits(w[0].data(), w[1].data(), w[0].size() * 4),
        name + "/repeatable", "second run, same bits");
}

void test_dispatch(int64_t T, int64_t E, int64_t k, int mode, int64_t bm, uint64_t seed) {
  const std::string name = "stage/dispatch_T" + std::to_string(T) + "_E" + std::to_string(E) + "_k" +
                           std::to_string(k) + "_bm" + std::to_string(bm) + "_mode" + std::to_string(mode);
  Rng r(fresh_seed(seed));
  const std::vector<int32_t> picks = random_picks(r, T, E, k, mode);
  const int64_t n_rows = T * k;
  const HostDispatch D = ref_dispatch(picks, E, bm);
  const int64_t rows_cap = fmoe_padded_rows_cap(n_rows, E, bm), tiles_cap = rows_cap / bm;
  Dev dexp(size_t(n_rows) * 4), dsorted(size_t(rows_cap) * 4), dinv(size_t(n_rows) * 4), dtile(size_t(tiles_cap) * 4),
      dnum(4);
  dexp.put(picks.data(), picks.size() * 4);
  std::vector<int32_t> got[2][4];
  for (int run = 0; run < 2; run++) {
    dsorted.poison(0x7F);
    dinv.poison(0x7F);
    dtile.poison(0x7F);
    dnum.poison(0x7F);
    stage_sync(dispatch_cuda(dexp.as<int32_t>(), n_rows, int(E), int(bm), dsorted.as<int32_t>(), dinv.as<int32_t>(),
                             dtile.as<int32_t>(), dnum.as<int32_t>(), 0),
               name);
    got[run][3] = dnum.get<int32_t>(1);
    const int32_t nt = std::min<int32_t>(std::max<int32_t>(got[run][3][0], 0), int32_t(tiles_cap));
    got[run][0] = dsorted.get<int32_t>(size_t(nt * bm));
    got[run][1] = dinv.get<int32_t>(size_t(n_rows));
    got[run][2] = dtile.get<int32_t>(size_t(nt));
  }
  const bool ok =
      got[0][3][0] == D.num_tiles && got[0][0] == D.sorted_rows && got[0][1] == D.inv && got[0][2] == D.tile_expert;
  check(ok, name,
        std::string("num_tiles ") + std::to_string(got[0][3][0]) + " (expected " + std::to_string(D.num_tiles) +
            "), sorted rows / inverse / tile experts " + (ok ? "identical" : "DIFFER") + " to the stable host sort");
  bool same = true;
  for (int i = 0; i < 4; i++) same = same && got[0][i] == got[1][i];
  check(same, name + "/repeatable", "second run, same bits");
}

// Input conversion to bf16 / fp16: bit-exact against the host rounding (round to nearest even).
void test_convert(int dtype, uint64_t seed) {
  const std::string name = std::string("stage/convert_") + dtype_name(dtype);
  Rng r(fresh_seed(seed));
  const int64_t n = 100003;
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; i++) {
    // magnitudes from 1e-9 (fp16 subnormals and underflow) to 1e6 (fp16 overflow), both signs
    const double mag = std::pow(10.0, -9.0 + 15.0 * double(r.next() >> 11) / double(1ull << 53));
    x[size_t(i)] = float((r.next() & 1) ? mag : -mag);
  }
  x[0] = NAN;
  x[1] = INFINITY;
  x[2] = -INFINITY;
  x[3] = 0.0f;
  x[4] = -0.0f;
  x[5] = 65519.0f;  // fp16: rounds down to 65504
  x[6] = 65520.0f;  // fp16: rounds up to infinity
  Dev dx(size_t(n) * 4), dout(size_t(n) * 2);
  dx.put(x.data(), x.size() * 4);
  std::vector<uint16_t> got[2];
  for (int run = 0; run < 2; run++) {
    dout.poison(0xFF);
    stage_sync(convert_to_16_cuda(dx.as<float>(), n, dtype, dout.as<uint16_t>(), 0), name);
    got[run] = dout.get<uint16_t>(size_t(n));
  }
  int64_t bad = 0;
  for (int64_t i = 0; i < n; i++) {
    const uint16_t g = got[0][size_t(i)];
    if (std::isnan(x[size_t(i)])) {
      const bool is_nan = dtype == 1 ? ((g & 0x7f80) == 0x7f80 && (g & 0x7f)) : ((g & 0x7c00) == 0x7c00 && (g & 0x3ff));
      if (!is_nan) bad++;
      continue;
    }
    const uint16_t want = dtype == 1 ? f32_to_bf16(x[size_t(i)]) : f32_to_f16(x[size_t(i)]);
    if (g != want) bad++;
  }
  check(bad == 0, name, std::to_string(bad) + " of " + std::to_string(n) + " values differ from the host rounding");
  check(got[0] == got[1], name + "/repeatable", "second run, same bits");
}

// Expert FFN on host-made routing: every tile configuration of the dtype against float64 (the reference
// rounds the SwiGLU activations to the weight dtype as the kernels do), and all configurations agree.
void test_ffn(int64_t H, int64_t F, int64_t E, int64_t k, int64_t T, int dtype, uint64_t seed) {
  const std::string name = std::string("stage/ffn_") + dtype_name(dtype) + "_H" + std::to_string(H) + "_F" +
                           std::to_string(F) + "_E" + std::to_string(E) + "_k" + std::to_string(k) + "_T" +
                           std::to_string(T);
  Case c{name, H, F, E, k, T, 0, dtype, fresh_seed(seed)};
  const HostLayer L = make_layer(c);
  Rng r(c.seed + 1);
  const std::vector<int32_t> picks = random_picks(r, T, E, k, int(seed % 3));
  std::vector<float> x(size_t(T * H));
  for (auto& v : x) v = r.uniform(1.0f);
  const int64_t Hp = fmoe_round_up(H, FMOE_PAD), Fp = fmoe_round_up(F, FMOE_PAD);
  const size_t es = dtype == 0 ? 4 : 2;

  // Device operands, zero-padded: x [T, Hp] (float32, or rounded to the dtype), w1/w3 [E, Fp, Hp], w2 [E, Hp, Fp].
  std::vector<float> xe(x.size());  // exact values the kernels see
  std::vector<uint8_t> xs(size_t(T * Hp) * es, 0);
  for (int64_t t = 0; t < T; t++)
    for (int64_t i = 0; i < H; i++) {
      const float v = x[size_t(t * H + i)];
      if (dtype == 0) {
        memcpy(&xs[size_t(t * Hp + i) * 4], &v, 4);
        xe[size_t(t * H + i)] = v;
      } else {
        const uint16_t h = dtype == 1 ? f32_to_bf16(v) : f32_to_f16(v);
        memcpy(&xs[size_t(t * Hp + i) * 2], &h, 2);
        xe[size_t(t * H + i)] = dtype == 1 ? bf16_to_f32(h) : f16_to_f32(h);
      }
    }
  auto pad = [&](const std::vector<std::vector<uint8_t>>& w, int64_t rows, int64_t cols, int64_t rows_p,
                 int64_t cols_p) {
    std::vector<uint8_t> out(size_t(E * rows_p * cols_p) * es, 0);
    for (int64_t e = 0; e < E; e++)
      for (int64_t i = 0; i < rows; i++)
        memcpy(&out[size_t((e * rows_p + i) * cols_p) * es], &w[size_t(e)][size_t(i * cols) * es], size_t(cols) * es);
    return out;
  };
  const std::vector<uint8_t> w1 = pad(L.w1, F, H, Fp, Hp), w3 = pad(L.w3, F, H, Fp, Hp), w2 = pad(L.w2, H, F, Hp, Fp);
  Dev dx(xs.size()), dw1(w1.size()), dw3(w3.size()), dw2(w2.size());
  dx.put(xs.data(), xs.size());
  dw1.put(w1.data(), w1.size());
  dw3.put(w3.data(), w3.size());
  dw2.put(w2.data(), w2.size());

  const int64_t n_rows = T * k;
  const std::vector<double> yref = ref_expert_rows(L, xe, picks);

  const double tol = dtype == 0 ? 1e-5 : 2e-3;
  std::vector<float> first;  // y rows in pick order from the first configuration
  bool agree = true;
  std::string agree_detail;
  const int n_configs = dtype == 0 ? 2 : 3;
  // Each configuration with the device unknown (the shapes every GPU can run) and with this device's shared
  // memory and an endless supply of SMs (the large-memory shapes, and the decode shape for small grids).
  int smem_per_block = 0;
  cuda_check(cudaDeviceGetAttribute(&smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0), "attribute");
  for (int run_shape = 0; run_shape < 2 * n_configs; run_shape++) {
    const int config = run_shape / 2;
    const bool device_shapes = run_shape % 2 == 1;
    const std::string cname = "_cfg" + std::to_string(config) + (device_shapes ? "_device" : "");
    const int64_t bm = ffn_block_m(config);
    const HostDispatch D = ref_dispatch(picks, E, bm);
    const int64_t rows_cap = fmoe_padded_rows_cap(n_rows, E, bm), tiles_cap = rows_cap / bm;
    Dev dsorted(size_t(rows_cap) * 4), dtile(size_t(tiles_cap) * 4), dnum(4), dh(size_t(rows_cap * Fp) * es),
        dy(size_t(rows_cap * Hp) * 4);
    dsorted.poison(0xFF);
    dtile.poison(0);
    dsorted.put(D.sorted_rows.data(), D.sorted_rows.size() * 4);
    dtile.put(D.tile_expert.data(), D.tile_expert.size() * 4);
    dnum.put(&D.num_tiles, 4);
    ffn_problem p;
    p.dtype = dtype;
    p.config = config;
    p.Hp = Hp;
    p.Fp = Fp;
    p.top_k = int(k);
    p.tiles_cap = tiles_cap;
    p.sm_count = device_shapes ? 1 << 20 : 0;
    p.smem_per_block = device_shapes ? smem_per_block : 0;
    p.x = dx.p;
    p.w1 = dw1.p;
    p.w3 = dw3.p;
    p.w2 = dw2.p;
    p.sorted_rows = dsorted.as<int32_t>();
    p.tile_expert = dtile.as<int32_t>();
    p.num_tiles = dnum.as<int32_t>();
    p.h = dh.p;
    p.y = dy.as<float>();
    std::vector<float> y[2];
    for (int run = 0; run < 2; run++) {
      dh.poison(0xFF);
      dy.poison(0xFF);
      stage_sync(ffn_cuda(&p, 0), name + cname);
      const std::vector<float> ys = dy.get<float>(size_t(rows_cap * Hp));
      y[run].assign(size_t(n_rows * H), 0.0f);  // back to pick order, H columns
      for (int64_t row = 0; row < n_rows; row++)
        memcpy(&y[run][size_t(row * H)], &ys[size_t(int64_t(D.inv[size_t(row)]) * Hp)], size_t(H) * 4);
    }
    const double err = rel_l2(y[0], yref);
    check(std::isfinite(err) && err < tol, name + cname,
          "block_m " + std::to_string(bm) + ", rel_l2 " + fmt("%.3e", err) + " (tolerance " + fmt("%.0e", tol) + ")");
    check(same_bits(y[0].data(), y[1].data(), y[0].size() * 4), name + cname + "/repeatable", "second run, same bits");
    if (run_shape == 0)
      first = y[0];
    else if (!same_bits(first.data(), y[0].data(), first.size() * 4)) {
      agree = false;
      agree_detail += " " + cname.substr(1) + " differs;";
    }
  }
  check(agree, name + "/configs_agree", agree ? "every tile configuration gives the same bits" : agree_detail);
}

// Combine: out[t] = sum_j w[t,j] * y[inv[t,j]] in pick order with fmaf: bit-exact against the host.
void test_combine(int64_t T, int64_t k, int64_t H, uint64_t seed) {
  const std::string name = "stage/combine_T" + std::to_string(T) + "_k" + std::to_string(k) + "_H" + std::to_string(H);
  Rng r(fresh_seed(seed));
  const int64_t ldy = fmoe_round_up(H, FMOE_PAD), rows = T * k + 7;
  std::vector<float> y(size_t(rows * ldy)), w(size_t(T * k));
  for (auto& v : y) v = r.uniform(3.0f);
  for (auto& v : w) v = r.uniform(1.0f);
  std::vector<int32_t> perm(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows; i++) perm[size_t(i)] = int32_t(i);
  for (int64_t i = rows - 1; i > 0; i--) std::swap(perm[size_t(i)], perm[size_t(r.next() % uint64_t(i + 1))]);
  std::vector<int32_t> inv(perm.begin(), perm.begin() + T * k);
  std::vector<float> want(size_t(T * H));
  std::vector<double> ref(size_t(T * H));
  for (int64_t t = 0; t < T; t++)
    for (int64_t h = 0; h < H; h++) {
      float acc = 0.0f;
      double acc64 = 0.0;
      for (int64_t j = 0; j < k; j++) {
        const float yv = y[size_t(int64_t(inv[size_t(t * k + j)]) * ldy + h)], wv = w[size_t(t * k + j)];
        acc = std::fmaf(wv, yv, acc);
        acc64 += double(wv) * double(yv);
      }
      want[size_t(t * H + h)] = acc;
      ref[size_t(t * H + h)] = acc64;
    }
  Dev dy(y.size() * 4), dinv(inv.size() * 4), dw(w.size() * 4), dout(size_t(T * H) * 4);
  dy.put(y.data(), y.size() * 4);
  dinv.put(inv.data(), inv.size() * 4);
  dw.put(w.data(), w.size() * 4);
  std::vector<float> got[2];
  for (int run = 0; run < 2; run++) {
    dout.poison(0xFF);
    stage_sync(combine_cuda(dy.as<float>(), ldy, dinv.as<int32_t>(), dw.as<float>(), T, int(k), H, dout.as<float>(), 0),
               name);
    got[run] = dout.get<float>(size_t(T * H));
  }
  const double err = rel_l2(got[0], ref);
  check(
      same_bits(got[0].data(), want.data(), want.size() * 4) && err < 1e-6, name,
      "bit-exact vs host fmaf: " + std::string(same_bits(got[0].data(), want.data(), want.size() * 4) ? "yes" : "NO") +
          ", rel_l2 vs float64 " + fmt("%.2e", err));
  check(same_bits(got[0].data(), got[1].data(), want.size() * 4), name + "/repeatable", "second run, same bits");
}

}  // namespace

void run_stage_tests() {
  say("stages (gating, dispatch, conversion, expert FFN, combine) against host references\n");
  uint64_t s = 1000;
  for (int64_t E : {8, 16, 60, 64, 256})
    for (int64_t k : {1, 2, 4, 8}) {
      if (k > E) continue;
      for (int routing = 0; routing < 2; routing++) test_gating(E == 256 ? 200 : 333, E, k, routing, 67, s++);
    }
  test_gating(4096, 8, 2, 0, 300, s++);  // the Mixtral router shape
  for (int64_t bm : {16, 64, 128})
    for (int mode = 0; mode < 3; mode++) {
      test_dispatch(1, 8, 2, mode, bm, s++);
      test_dispatch(37, 60, 4, mode, bm, s++);
      test_dispatch(4096, 8, 2, mode, bm, s++);
      test_dispatch(2048, 64, 8, mode, bm, s++);
    }
  test_dispatch(8000, 1024, 6, 0, 16, s++);
  test_convert(1, s++);
  test_convert(2, s++);
  for (int dtype = 0; dtype < 3; dtype++) {
    test_ffn(136, 200, 8, 2, 37, dtype, s++);
    test_ffn(97, 131, 16, 4, 1, dtype, s++);
    test_ffn(256, 384, 60, 8, 29, dtype, s++);
    test_ffn(130, 257, 64, 1, 300, dtype, s++);
    test_ffn(64, 128, 8, 8, 200, dtype, s++);
  }
  for (int64_t k : {1, 2, 4, 8}) {
    test_combine(1, k, 4096, s++);
    test_combine(37, k, 135, s++);
  }
  test_combine(4096, 2, 1000, s++);
}

}  // namespace fmoe_selftest
