#include "linear.h"

#include <algorithm>
#include <cstring>

#include "../core/error.h"
#include "../core/thread_pool.h"
#include "../core/timeline.h"

namespace fmoe {

PackedLinear::PackedLinear(const KernelSet* kernels, int64_t out, int64_t in, DType dt, Quant q, int64_t group,
                           const char* what)
    : kernels_(kernels), out_(out), in_(in), dt_(dt), q_(q), group_(group) {
  if (out <= 0 || in <= 0) fail(ErrorCode::Invalid, std::string(what) + ": sizes must be positive");
  bytes_ = q != Quant::None ? kernels->w2_quant_bytes(out, in, q, group) : kernels->w2_packed_bytes(out, in, dt);
  packed_ = alloc_aligned(bytes_, what);
}

void PackedLinear::pack(const std::vector<const void*>& parts, const std::vector<int64_t>& rows) {
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  if (parts.size() != rows.size() || total != out_) fail(ErrorCode::Internal, "PackedLinear::pack: rows do not add up");
  const void* src = parts[0];
  std::vector<uint8_t> joined;
  if (parts.size() > 1) {
    // The packers read one row-major matrix; the stacked parts are joined once, at load.
    const size_t row_bytes = size_t(in_) * dtype_size(dt_);
    joined.resize(size_t(out_) * row_bytes);
    size_t at = 0;
    for (size_t i = 0; i < parts.size(); i++) {
      std::memcpy(joined.data() + at, parts[i], size_t(rows[i]) * row_bytes);
      at += size_t(rows[i]) * row_bytes;
    }
    src = joined.data();
  }
  if (q_ != Quant::None)
    kernels_->pack_w2_quant(src, out_, in_, dt_, q_, group_, packed_.get());
  else
    kernels_->pack_w2(src, out_, in_, dt_, packed_.get());
}

// The column tiles of forward(), as their first panels (and the end): with `limit` threads, each
// thread's share of the panels (whole tile_panels() units) is cut into tiles of a quarter of what is left
// of it, at least one unit: long tiles first, short ones last. A thread starts on its own share and, done,
// takes tiles from the back of the other's (thread_pool.h), so the calls end within one short tile of
// each other, while most bytes stream in long tiles, whose starts cost the most (each starts its memory
// streams afresh). Against 16 equal tiles a thread, a decode step (`node bench/ab-model.js MODEL int4 build
// OLD NEW`, both orders, Zen 5, 2 cores): one Qwen3 int4 stream 0.972 (Q/K/V 0.961, output 0.956, LM head
// 0.948), one Mixtral int4 stream 0.992 (output 0.941, LM head 0.982); through a run-time switch, Qwen3
// bf16 0.988 (LM head 0.975), 16 Mixtral int4 streams 0.990, a 512-token Qwen3 prompt 1.002. Matrices
// too small for two units a thread keep up to 16 equal tiles a thread.
static std::vector<int64_t> column_tiles(int64_t panels, int64_t U, int64_t limit) {
  std::vector<int64_t> starts;
  const int64_t units = panels / U;  // whole units; the panels left over go to the last tile
  if (units < 2 * limit) {
    const int64_t tiles = std::max<int64_t>(1, std::min<int64_t>((panels + U - 1) / U, 16 * limit));
    const int64_t per = ((panels + tiles - 1) / tiles + U - 1) / U * U;
    for (int64_t t = 0; t * per < panels; t++) starts.push_back(t * per);
  } else {
    std::vector<int64_t> sizes;  // one share's tiles, in units: the same for every share
    for (int64_t left = units / limit; left > 0;) {
      const int64_t t = (left + 3) / 4;
      sizes.push_back(t);
      left -= t;
    }
    int64_t at = 0;
    for (int64_t w = 0; w < limit; w++) {
      // units % limit shares take one unit more, in their first tile.
      const int64_t extra = w < units % limit ? 1 : 0;
      for (size_t i = 0; i < sizes.size(); i++) {
        starts.push_back(at * U);
        at += sizes[i] + (i == 0 ? extra : 0);
      }
    }
  }
  starts.push_back(panels);
  return starts;
}

void PackedLinear::forward(const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy, int threads) const {
  if (M == 0) return;
  ThreadPool& pool = ThreadPool::instance();
  const int64_t P = kernels_->panel;
  const int64_t panels = (out_ + P - 1) / P;
  // Cut for the threads parallel_for splits the tiles among, so that each share is whole tiles.
  const std::vector<int64_t> starts =
      column_tiles(panels, tile_panels().load(std::memory_order_relaxed), pool.threads_for(threads));
  const int64_t tiles = int64_t(starts.size()) - 1;
  const ActEpoch epoch = new_activation_epoch();  // x is this call's input: no earlier packed copy serves
  const bool traced = timeline::recording();
  pool.parallel_for(tiles, 1, threads, [&](int64_t b, int64_t e, int worker) {
    for (int64_t t = b; t < e; t++) {
      const int64_t o0 = starts[size_t(t)] * P, o1 = std::min(out_, starts[size_t(t) + 1] * P);
      if (o0 >= o1) continue;
      const int64_t t0 = traced ? timeline::now() : 0;
      if (q_ != Quant::None)
        kernels_->down_quant(x, ldx, M, out_, in_, packed_.get(), q_, group_, o0, o1, y, ldy, epoch);
      else
        kernels_->down(x, ldx, M, out_, in_, packed_.get(), dt_, o0, o1, y, ldy, epoch);
      if (traced)  // whole panels, each bytes_ / panels
        timeline::record(timeline::Kind::Item, worker, t0, timeline::now(),
                         int64_t(bytes_ / size_t(panels)) * ((o1 - o0 + P - 1) / P), int(M));
    }
  });
}

}  // namespace fmoe
