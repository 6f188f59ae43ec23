"""The fused SwiGLU op against what it replaces, per Phi-3.5 MLP (K = 3072, I = 8192), on the
CUDA EP in a CUDA graph: per layer, `silu(X Wg) * (X Wu)` as
  fp16:    MatMul, MatMul, Sigmoid, Mul, Mul (the builder's graph);
  unfused: QinsMatMul gate, QinsMatMul up, Sigmoid, Mul, Mul (`qins rewrite --no-fuse-mlp`);
  fused:   one QinsMatMul with swiglu=1 over both weights (the default rewrite);
each copy with its own weights (L copies do not share a cache line), timed by
common.per_copy_us. Also checks that fused and unfused give the same Y (the fused op's
weight is the two weights interleaved by qins::codec::swiglu_row).
argv: LIB OUT_JSON
"""
import json, os, sys
import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(__file__))
from common import graph_session, per_copy_us, random_weight, time_pair  # noqa: E402

LIB, OUT = sys.argv[1], sys.argv[2]
K, I, L, REPS = 3072, 8192, int(os.environ.get("SWIGLU_L", 16)), 30
FMTS = [(4, 32), (8, 128)]
rng = np.random.default_rng(1)


def swiglu_rows(i):
    j = np.arange(i)
    gate = 16 * (j // 8) + j % 8
    return gate, gate + 8


def weights(bits, g, count):
    """Per copy: (gate codes, gate scales, up codes, up scales, fused codes, fused scales)."""
    gr, ur = swiglu_rows(I)
    out = []
    for _ in range(count):
        gc, gs = random_weight(rng, bits, K, I, g)
        uc, us = random_weight(rng, bits, K, I, g)
        fc = np.empty((2 * I, gc.shape[1]), np.uint8)
        fs = np.empty((2 * I, gs.shape[1]), np.float16)
        fc[gr], fc[ur], fs[gr], fs[ur] = gc, uc, gs, us
        out.append((gc, gs, uc, us, fc, fs))
    return out


def qnode(a, c, s, y, n, bits, g, name, swiglu=False):
    kw = {"swiglu": 1} if swiglu else {}
    return helper.make_node("QinsMatMul", [a, c, s], [y], domain="com.qins", name=name, K=K, N=n, bits=bits,
                            group_size=g, **kw)


def silu_mul(i, g, u, y):
    return [helper.make_node("Sigmoid", [g], [f"s{i}"]), helper.make_node("Mul", [g, f"s{i}"], [f"a{i}"]),
            helper.make_node("Mul", [f"a{i}", u], [y])]


def model(kind, count, bits=None, g=None, ws=None):
    nodes, inits, outs = [], [], []
    for i in range(count):
        y = f"Y{i}"
        if kind == "fp16":
            for w in ("wg", "wu"):
                inits.append(numpy_helper.from_array((rng.standard_normal((K, I), dtype=np.float32) * 0.02).astype(np.float16), f"{w}{i}"))
            nodes += [helper.make_node("MatMul", ["X", f"wg{i}"], [f"g{i}"]),
                      helper.make_node("MatMul", ["X", f"wu{i}"], [f"u{i}"])] + silu_mul(i, f"g{i}", f"u{i}", y)
        elif kind == "unfused":
            gc, gs, uc, us, _, _ = ws[i]
            inits += [numpy_helper.from_array(v, f"{n}{i}") for v, n in ((gc, "gc"), (gs, "gs"), (uc, "uc"), (us, "us"))]
            nodes += [qnode("X", f"gc{i}", f"gs{i}", f"g{i}", I, bits, g, f"qg{i}"),
                      qnode("X", f"uc{i}", f"us{i}", f"u{i}", I, bits, g, f"qu{i}")] + silu_mul(i, f"g{i}", f"u{i}", y)
        else:
            _, _, _, _, fc, fs = ws[i]
            inits += [numpy_helper.from_array(fc, f"fc{i}"), numpy_helper.from_array(fs, f"fs{i}")]
            nodes.append(qnode("X", f"fc{i}", f"fs{i}", y, 2 * I, bits, g, f"qf{i}", swiglu=True))
        outs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT16, ["m", I]))
    ins = [helper.make_tensor_value_info("X", TensorProto.FLOAT16, ["m", K])]
    gr = helper.make_graph(nodes, "mlp", ins, outs, initializer=inits)
    return helper.make_model(gr, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.qins", 1)],
                             ir_version=10)


def bound(mdl, count, x):
    return graph_session(LIB, mdl, count, x, I)


rows = []
for m in (1, 16, 128):
    x = rng.standard_normal((m, K)).astype(np.float16)
    us = per_copy_us(lambda c: bound(model("fp16", c), c, x), L, REPS)
    rows.append(dict(M=m, kind="fp16", us=us))
    print(f"M={m:<4} fp16 MatMul x2 + Sigmoid/Mul/Mul        {us:7.2f} us per MLP gate/up", flush=True)
for bits, g in FMTS:
    ws = weights(bits, g, L)
    for m in (1, 16, 128):
        x = rng.standard_normal((m, K)).astype(np.float16)
        res, nmse = time_pair(lambda kind, c: model(kind, c, bits, g, ws), lambda mdl, c: bound(mdl, c, x),
                              ("unfused", "fused"), L, REPS)
        rows += [dict(M=m, kind=kind, bits=bits, G=g, us=res[kind]) for kind in ("unfused", "fused")]
        rows[-1]["nmse_vs_unfused"] = nmse
        print(f"M={m:<4} q{bits} g{g}: unfused {res['unfused']:7.2f} us, fused {res['fused']:7.2f} us "
              f"({res['fused'] / res['unfused']:.2f}x), nmse fused vs unfused {nmse:.1e}", flush=True)
json.dump(dict(device=os.popen("nvidia-smi --query-gpu=name --format=csv,noheader").read().strip(), L=L, rows=rows),
          open(OUT, "w"), indent=1)
