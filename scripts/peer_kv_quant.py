#!/usr/bin/env python3
"""The peer of QINS KV-V: ONNX Runtime's own quantized KV cache.

GroupQueryAttention (onnxruntime >= 1.30) takes an int8 K and V cache with static scales:
k_quant_type / v_quant_type = PER_TENSOR (scale [1]) or PER_CHANNEL (scale
[1, kv_heads, 1, head_size]), kv_cache_bit_width = 8, the scales as inputs 12 and 13. This
script calibrates those scales the way onnxruntime-genai's builder expects a
kv_cache_scale_file to be made (absmax / 127 of every cached K and V channel), on text that
is NOT the evaluation text: the LAST Wikipedia articles of the summaries file, while
`qins parity` scores the first ones. It writes a copy of the model whose attention nodes
and cache inputs/outputs are int8.

    python peer_kv_quant.py MODEL_DIR OUT_DIR --scale per_channel|per_tensor --text SUMMARIES.json
"""
import argparse
import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import tokenizers
from onnx import TensorProto, helper, numpy_helper

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("out")
ap.add_argument("--scale", choices=["per_channel", "per_tensor"], default="per_channel")
ap.add_argument("--text", required=True, help="the Wikipedia summaries JSON (calibration uses its last articles)")
ap.add_argument("--calib-tokens", type=int, default=8192)
ap.add_argument("--chunk", type=int, default=1024, help="tokens per calibration prompt")
ap.add_argument("--force", action="store_true")
a = ap.parse_args()

if os.path.exists(a.out):
    marker = os.path.join(a.out, "peer_kv_quant.json")
    if not (a.force and os.path.isfile(marker)):
        raise SystemExit(f"{a.out} exists (only a previous output of this script is replaced, with --force)")
    shutil.rmtree(a.out)

# Calibration text: articles from the end of the file, disjoint from the evaluation text.
with open(a.text) as f:
    data = json.load(f)
extracts = []


def walk(v):
    if isinstance(v, dict):
        if isinstance(v.get("extract"), str):
            extracts.append(v["extract"])
        else:
            for x in v.values():
                walk(x)
    elif isinstance(v, list):
        for x in v:
            walk(x)


walk(data)
tok = tokenizers.Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
ids, taken = [], 0
for text in reversed(extracts):
    ids += tok.encode(text + "\n\n", add_special_tokens=False).ids
    taken += 1
    if len(ids) >= a.calib_tokens:
        break
ids = ids[: a.calib_tokens]
print(f"calibrating on {len(ids)} tokens of the last {taken} of {len(extracts)} articles")

model_path = os.path.join(a.model, "model.onnx")
so = ort.SessionOptions()
sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
inputs = {i.name: i for i in sess.get_inputs()}
outputs = [o.name for o in sess.get_outputs()]
layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
cfg = json.load(open(os.path.join(a.model, "genai_config.json")))["model"]["decoder"]
kvh, hd = cfg["num_key_value_heads"], cfg["head_size"]
cache_np = np.float16 if inputs["past_key_values.0.key"].type == "tensor(float16)" else np.float32

amax = {(l, kind): np.zeros((kvh, hd), np.float64) for l in range(layers) for kind in ("key", "value")}
for start in range(0, len(ids), a.chunk):
    chunk = np.array([ids[start : start + a.chunk]], np.int64)
    feed = {"input_ids": chunk, "attention_mask": np.ones_like(chunk)}
    for l in range(layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{l}.{kind}"] = np.zeros((1, kvh, 0, hd), cache_np)
    res = dict(zip(outputs, sess.run(outputs, feed)))
    for l in range(layers):
        for kind in ("key", "value"):
            x = np.abs(res[f"present.{l}.{kind}"][0].astype(np.float64))  # [kvh, L, hd]
            amax[(l, kind)] = np.maximum(amax[(l, kind)], x.max(axis=1))

model = onnx.load(model_path, load_external_data=True)
g = model.graph
scales = {}
for (l, kind), m in amax.items():
    s = (m.max() if a.scale == "per_tensor" else m) / 127.0
    s = np.maximum(s, 1e-8).astype(np.float32)
    shape = [1] if a.scale == "per_tensor" else [1, kvh, 1, hd]
    name = f"kv_cache_scale.{l}.{kind}"
    g.initializer.append(numpy_helper.from_array(s.reshape(shape), name))
    scales[(l, kind)] = name

quant = "PER_TENSOR" if a.scale == "per_tensor" else "PER_CHANNEL"
n_gqa = 0
for n in g.node:
    if n.op_type != "GroupQueryAttention":
        continue
    l = int(n.input[3].split(".")[1])  # past_key_values.{l}.key
    while len(n.input) < 14:
        n.input.append("")
    n.input[12] = scales[(l, "key")]
    n.input[13] = scales[(l, "value")]
    n.attribute.extend(
        [
            helper.make_attribute("k_quant_type", quant),
            helper.make_attribute("v_quant_type", quant),
            helper.make_attribute("kv_cache_bit_width", 8),
        ]
    )
    n_gqa += 1
for vi in list(g.input) + list(g.output):
    if vi.name.startswith(("past_key_values.", "present.")):
        vi.type.tensor_type.elem_type = TensorProto.INT8
drop = {vi.name for vi in list(g.input) + list(g.output) if vi.name.startswith(("past_key_values.", "present."))}
kept = [vi for vi in g.value_info if vi.name not in drop]
del g.value_info[:]
g.value_info.extend(kept)

os.makedirs(a.out)
onnx.save(model, os.path.join(a.out, "model.onnx"), save_as_external_data=True, location="model.onnx.data")
for f in os.listdir(a.model):
    if f.endswith((".json", ".txt", ".model")) and not f.startswith("qins_"):
        shutil.copy(os.path.join(a.model, f), a.out)
json.dump(
    {"peer": "onnxruntime GroupQueryAttention int8 KV cache", "scale": quant, "calibration_tokens": len(ids),
     "calibration_articles": taken, "nodes": n_gqa, "onnxruntime": ort.__version__},
    open(os.path.join(a.out, "peer_kv_quant.json"), "w"), indent=1)
print(f"wrote {a.out}: {n_gqa} GroupQueryAttention nodes with an int8 {quant} K and V cache")
