#!/usr/bin/env bash
# The calibrated rewrite on a real model, reduced for CI (about 3 minutes on 2 cores):
# SmolLM2 de-gridded (scripts/degrid.py: its Q4_1 grid would make any 4-bit comparison
# meaningless), QINS q4 g32 on o/gate/up/down without and with --calibrate (8192 tokens of
# Wikipedia articles from the end of the file; the evaluation reads from its start), then
# qins parity on 6 windows of 512 tokens. Asserts that calibration lowers the perplexity
# change and the KL each by at least 25% (measured on the full 16 windows: -48% and -37%,
# docs/QUALITY.md), and that a second calibrated rewrite writes the same bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
source .deps/env.sh
d=target/qins-test/calibrated
rm -rf "$d" && mkdir -p "$d"
q=target/release/qins
$q import-gguf "$QINS_SMOLLM2_GGUF" -o "$d/base" > /dev/null
"$QINS_PYTHON" scripts/degrid.py "$d/base" "$d/degrid" > /dev/null
"$QINS_PYTHON" scripts/calib_text.py "$QINS_WIKI_TEXT" "$d/calib.txt" --chars 50000 > /dev/null
w() { $q rewrite "$d/degrid" -o "$d/$1" --bits 4 --group 32 --exclude qkv_proj --no-library -q "${@:2}"; }
w plain
w cal --calibrate "$d/calib.txt" --calib-tokens 8192
w cal2 --calibrate "$d/calib.txt" --calib-tokens 8192
cmp "$d/cal/model.onnx.data" "$d/cal2/model.onnx.data"
cmp "$d/cal/model.onnx" "$d/cal2/model.onnx"
grep -q '"method": "gptq"' "$d/cal/qins_report.json"
$q parity "$d/degrid" "$d/plain" "$d/cal" --text "$QINS_WIKI_TEXT" --window 512 --windows 6 --threads 2 \
  --json "$d/parity.json" > /dev/null
"$QINS_PYTHON" - "$d/parity.json" <<'PY'
import json, math, sys
r = {x["model"].rsplit("/", 1)[-1]: dict(x["parity"], scored=x["scored"]) for x in json.load(open(sys.argv[1]))["results"]}
def dppl(p): return math.exp((p["nll_test"] - p["nll_ref"]) / p["scored"]) - 1
def kl(p): return p["kl"] / p["positions"]
for name in ("plain", "cal"):
    print(f"{name}: dPPL {100 * dppl(r[name]):+.2f}%, KL {kl(r[name]):.4f}, argmax {100 * r[name]['argmax_agree'] / r[name]['positions']:.1f}%")
assert dppl(r["cal"]) < 0.75 * dppl(r["plain"]), "calibration did not lower dPPL by 25%"
assert kl(r["cal"]) < 0.75 * kl(r["plain"]), "calibration did not lower the KL by 25%"
print("calibrated q4: ok")
PY
