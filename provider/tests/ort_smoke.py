#!/usr/bin/env python3
"""End-to-end check of libqins_provider.so through a real ONNX Runtime (Python bindings).

Usage: python provider/tests/ort_smoke.py [path/to/libqins_provider.so]

The reference is built from docs/FORMAT.md alone (LUT, packing, scales), in numpy, so it is
independent of the Rust codec: codes and scales are random, the weight is decoded per the spec
and multiplied in float64. Also checks that bad inputs and attributes raise ORT errors (and do
not crash the process), that float32 and float16 nodes coexist, that the library can be
registered by several session options, and that one session runs from several threads.
Needs onnx, numpy and onnxruntime. Prints 'N passed, N failed' and exits non-zero on failure.
"""

import os
import sys
import threading
import traceback

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

HERE = os.path.dirname(os.path.abspath(__file__))
LIB = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "target", "release", "libqins_provider.so")
K_ALIGN = 64
Z_MIN = 0.5
MAGNITUDES = {8: 128, 6: 32, 4: 8}
RNG = np.random.default_rng(1234)


def lut(bits):
    """FORMAT.md: z_m = 1 - m (1 - z_min) / (M - 1), u_m = (1 - z_m) / z_m, f64 rounded once."""
    mm = MAGNITUDES[bits]
    m = np.arange(mm, dtype=np.float64)
    z = 1.0 - m * (1.0 - Z_MIN) / (mm - 1)
    u = ((1.0 - z) / z).astype(np.float32)
    return np.concatenate([u, -u])  # sign bit is the top bit: codes M.. are negative


def row_bytes(k, bits):
    return (-(-k // K_ALIGN) * K_ALIGN) * bits // 8


def pack(codes, bits):
    """codes [N, K_pad] uint8 -> packed [N, row_bytes] per FORMAT.md."""
    n, kp = codes.shape
    if bits == 8:
        return codes.astype(np.uint8)
    if bits == 4:
        return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    q = codes.reshape(n, kp // 4, 4).astype(np.uint32)
    w = q[..., 0] | (q[..., 1] << 6) | (q[..., 2] << 12) | (q[..., 3] << 18)
    return np.stack([w & 0xFF, (w >> 8) & 0xFF, (w >> 16) & 0xFF], axis=-1).reshape(n, kp * 3 // 4).astype(np.uint8)


def random_weight(k, n, bits, g):
    """Random encoded tensors (codes, scales) and the decoded float32 weight W [K, N]."""
    groups = -(-k // g)
    if bits == 32:
        z = (RNG.uniform(0.5, 1.0, (n, k)) * RNG.choice([-1.0, 1.0], (n, k))).astype(np.float32)
        s = RNG.uniform(0.01, 0.2, (n, 1)).astype(np.float32)
        mag = np.abs(z)
        w = (np.sign(z) * ((np.float32(1) / mag - np.float32(1)) * s)).astype(np.float32)
        return z, s, w.T.copy()
    kp = -(-k // K_ALIGN) * K_ALIGN
    codes = RNG.integers(0, 1 << bits, (n, kp), dtype=np.uint8)
    codes[:, k:] = 0  # padding codes are 0
    s = RNG.uniform(0.01, 0.2, (n, groups)).astype(np.float16)
    per_k = np.repeat(s.astype(np.float32), g, axis=1)[:, :k]
    w = lut(bits)[codes[:, :k]] * per_k  # f32 multiply, as the spec decodes
    return pack(codes, bits), s, w.T.copy()


def model(nodes, inputs, outputs, inits=(), qins_version=1):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.qins", qins_version)],
        ir_version=9,
    )
    return m.SerializeToString()


def qnode(a, codes, scales, y, k, n, bits, g, name="q"):
    return qnode_attrs(a, codes, scales, y, name, K=k, N=n, bits=bits, group_size=g)


def qnode_attrs(a, codes, scales, y, name, **attrs):
    """A QinsMatMul node; attributes set to None are left out."""
    attrs = {key: v for key, v in attrs.items() if v is not None}
    return helper.make_node("QinsMatMul", [a, codes, scales], [y], domain="com.qins", name=name, **attrs)


def session(model_bytes, quiet=False):
    so = ort.SessionOptions()
    if quiet:  # the expected failures would otherwise be logged as errors
        so.log_severity_level = 4
    so.register_custom_ops_library(LIB)
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def onnx_type(dt):
    return {
        np.float32: TensorProto.FLOAT,
        np.float16: TensorProto.FLOAT16,
        np.uint8: TensorProto.UINT8,
        np.int8: TensorProto.INT8,
    }[dt]


def matmul_model(k, n, bits, g, dtype, codes, scales, as_inputs=False):  # noqa: PLR0913
    """A [..., K] -> Y [..., N]; codes/scales as initializers (as the rewrite emits) or inputs."""
    t = onnx_type(dtype)
    ins = [helper.make_tensor_value_info("A", t, None)]
    inits = []
    if as_inputs:
        ins += [
            helper.make_tensor_value_info("codes", onnx_type(codes.dtype.type), None),
            helper.make_tensor_value_info("scales", onnx_type(scales.dtype.type), None),
        ]
    else:
        inits = [onnx.numpy_helper.from_array(codes, "codes"), onnx.numpy_helper.from_array(scales, "scales")]
    outs = [helper.make_tensor_value_info("Y", t, None)]
    return model([qnode("A", "codes", "scales", "Y", k, n, bits, g)], ins, outs, inits)


def rel_err(y, ref):
    y = y.astype(np.float64)
    den = np.linalg.norm(ref)
    return np.linalg.norm(y - ref) / (den if den > 0 else 1.0)


RESULTS = {"passed": 0, "failed": 0}


def check(name, fn):
    try:
        fn()
        RESULTS["passed"] += 1
        print(f"ok   {name}")
    except Exception:  # noqa: BLE001 - report every failure and carry on
        RESULTS["failed"] += 1
        print(f"FAIL {name}")
        traceback.print_exc()


def expect_ort_error(fn, *needles):
    try:
        fn()
    except Exception as e:  # ORT raises its own exception classes (Fail, InvalidArgument, ...)
        msg = str(e)
        for needle in needles:
            assert needle in msg, f"error should mention {needle!r}: {msg}"
        return msg
    raise AssertionError("expected an ONNX Runtime error, got none")


def test_numerics():
    cases = [
        (8, 64, 16, 64),
        (8, 100, 33, 32),
        (6, 300, 65, 7),
        (6, 257, 130, 257),
        (4, 128, 24, 32),
        (4, 70, 9, 1),
        (32, 96, 40, 96),
    ]
    for bits, k, n, g in cases:
        codes, scales, w = random_weight(k, n, bits, g)
        for dtype, tol in ((np.float32, 1e-5), (np.float16, 2e-3)):
            sess = session(matmul_model(k, n, bits, g, dtype, codes, scales))
            for lead in ((1,), (3,), (2, 5), (130,), (1, 1, 17)):
                a = RNG.standard_normal(lead + (k,)).astype(dtype)
                (y,) = sess.run(None, {"A": a})
                assert y.dtype == dtype, (y.dtype, dtype)
                assert y.shape == lead + (n,), (y.shape, lead, n)
                ref = a.astype(np.float64) @ w.astype(np.float64)
                err = rel_err(y, ref)
                assert err < tol, f"bits={bits} K={k} N={n} G={g} {dtype.__name__} A{lead}: rel err {err:.3e}"


def swiglu_row(j, up):
    """qins::codec::swiglu_row: stored channel of fused output j's gate (or up)."""
    return 16 * (j // 8) + j % 8 + (8 if up else 0)


def test_swiglu():
    # The fused op against silu(A Wg) * (A Wu) from the decoded weight's gate and up channels.
    for bits, k, n, g in ((4, 96, 32, 32), (8, 70, 48, 16), (6, 64, 16, 64)):
        codes, scales, w = random_weight(k, n, bits, g)
        wg = w[:, [swiglu_row(j, False) for j in range(n // 2)]].astype(np.float64)
        wu = w[:, [swiglu_row(j, True) for j in range(n // 2)]].astype(np.float64)
        for dtype, tol in ((np.float32, 1e-5), (np.float16, 2e-3)):
            t = onnx_type(dtype)
            node = qnode_attrs("A", "codes", "scales", "Y", "q", K=k, N=n, bits=bits, group_size=g, swiglu=1)
            inits = [onnx.numpy_helper.from_array(codes, "codes"), onnx.numpy_helper.from_array(scales, "scales")]
            m = model([node], [helper.make_tensor_value_info("A", t, None)], [helper.make_tensor_value_info("Y", t, None)], inits)
            sess = session(m)
            for lead in ((1,), (2, 3), (17,)):
                a = (4 * RNG.standard_normal(lead + (k,))).astype(dtype)
                (y,) = sess.run(None, {"A": a})
                assert y.shape == lead + (n // 2,), (y.shape, lead)
                a64 = a.astype(np.float64)
                gate, up = a64 @ wg, a64 @ wu
                ref = gate / (1 + np.exp(-gate)) * up
                err = rel_err(y, ref)
                assert err < tol, f"swiglu bits={bits} K={k} N={n} {dtype.__name__} A{lead}: rel err {err:.3e}"


def test_float_weight():
    # A mixed node: Y = [A WF^T | A W], WF stored [NF, K] in A's type; the float part must be
    # exact to f32 accumulation, the QINS part as the plain op. Also as a graph input (not an
    # initializer), 3-D A, and M = 0.
    for bits, k, n, g, nf in ((4, 96, 32, 32, 64), (8, 70, 24, 16, 40), (6, 64, 8, 64, 3)):
        codes, scales, w = random_weight(k, n, bits, g)
        for dtype, tol in ((np.float32, 1e-5), (np.float16, 2e-3)):
            t = onnx_type(dtype)
            wf = RNG.standard_normal((nf, k)).astype(dtype)
            for as_input in (False, True):
                node = helper.make_node("QinsMatMul", ["A", "codes", "scales", "WF"], ["Y"], name="mix", domain="com.qins", K=k, N=n, bits=bits, group_size=g)
                inits = [onnx.numpy_helper.from_array(codes, "codes"), onnx.numpy_helper.from_array(scales, "scales")]
                ins = [helper.make_tensor_value_info("A", t, None)]
                if as_input:
                    ins.append(helper.make_tensor_value_info("WF", t, [nf, k]))
                else:
                    inits.append(onnx.numpy_helper.from_array(wf, "WF"))
                sess = session(model([node], ins, [helper.make_tensor_value_info("Y", t, None)], inits))
                for lead in ((1,), (2, 3), (17,), (0,)):
                    a = (RNG.standard_normal(lead + (k,))).astype(dtype)
                    feeds = {"A": a, "WF": wf} if as_input else {"A": a}
                    (y,) = sess.run(None, feeds)
                    assert y.shape == lead + (nf + n,), (y.shape, lead)
                    if lead == (0,):
                        continue
                    a64 = a.astype(np.float64)
                    ref = np.concatenate([a64 @ wf.astype(np.float64).T, a64 @ w], axis=-1)
                    for part, sl in (("float", slice(0, nf)), ("qins", slice(nf, nf + n))):
                        err = rel_err(y[..., sl], ref[..., sl])
                        assert err < tol, f"float_weight bits={bits} {part} {dtype.__name__} A{lead}: rel err {err:.3e}"
    # Bad float weights: wrong type, wrong K, and with swiglu=1.
    k, n, bits, g = 64, 16, 8, 32
    codes, scales, _ = random_weight(k, n, bits, g)
    base = [onnx.numpy_helper.from_array(codes, "codes"), onnx.numpy_helper.from_array(scales, "scales")]
    for wf, attrs, needle in (
        # A type that is not A's: ORT itself refuses the node (the registered type constraint).
        (np.zeros((8, k), np.float16), {}, "no kernel def matches"),
        (np.zeros((8, k + 1), np.float32), {}, "K=64"),
        (np.zeros((8, k), np.float32), {"swiglu": 1}, "does not take a float_weight"),
    ):
        node = helper.make_node("QinsMatMul", ["A", "codes", "scales", "WF"], ["Y"], name="bad", domain="com.qins", K=k, N=n, bits=bits, group_size=g, **attrs)
        ins = [helper.make_tensor_value_info("A", TensorProto.FLOAT, None), helper.make_tensor_value_info("WF", onnx_type(wf.dtype.type), list(wf.shape))]
        m = model([node], ins, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], base)
        expect_ort_error(lambda m=m, wf=wf: session(m, quiet=True).run(None, {"A": np.zeros((2, k), np.float32), "WF": wf}), needle)


def test_empty_and_1d():
    k, n, bits, g = 64, 8, 8, 32
    codes, scales, w = random_weight(k, n, bits, g)
    sess = session(matmul_model(k, n, bits, g, np.float32, codes, scales))
    (y,) = sess.run(None, {"A": np.zeros((0, k), np.float32)})
    assert y.shape == (0, n), y.shape
    (y,) = sess.run(None, {"A": np.zeros((2, 0, k), np.float32)})
    assert y.shape == (2, 0, n), y.shape
    a = RNG.standard_normal(k).astype(np.float32)
    (y,) = sess.run(None, {"A": a})
    assert y.shape == (n,), y.shape
    assert rel_err(y, a.astype(np.float64) @ w) < 1e-5


def test_both_types_in_one_graph():
    """A float32 and a float16 node, same op name: ORT must pick the kernel by A's type."""
    k, n, bits, g = 64, 12, 4, 16
    codes, scales, w = random_weight(k, n, bits, g)
    nodes = [qnode("A32", "codes", "scales", "Y32", k, n, bits, g, "q32"), qnode("A16", "codes", "scales", "Y16", k, n, bits, g, "q16")]
    ins = [helper.make_tensor_value_info("A32", TensorProto.FLOAT, ["m", k]), helper.make_tensor_value_info("A16", TensorProto.FLOAT16, ["m", k])]
    outs = [helper.make_tensor_value_info("Y32", TensorProto.FLOAT, None), helper.make_tensor_value_info("Y16", TensorProto.FLOAT16, None)]
    inits = [onnx.numpy_helper.from_array(codes, "codes"), onnx.numpy_helper.from_array(scales, "scales")]
    sess = session(model(nodes, ins, outs, inits))
    a = RNG.standard_normal((3, k)).astype(np.float32)
    y32, y16 = sess.run(None, {"A32": a, "A16": a.astype(np.float16)})
    assert y32.dtype == np.float32 and y16.dtype == np.float16
    assert rel_err(y32, a.astype(np.float64) @ w) < 1e-5
    assert rel_err(y16, a.astype(np.float16).astype(np.float64) @ w) < 2e-3


def test_chained_with_standard_ops():
    """Output type inference: a standard op after QinsMatMul must see the right element type."""
    k, n, bits, g = 64, 16, 8, 64
    codes, scales, w = random_weight(k, n, bits, g)
    for dtype in (np.float32, np.float16):
        t = onnx_type(dtype)
        nodes = [qnode("A", "codes", "scales", "Y0", k, n, bits, g), helper.make_node("Relu", ["Y0"], ["Y"])]
        ins = [helper.make_tensor_value_info("A", t, ["b", "s", k])]
        outs = [helper.make_tensor_value_info("Y", t, ["b", "s", n])]
        inits = [onnx.numpy_helper.from_array(codes, "codes"), onnx.numpy_helper.from_array(scales, "scales")]
        sess = session(model(nodes, ins, outs, inits))
        a = RNG.standard_normal((2, 3, k)).astype(dtype)
        (y,) = sess.run(None, {"A": a})
        ref = np.maximum(a.astype(np.float64) @ w, 0)
        assert y.dtype == dtype and y.shape == (2, 3, n)
        assert rel_err(y, ref) < (1e-5 if dtype == np.float32 else 2e-3)


def test_bad_inputs_raise():
    k, n, bits, g = 100, 8, 6, 32
    codes, scales, _ = random_weight(k, n, bits, g)
    sess = session(matmul_model(k, n, bits, g, np.float32, codes, scales, as_inputs=True), quiet=True)
    a = np.ones((2, k), np.float32)
    feeds = {"A": a, "codes": codes, "scales": scales}
    (y,) = sess.run(None, feeds)  # the good case runs
    assert y.shape == (2, n)
    rb = row_bytes(k, bits)
    bad = [
        ({"A": np.ones((2, k + 1), np.float32)}, ["QinsMatMul node 'q'", "K=100", "[2, 101]"]),
        ({"A": np.ones((), np.float32)}, ["scalar"]),
        ({"codes": codes[:, :-1]}, ["codes must be uint8", f"[{n}, {rb}]", f"[{n}, {rb - 1}]"]),
        ({"codes": codes[:-1]}, ["codes must be uint8"]),
        ({"codes": codes.reshape(-1)}, ["codes must be"]),
        ({"scales": scales[:, :-1]}, ["scales must be float16", f"[{n}, 4]", f"[{n}, 3]"]),
    ]
    for patch, needles in bad:
        f = dict(feeds)
        f.update(patch)
        expect_ort_error(lambda f=f: sess.run(None, f), *needles)
    # The session still works after errors.
    (y2,) = sess.run(None, feeds)
    assert np.array_equal(y, y2)
    # Wrong element types: the graph declares them, so ORT accepts the feeds and the kernel
    # must refuse them.
    for c, s, needles in (
        (codes.astype(np.float32), scales, ["codes must be uint8", "got float"]),
        (codes, scales.astype(np.float32), ["scales must be float16", "got float"]),
        (codes.astype(np.int8), scales, ["codes must be uint8", "got int8"]),
    ):
        sess = session(matmul_model(k, n, bits, g, np.float32, c, s, as_inputs=True), quiet=True)
        expect_ort_error(lambda c=c, s=s: sess.run(None, {"A": a, "codes": c, "scales": s}), *needles)
    # bits=32 wants float codes and float scales.
    z, zs, _ = random_weight(k, n, 32, k)
    sess = session(matmul_model(k, n, 32, k, np.float32, codes, zs, as_inputs=True), quiet=True)
    expect_ort_error(lambda: sess.run(None, {"A": a, "codes": codes, "scales": zs}), "codes must be float [8, 100]")


def test_bad_attributes_raise():
    k, n, bits, g = 64, 8, 8, 32
    codes, scales, _ = random_weight(k, n, bits, g)
    bad = [
        (dict(bits=5), "bits=5"),
        (dict(group_size=0), "group_size=0"),
        (dict(group_size=65), "group_size=65"),
        (dict(K=0), "K=0"),
        (dict(N=-3), "N=-3"),
        (dict(bits=32, group_size=32), "group_size must equal K"),
        (dict(group_size=None), "group_size"),
        (dict(K=None), "'K'"),
        (dict(swiglu=2), "swiglu=2"),
        (dict(swiglu=1), "multiple of 16"),
        (dict(swiglu=1.0), "swiglu"),
    ]
    for override, needle in bad:
        attrs = dict(K=k, N=n, bits=bits, group_size=g)
        attrs.update(override)
        node = qnode_attrs("A", "codes", "scales", "Y", "q", **attrs)
        ins = [helper.make_tensor_value_info(x, t, None) for x, t in (("A", TensorProto.FLOAT), ("codes", TensorProto.UINT8), ("scales", TensorProto.FLOAT16))]
        outs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
        m = model([node], ins, outs)

        def run(m=m):
            sess = session(m, quiet=True)
            sess.run(None, {"A": np.ones((1, k), np.float32), "codes": codes, "scales": scales})

        expect_ort_error(run, needle)


def test_wrong_activation_type_is_rejected():
    """A as float64 matches no registered kernel: a load-time error, not a crash."""
    k, n, bits, g = 64, 8, 8, 64
    codes, scales, _ = random_weight(k, n, bits, g)
    ins = [helper.make_tensor_value_info("A", TensorProto.DOUBLE, None)]
    outs = [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, None)]
    inits = [onnx.numpy_helper.from_array(codes, "codes"), onnx.numpy_helper.from_array(scales, "scales")]
    m = model([qnode("A", "codes", "scales", "Y", k, n, bits, g)], ins, outs, inits)
    expect_ort_error(lambda: session(m, quiet=True))


def test_registration_is_repeatable():
    k, n, bits, g = 64, 8, 8, 64
    codes, scales, w = random_weight(k, n, bits, g)
    mb = matmul_model(k, n, bits, g, np.float32, codes, scales)
    a = RNG.standard_normal((2, k)).astype(np.float32)
    first = session(mb)
    (y0,) = first.run(None, {"A": a})
    del first
    import gc

    gc.collect()
    for _ in range(3):
        s = session(mb)
        (y,) = s.run(None, {"A": a})
        assert np.array_equal(y, y0)
    # Two live sessions from two option objects at once.
    s1, s2 = session(mb), session(mb)
    assert np.array_equal(s1.run(None, {"A": a})[0], s2.run(None, {"A": a})[0])


def test_concurrent_runs():
    k, n, bits, g = 256, 96, 4, 64
    codes, scales, w = random_weight(k, n, bits, g)
    sess = session(matmul_model(k, n, bits, g, np.float32, codes, scales))
    errors = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        try:
            for i in range(20):
                a = rng.standard_normal(((seed + i) % 7 * 20 + 1, k)).astype(np.float32)
                (y,) = sess.run(None, {"A": a})
                assert rel_err(y, a.astype(np.float64) @ w) < 1e-5
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_model_importing_a_later_opset_runs():
    """ONNX semantics: an op unchanged since version 1 is also the op of opset 2 and later."""
    k, n, bits, g = 64, 8, 8, 64
    codes, scales, w = random_weight(k, n, bits, g)
    ins = [helper.make_tensor_value_info("A", TensorProto.FLOAT, None)]
    outs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    inits = [onnx.numpy_helper.from_array(codes, "codes"), onnx.numpy_helper.from_array(scales, "scales")]
    m = model([qnode("A", "codes", "scales", "Y", k, n, bits, g)], ins, outs, inits, qins_version=2)
    a = RNG.standard_normal((1, k)).astype(np.float32)
    (y,) = session(m).run(None, {"A": a})
    assert rel_err(y, a.astype(np.float64) @ w) < 1e-5


def main():
    print(f"onnxruntime {ort.__version__}, library {os.path.abspath(LIB)}")
    assert os.path.exists(LIB), f"build it first: cargo build -p qins-provider --release ({LIB})"
    for name, fn in sorted((k, v) for k, v in globals().items() if k.startswith("test_")):
        check(name, fn)
    print(f"{RESULTS['passed']} passed, {RESULTS['failed']} failed")
    sys.exit(1 if RESULTS["failed"] else 0)


if __name__ == "__main__":
    main()
