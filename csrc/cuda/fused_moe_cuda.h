/* C ABI of the CUDA backend library (libfused_moe_cuda.so), opened at run time by the addon.
 * No C++ exception crosses this boundary: every call returns a status (0 = ok, otherwise one of the
 * FMOE_CUDA_ERR_* values, which the loader maps to the core's fmoe::ErrorCode) and writes a
 * NUL-terminated message into err.
 * Bump FMOE_CUDA_ABI_VERSION on any change to a signature, a struct or a constant here. */
#ifndef FUSED_MOE_CUDA_H
#define FUSED_MOE_CUDA_H
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FMOE_CUDA_ABI_VERSION 4

/* Status codes; the addon maps each to the core's fmoe::ErrorCode named beside it (by a switch, not by
 * value: FMOE_CUDA_OK is 0 here while ErrorCode::Invalid is 0 there). */
#define FMOE_CUDA_OK 0
#define FMOE_CUDA_ERR_INVALID 1   /* ErrorCode::Invalid */
#define FMOE_CUDA_ERR_NO_DEVICE 3 /* ErrorCode::NoDevice */
#define FMOE_CUDA_ERR_CUDA 4      /* ErrorCode::Cuda */
#define FMOE_CUDA_ERR_OOM 5       /* ErrorCode::OutOfMemory */
#define FMOE_CUDA_ERR_ABORTED 7   /* ErrorCode::Aborted */

typedef struct fmoe_cuda_layer fmoe_cuda_layer;

/* Values of fmoe_cuda_config.routing; the same numbers as the core's fmoe::Routing. */
typedef enum {
  FMOE_CUDA_ROUTING_SOFTMAX_TOPK_RENORM = 0,
  FMOE_CUDA_ROUTING_SOFTMAX_TOPK = 1,
  FMOE_CUDA_ROUTING_SIGMOID_TOPK = 2,
  FMOE_CUDA_ROUTING_SIGMOID_TOPK_RENORM = 3
} fmoe_cuda_routing;

/* Values of fmoe_cuda_config.weight_dtype; the same numbers as the core's fmoe::DType. */
typedef enum { FMOE_CUDA_DTYPE_F32 = 0, FMOE_CUDA_DTYPE_BF16 = 1, FMOE_CUDA_DTYPE_F16 = 2 } fmoe_cuda_dtype;

typedef struct {
  int64_t hidden;              /* H */
  int64_t intermediate;        /* F */
  int64_t num_experts;         /* E */
  int64_t top_k;               /* k */
  int32_t routing;             /* fmoe_cuda_routing (a fixed-width field, so the struct layout is the ABI's) */
  int32_t weight_dtype;        /* fmoe_cuda_dtype */
  int32_t device;              /* CUDA device ordinal */
  int32_t group_count;         /* group-limited routing: experts in this many equal groups; 0: none */
  int32_t group_topk;          /* groups kept */
  int32_t group_top2;          /* 1: a group ranks by the sum of its two best scores; 0: by its best */
  int32_t shared_gate;         /* 1: the shared expert is scaled by sigmoid(shared_gate . x) */
  double routed_scale;         /* every routing weight times this, after renormalising */
  int64_t shared_intermediate; /* Fs: the shared expert's width; 0: none */
} fmoe_cuda_config;

/* The weights beside gate/w1/w3/w2 (host pointers, each NULL when unused): score_bias [E] float32;
 * the shared expert's w1, w3 [Fs, H] and w2 [H, Fs] in the weight dtype; its gate [H] float32. */
typedef struct {
  const float* score_bias;
  const void* shared_w1;
  const void* shared_w3;
  const void* shared_w2;
  const float* shared_gate;
} fmoe_cuda_extras;

typedef struct {
  char name[256];
  size_t total_memory;
  int32_t major, minor; /* compute capability */
  int32_t multiprocessors;
} fmoe_cuda_device_props;

typedef int (*fmoe_cuda_abi_version_fn)(void);
/* Driver and runtime versions (e.g. 13000); fails with NO_DEVICE when no driver is present. */
typedef int (*fmoe_cuda_versions_fn)(int* driver, int* runtime, char* err, size_t err_len);
typedef int (*fmoe_cuda_device_count_fn)(int* count, char* err, size_t err_len);
typedef int (*fmoe_cuda_device_info_fn)(int device, fmoe_cuda_device_props* info, char* err, size_t err_len);
/* Uploads the weights (gate [E,H] float32; w1/w3 [F,H], w2 [H,F] per expert, host pointers; extras may
 * be NULL when the config has no shared expert). */
typedef int (*fmoe_cuda_layer_create_fn)(const fmoe_cuda_config* cfg, const float* gate, const void* const* w1,
                                         const void* const* w3, const void* const* w2, const fmoe_cuda_extras* extras,
                                         fmoe_cuda_layer** out, char* err, size_t err_len);
/* Host x [T,H] -> host out [T,H]. Thread-safe (calls on one layer are serialised). The caller cancels
 * between calls: the addon splits a long input into chunks and checks its own flag before each. */
typedef int (*fmoe_cuda_layer_forward_fn)(fmoe_cuda_layer* layer, const float* x, int64_t T, float* out, char* err,
                                          size_t err_len);
typedef int (*fmoe_cuda_layer_route_fn)(fmoe_cuda_layer* layer, const float* x, int64_t T, int32_t* experts,
                                        float* weights, char* err, size_t err_len);
/* Same as forward, with x and out in device memory of the layer's device (benchmarks, C/C++ callers that
 * keep activations on the GPU). The addon does not use it.
 * The layer works on its own stream, created non-blocking: it is not ordered after the legacy default
 * stream nor after any stream of the caller. Before the call, every write to x_dev must be complete (wait
 * for the stream or device that wrote it, e.g. cudaStreamSynchronize or cudaDeviceSynchronize: cudaMemset
 * is asynchronous, and cudaMemcpy from pageable host memory may return before the data has landed), and
 * no other work may still use out_dev. Until the call returns, neither may be touched. */
typedef int (*fmoe_cuda_layer_forward_device_fn)(fmoe_cuda_layer* layer, const float* x_dev, int64_t T, float* out_dev,
                                                 char* err, size_t err_len);
/* forward_device without the wait: queues the work on the layer's stream and returns. The same holds for
 * x_dev and out_dev before the call, and they must stay valid, x_dev unchanged and out_dev untouched until
 * fmoe_cuda_layer_synchronize returns; results are in out_dev then. After a failed call nothing queued
 * by it still uses them.
 * Back-to-back calls overlap their launches with the work in flight (benchmarks time the GPU this way). */
typedef int (*fmoe_cuda_layer_enqueue_device_fn)(fmoe_cuda_layer* layer, const float* x_dev, int64_t T, float* out_dev,
                                                 char* err, size_t err_len);
/* Waits for everything queued on the layer; reports a failure of any of it. */
typedef int (*fmoe_cuda_layer_synchronize_fn)(fmoe_cuda_layer* layer, char* err, size_t err_len);
typedef size_t (*fmoe_cuda_layer_bytes_fn)(const fmoe_cuda_layer* layer);
typedef void (*fmoe_cuda_layer_destroy_fn)(fmoe_cuda_layer* layer);

/* Exported symbols, same names without _fn. */
int fmoe_cuda_abi_version(void);
int fmoe_cuda_versions(int* driver, int* runtime, char* err, size_t err_len);
int fmoe_cuda_device_count(int* count, char* err, size_t err_len);
int fmoe_cuda_device_info(int device, fmoe_cuda_device_props* info, char* err, size_t err_len);
int fmoe_cuda_layer_create(const fmoe_cuda_config* cfg, const float* gate, const void* const* w1, const void* const* w3,
                           const void* const* w2, const fmoe_cuda_extras* extras, fmoe_cuda_layer** out, char* err,
                           size_t err_len);
int fmoe_cuda_layer_forward(fmoe_cuda_layer* layer, const float* x, int64_t T, float* out, char* err, size_t err_len);
int fmoe_cuda_layer_route(fmoe_cuda_layer* layer, const float* x, int64_t T, int32_t* experts, float* weights,
                          char* err, size_t err_len);
int fmoe_cuda_layer_forward_device(fmoe_cuda_layer* layer, const float* x_dev, int64_t T, float* out_dev, char* err,
                                   size_t err_len);
int fmoe_cuda_layer_enqueue_device(fmoe_cuda_layer* layer, const float* x_dev, int64_t T, float* out_dev, char* err,
                                   size_t err_len);
int fmoe_cuda_layer_synchronize(fmoe_cuda_layer* layer, char* err, size_t err_len);
size_t fmoe_cuda_layer_bytes(const fmoe_cuda_layer* layer);
void fmoe_cuda_layer_destroy(fmoe_cuda_layer* layer);

#ifdef __cplusplus
}
#endif
#endif
