#!/usr/bin/env bash
# The GPU device check, in one call: builds the CUDA backend and its self-test for this GPU's architecture,
# runs the C++ tests (ctest: the core tests and the CUDA self-test, which checks every stage and the whole
# layer against a float64 CPU reference), then benchmarks the Mixtral-8x7B layer against a device-to-device
# copy, a large bf16 matmul and the PyTorch eager MoE loop on the same weights, and prints one table.
# Needs nvcc, cmake and an NVIDIA GPU; python3 with PyTorch (CUDA) for the baseline. Node is not needed.
#
#   bench/gpu/run.sh                    # about 3-6 minutes on an H200
#   FMOE_CUDA_ARCHITECTURES="80-real;89-real;90-real;90-virtual" bench/gpu/run.sh
#                                       # the full shipping list (default: the GPU's own architecture)
#   SKIP_TORCH=1 / SKIP_BENCH=1         # leave out the PyTorch side / all timing
#   BUILD_DIR=...                       # build folder (default: build-cuda-check in the repository)
#
# Results: the table on stdout, and under $OUT when it is set (else $BUILD_DIR/out): cuda_selftest.json/.txt,
# cuda_bench.json/.txt, results.json, results.md (the table for bench/gpu/RESULTS.md), torch_baseline.json,
# logs. Exit status: 0 when every correctness check passed, 1 when one failed, 2 when the build failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${BUILD_DIR:-$ROOT/build-cuda-check}"
OUT_DIR="${OUT:-$BUILD/out}"
IO_DIR="$BUILD/io"  # 2.8 GB of weights exchanged with PyTorch; removed at the end, never under $OUT
mkdir -p "$BUILD" "$OUT_DIR"
status=0
t_all=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - t_all )) s)"; }
cleanup() { rm -rf "$IO_DIR"; }
trap cleanup EXIT

NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ]; then
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do [ -x "$d/nvcc" ] && NVCC="$d/nvcc" && break; done
fi
if [ -z "$NVCC" ]; then echo "nvcc not found" >&2; exit 2; fi
export CUDACXX="$NVCC"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT_DIR/nvidia-smi.txt"
"$NVCC" --version | tail -2 | tee "$OUT_DIR/nvcc.txt"

# The GPU's own architecture is enough to test it, and builds in a fraction of the time.
if [ -z "${FMOE_CUDA_ARCHITECTURES:-}" ]; then
  cc="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
  FMOE_CUDA_ARCHITECTURES="${cc:+${cc}-real}"
  FMOE_CUDA_ARCHITECTURES="${FMOE_CUDA_ARCHITECTURES:-80-real;89-real;90-real;90-virtual}"
fi
ARCHS="$FMOE_CUDA_ARCHITECTURES"
JOBS="$(nproc 2>/dev/null || echo 4)"

step "configure and build (architectures: $ARCHS)"
t0=$(date +%s)
if ! cmake -S "$ROOT" -B "$BUILD/cmake" -DCMAKE_BUILD_TYPE=Release -DFMOE_CUDA=ON \
    -DFMOE_CUDA_ARCHITECTURES="$ARCHS" -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" > "$OUT_DIR/cmake-configure.log" 2>&1; then
  tail -40 "$OUT_DIR/cmake-configure.log"; echo "BUILD FAILED (configure)"; exit 2
fi
if ! cmake --build "$BUILD/cmake" -j "$JOBS" > "$OUT_DIR/cmake-build.log" 2>&1; then
  grep -E "error|Error" "$OUT_DIR/cmake-build.log" | head -40; tail -20 "$OUT_DIR/cmake-build.log"
  echo "BUILD FAILED"; exit 2
fi
LIB="$BUILD/cmake/Release/libfused_moe_cuda.so"
SELFTEST="$BUILD/cmake/fmoe_cuda_selftest"
echo "built in $(( $(date +%s) - t0 )) s: $LIB"
echo "exported symbols:"; nm -D --defined-only "$LIB" | awk '{print "  " $3}'
if ldd "$LIB" | grep -q libcudart; then echo "FAIL: libcudart is linked dynamically"; status=1; fi

step "C++ tests (ctest)"
t0=$(date +%s)
export FMOE_SELFTEST_OUT="$OUT_DIR"
rm -f "$OUT_DIR/cuda_selftest.json"
(cd "$BUILD/cmake" && timeout 300 ctest --output-on-failure --verbose --timeout 300) > "$OUT_DIR/ctest.log" 2>&1
ctest_rc=$?
grep -E "FAIL|^correctness:|CHECKS|tests passed|Skipped|Test +#|device 0:" "$OUT_DIR/ctest.log" | sed 's/^[0-9]*: //'
echo "ctest exit status $ctest_rc in $(( $(date +%s) - t0 )) s (full log: $OUT_DIR/ctest.log)"
[ "$ctest_rc" -eq 0 ] || status=1
# ctest counts a skipped test as passed: on this machine the self-test must have run and passed.
if ! grep -q '"failures": 0,' "$OUT_DIR/cuda_selftest.json" 2>/dev/null; then
  echo "FAIL: the CUDA self-test did not run to completion or reported failures"; status=1
fi

if [ "${SKIP_BENCH:-0}" != "1" ]; then
  have_torch=0
  if [ "${SKIP_TORCH:-0}" != "1" ] && \
     python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" > /dev/null 2>&1; then
    have_torch=1
  fi
  io_args=()
  if [ "$have_torch" = 1 ]; then
    step "PyTorch: Mixtral-size weights (fixed seed) for both sides"
    if timeout 180 python3 "$ROOT/bench/gpu/torch_baseline.py" gen --dir "$IO_DIR" --seed 0 --tokens 520; then
      io_args=(--io "$IO_DIR")
    else
      echo "FAIL: could not write the weights"; status=1; have_torch=0
    fi
  else
    echo "PyTorch with CUDA not available: CUDA timings only, on generated weights"
  fi

  step "CUDA layer benchmark"
  timeout 240 "$SELFTEST" --lib "$LIB" --bench-only ${io_args[@]+"${io_args[@]}"} --out "$OUT_DIR"
  bench_rc=$?
  [ "$bench_rc" -eq 0 ] || { echo "FAIL: CUDA benchmark exit status $bench_rc"; status=1; }

  if [ "$have_torch" = 1 ]; then
    step "PyTorch: output check, bf16 matmul ceiling, eager MoE loop, combined table"
    timeout 240 python3 "$ROOT/bench/gpu/torch_baseline.py" report --dir "$IO_DIR" \
      --cuda-json "$OUT_DIR/cuda_bench.json" --out "$OUT_DIR"
    report_rc=$?
    [ "$report_rc" -eq 0 ] || { echo "FAIL: PyTorch report exit status $report_rc"; status=1; }
  fi
fi

step "done"
echo "results in $OUT_DIR"
if [ "$status" -eq 0 ]; then echo "DEVICE CHECK: correctness PASSED"; else echo "DEVICE CHECK: FAILED (see above)"; fi
exit $status
