// The float64 reference the GPU results are checked against: routing (softmax, top-k with ties to the
// lower index and NaN last, renormalisation), the whole layer, and a host model of the dispatch sort.
#pragma once
#include <cstdint>
#include <vector>

#include "data.h"

namespace fmoe_selftest {

struct RefRoute {
  std::vector<int> ids;
  std::vector<double> w;
  std::vector<double> p;  // probabilities of all experts
  // Smallest gap between neighbours of the descending order, over the first k+1 places, where the two
  // values differ (exact ties are decided by index on both sides, so they are always compared): below
  // about 1e-5 float32 and float64 may legitimately order the two experts differently.
  double margin;
};

RefRoute ref_route_raw(const float* gate, int64_t H, int64_t E, int64_t k, int routing, const float* xt);
RefRoute ref_route(const HostLayer& L, const float* xt);

// The float64 weights of one token's experts ids[0..k) (any k distinct experts in [0, E), not only the
// reference's own top-k): their probabilities, renormalised over them for routing 0.
std::vector<double> ref_weights_for(const HostLayer& L, const float* xt, const int32_t* ids);

// out[T, H] in float64, each token through the experts ids[t*k .. t*k+k) (in [0, E)) with their float64
// weights. Given the experts the GPU picked, a near tie that float32 and float64 order differently
// (checked separately, with a margin) cannot fail the comparison of the FFN and combine.
std::vector<double> ref_forward(const HostLayer& L, const std::vector<float>& x, const std::vector<int32_t>& ids);

// Expert FFN of each pick row r = t*k + j: y[r] = W2_e round(silu(W1_e x_t) * W3_e x_t), e = picks[r], with
// the SwiGLU activations rounded to the weight dtype as the kernels round them. x: the exact values the
// kernels see, [T, H].
std::vector<double> ref_expert_rows(const HostLayer& L, const std::vector<float>& x, const std::vector<int32_t>& picks);

double rel_l2(const float* y, const double* ref, size_t n);
double rel_l2(const std::vector<float>& y, const std::vector<double>& ref);

// Host model of dispatch_cuda: stable counting sort by expert, each run padded to block_m.
struct HostDispatch {
  std::vector<int32_t> sorted_rows, inv, tile_expert;
  int32_t num_tiles = 0;
};

HostDispatch ref_dispatch(const std::vector<int32_t>& experts, int64_t E, int64_t bm);

}  // namespace fmoe_selftest
