#!/usr/bin/env bash
# Tests the onnxruntime-qins wheel as a pip user gets it: builds it (scripts/build-wheel.sh),
# installs it with onnxruntime and numpy into a fresh venv, and with that venv's `qins` on PATH
# and no ORT_DYLIB_PATH in the environment:
#   qins import-gguf (SmolLM2-135M, fp32) -> qins rewrite --bits 8 -> one forward step of a few
#   tokens through Python ONNX Runtime with qins.get_library_path(), whose logits must be
#   finite and close to the original's (python/tests/check_wheel.py: cosine of the whole logits
#   > 0.999, of every position's > 0.99), and `qins generate` through the installed CLI (which
#   must find ONNX Runtime in the venv and libqins_provider.so beside itself).
#
#   scripts/test-wheel.sh [ONNXRUNTIME_VERSION...]     (default: 1.31.1)
#
# Each version gets its own venv; the models are made once. QINS_KEEP_TMP=1 keeps the
# temporary folder. Fails loudly on any mismatch.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(1.31.1)
py=${PYTHON:-python3}

fail() { echo "test-wheel: FAIL: $*" >&2; exit 1; }
t0=$SECONDS
step() { echo "== [$((SECONDS - t0)) s] $*"; }

step "dependencies (scripts/setup.sh: nvcc for the build, the SmolLM2 GGUF)"
scripts/setup.sh >/dev/null
# shellcheck source=/dev/null
source .deps/env.sh
gguf=$QINS_SMOLLM2_GGUF
# What a pip user has: no ORT_DYLIB_PATH, no QINS_PROVIDER_LIB.
unset ORT_DYLIB_PATH QINS_PROVIDER_LIB QINS_PYTHON

step "build the wheel (scripts/build-wheel.sh)"
whl=$(scripts/build-wheel.sh)
[ -f "$whl" ] || fail "build-wheel.sh printed '$whl', which is not a file"
echo "wheel: $whl"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/qins-wheel.XXXXXX")
if [ "${QINS_KEEP_TMP:-0}" = 1 ]; then
  echo "keeping $tmp"
else
  trap 'rm -rf "$tmp"' EXIT
fi

for v in "${versions[@]}"; do
  venv=$tmp/venv-$v
  step "fresh venv with the wheel and onnxruntime==$v"
  "$py" -m venv "$venv"
  # .deps/wheels holds the onnxruntime wheel that setup.sh fetched; the rest comes from PyPI.
  "$venv/bin/python" -m pip install -q --find-links .deps/wheels "$whl" "onnxruntime==$v" numpy
  got=$("$venv/bin/python" -c 'import onnxruntime; print(onnxruntime.__version__)')
  [ "$got" = "$v" ] || fail "the venv has onnxruntime $got, not $v"

  export PATH=$venv/bin:$PATH
  [ "$(command -v qins)" = "$venv/bin/qins" ] || fail "qins on PATH is $(command -v qins), not the venv's"
  lib=$(cd "$tmp" && python -c 'import qins; print(qins.get_library_path())')
  case $lib in "$venv"/*) ;; *) fail "get_library_path() is $lib, outside the venv" ;; esac
  [ "$(dirname "$lib")" = "$(dirname "$(cd "$tmp" && python -c 'import qins; print(qins.get_cli_path())')")" ] ||
    fail "the CLI and the library are not in one folder"
  qins --version

  if [ ! -f "$tmp/q8/model.onnx" ]; then
    step "qins import-gguf (fp32 SmolLM2-135M)"
    qins import-gguf "$gguf" -o "$tmp/base"
    step "qins rewrite --bits 8"
    qins rewrite "$tmp/base" -o "$tmp/q8" --bits 8 --quiet
  fi

  step "Python ONNX Runtime $v with get_library_path(): QINS q8 against fp32"
  (cd "$tmp" && python "$root/python/tests/check_wheel.py" "$tmp/base" "$tmp/q8" 0.999) ||
    fail "the q8 model through onnxruntime $v does not match the original"

  step "qins generate through the installed CLI (onnxruntime $v found by the console script)"
  text=$(qins generate "$tmp/q8" --prompt "The capital of France is" --max-tokens 8) ||
    fail "qins generate failed with onnxruntime $v"
  echo "generated: $text"
  [ -n "${text//[[:space:]]/}" ] || fail "qins generate printed nothing"
  PATH=${PATH#"$venv/bin:"}
done
step "wheel test passed: $(basename "$whl") with onnxruntime ${versions[*]}"
