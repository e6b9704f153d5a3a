// Router: logits = gate . x_t in float32, softmax, top-k and (optionally) renormalisation, fused in one
// kernel with one block per token.
//
// Why a warp per (token, expert): the router is a GEMV with a tiny output (E logits) per token, so the
// lanes of a warp split the hidden dimension and meet in a butterfly reduction, and the block's warps take
// the experts in turn, so all of a token's experts (up to GATING_MAX_WARPS) stream their rows of the gate
// at once instead of one after the other. The butterfly gives every lane the same bits (lane l adds
// a_l + a_{l^m}, lane l^m adds a_{l^m} + a_l, and float addition is commutative), each logit's sum has one
// fixed order whatever warp computes it, and no order depends on T or on the other tokens, so routing is
// batch invariant. Softmax and top-k then run in one warp on the logits in shared memory.
#include <math.h>

#include "moe_cuda.cuh"

#define GATING_MAX_WARPS 16  // warps per block (token); each takes experts warp, warp + warps, ...
#define GATING_LOADS 8       // float4 loads of each operand in flight per lane

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

// Grid: T blocks of min(E, GATING_MAX_WARPS) warps. Dynamic shared memory: 2*E floats.
static __global__ void __launch_bounds__(GATING_MAX_WARPS * 32)
    gating_kernel(const float* __restrict__ x, int64_t ldx, const float* __restrict__ gate, int64_t ldg, int64_t K,
                  int E, int k, int routing, int32_t* __restrict__ experts, float* __restrict__ weights) {
  extern __shared__ float gating_smem[];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  const int64_t t = blockIdx.x;  // token of this block
  float* p = gating_smem;        // [E] logits, then probabilities, then taken marks
  float* picked = p + E;         // [k] probability of each pick, in pick order

  // 1. Logits, expert e by warp e % warps. K is a multiple of 4 and rows are 16-byte aligned (padded), so
  // float4 loads are safe. Each lane loads GATING_LOADS float4 of x and of the gate row before it multiplies
  // and adds them in ascending i: the loads are in flight together, and the order of the sum is the one
  // of a plain loop over i.
  const float4* xt = (const float4*)(x + t * ldx);
  const int64_t K4 = K / 4;  // float4 per row
  for (int e = warp; e < E; e += warps) {
    const float4* g = (const float4*)(gate + (int64_t)e * ldg);
    float acc = 0.0f;
    for (int64_t i0 = lane; i0 < K4; i0 += 32 * GATING_LOADS) {
      float4 a[GATING_LOADS], b[GATING_LOADS];
#pragma unroll
      for (int u = 0; u < GATING_LOADS; u++) {
        const int64_t i = i0 + 32 * u;
        a[u] = i < K4 ? xt[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        b[u] = i < K4 ? __ldg(&g[i]) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
#pragma unroll
      for (int u = 0; u < GATING_LOADS; u++) {
        if (i0 + 32 * u >= K4) break;  // skipped, not added as zeros: 0 * 0 + (-0) would give +0
        acc = fmaf(a[u].x, b[u].x, acc);
        acc = fmaf(a[u].y, b[u].y, acc);
        acc = fmaf(a[u].z, b[u].z, acc);
        acc = fmaf(a[u].w, b[u].w, acc);
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) p[e] = acc;
  }
  __syncthreads();        // every logit is in p
  if (warp != 0) return;  // softmax and top-k are one warp's; no block-wide barrier follows

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
    if (isnan(l))
      v = NAN;
    else if (mx == INFINITY)
      v = (l == INFINITY) ? 1.0f : 0.0f;
    else
      v = expf(l - mx);
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
      if (gating_better(v, e, bv, bi)) {
        bv = v;
        bi = e;
      }
    }
    for (int m = 16; m > 0; m >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, m);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, m);
      if (gating_better(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
      }
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

cudaError_t gating_cuda(const float* x, int64_t ldx, const float* gate, int64_t ldg, int64_t K, int64_t T, int E, int k,
                        int routing, int32_t* experts, float* weights, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  if (E < 1 || E > 1024 || k < 1 || k > E || K % 4 != 0 || ldx % 4 != 0 || ldg % 4 != 0 || T > 0x7fffffff)
    return cudaErrorInvalidValue;
  const int warps = E < GATING_MAX_WARPS ? E : GATING_MAX_WARPS;
  const size_t smem = (size_t)2 * E * sizeof(float);  // <= 8 KiB for E <= 1024
  gating_kernel<<<(unsigned)T, warps * 32, smem, stream>>>(x, ldx, gate, ldg, K, E, k, routing, experts, weights);
  return cudaGetLastError();
}
