#!/usr/bin/env python3
"""Bits per weight of a quantized model's MatMul weights, counted from what it stores.

    python bits_per_weight.py MODEL_DIR... [--json OUT]

For every MatMulNBits node, the bytes of its weight inputs (codes, scales, zero points) over
its K x N weights; for a QINS model, the rewrite's report (qins_report.json: each encoded
weight's shape and stored bytes, codes and scales; the float Q/K columns of a mixed qkv node
are counted on neither side).
Also given as they would be in an fp16 model: MatMulNBits keeps its scales (and HQQ its float
zero points) in the activation type, 32 bits each in an fp32 model such as SmolLM2's import,
16 in an fp16 one; QINS scales are f16 in both.
"""
import argparse
import json
import os

import numpy as np
import onnx

SIZE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1}

ap = argparse.ArgumentParser()
ap.add_argument("models", nargs="+")
ap.add_argument("--json")
a = ap.parse_args()

rows = []
for path in a.models:
    m = onnx.load(os.path.join(path, "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    stored = as_fp16 = weights = 0
    nodes = 0
    if os.path.exists(os.path.join(path, "qins_report.json")):
        # QINS: the rewrite's report has each encoded weight's shape and stored bytes (codes
        # and f16 scales; a mixed qkv node's float Q/K columns are outside both).
        rep = json.load(open(os.path.join(path, "qins_report.json")))
        nodes = len(rep["layers"])
        weights = sum(int(np.prod(layer["shape"])) for layer in rep["layers"])
        stored = as_fp16 = sum(layer["bytes_after"] for layer in rep["layers"])
    for n in m.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        at = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        weights += at["K"] * at["N"]
        nodes += 1
        for name in n.input[1:4]:
            t = inits.get(name)
            if t is None:
                continue
            count = int(np.prod(t.dims))
            b = count * SIZE.get(t.data_type, 4)
            stored += b
            as_fp16 += count * 2 if t.data_type == onnx.TensorProto.FLOAT else b
    row = {"model": path, "nodes": nodes, "weights": weights,
           "bits_per_weight": 8 * stored / weights if weights else None,
           "bits_per_weight_fp16_model": 8 * as_fp16 / weights if weights else None}
    rows.append(row)
    print(f"{path}: {nodes} nodes, {weights} weights, {row['bits_per_weight']:.3f} bits per weight as stored, "
          f"{row['bits_per_weight_fp16_model']:.3f} in an fp16 model")
if a.json:
    json.dump(rows, open(a.json, "w"), indent=1)
