// A decoder-only language model of the MoE families (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE): the interface
// every backend implements, its configuration and the named places its weights are loaded into.
//
// One step runs every layer for a batch of tokens from several sequences, each at its own positions,
// with the KV cache in blocks that the sequences share (attention.h). Per layer:
//   x += o_proj(attention(rope(qk_norm(qkv_proj(rms_norm(x))))))
//   x += mlp(rms_norm(x))   where mlp is the MoE block (+ a shared expert) or a dense SwiGLU MLP
// then the final norm and the LM head for the rows whose logits are asked for.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend.h"
#include "config.h"
#include "options.h"

namespace fmoe {

// Where the q/k RMSNorm applies: per head over head_dim (Qwen3-MoE), or over the whole q and k
// projections (OLMoE).
enum class QkNorm : int { None = 0, Head = 1, Projection = 2 };
constexpr EnumName<QkNorm> kQkNormNames[] = {
    {QkNorm::None, "none"}, {QkNorm::Head, "head"}, {QkNorm::Projection, "projection"}};

struct DecoderConfig {
  int64_t vocab = 0;     // V
  int64_t hidden = 0;    // H
  int64_t layers = 0;    // decoder layers
  int64_t heads = 0;     // query heads
  int64_t kv_heads = 0;  // KV heads (heads is a multiple)
  int64_t head_dim = 0;  // D, even
  double rope_theta = 10000;
  float rms_eps = 1e-5f;
  int64_t window = 0;  // sliding window (positions a query sees, itself included); 0: all earlier
  QkNorm qk_norm = QkNorm::None;
  bool qkv_bias = false;
  float clip_qkv = 0;  // q, k, v clamped to [-clip, clip] when > 0 (OLMoE)
  // The MLP: the MoE block where moe_layer[i] is 1, else a dense SwiGLU MLP of dense_intermediate.
  int64_t num_experts = 0, top_k = 0, moe_intermediate = 0;
  Routing routing = Routing::SoftmaxTopkRenorm;
  int64_t shared_intermediate = 0;  // an always-on shared expert (0: none)
  bool shared_gate = false;         // scaled by sigmoid(shared_gate · x) per token
  int64_t dense_intermediate = 0;
  std::vector<uint8_t> moe_layer;  // [layers]
  // Storage.
  DType weight_dtype = DType::BF16;  // the checkpoint's projection and expert matrices
  DType embed_dtype = DType::BF16;   // the embedding table as stored (never quantized)
  Quant quant = Quant::None;         // every projection matrix (attention, experts, LM head)
  int64_t quant_group = 128;
  DType kv_dtype = DType::BF16;
  int64_t block_tokens = 16;  // positions per KV cache block
  int64_t cache_blocks = 0;   // blocks in the cache (shared by every sequence)
  int64_t context = 0;        // longest sequence, in positions
  int threads = 0;            // at most this many pool threads (0: all)
};

// Throws MoeException(Invalid) naming the field when a value is out of range or inconsistent.
void validate_decoder_config(const DecoderConfig& cfg);

// The weights, one slot at a time. `index` is the expert for Expert, else 0; `layer` is ignored for the
// model-wide slots. Parts: Qkv and QkvBias take q, k, v; the three-matrix slots take gate (w1), up (w3),
// down (w2); the rest one tensor.
enum class Slot : int {
  Embedding = 0,    // [V, H]
  FinalNorm = 1,    // [H]
  LmHead = 2,       // [V, H]
  AttnNorm = 3,     // [H]
  Qkv = 4,          // [heads*D, H], [kv*D, H], [kv*D, H]
  QkvBias = 5,      // [heads*D], [kv*D], [kv*D]
  QNorm = 6,        // [D] (per head) or [heads*D] (projection)
  KNorm = 7,        // [D] or [kv*D]
  O = 8,            // [H, heads*D]
  FfnNorm = 9,      // [H]
  Router = 10,      // [E, H]
  Expert = 11,      // [F, H], [F, H], [H, F]
  Shared = 12,      // the same with F = shared_intermediate
  SharedGate = 13,  // [1, H]
  Dense = 14,       // the same with F = dense_intermediate
};
// The names the binding takes (and errors print).
constexpr EnumName<Slot> kSlotNames[] = {{Slot::Embedding, "embedding"},
                                         {Slot::FinalNorm, "finalNorm"},
                                         {Slot::LmHead, "lmHead"},
                                         {Slot::AttnNorm, "attnNorm"},
                                         {Slot::Qkv, "qkv"},
                                         {Slot::QkvBias, "qkvBias"},
                                         {Slot::QNorm, "qNorm"},
                                         {Slot::KNorm, "kNorm"},
                                         {Slot::O, "o"},
                                         {Slot::FfnNorm, "ffnNorm"},
                                         {Slot::Router, "router"},
                                         {Slot::Expert, "expert"},
                                         {Slot::Shared, "shared"},
                                         {Slot::SharedGate, "sharedGate"},
                                         {Slot::Dense, "dense"}};
inline const char* slot_name(Slot s) { return enum_name(kSlotNames, s); }

struct TensorPart {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t elements = 0;  // checked against the slot's shape
};

// One sequence's share of a step: `count` tokens appended to sequence `id` (its length grows by count).
struct StepSequence {
  int64_t id = 0;
  int64_t count = 0;
  bool all_logits = false;  // logits of every new token, else of the last one only
};

// Where the steps' time went, per part of the model, summed since load: what bench/model.js reports
// against the bytes each part reads.
enum class StepPhase : int {
  Qkv,        // the Q, K and V projections (and their norms, biases and rotary embedding)
  Attention,  // the KV cache write and attention over the cache
  Output,     // the output projection
  Mlp,        // the MoE block (router, experts, shared expert) or the dense MLP
  LmHead,     // the final norm and the LM head
  Other,      // embedding, RMSNorms, residuals
  Count
};
struct StepTimes {
  uint64_t steps = 0, tokens = 0;
  uint64_t nanoseconds[int(StepPhase::Count)] = {};
};

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual const DecoderConfig& config() const = 0;
  virtual size_t native_bytes() const = 0;

  // Loads one slot (converting norms and biases to float32, packing matrices); checks sizes and dtypes.
  virtual void load(Slot slot, int64_t layer, int64_t index, const std::vector<TensorPart>& parts) = 0;
  // Empty when every slot is loaded, else the first missing one ("layer 3 O", ...).
  virtual std::string missing() const = 0;

  // Sequences: create one (length 0), free it (its cache blocks return to the pool), shorten it, fork it.
  virtual int64_t sequence_create() = 0;
  virtual void sequence_free(int64_t id) = 0;
  virtual int64_t sequence_length(int64_t id) const = 0;
  virtual void sequence_truncate(int64_t id, int64_t length) = 0;
  // A new sequence holding the first `length` positions of sequence `id` (0 <= length <= its length):
  // the full blocks among them shared, a partial last one copied. A block at or past a sequence's
  // length is never shared, so a step writes only into blocks of its own (sequence_truncate copies a
  // shared block it would leave partial). Needs a free block when length is not a multiple of a block.
  virtual int64_t sequence_fork(int64_t id, int64_t length) = 0;
  virtual int64_t free_cache_positions() const = 0;
  // Tokens routed to each expert of each layer since load: counts[layers * num_experts], zero for
  // dense layers.
  virtual std::vector<uint64_t> routed_tokens() const = 0;
  // Time of every step that completed since load, by phase.
  virtual StepTimes step_times() const = 0;

  // Runs one step: tokens holds each sequence's `count` tokens in order. logits receives, sequence by
  // sequence, count rows (all_logits) or one row of V floats. Checked before any work: token ids, known
  // sequences, context length, free cache blocks. On error (or cancel) no sequence grows.
  virtual void step(const int32_t* tokens, const StepSequence* seqs, int64_t num_seqs, float* logits,
                    const CancelFlag* cancel) = 0;
  // Rows of logits a step with these sequences writes.
  static int64_t logit_rows(const StepSequence* seqs, int64_t num_seqs);
};

std::unique_ptr<Decoder> make_cpu_decoder(const DecoderConfig& cfg);

}  // namespace fmoe
