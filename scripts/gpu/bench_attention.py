"""Decode attention on CUDA: com.qins.QinsGroupQueryAttention (V cache as QINS q8 rows) against
ONNX Runtime's com.microsoft.GroupQueryAttention with an fp16 cache and with its int8 cache.

    python bench_attention.py LIB --json OUT.json [--quick] [--dry-build]

For (num_heads, kv_num_heads, head size) in Phi-3.5-mini's (32, 32, 96) and SmolLM2's (9, 3, 64),
batch 1 and 8, contexts 1024 / 4096 / 16384 / 32768 (--quick: 1024 / 4096, batch 1), fp16:
  qins-q8    QinsGroupQueryAttention, v_bits 8 (K fp16, V rows of D + 4 bytes);
  gqa-fp16   GroupQueryAttention, fp16 K and V cache;
  gqa-int8   GroupQueryAttention, int8 K and V cache (k_quant_type / v_quant_type PER_TENSOR,
             kv_cache_bit_width 8, k_scale / v_scale float [1] initializers = 0.05 as inputs 12
             and 13; inputs 9..11 empty).
Each is a single node with S = 1 (one new token after ctx cached ones in every sequence),
do_rotary = 1, rotary_interleaved = 0, cos/sin caches as initializers, and past and present bound
with IoBinding to ONE device buffer of ctx + 1 positions (as onnxruntime-genai's
past_present_share_buffer does), so a run is the attention and the new row's write, not a copy
of the cache.

Timing: warm-up 10 runs, then 50 blocks of 20 runs, each block timed with time.perf_counter and
ended by io.synchronize_outputs(); the median block / 20. Runs carry the run option
disable_synchronize_execution_providers = 1, so that a run does not wait for the GPU and launches
overlap like a decode loop's; the block's final synchronize waits for all of them.
Bytes: the K and V cache bytes the ctx cached positions hold, over all sequences and KV heads:
qins-q8 2 D + (D + 4) per position and KV head, gqa-fp16 4 D, gqa-int8 2 D. GB/s = bytes / time;
% copy = that over the device-to-device copy bandwidth measured in the same run (torch, a 1 GiB
buffer, CUDA events, read + write bytes); omitted without torch.
A variant that fails to build or run (e.g. ORT refusing the int8 cache) keeps its error in its
row and the sweep goes on.

--dry-build: no GPU needed. Builds every model of the sweep, saves them under a temporary folder,
loads each with the CPU provider (all three ops exist on the CPU) and runs the smallest case's
timing loop once on the CPU with CPU buffers, then exits.
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth as common_copy_bandwidth, ort_session, rope_tables  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("lib")
ap.add_argument("--json")
ap.add_argument("--quick", action="store_true")
ap.add_argument("--dry-build", action="store_true", help="build, save and load the models on the CPU, then exit")
args = ap.parse_args()
LIB = os.path.abspath(args.lib)
if not os.path.isfile(LIB):
    sys.exit(f"{LIB}: no such library")

SHAPES = [("phi3.5", 32, 32, 96), ("smollm2", 9, 3, 64)]
BATCHES = [1] if args.quick else [1, 8]
CONTEXTS = [1024, 4096] if args.quick else [1024, 4096, 16384, 32768]
VARIANTS = ["qins-q8", "gqa-fp16", "gqa-int8"]
WARMUP, BLOCKS, INNER = 10, 50, 20
INT8_SCALE = 0.05


def v_row_bytes(d):
    return d + 4  # q8: one code a value, then the row's f32 scale


def bytes_read(variant, b, kvh, d, ctx):
    per = {"qins-q8": 2 * d + v_row_bytes(d), "gqa-fp16": 4 * d, "gqa-int8": 2 * d}[variant]
    return b * kvh * ctx * per


def build(variant, h, kvh, d, ctx):
    """The single-node model of one variant. Shapes are symbolic: the same model would serve
    any batch and buffer length; ctx only sizes the rotary caches (ctx + 1 positions)."""
    f16 = TensorProto.FLOAT16
    cache_t = {"qins-q8": TensorProto.UINT8, "gqa-fp16": f16, "gqa-int8": TensorProto.INT8}[variant]
    key_t = TensorProto.INT8 if variant == "gqa-int8" else f16
    v_last = v_row_bytes(d) if variant == "qins-q8" else d
    inputs = [
        helper.make_tensor_value_info("query", f16, ["B", 1, (h + 2 * kvh) * d]),
        helper.make_tensor_value_info("past_key", key_t, ["B", kvh, "P", d]),
        helper.make_tensor_value_info("past_value", cache_t, ["B", kvh, "P", v_last]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [1]),
    ]
    outputs = [
        helper.make_tensor_value_info("output", f16, ["B", 1, h * d]),
        helper.make_tensor_value_info("present_key", key_t, ["B", kvh, "P", d]),
        helper.make_tensor_value_info("present_value", cache_t, ["B", kvh, "P", v_last]),
    ]
    cos, sin = rope_tables(ctx + 1, d, np.float16)
    inits = [numpy_helper.from_array(cos, "cos_cache"), numpy_helper.from_array(sin, "sin_cache")]
    ins = ["query", "", "", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"]
    attrs = dict(num_heads=h, kv_num_heads=kvh, do_rotary=1, rotary_interleaved=0)
    if variant == "qins-q8":
        node = helper.make_node("QinsGroupQueryAttention", ins, ["output", "present_key", "present_value"],
                                domain="com.qins", name="attn", v_bits=8, **attrs)
    else:
        if variant == "gqa-int8":
            # 9 position_ids, 10 attention_bias, 11 head_sink: absent; 12 k_scale, 13 v_scale.
            ins += ["", "", "", "k_scale", "v_scale"]
            scale = np.array([INT8_SCALE], np.float32)
            inits += [numpy_helper.from_array(scale, "k_scale"), numpy_helper.from_array(scale, "v_scale")]
            attrs.update(k_quant_type="PER_TENSOR", v_quant_type="PER_TENSOR", kv_cache_bit_width=8)
        node = helper.make_node("GroupQueryAttention", ins, ["output", "present_key", "present_value"],
                                domain="com.microsoft", name="attn", **attrs)
    g = helper.make_graph([node], variant, inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.qins", 1), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(g, opset_imports=opsets, ir_version=9)


def session(m, device):
    return ort_session(LIB, m, device)


def caches(rng, variant, b, kvh, d, positions):
    """Host arrays of the past/present buffer: a random block of up to 1024 positions tiled
    along the positions (random data at the size of 8 x 32k contexts would take minutes)."""
    blk = min(positions, 1024)
    reps = -(-positions // blk)

    def tile(x):
        return np.ascontiguousarray(np.tile(x, (1, 1, reps, 1))[:, :, :positions])

    if variant == "gqa-int8":
        k = rng.integers(-127, 128, size=(b, kvh, blk, d), dtype=np.int8)
        v = rng.integers(-127, 128, size=(b, kvh, blk, d), dtype=np.int8)
    else:
        k = rng.standard_normal((b, kvh, blk, d)).astype(np.float16)
        if variant == "gqa-fp16":
            v = (rng.standard_normal((b, kvh, blk, d)) * 0.5).astype(np.float16)
        else:
            # Valid QINS q8 rows: any code, then the row's scale (an f32, little-endian).
            v = np.empty((b, kvh, blk, v_row_bytes(d)), np.uint8)
            v[..., :d] = rng.integers(0, 256, size=(b, kvh, blk, d), dtype=np.uint8)
            v[..., d:] = np.frombuffer(np.float32(0.05).tobytes(), np.uint8)
    return tile(k), tile(v)


def time_variant(sess, device, rng, variant, b, h, kvh, d, ctx, warmup=WARMUP, blocks=BLOCKS, inner=INNER):
    """(seconds per run: the median of `blocks` timed blocks of `inner` runs, whether the last
    output was finite)."""
    dev = "cuda" if device == "cuda" else "cpu"
    pk, pv = caches(rng, variant, b, kvh, d, ctx + 1)
    q = rng.standard_normal((b, 1, (h + 2 * kvh) * d)).astype(np.float16)
    vals = {
        "query": ort.OrtValue.ortvalue_from_numpy(q, dev, 0),
        # ctx cached tokens + the new one in every sequence: total length ctx + 1 = the buffer.
        "seqlens_k": ort.OrtValue.ortvalue_from_numpy(np.full(b, ctx, np.int32), dev, 0),
        "past_key": ort.OrtValue.ortvalue_from_numpy(pk, dev, 0),
        "past_value": ort.OrtValue.ortvalue_from_numpy(pv, dev, 0),
        "output": ort.OrtValue.ortvalue_from_numpy(np.zeros((b, 1, h * d), np.float16), dev, 0),
    }
    del pk, pv
    total = np.array([ctx + 1], np.int32)
    io = sess.io_binding()
    io.bind_ortvalue_input("query", vals["query"])
    io.bind_ortvalue_input("seqlens_k", vals["seqlens_k"])
    # total_sequence_length is a host input of GroupQueryAttention on CUDA; ORT moves it where
    # a kernel wants it.
    io.bind_cpu_input("total_sequence_length", total)
    # One buffer each for K and V, bound as past and present.
    io.bind_ortvalue_input("past_key", vals["past_key"])
    io.bind_ortvalue_input("past_value", vals["past_value"])
    io.bind_ortvalue_output("output", vals["output"])
    io.bind_ortvalue_output("present_key", vals["past_key"])
    io.bind_ortvalue_output("present_value", vals["past_value"])
    ro = ort.RunOptions()
    ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
    for _ in range(warmup):
        sess.run_with_iobinding(io, ro)
    io.synchronize_outputs()
    ts = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(inner):
            sess.run_with_iobinding(io, ro)
        io.synchronize_outputs()
        ts.append((time.perf_counter() - t0) / inner)
    # A sanity look at the output (not a parity check: scripts/gpu/check_attention.py is that);
    # None where the output cannot be read back, which must not lose the timing.
    try:
        finite = bool(np.isfinite(vals["output"].numpy().astype(np.float32)).all())
    except Exception:  # noqa: BLE001
        finite = None
    del io, vals
    return statistics.median(ts), finite


def copy_bandwidth():
    """common.copy_bandwidth, or None without torch and a GPU (then no percentage)."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except Exception:  # noqa: BLE001
        return None
    return common_copy_bandwidth()


def device_name():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return "?"


def short(e):
    return " ".join(str(e).split())[:400]


def dry_build():
    folder = tempfile.mkdtemp(prefix="bench_attention_")
    n = 0
    for name, h, kvh, d in SHAPES:
        for ctx in CONTEXTS:
            for v in VARIANTS:
                path = os.path.join(folder, f"{name}-ctx{ctx}-{v}.onnx")
                m = build(v, h, kvh, d, ctx)
                onnx.checker.check_model(m)  # the ONNX checker skips the custom domains' schemas
                onnx.save(m, path)
                session(path, "cpu")
                n += 1
    print(f"built, saved and loaded on the CPU {n} models under {folder}")
    # The harness itself, once, on the CPU: the smallest case of each shape, a few runs.
    rng = np.random.default_rng(0)
    ctx = CONTEXTS[0]
    for name, h, kvh, d in SHAPES:
        for v in VARIANTS:
            try:
                t, finite = time_variant(session(build(v, h, kvh, d, ctx), "cpu"), "cpu", rng, v, 1, h, kvh, d,
                                         ctx, warmup=1, blocks=2, inner=2)
                print(f"cpu run {name} ctx {ctx} {v}: {t * 1e6:.0f} us, output finite: {finite}")
            except Exception as e:  # noqa: BLE001
                print(f"cpu run {name} ctx {ctx} {v}: error {short(e)}")


def main():
    if args.dry_build:
        dry_build()
        return
    print(f"onnxruntime {ort.__version__} {ort.get_available_providers()}", flush=True)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit("no CUDAExecutionProvider in this onnxruntime (use --dry-build without a GPU)")
    dev_name = device_name()
    bw = copy_bandwidth()
    print(f"device {dev_name}, copy {bw / 1e9:.0f} GB/s" if bw else f"device {dev_name}, no torch: no copy bandwidth",
          flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for name, h, kvh, d in SHAPES:
        for ctx in CONTEXTS:
            for b in BATCHES:
                for v in VARIANTS:
                    row = dict(model=name, H=h, KVH=kvh, D=d, batch=b, ctx=ctx, variant=v,
                               bytes=bytes_read(v, b, kvh, d, ctx))
                    try:
                        sess = session(build(v, h, kvh, d, ctx), "cuda")
                        t, finite = time_variant(sess, "cuda", rng, v, b, h, kvh, d, ctx)
                        row.update(us=t * 1e6, gbs=row["bytes"] / t / 1e9, output_finite=finite)
                        if bw:
                            row["pct_copy"] = 100 * row["bytes"] / t / bw
                    except Exception as e:  # noqa: BLE001 (recorded in the row; the sweep goes on)
                        row["error"] = short(e)
                    sess = None
                    gc.collect()
                    rows.append(row)
                    if "error" in row:
                        print(f"{name:8} b{b} ctx {ctx:6} {v:9} error: {row['error']}", flush=True)
                    else:
                        pct = f" {row['pct_copy']:5.1f}% copy" if "pct_copy" in row else ""
                        print(f"{name:8} b{b} ctx {ctx:6} {v:9} {row['us']:9.1f} us {row['gbs']:7.0f} GB/s{pct}",
                              flush=True)
    table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev_name, onnxruntime=ort.__version__, copy_gbs=bw / 1e9 if bw else None,
                           warmup=WARMUP, blocks=BLOCKS, inner=INNER, rows=rows), f, indent=1)


def table(rows):
    print("\nmicroseconds per decode step (GB/s of cache read, % of copy):")
    print(f"{'model':8} {'b':>2} {'ctx':>6}  " + "  ".join(f"{v:>26}" for v in VARIANTS))
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["batch"], r["ctx"]), {})[r["variant"]] = r
    for (m, b, ctx), d in by.items():
        cells = []
        for v in VARIANTS:
            r = d.get(v)
            if r is None or "error" in r:
                cells.append(f"{'error':>26}")
            else:
                pct = f" {r['pct_copy']:4.0f}%" if "pct_copy" in r else ""
                cells.append(f"{r['us']:9.1f} ({r['gbs']:5.0f} GB/s{pct})".rjust(26))
        print(f"{m:8} {b:>2} {ctx:>6}  " + "  ".join(cells))


main()
