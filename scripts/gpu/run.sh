#!/usr/bin/env bash
# On the GPU machine (device tool), in the repository root, after the ORT GPU parts were
# staged (../shared/tools/stage-ort-gpu.sh) and with .gpuart/ carried (scripts/gpu/stage.sh):
#   bash scripts/gpu/run.sh check|sanitize|bench|all|check-attention|sanitize-attention|bench-attention
# Writes logs and JSON under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source .og5/unpack.sh || exit 1
LIB=${LIB:-$PWD/.gpuart/libqins_provider.so}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader 
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
# check.py with every prefill configuration (CONFIGS in provider/src/cuda/qins_matmul/prefill.rs)
# forced, at each split count in $1; their JSON merged into $2.
check_prefill() {
  rm -rf /tmp/cp && mkdir -p /tmp/cp
  for c in 0 1 2 3 4 5; do for sp in $1; do
    python3 scripts/gpu/check.py "$LIB" --prefill $c:$sp --json /tmp/cp/$c-$sp.json 2>&1 | grep -v "^ok \|plugin EP"
  done; done
  python3 -c "import glob, json, sys; json.dump({f.split('/')[-1][:-5]: json.load(open(f)) for f in sorted(glob.glob('/tmp/cp/*.json'))}, open(sys.argv[1], 'w'))" "$2"
}
for step in "$@"; do
  case $step in
    # The main sweep with overlapped launches on (QINS_CUDA_PDL=1: both launch paths and the
    # chains that exercise the overlap), the prefill sweep with the default (off).
    check) QINS_CUDA_PDL=1 python3 scripts/gpu/check.py "$LIB" --json "$OUT/check.json" 2>&1 | grep -v "^ok \|plugin EP"
      # With and without split K (5 splits: more than some of these K have stages, so empty
      # splits too).
      check_prefill "1 2 5" "$OUT/check-prefill.json" ;;
    sanitize)
      # memcheck over both paths; racecheck over the code-domain kernel and the decode kernel
      # alone (under racecheck cuBLAS's own kernels stop the tool with an internal error).
      compute-sanitizer --tool memcheck --kernel-name kns=qins --print-limit 20 --error-exitcode 3 \
        python3 scripts/gpu/check.py "$LIB" --quick > /tmp/s.log 2>&1; r=$?; cat /tmp/s.log >> "$OUT/sanitize.log"
      echo "memcheck (check.py --quick): rc $r $(grep -E 'ERROR SUMMARY' /tmp/s.log | tail -1)"
      compute-sanitizer --tool racecheck --kernel-name kns=qins --print-limit 20 --error-exitcode 3 \
        python3 scripts/gpu/check.py "$LIB" --quick --max-m 4 > /tmp/s.log 2>&1; r=$?; cat /tmp/s.log >> "$OUT/sanitize.log"
      echo "racecheck (check.py --quick --max-m 4): rc $r $(grep -E 'RACECHECK SUMMARY' /tmp/s.log | tail -1)"
      # The prefill kernel, every configuration with split K (its reduce kernel too).
      for tool in memcheck racecheck; do
        r=0; for c in 0 1 2 3 4 5; do
          compute-sanitizer --tool $tool --kernel-name kns=qins --print-limit 20 --error-exitcode 3 \
            python3 scripts/gpu/check.py "$LIB" --quick --prefill $c:2 > /tmp/s.log 2>&1 || r=$?; cat /tmp/s.log >> "$OUT/sanitize.log"
          echo "$tool (check.py --quick --prefill $c:2): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' /tmp/s.log | tail -1) $(grep -E 'passed' /tmp/s.log | tail -1)"
        done; echo "$tool prefill: rc $r"
      done
      # The mixed kernels (float_weight), every variant, launched directly: under racecheck
      # check.py reaches them only with f16 up to M = 16, where its f32 cases take cuBLAS.
      for tool in memcheck racecheck; do
        PROBE_MIX_CHECK_ONLY=1 compute-sanitizer --tool $tool --kernel-name kns=qins_gemv_tc_mix --print-limit 20 \
          --error-exitcode 3 python3 scripts/gpu/probe_mix.py .gpuart /tmp/mix-check.json > /tmp/s.log 2>&1; r=$?
        cat /tmp/s.log >> "$OUT/sanitize.log"
        echo "$tool (probe_mix.py, check only): rc $r $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' /tmp/s.log | tail -1)"
      done
      for tool in memcheck racecheck; do
        compute-sanitizer --tool $tool --print-limit 20 --error-exitcode 3 \
          python3 scripts/gpu/bench_decode.py .gpuart /tmp/decode-quick.json --quick > /tmp/s.log 2>&1; r=$?; cat /tmp/s.log >> "$OUT/sanitize.log"
        echo "$tool (bench_decode.py --quick): rc $r $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' /tmp/s.log | tail -1)"
      done ;;
    # QinsGroupQueryAttention: the CUDA kernels against the CPU kernel (every case of the sweep),
    # under compute-sanitizer (the quick sweep), and decode attention against ORT's
    # GroupQueryAttention with fp16 and int8 caches.
    check-attention) python3 scripts/gpu/check_attention.py "$LIB" --device cuda --json "$OUT/check_attention.json" 2>&1 | grep -v "^ok \|plugin EP" | tail -20 ;;
    # The same sweep in two halves, for two device calls (the whole took 560 s of a 600 s call).
    check-attention-0|check-attention-1) i=${step##*-}
      python3 scripts/gpu/check_attention.py "$LIB" --device cuda --part "$i/2" --json "$OUT/check_attention-$i.json" 2>&1 | grep -v "^ok \|plugin EP" | tail -20 ;;
    sanitize-attention)
      for tool in memcheck racecheck; do
        compute-sanitizer --tool $tool --kernel-name kns=qins_attn --print-limit 20 --error-exitcode 3 \
          python3 scripts/gpu/check_attention.py "$LIB" --device cuda --quick --json /tmp/ca.json > /tmp/s.log 2>&1; r=$?
        cat /tmp/s.log >> "$OUT/sanitize_attention.log"
        echo "$tool (check_attention.py --quick): rc $r $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' /tmp/s.log | tail -1) $(grep -E 'passed' /tmp/s.log | tail -1)"
      done ;;
    bench-attention) python3 scripts/gpu/bench_attention.py "$LIB" --json "$OUT/bench_attention.json" 2>&1 | grep -v "plugin EP" | tail -40 ;;
    bench-swiglu) python3 scripts/gpu/bench_swiglu.py "$LIB" "$OUT/bench_swiglu.json" 2>&1 | grep -v "plugin EP" | tail -12 ;;
    probe-mix) python3 scripts/gpu/probe_mix.py .gpuart "$OUT/probe_mix.json" 2>&1 | tail -30 ;;
    bench-qkv) python3 scripts/gpu/bench_qkv.py "$LIB" "$OUT/bench_qkv.json" 2>&1 | grep -v "plugin EP" | tail -12 ;;
    bench) python3 scripts/gpu/bench_matmul.py "$LIB" "$OUT/bench_matmul.json" 2>&1 | grep -v "plugin EP" | tail -60 ;;
    bench-cublas) QINS_CUDA_GEMV_MAX_M=0 QINS_CUDA_PREFILL=off python3 scripts/gpu/bench_matmul.py "$LIB" "$OUT/bench_matmul_cublas.json" --qins-only 2>&1 | grep -v "plugin EP" | tail -20 ;;
    bench-pdl)
      # The QINS kernels with and without programmatic dependent launch (QINS_CUDA_PDL), one
      # after the other in one run.
      for v in 0 1; do
        BENCH_MS=${BENCH_MS:-1,4,16,128} QINS_CUDA_PDL=$v python3 scripts/gpu/bench_matmul.py "$LIB" "$OUT/bench_matmul_pdl$v.json" --qins-only 2>&1 | grep -v "plugin EP" | tail -20
      done ;;
    check-prefill2)
      # check's prefill sweep with 2 splits only (a shorter run).
      check_prefill 2 "$OUT/check-prefill2.json" ;;
    bench-quick) python3 scripts/gpu/bench_matmul.py "$LIB" "$OUT/bench_matmul.json" --quick 2>&1 | grep -v "plugin EP" | tail -40 ;;
    probe) python3 scripts/gpu/probe.py .gpuart "$OUT/probe.json" 2>&1 ;;
    probe-prefill) python3 scripts/gpu/probe_prefill.py .gpuart "$OUT/probe_prefill.json" 2>&1 | grep -v "^   \|no graph" ;;
    ncu) ncu --kernel-name regex:qins_gemv_q8_f16_m1 --launch-skip 30 --launch-count 1 --section SpeedOfLight \
           --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
           python3 scripts/gpu/probe.py .gpuart 2>&1 | grep -v "^direct" | tail -90 ;;
    decode) python3 scripts/gpu/bench_decode.py .gpuart "$OUT/bench_decode.json" 2>&1 ;;
  esac
done
