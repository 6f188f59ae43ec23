"""QinsMatMul against ONNX Runtime's own CUDA kernels, side by side, in one run.

For each Phi-3.5-mini weight shape (K x N) and M: ORT's MatMul in fp16 (cuBLAS), ORT's
MatMulNBits 8-bit and 4-bit (block 32 and 128, symmetric), and QinsMatMul q8/q6/q4 (fp16
activations), all on ORT's CUDA EP with the weights as initializers (so every peer gets its
prepacking) and the session replayed as a CUDA graph (enable_cuda_graph, one graph per M),
which removes ORT's per-node launch overhead for all alike.

Per-node time: a model of L nodes (each its own weights, L x weight bytes >= 256 MB, five times
the H100's L2, so each node streams its weights from HBM) and a model of one node are each
replayed R times; time(L-node) and time(1-node) are the medians of wall-clock replays that
end in a stream sync; per node = (median_L - median_1) / (L - 1). This cancels the fixed cost
of a Run. Bandwidth = the node's minimum bytes (weights + scales + A + Y) / time; also as a
percentage of the device-to-device copy bandwidth measured in the same run (torch, CUDA
events, read + write bytes).
argv: LIB OUT_JSON [--quick] [--qins-only]; BENCH_MS=1,4,... in the environment: other Ms.
(QINS_CUDA_GEMV_MAX_M=0 QINS_CUDA_PREFILL=off in the environment send every M through the
decode + cuBLAS path.)
"""
import json, math, os, statistics, sys, time
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(__file__))
from common import copy_bandwidth, qins_model, random_weight  # noqa: E402

LIB, OUT = sys.argv[1], sys.argv[2]
QUICK = "--quick" in sys.argv
rng = np.random.default_rng(0)
SHAPES = [(3072, 3072), (3072, 8192), (8192, 3072)]
MS = [1, 4, 16, 128, 512, 2048]
REPS = 30
TARGET_BYTES = 256e6


def fp16_model(k, n, count):
    nodes, inits, outs = [], [], []
    for i in range(count):
        w = (rng.standard_normal((k, n)) * 0.02).astype(np.float16)
        inits.append(numpy_helper.from_array(w, f"W_{i}"))
        nodes.append(helper.make_node("MatMul", ["A", f"W_{i}"], [f"Y_{i}"]))
        outs.append(helper.make_tensor_value_info(f"Y_{i}", TensorProto.FLOAT16, ["m", n]))
    g = helper.make_graph(nodes, "fp16", [helper.make_tensor_value_info("A", TensorProto.FLOAT16, ["m", k])], outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), k * n * 2


def nbits_model(k, n, bits, block, count):
    nb = -(-k // block)
    blob = block * bits // 8
    nodes, inits, outs = [], [], []
    for i in range(count):
        b = rng.integers(0, 256, size=(n, nb, blob), dtype=np.uint8)
        s = rng.uniform(0.001, 0.01, size=(n, nb)).astype(np.float16)
        inits += [numpy_helper.from_array(b, f"B_{i}"), numpy_helper.from_array(s, f"S_{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["A", f"B_{i}", f"S_{i}"], [f"Y_{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=bits, block_size=block))
        outs.append(helper.make_tensor_value_info(f"Y_{i}", TensorProto.FLOAT16, ["m", n]))
    g = helper.make_graph(nodes, "nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT16, ["m", k])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                          ir_version=10)
    return m, n * nb * (blob + 2)


def qins(k, n, bits, g, count):
    ws = [random_weight(rng, bits, k, n, g) for _ in range(count)]
    m = qins_model(k, n, bits, g, "f16", count=count, weights=ws)
    return m, ws[0][0].nbytes + ws[0][1].nbytes


VARIANTS = {
    "fp16 MatMul": lambda k, n, c: fp16_model(k, n, c),
    "MatMulNBits int8 b32": lambda k, n, c: nbits_model(k, n, 8, 32, c),
    "MatMulNBits int8 b128": lambda k, n, c: nbits_model(k, n, 8, 128, c),
    "MatMulNBits int4 b32": lambda k, n, c: nbits_model(k, n, 4, 32, c),
    "MatMulNBits int4 b128": lambda k, n, c: nbits_model(k, n, 4, 128, c),
    "QINS q8 g128": lambda k, n, c: qins(k, n, 8, 128, c),
    "QINS q6 g128": lambda k, n, c: qins(k, n, 6, 128, c),
    "QINS q4 g128": lambda k, n, c: qins(k, n, 4, 128, c),
    "QINS q4 g32": lambda k, n, c: qins(k, n, 4, 32, c),
}


def session(model):
    so = ort.SessionOptions()
    so.register_custom_ops_library(LIB)
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=[("CUDAExecutionProvider", {"device_id": 0, "enable_cuda_graph": "1"})])


def bound(s, k, n, count, m, a_np):
    a = ort.OrtValue.ortvalue_from_numpy(a_np, "cuda", 0)
    io = s.io_binding()
    io.bind_ortvalue_input("A", a)
    ys = [ort.OrtValue.ortvalue_from_shape_and_type([m, n], np.float16, "cuda", 0) for _ in range(count)]
    for i, y in enumerate(ys):
        io.bind_ortvalue_output(f"Y_{i}", y)
    return io, (a, ys)


def timed(model_1, model_l, k, n, count, ms):
    """Medians of the 1-node and the L-node model's replays, interleaved, after at least
    0.3 s of warm-up replays (the GPU clocks up from idle in that time)."""
    s1, sl = session(model_1), session(model_l)
    res = {}
    for gid, m in enumerate(ms):
        a_np = rng.standard_normal((m, k)).astype(np.float16)
        io1, keep1 = bound(s1, k, n, 1, m, a_np)
        iol, keepl = bound(sl, k, n, count, m, a_np)
        ro = ort.RunOptions()
        ro.add_run_config_entry("gpu_graph_id", str(gid + 1))
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            s1.run_with_iobinding(io1, ro)
            sl.run_with_iobinding(iol, ro)
        t1s, tls = [], []
        for _ in range(REPS):
            t = time.perf_counter()
            sl.run_with_iobinding(iol, ro)
            tls.append(time.perf_counter() - t)
            t = time.perf_counter()
            s1.run_with_iobinding(io1, ro)
            t1s.append(time.perf_counter() - t)
        res[m] = (statistics.median(t1s), statistics.median(tls))
        del io1, iol, keep1, keepl
    return res


def main():
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    shapes = SHAPES[:1] if QUICK else SHAPES
    ms = [1, 16, 512] if QUICK else MS
    if os.environ.get("BENCH_MS"):
        ms = [int(v) for v in os.environ["BENCH_MS"].split(",")]
    rows = []
    only = [v for v in VARIANTS if v.startswith("QINS")] if "--qins-only" in sys.argv else list(VARIANTS)
    for k, n in shapes:
        for name in only:
            make = VARIANTS[name]
            try:
                _, wbytes = make(k, n, 1)
                count = int(min(64, max(8, math.ceil(TARGET_BYTES / wbytes))))
                times = timed(make(k, n, 1)[0], make(k, n, count)[0], k, n, count, ms)
            except Exception as e:  # noqa: BLE001
                print(f"{name} {k}x{n}: failed: {str(e)[:300]}", flush=True)
                continue
            for m in ms:
                t1m, tlm = times[m]
                t = max((tlm - t1m) / (count - 1), 1e-9)
                moved = wbytes + 2 * m * (k + n)
                rows.append(dict(K=k, N=n, M=m, variant=name, us=t * 1e6, gbps=moved / t / 1e9, pct_copy=100 * moved / t / bw,
                                 nodes=count, run_1_us=t1m * 1e6, run_L_us=tlm * 1e6, weight_bytes=wbytes,
                                 gemv_max_m=os.environ.get("QINS_CUDA_GEMV_MAX_M", "16"),
                                 prefill=os.environ.get("QINS_CUDA_PREFILL", "auto")))
                print(f"{k}x{n} M={m:<5} {name:<22} {t * 1e6:9.2f} us {moved / t / 1e9:8.0f} GB/s {100 * moved / t / bw:5.1f}% copy",
                      flush=True)
    json.dump(dict(device=device_name(), copy_gbps=bw / 1e9, reps=REPS, rows=rows), open(OUT, "w"), indent=1)
    table(rows)


def device_name():
    try:
        import torch
        return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        return "?"


def table(rows):
    by = {}
    for r in rows:
        by.setdefault((r["K"], r["N"], r["M"]), {})[r["variant"]] = r["us"]
    names = list(VARIANTS)
    print("\nus per matmul (K x N, M):", " | ".join(names))
    for (k, n, m), d in by.items():
        print(f"{k}x{n} M={m:<5}", " ".join(f"{d.get(v, float('nan')):8.2f}" for v in names))


main()
