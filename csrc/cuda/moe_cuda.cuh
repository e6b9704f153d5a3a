// Launchers of the CUDA pipeline stages, shared by the .cu files of the backend library.
// Each launcher takes raw device pointers and a stream, queues its kernel(s) and returns the launch status;
// none of them synchronises. Errors of the kernels themselves surface at the next synchronisation.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

// Every weight and activation row on the device is zero-padded to a multiple of this many elements, so
// GEMM tiles (BN, BK <= 128) never need bounds checks and every row starts 16-byte aligned. Padding only
// adds products of zeros, which leave every sum unchanged.
#define FMOE_PAD 128

// The largest GEMM block height (rows of the sorted token list per tile); workspaces are sized for it.
#define FMOE_MAX_BLOCK_M 128

static inline int64_t fmoe_round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Upper bound of the padded length of the sorted row list: each non-empty expert adds < BM padding rows.
static inline int64_t fmoe_padded_rows_cap(int64_t n_rows, int64_t n_expert, int64_t block_m) {
  const int64_t busy = n_rows < n_expert ? n_rows : n_expert;  // experts that can receive a row
  return fmoe_round_up(n_rows + busy * (block_m - 1), block_m);
}

// ---- gating.cu --------------------------------------------------------------------------------------
// What the router does with a token (csrc/core/routing.h has the same rules in float64).
typedef struct {
  int E, k;           // routed experts and picks
  int sigmoid;        // scores: 0 softmax, 1 sigmoid
  int renorm;         // divide the picked scores by their sum (+1e-20 for sigmoid)
  float scale;        // routed scale, after renormalising
  const float* bias;  // [E] device, added to the scores for the choice only; may be NULL
  int groups;         // 0: none; else E % groups == 0 equal groups, group_topk of them kept
  int group_topk;
  int group_top2;   // a group ranks by the sum of its two best choice scores (else its best)
  int n_shared;     // shared expert slices appended to every token's picks: experts E .. E+n_shared-1
  int shared_gate;  // gate row E is the shared gate: those picks weigh sigmoid(its logit), else 1
  int ld_out;       // stride of experts and weights per token (>= k + n_shared)
} gating_params;

// experts[t*ld_out + j], weights[t*ld_out + j] for t < T: the k picks (descending choice score, ties to
// the lower index, NaN last, dropped groups never), then the shared slices.
// x: [T, ldx] float32, gate: [E (+1), ldg] float32; both zero-padded so that K (a multiple of 4) is in bounds.
cudaError_t gating_cuda(const float* x, int64_t ldx, const float* gate, int64_t ldg, int64_t K, int64_t T,
                        const gating_params* gp, int32_t* experts, float* weights, cudaStream_t stream);

// ---- dispatch.cu ------------------------------------------------------------------------------------
// Stable counting sort of the n_rows = T*k picks by expert, each expert's run padded to block_m rows.
// sorted_rows[pos] = t*k + j (or -1 on padding) for pos < num_tiles*block_m; inv[t*k + j] = pos;
// tile_expert[tile] = expert of the tile; *num_tiles = tiles in use. n_rows <= FMOE_DISPATCH_MAX_ROWS.
#define FMOE_DISPATCH_MAX_ROWS (1 << 16)
cudaError_t dispatch_cuda(const int32_t* experts, int64_t n_rows, int E, int block_m, int32_t* sorted_rows,
                          int32_t* inv, int32_t* tile_expert, int32_t* num_tiles, cudaStream_t stream);

// ---- expert_ffn.cu ----------------------------------------------------------------------------------
// Tile configuration, picked on the host from the chunk's shape (batch size) before any launch.
int ffn_pick_config(int64_t n_rows, int64_t n_expert, int dtype);  // n_rows = T*k
int ffn_block_m(int config);                                       // rows per tile (the dispatch padding)

typedef struct {
  int dtype;           // 0 float32, 1 bfloat16, 2 float16 (weights, and activations of the MMA path)
  int config;          // from ffn_pick_config
  int64_t Hp, Fp;      // padded hidden and intermediate sizes (multiples of FMOE_PAD)
  int top_k;           // k: sorted_rows holds t*k + j
  int64_t tiles_cap;   // grid height: an upper bound of *num_tiles for this config's block_m
  int sm_count;        // the device's multiprocessors; 0: unknown (the shapes for large grids)
  int smem_per_block;  // the device's opt-in shared memory per block, bytes; 0: unknown (the smallest shapes)
  const void* x;       // [T, Hp] activations: float32 for dtype 0, else 16-bit of the weight dtype
  const void* w1;      // [E, Fp, Hp]
  const void* w3;      // [E, Fp, Hp]
  const void* w2;      // [E, Hp, Fp]
  const int32_t* sorted_rows;
  const int32_t* tile_expert;
  const int32_t* num_tiles;  // device scalar written by dispatch_cuda
  void* h;                   // [rows, Fp] SwiGLU activations: float32 for dtype 0, else 16-bit
  float* y;                  // [rows, Hp] expert outputs, in sorted order
} ffn_problem;               // padding rows of h and y are neither read nor written

// h = silu(x W1^T) * (x W3^T) then y = h W2^T, per tile of the sorted rows with that tile's expert.
cudaError_t ffn_cuda(const ffn_problem* p, cudaStream_t stream);

// out[i] = x[i] rounded to bfloat16 (dtype 1) or float16 (dtype 2), n elements.
cudaError_t convert_to_16_cuda(const float* x, int64_t n, int dtype, uint16_t* out, cudaStream_t stream);

// ---- combine.cu -------------------------------------------------------------------------------------
// out[t, :H] = sum over j = 0..k-1, in that order, of weights[t*k+j] * y[inv[t*k+j], :H].
cudaError_t combine_cuda(const float* y, int64_t ldy, const int32_t* inv, const float* weights, int64_t T, int k,
                         int64_t H, float* out, cudaStream_t stream);
