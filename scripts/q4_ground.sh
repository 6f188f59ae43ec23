#!/usr/bin/env bash
# 4-bit quantizers side by side on a model: QINS q4 (g32 at MatMulNBits' coverage and at the
# default coverage, g16 at MatMulNBits' coverage), q6 and q8, each without and with
# calibration (--calibrate on Wikipedia articles from the end of the file, which the
# evaluation never reads: scripts/calib_text.py), against ONNX Runtime's
# matmul_nbits_quantizer (default round-to-nearest symmetric and asymmetric, its RTN and
# k-quant ports, HQQ, GPTQ on the same calibration text), block 32, o/gate/up/down; then one
# `qins parity` run over all of them (teacher-forced NLL, KL and argmax agreement on Wikipedia
# text) and their bits per weight.
#   scripts/q4_ground.sh BASE_MODEL WORK_DIR OUT_PREFIX [HQQ_PYTHON]
# BASE_MODEL is e.g. work/smollm2 or its de-gridded copy (scripts/degrid.py); models go to
# WORK_DIR/<name>, results to OUT_PREFIX.json (parity) and OUT_PREFIX-bits.json. HQQ and GPTQ
# need torch: HQQ_PYTHON is a Python with torch, onnx, onnx_ir, tokenizers and onnxruntime
# 1.31.1 (both skipped, and said so, without one).
set -euo pipefail
cd "$(dirname "$0")/.."
source .deps/env.sh
base=$1 work=$2 out=$3 hqq_py=${4:-}
mkdir -p "$work"
q() { target/release/qins rewrite "$base" -o "$work/$1" --force -q --no-library "${@:2}"; }
calib=$work/calib.txt
[ -f "$calib" ] || "$QINS_PYTHON" scripts/calib_text.py "$QINS_WIKI_TEXT" "$calib"
for c in "" cal-; do
  cal=(); [ -n "$c" ] && cal=(--calibrate "$calib")
  q ${c}qins-q4-g32-ogud --bits 4 --group 32 --exclude qkv_proj "${cal[@]}"
  q ${c}qins-q4-g16-ogud --bits 4 --group 16 --exclude qkv_proj "${cal[@]}"
  q ${c}qins-q4-g32 --bits 4 --group 32 "${cal[@]}"
  q ${c}qins-q6-g32 --bits 6 --group 32 "${cal[@]}"
  q ${c}qins-q8-g128 --bits 8 --group 128 "${cal[@]}"
done
peer() { local name=$1 py=$2; shift 2; "$py" scripts/peer_quantize.py "$base" "$work/$name" --bits 4 --block 32 --force "$@" 2>&1 | grep -v INFO; }
peer mnb4-sym "$QINS_PYTHON"
peer mnb4-asym "$QINS_PYTHON" --asymmetric
peer mnb4-rtn "$QINS_PYTHON" --algo rtn
peer mnb4-kquant "$QINS_PYTHON" --algo kquant
models=(qins-q4-g32-ogud qins-q4-g16-ogud qins-q4-g32 qins-q6-g32 qins-q8-g128
        cal-qins-q4-g32-ogud cal-qins-q4-g16-ogud cal-qins-q4-g32 cal-qins-q6-g32 cal-qins-q8-g128
        mnb4-sym mnb4-asym mnb4-rtn mnb4-kquant)
if [ -n "$hqq_py" ]; then
  peer mnb4-hqq "$hqq_py" --algo hqq
  # ORT's GPTQ port converts its inputs through torch too; the same calibration text and tokens.
  peer mnb4-gptq "$hqq_py" --algo gptq --asymmetric --calibrate "$calib"
  models+=(mnb4-hqq mnb4-gptq)
else
  echo "HQQ and GPTQ skipped: no Python with torch given"
fi
paths=("${models[@]/#/$work/}")
"$QINS_PYTHON" scripts/bits_per_weight.py "${paths[@]}" --json "$out-bits.json"
target/release/qins parity "$base" "${paths[@]}" --text "$QINS_WIKI_TEXT" --window 512 --windows 16 --threads 2 \
  --json "$out.json"
