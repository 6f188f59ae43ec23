#!/usr/bin/env python3
"""De-gridding, for honest 4-bit comparisons (evaluation tooling, not the product path).

SmolLM2's matrices come from a Q4_1 GGUF: every block of 32 weights (along the input
dimension K, one output channel) holds at most 16 affine levels, so any affine 4-bit quantizer
that re-finds that grid is lossless on it, and 4-bit comparisons on the imported model measure
the grid, not the quantizer. This adds independent uniform noise in +-step/2 to every weight
of such a block (step = (max - min) / 15 of the block), which leaves each weight within half a
step of its level: the result has the statistics of an unquantized model, and a reference
perplexity of its own.

    python degrid.py MODEL_DIR OUT_DIR [--seed 0]

Which tensors are Q4_1-origin is read from the weights themselves, not assumed: a float
initializer of rank 2 whose K is a multiple of 32 is de-gridded when every one of its
blocks holds at most 16 distinct values (Q4_1 always does; Q8_0, the tied embedding /
lm_head, holds up to 32 and is left alone, as is anything that is not on such a grid). The
noise comes from numpy's default_rng([seed, tensor index]) in a fixed tensor order: the
same inputs give the same output. OUT_DIR gets the model (external data in one file) and the
files beside it (tokenizer, configs) except an earlier qins report; OUT_DIR must not exist.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import onnx
from onnx import numpy_helper

BLOCK = 32
LEVELS = 16

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("out")
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()

if os.path.exists(a.out):
    sys.exit(f"{a.out} exists; degrid.py writes a new folder only")
src = os.path.join(a.model, "model.onnx")
model = onnx.load(src)


def on_4bit_grid(w):
    """True when every block of 32 along K (axis 0 of a MatMul's [K, N] weight) holds at most
    16 distinct values."""
    k, n = w.shape
    blocks = w.reshape(k // BLOCK, BLOCK, n)
    s = np.sort(blocks, axis=1)
    distinct = 1 + (np.diff(s, axis=1) != 0).sum(axis=1)
    return bool((distinct <= LEVELS).all())


report = []
for i, t in enumerate(model.graph.initializer):
    if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or len(t.dims) != 2:
        continue
    w = numpy_helper.to_array(t)
    if w.shape[0] % BLOCK or w.size < BLOCK * 64:
        continue
    w32 = w.astype(np.float32)
    if not on_4bit_grid(w32):
        report.append({"tensor": t.name, "shape": list(w.shape), "degridded": False})
        continue
    k, n = w32.shape
    blocks = w32.reshape(k // BLOCK, BLOCK, n)
    step = (blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)) / (LEVELS - 1)
    rng = np.random.default_rng([a.seed, i])
    noise = rng.uniform(-0.5, 0.5, size=blocks.shape).astype(np.float32) * step
    out = (blocks + noise).reshape(k, n).astype(w.dtype)
    t.CopyFrom(numpy_helper.from_array(out, t.name))
    rel = float(np.linalg.norm(out.astype(np.float32) - w32) / max(np.linalg.norm(w32), 1e-30))
    report.append({"tensor": t.name, "shape": list(w.shape), "degridded": True, "relative_change": rel})

tmp = a.out + ".partial"
shutil.rmtree(tmp, ignore_errors=True)
os.makedirs(tmp)
onnx.save_model(model, os.path.join(tmp, "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                location="model.onnx.data", size_threshold=1024)
for f in sorted(os.listdir(a.model)):
    p = os.path.join(a.model, f)
    if os.path.isfile(p) and not f.startswith("model.onnx") and f not in ("qins_report.json", "qins_import.json"):
        shutil.copy(p, tmp)
done = [r for r in report if r["degridded"]]
with open(os.path.join(tmp, "degrid.json"), "w") as f:
    json.dump({"source": os.path.abspath(a.model), "seed": a.seed, "block": BLOCK, "tensors": report}, f, indent=1)
os.rename(tmp, a.out)
kept = [r["tensor"] for r in report if not r["degridded"]]
print(f"{a.out}: {len(done)} tensors de-gridded (mean relative change "
      f"{np.mean([r['relative_change'] for r in done]) if done else 0:.4f}), left on their own grid or none: {kept}")
