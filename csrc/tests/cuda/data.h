// Test data: a seeded generator, the host side of the 16-bit formats, test cases and the layers and inputs
// made from them (weights as the library receives them and as the exact floats the reference uses).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace fmoe_selftest {

struct Rng {  // splitmix64: small, seeded, reproducible
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [-scale, scale], never exactly zero.
  float uniform(float scale) {
    const double u = double(next() >> 11) / double(1ull << 53);
    float v = float((u * 2.0 - 1.0) * scale);
    return v == 0.0f ? scale * 1e-3f : v;
  }
};

uint16_t f32_to_bf16(float f);
float bf16_to_f32(uint16_t h);
// Round to nearest even (subnormal halves included); NaN is never converted by the tests.
uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);

const char* dtype_name(int d);

struct Case {
  std::string name;
  int64_t H, F, E, k, T;  // hidden, intermediate, experts, picks, tokens
  int routing;            // 0 softmax-topk-renorm, 1 softmax-topk
  int dtype;              // 0 float32, 1 bfloat16, 2 float16
  uint64_t seed;
  bool shared_experts = false;  // every expert gets the same weights (saves host memory at full size)
  bool ties = false;            // router rows 1 = 0 and 5 = 4 (exact ties), and token 0 is all zeros
  bool nan_gate = false;        // one router weight of the last expert is NaN (that expert is never picked)
};

// A seed for one case of this run: the case's own number mixed with the run's base seed.
uint64_t fresh_seed(uint64_t s);

// A layer's weights as stored (what the library receives) and as exact floats (what the reference uses).
struct HostLayer {
  Case c;
  std::vector<float> gate;                       // [E, H]
  std::vector<std::vector<uint8_t>> w1, w3, w2;  // stored bytes per expert
  std::vector<std::vector<float>> x1, x3, x2;    // exact values per expert
  std::vector<const void*> p1, p3, p2;           // pointers handed to the library
};

HostLayer make_layer(const Case& c);
std::vector<float> make_input(const Case& c, uint64_t seed);

// k distinct experts per token; mode 0 uniform, 1 skewed (most tokens pick expert 0 first), 2 only even
// experts (the odd ones stay empty).
std::vector<int32_t> random_picks(Rng& r, int64_t T, int64_t E, int64_t k, int mode);

}  // namespace fmoe_selftest
