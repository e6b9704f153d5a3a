// The boundary between the MoE pipeline and the per-instruction-set CPU micro-kernels.
//
// A KernelSet owns the packed layout of the expert weights it reads: the layer packs each expert once
// at load with the set chosen at start-up, and only that set reads the packed bytes afterwards.
//
// Determinism contract (batch invariance): every output element is one fixed-order reduction over the
// reduction axis. Its bits must not depend on M (how many tokens an expert got), on which rows share a
// micro-tile, or on how [begin, end) ranges are split across threads.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>

#include "../core/dtype.h"
#include "../core/quant.h"

namespace fmoe {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3, Neon = 4 };

// Packed activations are cached per thread: the calls of one phase that share an expert's rows reuse one
// packed copy instead of packing it per column tile. The caller hands every kernel call of a phase the
// same epoch, a value no other phase in the process has had (new_activation_epoch(), taken after the
// phase's input is written); a cached copy serves only calls with the epoch it was made with, so a
// buffer rewritten, or freed and reused, is packed afresh. kNoActCache: pack for this call only.
using ActEpoch = uint64_t;
constexpr ActEpoch kNoActCache = 0;
ActEpoch new_activation_epoch();

const char* isa_name(Isa isa);

struct KernelSet {
  Isa isa;
  const char* name;
  // Output columns come in panels of this many (f or h ranges start on a multiple of it).
  int64_t panel;

  // Packed bytes of one expert's w1+w3 (both [F, H]) and of its w2 ([H, F]).
  size_t (*w13_packed_bytes)(int64_t H, int64_t F, DType dt);
  size_t (*w2_packed_bytes)(int64_t H, int64_t F, DType dt);
  // Pack one expert. Sources are row-major in the checkpoint layout, elements of type dt.
  void (*pack_w13)(const void* w1, const void* w3, int64_t H, int64_t F, DType dt, void* dst);
  void (*pack_w2)(const void* w2, int64_t H, int64_t F, DType dt, void* dst);

  // act[m*ldact + f] = silu(x_m . w1_f) * (x_m . w3_f) for m < M, f in [f_begin, f_end).
  // x rows are H floats at stride ldx. f_begin is a multiple of panel; f_end is a multiple of panel or F.
  // act_epoch: the activation cache's epoch (below).
  void (*swiglu)(const float* x, int64_t ldx, int64_t M, int64_t H, int64_t F, const void* w13, DType dt,
                 int64_t f_begin, int64_t f_end, float* act, int64_t ldact, ActEpoch act_epoch);
  // y[m*ldy + h] = act_m . w2_h for m < M, h in [h_begin, h_end); same alignment rule on h.
  void (*down)(const float* act, int64_t ldact, int64_t M, int64_t H, int64_t F, const void* w2, DType dt,
               int64_t h_begin, int64_t h_end, float* y, int64_t ldy, ActEpoch act_epoch);

  // The same four for weights quantized at load (quant.h, layout in packing.h): the packers read any
  // float dtype and quantize group by group. The kernels keep the contract above: each group's products
  // are summed in ascending k from zero (in float32 from codes widened in registers on the scalar and
  // NEON sets, exactly in integers on the x86 sets: see int8_activations below), then added to the
  // output's accumulator times the group's scale, groups in ascending order.
  size_t (*w13_quant_bytes)(int64_t H, int64_t F, Quant q, int64_t group);
  size_t (*w2_quant_bytes)(int64_t H, int64_t F, Quant q, int64_t group);
  void (*pack_w13_quant)(const void* w1, const void* w3, int64_t H, int64_t F, DType dt, Quant q, int64_t group,
                         void* dst);
  void (*pack_w2_quant)(const void* w2, int64_t H, int64_t F, DType dt, Quant q, int64_t group, void* dst);
  void (*swiglu_quant)(const float* x, int64_t ldx, int64_t M, int64_t H, int64_t F, const void* w13, Quant q,
                       int64_t group, int64_t f_begin, int64_t f_end, float* act, int64_t ldact, ActEpoch act_epoch);
  void (*down_quant)(const float* act, int64_t ldact, int64_t M, int64_t H, int64_t F, const void* w2, Quant q,
                     int64_t group, int64_t h_begin, int64_t h_end, float* y, int64_t ldy, ActEpoch act_epoch);

  // The activations' precision against int8 / int4 weights: "float32", or "int16" / "int8" where the set
  // quantizes each row's groups of activations (quant.h's rule with a float32 scale, qmax 32767 / 127)
  // for an integer dot product. The kernels then follow the contract with each group's sum taken exactly
  // in integers.
  const char* int8_activations;
  const char* int4_activations;

  // The router's logits of T tokens, logits[t * E + e], bit for bit those of gate_logits (routing.h), or
  // nullptr where the set has no faster form (gate_logits then serves).
  void (*gate_logits)(const float* x, int64_t T, int64_t H, const float* gate, int64_t E, float* logits);
  // The same from a router stored as bf16 (routing.h gate_logits_bf16), or nullptr.
  void (*gate_logits_bf16)(const float* x, int64_t T, int64_t H, const uint16_t* gate, int64_t E, float* logits);

  // The sampler's weights (sampler.h): x[i] = exp((x[i] - top) * scale) in place, 0 below about 1e-307
  // and for -inf or NaN, and their sum (vocab_exp.h).
  double (*exp_weights)(double* x, int64_t n, double top, double scale);
  // The same from float logits into out[0, n): the same results as exp_weights over their float64 copy.
  double (*exp_weights_f32)(const float* x, double* out, int64_t n, double top, double scale);
  // The first index of the largest of the float logits x[0, n) (NaN never the largest) and its value,
  // or -1 and -inf when none is above -inf: the same at every width (vocab_exp.h first_max_vec).
  int64_t (*first_max_f32)(const float* x, int64_t n, float* top);
  // The same over float64 values, and the float logits widened to float64 (NaN as -inf).
  int64_t (*first_max_f64)(const double* x, int64_t n, double* top);
  void (*widen_logits)(const float* x, double* out, int64_t n);
};

// Kernel sets compiled into this binary; each returns nullptr when not built for this architecture.
const KernelSet* kernels_scalar();
const KernelSet* kernels_avx2();
const KernelSet* kernels_avx512();
const KernelSet* kernels_avx512bf16();
const KernelSet* kernels_neon();

// What the CPU can run (cpuid / OS support of the wide registers).
bool cpu_supports(Isa isa);
// The best set this CPU and binary support, or the one FUSED_MOE_ISA names (throws when that one cannot
// run here). Chosen once per process.
const KernelSet* select_kernels();
// A set by ISA if built and supported, else nullptr (tests and the bench force each one).
const KernelSet* kernels_for(Isa isa);

// Integer-dot panels shorter than this many bytes take the decode tile one panel at a time (simd_gemm.h
// explains why). A run-time value only so that a benchmark can compare two settings in one process
// (`bench/ab-model.js`, through binding.bench.setTuning); nothing else changes it.
std::atomic<size_t>& short_panel_bytes();
// Whether the integer-dot decode tiles, and the float modes' decode tiles of one to three rows, read
// their panels far apart (simd_gemm.h sweep_streams); run-time for the same reason.
std::atomic<int>& decode_streams();
// Column tiles (the work items of an expert phase and of a dense layer) are multiples of this many
// panels where the columns allow: 8, the float decode tile's width, so that no tile leaves panels for
// the sweep to run one at a time (one memory stream instead of eight). Run-time for the same reason.
std::atomic<int>& tile_panels();

}  // namespace fmoe
