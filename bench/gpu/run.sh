#!/usr/bin/env bash
# Builds the CUDA backend library and runs its self-test and benchmark on a machine with an NVIDIA GPU,
# nvcc and cmake (Node is not needed). Optionally runs a naive PyTorch MoE at the same shapes for a
# side-by-side figure. Results: a table on stdout, and cuda_selftest.json/.txt (+ torch_baseline.json)
# under $OUT when it is set (else build-cuda-check/out).
#
#   bench/gpu/run.sh            # everything, about 3-5 minutes on an H200
#   FMOE_CUDA_ARCHITECTURES="80-real;89-real;90-real;90-virtual" bench/gpu/run.sh
#                                           # the full shipping list (default: the GPU's own)
#   SKIP_TORCH=1 / SKIP_BENCH=1             # leave out the PyTorch baseline / the timing
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${BUILD_DIR:-$ROOT/build-cuda-check}"
OUT_DIR="${OUT:-$BUILD/out}"
# The GPU's own architecture is enough to test it, and builds in a fraction of the time.
if [ -z "${FMOE_CUDA_ARCHITECTURES:-}" ]; then
  cc="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
  FMOE_CUDA_ARCHITECTURES="${cc:+${cc}-real}"
  FMOE_CUDA_ARCHITECTURES="${FMOE_CUDA_ARCHITECTURES:-80-real;89-real;90-real;90-virtual}"
fi
ARCHS="$FMOE_CUDA_ARCHITECTURES"
JOBS="$(nproc 2>/dev/null || echo 4)"
mkdir -p "$BUILD/project" "$OUT_DIR"

NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ]; then
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do [ -x "$d/nvcc" ] && NVCC="$d/nvcc" && break; done
fi
if [ -z "$NVCC" ]; then echo "nvcc not found" >&2; exit 2; fi
export CUDACXX="$NVCC"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee "$OUT_DIR/nvidia-smi.txt"

# A throwaway project that only includes the backend's cmake file, as the main CMakeLists.txt does.
cat > "$BUILD/project/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.18)
project(fused_moe_cuda_check LANGUAGES CXX)
set(FMOE_SOURCE_DIR "$ROOT")
set(FMOE_OUTPUT_DIR "$BUILD/lib")
include("$ROOT/cmake/cuda.cmake")
CMAKE

echo "== building libfused_moe_cuda.so (architectures: $ARCHS)"
start=$(date +%s)
cmake -S "$BUILD/project" -B "$BUILD/cmake" -DCMAKE_BUILD_TYPE=Release \
  -DFMOE_CUDA_ARCHITECTURES="$ARCHS" -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" > "$OUT_DIR/cmake-configure.log" 2>&1 \
  || { cat "$OUT_DIR/cmake-configure.log"; exit 2; }
cmake --build "$BUILD/cmake" -j "$JOBS" > "$OUT_DIR/cmake-build.log" 2>&1 || { tail -50 "$OUT_DIR/cmake-build.log"; exit 2; }
LIB="$BUILD/lib/libfused_moe_cuda.so"
echo "built in $(( $(date +%s) - start )) s: $LIB"
echo "exported symbols:"; nm -D --defined-only "$LIB" | awk '{print "  " $3}'
if ldd "$LIB" | grep -q libcudart; then echo "ERROR: libcudart is linked dynamically" >&2; exit 2; fi

echo "== building the self-test"
"$NVCC" -O2 -std=c++17 -I"$ROOT/csrc/cuda" "$ROOT/csrc/cuda/tools/cuda_selftest.cpp" -o "$BUILD/cuda_selftest" \
  -ldl -lpthread || exit 2

echo "== self-test"
bench_flag=""
[ "${SKIP_BENCH:-0}" = "1" ] && bench_flag="--no-bench"
timeout 240 "$BUILD/cuda_selftest" --lib "$LIB" --out "$OUT_DIR" $bench_flag
status=$?
echo "self-test exit status: $status"

if [ "${SKIP_TORCH:-0}" != "1" ] && [ "${SKIP_BENCH:-0}" != "1" ] && \
   python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "== naive PyTorch MoE baseline (same shapes, bf16)"
  OUT_DIR="$OUT_DIR" timeout 120 python3 - <<'PY'
import json, os, time
import torch
import torch.nn.functional as Fn

H, F, E, k = 4096, 14336, 8, 2
dev = "cuda"
torch.manual_seed(0)
gate = (torch.rand(E, H, device=dev) * 2 - 1) * (2 / H ** 0.5)
w1 = ((torch.rand(E, F, H, device=dev) * 2 - 1) / H ** 0.5).to(torch.bfloat16)
w3 = ((torch.rand(E, F, H, device=dev) * 2 - 1) / H ** 0.5).to(torch.bfloat16)
w2 = ((torch.rand(E, H, F, device=dev) * 2 - 1) / F ** 0.5).to(torch.bfloat16)

def moe(x):
    p = torch.softmax(x @ gate.t(), dim=-1)
    w, ids = torch.topk(p, k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    xb = x.to(torch.bfloat16)
    out = torch.zeros_like(x)
    for e in range(E):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = xb[tok]
        h = Fn.silu(xe @ w1[e].t()) * (xe @ w3[e].t())
        y = (h @ w2[e].t()).float()
        out.index_add_(0, tok, y * w[tok, slot, None])
    return out

rows = []
for T in (1, 16, 512, 1024):
    x = torch.rand(T, H, device=dev) * 2 - 1
    for _ in range(3):
        moe(x)
    torch.cuda.synchronize()
    iters = 50 if T <= 16 else 10
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        moe(x)
    e.record()
    torch.cuda.synchronize()
    ms = s.elapsed_time(e) / iters
    tflops = 2 * T * k * 3 * H * F / (ms * 1e-3) / 1e12
    rows.append({"T": T, "ms": round(ms, 4), "TFLOPs": round(tflops, 2)})
    print(f"  torch T={T:5d}  {ms:8.3f} ms  {tflops:6.1f} TFLOP/s")
with open(os.path.join(os.environ["OUT_DIR"], "torch_baseline.json"), "w") as f:
    json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "mixtral_bf16": rows}, f, indent=2)
PY
fi

echo "== results in $OUT_DIR"
exit $status
