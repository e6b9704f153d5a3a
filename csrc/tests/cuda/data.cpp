#include "data.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "harness.h"

namespace fmoe_selftest {

uint16_t f32_to_bf16(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40);
  b += 0x7fffu + ((b >> 16) & 1u);
  return uint16_t(b >> 16);
}
float bf16_to_f32(uint16_t h) {
  uint32_t b = uint32_t(h) << 16;
  float f;
  memcpy(&f, &b, 4);
  return f;
}
// Normal-range values only (the test data stays far from the half limits); round to nearest even.
uint16_t f32_to_f16(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const int exp = int((b >> 23) & 0xff) - 127 + 15;
  uint32_t man = b & 0x7fffffu;
  if (exp <= 0) {  // subnormal half
    if (exp < -10) return uint16_t(sign);
    man |= 0x800000u;
    const int shift = 14 - exp;
    uint32_t r = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) r++;
    return uint16_t(sign | r);
  }
  if (exp >= 31) return uint16_t(sign | 0x7c00u);
  uint32_t h = uint32_t(exp) << 10 | (man >> 13);
  const uint32_t rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
  return uint16_t(sign | h);
}
float f16_to_f32(uint16_t h) {
  const int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  const float sign = (h & 0x8000) ? -1.0f : 1.0f;
  if (exp == 0) return sign * std::ldexp(float(man), -24);
  if (exp == 31) return man ? NAN : sign * INFINITY;
  return sign * std::ldexp(float(1024 + man), exp - 25);
}

const char* dtype_name(int d) { return d == 0 ? "f32" : d == 1 ? "bf16" : "f16"; }

uint64_t fresh_seed(uint64_t s) {
  Rng r(g_seed ^ (s * 0xd1b54a32d192ed03ull));
  return r.next();
}

static void fill_matrix(Rng& r, int64_t n, float scale, int dtype, std::vector<uint8_t>& stored,
                        std::vector<float>& exact) {
  exact.resize(size_t(n));
  stored.resize(size_t(n) * (dtype == 0 ? 4 : 2));
  for (int64_t i = 0; i < n; i++) {
    const float v = r.uniform(scale);
    if (dtype == 0) {
      memcpy(&stored[size_t(i) * 4], &v, 4);
      exact[size_t(i)] = v;
    } else {
      const uint16_t h = dtype == 1 ? f32_to_bf16(v) : f32_to_f16(v);
      memcpy(&stored[size_t(i) * 2], &h, 2);
      exact[size_t(i)] = dtype == 1 ? bf16_to_f32(h) : f16_to_f32(h);
    }
  }
}

HostLayer make_layer(const Case& c) {
  HostLayer L;
  L.c = c;
  Rng r(c.seed);
  L.gate.resize(size_t(c.E * c.H));
  for (auto& v : L.gate) v = r.uniform(2.0f / std::sqrt(float(c.H)));
  if (c.ties) {
    for (int64_t e = 1; e + 1 < c.E; e += 4)
      std::copy(&L.gate[size_t((e - 1) * c.H)], &L.gate[size_t(e * c.H)], &L.gate[size_t(e * c.H)]);
  }
  if (c.nan_gate) L.gate[size_t((c.E - 1) * c.H + c.H / 2)] = NAN;
  const int64_t n_experts_stored = c.shared_experts ? 1 : c.E;
  L.w1.resize(size_t(n_experts_stored));
  L.w3.resize(size_t(n_experts_stored));
  L.w2.resize(size_t(n_experts_stored));
  L.x1.resize(size_t(n_experts_stored));
  L.x3.resize(size_t(n_experts_stored));
  L.x2.resize(size_t(n_experts_stored));
  for (int64_t e = 0; e < n_experts_stored; e++) {
    fill_matrix(r, c.F * c.H, 1.0f / std::sqrt(float(c.H)), c.dtype, L.w1[size_t(e)], L.x1[size_t(e)]);
    fill_matrix(r, c.F * c.H, 1.0f / std::sqrt(float(c.H)), c.dtype, L.w3[size_t(e)], L.x3[size_t(e)]);
    fill_matrix(r, c.H * c.F, 1.0f / std::sqrt(float(c.F)), c.dtype, L.w2[size_t(e)], L.x2[size_t(e)]);
  }
  for (int64_t e = 0; e < c.E; e++) {
    const size_t s = c.shared_experts ? 0 : size_t(e);
    L.p1.push_back(L.w1[s].data());
    L.p3.push_back(L.w3[s].data());
    L.p2.push_back(L.w2[s].data());
  }
  return L;
}

std::vector<float> make_input(const Case& c, uint64_t seed) {
  Rng r(seed);
  std::vector<float> x(size_t(c.T * c.H));
  for (auto& v : x) v = r.uniform(1.0f);
  if (c.ties)
    for (int64_t i = 0; i < c.H; i++) x[size_t(i)] = 0.0f;  // all logits 0: every expert ties
  return x;
}

std::vector<int32_t> random_picks(Rng& r, int64_t T, int64_t E, int64_t k, int mode) {
  std::vector<int32_t> ids(size_t(T * k));
  for (int64_t t = 0; t < T; t++) {
    std::vector<int32_t> pool;
    for (int32_t e = 0; e < E; e++)
      if (mode != 2 || e % 2 == 0 || E < 2 * k) pool.push_back(e);
    for (int64_t j = 0; j < k; j++) {
      size_t i = size_t(r.next() % pool.size());
      if (mode == 1 && j == 0 && r.next() % 5 != 0) i = 0;  // pool[0] is expert 0
      ids[size_t(t * k + j)] = pool[i];
      pool.erase(pool.begin() + long(i));
    }
  }
  return ids;
}

}  // namespace fmoe_selftest
