// The CPU backend: the MoE pipeline of docs/ARCHITECTURE.md over the kernel set chosen at start-up.
//
// Per chunk of tokens: gate logits -> route -> dispatch by expert -> gather each expert's tokens ->
// SwiGLU (w1, w3) -> down (w2) -> combine in token order. The two expert phases are split over
// (expert, column tile) items on the shared pool. A shared expert is a one-expert layer of its own
// (same packing and kernels) run over the whole chunk, its output added in the combine.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "../core/backend.h"
#include "../core/dispatch.h"
#include "../core/error.h"
#include "../core/memory.h"
#include "../core/routing.h"
#include "../core/thread_pool.h"
#include "../core/timeline.h"
#include "buffers.h"
#include "kernels.h"

namespace fmoe {
namespace {

// Workspace bound per forward chunk: long inputs are processed in chunks so memory stays bounded.
constexpr size_t kChunkWorkspaceBytes = size_t(128) << 20;
// Work per pool job: a few milliseconds of FMAs, or of weights streamed from memory, the longest another
// layer's request waits for the cores.
constexpr double kJobFlops = 2.0e9;
constexpr double kJobBytes = 256.0 * (1 << 20);
// Weight bytes per item at most: a few dozen microseconds of streaming, the longest a thread that has
// run out of items waits at the end of a job for another thread's last one.
constexpr double kItemBytes = 2.0 * (1 << 20);
// Items per thread over an expert phase, at least. Only a phase of few rows over small experts has
// fewer items than that by the bounds above (one Qwen3-30B-A3B token: 8 experts of 1.8 MB for w1/w3 and
// 0.9 MB for w2). There each item is a few memory streams a thread starts cold, so one item an expert
// reads faster than four: the MoE part of one Qwen3 int4 stream's step 0.961 twice (`bench/ab-model.js`
// with a trial switch, Zen 5, 2 cores), int8 0.990; 8 a thread 0.975; two builds, both orders, 0.980
// and 0.996 (step 0.990). It was 16.
constexpr int64_t kItemsPerThread = 4;

struct WorkItem {
  int64_t expert, begin, end;
};

class CpuBackend final : public Backend {
 public:
  // Checks the config and the memory and allocates the packed copy; CpuBuilder fills it.
  explicit CpuBackend(const MoeConfig& cfg) : cfg_(cfg), kernels_(select_kernels()) {
    validate_config(cfg);
    const int64_t H = cfg.hidden, F = cfg.intermediate, E = cfg.num_experts;
    const DType dt = cfg.weight_dtype;
    const Quant q = cfg.quant;
    const int64_t g = cfg.quant_group;
    const bool quant = q != Quant::None;
    w13_bytes_ = quant ? kernels_->w13_quant_bytes(H, F, q, g) : kernels_->w13_packed_bytes(H, F, dt);
    w2_bytes_ = quant ? kernels_->w2_quant_bytes(H, F, q, g) : kernels_->w2_packed_bytes(H, F, dt);
    check_memory_available(size_t(E) * (w13_bytes_ + w2_bytes_), "the layer's packed weights");
    // One copy of the weights, every expert in one mapping (w1/w3 then w2, each on a cache line): an
    // expert of a fine-grained family is a few MiB or less, which on a mapping of its own sat on 4 KiB
    // pages, and its decode kernels ran at a third of the huge-page speed per byte. The pages are
    // touched as the builder packs into them.
    w13_bytes_ = line_up(w13_bytes_);
    w2_bytes_ = line_up(w2_bytes_);
    experts_ = alloc_aligned(size_t(E) * (w13_bytes_ + w2_bytes_), "the layer's packed experts");
    if (cfg.shared_intermediate > 0) {
      shared_ = std::make_unique<CpuBackend>(shared_expert_config(cfg));
      shared_->set_gate(std::vector<float>(size_t(H), 0.0f).data());  // one expert: its weight is 1
    }
    const size_t per_token = size_t(cfg.top_k) * size_t(2 * H + F) * sizeof(float) + size_t(E) * 8 +
                             (shared_ ? size_t(3 * H + cfg.shared_intermediate) * sizeof(float) : 0);
    chunk_tokens_ = std::max<int64_t>(16, int64_t(kChunkWorkspaceBytes / per_token));
  }

  // The shared expert as a layer: one expert of width Fs that every token picks with weight 1.
  static MoeConfig shared_expert_config(const MoeConfig& cfg) {
    MoeConfig c;
    c.hidden = cfg.hidden;
    c.intermediate = cfg.shared_intermediate;
    c.num_experts = 1;
    c.top_k = 1;
    c.weight_dtype = cfg.weight_dtype;
    c.threads = cfg.threads;
    c.quant = cfg.quant;
    c.quant_group = cfg.quant_group;
    return c;
  }

  void check_weights(const WeightsView& w) const {
    const int64_t E = cfg_.num_experts;
    if (!w.gate || int64_t(w.w1.size()) != E || int64_t(w.w3.size()) != E || int64_t(w.w2.size()) != E)
      fail(ErrorCode::Shape, "weights: expected gate and " + std::to_string(E) + " w1, w3 and w2 arrays");
    if (shared_ && (!w.shared_w1 || !w.shared_w3 || !w.shared_w2))
      fail(ErrorCode::Shape, "weights: expected the shared expert's w1, w3 and w2 (sharedIntermediateSize > 0)");
    if (cfg_.shared_gate && !w.shared_gate)
      fail(ErrorCode::Shape, "weights: expected the shared expert's gate (sharedGate)");
  }

  // A router of bf16 values (every bf16 checkpoint's, widened on load) is kept as bf16: half the bytes a
  // decode step reads from it (Qwen3-30B: 0.5 MiB a layer instead of 1), and the same logits, bit for
  // bit, as the kernels widen each value exactly (routing.h gate_logits_bf16).
  void set_gate(const float* gate) {
    const size_t n = size_t(cfg_.num_experts * cfg_.hidden);
    const bool bf16 = std::all_of(gate, gate + n, [](float v) {
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof bits);
      return (bits & 0xffffu) == 0;
    });
    gate_.clear();
    gate_bf16_.clear();
    if (bf16) {
      gate_bf16_.resize(n);
      for (size_t i = 0; i < n; i++) {
        uint32_t bits;
        std::memcpy(&bits, gate + i, sizeof bits);
        gate_bf16_[i] = uint16_t(bits >> 16);
      }
    } else {
      gate_.assign(gate, gate + n);
    }
  }

  // The router's extras beside the gate: the choice bias and the shared expert's gate (either may be null).
  void set_router_extras(const float* score_bias, const float* shared_gate) {
    if (score_bias) bias_.assign(score_bias, score_bias + cfg_.num_experts);
    if (shared_gate && cfg_.shared_gate) shared_gate_.assign(shared_gate, shared_gate + cfg_.hidden);
  }

  CpuBackend* shared() const { return shared_.get(); }

  // Packs rows [row, row + n) of expert e's w1/w3 (part 0, rows along F) or w2 (part 1, rows along H),
  // row a multiple of the kernels' panel: panels depend only on their own rows, so a slice of rows is
  // the same panels packed from a shorter matrix, written at its panels' place.
  void pack_rows(const WeightsView& w, int64_t e, int part, int64_t row, int64_t n) {
    const int64_t H = cfg_.hidden, F = cfg_.intermediate, P = kernels_->panel;
    const DType dt = cfg_.weight_dtype;
    const Quant q = cfg_.quant;
    const int64_t g = cfg_.quant_group;
    const size_t es = dtype_size(dt);
    if (part == 0) {
      const size_t panel =
          q != Quant::None ? kernels_->w13_quant_bytes(H, P, q, g) : kernels_->w13_packed_bytes(H, P, dt);
      const char* w1 = static_cast<const char*>(w.w1[e]) + size_t(row) * size_t(H) * es;
      const char* w3 = static_cast<const char*>(w.w3[e]) + size_t(row) * size_t(H) * es;
      char* dst = w13_of(e) + size_t(row / P) * panel;
      if (q != Quant::None)
        kernels_->pack_w13_quant(w1, w3, H, n, dt, q, g, dst);
      else
        kernels_->pack_w13(w1, w3, H, n, dt, dst);
    } else {
      const size_t panel =
          q != Quant::None ? kernels_->w2_quant_bytes(P, F, q, g) : kernels_->w2_packed_bytes(P, F, dt);
      const char* w2 = static_cast<const char*>(w.w2[e]) + size_t(row) * size_t(F) * es;
      char* dst = w2_of(e) + size_t(row / P) * panel;
      if (q != Quant::None)
        kernels_->pack_w2_quant(w2, n, F, dt, q, g, dst);
      else
        kernels_->pack_w2(w2, n, F, dt, dst);
    }
  }

  std::string name() const override { return "cpu"; }
  std::string kernel_name() const override { return kernels_->name; }
  size_t native_bytes() const override {
    return size_t(cfg_.num_experts) * (w13_bytes_ + w2_bytes_) +
           (gate_.size() + bias_.size() + shared_gate_.size()) * sizeof(float) + gate_bf16_.size() * sizeof(uint16_t) +
           (shared_ ? shared_->native_bytes() : 0);
  }
  const MoeConfig& config() const override { return cfg_; }
  void add_routed_tokens(uint64_t* counts) const override {
    for (size_t e = 0; e < routed_.size(); e++) counts[e] += routed_[e].load(std::memory_order_relaxed);
  }
  int64_t panel() const { return kernels_->panel; }

  void route(const float* x, int64_t T, int32_t* experts, float* weights) override {
    const int64_t E = cfg_.num_experts;
    std::vector<float> logits;
    for (int64_t t0 = 0; t0 < T; t0 += chunk_tokens_) {
      const int64_t n = std::min(chunk_tokens_, T - t0);
      logits.resize(size_t(n * E));
      compute_logits(x + t0 * cfg_.hidden, n, logits.data());
      route_topk(logits.data(), n, route_spec(), experts + t0 * cfg_.top_k, weights + t0 * cfg_.top_k);
    }
  }

  void forward(const float* x, int64_t T, float* out, const CancelFlag* cancel) override {
    for (int64_t t0 = 0; t0 < T; t0 += chunk_tokens_) {
      if (cancel && cancel->load()) fail(ErrorCode::Aborted, "the operation was aborted");
      const int64_t n = std::min(chunk_tokens_, T - t0);
      forward_chunk(x + t0 * cfg_.hidden, n, out + t0 * cfg_.hidden, cancel);
    }
  }

 private:
  int threads() const { return cfg_.threads; }
  // Chunks of the per-token steps (the gather of the experts' rows, the combine): two a thread, of 4 to
  // 16 tokens. At 16 streams one chunk of 16 left the combine, 37 µs a layer, to the calling thread
  // while the others waited (`node bench/timeline.js mixtral int4 12 16 --layout`). Up to 4 tokens run
  // inline (parallel_for runs n <= chunk on the caller): less than a job's hand-off costs.
  int64_t token_chunk(int64_t n) const { return ThreadPool::instance().chunk_for(n, threads(), 4, 16); }
  RouteSpec route_spec() const { return fmoe::route_spec(cfg_, bias_.empty() ? nullptr : bias_.data()); }

  // Split over tokens, or at decode over experts, so that one thread does not read the whole router
  // (1 MiB for 128 experts of 2048) while the others wait. At decode each thread takes two long ranges
  // of experts, each read as four streams (one token: the kernel set's router kernel, gate_streams in
  // kernels_simd.h; a few: gate_logits); over tokens, the kernel set's router kernel takes up to 32
  // tokens a call, each read of the router's rows shared by four of them. The ranges are the
  // timeline's items (timeline.h), as the router streams from memory at decode.
  void compute_logits(const float* x, int64_t T, float* logits) {
    const int64_t H = cfg_.hidden, E = cfg_.num_experts;
    ThreadPool& pool = ThreadPool::instance();
    const int64_t n = std::max(1, std::min(threads() > 0 ? threads() : pool.size(), pool.size()));
    const bool bf16 = !gate_bf16_.empty();
    if (T >= 4 * int64_t(pool.size())) {
      const int64_t chunk = std::min<int64_t>(32, std::max<int64_t>(8, T / (2 * n)));
      pool.parallel_for(T, chunk, threads(), [&](int64_t b, int64_t e, int) {
        if (bf16 && kernels_->gate_logits_bf16)
          kernels_->gate_logits_bf16(x + b * H, e - b, H, gate_bf16_.data(), E, logits + b * E);
        else if (bf16)
          gate_logits_bf16(x + b * H, e - b, H, gate_bf16_.data(), E, logits + b * E);
        else if (kernels_->gate_logits)
          kernels_->gate_logits(x + b * H, e - b, H, gate_.data(), E, logits + b * E);
        else
          gate_logits(x + b * H, e - b, H, gate_.data(), E, logits + b * E);
      });
    } else {
      const int64_t chunk = std::max<int64_t>(16, (E + 2 * n - 1) / (2 * n));
      const bool traced = timeline::recording();
      pool.parallel_for(E, chunk, threads(), [&](int64_t b, int64_t e, int worker) {
        const int64_t t0 = traced ? timeline::now() : 0;
        if (T == 1 && bf16 && kernels_->gate_logits_bf16)
          kernels_->gate_logits_bf16(x, 1, H, gate_bf16_.data() + b * H, e - b, logits + b);
        else if (T == 1 && !bf16 && kernels_->gate_logits)
          kernels_->gate_logits(x, 1, H, gate_.data() + b * H, e - b, logits + b);
        else if (bf16)
          gate_logits_bf16(x, T, H, gate_bf16_.data() + b * H, e - b, logits + b, E);
        else
          gate_logits(x, T, H, gate_.data() + b * H, e - b, logits + b, E);
        if (traced)
          timeline::record(timeline::Kind::Item, worker, t0, timeline::now(), (e - b) * H * (bf16 ? 2 : 4), 0);
      });
    }
  }

  // Splits each expert's columns [0, cols) into tiles so every thread gets several items: at least 4 per
  // thread over the phase (kItemsPerThread), and by FLOPs at least 8 per thread in a full bounded job
  // (run_bounded), so the last item of a job leaves the other threads idle for a small fraction of it. An item is
  // bounded in FLOPs and in weight bytes: at a few rows per expert the bytes take the time, and an expert that one
  // token picked, split by its share of the rows alone, made items of tens of MiB. Tiles are multiples of tile_panels()
  // where the columns and the item cap allow (kernels.h; below); the activations of an expert are packed once per
  // thread and phase, whatever the tile (kernels.h), so small tiles cost little.
  std::vector<WorkItem> tile_items(const Dispatch& d, int64_t cols, int64_t total_rows, int64_t flops_per_cell,
                                   double bytes_per_col) const {
    const int64_t P = kernels_->panel;
    const int64_t nthreads = std::max(1, ThreadPool::instance().size());
    const double item_cap = kJobFlops / double(8 * nthreads);
    std::vector<WorkItem> items;
    for (int64_t e = 0; e < cfg_.num_experts; e++) {
      const int64_t rows = d.offsets[e + 1] - d.offsets[e];
      if (rows == 0) continue;
      const double flops = double(rows) * double(cols) * double(flops_per_cell);
      const int64_t want = std::max<int64_t>({1, (kItemsPerThread * nthreads * rows + total_rows - 1) / total_rows,
                                              int64_t(std::ceil(flops / item_cap)),
                                              int64_t(std::ceil(double(cols) * bytes_per_col / kItemBytes))});
      int64_t tile = (cols + want - 1) / want;
      const int64_t U = tile_panels().load(std::memory_order_relaxed);
      // Units of U panels only where one stays within item_cap: at a prefill's rows a single unit can
      // exceed it (a Mixtral expert's w1/w3 at 128 rows: 268 MFLOP against 125), and a 2-GFLOP job then
      // held 2 to 4 items a thread, the last of which left the other thread waiting. Single panels there:
      // `bench/ab-builds.js OLD NEW mixtral-prefill-bf16` 0.947 (Zen 4, 2 cores); a Mixtral 512-token
      // prompt (`bench/ab-model.js mixtral QUANT build OLD NEW 4 --prompt 512`, both orders) bf16 0.928,
      // int4 0.973. Decode's few rows keep the wide units.
      const bool wide = double(rows) * double(U * P) * double(flops_per_cell) <= item_cap;
      const int64_t unit = cols >= 2 * U * P && wide ? U * P : P;
      tile = std::max<int64_t>(unit, (tile + unit - 1) / unit * unit);
      for (int64_t c = 0; c < cols; c += tile) items.push_back({e, c, std::min(cols, c + tile)});
    }
    return items;
  }

  // Runs the items as several pool jobs of bounded work (about kJobFlops or kJobBytes each), so a request
  // on another layer waits for at most one such job, and a cancelled request stops between them. Each
  // job still holds enough items to keep every thread busy. flops_per_cell: FLOPs per (row, column) of
  // an item; bytes_per_col: weight bytes per column. fn(item, first row, rows, epoch): every item of the
  // phase gets the same activation epoch (kernels.h).
  template <typename Fn>
  void run_bounded(const std::vector<WorkItem>& items, const Dispatch& d, int64_t flops_per_cell, double bytes_per_col,
                   const CancelFlag* cancel, const Fn& fn) {
    ThreadPool& pool = ThreadPool::instance();
    const ActEpoch epoch = new_activation_epoch();  // this phase's input is written: earlier copies are stale
    const size_t min_items = size_t(2 * pool.size());
    size_t begin = 0;
    while (begin < items.size()) {
      if (cancel && cancel->load()) fail(ErrorCode::Aborted, "the operation was aborted");
      size_t end = begin;
      double flops = 0, bytes = 0;
      while (end < items.size() && (end - begin < min_items || (flops < kJobFlops && bytes < kJobBytes))) {
        const WorkItem& it = items[end++];
        flops += double(d.offsets[it.expert + 1] - d.offsets[it.expert]) * double(it.end - it.begin) *
                 double(flops_per_cell);
        bytes += double(it.end - it.begin) * bytes_per_col;
      }
      const bool traced = timeline::recording();
      pool.parallel_for(int64_t(end - begin), 1, threads(), [&](int64_t b, int64_t e, int worker) {
        for (int64_t i = b; i < e; i++) {
          const WorkItem& it = items[begin + size_t(i)];
          const int64_t r0 = d.offsets[it.expert], rows = d.offsets[it.expert + 1] - r0;
          const int64_t t0 = traced ? timeline::now() : 0;
          fn(it, r0, rows, epoch);
          if (traced)
            timeline::record(timeline::Kind::Item, worker, t0, timeline::now(),
                             std::llround(double(it.end - it.begin) * bytes_per_col), int(rows));
        }
      });
      begin = end;
    }
  }

  void forward_chunk(const float* x, int64_t T, float* out, const CancelFlag* cancel) {
    const int64_t H = cfg_.hidden, F = cfg_.intermediate, E = cfg_.num_experts, k = cfg_.top_k;
    const DType dt = cfg_.weight_dtype;
    const int64_t R = T * k;  // rows: (token, pick) pairs
    std::vector<float> logits(static_cast<size_t>(T * E)), weights(static_cast<size_t>(R));
    std::vector<int32_t> experts(static_cast<size_t>(R));
    compute_logits(x, T, logits.data());
    route_topk(logits.data(), T, route_spec(), experts.data(), weights.data());
    Dispatch d;
    dispatch_by_expert(experts.data(), T, k, E, d);
    // Only the experts that got tokens: 128 atomic adds a layer took about 1 µs at one token.
    for (int64_t e = 0; e < E; e++)
      if (const int64_t n = d.offsets[size_t(e) + 1] - d.offsets[size_t(e)]; n > 0)
        routed_[size_t(e)].fetch_add(uint64_t(n), std::memory_order_relaxed);

    // One workspace: gathered tokens [R, H], SwiGLU activations [R, F], expert outputs [R, H], and the
    // shared expert's outputs [T, H]; each part starts on a cache line.
    auto line = [](int64_t n) { return (n + 15) / 16 * 16; };
    const int64_t shared_floats = shared_ ? line(T * H) : 0;
    Workspace ws(size_t(2 * line(R * H) + line(R * F) + shared_floats) * sizeof(float), "the MoE workspace");
    float* xs = ws.floats();
    float* act = xs + line(R * H);
    float* ys = act + line(R * F);
    float* shared_y = shared_ ? ys + line(R * H) : nullptr;
    std::vector<int64_t> position(static_cast<size_t>(R));  // row t*k+j -> its place in expert order
    // One token: every expert's single row is the token itself, so the experts read x where it is: no
    // copies, and each thread packs it once for all its experts (same pointer, same epoch). One Qwen3
    // layer at one token, `bench/ab-builds.js OLD NEW qwen3-decode-int4 200 32`: 0.958, 1 / 1.068 the
    // other way round.
    const bool one_token = T == 1;
    ThreadPool& pool = ThreadPool::instance();
    for (int64_t i = 0; i < R; i++) position[size_t(d.rows[i])] = i;
    if (!one_token)
      pool.parallel_for(R, token_chunk(R), threads(), [&](int64_t b, int64_t e, int) {
        for (int64_t i = b; i < e; i++) std::memcpy(xs + i * H, x + (d.rows[i] / k) * H, size_t(H) * sizeof(float));
      });
    auto rows_of = [&](int64_t r0) { return one_token ? x : xs + r0 * H; };

    const double up_bytes = double(w13_bytes_) / double(F), down_bytes = double(w2_bytes_) / double(H);
    std::vector<WorkItem> up = tile_items(d, F, R, 2 * 2 * H, up_bytes);
    const Quant q = cfg_.quant;
    const int64_t g = cfg_.quant_group;
    run_bounded(up, d, 2 * 2 * H, up_bytes, cancel, [&](const WorkItem& it, int64_t r0, int64_t rows, ActEpoch epoch) {
      if (q != Quant::None)
        kernels_->swiglu_quant(rows_of(r0), H, rows, H, F, w13_of(it.expert), q, g, it.begin, it.end, act + r0 * F, F,
                               epoch);
      else
        kernels_->swiglu(rows_of(r0), H, rows, H, F, w13_of(it.expert), dt, it.begin, it.end, act + r0 * F, F, epoch);
    });
    std::vector<WorkItem> downs = tile_items(d, H, R, 2 * F, down_bytes);
    run_bounded(downs, d, 2 * F, down_bytes, cancel, [&](const WorkItem& it, int64_t r0, int64_t rows, ActEpoch epoch) {
      if (q != Quant::None)
        kernels_->down_quant(act + r0 * F, F, rows, H, F, w2_of(it.expert), q, g, it.begin, it.end, ys + r0 * H, H,
                             epoch);
      else
        kernels_->down(act + r0 * F, F, rows, H, F, w2_of(it.expert), dt, it.begin, it.end, ys + r0 * H, H, epoch);
    });
    // The shared expert over every token, and its per-token gate sigmoid(shared_gate . x).
    std::vector<float> shared_logit;
    if (shared_) {
      shared_->forward_chunk(x, T, shared_y, cancel);
      if (!shared_gate_.empty()) {
        shared_logit.resize(size_t(T));
        pool.parallel_for(T, 16, threads(), [&](int64_t b, int64_t e, int) {
          gate_logits(x + b * H, e - b, H, shared_gate_.data(), 1, shared_logit.data() + b);
        });
      }
    }
    // Combine: gather-reduce in pick order, then the shared expert, one token at a time, so the sum
    // order never changes.
    pool.parallel_for(T, token_chunk(T), threads(), [&](int64_t b, int64_t e, int) {
      for (int64_t t = b; t < e; t++) {
        float* o = out + t * H;
        const float* y0 = ys + position[size_t(t * k)] * H;
        const float w0 = weights[size_t(t * k)];
        for (int64_t h = 0; h < H; h++) o[h] = w0 * y0[h];
        for (int64_t j = 1; j < k; j++) {
          const float* yj = ys + position[size_t(t * k + j)] * H;
          const float wj = weights[size_t(t * k + j)];
          for (int64_t h = 0; h < H; h++) o[h] += wj * yj[h];
        }
        if (shared_y) {
          const float* ys_t = shared_y + t * H;
          const float ws =
              shared_logit.empty() ? 1.0f : float(1.0 / (1.0 + std::exp(-double(shared_logit[size_t(t)]))));
          for (int64_t h = 0; h < H; h++) o[h] += ws * ys_t[h];
        }
      }
    });
  }

  WorkspaceUser workspace_user_;  // first member: the pool outlives every forward of this layer
  MoeConfig cfg_;
  // Tokens each expert received (telemetry); relaxed atomics, as forwards may run at once.
  std::vector<std::atomic<uint64_t>> routed_ = std::vector<std::atomic<uint64_t>>(size_t(cfg_.num_experts));
  const KernelSet* kernels_;
  std::vector<float> gate_, bias_, shared_gate_;
  std::vector<uint16_t> gate_bf16_;      // the router instead of gate_ where every value is a bf16 value
  std::unique_ptr<CpuBackend> shared_;   // the shared expert, or null
  AlignedBuffer experts_;                // expert e: w1/w3 at e * (w13_bytes_ + w2_bytes_), then w2
  size_t w13_bytes_ = 0, w2_bytes_ = 0;  // per expert, each a whole number of cache lines
  static size_t line_up(size_t n) { return (n + 63) / 64 * 64; }
  char* w13_of(int64_t e) const { return static_cast<char*>(experts_.get()) + size_t(e) * (w13_bytes_ + w2_bytes_); }
  char* w2_of(int64_t e) const { return w13_of(e) + w13_bytes_; }
  int64_t chunk_tokens_ = 256;
};

// Packs expert by expert, each matrix in slices of rows of about kSliceBytes of source, checking the
// clock between slices.
class CpuBuilder final : public LayerBuilder {
 public:
  explicit CpuBuilder(const MoeConfig& cfg) : layer_(new CpuBackend(cfg)) {
    const int64_t H = cfg.hidden, F = cfg.intermediate;
    total_ = double(cfg.num_experts) * double(3 * H * F) + double(3 * H * cfg.shared_intermediate);
    units_ = cfg.num_experts + (cfg.shared_intermediate > 0 ? 1 : 0);
  }

  bool step(const WeightsView& w, double max_seconds) override {
    if (!layer_) fail(ErrorCode::Internal, "the layer builder was already finished");
    layer_->check_weights(w);
    if (!gate_done_) {
      layer_->set_gate(w.gate);
      layer_->set_router_extras(w.score_bias, w.shared_gate);
      gate_done_ = true;
    }
    const MoeConfig& cfg = layer_->config();
    const int64_t H = cfg.hidden, E = cfg.num_experts;
    const int64_t P = layer_->panel();
    const size_t es = dtype_size(cfg.weight_dtype);
    // Unit E is the shared expert: expert 0 of its own one-expert layer.
    WeightsView shared_view;
    if (units_ > E) {
      shared_view.w1 = {w.shared_w1};
      shared_view.w3 = {w.shared_w3};
      shared_view.w2 = {w.shared_w2};
    }
    const auto t0 = std::chrono::steady_clock::now();
    while (e_ < units_) {
      const bool shared = e_ == E;
      CpuBackend& target = shared ? *layer_->shared() : *layer_;
      const int64_t F = target.config().intermediate;
      const int64_t rows = part_ == 0 ? F : H;
      const size_t row_bytes = (part_ == 0 ? 2 * size_t(H) : size_t(F)) * es;
      const int64_t slice = std::max<int64_t>(P, int64_t(kSliceBytes / row_bytes) / P * P);
      const int64_t n = std::min(slice, rows - row_);
      target.pack_rows(shared ? shared_view : w, shared ? 0 : e_, part_, row_, n);
      row_ += n;
      done_ += double(n) * double(part_ == 0 ? 2 * H : F);
      if (row_ == rows) {
        row_ = 0;
        part_ ^= 1;
        if (part_ == 0) e_++;
      }
      const std::chrono::duration<double> spent = std::chrono::steady_clock::now() - t0;
      if (spent.count() >= max_seconds) break;
    }
    return e_ == units_;
  }

  double progress() const override { return total_ > 0 ? done_ / total_ : 1.0; }

  void set_router(const float* gate) override {
    if (!layer_) fail(ErrorCode::Internal, "the layer builder was already finished");
    layer_->set_gate(gate);
    gate_done_ = true;
  }

  void pack_expert(int64_t e, const void* w1, const void* w3, const void* w2) override {
    if (!layer_) fail(ErrorCode::Internal, "the layer builder was already finished");
    const MoeConfig& cfg = layer_->config();
    if (e < 0 || e >= cfg.num_experts) fail(ErrorCode::Invalid, "expert " + std::to_string(e) + " is out of range");
    WeightsView w;
    w.w1.assign(size_t(cfg.num_experts), nullptr);
    w.w3.assign(size_t(cfg.num_experts), nullptr);
    w.w2.assign(size_t(cfg.num_experts), nullptr);
    w.w1[size_t(e)] = w1;
    w.w3[size_t(e)] = w3;
    w.w2[size_t(e)] = w2;
    layer_->pack_rows(w, e, 0, 0, cfg.intermediate);
    layer_->pack_rows(w, e, 1, 0, cfg.hidden);
    if (expert_packed_.empty()) expert_packed_.assign(size_t(cfg.num_experts), 0);
    if (!expert_packed_[size_t(e)]) done_ += double(3 * cfg.hidden * cfg.intermediate);
    expert_packed_[size_t(e)] = 1;
  }

  std::unique_ptr<Backend> finish() override {
    if (!layer_) fail(ErrorCode::Internal, "the layer builder was already finished");
    // pack_expert() has no shared expert: a layer with one is complete through step() only.
    const bool all_experts =
        e_ == units_ || (units_ == layer_->config().num_experts && !expert_packed_.empty() &&
                         std::all_of(expert_packed_.begin(), expert_packed_.end(), [](uint8_t p) { return p != 0; }));
    if (!all_experts || !gate_done_) fail(ErrorCode::Internal, "the layer is not fully packed yet");
    return std::move(layer_);
  }

 private:
  static constexpr size_t kSliceBytes = size_t(4) << 20;
  std::unique_ptr<CpuBackend> layer_;
  bool gate_done_ = false;
  std::vector<uint8_t> expert_packed_;  // pack_expert's experts
  int64_t e_ = 0, row_ = 0, units_ = 0;
  int part_ = 0;  // 0: w1/w3, 1: w2
  double done_ = 0, total_ = 0;
};

}  // namespace

std::unique_ptr<LayerBuilder> make_cpu_builder(const MoeConfig& cfg) {
  try {
    return std::make_unique<CpuBuilder>(cfg);
  } catch (const std::bad_alloc&) {
    fail(ErrorCode::OutOfMemory, "not enough memory to build the layer's packed weights");
  }
}

}  // namespace fmoe
