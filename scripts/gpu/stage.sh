#!/usr/bin/env bash
# Here, before device calls: the custom-op library (stripped) and the probes' fat binaries
# into .gpuart/ (ignored), the folder the GPU scripts are carried with.
#
# The probes (scripts/gpu/probe*.py, bench_decode.py) load the kernel files directly, and some
# compare against benchmark-only entry points (QINS_PROBE_KERNELS in kernels/qins_matmul/)
# that the library does not carry: their fat binaries are built here, with those entries,
# for sm_90 (the H100 and H200 of the device tool). The library embeds its own, without them.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f .deps/env.sh ] && source .deps/env.sh
cargo build --release -p qins-provider
rm -rf .gpuart && mkdir -p .gpuart
strip -o .gpuart/libqins_provider.so target/release/libqins_provider.so
NVCC=${QINS_NVCC:-.deps/cuda/nvidia/cu13/bin/nvcc}
INC=$(dirname "$(dirname "$NVCC")")/include
pids=()
for f in qins_matmul qins_matmul_prefill qins_decode; do
  "$NVCC" -O3 -std=c++17 -fatbin -DQINS_PROBE_KERNELS -gencode arch=compute_90,code=sm_90 -I"$INC" \
    "kernels/qins_matmul/$f.cu" -o ".gpuart/$f.fatbin" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
grep -qx "/.gpuart/" .git/info/exclude 2>/dev/null || echo "/.gpuart/" >> .git/info/exclude
ls -la .gpuart
# --e2e: also the programs and inputs of scripts/gpu/e2e.sh into .e2e/ (ignored).
if [ "${1:-}" = --e2e ]; then
  cargo build --release -p qins-graph-rewrite
  rm -rf .e2e && mkdir -p .e2e/fx
  strip -o .e2e/qins target/release/qins
  strip -o .e2e/qins-bench target/release/qins-bench
  cp .gpuart/libqins_provider.so .e2e/
  cp ../shared/tools/device-phi35.py .e2e/
  cp ../shared/data/phi3-tokenizer.json .e2e/fx/tokenizer.json
  whl=${GENAI_WHEEL:-$(ls .gpu/whl/onnxruntime_genai-0.18.0-cp312-*.whl 2>/dev/null | head -1)}
  if [ -z "$whl" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d .e2e onnxruntime-genai==0.18.0
  else
    cp "$whl" .e2e/
  fi
  # onnxruntime-genai's CUDA build, for e2e.sh genai-cuda (16 MB).
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .e2e onnxruntime-genai-cuda==0.18.0
  grep -qx "/.e2e/" .git/info/exclude || echo "/.e2e/" >> .git/info/exclude
  du -sh .e2e
fi
