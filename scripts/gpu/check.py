"""GPU parity of QinsMatMul: the CUDA kernels against the library's CPU kernel, in ONNX Runtime.

Run on the GPU machine with ORT GPU staged (scripts/gpu/run.sh). For every case: fresh random
data (the seed is printed), the CUDA output buffer poisoned with NaN before the run, and the
normalised error |y_cuda - y_cpu|^2 / |y_cpu|^2 checked against a tolerance derived from the
activation type:
  f16: 16 u^2 with u = 2^-11 (the f16 unit roundoff; decode + cuBLAS and the prefill kernel
       round decoded weights to f16, the tensor-core path rounds table values to f16, the
       CUDA-core path rounds only the output);
  f32: 16 u^2 with u = 2^-24 times K (accumulation order), except that decode + cuBLAS runs
       on ORT's cuBLAS handle, whose TF32 setting it inherits: 16 (2^-11)^2 there.
The fused SwiGLU (swiglu=1) and mixed nodes (a float_weight input: one tensor-core launch up to
M = 16 with f16, else cuBLAS for the float part and a column copy) run the same way over their
own shapes.
Also: a CUDA graph (enable_cuda_graph) replayed with new inputs must give new, right outputs;
chains of three nodes, each reading the previous one's output (the kernels overlap their
predecessor where QINS_CUDA_PDL=1, as run.sh's check sets), plain and in a CUDA graph.
--prefill C:S runs only the cases the prefill kernel can take (f16, tensor-core layouts,
M > 16), with QINS_CUDA_PREFILL=C:S: configuration C of its launcher with S K-splits.
argv: LIB [--quick] [--max-m M] [--prefill C:S] [--json PATH]
"""
import json, os, sys, time
import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(__file__))
from common import qins_model, random_weight  # noqa: E402

LIB = sys.argv[1]
QUICK = "--quick" in sys.argv
JSON = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
# --max-m 4: the code-domain kernel only (racecheck cannot follow cuBLAS's kernels).
MAX_M = int(sys.argv[sys.argv.index("--max-m") + 1]) if "--max-m" in sys.argv else 1 << 30
PREFILL = sys.argv[sys.argv.index("--prefill") + 1] if "--prefill" in sys.argv else None
if PREFILL:
    # Read by the library when the first node runs.
    os.environ["QINS_CUDA_PREFILL"] = PREFILL
seed = int(time.time() * 1000) % (2**31)
print(f"seed {seed}, onnxruntime {ort.__version__}", flush=True)
rng = np.random.default_rng(seed)

# The library's dispatch (provider/src/cuda/qins_matmul/gemv.rs): the tensor-core kernel up to
# M = 16 where it applies, then the prefill kernel or decode + cuBLAS, as its launcher's time
# model picks ("prefill|cublas"); the CUDA-core kernel up to M = 4 elsewhere, decode + cuBLAS
# above.
TC_MAX_M, GEMV_MAX_M = 16, 4


def tc_layout(bits, act, k, g):
    ch = 32 if bits == 4 else 16
    groups = -(-k // g)
    return (act == "f16" and bits in (8, 6, 4) and k % 8 == 0
            and (groups == 1 or (g % ch == 0 and ((g // ch) & (g // ch - 1)) == 0)))


def path_of(bits, act, k, g, m):
    if tc_layout(bits, act, k, g):
        if m <= TC_MAX_M:
            return "tensor-core"
        return f"prefill {PREFILL}" if PREFILL else "prefill|cublas"
    return "cuda-core" if m <= GEMV_MAX_M else "decode+cublas"


def session(model, cuda, graph=False):
    so = ort.SessionOptions()
    so.register_custom_ops_library(LIB)
    so.log_severity_level = 3
    if cuda:
        opts = {"device_id": 0}
        if graph:
            opts["enable_cuda_graph"] = "1"
        prov = [("CUDAExecutionProvider", opts)]
    else:
        prov = ["CPUExecutionProvider"]
    return ort.InferenceSession(model.SerializeToString(), so, providers=prov)


def tolerance(act, k, path):
    if act == "f16" or "cublas" in path:
        return 16 * 2.0**-22
    return 16 * 2.0**-48 * k


def run_case(bits, act, k, n, g, ms, swiglu=False, nf=0):
    codes, scales = random_weight(rng, bits, k, n, g)
    model = qins_model(k, n, bits, g, act, swiglu=swiglu, nf=nf)
    cpu, gpu = session(model, False), session(model, True)
    assert "CUDAExecutionProvider" in gpu.get_providers()
    dt = np.float16 if act == "f16" else np.float32
    out = []
    for m in ms:
        a = rng.standard_normal((m, k)).astype(dt)
        feeds = {"A": a, "codes_0": codes, "scales_0": scales}
        if nf:
            feeds["WF_0"] = rng.standard_normal((nf, k)).astype(dt)
        ref = cpu.run(None, feeds)[0].astype(np.float64)
        io = gpu.io_binding()
        for name, v in feeds.items():
            io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0))
        y = ort.OrtValue.ortvalue_from_numpy(np.full((m, n // 2 if swiglu else nf + n), np.nan, dtype=dt), "cuda", 0)
        io.bind_ortvalue_output("Y_0", y)
        gpu.run_with_iobinding(io)
        got = y.numpy().astype(np.float64)
        finite = bool(np.isfinite(got).all())
        # A mixed node's two parts separately: the float part's larger values would otherwise
        # hide the QINS part's error.
        parts = [slice(0, nf), slice(nf, None)] if nf else [slice(None)]
        nmse = max(float(((got[:, p] - ref[:, p]) ** 2).sum() / max((ref[:, p] ** 2).sum(), 1e-30)) for p in parts) \
            if finite else float("inf")
        path = path_of(bits, act, k, g, m)
        tol = tolerance(act, k, path)
        if swiglu:
            # Fused in the tensor-core kernel; elsewhere a [M, N] product, then qins_swiglu_*.
            path = ("swiglu " if path == "tensor-core" else "swiglu+") + path
        if nf:
            # One launch for both parts on the tensor-core kernel; elsewhere the float part on
            # cuBLAS (TF32 for f32, as ORT's handle is set), so its tolerance.
            if path == "tensor-core":
                path = "mixed tensor-core"
            else:
                path = "mixed cublas+" + path
                tol = tolerance(act, k, path)
        ok = finite and nmse <= tol
        out.append(dict(bits=bits, act=act, K=k, N=n, G=g, M=m, nmse=nmse, tol=tol, ok=ok, path=path, swiglu=swiglu,
                        nf=nf))
        print(f"{'ok  ' if ok else 'FAIL'} q{bits:<2} {act} K={k:<5} N={n:<5} G={g:<5} M={m:<5} {path:<14} nmse {nmse:.2e} (tol {tol:.1e})",
              flush=True)
    return out


def graph_case():
    """Replays of a captured graph must follow new inputs (nothing baked in at capture)."""
    k, n, g, bits = 512, 384, 128, 4
    codes, scales = random_weight(rng, bits, k, n, g)
    model = qins_model(k, n, bits, g, "f16")
    cpu, gpu = session(model, False), session(model, True, graph=True)
    a_dev = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, k), np.float16), "cuda", 0)
    c_dev = ort.OrtValue.ortvalue_from_numpy(codes, "cuda", 0)
    s_dev = ort.OrtValue.ortvalue_from_numpy(scales, "cuda", 0)
    y_dev = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, n), np.float16), "cuda", 0)
    io = gpu.io_binding()
    io.bind_ortvalue_input("A", a_dev)
    io.bind_ortvalue_input("codes_0", c_dev)
    io.bind_ortvalue_input("scales_0", s_dev)
    io.bind_ortvalue_output("Y_0", y_dev)
    worst = 0.0
    for i in range(6):
        a = rng.standard_normal((1, k)).astype(np.float16)
        a_dev.update_inplace(a)
        gpu.run_with_iobinding(io)
        ref = cpu.run(None, {"A": a, "codes_0": codes, "scales_0": scales})[0].astype(np.float64)
        got = y_dev.numpy().astype(np.float64)
        worst = max(worst, float(((got - ref) ** 2).sum() / (ref**2).sum()))
    ok = worst <= tolerance("f16", k, "tensor-core")
    print(f"{'ok  ' if ok else 'FAIL'} CUDA graph: 6 runs (graph captured after warm-up) with new inputs, worst nmse {worst:.2e}",
          flush=True)
    return [dict(case="cuda_graph", nmse=worst, ok=ok)]


def chain_model(k, bits, g, act, weights):
    """A = X + X, then three QinsMatMul nodes in a row (K = N = k, initializer weights), each
    reading the output of the one before: the launcher overlaps each kernel with the previous
    one (programmatic dependent launch), so a kernel that read A before its predecessor was done
    would read stale or poisoned values here."""
    from onnx import TensorProto, helper, numpy_helper
    t = TensorProto.FLOAT16 if act == "f16" else TensorProto.FLOAT
    nodes = [helper.make_node("Add", ["X", "X"], ["A0"])]
    inits = []
    for i, (c, s) in enumerate(weights):
        inits += [numpy_helper.from_array(c, f"codes_{i}"), numpy_helper.from_array(s, f"scales_{i}")]
        nodes.append(helper.make_node("QinsMatMul", [f"A{i}", f"codes_{i}", f"scales_{i}"], [f"A{i + 1}"],
                                      domain="com.qins", K=k, N=k, bits=bits, group_size=g))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("X", t, ["m", k])],
                              [helper.make_tensor_value_info(f"A{len(weights)}", t, ["m", k])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.qins", 1)],
                             ir_version=10)


def chain_cases():
    """Kernels that overlap their predecessor: a chain of three nodes against the CPU kernel,
    plain runs at every path's M, then a CUDA graph replayed with new inputs. Tolerance: three
    times one node's (the errors of three roundings add)."""
    out = []
    k = 1024
    for bits, g, act in ((8, 128, "f16"), (4, 32, "f16"), (4, 32, "f32")):
        weights = [random_weight(rng, bits, k, k, g) for _ in range(3)]
        model = chain_model(k, bits, g, act, weights)
        cpu = session(model, False)
        dt = np.float16 if act == "f16" else np.float32
        for graph in (False, True):
            gpu = session(model, True, graph=graph)
            for m in [m for m in ((1,) if graph else (1, 4, 16, 17, 64, 300)) if m <= MAX_M]:
                x_dev = ort.OrtValue.ortvalue_from_numpy(np.zeros((m, k), dt), "cuda", 0)
                y_dev = ort.OrtValue.ortvalue_from_numpy(np.full((m, k), np.nan, dt), "cuda", 0)
                io = gpu.io_binding()
                io.bind_ortvalue_input("X", x_dev)
                io.bind_ortvalue_output("A3", y_dev)
                worst = 0.0
                for _ in range(4 if graph else 1):
                    x = (0.5 * rng.standard_normal((m, k))).astype(dt)
                    x_dev.update_inplace(x)
                    gpu.run_with_iobinding(io)
                    ref = cpu.run(None, {"X": x})[0].astype(np.float64)
                    got = y_dev.numpy().astype(np.float64)
                    e = float(((got - ref) ** 2).sum() / (ref**2).sum()) if np.isfinite(got).all() else float("inf")
                    worst = max(worst, e)
                path = path_of(bits, act, k, g, m)
                tol = 3 * tolerance(act, k, path)
                ok = worst <= tol
                label = f"chain of 3{' in a CUDA graph' if graph else ''}"
                out.append(dict(case="chain", graph=graph, bits=bits, act=act, K=k, N=k, G=g, M=m, nmse=worst, tol=tol,
                                ok=ok, path=path))
                print(f"{'ok  ' if ok else 'FAIL'} q{bits:<2} {act} K={k:<5} N={k:<5} G={g:<5} M={m:<5} {path:<14} "
                      f"nmse {worst:.2e} (tol {tol:.1e}) {label}", flush=True)
    return out


def bad_input_case():
    """A wrong input shape on the CUDA EP is an ORT error, not a crash."""
    model = qins_model(200, 37, 8, 64, "f32", free_k=True)
    gpu = session(model, True)
    codes, scales = random_weight(rng, 8, 200, 37, 64)
    try:
        gpu.run(None, {"A": np.zeros((3, 199), np.float32), "codes_0": codes, "scales_0": scales})
        ok, msg = False, "no error"
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0][:200]
        ok = "K=200" in msg
    print(f"{'ok  ' if ok else 'FAIL'} wrong A shape on CUDA is refused: {msg}", flush=True)
    return [dict(case="bad_input", ok=ok, msg=msg)]


if PREFILL:
    # Odd shapes (K not a multiple of a stage, odd N, one group a row) and a Phi-3.5 one
    # (--quick, for the sanitizers: the odd ones, smaller).
    shapes = [(200, 37, 32), (520, 999, 64), (1000, 129, 1000)] + ([] if QUICK else [(3072, 3072, 128)])
    ms = [17, 70] if QUICK else [17, 200]
elif QUICK:
    shapes = [(200, 37, 32), (200, 37, 30), (3072, 3072, 128), (520, 16395, 64)]
    ms = [1, 3, 16, 17, 300]
else:
    shapes = [(64, 8, 64), (200, 37, 32), (200, 37, 30), (1000, 129, 1000), (520, 999, 64), (3072, 3072, 128),
              (3072, 8192, 32), (8192, 3072, 128), (1000, 8200, 32), (520, 9999, 64), (520, 16395, 64)]
    ms = [1, 2, 3, 4, 5, 8, 11, 16, 17, 64, 512, 2048]
results = []
for bits in (8, 6, 4, 32):
    for act in ("f16", "f32"):
        for k, n, g in shapes:
            if bits == 32:
                g = k
            if PREFILL and not tc_layout(bits, act, k, g):
                continue
            mm = [m for m in ms if m * k * n <= 2048 * 3072 * 3072 and m <= MAX_M]
            results += run_case(bits, act, k, n, g, mm)
if not PREFILL:
    # The fused SwiGLU (swiglu=1): N = 2 I, a multiple of 16. Phi-3.5's gate/up at the token
    # kernel's plans (q4 g32 at 4 tiles, q8 g128 at 2), small and odd-group layouts that take
    # the product-then-combine path, and M past the token kernel.
    sg_shapes = [(200, 48, 30), (520, 1008, 64), (3072, 16384, 32)] if QUICK else \
        [(64, 16, 64), (200, 48, 30), (520, 1008, 64), (1000, 144, 1000), (3072, 16384, 32), (3072, 16384, 128)]
    sg_ms = [1, 3, 17] if QUICK else [1, 2, 5, 8, 9, 16, 17, 300]
    for bits in (8, 6, 4):
        for act in ("f16", "f32"):
            for k, n, g in sg_shapes:
                mm = [m for m in sg_ms if m * k * n <= 2048 * 3072 * 3072 and m <= MAX_M]
                results += run_case(bits, act, k, n, g, mm, swiglu=True)
    # Mixed nodes: Phi-3.5's qkv (6144 float Q/K columns, 3072 V) and small odd ones (NF not a
    # multiple of 16, K not of the group), across the single-launch kernel's two row tiles.
    mx_shapes = [(3072, 3072, 32, 6144), (200, 37, 32, 24)] if QUICK else \
        [(64, 16, 64, 16), (200, 37, 32, 24), (200, 37, 30, 5), (520, 999, 64, 1001), (3072, 3072, 32, 6144),
         (3072, 3072, 128, 6144)]
    mx_ms = [1, 9, 17] if QUICK else [1, 2, 5, 8, 9, 16, 17, 300]
    for bits in (8, 6, 4):
        for act in ("f16", "f32"):
            for k, n, g, nf in mx_shapes:
                mm = [m for m in mx_ms if m * k * (n + nf) <= 2048 * 3072 * 3072 and m <= MAX_M]
                results += run_case(bits, act, k, n, g, mm, nf=nf)
    results += graph_case()
    results += chain_cases()
    results += bad_input_case()
fails = [r for r in results if not r["ok"]]
print(f"{len(results) - len(fails)} passed, {len(fails)} failed (seed {seed})")
if JSON:
    json.dump(dict(seed=seed, results=results), open(JSON, "w"), indent=1)
sys.exit(1 if fails else 0)
