"""The mixed qkv node against what it replaces, per Phi-3.5 attention input (K = 3072; Q and K
6144 columns in f16, V 3072 in QINS), on the CUDA EP in a CUDA graph:
  fp16:  one MatMul over the packed [3072, 9216] weight (the builder's graph);
  split: MatMul (Q/K, f16), QinsMatMul (V), Concat (`qins rewrite --no-fuse-qkv`);
  mixed: one QinsMatMul with the f16 Q/K rows as its float_weight input (the default rewrite);
each copy with its own weights, timed by common.per_copy_us. Also checks that split and mixed
give the same Y.
argv: LIB OUT_JSON
"""
import json, os, sys
import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(__file__))
from common import graph_session, per_copy_us, random_weight, time_pair  # noqa: E402

LIB, OUT = sys.argv[1], sys.argv[2]
K, NF, NV, L, REPS = 3072, 6144, 3072, int(os.environ.get("QKV_L", 16)), 30
FMTS = [(4, 32), (8, 128)]
rng = np.random.default_rng(2)


def f16(shape):
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)


def weights(bits, g, count):
    """Per copy: (Q/K as [K, NF], the same transposed [NF, K], V codes, V scales)."""
    out = []
    for _ in range(count):
        wqk = f16((K, NF))
        c, s = random_weight(rng, bits, K, NV, g)
        out.append((wqk, np.ascontiguousarray(wqk.T), c, s))
    return out


def model(kind, count, bits=None, g=None, ws=None):
    nodes, inits, outs = [], [], []
    for i in range(count):
        y = f"Y{i}"
        if kind == "fp16":
            inits.append(numpy_helper.from_array(f16((K, NF + NV)), f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["X", f"w{i}"], [y]))
        else:
            wqk, wqk_t, c, s = ws[i]
            inits += [numpy_helper.from_array(c, f"c{i}"), numpy_helper.from_array(s, f"s{i}")]
            attrs = dict(domain="com.qins", K=K, N=NV, bits=bits, group_size=g)
            if kind == "split":
                inits.append(numpy_helper.from_array(wqk, f"wqk{i}"))
                nodes += [helper.make_node("MatMul", ["X", f"wqk{i}"], [f"f{i}"]),
                          helper.make_node("QinsMatMul", ["X", f"c{i}", f"s{i}"], [f"v{i}"], name=f"q{i}", **attrs),
                          helper.make_node("Concat", [f"f{i}", f"v{i}"], [y], axis=-1)]
            else:
                inits.append(numpy_helper.from_array(wqk_t, f"wt{i}"))
                nodes.append(helper.make_node("QinsMatMul", ["X", f"c{i}", f"s{i}", f"wt{i}"], [y], name=f"q{i}", **attrs))
        outs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT16, ["m", NF + NV]))
    ins = [helper.make_tensor_value_info("X", TensorProto.FLOAT16, ["m", K])]
    gr = helper.make_graph(nodes, "qkv", ins, outs, initializer=inits)
    return helper.make_model(gr, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.qins", 1)],
                             ir_version=10)


def bound(mdl, count, x):
    return graph_session(LIB, mdl, count, x, NF + NV)


rows = []
MS = (1, 16, 128)
for m in MS:
    x = rng.standard_normal((m, K)).astype(np.float16)
    us = per_copy_us(lambda c: bound(model("fp16", c), c, x), L, REPS)
    rows.append(dict(M=m, kind="fp16", us=us))
    print(f"M={m:<4} fp16 MatMul [3072, 9216]               {us:7.2f} us per qkv", flush=True)
for bits, g in FMTS:
    ws = weights(bits, g, L)
    for m in MS:
        x = rng.standard_normal((m, K)).astype(np.float16)
        res, nmse = time_pair(lambda kind, c: model(kind, c, bits, g, ws), lambda mdl, c: bound(mdl, c, x),
                              ("split", "mixed"), L, REPS)
        rows += [dict(M=m, kind=kind, bits=bits, G=g, us=res[kind]) for kind in ("split", "mixed")]
        rows[-1]["nmse_vs_split"] = nmse
        print(f"M={m:<4} q{bits} g{g}: split {res['split']:7.2f} us, mixed {res['mixed']:7.2f} us "
              f"({res['mixed'] / res['split']:.2f}x), nmse mixed vs split {nmse:.1e}", flush=True)
json.dump(dict(device=os.popen("nvidia-smi --query-gpu=name --format=csv,noheader").read().strip(), L=L, rows=rows),
          open(OUT, "w"), indent=1)
