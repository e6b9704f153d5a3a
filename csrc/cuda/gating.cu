// Router: logits = gate . x_t in float32, softmax, top-k and (optionally) renormalisation, fused in one
// kernel with one warp per token.
//
// Why one warp per token: the router is a GEMV with a tiny output (E logits) per token, so the lanes split
// the hidden dimension and meet in a butterfly reduction. The butterfly gives every lane the same bits
// (lane l adds a_l + a_{l^m}, lane l^m adds a_{l^m} + a_l, and float addition is commutative), and no
// reduction order depends on T or on the other tokens, so routing is batch invariant.
#include <math.h>

#include "moe_cuda.cuh"

#define GATING_WARPS 4  // tokens per block

static __device__ __forceinline__ float warp_sum(float v) {
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Inputs never contain NaN here (the callers skip NaN logits), so fmaxf is exact and commutative.
static __device__ __forceinline__ float warp_max(float v) {
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

// (va, ia) ranks before (vb, ib): index -1 means "no candidate" and loses to any candidate; a NaN ranks
// below every number; a larger value wins; equal values go to the lower index. This is a strict total
// order on candidates, so the warp-wide maximum is the same whatever order lanes combine in.
static __device__ __forceinline__ bool gating_better(float va, int ia, float vb, int ib) {
  if (ib < 0) return ia >= 0;
  if (ia < 0) return false;
  const bool na = isnan(va), nb = isnan(vb);
  if (na != nb) return nb;
  if (!na && va != vb) return va > vb;
  return ia < ib;
}

// Marks an expert already picked in the probability array; probabilities are >= 0 or NaN, so a negative
// value is never a real one (and NaN < 0 is false, so NaN entries stay candidates).
#define GATING_TAKEN (-1.0f)

// Grid: ceil(T / GATING_WARPS) blocks of GATING_WARPS warps. Dynamic shared memory: 2*E floats per warp.
static __global__ void gating_kernel(const float* __restrict__ x, int64_t ldx, const float* __restrict__ gate,
                                     int64_t ldg, int64_t K, int64_t T, int E, int k, int routing,
                                     int32_t* __restrict__ experts, float* __restrict__ weights) {
  extern __shared__ float gating_smem[];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t t = (int64_t)blockIdx.x * GATING_WARPS + warp;  // token of this warp
  if (t >= T) return;  // the whole warp leaves together; the kernel has no block-wide barrier
  float* p = gating_smem + (size_t)warp * 2 * E;  // [E] logits, then probabilities, then taken marks
  float* picked = p + E;                          // [k] probability of each pick, in pick order

  // 1. Logits. K is a multiple of 4 and rows are 16-byte aligned (padded), so float4 loads are safe.
  const float4* xt = (const float4*)(x + t * ldx);
  const int64_t K4 = K / 4;  // float4 per row
  for (int e = 0; e < E; e++) {
    const float4* g = (const float4*)(gate + (int64_t)e * ldg);
    float acc = 0.0f;
    for (int64_t i = lane; i < K4; i += 32) {
      const float4 a = xt[i];
      const float4 b = __ldg(&g[i]);
      acc = fmaf(a.x, b.x, acc);
      acc = fmaf(a.y, b.y, acc);
      acc = fmaf(a.z, b.z, acc);
      acc = fmaf(a.w, b.w, acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) p[e] = acc;
  }
  __syncwarp();

  // 2. Softmax over the non-NaN logits. NaN logits get NaN probability; when some logit is +inf the
  // +inf logits share the mass (exp(inf - inf) would be NaN otherwise); when every logit is -inf or NaN
  // the probabilities are NaN, and the output follows (the math has no answer there).
  float mx = -INFINITY;
  for (int e = lane; e < E; e += 32) {
    const float l = p[e];
    if (!isnan(l)) mx = fmaxf(mx, l);
  }
  mx = warp_max(mx);
  float sum = 0.0f;
  for (int e = lane; e < E; e += 32) {
    const float l = p[e];
    float v;
    if (isnan(l)) v = NAN;
    else if (mx == INFINITY) v = (l == INFINITY) ? 1.0f : 0.0f;
    else v = expf(l - mx);
    p[e] = v;
    if (!isnan(v)) sum += v;
  }
  sum = warp_sum(sum);
  for (int e = lane; e < E; e += 32) p[e] = p[e] / sum;  // each lane touches only its own entries
  __syncwarp();

  // 3. Top-k by k rounds of a warp-wide argmax; each round marks its pick as taken. k <= E, so every
  // round finds a candidate; the clamp only guards the index against a broken invariant.
  float picked_sum = 0.0f;
  for (int j = 0; j < k; j++) {
    float bv = 0.0f;
    int bi = -1;
    for (int e = lane; e < E; e += 32) {
      const float v = p[e];
      if (v < 0.0f) continue;  // taken
      if (gating_better(v, e, bv, bi)) { bv = v; bi = e; }
    }
    for (int m = 16; m > 0; m >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, m);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, m);
      if (gating_better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    bi = min(max(bi, 0), E - 1);
    picked_sum += bv;  // the same value in every lane
    __syncwarp();      // every lane has read p before lane 0 marks the pick
    if (lane == 0) {
      experts[t * k + j] = bi;
      picked[j] = bv;
      p[bi] = GATING_TAKEN;
    }
    __syncwarp();
  }

  // 4. Weights in pick order: p / (sum of the picked p) for softmax-topk-renorm, p for softmax-topk.
  for (int j = lane; j < k; j += 32) {
    const float v = picked[j];
    weights[t * k + j] = routing == 0 ? v / picked_sum : v;
  }
}

cudaError_t gating_cuda(const float* x, int64_t ldx, const float* gate, int64_t ldg, int64_t K, int64_t T,
                        int E, int k, int routing, int32_t* experts, float* weights, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  if (E < 1 || E > 1024 || k < 1 || k > E || K % 4 != 0 || ldx % 4 != 0 || ldg % 4 != 0)
    return cudaErrorInvalidValue;
  const int64_t blocks = (T + GATING_WARPS - 1) / GATING_WARPS;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const size_t smem = (size_t)GATING_WARPS * 2 * E * sizeof(float);  // <= 32 KiB for E <= 1024
  gating_kernel<<<(unsigned)blocks, GATING_WARPS * 32, smem, stream>>>(x, ldx, gate, ldg, K, T, E, k, routing,
                                                                      experts, weights);
  return cudaGetLastError();
}
