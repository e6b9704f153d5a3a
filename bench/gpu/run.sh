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
#   .gpu-node/ beside the checkout      # also runs the Node tests on CUDA (bench/gpu/node_check.sh)
#   FMOE_GPU_DRY_RUN=pass|fail|build-fail
#                                       # no GPU, no nvcc: bench/gpu/dry_run.sh fakes the build, the
#                                       # self-test and PyTorch (as passing, failing, or not building) so
#                                       # that what this script returns can be checked anywhere
#
# Results go to $OUT when it is set (else $BUILD_DIR/out), at most 8 files, none in a subfolder:
#   results.md, results.json    the combined table (with PyTorch)
#   cuda_bench.json             the CUDA timings
#   cuda_selftest.json          every correctness check of the self-test
#   build.log, ctest.log        GPU and compiler versions, configure and build; the C++ tests' output
#   run.log                     what this script printed
#   more-results.tar.gz         everything else (self-test and benchmark logs, torch_baseline.json, ...)
# They are gathered after every step, so a run stopped part way still leaves what it got. Every file,
# unbundled, stays in $BUILD_DIR/results.
# Exit status: 0 when every correctness check passed, 1 when one failed, 2 when the build failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DRY="${FMOE_GPU_DRY_RUN:-}"
case "$DRY" in
  "" | pass | fail | build-fail) ;;
  1) DRY=pass ;;
  *) echo "FMOE_GPU_DRY_RUN must be pass, fail or build-fail, got '$DRY'" >&2; exit 2 ;;
esac
if [ -n "$DRY" ]; then BUILD="${BUILD_DIR:-$ROOT/build-cuda-dry-run}"; else BUILD="${BUILD_DIR:-$ROOT/build-cuda-check}"; fi
OUT_DIR="${OUT:-$BUILD/out}"
WORK="$BUILD/results"  # every result file; collect() copies what matters to $OUT_DIR and bundles the rest
IO_DIR="$BUILD/io"     # 2.8 GB of weights exchanged with PyTorch; removed at the end, never under $OUT
FAKE="$ROOT/bench/gpu/dry_run.sh"

# What comes back from a lent GPU machine: at most 8 files of at most 16 MiB each.
RETURNED=(results.md results.json cuda_bench.json cuda_selftest.json build.log ctest.log run.log)
BUNDLE=more-results.tar.gz
MAX_BYTES=$((15 * 1024 * 1024))  # a little under 16 MiB

# Copies the RETURNED files found in $WORK to $OUT_DIR and bundles every other file there into $BUNDLE.
# A returned file over MAX_BYTES comes back as its head and tail, and whole in the bundle.
collect() {
  mkdir -p "$OUT_DIR"
  local f name rest=() keep
  for name in "${RETURNED[@]}" "$BUNDLE"; do rm -f "$OUT_DIR/$name"; done
  for f in "$WORK"/*; do
    [ -f "$f" ] || continue
    name="$(basename "$f")"
    keep=0
    for r in "${RETURNED[@]}"; do [ "$name" = "$r" ] && keep=1; done
    if [ "$keep" = 0 ]; then rest+=("$name"); continue; fi
    if [ "$(stat -c %s "$f")" -le "$MAX_BYTES" ]; then
      cp "$f" "$OUT_DIR/$name"
    else
      { head -c $((MAX_BYTES / 2)) "$f"; printf '\n[... cut here: the whole file is in %s ...]\n' "$BUNDLE"
        tail -c $((MAX_BYTES / 2)) "$f"; } > "$OUT_DIR/$name"
      rest+=("$name")
    fi
  done
  if [ "${#rest[@]}" -gt 0 ]; then
    tar -czf "$OUT_DIR/$BUNDLE" -C "$WORK" "${rest[@]}"
    if [ "$(stat -c %s "$OUT_DIR/$BUNDLE")" -gt "$MAX_BYTES" ]; then
      echo "WARNING: $BUNDLE is over 15 MiB and may not come back from a lent machine"
    fi
  fi
}

step() { echo; echo "== $* ($(( $(date +%s) - t_all )) s)"; }

# Every step; the exit status of the check. Writes only under $WORK (and $IO_DIR).
main() {
  local status=0 t0
  t_all=$(date +%s)
  if [ -n "$DRY" ]; then
    echo "DRY RUN ($DRY): no GPU, no nvcc; bench/gpu/dry_run.sh stands in for the build, the self-test and PyTorch"
    export FMOE_GPU_DRY_RUN="$DRY"
  fi

  local NVCC
  if [ -n "$DRY" ]; then
    bash "$FAKE" nvidia-smi | tee "$WORK/build.log"
  else
    NVCC="$(command -v nvcc || true)"
    if [ -z "$NVCC" ]; then
      for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do [ -x "$d/nvcc" ] && NVCC="$d/nvcc" && break; done
    fi
    if [ -z "$NVCC" ]; then echo "nvcc not found" | tee "$WORK/build.log"; return 2; fi
    export CUDACXX="$NVCC"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$WORK/build.log"
    "$NVCC" --version | tail -2 | tee -a "$WORK/build.log"
  fi

  # The GPU's own architecture is enough to test it, and builds in a fraction of the time.
  if [ -z "${FMOE_CUDA_ARCHITECTURES:-}" ]; then
    local cc=""
    [ -z "$DRY" ] && cc="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
    FMOE_CUDA_ARCHITECTURES="${cc:+${cc}-real}"
    FMOE_CUDA_ARCHITECTURES="${FMOE_CUDA_ARCHITECTURES:-80-real;89-real;90-real;90-virtual}"
  fi
  local ARCHS="$FMOE_CUDA_ARCHITECTURES" JOBS
  JOBS="$(nproc 2>/dev/null || echo 4)"

  step "configure and build (architectures: $ARCHS)"
  t0=$(date +%s)
  local SRC="$ROOT" CMAKE_DIR="$BUILD/cmake"
  if [ -n "$DRY" ]; then SRC="$BUILD/dry-project"; bash "$FAKE" project "$SRC"; fi
  echo "== cmake configure" >> "$WORK/build.log"
  if ! cmake -S "$SRC" -B "$CMAKE_DIR" -DCMAKE_BUILD_TYPE=Release -DFMOE_CUDA=ON \
      -DFMOE_CUDA_ARCHITECTURES="$ARCHS" -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" >> "$WORK/build.log" 2>&1; then
    tail -40 "$WORK/build.log"; echo "BUILD FAILED (configure)"; return 2
  fi
  echo "== cmake build" >> "$WORK/build.log"
  if ! cmake --build "$CMAKE_DIR" -j "$JOBS" >> "$WORK/build.log" 2>&1; then
    grep -E "error|Error" "$WORK/build.log" | head -40; tail -20 "$WORK/build.log"
    echo "BUILD FAILED"; return 2
  fi
  local LIB="$CMAKE_DIR/Release/libfused_moe_cuda.so"
  local SELFTEST=("$CMAKE_DIR/fmoe_cuda_selftest")
  echo "built in $(( $(date +%s) - t0 )) s: $LIB"
  if [ -n "$DRY" ]; then
    SELFTEST=(bash "$FAKE" selftest)
    echo "dry run: no library to inspect (exported symbols, static CUDA runtime)"
  else
    echo "exported symbols:"; nm -D --defined-only "$LIB" | awk '{print "  " $3}'
    if ldd "$LIB" | grep -q libcudart; then echo "FAIL: libcudart is linked dynamically"; status=1; fi
  fi
  collect

  step "C++ tests (ctest)"
  t0=$(date +%s)
  export FMOE_SELFTEST_OUT="$WORK"
  rm -f "$WORK/cuda_selftest.json"
  (cd "$CMAKE_DIR" && timeout 300 ctest --verbose --timeout 300) > "$WORK/ctest.log" 2>&1
  local ctest_rc=$?
  # ctest --verbose prefixes each line of a test's output with the test's number ("2: correctness: ...").
  sed -E 's/^[0-9]+: //' "$WORK/ctest.log" |
    grep -E "FAIL|^correctness:|CHECKS|tests passed|Skipped|Test +#|^device 0:" | head -80
  echo "ctest exit status $ctest_rc in $(( $(date +%s) - t0 )) s (full log: ctest.log)"
  [ "$ctest_rc" -eq 0 ] || status=1
  # ctest counts a skipped test as passed: on this machine the self-test must have run and passed.
  if ! grep -q '"failures": 0,' "$WORK/cuda_selftest.json" 2>/dev/null; then
    echo "FAIL: the CUDA self-test did not run to completion or reported failures"; status=1
  fi
  collect

  # The Node path, where bench/gpu/node_check.sh pack has left .gpu-node/ beside the checkout.
  if [ -z "$DRY" ] && [ -f "$ROOT/.gpu-node/node.xz" ]; then
    step "Node addon on CUDA (bench/gpu/node_check.sh run; log in node_check.log)"
    OUT="$WORK" timeout 300 bash "$ROOT/bench/gpu/node_check.sh" run > /dev/null 2>&1
    local node_rc=$?
    awk '/^cuda/,/^env/' "$WORK/node_check.log" | grep -v '^env'
    grep -E "^(PASS|FAIL)|^Tests:|^FAIL:" "$WORK/node_check.log" | head -20
    echo "node check exit status $node_rc"
    [ "$node_rc" -eq 0 ] || status=1
    collect
  fi

  if [ "${SKIP_BENCH:-0}" != "1" ]; then
    local have_torch=0 io_args=() PY=(python3 "$ROOT/bench/gpu/torch_baseline.py")
    if [ -n "$DRY" ]; then
      [ "${SKIP_TORCH:-0}" != "1" ] && have_torch=1
      PY=(bash "$FAKE" torch)
    elif [ "${SKIP_TORCH:-0}" != "1" ] && \
       python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" > /dev/null 2>&1; then
      have_torch=1
    fi
    if [ "$have_torch" = 1 ]; then
      step "PyTorch: Mixtral-size weights (fixed seed) for both sides"
      if timeout 180 "${PY[@]}" gen --dir "$IO_DIR" --seed 0 --tokens 520; then
        io_args=(--io "$IO_DIR")
      else
        echo "FAIL: could not write the weights"; status=1; have_torch=0
      fi
    else
      echo "PyTorch with CUDA not available: CUDA timings only, on generated weights"
    fi

    step "CUDA layer benchmark"
    timeout 240 "${SELFTEST[@]}" --lib "$LIB" --bench-only ${io_args[@]+"${io_args[@]}"} --out "$WORK"
    local bench_rc=$?
    [ "$bench_rc" -eq 0 ] || { echo "FAIL: CUDA benchmark exit status $bench_rc"; status=1; }
    collect

    if [ "$have_torch" = 1 ]; then
      step "PyTorch: output check, bf16 matmul ceiling, eager MoE loop, combined table"
      timeout 240 "${PY[@]}" report --dir "$IO_DIR" --cuda-json "$WORK/cuda_bench.json" --out "$WORK"
      local report_rc=$?
      [ "$report_rc" -eq 0 ] || { echo "FAIL: PyTorch report exit status $report_rc"; status=1; }
    fi
  fi

  step "done"
  return $status
}

rm -rf "$WORK" "$IO_DIR"
mkdir -p "$WORK" "$OUT_DIR"
STATUS_FILE="$BUILD/exit-status"
rm -f "$STATUS_FILE"
trap 'rm -rf "$IO_DIR"' EXIT
# Stopped from outside (a time limit): return what there is. The pipeline runs in the background because
# bash runs a trap only once the foreground command has finished, while `wait` is interrupted at once.
trap 'echo "stopped by a signal" | tee -a "$WORK/run.log"; collect; exit 1' TERM INT
{ main; echo $? > "$STATUS_FILE"; } 2>&1 | tee "$WORK/run.log" &
wait $!
status="$(cat "$STATUS_FILE" 2>/dev/null || echo 1)"
{
  echo "results in $OUT_DIR: ${RETURNED[*]} (those produced) and $BUNDLE; all files unbundled in $WORK"
  case "$status" in
    0) echo "DEVICE CHECK: correctness PASSED" ;;
    2) echo "DEVICE CHECK: BUILD FAILED" ;;
    *) echo "DEVICE CHECK: FAILED (see above)" ;;
  esac
} | tee -a "$WORK/run.log"
collect
exit $status
