"""What a Phi-3 MLP's activation costs between its matmuls: ORT's Sigmoid, Mul, Mul on
[M, 8192] f16 (the builder's `silu(gate) * up`), per occurrence, on the CUDA EP with a CUDA
graph, the way bench_matmul.py times a node: a model of L copies and a model of one, replayed
alternately; per copy = (median_L - median_1) / (L - 1). Sizes the gain of fusing the
activation into a QINS kernel (docs/BENCHMARKS.md). argv: OUT_JSON
"""
import json, os, sys
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, os.path.dirname(__file__))
from common import per_copy_us  # noqa: E402

N, L, REPS = 8192, 64, 30


def model(count):
    t = TensorProto.FLOAT16
    nodes, outs = [], []
    for i in range(count):
        nodes += [helper.make_node("Sigmoid", ["G"], [f"S{i}"]),
                  helper.make_node("Mul", ["G", f"S{i}"], [f"A{i}"]),
                  helper.make_node("Mul", [f"A{i}", "U"], [f"Y{i}"])]
        outs.append(helper.make_tensor_value_info(f"Y{i}", t, ["m", N]))
    ins = [helper.make_tensor_value_info(x, t, ["m", N]) for x in ("G", "U")]
    g = helper.make_graph(nodes, "silu_mul", ins, outs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def run(count, m, gid):
    s = ort.InferenceSession(model(count).SerializeToString(),
                             providers=[("CUDAExecutionProvider", {"device_id": 0, "enable_cuda_graph": "1"})])
    io = s.io_binding()
    keep = []
    for x in ("G", "U"):
        v = ort.OrtValue.ortvalue_from_numpy(np.random.default_rng(0).standard_normal((m, N)).astype(np.float16), "cuda", 0)
        io.bind_ortvalue_input(x, v)
        keep.append(v)
    for i in range(count):
        y = ort.OrtValue.ortvalue_from_shape_and_type([m, N], np.float16, "cuda", 0)
        io.bind_ortvalue_output(f"Y{i}", y)
        keep.append(y)
    ro = ort.RunOptions()
    ro.add_run_config_entry("gpu_graph_id", str(gid))
    return s, io, ro, keep


rows = []
for gid, m in enumerate((1, 16, 128), start=1):
    us = per_copy_us(lambda count, m=m, gid=gid: run(count, m, gid), L, REPS)
    rows.append(dict(M=m, N=N, us_per_silu_mul=us))
    print(f"M={m:<4} N={N}: Sigmoid + Mul + Mul {us:6.2f} us per occurrence", flush=True)
json.dump(dict(rows=rows), open(sys.argv[1], "w"), indent=1)
