// Combine: out[t] = sum over j = 0..k-1 of w[t, j] * y[row(t, j)], a gather-reduce.
//
// One block per token and one thread per output element, each summing its k terms in pick order with
// fmaf. No atomics and no order that depends on scheduling or on the other tokens, so the result is
// bit-identical from run to run and at any batch size.
#include "moe_cuda.cuh"

#define COMBINE_THREADS 256

// Grid: T blocks of COMBINE_THREADS.
static __global__ void __launch_bounds__(COMBINE_THREADS)
combine_kernel(const float* __restrict__ y, int64_t ldy, const int32_t* __restrict__ inv,
               const float* __restrict__ weights, int k, int64_t H, float* __restrict__ out) {
  const int64_t t = blockIdx.x;  // token
  const int32_t* pos = inv + t * k;
  const float* w = weights + t * k;
  for (int64_t h = threadIdx.x; h < H; h += COMBINE_THREADS) {
    float acc = 0.0f;
    for (int j = 0; j < k; j++) acc = fmaf(w[j], y[(int64_t)pos[j] * ldy + h], acc);
    out[t * H + h] = acc;
  }
}

cudaError_t combine_cuda(const float* y, int64_t ldy, const int32_t* inv, const float* weights, int64_t T,
                         int k, int64_t H, float* out, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  if (T > 0x7fffffff || k < 1 || H < 1 || ldy < H) return cudaErrorInvalidValue;
  combine_kernel<<<(unsigned)T, COMBINE_THREADS, 0, stream>>>(y, ldy, inv, weights, k, H, out);
  return cudaGetLastError();
}
