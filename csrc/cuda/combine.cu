// Combine: out[t] = sum over j = 0..k-1 of w[t, j] * y[row(t, j)], a gather-reduce.
//
// One thread per output element, each summing its k terms in pick order with fmaf. The grid spans the
// tokens and, in COMBINE_THREADS-wide slices, the hidden dimension, so a single token (decode) still
// spreads over H / COMBINE_THREADS blocks and SMs. No atomics and no order that depends on scheduling, on
// the grid or on the other tokens, so the result is bit-identical from run to run and at any batch size.
#include "moe_cuda.cuh"

#define COMBINE_THREADS 256
#define COMBINE_MAX_SLICES 65535  // grid.y limit; more columns loop

// Grid: T x min(ceil(H / COMBINE_THREADS), COMBINE_MAX_SLICES) blocks of COMBINE_THREADS.
static __global__ void __launch_bounds__(COMBINE_THREADS)
    combine_kernel(const float* __restrict__ y, int64_t ldy, const int32_t* __restrict__ inv,
                   const float* __restrict__ weights, int k, int64_t H, float* __restrict__ out) {
  const int64_t t = blockIdx.x;  // token
  const int32_t* pos = inv + t * k;
  const float* w = weights + t * k;
  const int64_t stride = (int64_t)gridDim.y * COMBINE_THREADS;
  for (int64_t h = (int64_t)blockIdx.y * COMBINE_THREADS + threadIdx.x; h < H; h += stride) {
    float acc = 0.0f;
    for (int j = 0; j < k; j++) acc = fmaf(w[j], y[(int64_t)pos[j] * ldy + h], acc);
    out[t * H + h] = acc;
  }
}

cudaError_t combine_cuda(const float* y, int64_t ldy, const int32_t* inv, const float* weights, int64_t T, int k,
                         int64_t H, float* out, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  if (T > 0x7fffffff || k < 1 || H < 1 || ldy < H) return cudaErrorInvalidValue;
  const int64_t want = (H + COMBINE_THREADS - 1) / COMBINE_THREADS;
  const dim3 grid((unsigned)T, (unsigned)(want < COMBINE_MAX_SLICES ? want : COMBINE_MAX_SLICES));
  combine_kernel<<<grid, COMBINE_THREADS, 0, stream>>>(y, ldy, inv, weights, k, H, out);
  return cudaGetLastError();
}
