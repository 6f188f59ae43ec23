"""Prototype: QINS q4 with a per-group offset, measured by fake quantization (weights replaced
by their decoded values in a float model; the decode is exact, LUT[code] * s + o, so a real
format would give the same logits). Not the product path: see README.md.

    python fakequant.py MODEL_DIR OUT_DIR --mode none|mid|ls [--group 32]

Quantizes o_proj, gate, up and down (the coverage of docs/QUALITY.md's 4-bit table) along K in
groups: mode none is plain QINS q4 (scale search: clip ratios 1.0..0.4 of absmax then Lloyd
steps, as src/codec/encode.rs), mid subtracts the group's midrange first, ls alternates code
assignment with a least-squares fit of (scale, offset) to the codes (5 rounds from mid).
"""
import argparse
import json
import os
import re
import shutil

import numpy as np
import onnx
from onnx import numpy_helper

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("out")
ap.add_argument("--mode", choices=["none", "mid", "ls"], default="ls")
ap.add_argument("--group", type=int, default=32)
ap.add_argument("--force", action="store_true", help="replace OUT_DIR if it is an earlier output of this script")
a = ap.parse_args()
MARKER = "fakequant.json"
if os.path.exists(a.out) and not (a.force and os.path.isfile(os.path.join(a.out, MARKER))):
    raise SystemExit(f"{a.out} exists (only a previous output of this script is replaced, with --force)")

M = 8
z = 1 - np.arange(M) * (0.5 / (M - 1))
U = (1 - z) / z  # magnitudes, U[0] = 0, U[7] = 1
MID = (U[1:] + U[:-1]) / 2


def assign(y):
    """Nearest signed level of y (in units of the scale): values."""
    m = np.searchsorted(MID, np.abs(y))
    return np.sign(y) * U[m]


def search(x):
    """x: [G, n] groups; the MSE-minimising scale per group (ratios, then Lloyd)."""
    amax = np.abs(x).max(axis=1, keepdims=True)
    amax[amax == 0] = 1e-30
    best_s, best_e = amax.copy(), np.full(amax.shape, np.inf)
    for r in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4):
        s = amax * r
        e = ((x - assign(x / s) * s) ** 2).sum(axis=1, keepdims=True)
        better = e < best_e
        best_s, best_e = np.where(better, s, best_s), np.where(better, e, best_e)
    s = best_s
    for _ in range(3):
        q = assign(x / s)
        uu = (q * q).sum(axis=1, keepdims=True)
        s_new = np.where(uu > 0, (np.abs(x) * np.abs(q)).sum(axis=1, keepdims=True) / np.maximum(uu, 1e-30), s)
        e_new = ((x - assign(x / s_new) * s_new) ** 2).sum(axis=1, keepdims=True)
        e_old = ((x - q * s) ** 2).sum(axis=1, keepdims=True)
        s = np.where(e_new < e_old, s_new, s)
    return s


def quantize(w):
    """w: [K, N] -> decoded [K, N] (groups of a.group along K)."""
    k, n = w.shape
    g = w.reshape(k // a.group, a.group, n).transpose(0, 2, 1).reshape(-1, a.group).astype(np.float64)
    o = np.zeros((g.shape[0], 1))
    if a.mode in ("mid", "ls"):
        o = (g.max(axis=1, keepdims=True) + g.min(axis=1, keepdims=True)) / 2
    s = search(g - o)
    if a.mode == "ls":
        for _ in range(5):
            q = assign((g - o) / s)
            # least squares g ~ s q + o, per group
            qm, gm = q.mean(axis=1, keepdims=True), g.mean(axis=1, keepdims=True)
            var = ((q - qm) ** 2).sum(axis=1, keepdims=True)
            s_new = np.where(var > 0, ((q - qm) * (g - gm)).sum(axis=1, keepdims=True) / np.maximum(var, 1e-30), s)
            s_new = np.maximum(s_new, 1e-30)
            o_new = gm - s_new * qm
            e_new = ((g - assign((g - o_new) / s_new) * s_new - o_new) ** 2).sum(axis=1, keepdims=True)
            e_old = ((g - q * s - o) ** 2).sum(axis=1, keepdims=True)
            keep = e_new < e_old
            s, o = np.where(keep, s_new, s), np.where(keep, o_new, o)
    # f16 storage of scale and offset, as a format would keep them
    s, o = s.astype(np.float16).astype(np.float64), o.astype(np.float16).astype(np.float64)
    d = assign((g - o) / s) * s + o
    return d.reshape(k // a.group, n, a.group).transpose(0, 2, 1).reshape(k, n).astype(w.dtype)


model = onnx.load(os.path.join(a.model, "model.onnx"))
take = re.compile(r"\.(o_proj|gate_proj|up_proj|down_proj)\.MatMul\.weight$")
err = []
for t in model.graph.initializer:
    if not take.search(t.name):
        continue
    w = numpy_helper.to_array(t)
    d = quantize(w)
    err.append(float(np.linalg.norm(d - w) / np.linalg.norm(w)))
    t.CopyFrom(numpy_helper.from_array(d, t.name))
tmp = a.out + ".partial"
shutil.rmtree(tmp, ignore_errors=True)
os.makedirs(tmp)
onnx.save_model(model, os.path.join(tmp, "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                location="model.onnx.data", size_threshold=1024)
for f in os.listdir(a.model):
    p = os.path.join(a.model, f)
    if os.path.isfile(p) and not f.startswith("model.onnx") and not f.startswith("qins_") and f != "degrid.json":
        shutil.copy(p, tmp)
with open(os.path.join(tmp, MARKER), "w") as f:
    json.dump({"source": os.path.abspath(a.model), "mode": a.mode, "group": a.group}, f)
if os.path.exists(a.out):
    shutil.rmtree(a.out)
os.rename(tmp, a.out)
print(f"{a.out}: mode {a.mode}, group {a.group}, {len(err)} tensors, mean relative error {np.mean(err):.4f}")
