#!/usr/bin/env bash
# Stand-ins for the GPU steps of bench/gpu/run.sh, so that what it returns can be checked on a machine with
# no GPU, no nvcc and no PyTorch (FMOE_GPU_DRY_RUN=pass|fail|build-fail bench/gpu/run.sh). They print and
# write what the real steps do, in the same formats, with made-up numbers; the ctest run is real, so its
# --verbose line prefixes are the real ones.
#
#   bench/gpu/dry_run.sh check        # runs run.sh in every dry-run mode and checks what comes back
#
# The stand-ins (run.sh calls them): nvidia-smi; project DIR (a CMake project whose tests are the core
# test and the self-test stand-in; under build-fail its build runs failing-build); selftest ARGS (fmoe_cuda_selftest's
# command line); torch gen|report ARGS (torch_baseline.py's). FMOE_GPU_DRY_RUN_LOG_MB=N makes the self-test
# print N MiB more, to check that an oversized log still comes back.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODE="${FMOE_GPU_DRY_RUN:-pass}"

fake_nvidia_smi() {
  echo "name, driver_version, memory.total [MiB], clocks.max.sm [MHz]"
  echo "dry run (no GPU), 0.0, 0 MiB, 0 MHz"
  echo "Cuda compilation tools: none (dry run)"
}

fake_project() {
  local dir="$1"
  mkdir -p "$dir"
  {
    echo "cmake_minimum_required(VERSION 3.16)"
    echo "project(fmoe_gpu_dry_run NONE)"
    echo "enable_testing()"
    if [ "$MODE" = build-fail ]; then
      echo "add_custom_target(fake_build ALL COMMAND bash \"$HERE/dry_run.sh\" failing-build)"
    fi
    echo "add_test(NAME core COMMAND sh -c \"echo 'ok (0 failures), kernels: dry run'\")"
    echo "add_test(NAME cuda_selftest COMMAND bash \"$HERE/dry_run.sh\" selftest --lib none --no-bench)"
    echo "set_tests_properties(cuda_selftest PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 300)"
  } > "$dir/CMakeLists.txt"
}

fake_selftest() {
  local out="${FMOE_SELFTEST_OUT:-}" io="" bench=1 correctness=1
  while [ $# -gt 0 ]; do
    case "$1" in
      --lib | --seed) shift ;;
      --out) out="$2"; shift ;;
      --io) io="$2"; shift ;;
      --no-bench) bench=0 ;;
      --bench-only) correctness=0 ;;
    esac
    shift
  done
  local failures=0 log
  [ "$MODE" = fail ] && failures=1
  log="$(mktemp)"
  {
    printf 'device 0: dry run (no GPU), sm_00, 0 SMs, 0.0 GiB; driver 0, runtime 0; seed 1\n\n'
    if [ "$correctness" = 1 ]; then
      echo "stages (gating, dispatch, conversion, expert FFN, combine) against host references"
      echo "  [ok  ] stage/gating_E8_k2_r0_T67 67 tokens compared (0 near ties skipped), 0 id mismatches"
      echo "  [ok  ] stage/combine_T1_k2_H4096 bit-exact vs host fmaf: yes, rel_l2 vs float64 0.00e+00"
      if [ "$failures" -gt 0 ]; then
        echo "  [FAIL] layer/odd_bf16/rel_l2 1.000e+00 (tolerance 1e-02)"
      else
        echo "  [ok  ] layer/odd_bf16/rel_l2 1.000e-03 (tolerance 1e-02)"
      fi
      if [ "${FMOE_GPU_DRY_RUN_LOG_MB:-0}" -gt 0 ]; then
        head -c $((FMOE_GPU_DRY_RUN_LOG_MB * 1024 * 1024)) /dev/zero | tr '\0' 'x' | fold -w 100
        echo
      fi
      printf 'correctness: 3 check(s), %d failure(s), 0.0 s, seed 1\n' "$failures"
      if [ "$failures" = 0 ]; then printf '\nALL CHECKS PASSED\n'; else printf '\nSOME CHECKS FAILED\n'; fi
    fi
  } | tee "$log"
  if [ "$correctness" = 1 ] && [ -n "$out" ]; then
    printf '{\n  "device": "dry run",\n  "seed": 1,\n  "checks_total": 3,\n  "failures": %d,\n  "checks": []\n}\n' \
      "$failures" > "$out/cuda_selftest.json"
    cp "$log" "$out/cuda_selftest.txt"
  fi
  if [ "$bench" = 1 ]; then
    {
      printf '\ndevice-to-device copy ceiling: 1 GB/s (dry run)\n'
      printf '%6s %11s\n' T "queued us"
      for t in 1 16 128 512 4096; do printf '%6d %11.1f\n' "$t" 1.0; done
    } | tee -a "$log"
    if [ -n "$out" ]; then
      printf '{\n  "device": "dry run",\n  "copy_GBps": 1.0,\n  "rows": [%s]\n}\n' \
        '{"T": 1, "us": 1.0, "weight_GBps": 1.0, "frac_copy": 1.0, "TFLOPs": 0.0}' > "$out/cuda_bench.json"
      cp "$log" "$out/cuda_bench.txt"
    fi
    [ -n "$io" ] && : > "$io/out.f32"
  fi
  rm -f "$log"
  [ "$correctness" = 1 ] && [ "$failures" -gt 0 ] && return 1
  return 0
}

fake_torch() {
  local cmd="$1" dir="" out=""
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --dir) dir="$2"; shift ;;
      --out) out="$2"; shift ;;
      --cuda-json | --seed | --tokens) shift ;;
    esac
    shift
  done
  if [ "$cmd" = gen ]; then
    mkdir -p "$dir" && echo "4096 14336 8 2 0 1 520" > "$dir/meta.txt"
    return
  fi
  echo "Mixtral-size output check (520 tokens, same weights): dry run ok"
  echo '{"eager_us": {}, "matmul_TFLOPs": {}, "output_check": {"ok": true}}' > "$out/torch_baseline.json"
  echo '{"device": "dry run", "rows": []}' > "$out/results.json"
  printf '| T | CUDA us |\n|---|---|\n| 1 | 1.0 |\n' > "$out/results.md"
}

# Runs run.sh in each mode and checks what comes back: the exit status, at most 8 files of at most 16 MiB
# and no folders under $OUT, the headline files, and that the self-test's summary line is found in the
# ctest --verbose log (where it carries the test number) and printed.
check() {
  local tmp fails=0
  tmp="$(mktemp -d)"
  expect() {  # expect CONDITION-TEXT COMMAND...: one line, ok or FAIL
    local what="$1"
    shift
    if "$@"; then echo "  ok    $what"; else echo "  FAIL  $what"; fails=$((fails + 1)); fi
  }
  run_mode() {  # run_mode NAME MODE WANT_STATUS [ENV=VALUE...]
    local name="$1" mode="$2" want="$3" rc out
    shift 3
    out="$tmp/$name/out"
    mkdir -p "$tmp/$name"
    env "$@" OUT="$out" BUILD_DIR="$tmp/$name/build" FMOE_GPU_DRY_RUN="$mode" bash "$HERE/run.sh" \
      > "$tmp/$name/stdout" 2>&1
    rc=$?
    echo "$name (FMOE_GPU_DRY_RUN=$mode $*): exit status $rc; returned:"
    (cd "$out" && find . -mindepth 1 -printf '    %P %s bytes\n' | sort)
    expect "exit status $want" test "$rc" = "$want"
    expect "at most 8 files" test "$(find "$out" -type f | wc -l)" -le 8
    expect "no folders" test "$(find "$out" -mindepth 1 -type d | wc -l)" = 0
    expect "no file over 16 MiB" test -z "$(find "$out" -type f -size +16M)"
    expect "build.log and run.log" test -s "$out/build.log" -a -s "$out/run.log"
  }
  has() { grep -qE "$1" "$2"; }
  has_files() { local d="$1" f; shift; for f in "$@"; do [ -s "$d/$f" ] || return 1; done; }
  bundle_has() { tar -tzf "$1/more-results.tar.gz" | grep -x "$2" > /dev/null; }  # -q would cut tar's pipe

  run_mode pass pass 0 SKIP_TORCH=0
  expect "all 8 files" has_files "$tmp/pass/out" results.md results.json cuda_bench.json cuda_selftest.json \
    build.log ctest.log run.log more-results.tar.gz
  expect "ctest.log has the numbered summary line" has '^[0-9]+: correctness: ' "$tmp/pass/out/ctest.log"
  expect "the summary line is printed" has '^correctness: 3 check\(s\), 0 failure\(s\)' "$tmp/pass/stdout"
  expect "bundle holds cuda_selftest.txt" bundle_has "$tmp/pass/out" cuda_selftest.txt
  expect "bundle holds torch_baseline.json" bundle_has "$tmp/pass/out" torch_baseline.json
  expect "PASSED" has 'DEVICE CHECK: correctness PASSED' "$tmp/pass/stdout"

  run_mode fail fail 1
  expect "the summary line is printed" has '^correctness: 3 check\(s\), 1 failure\(s\)' "$tmp/fail/stdout"
  expect "the failed check is printed" has '\[FAIL\] layer/odd_bf16/rel_l2' "$tmp/fail/stdout"
  expect "cuda_selftest.json" has_files "$tmp/fail/out" cuda_selftest.json ctest.log

  run_mode build-fail build-fail 2
  expect "the build error is in build.log" has 'error: dry run' "$tmp/build-fail/out/build.log"
  expect "BUILD FAILED" has 'DEVICE CHECK: BUILD FAILED' "$tmp/build-fail/stdout"

  run_mode no-torch pass 0 SKIP_TORCH=1
  expect "no results.md without PyTorch" test ! -e "$tmp/no-torch/out/results.md"
  expect "cuda_bench.json" has_files "$tmp/no-torch/out" cuda_bench.json cuda_selftest.json

  run_mode big-log pass 0 FMOE_GPU_DRY_RUN_LOG_MB=20
  expect "the cut ctest.log says so" has 'cut here' "$tmp/big-log/out/ctest.log"
  expect "the whole ctest.log is in the bundle" bundle_has "$tmp/big-log/out" ctest.log

  rm -rf "$tmp"
  if [ "$fails" = 0 ]; then echo "dry run check: all passed"; else echo "dry run check: $fails FAILED"; fi
  [ "$fails" = 0 ]
}

cmd="${1:-}"
shift || true
case "$cmd" in
  nvidia-smi) fake_nvidia_smi ;;
  project) fake_project "$@" ;;
  selftest) fake_selftest "$@" ;;
  torch) fake_torch "$@" ;;
  failing-build) echo "csrc/cuda/gating.cu(1): error: dry run: this build fails" >&2; exit 1 ;;
  check) check ;;
  *) echo "usage: $0 check | nvidia-smi | project DIR | selftest ARGS | torch gen|report ARGS" >&2; exit 2 ;;
esac
