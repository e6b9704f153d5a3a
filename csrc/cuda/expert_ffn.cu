// Expert FFN: grouped GEMMs over the expert-sorted row list.
//   pass 1: h = silu(x W1_e^T) * (x W3_e^T)  (w1 and w3 tiles read in one pass, SwiGLU in the epilogue)
//   pass 2: y = h W2_e^T
// Every tile of block_m rows belongs to one expert (dispatch pads each expert's run to block_m), and the
// grid is sized from an upper bound of the tile count, so tiles past *num_tiles return at once and the
// host never waits for the routing.
//
// Both passes are "NT" products: C[m][n] = sum_k A[m][k] * B[n][k], A row-major [rows, K] and B the weight
// in checkpoint layout [N, K]: exactly the row.col operand order of mma.sync, no transpose anywhere.
//
// Determinism and batch invariance: each output element is accumulated over K in ascending steps of 16
// (mma path) or 1 (float32 path), starting from zero, with no split-K. Tile sizes only decide which
// outputs a thread owns, never the order of a sum, so a token gets the same bits alone or in a batch and
// with any tile configuration. The decode configuration (block_m = 16) is the GEMV regime: one tile per
// picked expert, each expert's weights streamed from memory once, split over N so that all SMs stream.
#include <cuda_fp16.h>
#include <math.h>

#include "moe_cuda.cuh"

// ---- small helpers, named after what they wrap ---------------------------------------------------------

// silu(a) = a / (1 + exp(-a)). expf, not __expf: the float32 path promises float32 accuracy.
static __device__ __forceinline__ float silu(float a) { return a / (1.0f + expf(-a)); }

// float -> bfloat16 bits, round to nearest even, NaN stays a quiet NaN (the same rule as the CPU side).
static __device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  uint32_t b = __float_as_uint(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40u);
  b += 0x7fffu + ((b >> 16) & 1u);
  return (uint16_t)(b >> 16);
}

static __device__ __forceinline__ uint16_t f32_to_f16_bits(float f) { return __half_as_ushort(__float2half_rn(f)); }

template <bool BF16>
static __device__ __forceinline__ uint16_t f32_to_16(float f) {
  return BF16 ? f32_to_bf16_bits(f) : f32_to_f16_bits(f);
}

// Asynchronous 16-byte global -> shared copy. .cg caches in L2 only: weights are streamed once per tile
// and would only evict useful lines from L1. With valid == false nothing is read and the 16 bytes are
// zero-filled (src-size 0), which is how padding rows of the sorted list become zeros.
static __device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n) : "memory");
}

static __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
static __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices from shared memory; lane i gives the row address of matrix i/8, row i%8.
static __device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* smem) {
  const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s)
               : "memory");
}

// D = A(16x16, row) * B(16x8, col) + D with float32 accumulate.
template <bool BF16>
static __device__ __forceinline__ void mma_m16n8k16(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// What one grouped GEMM launch reads and writes.
typedef struct {
  const void* a;  // activations, row-major, lda elements per row (K used)
  int64_t lda;
  const int32_t* sorted_rows;  // pick id t*k + j of each sorted position, -1 on padding
  int gather;                  // pass 1: A row = id / topk (the pick's token); pass 2: A row = the position
  int topk;                    // k
  const void* b0;              // weights [E, N, K] (w1, or w2)
  const void* b1;              // weights [E, N, K] (w3), pass 1 only
  int64_t N, K;                // padded output and reduction sizes (multiples of FMOE_PAD)
  const int32_t* tile_expert;  // expert of each tile
  const int32_t* num_tiles;    // tiles in use (device scalar)
  void* out;                   // pass 1: h [rows, N] (16-bit, or float for the float32 path); pass 2: y float
  int64_t ldo;
} gemm_args;

// Global A row of sorted position pos, or -1 for a padding position: its A row is zero-filled, never read,
// and its output row is never written (nothing reads it: combine gathers the real rows only).
static __device__ __forceinline__ int64_t a_row_of(const gemm_args& g, int64_t pos) {
  const int id = g.sorted_rows[pos];
  if (id < 0) return -1;
  return g.gather ? id / g.topk : pos;
}

// ---- tensor-core path (bf16 / fp16 weights) -----------------------------------------------------------

// Tile: BM sorted rows x BN output columns, K in steps of BK through a STAGES-deep cp.async ring.
// Warps: (BM/WM) x (BN/WN), each owning WM x WN outputs (of each B matrix when NB == 2).
// Shared rows are padded by 8 halves (16 bytes): the 8 row addresses of an ldmatrix then fall in
// distinct bank groups (row strides of 80 or 144 bytes), so fragment loads do not conflict.
template <int BM, int BN, int BK, int WM, int WN, int STAGES, int NB, bool BF16>
static __global__ void __launch_bounds__((BM / WM) * (BN / WN) * 32) ffn_mma_kernel(gemm_args g) {
  constexpr int THREADS = (BM / WM) * (BN / WN) * 32;
  constexpr int LDS = BK + 8;  // shared row stride, halves
  constexpr int MT = WM / 16;  // m16 fragments per warp
  constexpr int NT = WN / 8;   // n8 fragments per warp (and per B matrix)
  static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 16 == 0, "warp tiling");
  static_assert(BK % 16 == 0 && FMOE_PAD % BK == 0 && FMOE_PAD % BN == 0, "K and N tiling vs padding");
  static_assert(NB == 1 || NB == 2, "one or two B matrices");

  const int tile = blockIdx.x;                  // tile of the sorted row list
  if (tile >= *g.num_tiles) return;             // uniform for the block, before any barrier
  const int e = g.tile_expert[tile];            // expert of this tile
  const int64_t m0 = (int64_t)tile * BM;        // first sorted position
  const int64_t n0 = (int64_t)blockIdx.y * BN;  // first output column
  const int64_t K = g.K;                        // reduction length (padded)
  const int KT = (int)(K / BK);                 // K tiles

  extern __shared__ uint4 ffn_smem[];             // uint4: 16-byte alignment for cp.async and ldmatrix
  uint16_t* sA = (uint16_t*)ffn_smem;             // [STAGES][BM][LDS]
  uint16_t* sB = sA + (size_t)STAGES * BM * LDS;  // [STAGES][NB][BN][LDS]
  __shared__ int64_t s_arow[BM];                  // global A row of each tile row, -1 for padding

  const int tid = threadIdx.x;
  for (int r = tid; r < BM; r += THREADS) s_arow[r] = a_row_of(g, m0 + r);
  __syncthreads();

  const uint16_t* A = (const uint16_t*)g.a;
  const uint16_t* B0 = (const uint16_t*)g.b0 + ((size_t)e * g.N + n0) * K;
  const uint16_t* B1 = NB == 2 ? (const uint16_t*)g.b1 + ((size_t)e * g.N + n0) * K : B0;

  // Queue the copies of K tile kt into ring slot `stage`; 8 halves per 16-byte chunk.
  auto load_stage = [&](int stage, int kt) {
    const int64_t k0 = (int64_t)kt * BK;
    constexpr int CPR = BK / 8;  // chunks per row
    for (int c = tid; c < BM * CPR; c += THREADS) {
      const int r = c / CPR, cc = c % CPR;
      const int64_t row = s_arow[r];
      const uint16_t* src = row >= 0 ? A + row * g.lda + k0 + cc * 8 : A;
      cp_async_16(sA + ((size_t)stage * BM + r) * LDS + cc * 8, src, row >= 0);
    }
    for (int b = 0; b < NB; b++) {
      const uint16_t* Bb = b == 0 ? B0 : B1;
      for (int c = tid; c < BN * CPR; c += THREADS) {
        const int r = c / CPR, cc = c % CPR;
        cp_async_16(sB + (((size_t)stage * NB + b) * BN + r) * LDS + cc * 8, Bb + (int64_t)r * K + k0 + cc * 8, true);
      }
    }
  };

  const int warp = tid / 32, lane = tid % 32;
  const int wm0 = (warp / (BN / WN)) * WM;  // warp's first row in the tile
  const int wn0 = (warp % (BN / WN)) * WN;  // warp's first column in the tile

  float acc[NB][MT][NT][4];
#pragma unroll
  for (int b = 0; b < NB; b++)
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
      for (int j = 0; j < NT; j++)
#pragma unroll
        for (int q = 0; q < 4; q++) acc[b][i][j][q] = 0.0f;

          // Prologue: fill STAGES-1 slots. One commit per slot even when empty keeps the group count uniform,
          // so wait_group<STAGES-2> always means "tile kt has landed".
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; kt++) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt visible to all warps, and every warp is done with the slot refilled next
    {
      const int next = kt + STAGES - 1;
      if (next < KT) load_stage(next % STAGES, next);
      cp_async_commit();
    }
    const int stage = kt % STAGES;
    const uint16_t* a_st = sA + (size_t)stage * BM * LDS;
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) {
      // A fragments: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
      // are a0..a3 of the m16n8k16 A operand.
      uint32_t af[MT][4];
#pragma unroll
      for (int i = 0; i < MT; i++)
        ldmatrix_x4(af[i], a_st + (size_t)(wm0 + i * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int b = 0; b < NB; b++) {
        const uint16_t* b_st = sB + ((size_t)stage * NB + b) * BN * LDS;
        // B fragments, two n8 blocks per ldmatrix: matrices (n 0-7, k 0-7), (n 0-7, k 8-15) are b0, b1 of
        // the first n8 block, (n 8-15, k 0-7), (n 8-15, k 8-15) those of the second.
        uint32_t bf[NT][2];
#pragma unroll
        for (int jj = 0; jj < NT / 2; jj++) {
          uint32_t r[4];
          ldmatrix_x4(r, b_st + (size_t)(wn0 + jj * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 +
                             ((lane >> 3) & 1) * 8);
          bf[2 * jj][0] = r[0];
          bf[2 * jj][1] = r[1];
          bf[2 * jj + 1][0] = r[2];
          bf[2 * jj + 1][1] = r[3];
        }
#pragma unroll
        for (int i = 0; i < MT; i++)
#pragma unroll
          for (int j = 0; j < NT; j++) mma_m16n8k16<BF16>(acc[b][i][j], af[i], bf[j][0], bf[j][1]);
      }
    }
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits

  // Epilogue. Accumulator q of fragment (i, j) is row g (q < 2) or g + 8 (q >= 2), column 2t + (q & 1),
  // with g = lane / 4 and t = lane % 4. Columns come in even pairs: one 32-bit (or float2) store each.
  const int gr = lane >> 2, tc = (lane & 3) * 2;
#pragma unroll
  for (int i = 0; i < MT; i++)
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
      for (int half = 0; half < 2; half++) {
        const int r = wm0 + i * 16 + gr + half * 8;  // row in the tile
        if (s_arow[r] < 0) continue;                 // padding
        const int64_t row = m0 + r;                  // sorted position
        const int64_t col = n0 + wn0 + j * 8 + tc;
        const float v0 = acc[0][i][j][half * 2], v1 = acc[0][i][j][half * 2 + 1];
        if (NB == 2) {
          const float h0 = silu(v0) * acc[NB - 1][i][j][half * 2];
          const float h1 = silu(v1) * acc[NB - 1][i][j][half * 2 + 1];
          const uint32_t packed = (uint32_t)f32_to_16<BF16>(h0) | ((uint32_t)f32_to_16<BF16>(h1) << 16);
          *(uint32_t*)((uint16_t*)g.out + row * g.ldo + col) = packed;
        } else {
          *(float2*)((float*)g.out + row * g.ldo + col) = make_float2(v0, v1);
        }
      }
}

// Dynamic shared memory of an mma tile shape: the ring of A and B tiles, rows padded by 8 halves.
static constexpr size_t mma_smem(int BM, int BN, int BK, int STAGES, int NB) {
  return (size_t)STAGES * (BM + NB * BN) * (BK + 8) * sizeof(uint16_t);
}

template <int BM, int BN, int BK, int WM, int WN, int STAGES, int NB, bool BF16>
static cudaError_t launch_mma(const gemm_args& g, int64_t tiles_cap, cudaStream_t stream) {
  constexpr int THREADS = (BM / WM) * (BN / WN) * 32;
  constexpr size_t smem = mma_smem(BM, BN, BK, STAGES, NB);
  // Above 48 KiB of dynamic shared memory a kernel must opt in; the call is cheap and per device.
  cudaError_t err = cudaFuncSetAttribute(ffn_mma_kernel<BM, BN, BK, WM, WN, STAGES, NB, BF16>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((unsigned)tiles_cap, (unsigned)(g.N / BN));
  ffn_mma_kernel<BM, BN, BK, WM, WN, STAGES, NB, BF16><<<grid, THREADS, smem, stream>>>(g);
  return cudaGetLastError();
}

// ---- float32 path: plain SIMT tiles, float32 from end to end ------------------------------------------

// Tile BM x BN, K in steps of BK through shared memory; thread (ty, tx) owns TM x TN outputs of each B
// matrix and accumulates them with fmaf over k in ascending order.
template <int BM, int BN, int BK, int TM, int TN, int NB>
static __global__ void __launch_bounds__((BM / TM) * (BN / TN)) ffn_f32_kernel(gemm_args g) {
  constexpr int TX = BN / TN;  // threads across N
  constexpr int THREADS = (BM / TM) * TX;
  static_assert(FMOE_PAD % BK == 0 && FMOE_PAD % BN == 0, "K and N tiling vs padding");

  const int tile = blockIdx.x;
  if (tile >= *g.num_tiles) return;
  const int e = g.tile_expert[tile];            // expert of this tile
  const int64_t m0 = (int64_t)tile * BM;        // first sorted position
  const int64_t n0 = (int64_t)blockIdx.y * BN;  // first output column
  const int64_t K = g.K;                        // reduction length (padded)

  __shared__ float sA[BK][BM + 1];      // transposed: a k-slice of the tile's rows
  __shared__ float sB[NB][BK][BN + 1];  // transposed: a k-slice of the tile's weight rows
  __shared__ int64_t s_arow[BM];

  const int tid = threadIdx.x;
  for (int r = tid; r < BM; r += THREADS) s_arow[r] = a_row_of(g, m0 + r);
  __syncthreads();

  const float* A = (const float*)g.a;
  const float* B0 = (const float*)g.b0 + ((size_t)e * g.N + n0) * K;
  const float* B1 = NB == 2 ? (const float*)g.b1 + ((size_t)e * g.N + n0) * K : B0;
  const int ty = tid / TX, tx = tid % TX;

  float acc[NB][TM][TN];
#pragma unroll
  for (int b = 0; b < NB; b++)
#pragma unroll
    for (int i = 0; i < TM; i++)
#pragma unroll
      for (int j = 0; j < TN; j++) acc[b][i][j] = 0.0f;

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    // Consecutive threads read consecutive k of one row: coalesced BK-float segments.
    for (int c = tid; c < BM * BK; c += THREADS) {
      const int r = c / BK, kk = c % BK;
      const int64_t row = s_arow[r];
      sA[kk][r] = row >= 0 ? A[row * g.lda + k0 + kk] : 0.0f;
    }
    for (int b = 0; b < NB; b++) {
      const float* Bb = b == 0 ? B0 : B1;
      for (int c = tid; c < BN * BK; c += THREADS) {
        const int r = c / BK, kk = c % BK;
        sB[b][kk][r] = Bb[(int64_t)r * K + k0 + kk];
      }
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < BK; kk++) {
      float a[TM];
#pragma unroll
      for (int i = 0; i < TM; i++) a[i] = sA[kk][ty * TM + i];
#pragma unroll
      for (int b = 0; b < NB; b++)
#pragma unroll
        for (int j = 0; j < TN; j++) {
          const float w = sB[b][kk][tx * TN + j];
#pragma unroll
          for (int i = 0; i < TM; i++) acc[b][i][j] = fmaf(a[i], w, acc[b][i][j]);
        }
    }
    __syncthreads();  // the next k-slice overwrites the tiles
  }

  float* out = (float*)g.out;
#pragma unroll
  for (int i = 0; i < TM; i++) {
    if (s_arow[ty * TM + i] < 0) continue;  // padding
#pragma unroll
    for (int j = 0; j < TN; j++) {
      const int64_t row = m0 + ty * TM + i;
      const int64_t col = n0 + tx * TN + j;
      out[row * g.ldo + col] = NB == 2 ? silu(acc[0][i][j]) * acc[NB - 1][i][j] : acc[0][i][j];
    }
  }
}

template <int BM, int BN, int BK, int TM, int TN, int NB>
static cudaError_t launch_f32(const gemm_args& g, int64_t tiles_cap, cudaStream_t stream) {
  constexpr int THREADS = (BM / TM) * (BN / TN);
  const dim3 grid((unsigned)tiles_cap, (unsigned)(g.N / BN));
  ffn_f32_kernel<BM, BN, BK, TM, TN, NB><<<grid, THREADS, 0, stream>>>(g);
  return cudaGetLastError();
}

// ---- configurations (data: chosen by batch size) ------------------------------------------------------
//
//   config  block_m  use                         mma tiles: up (w1/w3) / down (w2)          f32 tile
//   0       16       decode: <= 16 rows/expert   16x64x64 4 stages / 16x64x64 8 stages      16 x 64 x 32, 2x2/thread
//                    ... grid under 2 per SM     down 16x64x128, 3 stages
//   1       64       mid-size batches            64x64x32 4 stages / 64x128x64 3 stages     64 x 64 x 32, 4x4/thread
//                    ... >= 135 KiB per block    up 64x128x64, 3 stages
//   2       128      prefill (16-bit only)       128x64x32 4 stages / 128x128x32 4 stages   -
//                    ... >= 162 KiB per block    up 128x128x64, 3 stages
//
// Timed on an H200 with bench/gpu/ffn_tiles.cu (bench/gpu/RESULTS.md). A decode w2 pass over few
// experts has about one block per SM (H/64 per expert), and then longer K steps keep more bytes in flight
// per block; the larger prefill tiles need more shared memory than sm_89 has (99 KiB per block), so each
// launch checks the device's limit and falls back to the smaller shape. The float32 path has no 128-row
// tile: ffn_pick_config never gives it config 2. Tile shapes never change a sum's order, so every
// choice gives the same bits (the self-test checks it).

#define FFN_CONFIGS 3

int ffn_pick_config(int64_t n_rows, int64_t n_expert, int dtype) {
  const int64_t per_expert = n_rows / (n_expert > 0 ? n_expert : 1);  // average rows per expert
  if (per_expert <= 16) return 0;
  if (per_expert <= 64 || dtype == 0) return 1;
  return 2;
}

int ffn_block_m(int config) {
  switch (config) {
    case 0:
      return 16;
    case 1:
      return 64;
    default:
      return 128;
  }
}

template <bool BF16>
static cudaError_t ffn_mma(const gemm_args& up, const gemm_args& down, const ffn_problem& p, cudaStream_t stream) {
  const int64_t tiles_cap = p.tiles_cap;
  const size_t smem = p.smem_per_block > 0 ? (size_t)p.smem_per_block : 0;
  cudaError_t err;
  switch (p.config) {
    case 0: {
      // Decode: every byte of weight is used once, so speed is bytes in flight. The w1/w3 pass has
      // 2 x F/64 blocks per expert; the w2 pass only H/64 per expert (128 for Mixtral at T = 1, about one
      // per SM), where 128-wide K steps stream faster than a deeper ring of 64-wide ones.
      err = launch_mma<16, 64, 64, 16, 16, 4, 2, BF16>(up, tiles_cap, stream);
      if (err != cudaSuccess) return err;
      const bool small_grid = p.sm_count > 0 && tiles_cap * (p.Hp / 64) < 2 * (int64_t)p.sm_count;
      if (small_grid) return launch_mma<16, 64, 128, 16, 16, 3, 1, BF16>(down, tiles_cap, stream);
      return launch_mma<16, 64, 64, 16, 16, 8, 1, BF16>(down, tiles_cap, stream);
    }
    case 1:
      if (smem >= mma_smem(64, 128, 64, 3, 2))
        err = launch_mma<64, 128, 64, 32, 64, 3, 2, BF16>(up, tiles_cap, stream);
      else
        err = launch_mma<64, 64, 32, 32, 32, 4, 2, BF16>(up, tiles_cap, stream);
      if (err == cudaSuccess) err = launch_mma<64, 128, 64, 32, 64, 3, 1, BF16>(down, tiles_cap, stream);
      return err;
    default:
      if (smem >= mma_smem(128, 128, 64, 3, 2))
        err = launch_mma<128, 128, 64, 64, 32, 3, 2, BF16>(up, tiles_cap, stream);
      else
        err = launch_mma<128, 64, 32, 32, 32, 4, 2, BF16>(up, tiles_cap, stream);
      if (err == cudaSuccess) err = launch_mma<128, 128, 32, 64, 32, 4, 1, BF16>(down, tiles_cap, stream);
      return err;
  }
}

static cudaError_t ffn_f32(const gemm_args& up, const gemm_args& down, int config, int64_t tiles_cap,
                           cudaStream_t stream) {
  cudaError_t err;
  if (config == 0) {
    err = launch_f32<16, 64, 32, 2, 2, 2>(up, tiles_cap, stream);
    if (err == cudaSuccess) err = launch_f32<16, 64, 32, 2, 2, 1>(down, tiles_cap, stream);
    return err;
  }
  if (config != 1) return cudaErrorInvalidValue;  // no 128-row float32 tile
  err = launch_f32<64, 64, 32, 4, 4, 2>(up, tiles_cap, stream);
  if (err == cudaSuccess) err = launch_f32<64, 64, 32, 4, 4, 1>(down, tiles_cap, stream);
  return err;
}

cudaError_t ffn_cuda(const ffn_problem* p, cudaStream_t stream) {
  if (!p || p->config < 0 || p->config >= FFN_CONFIGS || p->dtype < 0 || p->dtype > 2 || p->top_k < 1 || p->Hp <= 0 ||
      p->Fp <= 0 || p->Hp % FMOE_PAD != 0 || p->Fp % FMOE_PAD != 0 || p->tiles_cap < 0 || p->tiles_cap > 0x7fffffff ||
      p->Fp / 64 > 65535 || p->Hp / 64 > 65535)
    return cudaErrorInvalidValue;
  if (p->tiles_cap == 0) return cudaSuccess;

  gemm_args up;  // pass 1: A = x gathered by token, B = w1 and w3, out = h
  up.a = p->x;
  up.lda = p->Hp;
  up.sorted_rows = p->sorted_rows;
  up.gather = 1;
  up.topk = p->top_k;
  up.b0 = p->w1;
  up.b1 = p->w3;
  up.N = p->Fp;
  up.K = p->Hp;
  up.tile_expert = p->tile_expert;
  up.num_tiles = p->num_tiles;
  up.out = p->h;
  up.ldo = p->Fp;

  gemm_args down;  // pass 2: A = h by sorted position, B = w2, out = y
  down.a = p->h;
  down.lda = p->Fp;
  down.sorted_rows = p->sorted_rows;
  down.gather = 0;
  down.topk = p->top_k;
  down.b0 = p->w2;
  down.b1 = NULL;
  down.N = p->Hp;
  down.K = p->Fp;
  down.tile_expert = p->tile_expert;
  down.num_tiles = p->num_tiles;
  down.out = p->y;
  down.ldo = p->Hp;

  if (p->dtype == 1) return ffn_mma<true>(up, down, *p, stream);
  if (p->dtype == 2) return ffn_mma<false>(up, down, *p, stream);
  return ffn_f32(up, down, p->config, p->tiles_cap, stream);
}

// Rounds the activations once per chunk, so the GEMM's A tiles are plain 16-byte copies.
template <bool BF16>
static __global__ void convert_to_16_kernel(const float* __restrict__ x, int64_t n, uint16_t* __restrict__ out) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = f32_to_16<BF16>(x[i]);
}

cudaError_t convert_to_16_cuda(const float* x, int64_t n, int dtype, uint16_t* out, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (dtype != 1 && dtype != 2) return cudaErrorInvalidValue;
  const int threads = 256;
  const int64_t want = (n + threads - 1) / threads;
  const unsigned blocks = (unsigned)(want < 4096 ? want : 4096);
  if (dtype == 1)
    convert_to_16_kernel<true><<<blocks, threads, 0, stream>>>(x, n, out);
  else
    convert_to_16_kernel<false><<<blocks, threads, 0, stream>>>(x, n, out);
  return cudaGetLastError();
}
