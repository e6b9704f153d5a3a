// Router: logits = gate . x_t in float32, softmax or sigmoid scores, the choice bias, group-limited
// top-k, renormalisation and the routed scale, fused in one kernel with one block per token; the shared
// expert's slices are appended to every token's picks with its gate's weight.
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

// Grid: T blocks of min(rows, GATING_MAX_WARPS) warps, rows = E (+1 for the shared gate).
// Dynamic shared memory: gating_smem_floats(E) floats.
static __global__ void __launch_bounds__(GATING_MAX_WARPS * 32)
    gating_kernel(const float* __restrict__ x, int64_t ldx, const float* __restrict__ gate, int64_t ldg, int64_t K,
                  gating_params gp, int32_t* __restrict__ experts, float* __restrict__ weights) {
  extern __shared__ float gating_smem[];
  const int E = gp.E, k = gp.k;
  const int rows = E + (gp.shared_gate ? 1 : 0);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  const int64_t t = blockIdx.x;  // token of this block
  float* p = gating_smem;        // [rows] logits, then scores (the shared gate's logit last)
  float* c = p + rows;           // [E] choice scores: p + bias
  float* out = c + E;            // [E] 1: taken or in a dropped group
  float* gs = out + E;           // [E] group scores (G <= E)
  float* gout = gs + E;          // [E] 1: group taken or dropped

  // 1. Logits, row e by warp e % warps. K is a multiple of 4 and rows are 16-byte aligned (padded), so
  // float4 loads are safe. Each lane loads GATING_LOADS float4 of x and of the gate row before it multiplies
  // and adds them in ascending i: the loads are in flight together, and the order of the sum is the one
  // of a plain loop over i.
  const float4* xt = (const float4*)(x + t * ldx);
  const int64_t K4 = K / 4;  // float4 per row
  for (int e = warp; e < rows; e += warps) {
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
  if (warp != 0) return;  // scores and top-k are one warp's; no block-wide barrier follows

  // 2. Scores. Softmax over the non-NaN logits: NaN logits get NaN probability; when some logit is +inf
  // the +inf logits share the mass (exp(inf - inf) would be NaN otherwise); when every logit is -inf or
  // NaN the probabilities are NaN, and the output follows. Sigmoid: each on its own, NaN stays NaN.
  if (gp.sigmoid) {
    for (int e = lane; e < E; e += 32) p[e] = 1.0f / (1.0f + expf(-p[e]));
  } else {
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
  }
  for (int e = lane; e < E; e += 32) {
    c[e] = gp.bias ? p[e] + gp.bias[e] : p[e];
    out[e] = 0.0f;
  }
  __syncwarp();

  // 3. Groups: each lane scores its groups (the best choice score, or the sum of the two best), then
  // topk_groups rounds of a warp-wide argmax keep the best; the experts of the others are out.
  if (gp.groups > 0) {
    const int G = gp.groups, per = E / G;
    for (int g = lane; g < G; g += 32) {
      int first = g * per, second = -1;
      for (int e = first + 1; e < (g + 1) * per; e++) {
        if (gating_better(c[e], e, c[first], first)) {
          second = first;
          first = e;
        } else if (second < 0 || gating_better(c[e], e, c[second], second)) {
          second = e;
        }
      }
      gs[g] = gp.group_top2 ? c[first] + c[second] : c[first];
      gout[g] = 1.0f;
    }
    __syncwarp();
    for (int j = 0; j < gp.group_topk; j++) {
      float bv = 0.0f;
      int bi = -1;
      for (int g = lane; g < G; g += 32)
        if (gout[g] != 0.0f && gating_better(gs[g], g, bv, bi)) {
          bv = gs[g];
          bi = g;
        }
      for (int m = 16; m > 0; m >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, m);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, m);
        if (gating_better(ov, oi, bv, bi)) {
          bv = ov;
          bi = oi;
        }
      }
      __syncwarp();
      if (lane == 0) gout[min(max(bi, 0), G - 1)] = 0.0f;  // kept
      __syncwarp();
    }
    // The groups still marked 1 are dropped (none is taken any more: only kept ones were marked 0).
    for (int e = lane; e < E; e += 32) out[e] = gout[e / per];
    __syncwarp();
  }

  // 4. Top-k by k rounds of a warp-wide argmax over the choice scores; each round marks its pick. The
  // config guarantees k candidates; the clamp only guards the index against a broken invariant.
  float picked_sum = 0.0f;
  int32_t* ids = experts + t * gp.ld_out;
  float* w = weights + t * gp.ld_out;
  for (int j = 0; j < k; j++) {
    float bv = 0.0f;
    int bi = -1;
    for (int e = lane; e < E; e += 32) {
      if (out[e] != 0.0f) continue;
      if (gating_better(c[e], e, bv, bi)) {
        bv = c[e];
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
    picked_sum += p[bi];  // the same value in every lane
    __syncwarp();         // every lane has read out before lane 0 marks the pick
    if (lane == 0) {
      ids[j] = bi;
      out[bi] = 1.0f;
    }
    __syncwarp();
  }

  // 5. Weights in pick order: the unbiased scores, over their sum for the -renorm routings (+1e-20 for
  // sigmoid, whose scores may all be tiny), times the routed scale. Then the shared expert's slices,
  // every one with the shared gate's sigmoid (or 1).
  const float denom = gp.renorm ? (gp.sigmoid ? picked_sum + 1e-20f : picked_sum) : 1.0f;
  for (int j = lane; j < k; j += 32) w[j] = p[ids[j]] / denom * gp.scale;
  const float shared_w = gp.shared_gate ? 1.0f / (1.0f + expf(-p[E])) : 1.0f;
  for (int s = lane; s < gp.n_shared; s += 32) {
    ids[k + s] = E + s;
    w[k + s] = shared_w;
  }
}

static size_t gating_smem_floats(int E) { return (size_t)5 * E + 1; }

cudaError_t gating_cuda(const float* x, int64_t ldx, const float* gate, int64_t ldg, int64_t K, int64_t T,
                        const gating_params* gp, int32_t* experts, float* weights, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  const int E = gp->E, k = gp->k;
  if (E < 1 || E > 1024 || k < 1 || k > E || K % 4 != 0 || ldx % 4 != 0 || ldg % 4 != 0 || T > 0x7fffffff ||
      gp->n_shared < 0 || gp->ld_out < k + gp->n_shared ||
      (gp->groups > 0 && (E % gp->groups != 0 || gp->group_topk < 1 || gp->group_topk > gp->groups ||
                          k > gp->group_topk * (E / gp->groups) || (gp->group_top2 && E / gp->groups < 2))))
    return cudaErrorInvalidValue;
  const int rows = E + (gp->shared_gate ? 1 : 0);
  const int warps = rows < GATING_MAX_WARPS ? rows : GATING_MAX_WARPS;
  const size_t smem = gating_smem_floats(E) * sizeof(float);  // <= 20 KiB for E <= 1024
  gating_kernel<<<(unsigned)T, warps * 32, smem, stream>>>(x, ldx, gate, ldg, K, *gp, experts, weights);
  return cudaGetLastError();
}
