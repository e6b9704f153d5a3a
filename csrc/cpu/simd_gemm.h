// The GEMM driver: tile shapes, the decode / prefill choice, k blocking and the sweep over panels that
// calls the micro-kernels and hands each finished tile to an epilogue.
// Everything sits in an anonymous namespace, as kernels_simd.h explains: each ISA unit gets its own copy.
#pragma once
#include "simd_common.h"
#include "simd_micro.h"
#include "simd_pack_act.h"

namespace fmoe {
namespace simd {
namespace {

// Tile shapes. Accumulators: O::kAcc vector registers (the rest hold weights and a broadcast).
//   prefill: many rows share each weight load; NP panels x MR rows, k blocked by kc so the panels'
//            block stays in L2 while every row block of the call passes over it.
//   decode:  few rows; more panels side by side so enough independent chains hide the FMA latency
//            while the weights stream from memory once (up to kMrDecodeMax rows in one row block).
//   few:     more rows than decode takes but no more than kMrFew: the prefill tile over the whole of k,
//            all rows in one row block, so the weights stream once as in decode (k blocks and the
//            next-block prefetch only pay when several row blocks reuse a block from L2). At 16 tokens
//            of a Mixtral-shaped layer, 3 to 7 rows per expert, `bench/ab-builds.js` on 2 Zen 5 cores:
//            mixtral-16tok-int8 0.72 / 0.78, -bf16 0.86 / 0.90, -int4 0.96; the integer-dot tiles take
//            8 rows here, where their prefill blocks of 6 would split 7 rows into 4 and 3. Its two
//            panels a thread are too few streams for the hardware prefetchers alone: it fetches ahead
//            in them (kFetchAhead, simd_micro.h).
template <class O, int MODE, int NMAT, bool DOT_TILE = is_dot(MODE) && O::kRegs >= 32>
struct Shapes {
  static constexpr int kNpPrefill = 2;
  static constexpr int kMrPrefill = O::kAcc / (NMAT * kNpPrefill);
  static constexpr int kMrFew = kMrPrefill;  // one prefill row block
  static constexpr int kNpDecode = 8 / NMAT;
  static constexpr int kMrDecode = O::kAcc / 8 > 0 ? O::kAcc / 8 : 1;
  static constexpr int kMrDecodeMax = kMrDecode;  // rows the decode panels take in one row block
  static constexpr int kNpOneRow = kNpDecode;     // panels of the one-row tile (sweep_streams)
  // The float modes' decode tiles (sweep_streams with kFetchNear, simd_micro.h), on sets with 32
  // registers of 16 lanes: one or two rows on four panels (w1/w3 pairs at two rows: 16 accumulators and
  // 8 weights), three rows on four panel-matrices (12 accumulators). Two and three rows read eight
  // adjacent panel-matrices before: a Mixtral bf16 step new / old in one process (a trial switch
  // through `bench/ab-model.js mixtral none`, Zen 5, 2 cores) 0.913 at 2 streams (Q/K/V, output and LM
  // head 0.78-0.81), 0.919 at 4, 0.969 at 8, 1.001 at 16 (most experts then take 4 rows or more); the
  // avx512 set 0.967 at 2, 0.942 at 4; 16 Qwen3 streams 0.993.
  static constexpr bool kFloatStreams = !is_quant(MODE) && O::kRegs >= 32 && O::W == 16;
  static constexpr int kNpFloatOneRow = 4;
  static constexpr int kNpFloatTwoRows = 4;
  static constexpr int kNpFloatThreeRows = 4 / NMAT;
};
// With 32 registers the integer-dot modes also hold one step's unpacked codes for the whole tile (two
// registers per panel and matrix for int4, one for int8; micro_qdot) and a row's broadcasts, so the
// tiles are narrower. Prefill: two panel-matrices (w13: one panel of both; w2: two panels) of 6 rows;
// with 7 to 12 rows GCC 12 spills accumulators again and the int4 prefill ran slower on 2 Zen 4 cores
// (`bench.js --cases expert-int4-g32` repeats it, kMrPrefill edited). Decode: four panel-matrices of 3 rows,
// and of 4 rows (5 or 6 with VNNI, kMrDecodeMax below) for up to that many: the few shape's narrower
// tile kept fewer bytes of codes in flight. At 16 tokens of a Mixtral-shaped layer (`bench/ab-builds.js`,
// Zen 5, 2 cores): mixtral-16tok-int4 0.93-0.99 over four runs, mixtral-16tok-int8 0.885-0.94 over three.
template <class O, int MODE, int NMAT>
struct Shapes<O, MODE, NMAT, true> {
  static constexpr int kNpPrefill = 2 / NMAT;
  static constexpr int kMrPrefill = 6;
  static constexpr int kNpDecode = 4 / NMAT;
  static constexpr int kMrDecode = 3;
  // The decode panels take 4 rows in one row block (16 accumulators beside the codes), and with a
  // one-instruction dot product (VNNI: O::kDotTemps 1) as many as fit beside one step's codes of all
  // four panel-matrices and a row's broadcast (micro_qdot's kAllCodes): 5 for int4, 6 for int8. Those
  // rows took the few-rows tile before, whose two panel-matrices share each broadcast between two dot
  // products instead of four. `bench/ab-builds.js A B CASE 20 32`, Zen 5, 2 cores, both orders:
  // expert-5tok-int8 0.83 / 0.88, expert-6tok-int8 0.87 / 0.92, mixtral-16tok-int4 0.95-0.98,
  // mixtral-16tok-int8 0.95 / 0.98; expert-5tok-int4 0.98, 1.04, 1.01 (an A/A pair read 0.94-0.99). A
  // decode step of 16 Mixtral streams, new / old with the new build loaded second, then first
  // (`bench/ab-model.js mixtral QUANT build`): int8 0.97 / 0.93, int4 0.95 / 1.065 (geometric mean 1.01:
  // no change). The avx512 set's int8 (three instructions a dot product) ran 5 rows 8-10% slower this
  // way: 4 there.
  static constexpr int kCodeRegs = kNpDecode * NMAT * (MODE == kI4Dot ? 2 : 1);  // as micro_qdot's
  static constexpr int kMrDecodeMax = O::kDotTemps <= 1 ? (O::kRegs - kCodeRegs - 2 - O::kDotTemps) / 4 : 4;
  static constexpr int kMrFew = 8;  // spills a little, less than two passes over the codes cost
  // One row (one token's expert) streams four panels a thread, w1/w3 pairs too: the pairs' two panels
  // a thread read each of their streams slower than the LM head's four (27 against 32 GB/s a thread in
  // a trace of one Qwen3 int4 step), and the one-row tile has registers for four (8 accumulators, 16
  // code registers). `node bench/ab-model.js MODEL int4 build OLD NEW`, both orders, MoE part: Qwen3
  // 0.946 and 0.964, Mixtral 0.916 (Qwen3 int8 0.985; the avx512 set 0.960). Two and three rows on four
  // pairs no longer hold a step's codes in registers and ran slower (Mixtral, 16 streams: 1.033).
  static constexpr int kNpOneRow = 4;
};

// At most this many rows per expert take the decode shape, chosen by measurement (`bench.js --switch`,
// one Mixtral expert, 2 Zen 4 cores): decode wins for M <= 3 (bf16 M=3: 10.5 vs 11.0 ms; f32 M=1: 21.2
// vs 23.7 ms), the prefill shape from M = 4 (bf16 12.6 vs 11.1 ms; f32 25.5 vs 23.0 ms).
// FUSED_MOE_DECODE_ROWS overrides it, for tuning on other machines.
constexpr int kDecodeRows = 3;
inline int decode_rows_limit() {
  static const int limit = [] {
    const char* env = std::getenv("FUSED_MOE_DECODE_ROWS");
    const int v = env ? std::atoi(env) : -1;
    return v >= 0 && v <= 4096 ? v : kDecodeRows;
  }();
  return limit;
}

// The code order (packing.h) a quantized mode reads.
constexpr CodeOrder code_order(int mode) {
  return mode == kI8Vnni ? CodeOrder::Vnni : is_dot(mode) ? CodeOrder::Dot : CodeOrder::Plain;
}

// FETCH: how the micro-kernels fetch ahead (simd_micro.h); with kFetchNext each row block asks for its
// share of the next block of panels (below). epi(c, m0, mr, p0, np, gap) takes a finished tile of mr
// rows from m0 whose panel p is panel p0 + p * gap (gap 1 here).
template <class O, int MODE, int NMAT, int MR, int NP, int FETCH, class Epi>
static void sweep(const char* a, int64_t M, int64_t K, int64_t kc, int64_t gsz, const char* b, size_t pstride,
                  int64_t p_begin, int64_t p_end, Epi&& epi) {
  constexpr int W = O::W;
  constexpr int kg = ModeInfo<MODE>::kg;
  const int64_t Kr = MODE == kBF16Dot ? (K + 1) / 2 * 2 : K;  // k range the loop covers
  const size_t arow = act_row_bytes<MODE>(K, gsz);            // packed activation bytes per row
  kc = imax(kg, kc / kg * kg);
  // Panel groups per column block: the block's accumulators (M rows) stay in L2 across its k blocks,
  // so each k slice of the activations is read from L2 by every group of the block, not from L3.
  const int64_t mpad = (M + MR - 1) / MR * MR;
  const int64_t gsize = mpad * NP * NMAT * W;  // floats of one group's accumulators
  const int64_t nb = kc >= Kr ? 1 : imax(1, int64_t(128 * 1024 / sizeof(float)) / gsize);
  static thread_local Scratch cbuf;
  float* c = static_cast<float*>(cbuf.get(size_t(nb * gsize) * sizeof(float)));
  // With several row blocks, every block of panels (a group over one k block) is read from memory by the
  // first row block and from L2 by the others, which left the first waiting on memory: each row block
  // instead asks for its share of the next block's lines while it runs from the current one.
  const RowBlocks blocks(M, MR);
  const int64_t row_blocks = blocks.count;
  // k per micro-kernel step (one NextLinesCursor::step), and bytes of [k0, k1) in a panel.
  constexpr int kStepK = MODE == kI4Dot ? 8 : MODE == kI8Vnni ? 4 : (kg == 2 || MODE == kI4 || MODE == kI8Dot) ? 2 : 1;
  auto byte_range = [&](int64_t k0, int64_t k1, size_t& from, size_t& to) {
    if constexpr (is_quant(MODE)) {  // whole groups, each its scales then its codes
      const size_t gb = quant_group_bytes(NMAT, W, is_int8(MODE) ? Quant::Int8 : Quant::Int4, gsz, code_order(MODE));
      from = size_t(k0 / gsz) * gb;
      to = size_t((k1 + gsz - 1) / gsz) * gb;
    } else {
      constexpr size_t step = size_t(NMAT) * W * kg * ModeInfo<MODE>::es;  // bytes of one k step
      from = size_t(k0 / kg) * step;
      to = size_t((k1 + kg - 1) / kg) * step;
    }
  };
  auto next_lines = [&](int64_t p_next, int64_t k0, int64_t k1) {  // [k0, k1) of the group at p_next
    NextLines n;
    size_t from, to;
    byte_range(k0, k1, from, to);
    n.base = b + size_t(p_next) * pstride + from;
    n.count = int64_t((to - from + 63) / 64);
    return n;
  };
  auto run = [&](auto np_tag, int64_t p0, int64_t ng, int64_t p_after) {  // ng groups of np panels from p0
    constexpr int np = decltype(np_tag)::value;
    for (int64_t k0 = 0; k0 < Kr; k0 += kc) {
      const int64_t k1 = imin(Kr, k0 + kc);
      for (int64_t g = 0; g < ng; g++) {
        const int64_t pg = p0 + g * np;
        const char* bp = b + size_t(pg) * pstride;
        float* cg = c + g * gsize;
        // The group this thread computes next: the block's next group, else the next k block's first,
        // else the next run's first.
        NextLines next;
        if (FETCH == kFetchNext && row_blocks > 1) {
          if (g + 1 < ng)
            next = next_lines(pg + np, k0, k1);
          else if (k1 < Kr)
            next = next_lines(p0, k1, imin(Kr, k1 + kc));
          else if (p_after >= 0)
            next = next_lines(p_after, 0, imin(Kr, kc));
        }
        const int64_t lines = next.count, share = (lines + row_blocks - 1) / row_blocks;
        next.every = imax(1, ((k1 - k0 + kStepK - 1) / kStepK) / imax(1, share));
        for (int64_t i = 0; i < row_blocks; i++) {
          const int64_t m0 = blocks.start(i);
          const int mr = blocks.rows(i);
          float* cm = cg + m0 * np * NMAT * W;
          next.first = i * share;
          next.count = imax(0, imin(share, lines - next.first));
          micro_rows<O, MODE, NMAT, MR, np, FETCH>(mr, a + size_t(m0) * arow, K, k0, k1, gsz, bp, pstride, cm, k0 > 0,
                                                   next);
          if (k1 == Kr) epi(cm, m0, mr, pg, np, 1);
        }
      }
    }
  };
  // Blocks of up to nb groups of NP panels, then the leftover panels one by one.
  int64_t p = p_begin;
  for (; p + NP <= p_end; p += nb * NP) {
    const int64_t ng = imin(nb, (p_end - p) / NP);
    const int64_t after = ng == nb && p + (nb + 1) * NP <= p_end ? p + nb * NP : -1;  // the next run's start
    run(std::integral_constant<int, NP>(), p, ng, after);
    if (ng < nb) {
      p += ng * NP;
      break;
    }
  }
  for (; p < p_end; p += nb) run(std::integral_constant<int, 1>(), p, imin(nb, p_end - p), -1);
}

// The integer-dot decode tile over panels far apart: [p_begin, p_end) is cut into NP runs of q panels
// and each tile takes the i-th panel of every run (panel stride q), so a thread reads NP sequential
// streams at once, each a run of whole panels, as the read probe's threads do (8 streams each). On
// adjacent panels (one stream per thread for short panels) Qwen3's int4 LM head read 62-85% of the read
// probe over 14 runs of `node bench/model.js --models qwen3moe --formats int4 --engines ours`, 82-102%
// on far ones (two runs). `node bench/ab-model.js qwen3moe int4 decodeStreams 0 1`, 2 Zen 5 cores: step
// 0.87-0.94 (int8 0.95, Mixtral int8 0.97, Mixtral int4 1.00). The float modes' decode tiles (one to
// three rows) read such streams too, fetching 1 KiB ahead (kFetchNear, simd_micro.h); without that
// fetch they gained nothing. Each column still sums its groups in order in one micro-kernel call, so
// the bits are those of sweep.
template <class O, int MODE, int NMAT, int MR, int NP, int FETCH, class Epi>
static void sweep_streams(const char* a, int64_t M, int64_t K, int64_t gsz, const char* b, size_t pstride,
                          int64_t p_begin, int64_t p_end, Epi&& epi) {
  static_assert(is_dot(MODE) || !is_quant(MODE), "the integer-dot and the float modes");
  const int64_t q = (p_end - p_begin) / NP;
  if (q == 0)
    return sweep<O, MODE, NMAT, MR, 1, kFetchNone>(a, M, K, int64_t(1) << 40, gsz, b, pstride, p_begin, p_end, epi);
  const size_t arow = act_row_bytes<MODE>(K, gsz);
  static thread_local Scratch cbuf;
  float* c = static_cast<float*>(cbuf.get(size_t(MR) * NP * NMAT * O::W * sizeof(float)));
  const RowBlocks blocks(M, MR);
  const NextLines none;
  for (int64_t i = 0; i < q; i++) {
    const int64_t pg = p_begin + i;
    for (int64_t r = 0; r < blocks.count; r++) {
      const int64_t m0 = blocks.start(r);
      const int mr = blocks.rows(r);
      // Near a panel's end micro_qdot's prefetch runs on into the next panel of each run: the next tile's.
      micro_rows<O, MODE, NMAT, MR, NP, FETCH>(mr, a + size_t(m0) * arow, K, 0, K, gsz, b + size_t(pg) * pstride,
                                               size_t(q) * pstride, c, false, none);
      epi(c, m0, mr, pg, NP, q);
    }
  }
  const int64_t rest = p_begin + q * NP;
  if (rest < p_end)
    sweep<O, MODE, NMAT, MR, 1, kFetchNone>(a, M, K, int64_t(1) << 40, gsz, b, pstride, rest, p_end, epi);
}

// K for the k blocks of the prefill shape: the NP panels' slice of k (192 KiB) stays in L2 across row
// blocks. On 2 Zen 4 cores this ran the Mixtral float32 prefill a few percent faster than 64 KiB blocks
// and no slower than 384 KiB; `node bench/bench.js --cases mixtral-f32` repeats the comparison.
template <int MODE, int NMAT, int NP, int W>
constexpr int64_t prefill_kc() {
  return int64_t(192 * 1024) / (int64_t(NP) * NMAT * W * ModeInfo<MODE>::es) / 64 * 64;
}

// The quantized modes: a multiple of the group size, so k blocks never split a group.
template <int MODE, int NMAT, int NP, int W>
int64_t prefill_kc_quant(int64_t gsz) {
  const int64_t per_k = int64_t(NP) * NMAT * W;  // code bytes per k (int4: half that)
  const int64_t kc = int64_t(64 * 1024) * (is_int8(MODE) ? 1 : 2) / per_k / gsz * gsz;
  return kc > gsz ? kc : gsz;
}

// Bytes of one packed panel of NMAT matrices over a reduction of K.
template <int MODE, int NMAT>
size_t panel_bytes(int64_t K, int64_t gsz, int W) {
  if constexpr (is_quant(MODE)) {
    return quant_panel_bytes(NMAT, K, W, is_int8(MODE) ? Quant::Int8 : Quant::Int4, gsz, code_order(MODE));
  } else {
    constexpr int kg = ModeInfo<MODE>::kg;
    return size_t((K + kg - 1) / kg) * NMAT * W * kg * ModeInfo<MODE>::es;
  }
}

template <class O, int MODE, int NMAT, class Epi>
static void gemm(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t gsz, const char* b, size_t pstride,
                 int64_t p_begin, int64_t p_end, ActEpoch epoch, Epi&& epi) {
  using S = Shapes<O, MODE, NMAT>;
  const bool decode = M <= decode_rows_limit();
  const bool decode_max = !decode && S::kMrDecodeMax > S::kMrDecode && M <= S::kMrDecodeMax;
  const bool few = !decode && !decode_max && M <= S::kMrFew;
  const int block_rows = decode ? S::kMrDecode : decode_max ? S::kMrDecodeMax : few ? S::kMrFew : S::kMrPrefill;
  const char* a = pack_act<O, MODE>(x, ldx, M, K, block_rows, gsz, epoch);
  if constexpr (is_dot(MODE)) {
    if (decode && decode_streams().load(std::memory_order_relaxed)) {
      if (M == 1)
        return sweep_streams<O, MODE, NMAT, 1, S::kNpOneRow, kFetchNear>(a, M, K, gsz, b, pstride, p_begin, p_end, epi);
      return sweep_streams<O, MODE, NMAT, S::kMrDecode, S::kNpDecode, kFetchNone>(a, M, K, gsz, b, pstride, p_begin,
                                                                                  p_end, epi);
    }
  } else if constexpr (S::kFloatStreams) {
    if (decode && decode_streams().load(std::memory_order_relaxed)) {
      if (M == 1)
        return sweep_streams<O, MODE, NMAT, 1, S::kNpFloatOneRow, kFetchNear>(a, M, K, gsz, b, pstride, p_begin, p_end,
                                                                              epi);
      if (M == 2)
        return sweep_streams<O, MODE, NMAT, 2, S::kNpFloatTwoRows, kFetchNear>(a, M, K, gsz, b, pstride, p_begin, p_end,
                                                                               epi);
      if (M == 3)
        return sweep_streams<O, MODE, NMAT, 3, S::kNpFloatThreeRows, kFetchNear>(a, M, K, gsz, b, pstride, p_begin,
                                                                                 p_end, epi);
    }
  }
  // With decode_streams() off (the layout sweep_streams is measured against): integer-dot panels
  // shorter than short_panel_bytes() (24 KiB) take the decode tile one panel at a time.
  // A tile's panels are side by side in memory, each a stream of its own; short ones (Qwen3's int4 w2,
  // 6.9 KiB at K = 768; int4 at K = 2048, 18 KiB) end before the hardware prefetchers are up to speed.
  // One panel at a time, consecutive panels are one stream. Longer panels (int8 at K = 2048, 34 KiB;
  // int4 w1/w3 pairs, 36 KiB) keep the wider tile. `bench/ab-model.js` compares the settings.
  if (decode && is_dot(MODE) && pstride < short_panel_bytes().load(std::memory_order_relaxed)) {
    sweep<O, MODE, NMAT, S::kMrDecode, 1, kFetchNone>(a, M, K, int64_t(1) << 40, gsz, b, pstride, p_begin, p_end, epi);
  } else if (decode) {
    sweep<O, MODE, NMAT, S::kMrDecode, S::kNpDecode, kFetchNone>(a, M, K, int64_t(1) << 40, gsz, b, pstride, p_begin,
                                                                 p_end, epi);
  } else if (decode_max) {
    sweep<O, MODE, NMAT, S::kMrDecodeMax, S::kNpDecode, kFetchNone>(a, M, K, int64_t(1) << 40, gsz, b, pstride, p_begin,
                                                                    p_end, epi);
  } else if (few) {
    sweep<O, MODE, NMAT, S::kMrFew, S::kNpPrefill, kFetchAhead>(a, M, K, int64_t(1) << 40, gsz, b, pstride, p_begin,
                                                                p_end, epi);
  } else {
    int64_t kc;
    if constexpr (is_quant(MODE))
      kc = prefill_kc_quant<MODE, NMAT, S::kNpPrefill, O::W>(gsz);
    else
      kc = prefill_kc<MODE, NMAT, S::kNpPrefill, O::W>();
    // Not int4: its codes are a quarter of float32's bytes per multiply-add and its micro-kernel already
    // prefetches ahead in the block it reads (prefetch_codes); fetching the next block too ran the
    // prefill 3% slower (`bench/ab-builds.js` mid-prefill-int4 1.03, where mid-prefill-int8 gained 0.93).
    constexpr int kFetch = MODE != kI4 && MODE != kI4Dot ? kFetchNext : kFetchNone;
    sweep<O, MODE, NMAT, S::kMrPrefill, S::kNpPrefill, kFetch>(a, M, K, kc, gsz, b, pstride, p_begin, p_end, epi);
  }
}

}  // namespace
}  // namespace simd
}  // namespace fmoe
