// ffn_tiles: times the expert FFN's tensor-core tile shapes on the Mixtral-8x7B layer (H=4096, F=14336,
// E=8, k=2, bf16), each pass on its own, against a device-to-device copy measured in the same run, and
// checks that every shape gives the same bits as the shipped one (tile shapes must never change a sum's
// order). A tuning aid for csrc/cuda/expert_ffn.cu, not part of the package:
//
//   bench/gpu/profile.sh, or: cmake --build <cuda build> --target fmoe_ffn_tiles && <cuda build>/fmoe_ffn_tiles
//
// Rows: batch size T, pass (up = w1/w3 with SwiGLU, down = w2), tile BMxBNxBK / warp tile / stages,
// microseconds (median of 5 batches of back-to-back launches), weight GB/s and its fraction of the copy,
// TFLOP/s of the picked rows' products, and "same bits" against the first shape timed at that T.
#include "../../csrc/cuda/expert_ffn.cu"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {

constexpr int64_t H = 4096, F = 14336, E = 8, K_PICKS = 2;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    exit(2);
  }
}

// Deterministic bf16 values of about +-0.03 from a hash of the index (no host round trip for 2.8 GB).
__global__ void fill_bf16(uint16_t* p, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    const float u = (float)(h & 0xffffff) / 16777216.0f - 0.5f;
    p[i] = f32_to_bf16_bits(u * scale);
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Microseconds per launch: `reps` launches between two events, median of 5 such batches.
double time_us(const std::function<void()>& launch, int reps) {
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "event");
  check(cudaEventCreate(&b), "event");
  for (int i = 0; i < 2; i++) launch();
  std::vector<double> us;
  for (int t = 0; t < 5; t++) {
    check(cudaEventRecord(a), "record");
    for (int i = 0; i < reps; i++) launch();
    check(cudaEventRecord(b), "record");
    check(cudaEventSynchronize(b), "sync");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, a, b), "elapsed");
    us.push_back(1e3 * ms / reps);
  }
  check(cudaGetLastError(), "launches");
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return median(us);
}

struct Routing {  // the sorted row list of one batch size for one block_m, built on the host
  std::vector<int32_t> sorted_rows, tile_expert;
  int32_t tiles = 0;
  int experts_used = 0;
};

// T tokens, k = 2 picks each; token t picks experts (t % 8) and ((t * 3 + 1) % 8) unless equal, so that
// every expert gets about T/4 rows at large T and T = 1 uses two experts, as Mixtral's decode does.
Routing route(int64_t T, int bm) {
  std::vector<std::vector<int32_t>> per(E);
  for (int64_t t = 0; t < T; t++) {
    const int e0 = (int)(t % E);
    int e1 = (int)((t * 3 + 1) % E);
    if (e1 == e0) e1 = (e0 + 1) % E;
    per[e0].push_back((int32_t)(t * K_PICKS));
    per[e1].push_back((int32_t)(t * K_PICKS + 1));
  }
  Routing r;
  for (int e = 0; e < E; e++) {
    if (per[e].empty()) continue;
    r.experts_used++;
    const size_t n = per[e].size(), padded = (n + bm - 1) / bm * bm;
    for (size_t i = 0; i < padded; i++) r.sorted_rows.push_back(i < n ? per[e][i] : -1);
    for (size_t i = 0; i < padded / bm; i++) r.tile_expert.push_back(e);
  }
  r.tiles = (int32_t)r.tile_expert.size();
  return r;
}

struct Buffers {
  uint16_t *w1, *w3, *w2, *x, *h;
  float* y;
  int32_t *rows, *tile_e, *ntiles;
};

using Launcher = cudaError_t (*)(const gemm_args&, int64_t, cudaStream_t);

struct Shape {
  const char* name;
  int bm;
  Launcher up, down;  // NB = 2 and NB = 1 instances of one tile shape
};

template <int BM, int BN, int BK, int WM, int WN, int ST>
Shape shape(const char* name) {
  return Shape{name, BM, launch_mma<BM, BN, BK, WM, WN, ST, 2, true>, launch_mma<BM, BN, BK, WM, WN, ST, 1, true>};
}

double copy_gbps() {
  const size_t bytes = size_t(1) << 30;
  void *a, *b;
  check(cudaMalloc(&a, bytes), "malloc");
  check(cudaMalloc(&b, bytes), "malloc");
  check(cudaMemset(a, 1, bytes), "memset");
  const double us = time_us([&] { check(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice), "copy"); }, 10);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / (us * 1e-6) / 1e9;
}

}  // namespace

int main() {
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, 0), "device");
  const double ceiling = copy_gbps();
  printf("%s, %d SMs; device-to-device copy %.0f GB/s (read + write)\n", prop.name, prop.multiProcessorCount,
         ceiling);

  Buffers b;
  const int64_t T_MAX = 4096, ROWS_MAX = T_MAX * K_PICKS + E * 128;
  check(cudaMalloc(&b.w1, sizeof(uint16_t) * E * F * H), "malloc");
  check(cudaMalloc(&b.w3, sizeof(uint16_t) * E * F * H), "malloc");
  check(cudaMalloc(&b.w2, sizeof(uint16_t) * E * H * F), "malloc");
  check(cudaMalloc(&b.x, sizeof(uint16_t) * T_MAX * H), "malloc");
  check(cudaMalloc(&b.h, sizeof(uint16_t) * ROWS_MAX * F), "malloc");
  check(cudaMalloc(&b.y, sizeof(float) * ROWS_MAX * H), "malloc");
  check(cudaMalloc(&b.rows, sizeof(int32_t) * ROWS_MAX), "malloc");
  check(cudaMalloc(&b.tile_e, sizeof(int32_t) * ROWS_MAX), "malloc");
  check(cudaMalloc(&b.ntiles, sizeof(int32_t)), "malloc");
  fill_bf16<<<4096, 256>>>(b.w1, E * F * H, 1u, 0.06f);
  fill_bf16<<<4096, 256>>>(b.w3, E * F * H, 2u, 0.06f);
  fill_bf16<<<4096, 256>>>(b.w2, E * H * F, 3u, 0.03f);
  fill_bf16<<<4096, 256>>>(b.x, T_MAX * H, 4u, 2.0f);
  check(cudaDeviceSynchronize(), "fill");

  // Shapes by block_m; each is compared with the first shape timed at its batch size.
  const std::vector<Shape> shapes = {
      shape<16, 64, 64, 16, 16, 4>("16x64x64 w16x16 s4"),     shape<16, 32, 64, 16, 16, 4>("16x32x64 w16x16 s4"),
      shape<16, 32, 128, 16, 16, 4>("16x32x128 w16x16 s4"),   shape<16, 64, 128, 16, 16, 3>("16x64x128 w16x16 s3"),
      shape<16, 16, 128, 16, 16, 8>("16x16x128 w16x16 s8"),   shape<16, 32, 64, 16, 16, 8>("16x32x64 w16x16 s8"),
      shape<16, 64, 64, 16, 16, 8>("16x64x64 w16x16 s8"),     shape<16, 128, 64, 16, 32, 4>("16x128x64 w16x32 s4"),
      shape<16, 64, 128, 16, 16, 4>("16x64x128 w16x16 s4"),   shape<16, 32, 128, 16, 16, 6>("16x32x128 w16x16 s6"),
      shape<16, 64, 32, 16, 16, 8>("16x64x32 w16x16 s8"),     shape<16, 32, 64, 16, 16, 6>("16x32x64 w16x16 s6"),
      shape<64, 64, 32, 32, 32, 4>("64x64x32 w32x32 s4"),     shape<64, 128, 32, 32, 32, 4>("64x128x32 w32x32 s4"),
      shape<64, 128, 32, 32, 64, 4>("64x128x32 w32x64 s4"),   shape<64, 128, 64, 32, 64, 3>("64x128x64 w32x64 s3"),
      shape<128, 64, 32, 32, 32, 4>("128x64x32 w32x32 s4"),   shape<128, 64, 64, 32, 32, 3>("128x64x64 w32x32 s3"),
      shape<128, 64, 32, 64, 32, 4>("128x64x32 w64x32 s4"),   shape<128, 128, 32, 32, 64, 4>("128x128x32 w32x64 s4"),
      shape<128, 128, 32, 64, 32, 4>("128x128x32 w64x32 s4"), shape<128, 128, 64, 64, 32, 3>("128x128x64 w64x32 s3"),
      shape<128, 128, 64, 32, 64, 3>("128x128x64 w32x64 s3"),
  };

  printf("\n%5s %-5s %-24s %10s %9s %8s %9s %s\n", "T", "pass", "tile (BMxBNxBK, warp, stages)", "us", "GB/s",
         "of copy", "TFLOP/s", "same bits");
  for (int64_t T : {int64_t(1), int64_t(16), int64_t(128), int64_t(512), int64_t(4096)}) {
    std::vector<uint16_t> h_ref;
    std::vector<float> y_ref;
    for (const Shape& s : shapes) {
      // Decode shapes for T <= 16, 64-row tiles for 128 and 512, 128-row tiles for 512 and 4096.
      const bool fits = (s.bm == 16 && T <= 16) || (s.bm == 64 && T >= 128 && T <= 512) || (s.bm == 128 && T >= 512);
      if (!fits) continue;
      const Routing r = route(T, s.bm);
      check(cudaMemcpy(b.rows, r.sorted_rows.data(), 4 * r.sorted_rows.size(), cudaMemcpyHostToDevice), "rows");
      check(cudaMemcpy(b.tile_e, r.tile_expert.data(), 4 * r.tile_expert.size(), cudaMemcpyHostToDevice), "tiles");
      check(cudaMemcpy(b.ntiles, &r.tiles, 4, cudaMemcpyHostToDevice), "ntiles");
      gemm_args up{b.x, H, b.rows, 1, (int)K_PICKS, b.w1, b.w3, F, H, b.tile_e, b.ntiles, b.h, F};
      gemm_args down{b.h, F, b.rows, 0, (int)K_PICKS, b.w2, nullptr, H, F, b.tile_e, b.ntiles, b.y, H};
      const size_t n_pos = r.sorted_rows.size();
      check(cudaMemset(b.h, 0xFF, 2 * n_pos * F), "poison h");
      check(cudaMemset(b.y, 0xFF, 4 * n_pos * H), "poison y");
      const int reps = T >= 512 ? 5 : 20;
      const double us_up = time_us([&] { check(s.up(up, r.tiles, 0), s.name); }, reps);
      const double us_down = time_us([&] { check(s.down(down, r.tiles, 0), s.name); }, reps);
      check(cudaDeviceSynchronize(), "run");
      // Outputs of real rows only (padding rows are never written), compared with the first shape at this T.
      std::vector<uint16_t> hh(n_pos * F);
      std::vector<float> yy(n_pos * H);
      check(cudaMemcpy(hh.data(), b.h, 2 * hh.size(), cudaMemcpyDeviceToHost), "h");
      check(cudaMemcpy(yy.data(), b.y, 4 * yy.size(), cudaMemcpyDeviceToHost), "y");
      std::vector<uint16_t> h_real;
      std::vector<float> y_real;
      for (size_t p = 0; p < n_pos; p++) {
        if (r.sorted_rows[p] < 0) continue;
        h_real.insert(h_real.end(), hh.begin() + p * F, hh.begin() + (p + 1) * F);
        y_real.insert(y_real.end(), yy.begin() + p * H, yy.begin() + (p + 1) * H);
      }
      std::string same = "reference";
      if (!h_ref.empty()) {
        // Rows come in pick order within each expert for every block_m, so real rows line up across shapes.
        const bool eq = h_real.size() == h_ref.size() && y_real.size() == y_ref.size() &&
                        !memcmp(h_real.data(), h_ref.data(), 2 * h_ref.size()) &&
                        !memcmp(y_real.data(), y_ref.data(), 4 * y_ref.size());
        same = eq ? "yes" : "NO";
      } else {
        h_ref = h_real;
        y_ref = y_real;
      }
      const double rows = double(T * K_PICKS);
      const double up_bytes = 2.0 * r.experts_used * F * H * 2, down_bytes = double(r.experts_used) * H * F * 2;
      const double up_gbps = up_bytes / (us_up * 1e-6) / 1e9, down_gbps = down_bytes / (us_down * 1e-6) / 1e9;
      printf("%5lld %-5s %-24s %10.1f %9.0f %7.1f%% %9.1f %s\n", (long long)T, "up", s.name, us_up, up_gbps,
             100 * up_gbps / ceiling, 2.0 * rows * 2 * F * H / (us_up * 1e-6) / 1e12, same.c_str());
      printf("%5lld %-5s %-24s %10.1f %9.0f %7.1f%% %9.1f\n", (long long)T, "down", s.name, us_down, down_gbps,
             100 * down_gbps / ceiling, 2.0 * rows * H * F / (us_down * 1e-6) / 1e12);
      fflush(stdout);
    }
  }
  return 0;
}
