"""Shared by the GPU scripts: QinsMatMul test data and single-node models.

Codes are random bytes and scales random positive values: every code is a valid QINS code,
so this exercises every table entry; the kernels are checked against the library's own CPU
kernel, which the Rust tests hold to the codec (`qins::codec::decode_row`).
"""
import numpy as np
from onnx import TensorProto, helper

K_ALIGN = 64


def row_bytes(bits, k):
    kp = -(-k // K_ALIGN) * K_ALIGN
    return kp * bits // 8


def random_weight(rng, bits, k, n, g):
    """(codes, scales) as the op takes them, for a layout with K=k, N=n, group g."""
    groups = -(-k // g)
    if bits == 32:
        # As the encoder writes them (docs/FORMAT.md): s = 2^(e-23) below the row's absmax 2^e.
        w = rng.standard_normal((n, k)) * 0.02
        e = np.floor(np.log2(np.abs(w).max(axis=1, keepdims=True)))
        scales = np.exp2(e - 23).astype(np.float32)
        z = (np.sign(w) / (1.0 + np.abs(w) / scales)).astype(np.float32)
        z[z == 0] = 1.0
        return z, scales
    rb = row_bytes(bits, k)
    codes = rng.integers(0, 256, size=(n, rb), dtype=np.uint8)
    # Padding codes (past K) are 0 in every encoded row, as docs/FORMAT.md requires.
    kp_codes = np.zeros((n, rb), dtype=np.uint8)
    if bits == 8:
        kp_codes[:, :k] = codes[:, :k]
    elif bits == 4:
        full = k // 2
        kp_codes[:, :full] = codes[:, :full]
        if k % 2:
            kp_codes[:, full] = codes[:, full] & 0x0F
    else:
        bits_total = 6 * k
        full = bits_total // 8
        kp_codes[:, :full] = codes[:, :full]
        rem = bits_total % 8
        if rem:
            kp_codes[:, full] = codes[:, full] & ((1 << rem) - 1)
    scales = rng.uniform(0.005, 0.05, size=(n, groups)).astype(np.float16)
    return kp_codes, scales


def qins_model(k, n, bits, g, act, count=1, weights=None, batch_dims=1, free_k=False, swiglu=False, nf=0):
    """A model of `count` QinsMatMul nodes on one input A. Weights are initializers when given
    (a list of (codes, scales)), else graph inputs codes_i / scales_i. swiglu: the fused
    SwiGLU op (N = gate and up channels together, Y [..., N / 2]). nf > 0: a mixed node with a
    float_weight input WF_i [nf, K] (A's type), Y [..., nf + N]."""
    t = TensorProto.FLOAT16 if act == "f16" else TensorProto.FLOAT
    lead = [f"d{i}" for i in range(batch_dims)]
    # free_k: A's last dim left symbolic, so that ORT lets a wrong K reach the op.
    inputs = [helper.make_tensor_value_info("A", t, lead + ["k" if free_k else k])]
    outputs, nodes, inits = [], [], []
    for i in range(count):
        c, s = f"codes_{i}", f"scales_{i}"
        if weights is None:
            ct = TensorProto.FLOAT if bits == 32 else TensorProto.UINT8
            st = TensorProto.FLOAT if bits == 32 else TensorProto.FLOAT16
            cs = [n, k] if bits == 32 else [n, row_bytes(bits, k)]
            inputs += [helper.make_tensor_value_info(c, ct, cs), helper.make_tensor_value_info(s, st, [n, -(-k // g)])]
        else:
            from onnx import numpy_helper
            inits += [numpy_helper.from_array(weights[i][0], c), numpy_helper.from_array(weights[i][1], s)]
        ins = ["A", c, s]
        if nf:
            ins.append(f"WF_{i}")
            inputs.append(helper.make_tensor_value_info(f"WF_{i}", t, [nf, k]))
        nodes.append(helper.make_node("QinsMatMul", ins, [f"Y_{i}"], domain="com.qins", name=f"q{i}",
                                      K=k, N=n, bits=bits, group_size=g, **({"swiglu": 1} if swiglu else {})))
        outputs.append(helper.make_tensor_value_info(f"Y_{i}", t, lead + [n // 2 if swiglu else nf + n]))
    graph = helper.make_graph(nodes, "qins", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.qins", 1)],
                             ir_version=10)


def lut(bits):
    """docs/FORMAT.md's table: z_m = 1 - m (1 - 1/2) / (M - 1), u_m = (1 - z_m) / z_m,
    code = sign << (bits - 1) | m. (The library copies qins::codec's own; for benchmarks the
    formula is enough.)"""
    M = 1 << (bits - 1)
    m = np.arange(M, dtype=np.float64)
    z = 1 - m * 0.5 / (M - 1)
    u = (1 - z) / z
    return np.concatenate([u, -u]).astype(np.float32)


def load_module(path):
    """A fat binary of the library's kernels, loaded with CuPy, its tables filled."""
    import cupy as cp
    mod = cp.RawModule(path=path)
    for bits in (8, 6, 4):
        t = lut(bits)
        mod.get_global(f"qins_lut{bits}").copy_from_host(t.ctypes.data, t.nbytes)
    return mod


def graph_time(launch, reps, launches=20):
    """Median seconds per call of launch(i) (one kernel launch, i = 0 .. launches-1), from
    `reps` replays of a CUDA graph of `launches` calls timed with events: launches from
    Python between two events would time CuPy's launch overhead instead."""
    import statistics
    import cupy as cp
    st = cp.cuda.Stream(non_blocking=True)
    with st:
        st.begin_capture()
        for i in range(launches):
            launch(i)
        graph = st.end_capture()
        graph.launch(st)
        st.synchronize()
        ts = []
        for _ in range(reps):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(st)
            graph.launch(st)
            b.record(st)
            b.synchronize()
            ts.append(cp.cuda.get_elapsed_time(a, b) * 1e-3 / launches)
    return statistics.median(ts)


def prefill_smem(bits, mb, t, wn, wk, stages):
    """Prefill<...>::SMEM (kernels/qins_matmul/qins_matmul_prefill.cu) of one configuration."""
    ch = 32 if bits == 4 else 16
    sk = wk * 4 * ch
    stage = mb * (2 * sk + 16) + wn * wk * 2 * t * 32 * 16
    table = (64 if bits == 6 else 256) * 128
    return table + max(stages * stage, (wk - 1) * wn * t * mb * 64)


def plain_time(launch, reps=15, launches=20):
    """As graph_time, without a graph (for library calls that a capture refuses)."""
    import statistics
    import cupy as cp
    for i in range(3):
        launch(i)
    ts = []
    for _ in range(reps):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        for i in range(launches):
            launch(i)
        e1.record()
        e1.synchronize()
        ts.append(cp.cuda.get_elapsed_time(e0, e1) * 1e-3 / launches)
    return statistics.median(ts)


# CUDA source of `read_all(p, n16, out)`: each thread streams 16-byte loads, grid-stride, 4 in
# flight, and XORs them; nothing else. The floor a kernel reading those bytes can reach.
READ_ALL = r'''
extern "C" __global__ void __launch_bounds__(256) read_all(const uint4* __restrict__ p, long long n, unsigned* out) {
    unsigned acc = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 a = __ldg(p + i), b = __ldg(p + i + stride), c = __ldg(p + i + 2 * stride), d = __ldg(p + i + 3 * stride);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n; i += stride) { uint4 a = __ldg(p + i); acc ^= a.x ^ a.y ^ a.z ^ a.w; }
    if (acc == 0x9e3779b9u) *out = acc;  // never in practice; keeps the loads
}'''


_GRAPH_ID = [0]


def graph_session(lib, model, count, x, width):
    """(session, io_binding, run_options, keep-alive) for per_copy_us: `model` on the CUDA EP
    with the library and a CUDA graph of its own id, input X bound to `x` on the GPU and
    outputs Y0 .. Y{count-1} to [M, width] f16 buffers (keep-alive [X, Y0, ...])."""
    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so,
                             providers=[("CUDAExecutionProvider", {"device_id": 0, "enable_cuda_graph": "1"})])
    io = s.io_binding()
    xv = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
    io.bind_ortvalue_input("X", xv)
    keep = [xv]
    for i in range(count):
        y = ort.OrtValue.ortvalue_from_shape_and_type([x.shape[0], width], np.float16, "cuda", 0)
        io.bind_ortvalue_output(f"Y{i}", y)
        keep.append(y)
    _GRAPH_ID[0] += 1
    ro = ort.RunOptions()
    ro.add_run_config_entry("gpu_graph_id", str(_GRAPH_ID[0]))
    return s, io, ro, keep


def per_copy_us(make, L, reps=30, warm_s=0.3):
    """Microseconds per copy of a subgraph, the way the kernel table times a node: `make(count)`
    returns (session, io_binding, run_options, keep-alive) for a model of `count` copies, run
    in a CUDA graph; a model of L copies and one of 1 are replayed alternately (each replay
    ends in a stream sync), and per copy = (median_L - median_1) / (L - 1), which cancels the
    fixed cost of a run."""
    import statistics
    import time
    one, many = make(1), make(L)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warm_s:
        for s, io, ro, _ in (one, many):
            s.run_with_iobinding(io, ro)
    t1, tl = [], []
    for _ in range(reps):
        for s, io, ro, _ in (many, one):
            t = time.perf_counter()
            s.run_with_iobinding(io, ro)
            (tl if s is many[0] else t1).append(time.perf_counter() - t)
    return (statistics.median(tl) - statistics.median(t1)) / (L - 1) * 1e6


def time_pair(make_model, bind, kinds, L, reps=30):
    """per_copy_us of two forms of one subgraph, `make_model(kind, count)` bound by
    `bind(model, count)` (graph_session), and the normalised squared difference of their
    outputs Y0 for the same weights and X: ({kind: us}, nmse of kinds[1] against kinds[0])."""
    import numpy as np
    res = {k: per_copy_us(lambda c, k=k: bind(make_model(k, c), c), L, reps) for k in kinds}
    outs = []
    for k in kinds:
        s, io, _, keep = bind(make_model(k, 1), 1)
        s.run_with_iobinding(io)
        outs.append(keep[1].numpy().astype(np.float64))
    nmse = float(((outs[0] - outs[1]) ** 2).sum() / max((outs[0] ** 2).sum(), 1e-30))
    return res, nmse


def rope_tables(max_pos, rot_dim, dt):
    """The rotary caches `[max_pos, rot_dim / 2]` (base 10000) as GroupQueryAttention takes them."""
    inv = 10000.0 ** (-np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim)
    f = np.arange(max_pos, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(f).astype(dt), np.sin(f).astype(dt)


def ort_session(lib, model, device):
    """An ONNX Runtime session with the QINS library on `device` ("cuda" or "cpu"). On CUDA a
    node the CUDA EP does not take must fail here, not run on the CPU unnoticed."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    so.log_severity_level = 3
    if device == "cuda":
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        prov = ["CUDAExecutionProvider"]
    else:
        prov = ["CPUExecutionProvider"]
    src = model if isinstance(model, str) else model.SerializeToString()
    s = ort.InferenceSession(src, so, providers=prov)
    if device == "cuda" and "CUDAExecutionProvider" not in s.get_providers():
        raise RuntimeError(f"CUDAExecutionProvider not in the session's providers {s.get_providers()}")
    return s


def copy_bandwidth():
    """Bytes per second of a 1 GiB device-to-device copy (read + write), timed with CUDA events."""
    import statistics
    import torch
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    ts = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); y.copy_(x); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    t = statistics.median(ts)
    del x, y
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / t
