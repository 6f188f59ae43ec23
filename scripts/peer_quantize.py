#!/usr/bin/env python3
"""The peer a user would pick instead of QINS: ONNX Runtime's own MatMulNBits quantizer
(onnxruntime.quantization.matmul_nbits_quantizer, from the onnxruntime wheel), applied with
the same coverage as QINS's phi3 policy where it allows.

MatMulNBits replaces a whole MatMul, so the packed qkv projection (whose V part QINS takes)
is either quantized whole (Q and K too) or not at all: --qkv picks (default: left float,
so the peer never quantizes more than QINS does). o_proj, gate, up and down are quantized;
lm_head stays float.

    python peer_quantize.py MODEL_DIR OUT_DIR --bits 4|8 [--block 32] [--asymmetric] [--qkv]
                            [--algo default|hqq|rtn|kquant] [--force]

--algo picks the quantizer's algorithm: default (ORT's own round-to-nearest, symmetric unless
--asymmetric), hqq (half-quadratic, asymmetric; needs torch), rtn and kquant (the ports in
onnxruntime.quantization.neural_compressor, asymmetric). GPTQ takes calibration data and is not
offered here.
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
ap.add_argument("--algo", default="default", choices=["default", "hqq", "rtn", "kquant"])
ap.add_argument("--force", action="store_true", help="replace OUT_DIR if it is an earlier output of this script")
a = ap.parse_args()

# Only a previous output of this script (it holds the marker) is ever replaced, and only when asked.
MARKER = "peer_quantize.json"
if os.path.exists(a.out) and not (a.force and os.path.isfile(os.path.join(a.out, MARKER))):
    raise SystemExit(f"{a.out} exists (only a previous output of this script is replaced, with --force)")

model = onnx.load(os.path.join(a.model, "model.onnx"))
take = re.compile(r"/(o_proj|gate_proj|up_proj|down_proj|gate_up_proj" + ("|qkv_proj" if a.qkv else "") + r")/MatMul$")
exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and not take.search(n.name)]
op_types = ("MatMul",)
if a.algo == "hqq":
    algo = mnq.HQQWeightOnlyQuantConfig(block_size=a.block, bits=a.bits, op_types_to_quantize=op_types)
elif a.algo == "rtn":
    algo = mnq.RTNWeightOnlyQuantConfig(op_types_to_quantize=op_types)
elif a.algo == "kquant":
    algo = mnq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=op_types)
else:
    algo = None
q = mnq.MatMulNBitsQuantizer(model, bits=a.bits, block_size=a.block, is_symmetric=not a.asymmetric,
                             nodes_to_exclude=exclude, accuracy_level=None, algo_config=algo)
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
