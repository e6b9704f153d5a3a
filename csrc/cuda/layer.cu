// The C ABI of libfused_moe_cuda.so (fused_moe_cuda.h): device queries, and a layer that owns its weights
// on one device, one stream, a workspace sized for one chunk of tokens, and a mutex that serialises calls.
//
// Rules kept by every exported function: no C++ exception leaves it (catch-all), every CUDA failure comes
// back as a status code with cudaGetErrorString's text, and only fmoe_cuda_* symbols are exported.
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <atomic>
#include <exception>
#include <mutex>
#include <new>

#include "moe_cuda.cuh"

#pragma GCC visibility push(default)
#include "fused_moe_cuda.h"
#pragma GCC visibility pop

#define FMOE_EXPORT extern "C" __attribute__((visibility("default")))

// Tokens per chunk, and rows (tokens * k) per chunk: the dispatch kernel sorts one chunk in one block.
#define CHUNK_MAX_TOKENS 4096
#define CHUNK_MAX_ROWS 16384
// Workspace budget per layer; a very long input is processed in chunks that fit in it.
#define WORKSPACE_BUDGET ((size_t)1 << 30)

// A shared expert of width Fs runs as n_shared = ceil(Fs / F) more experts of width F that every token
// picks (SwiGLU is a sum over its intermediate columns, so slices of them add up to the whole; the last
// slice's missing rows are zero and add nothing): the dispatch, the grouped GEMM and the combine treat
// them as any other expert.
struct fmoe_cuda_layer {
  int64_t H = 0;           // hidden size
  int64_t F = 0;           // intermediate (expert FFN) size
  int64_t E = 0;           // experts in the GEMM: routed + shared slices
  int64_t k = 0;           // picks per token in the GEMM: routed + shared slices
  int64_t E_routed = 0;    // routed experts
  int64_t k_routed = 0;    // routed picks per token
  int64_t Fs = 0;          // shared expert width (0: none)
  int n_shared = 0;        // shared expert slices
  gating_params gp{};      // the router's rules (bias pointer set once uploaded)
  float* bias = nullptr;   // [E_routed] device, or null
  int64_t Hp = 0;          // H padded to FMOE_PAD
  int64_t Fp = 0;          // F padded to FMOE_PAD
  int routing = 0;         // fmoe_cuda_routing
  int dtype = 0;           // 0 float32, 1 bfloat16, 2 float16
  int device = 0;          // CUDA ordinal
  int sm_count = 0;        // its multiprocessors, and the shared memory a block may opt in to: the FFN's
  int smem_per_block = 0;  // tile shapes depend on them (never its results)
  size_t es = 4;           // bytes per weight element
  size_t hes = 4;          // bytes per SwiGLU activation element (float32 path keeps float32)
  int64_t chunk_max = 1;   // tokens per chunk

  std::mutex mu;  // serialises forward/route: they share the stream and the workspace
  cudaStream_t stream = nullptr;

  float* gate = nullptr;  // [E, Hp] float32
  void* w1 = nullptr;     // [E, Fp, Hp]
  void* w3 = nullptr;     // [E, Fp, Hp]
  void* w2 = nullptr;     // [E, Hp, Fp]
  size_t weight_bytes = 0;

  // Workspace for up to ws_tokens tokens, one allocation carved into the buffers below.
  void* ws = nullptr;
  int64_t ws_tokens = 0;
  std::atomic<size_t> ws_bytes{0};
  float* xf = nullptr;             // [tokens, Hp] input, float32, pad columns zero
  uint16_t* xh = nullptr;          // [tokens, Hp] input rounded to the weight dtype (16-bit paths)
  int32_t* experts = nullptr;      // [tokens * k]
  float* weights = nullptr;        // [tokens * k]
  int32_t* inv = nullptr;          // [tokens * k] sorted position of each pick
  int32_t* sorted_rows = nullptr;  // [rows_cap]
  int32_t* tile_expert = nullptr;  // [tiles_cap]
  int32_t* num_tiles = nullptr;    // [1]
  void* h = nullptr;               // [rows_cap, Fp]
  float* y = nullptr;              // [rows_cap, Hp]
  float* out = nullptr;            // [tokens, H]
};

// ---- errors -------------------------------------------------------------------------------------------

static int set_err(char* err, size_t err_len, int code, const char* fmt, ...) {
  if (err && err_len > 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
  }
  return code;
}

static int code_for(cudaError_t e) {
  switch (e) {
    case cudaErrorMemoryAllocation:
      return FMOE_CUDA_ERR_OOM;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorStubLibrary:
    case cudaErrorDevicesUnavailable:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
    case cudaErrorInvalidDevice:
      return FMOE_CUDA_ERR_NO_DEVICE;
    default:
      return FMOE_CUDA_ERR_CUDA;
  }
}

static int cuda_err(char* err, size_t err_len, cudaError_t e, const char* what) {
  const int code = code_for(e);
  const char* hint = "";
  if (e == cudaErrorInsufficientDriver)
    hint = "; the NVIDIA driver is older than this CUDA runtime needs, update the driver";
  else if (e == cudaErrorMemoryAllocation)
    hint = "; free GPU memory or use a smaller layer";
  set_err(err, err_len, code, "%s failed: %s (%s)%s", what, cudaGetErrorString(e), cudaGetErrorName(e), hint);
  (void)cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  return code;
}

#define CUDA_TRY(call, what)                                        \
  do {                                                              \
    const cudaError_t e_ = (call);                                  \
    if (e_ != cudaSuccess) return cuda_err(err, err_len, e_, what); \
  } while (0)

#define CATCH_ALL                                                                                          \
  catch (const std::bad_alloc&) {                                                                          \
    return set_err(err, err_len, FMOE_CUDA_ERR_OOM, "out of host memory");                                 \
  }                                                                                                        \
  catch (const std::exception& ex) {                                                                       \
    return set_err(err, err_len, FMOE_CUDA_ERR_CUDA, "internal error in the CUDA backend: %s", ex.what()); \
  }                                                                                                        \
  catch (...) {                                                                                            \
    return set_err(err, err_len, FMOE_CUDA_ERR_CUDA, "internal error in the CUDA backend");                \
  }

// ---- sizes --------------------------------------------------------------------------------------------

struct ws_layout {
  size_t xf, xh, experts, weights, inv, sorted_rows, tile_expert, num_tiles, h, y, out, total;
};

static size_t align256(size_t v) { return (v + 255) / 256 * 256; }

// Byte offsets of the workspace buffers for `tokens` tokens: rows and tiles are sized for the worst
// padding of any tile configuration, because the forward never reads the routing back.
static ws_layout workspace_layout(const fmoe_cuda_layer* L, int64_t tokens) {
  const int64_t n_rows = tokens * L->k;                                           // picks
  const int64_t rows_cap = fmoe_padded_rows_cap(n_rows, L->E, FMOE_MAX_BLOCK_M);  // largest padded list
  int64_t tiles_cap = 0;                                                          // most tiles of any block_m
  for (int bm = 16; bm <= FMOE_MAX_BLOCK_M; bm *= 2) {
    const int64_t t = fmoe_padded_rows_cap(n_rows, L->E, bm) / bm;
    if (t > tiles_cap) tiles_cap = t;
  }
  ws_layout w;
  size_t off = 0;
  w.xf = off;
  off += align256((size_t)tokens * L->Hp * sizeof(float));
  w.xh = off;
  off += L->dtype == 0 ? 0 : align256((size_t)tokens * L->Hp * sizeof(uint16_t));
  w.experts = off;
  off += align256((size_t)n_rows * sizeof(int32_t));
  w.weights = off;
  off += align256((size_t)n_rows * sizeof(float));
  w.inv = off;
  off += align256((size_t)n_rows * sizeof(int32_t));
  w.sorted_rows = off;
  off += align256((size_t)rows_cap * sizeof(int32_t));
  w.tile_expert = off;
  off += align256((size_t)tiles_cap * sizeof(int32_t));
  w.num_tiles = off;
  off += align256(sizeof(int32_t));
  w.h = off;
  off += align256((size_t)rows_cap * L->Fp * L->hes);
  w.y = off;
  off += align256((size_t)rows_cap * L->Hp * sizeof(float));
  w.out = off;
  off += align256((size_t)tokens * L->H * sizeof(float));
  w.total = off;
  return w;
}

static void workspace_free(fmoe_cuda_layer* L) {
  if (L->ws) cudaFree(L->ws);
  L->ws = nullptr;
  L->ws_tokens = 0;
  L->ws_bytes = 0;
}

// Makes the workspace hold `tokens` tokens (grows only). Caller holds the mutex, device is set.
static int workspace_reserve(fmoe_cuda_layer* L, int64_t tokens, char* err, size_t err_len) {
  if (tokens <= L->ws_tokens) return FMOE_CUDA_OK;
  CUDA_TRY(cudaStreamSynchronize(L->stream), "cudaStreamSynchronize (before growing the workspace)");
  workspace_free(L);
  const ws_layout w = workspace_layout(L, tokens);
  void* p = nullptr;
  CUDA_TRY(cudaMalloc(&p, w.total), "cudaMalloc (workspace)");
  char* b = (char*)p;
  L->ws = p;
  L->xf = (float*)(b + w.xf);
  L->xh = L->dtype == 0 ? nullptr : (uint16_t*)(b + w.xh);
  L->experts = (int32_t*)(b + w.experts);
  L->weights = (float*)(b + w.weights);
  L->inv = (int32_t*)(b + w.inv);
  L->sorted_rows = (int32_t*)(b + w.sorted_rows);
  L->tile_expert = (int32_t*)(b + w.tile_expert);
  L->num_tiles = (int32_t*)(b + w.num_tiles);
  L->h = (void*)(b + w.h);
  L->y = (float*)(b + w.y);
  L->out = (float*)(b + w.out);
  // The input copies write H of Hp columns: the pad columns must read as zero forever after.
  CUDA_TRY(cudaMemsetAsync(L->xf, 0, w.xh - w.xf, L->stream), "cudaMemsetAsync (workspace)");
  L->ws_tokens = tokens;
  L->ws_bytes = w.total;
  return FMOE_CUDA_OK;
}

// The largest chunk whose workspace fits the budget (at least one token).
static int64_t pick_chunk(const fmoe_cuda_layer* L) {
  int64_t c = CHUNK_MAX_TOKENS;
  if (c * L->k > CHUNK_MAX_ROWS) c = CHUNK_MAX_ROWS / L->k;
  if (c < 1) c = 1;
  while (c > 1 && workspace_layout(L, c).total > WORKSPACE_BUDGET) c /= 2;
  return c;
}

// ---- the pipeline -------------------------------------------------------------------------------------

// Copies x (n tokens; host or device memory per kind_in) into the padded float32 input and routes it.
static int run_gating(fmoe_cuda_layer* L, const float* x, int64_t n, cudaMemcpyKind kind_in, char* err,
                      size_t err_len) {
  CUDA_TRY(cudaMemcpy2DAsync(L->xf, L->Hp * sizeof(float), x, L->H * sizeof(float), L->H * sizeof(float), n, kind_in,
                             L->stream),
           "copying the input to the device");
  CUDA_TRY(gating_cuda(L->xf, L->Hp, L->gate, L->Hp, L->Hp, n, &L->gp, L->experts, L->weights, L->stream),
           "router kernel launch");
  return FMOE_CUDA_OK;
}

// One chunk of n tokens: out (n x H, host or device per kind_out) = MoE(x). With `wait`, returns after the
// results are in out (the stream is synchronised); without, once the work is queued.
static int run_chunk(fmoe_cuda_layer* L, const float* x, int64_t n, float* out, cudaMemcpyKind kind_in,
                     cudaMemcpyKind kind_out, bool wait, char* err, size_t err_len) {
  const int64_t n_rows = n * L->k;  // picks in this chunk
  int rc = run_gating(L, x, n, kind_in, err, err_len);
  if (rc != FMOE_CUDA_OK) return rc;

  const int config = ffn_pick_config(n_rows, L->E, L->dtype);
  const int bm = ffn_block_m(config);  // tile height = dispatch padding
  CUDA_TRY(
      dispatch_cuda(L->experts, n_rows, (int)L->E, bm, L->sorted_rows, L->inv, L->tile_expert, L->num_tiles, L->stream),
      "dispatch kernel launch");
  if (L->dtype != 0)
    CUDA_TRY(convert_to_16_cuda(L->xf, n * L->Hp, L->dtype, L->xh, L->stream), "input conversion kernel launch");

  ffn_problem p;
  p.dtype = L->dtype;
  p.config = config;
  p.Hp = L->Hp;
  p.Fp = L->Fp;
  p.top_k = (int)L->k;
  p.tiles_cap = fmoe_padded_rows_cap(n_rows, L->E, bm) / bm;
  p.sm_count = L->sm_count;
  p.smem_per_block = L->smem_per_block;
  p.x = L->dtype == 0 ? (const void*)L->xf : (const void*)L->xh;
  p.w1 = L->w1;
  p.w3 = L->w3;
  p.w2 = L->w2;
  p.sorted_rows = L->sorted_rows;
  p.tile_expert = L->tile_expert;
  p.num_tiles = L->num_tiles;
  p.h = L->h;
  p.y = L->y;
  CUDA_TRY(ffn_cuda(&p, L->stream), "expert FFN kernel launch");

  // A device destination takes the combine's output directly; a host one goes through the workspace.
  float* dst = kind_out == cudaMemcpyDeviceToDevice ? out : L->out;
  CUDA_TRY(combine_cuda(L->y, L->Hp, L->inv, L->weights, n, (int)L->k, L->H, dst, L->stream), "combine kernel launch");
  if (kind_out != cudaMemcpyDeviceToDevice)
    CUDA_TRY(cudaMemcpyAsync(out, L->out, (size_t)n * L->H * sizeof(float), kind_out, L->stream),
             "copying the output to the host");
  if (wait) CUDA_TRY(cudaStreamSynchronize(L->stream), "running the MoE kernels");
  return FMOE_CUDA_OK;
}

// After a failure part way through a call, some of its work may still be queued: wait for it, so that
// nothing reads or writes the caller's buffers once the call has returned. The error being reported
// is the first one; a failure of the wait itself (sticky, or from the queued kernels) only clears.
static int drain_after_error(fmoe_cuda_layer* L, int rc) {
  if (rc != FMOE_CUDA_OK && L->stream) {
    (void)cudaStreamSynchronize(L->stream);
    (void)cudaGetLastError();
  }
  return rc;
}

static int forward_impl(fmoe_cuda_layer* L, const float* x, int64_t T, float* out, cudaMemcpyKind kind_in,
                        cudaMemcpyKind kind_out, char* err, size_t err_len, bool wait = true) {
  if (!L) return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "layer is NULL");
  if (T < 0) return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "T must be >= 0, got %lld", (long long)T);
  if (T == 0) return FMOE_CUDA_OK;
  if (!x || !out) return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "x and out must not be NULL");
  std::lock_guard<std::mutex> lock(L->mu);
  CUDA_TRY(cudaSetDevice(L->device), "cudaSetDevice");  // the calling thread may be any thread
  int rc = workspace_reserve(L, T < L->chunk_max ? T : L->chunk_max, err, err_len);
  if (rc != FMOE_CUDA_OK) return rc;
  for (int64_t t0 = 0; t0 < T; t0 += L->chunk_max) {
    const int64_t n = T - t0 < L->chunk_max ? T - t0 : L->chunk_max;  // tokens in this chunk
    rc = run_chunk(L, x + t0 * L->H, n, out + t0 * L->H, kind_in, kind_out, wait, err, err_len);
    if (rc != FMOE_CUDA_OK) return drain_after_error(L, rc);
  }
  return FMOE_CUDA_OK;
}

// One chunk of n tokens: host x (n x H) -> host experts and weights (n x k each); waits for them.
static int route_chunk(fmoe_cuda_layer* L, const float* x, int64_t n, int32_t* experts, float* weights, char* err,
                       size_t err_len) {
  const int rc = run_gating(L, x, n, cudaMemcpyHostToDevice, err, err_len);
  if (rc != FMOE_CUDA_OK) return rc;
  // The routed picks only: the first k_routed of each token's k (int32 and float are both 4 bytes).
  const size_t row = (size_t)L->k_routed * sizeof(int32_t), pitch = (size_t)L->k * sizeof(int32_t);
  CUDA_TRY(cudaMemcpy2DAsync(experts, row, L->experts, pitch, row, n, cudaMemcpyDeviceToHost, L->stream),
           "copying the routing to the host");
  CUDA_TRY(cudaMemcpy2DAsync(weights, row, L->weights, pitch, row, n, cudaMemcpyDeviceToHost, L->stream),
           "copying the routing to the host");
  CUDA_TRY(cudaStreamSynchronize(L->stream), "running the router kernel");
  return FMOE_CUDA_OK;
}

// ---- layer life cycle ---------------------------------------------------------------------------------

static void layer_free(fmoe_cuda_layer* L) {
  if (!L) return;
  if (cudaSetDevice(L->device) == cudaSuccess) {
    if (L->stream) cudaStreamSynchronize(L->stream);
    workspace_free(L);
    if (L->gate) cudaFree(L->gate);
    if (L->bias) cudaFree(L->bias);
    if (L->w1) cudaFree(L->w1);
    if (L->w3) cudaFree(L->w3);
    if (L->w2) cudaFree(L->w2);
    if (L->stream) cudaStreamDestroy(L->stream);
  }
  (void)cudaGetLastError();
  delete L;
}

// Uploads the routed experts' matrices of rows x cols elements (host pointers src[e]) into dst [E, rows_p,
// cols_p], whose padding was zeroed before: a pitched copy pads each row on the way, no host staging.
static int upload_padded(fmoe_cuda_layer* L, void* dst, const void* const* src, int64_t rows, int64_t cols,
                         int64_t rows_p, int64_t cols_p, size_t es, const char* what, char* err, size_t err_len) {
  for (int64_t e = 0; e < L->E_routed; e++) {
    if (!src[e]) return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "%s[%lld] is NULL", what, (long long)e);
    char* d = (char*)dst + (size_t)e * rows_p * cols_p * es;
    CUDA_TRY(cudaMemcpy2DAsync(d, cols_p * es, src[e], cols * es, cols * es, rows, cudaMemcpyHostToDevice, L->stream),
             what);
  }
  return FMOE_CUDA_OK;
}

// Uploads the shared expert as slices of F columns: slice s is expert E_routed + s, rows [s*F, s*F + n)
// of w1/w3 and columns [s*F, s*F + n) of w2.
static int upload_shared(fmoe_cuda_layer* L, const fmoe_cuda_extras* x, char* err, size_t err_len) {
  const size_t es = L->es;
  for (int s = 0; s < L->n_shared; s++) {
    const int64_t f0 = s * L->F, n = L->Fs - f0 < L->F ? L->Fs - f0 : L->F;
    const size_t e = (size_t)(L->E_routed + s);
    char* d1 = (char*)L->w1 + e * L->Fp * L->Hp * es;
    char* d3 = (char*)L->w3 + e * L->Fp * L->Hp * es;
    char* d2 = (char*)L->w2 + e * L->Hp * L->Fp * es;
    const char* s1 = (const char*)x->shared_w1 + (size_t)f0 * L->H * es;
    const char* s3 = (const char*)x->shared_w3 + (size_t)f0 * L->H * es;
    const char* s2 = (const char*)x->shared_w2 + (size_t)f0 * es;
    CUDA_TRY(cudaMemcpy2DAsync(d1, L->Hp * es, s1, L->H * es, L->H * es, n, cudaMemcpyHostToDevice, L->stream),
             "shared w1");
    CUDA_TRY(cudaMemcpy2DAsync(d3, L->Hp * es, s3, L->H * es, L->H * es, n, cudaMemcpyHostToDevice, L->stream),
             "shared w3");
    CUDA_TRY(cudaMemcpy2DAsync(d2, L->Fp * es, s2, L->Fs * es, n * es, L->H, cudaMemcpyHostToDevice, L->stream),
             "shared w2");
  }
  return FMOE_CUDA_OK;
}

static int layer_create(const fmoe_cuda_config* cfg, const float* gate, const void* const* w1, const void* const* w3,
                        const void* const* w2, const fmoe_cuda_extras* extras, fmoe_cuda_layer** out, char* err,
                        size_t err_len) {
  if (!out) return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "out is NULL");
  *out = nullptr;
  if (!cfg) return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "cfg is NULL");
  const int64_t max_dim = (int64_t)1 << 20;
  if (cfg->hidden < 1 || cfg->hidden > max_dim)
    return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "hidden must be in [1, %lld], got %lld", (long long)max_dim,
                   (long long)cfg->hidden);
  if (cfg->intermediate < 1 || cfg->intermediate > max_dim)
    return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "intermediate must be in [1, %lld], got %lld",
                   (long long)max_dim, (long long)cfg->intermediate);
  if (cfg->num_experts < 1 || cfg->num_experts > 1024)
    return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "num_experts must be in [1, 1024], got %lld",
                   (long long)cfg->num_experts);
  if (cfg->top_k < 1 || cfg->top_k > cfg->num_experts)
    return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "top_k must be in [1, num_experts], got %lld",
                   (long long)cfg->top_k);
  if (cfg->routing < FMOE_CUDA_ROUTING_SOFTMAX_TOPK_RENORM || cfg->routing > FMOE_CUDA_ROUTING_SIGMOID_TOPK_RENORM)
    return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "routing must be a fmoe_cuda_routing value, got %d",
                   cfg->routing);
  if (!(cfg->routed_scale > 0 && cfg->routed_scale < INFINITY))
    return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "routed_scale must be a finite number > 0");
  if (cfg->group_count != 0) {
    const int64_t G = cfg->group_count;
    if (G < 1 || cfg->num_experts % G != 0 || cfg->group_topk < 1 || cfg->group_topk > G ||
        cfg->top_k > cfg->group_topk * (cfg->num_experts / G) || (cfg->group_top2 && cfg->num_experts / G < 2))
      return set_err(err, err_len, FMOE_CUDA_ERR_INVALID,
                     "group_count %d / group_topk %d do not fit num_experts %lld and top_k %lld", cfg->group_count,
                     cfg->group_topk, (long long)cfg->num_experts, (long long)cfg->top_k);
  }
  if (cfg->shared_intermediate < 0 || cfg->shared_intermediate > max_dim)
    return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "shared_intermediate must be in [0, %lld], got %lld",
                   (long long)max_dim, (long long)cfg->shared_intermediate);
  if (cfg->shared_intermediate > 0 && (!extras || !extras->shared_w1 || !extras->shared_w3 || !extras->shared_w2 ||
                                       (cfg->shared_gate && !extras->shared_gate)))
    return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "a shared expert weight pointer is NULL");
  // The shared slices count as experts of the GEMM, and the dispatch sorts at most 1024.
  const int64_t n_shared = (cfg->shared_intermediate + cfg->intermediate - 1) / cfg->intermediate;
  if (cfg->num_experts + n_shared > 1024)
    return set_err(err, err_len, FMOE_CUDA_ERR_INVALID,
                   "the shared expert is %lld slices of intermediate %lld: too many with %lld experts",
                   (long long)n_shared, (long long)cfg->intermediate, (long long)cfg->num_experts);
  if (cfg->weight_dtype != FMOE_CUDA_DTYPE_F32 && cfg->weight_dtype != FMOE_CUDA_DTYPE_BF16 &&
      cfg->weight_dtype != FMOE_CUDA_DTYPE_F16)
    return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "weight_dtype must be a fmoe_cuda_dtype value, got %d",
                   cfg->weight_dtype);
  if (!gate || !w1 || !w3 || !w2) return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "a weight pointer is NULL");

  int count = 0;
  CUDA_TRY(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (cfg->device < 0 || cfg->device >= count)
    return set_err(err, err_len, FMOE_CUDA_ERR_NO_DEVICE, "CUDA device %d does not exist (%d device(s) found)",
                   cfg->device, count);
  CUDA_TRY(cudaSetDevice(cfg->device), "cudaSetDevice");
  int major = 0, minor = 0;
  CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, cfg->device), "cudaDeviceGetAttribute");
  CUDA_TRY(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, cfg->device), "cudaDeviceGetAttribute");
  if (major < 8)
    return set_err(err, err_len, FMOE_CUDA_ERR_NO_DEVICE,
                   "CUDA device %d has compute capability %d.%d; the CUDA backend needs 8.0 (Ampere) or newer",
                   cfg->device, major, minor);

  int sm_count = 0, smem_per_block = 0;
  CUDA_TRY(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, cfg->device), "cudaDeviceGetAttribute");
  CUDA_TRY(cudaDeviceGetAttribute(&smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, cfg->device),
           "cudaDeviceGetAttribute");

  fmoe_cuda_layer* L = new (std::nothrow) fmoe_cuda_layer;
  if (!L) return set_err(err, err_len, FMOE_CUDA_ERR_OOM, "out of host memory");
  L->H = cfg->hidden;
  L->F = cfg->intermediate;
  L->sm_count = sm_count;
  L->smem_per_block = smem_per_block;
  L->E_routed = cfg->num_experts;
  L->k_routed = cfg->top_k;
  L->Fs = cfg->shared_intermediate;
  L->n_shared = (int)n_shared;
  L->E = L->E_routed + n_shared;
  L->k = L->k_routed + n_shared;
  gating_params& gp = L->gp;
  gp.E = (int)L->E_routed;
  gp.k = (int)L->k_routed;
  gp.sigmoid = cfg->routing == FMOE_CUDA_ROUTING_SIGMOID_TOPK || cfg->routing == FMOE_CUDA_ROUTING_SIGMOID_TOPK_RENORM;
  gp.renorm =
      cfg->routing == FMOE_CUDA_ROUTING_SOFTMAX_TOPK_RENORM || cfg->routing == FMOE_CUDA_ROUTING_SIGMOID_TOPK_RENORM;
  gp.scale = (float)cfg->routed_scale;
  gp.groups = cfg->group_count;
  gp.group_topk = cfg->group_topk;
  gp.group_top2 = cfg->group_top2 ? 1 : 0;
  gp.n_shared = (int)n_shared;
  gp.shared_gate = n_shared > 0 && cfg->shared_gate ? 1 : 0;
  gp.ld_out = (int)L->k;
  L->Hp = fmoe_round_up(L->H, FMOE_PAD);
  L->Fp = fmoe_round_up(L->F, FMOE_PAD);
  L->routing = cfg->routing;
  L->dtype = cfg->weight_dtype;
  L->device = cfg->device;
  L->es = L->dtype == 0 ? 4 : 2;
  L->hes = L->es;
  L->chunk_max = pick_chunk(L);

  const int rc = [&]() -> int {
    CUDA_TRY(cudaStreamCreateWithFlags(&L->stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    const int64_t gate_rows = L->E_routed + L->gp.shared_gate;  // the shared gate is the last row
    const size_t gate_bytes = (size_t)gate_rows * L->Hp * sizeof(float);
    const size_t w13_bytes = (size_t)L->E * L->Fp * L->Hp * L->es;  // each of w1, w3
    const size_t w2_bytes = (size_t)L->E * L->Hp * L->Fp * L->es;
    CUDA_TRY(cudaMalloc((void**)&L->gate, gate_bytes), "cudaMalloc (router weights)");
    CUDA_TRY(cudaMalloc(&L->w1, w13_bytes), "cudaMalloc (w1)");
    CUDA_TRY(cudaMalloc(&L->w3, w13_bytes), "cudaMalloc (w3)");
    CUDA_TRY(cudaMalloc(&L->w2, w2_bytes), "cudaMalloc (w2)");
    L->weight_bytes += gate_bytes + 2 * w13_bytes + w2_bytes;
    CUDA_TRY(cudaMemsetAsync(L->gate, 0, gate_bytes, L->stream), "cudaMemsetAsync");
    CUDA_TRY(cudaMemsetAsync(L->w1, 0, w13_bytes, L->stream), "cudaMemsetAsync");
    CUDA_TRY(cudaMemsetAsync(L->w3, 0, w13_bytes, L->stream), "cudaMemsetAsync");
    CUDA_TRY(cudaMemsetAsync(L->w2, 0, w2_bytes, L->stream), "cudaMemsetAsync");
    CUDA_TRY(cudaMemcpy2DAsync(L->gate, L->Hp * sizeof(float), gate, L->H * sizeof(float), L->H * sizeof(float),
                               L->E_routed, cudaMemcpyHostToDevice, L->stream),
             "copying the router weights");
    if (L->gp.shared_gate)
      CUDA_TRY(cudaMemcpyAsync(L->gate + L->E_routed * L->Hp, extras->shared_gate, L->H * sizeof(float),
                               cudaMemcpyHostToDevice, L->stream),
               "copying the shared expert gate");
    if (extras && extras->score_bias) {
      CUDA_TRY(cudaMalloc((void**)&L->bias, (size_t)L->E_routed * sizeof(float)), "cudaMalloc (score bias)");
      CUDA_TRY(cudaMemcpyAsync(L->bias, extras->score_bias, (size_t)L->E_routed * sizeof(float), cudaMemcpyHostToDevice,
                               L->stream),
               "copying the score bias");
      L->gp.bias = L->bias;
      L->weight_bytes += (size_t)L->E_routed * sizeof(float);
    }
    int r = upload_padded(L, L->w1, w1, L->F, L->H, L->Fp, L->Hp, L->es, "w1", err, err_len);
    if (r == FMOE_CUDA_OK) r = upload_padded(L, L->w3, w3, L->F, L->H, L->Fp, L->Hp, L->es, "w3", err, err_len);
    if (r == FMOE_CUDA_OK) r = upload_padded(L, L->w2, w2, L->H, L->F, L->Hp, L->Fp, L->es, "w2", err, err_len);
    if (r == FMOE_CUDA_OK && L->n_shared > 0) r = upload_shared(L, extras, err, err_len);
    if (r != FMOE_CUDA_OK) return r;
    // The host arrays may be freed as soon as we return: wait for the copies.
    CUDA_TRY(cudaStreamSynchronize(L->stream), "uploading the weights");
    return FMOE_CUDA_OK;
  }();
  if (rc != FMOE_CUDA_OK) {
    layer_free(L);
    return rc;
  }
  *out = L;
  return FMOE_CUDA_OK;
}

// ---- exported functions -------------------------------------------------------------------------------

FMOE_EXPORT int fmoe_cuda_abi_version(void) { return FMOE_CUDA_ABI_VERSION; }

FMOE_EXPORT int fmoe_cuda_versions(int* driver, int* runtime, char* err, size_t err_len) {
  try {
    int d = 0, r = 0;
    CUDA_TRY(cudaDriverGetVersion(&d), "cudaDriverGetVersion");
    CUDA_TRY(cudaRuntimeGetVersion(&r), "cudaRuntimeGetVersion");
    if (driver) *driver = d;
    if (runtime) *runtime = r;
    if (d == 0) return set_err(err, err_len, FMOE_CUDA_ERR_NO_DEVICE, "no NVIDIA driver is installed");
    return FMOE_CUDA_OK;
  }
  CATCH_ALL
}

FMOE_EXPORT int fmoe_cuda_device_count(int* count, char* err, size_t err_len) {
  try {
    if (!count) return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "count is NULL");
    *count = 0;
    int n = 0;
    CUDA_TRY(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
    *count = n;
    return FMOE_CUDA_OK;
  }
  CATCH_ALL
}

FMOE_EXPORT int fmoe_cuda_device_info(int device, fmoe_cuda_device_props* info, char* err, size_t err_len) {
  try {
    if (!info) return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "info is NULL");
    memset(info, 0, sizeof(*info));
    cudaDeviceProp prop;
    CUDA_TRY(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    snprintf(info->name, sizeof(info->name), "%s", prop.name);
    info->total_memory = prop.totalGlobalMem;
    info->major = prop.major;
    info->minor = prop.minor;
    info->multiprocessors = prop.multiProcessorCount;
    return FMOE_CUDA_OK;
  }
  CATCH_ALL
}

FMOE_EXPORT int fmoe_cuda_layer_create(const fmoe_cuda_config* cfg, const float* gate, const void* const* w1,
                                       const void* const* w3, const void* const* w2, const fmoe_cuda_extras* extras,
                                       fmoe_cuda_layer** out, char* err, size_t err_len) {
  try {
    return layer_create(cfg, gate, w1, w3, w2, extras, out, err, err_len);
  }
  CATCH_ALL
}

FMOE_EXPORT int fmoe_cuda_layer_forward(fmoe_cuda_layer* layer, const float* x, int64_t T, float* out, char* err,
                                        size_t err_len) {
  try {
    return forward_impl(layer, x, T, out, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, err, err_len);
  }
  CATCH_ALL
}

FMOE_EXPORT int fmoe_cuda_layer_forward_device(fmoe_cuda_layer* layer, const float* x_dev, int64_t T, float* out_dev,
                                               char* err, size_t err_len) {
  try {
    return forward_impl(layer, x_dev, T, out_dev, cudaMemcpyDeviceToDevice, cudaMemcpyDeviceToDevice, err, err_len);
  }
  CATCH_ALL
}

FMOE_EXPORT int fmoe_cuda_layer_enqueue_device(fmoe_cuda_layer* layer, const float* x_dev, int64_t T, float* out_dev,
                                               char* err, size_t err_len) {
  try {
    return forward_impl(layer, x_dev, T, out_dev, cudaMemcpyDeviceToDevice, cudaMemcpyDeviceToDevice, err, err_len,
                        false);
  }
  CATCH_ALL
}

FMOE_EXPORT int fmoe_cuda_layer_synchronize(fmoe_cuda_layer* layer, char* err, size_t err_len) {
  try {
    if (!layer) return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "layer is NULL");
    std::lock_guard<std::mutex> lock(layer->mu);
    fmoe_cuda_layer* L = layer;
    CUDA_TRY(cudaSetDevice(L->device), "cudaSetDevice");
    CUDA_TRY(cudaStreamSynchronize(L->stream), "running the MoE kernels");
    return FMOE_CUDA_OK;
  }
  CATCH_ALL
}

FMOE_EXPORT int fmoe_cuda_layer_route(fmoe_cuda_layer* layer, const float* x, int64_t T, int32_t* experts,
                                      float* weights, char* err, size_t err_len) {
  try {
    fmoe_cuda_layer* L = layer;
    if (!L) return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "layer is NULL");
    if (T < 0) return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "T must be >= 0, got %lld", (long long)T);
    if (T == 0) return FMOE_CUDA_OK;
    if (!x || !experts || !weights)
      return set_err(err, err_len, FMOE_CUDA_ERR_INVALID, "x, experts and weights must not be NULL");
    std::lock_guard<std::mutex> lock(L->mu);
    CUDA_TRY(cudaSetDevice(L->device), "cudaSetDevice");
    int rc = workspace_reserve(L, T < L->chunk_max ? T : L->chunk_max, err, err_len);
    if (rc != FMOE_CUDA_OK) return rc;
    for (int64_t t0 = 0; t0 < T; t0 += L->chunk_max) {
      const int64_t n = T - t0 < L->chunk_max ? T - t0 : L->chunk_max;  // tokens in this chunk
      rc = route_chunk(L, x + t0 * L->H, n, experts + t0 * L->k, weights + t0 * L->k, err, err_len);
      if (rc != FMOE_CUDA_OK) return drain_after_error(L, rc);
    }
    return FMOE_CUDA_OK;
  }
  CATCH_ALL
}

FMOE_EXPORT size_t fmoe_cuda_layer_bytes(const fmoe_cuda_layer* layer) {
  if (!layer) return 0;
  return layer->weight_bytes + layer->ws_bytes.load();
}

FMOE_EXPORT void fmoe_cuda_layer_destroy(fmoe_cuda_layer* layer) {
  if (!layer) return;
  try {
    { std::lock_guard<std::mutex> wait_for_calls(layer->mu); }  // a call in flight finishes first
    layer_free(layer);
  } catch (...) {
  }
}
