#!/usr/bin/env bash
# onnxruntime-genai, as a user gets it from PyPI (it brings its own onnxruntime), runs the
# output folder of `qins rewrite` unchanged: the rewrite places the custom-op library in the
# folder and names it in genai_config.json. Greedy tokens are compared with the engine's
# (scripts/genai_check.py); a rewrite with --no-library must then fail in genai, which shows
# that the library the rewrite placed is what made the first check pass.
# Needs target/release/qins and libqins_provider.so (cargo build --release) and .deps (setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source .deps/env.sh
genai=onnxruntime-genai==0.18.0
venv=.deps/genai-venv
if [ ! -f "$venv/.complete" ] || [ "$(cat "$venv/.complete")" != "$genai" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "$genai"
  echo "$genai" > "$venv/.complete"
fi
d=target/qins-test/genai
rm -rf "$d" && mkdir -p "$d"
target/release/qins import-gguf "$QINS_SMOLLM2_GGUF" -o "$d/base" > /dev/null
target/release/qins rewrite "$d/base" -o "$d/smollm2-qins" --quiet
"$venv/bin/python" scripts/genai_check.py "$d/smollm2-qins" target/release/qins --tokens 64 --json "$d/genai_check.json"
target/release/qins rewrite "$d/base" -o "$d/q8-nolib" --quiet --no-library
if "$venv/bin/python" -c "import onnxruntime_genai as og, sys; og.Model(sys.argv[1])" "$d/q8-nolib" 2> "$d/nolib.log"; then
  echo "onnxruntime-genai loaded a QINS model without the custom-op library: the check above proves nothing" >&2
  exit 1
fi
if ! grep -q "QinsMatMul" "$d/nolib.log"; then
  echo "onnxruntime-genai failed on the model without the library, but not over QinsMatMul:" >&2
  cat "$d/nolib.log" >&2
  exit 1
fi
echo "without the library, as expected: $(grep -o '[^:]*QinsMatMul[^.]*' "$d/nolib.log" | head -1)"
