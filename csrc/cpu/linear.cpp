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

void PackedLinear::forward(const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy, int threads) const {
  if (M == 0) return;
  ThreadPool& pool = ThreadPool::instance();
  const int64_t P = kernels_->panel;
  // Column tiles of whole panels, 16 per thread so uneven speeds even out: a thread that finishes first
  // waits for at most one tile of the other (a 151936-row LM head in 8 tiles kept it idle up to 1/8 of
  // the call). Tiles are multiples of tile_panels() (kernels.h).
  const int64_t nthreads = std::max(1, pool.size());
  const int64_t panels = (out_ + P - 1) / P;
  const int64_t U = tile_panels().load(std::memory_order_relaxed);
  const int64_t tiles = std::max<int64_t>(1, std::min<int64_t>((panels + U - 1) / U, 16 * nthreads));
  const int64_t per = ((panels + tiles - 1) / tiles + U - 1) / U * U;
  const ActEpoch epoch = new_activation_epoch();  // x is this call's input: no earlier packed copy serves
  const bool traced = timeline::recording();
  pool.parallel_for(tiles, 1, threads, [&](int64_t b, int64_t e, int worker) {
    for (int64_t t = b; t < e; t++) {
      const int64_t o0 = t * per * P, o1 = std::min(out_, (t + 1) * per * P);
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
