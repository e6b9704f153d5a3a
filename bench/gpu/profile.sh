#!/usr/bin/env bash
# Where a forward's GPU time goes, in one call: builds the CUDA library, its self-test and the tile sweep
# (bench/gpu/ffn_tiles.cu) for this GPU's architecture, runs the sweep, then profiles the kernels of two
# Mixtral-8x7B forwards at each batch size with Nsight Compute (clocks left alone). Needs nvcc, cmake, ncu.
#
#   bench/gpu/profile.sh                 # T = 1, 16 and 4096; results in $OUT (else build-cuda-profile/out)
#   PROFILE_T="1 16 512" bench/gpu/profile.sh
#
# Files: ffn_tiles.txt (the sweep), ncu_T<T>.csv (one row per kernel and metric), profile.log.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${BUILD_DIR:-$ROOT/build-cuda-profile}"
OUT_DIR="${OUT:-$BUILD/out}"
mkdir -p "$BUILD" "$OUT_DIR"
exec > >(tee "$OUT_DIR/profile.log") 2>&1

CC="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
echo "== build (sm_$CC)"
t0=$(date +%s)
cmake -S "$ROOT" -B "$BUILD/cmake" -DCMAKE_BUILD_TYPE=Release -DFMOE_CUDA=ON -DFMOE_CUDA_ARCHITECTURES="$CC-real" \
  -DCMAKE_CUDA_ARCHITECTURES="$CC-real" > "$BUILD/build.log" 2>&1 &&
  cmake --build "$BUILD/cmake" -j "$(nproc)" --target fused_moe_cuda fmoe_cuda_selftest fmoe_ffn_tiles \
    >> "$BUILD/build.log" 2>&1 || { tail -30 "$BUILD/build.log"; echo "BUILD FAILED"; exit 2; }
echo "built in $(( $(date +%s) - t0 )) s"

echo "== tile sweep"
timeout 240 "$BUILD/cmake/fmoe_ffn_tiles" | tee "$OUT_DIR/ffn_tiles.txt"

LIB="$BUILD/cmake/Release/libfused_moe_cuda.so"
METRICS=gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,\
sm__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size,launch__block_size,launch__registers_per_thread,\
launch__occupancy_limit_shared_mem,sm__warps_active.avg.pct_of_peak_sustained_active
for T in ${PROFILE_T:-1 16 4096}; do
  echo "== ncu, T = $T: the kernels of the second and third forwards"
  # The route call and the first forward launch 7 kernels; two forwards launch 12.
  timeout 240 ncu --clock-control none --metrics "$METRICS" --kernel-name regex:'gating|dispatch|convert|ffn|combine' \
    --launch-skip 7 --launch-count 12 --export "$BUILD/ncu_T$T" --force-overwrite \
    "$BUILD/cmake/fmoe_cuda_selftest" --lib "$LIB" --bench-only --bench-t "$T" > "$BUILD/ncu_T$T.log" 2>&1
  echo "ncu exit status $?"
  grep -E '^ +[0-9]+ ' "$BUILD/ncu_T$T.log"  # the self-test's own timing row (under the profiler)
  ncu --import "$BUILD/ncu_T$T.ncu-rep" --csv --page raw > "$OUT_DIR/ncu_T$T.csv" 2>&1 || tail -5 "$BUILD/ncu_T$T.log"
done
