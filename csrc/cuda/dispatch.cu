// Dispatch: group the (token, pick) rows of a chunk by expert, on the device, in a deterministic order.
//
// A stable counting sort in a single block: shared-memory atomics count the rows of each expert (the
// counts do not depend on the order the atomics land in), one warp scans the padded counts, and one warp
// walks the rows in ascending order to place them, so each expert's rows ascend and every run gives the
// same permutation. A chunk has at most a few ten thousand rows, so one block costs microseconds, and the
// forward never waits for the host.
#include "moe_cuda.cuh"

#define DISPATCH_THREADS 1024
#define DISPATCH_MAX_EXPERTS 1024

// Grid: one block of DISPATCH_THREADS.
static __global__ void __launch_bounds__(DISPATCH_THREADS)
    dispatch_kernel(const int32_t* __restrict__ experts, int n_rows, int E, int BM, int32_t* __restrict__ sorted_rows,
                    int32_t* __restrict__ inv, int32_t* __restrict__ tile_expert, int32_t* __restrict__ num_tiles) {
  __shared__ int s_count[DISPATCH_MAX_EXPERTS];  // rows per expert
  __shared__ int s_base[DISPATCH_MAX_EXPERTS];   // first position of each expert's (padded) run
  __shared__ int s_next[DISPATCH_MAX_EXPERTS];   // rows already placed per expert
  __shared__ int s_total;                        // padded length of the whole list
  const int tid = threadIdx.x;
  const int lane = tid % 32;

  for (int e = tid; e < E; e += DISPATCH_THREADS) {
    s_count[e] = 0;
    s_next[e] = 0;
  }
  __syncthreads();

  // Expert ids come from the gating kernel and are always in [0, E); the clamp keeps a broken invariant
  // from writing out of bounds.
  for (int r = tid; r < n_rows; r += DISPATCH_THREADS) {
    const int e = min(max(experts[r], 0), E - 1);
    atomicAdd(&s_count[e], 1);
  }
  __syncthreads();

  // Exclusive scan of the padded counts by warp 0: lane l owns a contiguous slice of experts.
  if (tid < 32) {
    const int per_lane = (E + 31) / 32;
    const int e0 = min(lane * per_lane, E), e1 = min(e0 + per_lane, E);
    int local = 0;
    for (int e = e0; e < e1; e++) local += (s_count[e] + BM - 1) / BM * BM;
    int incl = local;
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    int off = incl - local;
    for (int e = e0; e < e1; e++) {
      s_base[e] = off;
      off += (s_count[e] + BM - 1) / BM * BM;
    }
    if (lane == 31) {
      s_total = incl;
      *num_tiles = incl / BM;
    }
  }
  __syncthreads();

  // Padding positions read as -1 (no row); the placement below overwrites the real ones. Each tile
  // learns its expert.
  const int total = s_total;
  for (int pos = tid; pos < total; pos += DISPATCH_THREADS) sorted_rows[pos] = -1;
  for (int e = tid; e < E; e += DISPATCH_THREADS) {
    const int t0 = s_base[e] / BM;
    const int t1 = t0 + (s_count[e] + BM - 1) / BM;
    for (int tile = t0; tile < t1; tile++) tile_expert[tile] = e;
  }
  __syncthreads();  // orders the -1 fill before the placement (same addresses, other threads)

  // Stable placement by warp 0, 32 rows at a time in ascending order: lanes with the same expert find
  // each other with match_any, take consecutive slots in lane order, and the lowest of them advances
  // the expert's cursor once every lane has read it.
  if (tid < 32) {
    for (int r0 = 0; r0 < n_rows; r0 += 32) {
      const int r = r0 + lane;
      const bool valid = r < n_rows;
      const int e = valid ? min(max(experts[r], 0), E - 1) : -1;
      const unsigned peers = __match_any_sync(0xffffffffu, e);
      const unsigned lower = peers & ((1u << lane) - 1u);  // peers in lower lanes
      if (valid) {
        const int pos = s_base[e] + s_next[e] + __popc(lower);
        sorted_rows[pos] = r;
        inv[r] = pos;
      }
      __syncwarp();
      if (valid && lower == 0) s_next[e] += __popc(peers);
      __syncwarp();
    }
  }
}

cudaError_t dispatch_cuda(const int32_t* experts, int64_t n_rows, int E, int block_m, int32_t* sorted_rows,
                          int32_t* inv, int32_t* tile_expert, int32_t* num_tiles, cudaStream_t stream) {
  if (n_rows < 0 || n_rows > FMOE_DISPATCH_MAX_ROWS || E < 1 || E > DISPATCH_MAX_EXPERTS || block_m < 1)
    return cudaErrorInvalidValue;
  dispatch_kernel<<<1, DISPATCH_THREADS, 0, stream>>>(experts, (int)n_rows, E, block_m, sorted_rows, inv, tile_expert,
                                                      num_tiles);
  return cudaGetLastError();
}
