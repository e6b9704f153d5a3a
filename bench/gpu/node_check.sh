#!/usr/bin/env bash
# The package's own CUDA path on a GPU: the Node addon opening libfused_moe_cuda.so and the jest tests
# that run MoeLayer with device: 'cuda' (test/cuda.test.ts and the error, option and doctor tests, which
# take other branches where a device exists). For a GPU machine that has no Node and no network: pack
# everything here, carry the folder there, run it there.
#
#   bench/gpu/node_check.sh pack        # here: .gpu-node/ with Node, the test dependencies, the addon and
#                                       # the CUDA library (nvcc needed; FMOE_CUDA_ARCHITECTURES, default 90-real)
#   bench/gpu/node_check.sh run         # there, from the repository root, with .gpu-node/ carried along:
#                                       # unpacks, prints `fused-moe doctor`, runs the tests; log in $OUT
#
# .gpu-node/ is git-ignored: about 40 MB (Node compressed, node_modules without the benchmark-only
# packages, the compiled dist/, the addon, the library).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PACK="$ROOT/.gpu-node"
TESTS=(test/cuda.test.ts test/errors.test.ts test/hostile.test.ts test/options.test.ts test/doctor.test.ts)

pack() {
  cd "$ROOT" || exit 2
  [ -d node_modules ] || { echo "run npm ci first"; exit 2; }
  rm -rf "$PACK" && mkdir -p "$PACK"
  echo "== addon and dist"
  npm run build:ts > "$PACK/build.log" 2>&1 || { tail -20 "$PACK/build.log"; exit 2; }
  tar -cJf "$PACK/dist.tar.xz" dist
  npx node-gyp build -j "$(nproc)" >> "$PACK/build.log" 2>&1 || { tail -20 "$PACK/build.log"; exit 2; }
  cp build/Release/fused_moe.node "$PACK/"
  echo "== CUDA library"
  local archs="${FMOE_CUDA_ARCHITECTURES:-90-real}"
  cmake -S . -B build-cuda-node -DCMAKE_BUILD_TYPE=Release -DFMOE_CUDA=ON -DFMOE_CUDA_ARCHITECTURES="$archs" \
    -DCMAKE_CUDA_ARCHITECTURES="$archs" >> "$PACK/build.log" 2>&1 &&
    cmake --build build-cuda-node -j "$(nproc)" --target fused_moe_cuda >> "$PACK/build.log" 2>&1 ||
    { tail -20 "$PACK/build.log"; exit 2; }
  cp build-cuda-node/Release/libfused_moe_cuda.so "$PACK/"
  echo "== Node $(node --version) and node_modules"
  xz -T0 -6 -c "$(readlink -f "$(command -v node)")" > "$PACK/node.xz"
  # The benchmark peers, the OpenAI client and the linters are not needed by these tests.
  tar -cf - --exclude='node_modules/@node-llama-cpp' --exclude='node_modules/node-llama-cpp' \
    --exclude='node_modules/onnxruntime*' --exclude='node_modules/openai' --exclude='node_modules/prettier' \
    --exclude='node_modules/clang-format' --exclude='node_modules/@typescript-eslint' --exclude='node_modules/eslint*' \
    --exclude='node_modules/@eslint' node_modules | xz -T0 -6 > "$PACK/node_modules.tar.xz"
  du -sh "$PACK"
}

run() {
  cd "$ROOT" || exit 2
  local out="${OUT:-$PACK/out}"
  mkdir -p "$out" /tmp/gpu-node/bin
  exec > >(tee "$out/node_check.log") 2>&1
  [ -f "$PACK/node.xz" ] || { echo "no $PACK: run 'bench/gpu/node_check.sh pack' first and carry .gpu-node"; exit 2; }
  xz -dc "$PACK/node.xz" > /tmp/gpu-node/bin/node && chmod +x /tmp/gpu-node/bin/node
  export PATH="/tmp/gpu-node/bin:$PATH"
  [ -d node_modules ] || xz -dc "$PACK/node_modules.tar.xz" | tar -xf -
  [ -d dist ] || tar -xJf "$PACK/dist.tar.xz"
  mkdir -p build/Release && cp "$PACK/fused_moe.node" build/Release/
  export FUSED_MOE_CUDA_LIBRARY="$PACK/libfused_moe_cuda.so"
  local gpu=0
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2> /dev/null && gpu=1
  echo "node $(node --version)"
  node bin/fused-moe.js doctor
  # With a GPU here, the CUDA tests must run, not skip.
  if [ "$gpu" = 1 ] && ! node -e "const c = require('./dist').backendInfo().cuda;
      if (!c.available) { console.error('FAIL: a GPU is here but the addon cannot use it: ' + c.reason); process.exit(1); }"; then
    exit 1
  fi
  echo "== jest ${TESTS[*]}"
  node node_modules/jest/bin/jest.js --ci "${TESTS[@]}"
}

case "${1:-}" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: bench/gpu/node_check.sh pack | run" >&2; exit 2 ;;
esac
