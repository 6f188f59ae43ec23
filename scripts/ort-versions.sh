#!/usr/bin/env bash
# Which ONNX Runtime versions the wheel's custom-op library works under: for each onnxruntime
# version from PyPI, a venv (made once, reused: target/wheel/ort-venvs/VERSION) runs
# provider/tests/ort_smoke.py with the library (QinsMatMul models of opset 17 that it builds
# itself, checked against a numpy reference; bad inputs must raise, several sessions and
# threads), and a table version -> pass/fail is printed (Markdown, for python/README.md).
#
#   scripts/ort-versions.sh [--lib PATH] [VERSION...]
#
# Default library: the wheel's (target/wheel/stage/libqins_provider.so; scripts/build-wheel.sh
# is run first, which is quick when nothing changed). Default versions: 1.23.0 (the oldest
# supported) to 1.32.0, the newest patch of each minor. Logs: target/wheel/ort-versions/.
# Exits non-zero if any version fails.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
lib=
if [ "${1:-}" = --lib ]; then
  lib=$(realpath "$2")
  shift 2
fi
versions=("$@")
[ ${#versions[@]} -gt 0 ] ||
  versions=(1.23.0 1.23.2 1.24.4 1.25.1 1.26.0 1.27.0 1.28.0 1.29.0 1.30.0 1.31.1 1.32.0)
venvs=$root/target/wheel/ort-venvs
logs=$root/target/wheel/ort-versions
mkdir -p "$venvs" "$logs"
if [ -z "$lib" ]; then
  echo "building the wheel (log: $logs/build-wheel.log)" >&2
  scripts/build-wheel.sh >/dev/null 2>"$logs/build-wheel.log" || { cat "$logs/build-wheel.log" >&2; exit 1; }
  lib=$root/target/wheel/stage/libqins_provider.so
fi
[ -f "$lib" ] || { echo "no library at $lib" >&2; exit 1; }
rows=()
failed=0
for v in "${versions[@]}"; do
  venv=$venvs/$v
  if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    "$py" -m venv "$venv"
    if ! "$venv/bin/python" -m pip install -q "onnxruntime==$v" numpy onnx >"$logs/$v.install.log" 2>&1; then
      rows+=("| $v | not installable | - | see target/wheel/ort-versions/$v.install.log |")
      failed=1
      rm -rf "$venv"
      continue
    fi
    touch "$venv/.complete"
  fi
  start=$SECONDS
  if "$venv/bin/python" provider/tests/ort_smoke.py "$lib" >"$logs/$v.log" 2>&1; then
    result=pass
  else
    result=FAIL
    failed=1
  fi
  counts=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$logs/$v.log" | tail -1 || true)
  deps=$("$venv/bin/python" -c 'import numpy, onnx; print(f"numpy {numpy.__version__}, onnx {onnx.__version__}")' 2>/dev/null || echo "?")
  rows+=("| $v | $result | ${counts:-no summary (crashed?)} | $deps, $((SECONDS - start)) s |")
  echo "onnxruntime $v: $result (${counts:-see $logs/$v.log})" >&2
done

echo
echo "ort_smoke.py with $(basename "$lib") ($(sha256sum "$lib" | cut -c1-12)), $(date -u +%Y-%m-%d), $(uname -m), $(nproc) cores, $("$py" -c 'import platform; print("Python", platform.python_version())')"
echo
echo "| onnxruntime | result | ort_smoke.py | notes |"
echo "| --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
exit $failed
