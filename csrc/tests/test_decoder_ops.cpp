// C++ tests of the decoder's small operations (RMSNorm, rotary embeddings) against float64, of the KV
// cache's block bookkeeping, and of the dense projection's column tiles.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "core/error.h"
#include "core/kv_blocks.h"
#include "cpu/decoder_ops.h"
#include "cpu/linear.h"
#include "tests/check.h"

using namespace fmoe;

static void test_rms_norm() {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (int64_t n : {1, 7, 64, 333}) {
    const int64_t rows = 5, ld = n + 3;
    std::vector<float> x(size_t(rows * ld)), w(static_cast<size_t>(n)), y(size_t(rows * ld), NAN);
    for (float& v : x) v = nd(rng);
    for (float& v : w) v = 1.0f + 0.5f * nd(rng);
    const float eps = 1e-5f;
    rms_norm(x.data(), rows, n, ld, w.data(), eps, y.data(), ld);
    for (int64_t r = 0; r < rows; r++) {
      double ss = 0;
      for (int64_t i = 0; i < n; i++) ss += double(x[size_t(r * ld + i)]) * x[size_t(r * ld + i)];
      const double scale = 1.0 / std::sqrt(ss / double(n) + double(eps));
      for (int64_t i = 0; i < n; i++) {
        const double want = double(x[size_t(r * ld + i)]) * scale * double(w[size_t(i)]);
        CHECK(std::fabs(y[size_t(r * ld + i)] - want) <= 4e-7 * std::fabs(want) + 1e-30);
      }
    }
    // In place gives the same bits.
    std::vector<float> z = x;
    rms_norm(z.data(), rows, n, ld, w.data(), eps, z.data(), ld);
    for (int64_t r = 0; r < rows; r++)
      for (int64_t i = 0; i < n; i++) CHECK(z[size_t(r * ld + i)] == y[size_t(r * ld + i)]);
  }
}

static void test_rope() {
  std::mt19937 rng(12);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t D : {2, 6, 64, 128}) {
    const int64_t heads = 3, T = 4, ld = heads * D + 1;
    const double theta = D == 64 ? 1e6 : 10000.0;
    const int64_t pos[T] = {0, 1, 37, 4095};
    std::vector<float> c(size_t(T * D / 2)), s(size_t(T * D / 2));
    rope_tables(pos, T, D, theta, c.data(), s.data());
    std::vector<float> x(size_t(T * ld)), y;
    for (float& v : x) v = nd(rng);
    y = x;
    rope_apply(y.data(), T, heads, D, ld, c.data(), s.data());
    for (int64_t t = 0; t < T; t++)
      for (int64_t h = 0; h < heads; h++)
        for (int64_t i = 0; i < D / 2; i++) {
          const double angle = double(pos[t]) / std::pow(theta, double(2 * i) / double(D));
          const double a = x[size_t(t * ld + h * D + i)], b = x[size_t(t * ld + h * D + i + D / 2)];
          const double want0 = a * std::cos(angle) - b * std::sin(angle);
          const double want1 = b * std::cos(angle) + a * std::sin(angle);
          CHECK(std::fabs(y[size_t(t * ld + h * D + i)] - want0) <= 1e-6 * (std::fabs(a) + std::fabs(b)));
          CHECK(std::fabs(y[size_t(t * ld + h * D + i + D / 2)] - want1) <= 1e-6 * (std::fabs(a) + std::fabs(b)));
        }
    // The padding column between rows is untouched.
    for (int64_t t = 0; t < T; t++) CHECK(y[size_t(t * ld + heads * D)] == x[size_t(t * ld + heads * D)]);
  }
}

static void test_kv_blocks() {
  KvBlockPool pool(6);
  std::vector<int32_t> a, b;
  CHECK(pool.allocate(2, a) && a.size() == 2 && a[0] == 0 && a[1] == 1);
  CHECK(pool.allocate(3, b) && b[0] == 2 && b[2] == 4);
  std::vector<int32_t> c;
  CHECK(!pool.allocate(2, c) && c.empty());  // one free, two asked: nothing taken
  CHECK(pool.free_blocks() == 1);
  pool.retain(a[0]);  // a second sequence shares a's first block
  CHECK(pool.holders(a[0]) == 2);
  pool.release(a[0]);
  pool.release(a[1]);
  CHECK(pool.holders(a[0]) == 1 && pool.holders(a[1]) == 0 && pool.free_blocks() == 2);
  CHECK(pool.allocate(2, c) && c[0] == 1 && c[1] == 5);  // lowest free first
  {
    // Random allocations, shares and releases against a reference: every allocation takes the lowest
    // free ids, in order, and a block is free again when its last holder lets it go.
    const int n = 300;
    KvBlockPool big(n);
    std::vector<int> holders(n, 0);
    std::mt19937 rng(17);
    for (int step = 0; step < 5000; step++) {
      const int op = int(rng() % 3), b = int(rng() % n);
      if (op == 0) {
        const int64_t want = int64_t(rng() % 5);
        std::vector<int32_t> got;
        std::vector<int32_t> lowest;
        for (int i = 0; i < n && int64_t(lowest.size()) < want; i++)
          if (holders[size_t(i)] == 0) lowest.push_back(i);
        const bool ok = big.allocate(want, got);
        CHECK(ok == (int64_t(lowest.size()) == want));
        if (ok) CHECK(got == lowest);
        for (int32_t g : got) holders[size_t(g)] = 1;
      } else if (holders[size_t(b)] > 0 && op == 1) {
        big.retain(b);
        holders[size_t(b)]++;
      } else if (holders[size_t(b)] > 0) {
        big.release(b);
        holders[size_t(b)]--;
      }
      CHECK(big.holders(b) == holders[size_t(b)]);
    }
    CHECK(big.free_blocks() == std::count(holders.begin(), holders.end(), 0));
  }
  bool threw = false;
  try {
    pool.release(99);
  } catch (const MoeException&) {
    threw = true;
  }
  CHECK(threw);
  threw = false;
  try {
    KvBlockPool bad(-1);
  } catch (const MoeException&) {
    threw = true;
  }
  CHECK(threw);
}

// PackedLinear::forward cuts its columns into tiles by the pool's threads (long tiles first, short ones
// last, linear.cpp column_tiles): every column must be computed once, whatever the sizes (panels not a
// whole number of tile units, units not a multiple of the threads) and the threads the call may use, and
// the bits must not depend on the threads.
static void test_linear_tiles() {
  const KernelSet* ks = select_kernels();
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  for (int64_t out : {1, 17, 300, 1000, 1190, 2053, 4099})
    for (int64_t in : {7, 129}) {
      std::vector<float> w(size_t(out * in));
      for (float& v : w) v = ud(rng);
      PackedLinear lin(ks, out, in, DType::F32, Quant::None, 128, "test");
      lin.pack({w.data()}, {out});
      for (int64_t M : {1, 3, 9}) {
        std::vector<float> x(size_t(M * in));
        for (float& v : x) v = ud(rng);
        std::vector<float> first;
        for (int threads : {0, 1, 2, 3}) {
          std::vector<float> y(size_t(M * out), std::nanf(""));
          lin.forward(x.data(), in, M, y.data(), out, threads);
          CHECK(worst_dot_error(x.data(), w.data(), y.data(), M, out, in) < 1e-5);
          if (first.empty())
            first = y;
          else
            CHECK(std::equal(first.begin(), first.end(), y.begin()));
        }
      }
    }
}

int main() {
  test_rms_norm();
  test_rope();
  test_kv_blocks();
  test_linear_tiles();
  if (failures) {
    std::fprintf(stderr, "%d decoder op check(s) failed\n", failures);
    return 1;
  }
  std::printf("decoder ops: all checks passed\n");
  return 0;
}
