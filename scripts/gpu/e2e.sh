#!/usr/bin/env bash
# End to end on the GPU machine: full-size Phi-3.5-mini (random weights, real shapes) built by
# the public onnxruntime-genai builder (fp16, MatMulNBits int8 and int4), rewritten by `qins
# rewrite` (q8 g128, q4 g32; `rewrite-all`: also at MatMulNBits' coverage), and timed by
# `qins-bench generate --device cuda --cuda-graph` (the generation engine, KV cache on the GPU:
# its IOBinding loop, then its CUDA-graph loop), all models in one run. `graph`: the Python
# prototype of the graph loop (scripts/gpu/graph_decode.py), as a cross-check.
#   bash scripts/gpu/e2e.sh hf build-fp16 build-int4 build-int8 rewrite [rewrite-all] [rewrite-nofuse] [rewrite-split] bench [bench-tiles1]
#     [bench-noprefill] [bench-pdl] [graph] [rewrite-kvv bench-long memory] [genai-cuda]   (after run.sh unpacked ORT GPU)
# Carried: .e2e/ with qins, qins-bench, libqins_provider.so (scripts/gpu/stage.sh --e2e),
# the onnxruntime-genai 0.18.0 cp312 wheel, device-phi35.py and fx/tokenizer.json
# (../shared/data/phi3-tokenizer.json).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
E=$PWD/.e2e
W=/tmp/p35
export PYTHONPATH=/tmp/genai:/tmp/ortgpu${PYTHONPATH:+:$PYTHONPATH}
export ORT_DYLIB_PATH=/tmp/ortgpu/onnxruntime/capi/libonnxruntime.so.1.31.1
export LD_LIBRARY_PATH=/tmp/ortgpu/onnxruntime/capi${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export QINS_PROVIDER_LIB=$E/libqins_provider.so
[ -d /tmp/genai/onnxruntime_genai ] || python3 -m pip install -q --no-deps --target /tmp/genai "$E"/onnxruntime_genai-*.whl
# The model folders the build and rewrite steps have made so far, in table order.
built_models() {
  for m in onnx-fp16 onnx-int8 onnx-int4 qins-q8 qins-q4 qins-q8-split qins-q4-split qins-q8-all qins-q4-all qins-q4-nofuse qins-q4-all-nofuse; do
    [ -d $W/$m ] && echo $W/$m
  done
}
# `--include lm_head` where the builder's int4 model quantized lm_head (for MatMulNBits'
# coverage in the "all" rewrites), else nothing.
int4_extra() {
  python3 -c "import onnx; m = onnx.load('$W/onnx-int4/model.onnx', load_external_data=False); \
    print('--include lm_head' if any('lm_head' in n.name for n in m.graph.node if n.op_type == 'MatMulNBits') else '')"
}
for step in "$@"; do
  case $step in
    hf) python3 "$E/device-phi35.py" hf "$E/fx" 2>&1 | tail -3 ;;
    build-*) python3 "$E/device-phi35.py" build "$E/fx" "${step#build-}" 2>&1 | tail -5; du -sh $W/onnx-* ;;
    rewrite)
      "$E/qins" rewrite $W/onnx-fp16 -o $W/qins-q8 --bits 8 --group 128 --no-library --force -q --json "$OUT/rewrite-q8.json" 2>&1 | tail -3
      "$E/qins" rewrite $W/onnx-fp16 -o $W/qins-q4 --bits 4 --group 32 --no-library --force -q --json "$OUT/rewrite-q4.json" 2>&1 | tail -3
      du -sh $W/qins-* ;;
    rewrite-all)
      # MatMulNBits' coverage instead of the default one: the whole qkv projection too (and
      # lm_head where the builder's int4 model quantized it), for a comparison at equal bytes.
      extra=$(int4_extra)
      echo "MatMulNBits int4 coverage: $(python3 -c "import onnx, collections; m = onnx.load('$W/onnx-int4/model.onnx', load_external_data=False); \
        print(dict(collections.Counter(n.name.split('/')[-2] for n in m.graph.node if n.op_type == 'MatMulNBits')))")"
      "$E/qins" rewrite $W/onnx-fp16 -o $W/qins-q4-all --bits 4 --group 32 --include qkv_proj $extra --no-library --force -q \
        --json "$OUT/rewrite-q4-all.json" 2>&1 | tail -3
      "$E/qins" rewrite $W/onnx-fp16 -o $W/qins-q8-all --bits 8 --group 128 --include qkv_proj $extra --no-library --force -q \
        --json "$OUT/rewrite-q8-all.json" 2>&1 | tail -3
      du -sh $W/qins-*-all ;;
    rewrite-nofuse)
      # q4 with gate and up left as two QinsMatMuls and the graph's own SiLU (--no-fuse-mlp),
      # to show what the fused SwiGLU op gives in the same run.
      "$E/qins" rewrite $W/onnx-fp16 -o $W/qins-q4-nofuse --bits 4 --group 32 --no-fuse-mlp --force -q 2>&1 | tail -3
      [ -d $W/qins-q4-all ] && "$E/qins" rewrite $W/onnx-fp16 -o $W/qins-q4-all-nofuse --bits 4 --group 32 \
        --include qkv_proj $(int4_extra) --no-fuse-mlp --force -q 2>&1 | tail -3
      du -sh $W/qins-*-nofuse ;;
    rewrite-split)
      # q8 and q4 with each qkv written as a f16 MatMul, a QinsMatMul and a Concat
      # (--no-fuse-qkv), to show what the mixed node (float_weight) gives in the same run.
      "$E/qins" rewrite $W/onnx-fp16 -o $W/qins-q8-split --bits 8 --group 128 --no-fuse-qkv --force -q 2>&1 | tail -3
      "$E/qins" rewrite $W/onnx-fp16 -o $W/qins-q4-split --bits 4 --group 32 --no-fuse-qkv --force -q 2>&1 | tail -3
      du -sh $W/qins-*-split ;;
    rewrite-kvv)
      # KV-V: q4 weights with the V cache as QINS q8 rows, and the fp16 model with only its V
      # cache coded (--preset none), beside the models without it.
      "$E/qins" rewrite $W/onnx-fp16 -o $W/qins-q4-kvq8 --bits 4 --group 32 --kv-v q8 --no-library --force -q 2>&1 | tail -3
      "$E/qins" rewrite $W/onnx-fp16 -o $W/onnx-fp16-kvq8 --preset none --kv-v q8 --no-library --force -q 2>&1 | tail -3
      du -sh $W/*kvq8 ;;
    bench-long)
      # Decode after a 3800-token prompt (within Phi-3.5's 4096 of original context, where the
      # CUDA-graph loop runs), every built model with and without KV-V, one run.
      "$E/qins-bench" generate $(built_models) $(ls -d $W/*kvq8 2>/dev/null) --device cuda \
        --prefill 1024 --decode-prompt 3800 --new-tokens 128 --reps 3 --cuda-graph --json "$OUT/e2e-long.json" 2>&1 | tail -14 ;;
    memory)
      # Device memory the engine needs at 4k and 8k context, with and without KV-V: the peak of
      # nvidia-smi's memory.used (sampled every 50 ms) over one process per model and length,
      # less the idle GPU's, for a prompt of that length and 16 tokens (IOBinding loop: the
      # CUDA-graph loop stops at the original 4096 positions).
      base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
      echo '{"idle_mib": '"$base"', "runs": [' > "$OUT/e2e-memory.json"; sep=""
      for m in $W/onnx-fp16 $W/onnx-fp16-kvq8 $W/qins-q4 $W/qins-q4-kvq8; do for n in 4000 8000; do
        [ -d $m ] || continue
        rm -f /tmp/mem.stop /tmp/mem.peak
        (peak=0; while [ ! -f /tmp/mem.stop ]; do u=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
          [ "$u" -gt "$peak" ] && peak=$u && echo $peak > /tmp/mem.peak; sleep 0.05; done) &
        "$E/qins-bench" generate $m --device cuda --prefill $n --decode-prompt $n --new-tokens 16 --reps 1 > /tmp/mem.log 2>&1
        rc=$?; touch /tmp/mem.stop; wait
        p=$(cat /tmp/mem.peak 2>/dev/null || echo 0)
        echo "$(basename $m) context $n: peak $p MiB, $((p - base)) MiB above idle (rc $rc)"
        echo "$sep{\"model\": \"$(basename $m)\", \"context\": $n, \"peak_mib\": $p, \"rc\": $rc}" >> "$OUT/e2e-memory.json"; sep=","
      done; done
      echo "]}" >> "$OUT/e2e-memory.json" ;;
    genai-cuda)
      # onnxruntime-genai's CUDA build (the onnxruntime-genai-cuda wheel, carried in .e2e; it
      # runs on the unpacked ORT GPU) on QINS q4 as `qins rewrite` writes it (the library placed
      # and named in genai_config.json), beside genai's own int4 model, then the engine's
      # numbers come from `bench` in the same run. Not run yet (written without a GPU).
      [ -d /tmp/genai-cuda/onnxruntime_genai ] || python3 -m pip install -q --no-deps --target /tmp/genai-cuda \
        "$E"/onnxruntime_genai_cuda-*.whl
      "$E/qins" rewrite $W/onnx-fp16 -o $W/qins-q4-genai --bits 4 --group 32 --provider-lib "$E/libqins_provider.so" \
        --force -q 2>&1 | tail -2
      PYTHONPATH=/tmp/genai-cuda:/tmp/ortgpu python3 scripts/gpu/genai_speed.py $W/qins-q4-genai $W/onnx-int4 $W/onnx-fp16 \
        --json "$OUT/genai-cuda.json" 2>&1 | tail -5 ;;
    graph)
      # The decode step replayed from a CUDA graph by a Python prototype of the engine's
      # graph loop, as a cross-check of its numbers.
      python3 scripts/gpu/graph_decode.py $(built_models) --json "$OUT/graph-decode.json" 2>&1 | grep -v "^\s*$" | tail -20 ;;
    bench)
      "$E/qins-bench" generate $(built_models) --device cuda \
        --prefill 128,1024 --decode-prompt 128 --new-tokens 128 --reps 3 --cuda-graph --json "$OUT/e2e.json" 2>&1 | tail -14 ;;
    bench-tiles1)
      # The same QINS models with the tensor-core kernel held to 16 channels a block (the
      # launcher's tc_tiles), to show what the wider blocks give end to end.
      QINS_CUDA_TC_MAX_TILES=1 "$E/qins-bench" generate $W/qins-q4 $W/qins-q4-all $W/qins-q8 --device cuda \
        --prefill 128 --decode-prompt 128 --new-tokens 128 --reps 3 --cuda-graph --json "$OUT/e2e-tiles1.json" 2>&1 | tail -6 ;;
    bench-pdl)
      # The QINS models with overlapped launches (QINS_CUDA_PDL=1; off by default), for the
      # effect of programmatic dependent launch.
      QINS_CUDA_PDL=1 "$E/qins-bench" generate $W/qins-q8 $W/qins-q4 $W/qins-q8-all $W/qins-q4-all --device cuda \
        --prefill 128 --decode-prompt 128 --new-tokens 128 --reps 3 --cuda-graph --json "$OUT/e2e-pdl.json" 2>&1 | tail -8 ;;
    bench-noprefill)
      # The QINS models with the prefill kernel off (decode + cuBLAS above 16 rows, as before
      # it), for the prefill columns.
      QINS_CUDA_PREFILL=off "$E/qins-bench" generate $W/qins-q8 $W/qins-q4 $W/qins-q8-all $W/qins-q4-all --device cuda \
        --prefill 128,1024 --decode-prompt 128 --new-tokens 16 --reps 3 --cuda-graph --json "$OUT/e2e-noprefill.json" 2>&1 | tail -8 ;;
  esac
done
