// The CPU decoder (decoder.h): projections on the experts' packed GEMM (linear.h), attention over the
// paged cache (attention.h), the MoE block and the dense MLP as CPU MoE layers (cpu_backend.cpp).
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "../core/decoder.h"
#include "../core/error.h"
#include "../core/kv_blocks.h"
#include "../core/memory.h"
#include "../core/thread_pool.h"
#include "../core/timeline.h"
#include "attention.h"
#include "buffers.h"
#include "decoder_ops.h"
#include "linear.h"

namespace fmoe {

int64_t Decoder::logit_rows(const StepSequence* seqs, int64_t num_seqs) {
  int64_t rows = 0;
  for (int64_t i = 0; i < num_seqs; i++) rows += seqs[i].all_logits ? seqs[i].count : (seqs[i].count > 0 ? 1 : 0);
  return rows;
}

static void check_field(bool ok, const std::string& message) {
  if (!ok) fail(ErrorCode::Invalid, message);
}

void validate_decoder_config(const DecoderConfig& c) {
  check_field(c.vocab >= 1 && c.vocab <= (int64_t(1) << 31) - 1, "vocab size must be in [1, 2^31)");
  check_field(c.hidden >= 1 && c.hidden <= kMaxDim, "hidden size must be in [1, 2^20]");
  check_field(c.layers >= 1 && c.layers <= 4096, "layers must be in [1, 4096]");
  check_field(c.heads >= 1 && c.kv_heads >= 1 && c.heads % c.kv_heads == 0,
              "attention heads must be a positive multiple of the KV heads");
  check_field(c.head_dim >= 2 && c.head_dim % 2 == 0 && c.head_dim <= 4096, "head_dim must be even, in [2, 4096]");
  check_field(std::isfinite(c.rope_theta) && c.rope_theta > 0, "rope_theta must be a positive number");
  check_field(std::isfinite(c.rms_eps) && c.rms_eps >= 0, "rms_norm_eps must be >= 0");
  check_field(c.window >= 0, "sliding window must be >= 0");
  check_field(std::isfinite(c.clip_qkv) && c.clip_qkv >= 0, "clip_qkv must be >= 0");
  check_field(int64_t(c.moe_layer.size()) == c.layers, "one MoE flag per layer is required");
  const bool any_moe = std::any_of(c.moe_layer.begin(), c.moe_layer.end(), [](uint8_t m) { return m != 0; });
  const bool any_dense = std::any_of(c.moe_layer.begin(), c.moe_layer.end(), [](uint8_t m) { return m == 0; });
  if (any_moe) {
    MoeConfig m;
    m.hidden = c.hidden;
    m.intermediate = c.moe_intermediate;
    m.num_experts = c.num_experts;
    m.top_k = c.top_k;
    m.routing = c.routing;
    m.weight_dtype = c.weight_dtype;
    m.quant = c.quant;
    m.quant_group = c.quant_group;
    validate_config(m);
    check_field(c.shared_intermediate >= 0 && c.shared_intermediate <= kMaxDim, "shared expert size out of range");
  }
  if (any_dense)
    check_field(c.dense_intermediate >= 1 && c.dense_intermediate <= kMaxDim, "dense MLP size out of range");
  check_field(c.block_tokens >= 1 && c.block_tokens <= 1024, "KV block size must be in [1, 1024]");
  check_field(c.context >= 1 && c.context <= (int64_t(1) << 24), "context must be in [1, 2^24]");
  check_field(c.cache_blocks >= 1 && c.cache_blocks <= (int64_t(1) << 30), "cache blocks must be in [1, 2^30]");
  check_field(quant_group_ok(c.quant_group), "quantGroupSize must be 32, 64 or 128");
}

namespace {

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// Reads a 1-D float tensor of n elements (any dtype) as float32.
std::vector<float> to_f32(const TensorPart& t) {
  std::vector<float> out(static_cast<size_t>(t.elements));
  for (int64_t i = 0; i < t.elements; i++) out[size_t(i)] = load_as_f32(t.data, t.dtype, size_t(i));
  return out;
}

struct Layer {
  std::vector<float> attn_norm, ffn_norm, q_norm, k_norm, q_bias, k_bias, v_bias;
  bool attn_norm_set = false, ffn_norm_set = false, q_norm_set = false, k_norm_set = false, bias_set = false;
  PackedLinear qkv, o;
  bool qkv_set = false, o_set = false;
  // The MLP: the MoE block, an optional shared expert (a one-expert layer) and its gate, or a dense MLP
  // (also a one-expert layer: the router of one expert gives weight exactly 1).
  std::unique_ptr<LayerBuilder> moe_builder, shared_builder;
  std::unique_ptr<Backend> moe, shared;
  bool router_set = false, shared_set = false;
  std::vector<uint8_t> experts_set;
  PackedLinear shared_gate;
  bool shared_gate_set = false;
  AlignedBuffer k_cache, v_cache;
};

struct Sequence {
  std::vector<int32_t> blocks;
  int64_t length = 0;
};

// A step's buffers, kept across steps and only grown: a fresh allocation per step costs page faults
// (the large ones are mapped) on every prompt. Steps of one model never overlap, so one set serves all.
struct StepWorkspace {
  std::vector<float> x, xn, qkv, q, k, v, att, y, y2, gate, cos, sin, out_rows;
  std::vector<int64_t> pos;
  std::vector<AttentionSeq> att_seqs;

  // The buffer with room for n elements; its contents are unspecified.
  template <class T>
  static T* grow(std::vector<T>& buf, int64_t n) {
    if (buf.size() < size_t(n)) buf.resize(size_t(n));
    return buf.data();
  }
};

// Bytes of one layer's K cache (or V cache).
size_t layer_cache_bytes(const DecoderConfig& cfg) {
  return size_t(cfg.cache_blocks) * size_t(cfg.kv_heads * cfg.block_tokens * cfg.head_dim) * dtype_size(cfg.kv_dtype);
}

// The config checked, then the KV cache's bytes (and the block pool's bookkeeping, 8 bytes a block)
// against the memory left: before the pool fills its lists, which for a cache far too big took seconds
// of the caller's thread and gigabytes before the refusal.
int64_t checked_cache_blocks(const DecoderConfig& cfg) {
  validate_decoder_config(cfg);
  check_memory_available(size_t(cfg.layers) * 2 * layer_cache_bytes(cfg) + size_t(cfg.cache_blocks) * 8,
                         "the KV cache (contextLength x maxSequences positions)",
                         "a smaller contextLength or maxSequences fits in less");
  return cfg.cache_blocks;
}

class CpuDecoder final : public Decoder {
 public:
  explicit CpuDecoder(const DecoderConfig& cfg)
      : cfg_(cfg), kernels_(select_kernels()), pool_(checked_cache_blocks(cfg)) {
    const int64_t H = cfg.hidden, D = cfg.head_dim;
    const size_t cache_bytes = layer_cache_bytes(cfg);
    layers_.resize(size_t(cfg.layers));
    for (int64_t l = 0; l < cfg.layers; l++) {
      Layer& L = layers_[size_t(l)];
      L.qkv = PackedLinear(kernels_, (cfg.heads + 2 * cfg.kv_heads) * D, H, cfg.weight_dtype, cfg.quant,
                           cfg.quant_group, "the q/k/v projections");
      L.o = PackedLinear(kernels_, H, cfg.heads * D, cfg.weight_dtype, cfg.quant, cfg.quant_group,
                         "the output projection");
      if (cfg.moe_layer[size_t(l)]) {
        L.moe_builder = make_cpu_builder(moe_config(cfg.num_experts, cfg.top_k, cfg.moe_intermediate, cfg.routing));
        L.experts_set.assign(size_t(cfg.num_experts), 0);
        if (cfg.shared_intermediate > 0) {
          L.shared_builder = make_cpu_builder(moe_config(1, 1, cfg.shared_intermediate, Routing::SoftmaxTopkRenorm));
          if (cfg.shared_gate)
            L.shared_gate = PackedLinear(kernels_, 1, H, DType::F32, Quant::None, 128, "the shared expert gate");
        }
      } else {
        L.shared_builder = make_cpu_builder(moe_config(1, 1, cfg.dense_intermediate, Routing::SoftmaxTopkRenorm));
      }
      // Zeroed: the attention reads whole vectors of a block, slots past a sequence's end included (their
      // lanes are computed and never used), so those slots must hold numbers from the start.
      L.k_cache = alloc_zeroed(cache_bytes, "the K cache");
      L.v_cache = alloc_zeroed(cache_bytes, "the V cache");
    }
    lm_head_ = PackedLinear(kernels_, cfg.vocab, H, cfg.weight_dtype, cfg.quant, cfg.quant_group, "the LM head");
    embedding_ = alloc_aligned(size_t(cfg.vocab * H) * dtype_size(cfg.embed_dtype), "the embedding table");
    cache_bytes_ = size_t(cfg.layers) * 2 * cache_bytes;
  }

  const DecoderConfig& config() const override { return cfg_; }

  size_t native_bytes() const override {
    size_t n = cache_bytes_ + lm_head_.bytes() + size_t(cfg_.vocab * cfg_.hidden) * dtype_size(cfg_.embed_dtype);
    for (const Layer& L : layers_) {
      n += L.qkv.bytes() + L.o.bytes();
      if (L.moe) n += L.moe->native_bytes();
      if (L.shared) n += L.shared->native_bytes();
    }
    return n;
  }

  void load(Slot slot, int64_t layer, int64_t index, const std::vector<TensorPart>& parts) override {
    const int64_t H = cfg_.hidden, D = cfg_.head_dim, V = cfg_.vocab;
    const bool per_layer = slot != Slot::Embedding && slot != Slot::FinalNorm && slot != Slot::LmHead;
    if (per_layer && (layer < 0 || layer >= cfg_.layers))
      fail(ErrorCode::Invalid, std::string(slot_name(slot)) + ": layer " + std::to_string(layer) + " is out of range");
    Layer* L = per_layer ? &layers_[size_t(layer)] : nullptr;
    const std::string where = per_layer ? "layer " + std::to_string(layer) + " " + slot_name(slot) : slot_name(slot);
    auto expect = [&](std::vector<int64_t> sizes, bool matrix) {
      if (parts.size() != sizes.size())
        fail(ErrorCode::Invalid,
             where + ": expected " + std::to_string(sizes.size()) + " tensors, got " + std::to_string(parts.size()));
      for (size_t i = 0; i < sizes.size(); i++) {
        if (!parts[i].data && sizes[i] > 0)
          fail(ErrorCode::Invalid, where + ": tensor " + std::to_string(i) + " is missing");
        if (parts[i].elements != sizes[i])
          fail(ErrorCode::Shape, where + ": tensor " + std::to_string(i) + " must have " + std::to_string(sizes[i]) +
                                     " elements, got " + std::to_string(parts[i].elements));
        if (matrix && parts[i].dtype != cfg_.weight_dtype)
          fail(ErrorCode::Dtype,
               where + ": expected " + dtype_name(cfg_.weight_dtype) + " weights, got " + dtype_name(parts[i].dtype));
      }
    };
    const bool moe = per_layer && cfg_.moe_layer[size_t(layer)];
    auto need_moe = [&](bool want) {
      if (moe != want)
        fail(ErrorCode::Invalid,
             where + ": layer " + std::to_string(layer) + " is " + (moe ? "a MoE" : "a dense") + " layer");
    };
    switch (slot) {
      case Slot::Embedding: {
        expect({V * H}, false);
        if (parts[0].dtype != cfg_.embed_dtype)
          fail(ErrorCode::Dtype,
               where + ": expected " + dtype_name(cfg_.embed_dtype) + ", got " + dtype_name(parts[0].dtype));
        std::memcpy(embedding_.get(), parts[0].data, size_t(V * H) * dtype_size(cfg_.embed_dtype));
        embedding_set_ = true;
        return;
      }
      case Slot::FinalNorm:
        expect({H}, false);
        final_norm_ = to_f32(parts[0]);
        return;
      case Slot::LmHead:
        expect({V * H}, true);
        lm_head_.pack({parts[0].data}, {V});
        lm_head_set_ = true;
        return;
      case Slot::AttnNorm:
        expect({H}, false);
        L->attn_norm = to_f32(parts[0]);
        L->attn_norm_set = true;
        return;
      case Slot::FfnNorm:
        expect({H}, false);
        L->ffn_norm = to_f32(parts[0]);
        L->ffn_norm_set = true;
        return;
      case Slot::Qkv:
        expect({cfg_.heads * D * H, cfg_.kv_heads * D * H, cfg_.kv_heads * D * H}, true);
        L->qkv.pack({parts[0].data, parts[1].data, parts[2].data},
                    {cfg_.heads * D, cfg_.kv_heads * D, cfg_.kv_heads * D});
        L->qkv_set = true;
        return;
      case Slot::QkvBias:
        if (!cfg_.qkv_bias) fail(ErrorCode::Invalid, where + ": this model has no q/k/v biases");
        expect({cfg_.heads * D, cfg_.kv_heads * D, cfg_.kv_heads * D}, false);
        L->q_bias = to_f32(parts[0]);
        L->k_bias = to_f32(parts[1]);
        L->v_bias = to_f32(parts[2]);
        L->bias_set = true;
        return;
      case Slot::QNorm:
      case Slot::KNorm: {
        if (cfg_.qk_norm == QkNorm::None) fail(ErrorCode::Invalid, where + ": this model has no q/k norms");
        const int64_t heads = slot == Slot::QNorm ? cfg_.heads : cfg_.kv_heads;
        expect({cfg_.qk_norm == QkNorm::Head ? D : heads * D}, false);
        (slot == Slot::QNorm ? L->q_norm : L->k_norm) = to_f32(parts[0]);
        (slot == Slot::QNorm ? L->q_norm_set : L->k_norm_set) = true;
        return;
      }
      case Slot::O:
        expect({H * cfg_.heads * D}, true);
        L->o.pack({parts[0].data}, {H});
        L->o_set = true;
        return;
      case Slot::Router: {
        need_moe(true);
        expect({cfg_.num_experts * H}, false);
        const std::vector<float> gate = to_f32(parts[0]);
        L->moe_builder->set_router(gate.data());
        L->router_set = true;
        finish_layer(*L);
        return;
      }
      case Slot::Expert: {
        need_moe(true);
        if (index < 0 || index >= cfg_.num_experts)
          fail(ErrorCode::Invalid, where + ": expert " + std::to_string(index) + " is out of range");
        const int64_t F = cfg_.moe_intermediate;
        expect({F * H, F * H, H * F}, true);
        if (!L->moe_builder) fail(ErrorCode::Invalid, where + ": the layer's MoE block is already complete");
        L->moe_builder->pack_expert(index, parts[0].data, parts[1].data, parts[2].data);
        L->experts_set[size_t(index)] = 1;
        finish_layer(*L);
        return;
      }
      case Slot::Shared:
      case Slot::Dense: {
        need_moe(slot == Slot::Shared);
        if (slot == Slot::Shared && cfg_.shared_intermediate == 0)
          fail(ErrorCode::Invalid, where + ": this model has no shared expert");
        const int64_t F = slot == Slot::Shared ? cfg_.shared_intermediate : cfg_.dense_intermediate;
        expect({F * H, F * H, H * F}, true);
        if (!L->shared_builder) fail(ErrorCode::Invalid, where + ": already loaded");
        const std::vector<float> one_router(static_cast<size_t>(H), 0.0f);
        L->shared_builder->set_router(one_router.data());
        L->shared_builder->pack_expert(0, parts[0].data, parts[1].data, parts[2].data);
        L->shared = L->shared_builder->finish();
        L->shared_builder.reset();
        L->shared_set = true;
        return;
      }
      case Slot::SharedGate:
        need_moe(true);
        if (!cfg_.shared_gate) fail(ErrorCode::Invalid, where + ": this model has no shared expert gate");
        expect({H}, false);
        {
          const std::vector<float> g = to_f32(parts[0]);
          L->shared_gate.pack({g.data()}, {1});
        }
        L->shared_gate_set = true;
        return;
    }
    fail(ErrorCode::Invalid, "unknown weight slot " + std::to_string(int(slot)));
  }

  std::string missing() const override {
    if (!embedding_set_) return slot_name(Slot::Embedding);
    if (final_norm_.empty()) return slot_name(Slot::FinalNorm);
    if (!lm_head_set_) return slot_name(Slot::LmHead);
    for (int64_t l = 0; l < cfg_.layers; l++) {
      const Layer& L = layers_[size_t(l)];
      const std::string p = "layer " + std::to_string(l) + " ";
      if (!L.attn_norm_set) return p + slot_name(Slot::AttnNorm);
      if (!L.ffn_norm_set) return p + slot_name(Slot::FfnNorm);
      if (!L.qkv_set) return p + slot_name(Slot::Qkv);
      if (cfg_.qkv_bias && !L.bias_set) return p + slot_name(Slot::QkvBias);
      if (cfg_.qk_norm != QkNorm::None && !L.q_norm_set) return p + slot_name(Slot::QNorm);
      if (cfg_.qk_norm != QkNorm::None && !L.k_norm_set) return p + slot_name(Slot::KNorm);
      if (!L.o_set) return p + slot_name(Slot::O);
      if (cfg_.moe_layer[size_t(l)]) {
        if (!L.router_set) return p + slot_name(Slot::Router);
        for (int64_t e = 0; e < cfg_.num_experts; e++)
          if (!L.experts_set[size_t(e)]) return p + slot_name(Slot::Expert) + " " + std::to_string(e);
        if (cfg_.shared_intermediate > 0 && !L.shared_set) return p + slot_name(Slot::Shared);
        if (cfg_.shared_gate && cfg_.shared_intermediate > 0 && !L.shared_gate_set)
          return p + slot_name(Slot::SharedGate);
      } else if (!L.shared_set) {
        return p + slot_name(Slot::Dense);
      }
    }
    return "";
  }

  int64_t sequence_create() override {
    const int64_t id = next_id_++;
    sequences_[id] = Sequence{};
    return id;
  }

  void sequence_free(int64_t id) override {
    Sequence& s = find(id);
    for (int32_t b : s.blocks) pool_.release(b);
    sequences_.erase(id);
  }

  int64_t sequence_length(int64_t id) const override { return find(id).length; }

  void sequence_truncate(int64_t id, int64_t length) override {
    Sequence& s = find(id);
    check_prefix(id, s, length);
    const size_t keep = size_t((length + cfg_.block_tokens - 1) / cfg_.block_tokens);
    // The block left partial takes the next step's positions: a shared one is copied first.
    int32_t own = -1;
    if (length % cfg_.block_tokens != 0 && pool_.holders(s.blocks[keep - 1]) > 1) {
      own = copy_of_block(s.blocks[keep - 1], "shortening sequence " + std::to_string(id));
    }
    s.length = length;
    while (s.blocks.size() > keep) {
      pool_.release(s.blocks.back());
      s.blocks.pop_back();
    }
    if (own >= 0) {
      pool_.release(s.blocks[keep - 1]);
      s.blocks[keep - 1] = own;
    }
  }

  int64_t sequence_fork(int64_t id, int64_t length) override {
    const Sequence& src = find(id);
    check_prefix(id, src, length);
    const size_t full = size_t(length / cfg_.block_tokens);
    Sequence s;
    s.length = length;
    s.blocks.assign(src.blocks.begin(), src.blocks.begin() + std::ptrdiff_t(full));
    if (length % cfg_.block_tokens != 0)
      s.blocks.push_back(copy_of_block(src.blocks[full], "forking sequence " + std::to_string(id)));
    for (size_t i = 0; i < full; i++) pool_.retain(s.blocks[i]);
    const int64_t fork_id = next_id_++;
    sequences_[fork_id] = std::move(s);
    return fork_id;
  }

  int64_t free_cache_positions() const override { return pool_.free_blocks() * cfg_.block_tokens; }

  StepTimes step_times() const override {
    StepTimes t;
    t.steps = steps_.load(std::memory_order_relaxed);
    t.tokens = step_tokens_.load(std::memory_order_relaxed);
    for (int i = 0; i < int(StepPhase::Count); i++)
      t.nanoseconds[i] = phase_ns_[size_t(i)].load(std::memory_order_relaxed);
    return t;
  }

  std::vector<uint64_t> routed_tokens() const override {
    const int64_t E = cfg_.num_experts;
    std::vector<uint64_t> counts(size_t(cfg_.layers * E), 0);
    for (int64_t l = 0; l < cfg_.layers; l++)
      if (layers_[size_t(l)].moe) layers_[size_t(l)].moe->add_routed_tokens(counts.data() + l * E);
    return counts;
  }

  void step(const int32_t* tokens, const StepSequence* seqs, int64_t num_seqs, float* logits,
            const CancelFlag* cancel) override {
    if (!missing().empty()) fail(ErrorCode::Invalid, "the model is not fully loaded: " + missing() + " is missing");
    // Everything is checked before any state changes.
    int64_t T = 0, new_blocks = 0;
    for (int64_t i = 0; i < num_seqs; i++) {
      const StepSequence& q = seqs[i];
      const Sequence& s = find(q.id);
      if (q.count < 0) fail(ErrorCode::Invalid, "step: a token count must be >= 0");
      for (int64_t j = 0; j < i; j++)
        if (seqs[j].id == q.id) fail(ErrorCode::Invalid, "step: sequence " + std::to_string(q.id) + " appears twice");
      if (s.length + q.count > cfg_.context)
        fail(ErrorCode::Invalid, "sequence " + std::to_string(q.id) + " would hold " +
                                     std::to_string(s.length + q.count) + " positions, more than the context of " +
                                     std::to_string(cfg_.context));
      const int64_t need = (s.length + q.count + cfg_.block_tokens - 1) / cfg_.block_tokens;
      new_blocks += std::max<int64_t>(0, need - int64_t(s.blocks.size()));
      // sequence_fork and sequence_truncate keep a partial last block the sequence's own.
      if (q.count > 0 && s.length % cfg_.block_tokens != 0 &&
          pool_.holders(s.blocks[size_t(s.length / cfg_.block_tokens)]) != 1)
        fail(ErrorCode::Internal, "sequence " + std::to_string(q.id) + " would write into a shared cache block");
      T += q.count;
    }
    for (int64_t t = 0; t < T; t++)
      if (tokens[t] < 0 || tokens[t] >= cfg_.vocab)
        fail(ErrorCode::Invalid, "token " + std::to_string(t) + " of the step is " + std::to_string(tokens[t]) +
                                     ", outside the vocabulary [0, " + std::to_string(cfg_.vocab) + ")");
    if (new_blocks > pool_.free_blocks())
      fail(ErrorCode::OutOfMemory, "the KV cache is full: the step needs " + std::to_string(new_blocks) +
                                       " more blocks of " + std::to_string(cfg_.block_tokens) + " positions, " +
                                       std::to_string(pool_.free_blocks()) + " are free");
    if (T == 0) return;
    for (int64_t i = 0; i < num_seqs; i++) {
      Sequence& s = find(seqs[i].id);
      const int64_t need = (s.length + seqs[i].count + cfg_.block_tokens - 1) / cfg_.block_tokens;
      if (need > int64_t(s.blocks.size()) && !pool_.allocate(need - int64_t(s.blocks.size()), s.blocks))
        fail(ErrorCode::Internal, "the KV cache lost blocks while a step was planned");
    }
    PhaseClock clock;
    run(tokens, T, seqs, num_seqs, logits, cancel, clock);
    for (int64_t i = 0; i < num_seqs; i++) find(seqs[i].id).length += seqs[i].count;
    for (int i = 0; i < int(StepPhase::Count); i++)
      phase_ns_[size_t(i)].fetch_add(clock.ns[i], std::memory_order_relaxed);
    steps_.fetch_add(1, std::memory_order_relaxed);
    step_tokens_.fetch_add(uint64_t(T), std::memory_order_relaxed);
  }

 private:
  MoeConfig moe_config(int64_t E, int64_t k, int64_t F, Routing r) const {
    MoeConfig m;
    m.hidden = cfg_.hidden;
    m.intermediate = F;
    m.num_experts = E;
    m.top_k = k;
    m.routing = r;
    m.weight_dtype = cfg_.weight_dtype;
    m.threads = cfg_.threads;
    m.quant = cfg_.quant;
    m.quant_group = cfg_.quant_group;
    return m;
  }

  void finish_layer(Layer& L) {
    if (!L.router_set || !std::all_of(L.experts_set.begin(), L.experts_set.end(), [](uint8_t s) { return s != 0; }))
      return;
    L.moe = L.moe_builder->finish();
    L.moe_builder.reset();
  }

  void check_prefix(int64_t id, const Sequence& s, int64_t length) const {
    if (length < 0 || length > s.length)
      fail(ErrorCode::Invalid, "sequence " + std::to_string(id) + ": length must be in [0, " +
                                   std::to_string(s.length) + "], got " + std::to_string(length));
  }

  // A free block holding a copy of `block`'s keys and values in every layer (OutOfMemory when none is
  // free, naming what needed it).
  int32_t copy_of_block(int32_t block, const std::string& what) {
    std::vector<int32_t> fresh;
    if (!pool_.allocate(1, fresh))
      fail(ErrorCode::OutOfMemory, "the KV cache is full: " + what + " needs a block of " +
                                       std::to_string(cfg_.block_tokens) + " positions of its own, none is free");
    const size_t bytes = size_t(cfg_.kv_heads * cfg_.block_tokens * cfg_.head_dim) * dtype_size(cfg_.kv_dtype);
    for (Layer& L : layers_)
      for (void* cache : {L.k_cache.get(), L.v_cache.get()}) {
        char* base = static_cast<char*>(cache);
        std::memcpy(base + size_t(fresh[0]) * bytes, base + size_t(block) * bytes, bytes);
      }
    return fresh[0];
  }

  Sequence& find(int64_t id) {
    auto it = sequences_.find(id);
    if (it == sequences_.end()) fail(ErrorCode::Invalid, "sequence " + std::to_string(id) + " does not exist");
    return it->second;
  }
  const Sequence& find(int64_t id) const { return const_cast<CpuDecoder*>(this)->find(id); }

  void check_cancel(const CancelFlag* cancel) const {
    if (cancel && cancel->load()) fail(ErrorCode::Aborted, "the operation was aborted");
  }

  // Times the phases of one step: to(p) charges the time since the previous mark to phase p (and puts it
  // on the timeline while that records, timeline.h).
  struct PhaseClock {
    int64_t last = timeline::now();
    uint64_t ns[int(StepPhase::Count)] = {};
    void to(StepPhase p) {
      const int64_t now = timeline::now();
      ns[int(p)] += uint64_t(now - last);
      timeline::record(timeline::Kind::Phase, 0, last, now, 0, int(p));
      last = now;
    }
  };

  // Runs fn(first, count) over n independent items (tokens, sequences) in chunks on the pool, two a
  // thread of at least `least` items each; n <= least runs on the calling thread. Each item's work is the
  // same computation wherever it runs, so the bits do not change. At 16 streams these per-token steps
  // (norms, RoPE, the KV cache write, the residuals) took about 0.8 ms of a 38 ms Mixtral int4 step
  // on the calling thread while the other threads waited (`node bench/timeline.js mixtral int4 12 16
  // --layout`).
  template <class Fn>
  void over_items(int64_t n, int64_t least, const Fn& fn) const {
    ThreadPool& pool = ThreadPool::instance();
    pool.parallel_for(n, pool.chunk_for(n, cfg_.threads, least), cfg_.threads,
                      [&](int64_t b, int64_t e, int) { fn(b, e - b); });
  }
  template <class Fn>
  void over_tokens(int64_t T, const Fn& fn) const {
    over_items(T, 4, fn);
  }

  // Tokens [t0, t0 + n) of the fused Q/K/V projection into q, k and v: biases, clipping, the q/k norms
  // and RoPE.
  void split_qkv(const Layer& L, const float* qkv, int64_t t0, int64_t n, float* q, float* k, float* v,
                 const float* cos, const float* sin) const {
    const int64_t D = cfg_.head_dim, NQ = cfg_.heads * D, NKV = cfg_.kv_heads * D, NQKV = NQ + 2 * NKV;
    for (int64_t t = t0; t < t0 + n; t++) {
      const float* r = qkv + t * NQKV;
      std::memcpy(q + t * NQ, r, size_t(NQ) * 4);
      std::memcpy(k + t * NKV, r + NQ, size_t(NKV) * 4);
      std::memcpy(v + t * NKV, r + NQ + NKV, size_t(NKV) * 4);
      if (cfg_.qkv_bias) {
        for (int64_t i = 0; i < NQ; i++) q[t * NQ + i] += L.q_bias[size_t(i)];
        for (int64_t i = 0; i < NKV; i++) k[t * NKV + i] += L.k_bias[size_t(i)];
        for (int64_t i = 0; i < NKV; i++) v[t * NKV + i] += L.v_bias[size_t(i)];
      }
    }
    float* qt = q + t0 * NQ;
    float* kt = k + t0 * NKV;
    float* vt = v + t0 * NKV;
    if (cfg_.clip_qkv > 0) {
      const float c = cfg_.clip_qkv;
      for (float* buf : {qt, kt, vt}) {
        const int64_t len = buf == qt ? n * NQ : n * NKV;
        for (int64_t i = 0; i < len; i++) buf[i] = std::min(c, std::max(-c, buf[i]));
      }
    }
    if (cfg_.qk_norm == QkNorm::Head) {
      rms_norm(qt, n * cfg_.heads, D, D, L.q_norm.data(), cfg_.rms_eps, qt, D);
      rms_norm(kt, n * cfg_.kv_heads, D, D, L.k_norm.data(), cfg_.rms_eps, kt, D);
    } else if (cfg_.qk_norm == QkNorm::Projection) {
      rms_norm(qt, n, NQ, NQ, L.q_norm.data(), cfg_.rms_eps, qt, NQ);
      rms_norm(kt, n, NKV, NKV, L.k_norm.data(), cfg_.rms_eps, kt, NKV);
    }
    rope_apply(qt, n, cfg_.heads, D, NQ, cos + t0 * (D / 2), sin + t0 * (D / 2));
    rope_apply(kt, n, cfg_.kv_heads, D, NKV, cos + t0 * (D / 2), sin + t0 * (D / 2));
  }

  void run(const int32_t* tokens, int64_t T, const StepSequence* seqs, int64_t num_seqs, float* logits,
           const CancelFlag* cancel, PhaseClock& clock) {
    const int64_t H = cfg_.hidden, D = cfg_.head_dim, NQ = cfg_.heads * D, NKV = cfg_.kv_heads * D;
    const int64_t NQKV = NQ + 2 * NKV;
    const int threads = cfg_.threads;
    StepWorkspace& w = work_;
    float* x = w.grow(w.x, T * H);
    float* xn = w.grow(w.xn, T * H);
    float* qkv = w.grow(w.qkv, T * NQKV);
    float* q = w.grow(w.q, T * NQ);
    float* k = w.grow(w.k, T * NKV);
    float* v = w.grow(w.v, T * NKV);
    float* att = w.grow(w.att, T * NQ);
    float* y = w.grow(w.y, T * H);
    // Embedding rows, widened to float.
    for (int64_t t = 0; t < T; t++)
      for (int64_t h = 0; h < H; h++)
        x[t * H + h] = load_as_f32(embedding_.get(), cfg_.embed_dtype, size_t(int64_t(tokens[t]) * H + h));
    // Positions and the attention's view of each sequence.
    int64_t* pos = w.grow(w.pos, T);
    w.att_seqs.clear();
    int64_t row = 0;
    for (int64_t i = 0; i < num_seqs; i++) {
      const Sequence& s = find(seqs[i].id);
      AttentionSeq a;
      a.blocks = s.blocks.data();
      a.num_blocks = int64_t(s.blocks.size());
      a.past = s.length;
      a.count = seqs[i].count;
      a.row = row;
      for (int64_t j = 0; j < a.count; j++) pos[row + j] = s.length + j;
      if (a.count > 0) w.att_seqs.push_back(a);
      row += a.count;
    }
    const std::vector<AttentionSeq>& att_seqs = w.att_seqs;
    float* cos = w.grow(w.cos, T * D / 2);
    float* sin = w.grow(w.sin, T * D / 2);
    rope_tables(pos, T, D, cfg_.rope_theta, cos, sin);
    clock.to(StepPhase::Other);
    AttentionParams ap;
    ap.heads = cfg_.heads;
    ap.scale = float(1.0 / std::sqrt(double(D)));
    ap.window = cfg_.window;
    ap.threads = threads;

    for (int64_t l = 0; l < cfg_.layers; l++) {
      check_cancel(cancel);
      Layer& L = layers_[size_t(l)];
      // Attention.
      over_tokens(T, [&](int64_t t0, int64_t n) {
        rms_norm(x + t0 * H, n, H, H, L.attn_norm.data(), cfg_.rms_eps, xn + t0 * H, H);
      });
      clock.to(StepPhase::Other);
      L.qkv.forward(xn, H, T, qkv, NQKV, threads);
      over_tokens(T, [&](int64_t t0, int64_t n) { split_qkv(L, qkv, t0, n, q, k, v, cos, sin); });
      clock.to(StepPhase::Qkv);
      KvCacheView cache;
      cache.k = L.k_cache.get();
      cache.v = L.v_cache.get();
      cache.num_blocks = cfg_.cache_blocks;
      cache.kv_heads = cfg_.kv_heads;
      cache.head_dim = D;
      cache.block_tokens = cfg_.block_tokens;
      cache.dtype = cfg_.kv_dtype;
      // Each sequence writes its own blocks (a shared block is never written: step() checks).
      over_items(int64_t(att_seqs.size()), 4,
                 [&](int64_t i0, int64_t n) { kv_cache_write(cache, att_seqs.data() + i0, n, k, v); });
      attention(cache, att_seqs.data(), int64_t(att_seqs.size()), ap, q, att);
      clock.to(StepPhase::Attention);
      L.o.forward(att, NQ, T, y, H, threads);
      clock.to(StepPhase::Output);
      check_cancel(cancel);
      // The residual, and the MLP's input.
      over_tokens(T, [&](int64_t t0, int64_t n) {
        for (int64_t i = t0 * H; i < (t0 + n) * H; i++) x[i] += y[i];
        rms_norm(x + t0 * H, n, H, H, L.ffn_norm.data(), cfg_.rms_eps, xn + t0 * H, H);
      });
      clock.to(StepPhase::Other);
      if (L.moe) {
        L.moe->forward(xn, T, y, cancel);
        over_tokens(T, [&](int64_t t0, int64_t n) {
          for (int64_t i = t0 * H; i < (t0 + n) * H; i++) x[i] += y[i];
        });
        if (L.shared) {
          float* y2 = w.grow(w.y2, T * H);
          L.shared->forward(xn, T, y2, cancel);
          float* g = w.grow(w.gate, T);
          if (cfg_.shared_gate) {
            L.shared_gate.forward(xn, H, T, g, 1, threads);
            for (int64_t t = 0; t < T; t++) g[t] = sigmoid(g[t]);
          } else {
            std::fill(g, g + T, 1.0f);
          }
          for (int64_t t = 0; t < T; t++)
            for (int64_t h = 0; h < H; h++) x[t * H + h] += g[t] * y2[t * H + h];
        }
      } else {
        L.shared->forward(xn, T, y, cancel);
        for (int64_t i = 0; i < T * H; i++) x[i] += y[i];
      }
      clock.to(StepPhase::Mlp);
    }
    check_cancel(cancel);
    // The rows whose logits are asked for: final norm, then the LM head.
    float* out_rows = w.grow(w.out_rows, logit_rows(seqs, num_seqs) * H);
    int64_t R = 0;
    row = 0;
    for (int64_t i = 0; i < num_seqs; i++) {
      const int64_t c = seqs[i].count;
      const int64_t first = seqs[i].all_logits ? 0 : c - 1;
      for (int64_t j = std::max<int64_t>(first, 0); j < c; j++, R++)
        std::memcpy(out_rows + R * H, x + (row + j) * H, size_t(H) * sizeof(float));
      row += c;
    }
    clock.to(StepPhase::Other);
    rms_norm(out_rows, R, H, H, final_norm_.data(), cfg_.rms_eps, out_rows, H);
    lm_head_.forward(out_rows, H, R, logits, cfg_.vocab, threads);
    clock.to(StepPhase::LmHead);
  }

  DecoderConfig cfg_;
  const KernelSet* kernels_;
  KvBlockPool pool_;
  std::vector<Layer> layers_;
  PackedLinear lm_head_;
  AlignedBuffer embedding_;
  bool embedding_set_ = false, lm_head_set_ = false;
  std::vector<float> final_norm_;
  size_t cache_bytes_ = 0;
  std::map<int64_t, Sequence> sequences_;
  int64_t next_id_ = 1;
  StepWorkspace work_;
  // step_times(): read from the JavaScript thread while a step may run.
  std::array<std::atomic<uint64_t>, size_t(StepPhase::Count)> phase_ns_{};
  std::atomic<uint64_t> steps_{0}, step_tokens_{0};
};

}  // namespace

std::unique_ptr<Decoder> make_cpu_decoder(const DecoderConfig& cfg) {
  try {  // the constructor checks the config first (checked_cache_blocks)
    return std::make_unique<CpuDecoder>(cfg);
  } catch (const std::bad_alloc&) {
    fail(ErrorCode::OutOfMemory, "not enough memory for the model");
  }
}

}  // namespace fmoe
