#!/usr/bin/env python3
"""The peer a user would pick instead of QINS: ONNX Runtime's own MatMulNBits quantizer
(onnxruntime.quantization.matmul_nbits_quantizer, from the onnxruntime wheel), applied with
the same coverage as QINS's phi3 policy where it allows.

MatMulNBits replaces a whole MatMul, so the packed qkv projection (whose V part QINS takes)
is either quantized whole (Q and K too) or not at all: --qkv picks (default: left float,
so the peer never quantizes more than QINS does). o_proj, gate, up and down are quantized;
lm_head stays float.

    python peer_quantize.py MODEL_DIR OUT_DIR --bits 4|8 [--block 32] [--asymmetric] [--qkv]
                            [--algo default|hqq|rtn|kquant|gptq] [--calibrate TEXT [--calib-tokens 8192]]
                            [--force]

--algo picks the quantizer's algorithm: default (ORT's own round-to-nearest, symmetric unless
--asymmetric), hqq (half-quadratic, asymmetric; needs torch), rtn and kquant (the ports in
onnxruntime.quantization.neural_compressor, asymmetric), gptq (the same port's GPTQ, symmetric
unless --asymmetric; needs --calibrate). GPTQ reads the calibration text (plain text) the way
`qins rewrite --calibrate` does: the first --calib-tokens tokens of TEXT by the model's
tokenizer.json, no special tokens, in windows of 512 fed as prompts with an empty cache; so the
two see the same tokens.

ORT 1.31.1's GPTQ path quantizes every MatMul with a constant weight unless told otherwise:
its nodes_to_exclude is honoured by RTN only. The excluded nodes are marked "fp32" in its
per-node configuration here (its own way of skipping a node), so the coverage matches.
"""
import argparse
import json
import os
import re
import shutil

import onnx
from onnxruntime.quantization import matmul_nbits_quantizer as mnq

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("out")
ap.add_argument("--bits", type=int, default=4, choices=[4, 8])
ap.add_argument("--block", type=int, default=32)
ap.add_argument("--asymmetric", action="store_true")
ap.add_argument("--qkv", action="store_true", help="also quantize the packed qkv projection (Q and K too)")
ap.add_argument("--algo", default="default", choices=["default", "hqq", "rtn", "kquant", "gptq"])
ap.add_argument("--calibrate", metavar="TEXT", help="calibration text for --algo gptq")
ap.add_argument("--calib-tokens", type=int, default=8192)
ap.add_argument("--force", action="store_true", help="replace OUT_DIR if it is an earlier output of this script")
a = ap.parse_args()
if (a.algo == "gptq") != (a.calibrate is not None):
    raise SystemExit("--calibrate goes with --algo gptq, and --algo gptq needs it")

# Only a previous output of this script (it holds the marker) is ever replaced, and only when asked.
MARKER = "peer_quantize.json"
if os.path.exists(a.out) and not (a.force and os.path.isfile(os.path.join(a.out, MARKER))):
    raise SystemExit(f"{a.out} exists (only a previous output of this script is replaced, with --force)")

model = onnx.load(os.path.join(a.model, "model.onnx"))
take = re.compile(r"/(o_proj|gate_proj|up_proj|down_proj|gate_up_proj" + ("|qkv_proj" if a.qkv else "") + r")/MatMul$")
exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and not take.search(n.name)]
op_types = ("MatMul",)


def calibration_reader(model):
    """The calibration windows as ORT feeds: input_ids, attention_mask and an empty cache."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader
    from tokenizers import Tokenizer

    text = open(a.calibrate, encoding="utf-8").read()
    ids = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json")).encode(
        text[: a.calib_tokens * 8], add_special_tokens=False).ids[: a.calib_tokens]
    head = json.load(open(os.path.join(a.model, "genai_config.json")))["model"]["decoder"]["head_size"]
    feeds = []
    for s in range(0, len(ids), 512):
        w = np.array([ids[s : s + 512]], dtype=np.int64)
        if w.shape[1] < 2:
            continue
        f = {"input_ids": w, "attention_mask": np.ones_like(w)}
        for i in model.graph.input:
            if i.name.startswith("past_key_values."):
                kv_heads = i.type.tensor_type.shape.dim[1].dim_value
                dtype = np.float16 if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else np.float32
                f[i.name] = np.zeros((1, kv_heads, 0, head), dtype=dtype)
        feeds.append(f)
    print(f"GPTQ calibration: {len(ids)} tokens of {a.calibrate}, {len(feeds)} windows")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            self.i += 1
            return feeds[self.i - 1] if self.i <= len(feeds) else None

    return Reader()


if a.algo == "hqq":
    algo = mnq.HQQWeightOnlyQuantConfig(block_size=a.block, bits=a.bits, op_types_to_quantize=op_types)
elif a.algo == "rtn":
    algo = mnq.RTNWeightOnlyQuantConfig(op_types_to_quantize=op_types)
elif a.algo == "kquant":
    algo = mnq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=op_types)
elif a.algo == "gptq":
    algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=calibration_reader(model), op_types_to_quantize=op_types)
else:
    algo = None
q = mnq.MatMulNBitsQuantizer(model, bits=a.bits, block_size=a.block, is_symmetric=not a.asymmetric,
                             nodes_to_exclude=exclude, accuracy_level=None, algo_config=algo)
if a.algo == "gptq":
    own_config = q._generate_q4_node_config
    q._generate_q4_node_config = lambda: {**own_config(), **{n: "fp32" for n in exclude}}
q.process()
tmp = a.out + ".partial"
shutil.rmtree(tmp, ignore_errors=True)
os.makedirs(tmp)
q.model.save_model_to_file(os.path.join(tmp, "model.onnx"), use_external_data_format=True)
for f in os.listdir(a.model):
    if not f.startswith("model.onnx") and os.path.isfile(os.path.join(a.model, f)):
        shutil.copy(os.path.join(a.model, f), tmp)
with open(os.path.join(tmp, MARKER), "w") as f:
    json.dump({"source": os.path.abspath(a.model), **vars(a)}, f, indent=1)
if os.path.exists(a.out):
    shutil.rmtree(a.out)
os.rename(tmp, a.out)
ops = {}
for n in q.model.model.graph.node:
    ops[n.op_type] = ops.get(n.op_type, 0) + 1
print(f"{a.out}: {a.algo}, MatMulNBits {ops.get('MatMulNBits', 0)}, MatMul {ops.get('MatMul', 0)} (bits {a.bits}, block {a.block}, "
      f"{'symmetric' if a.algo == 'default' and not a.asymmetric else 'asymmetric'}, qkv {'quantized' if a.qkv else 'float'})")
