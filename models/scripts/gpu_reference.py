#!/usr/bin/env python3
"""Checks the SmolLM2 importer against two references, on the GPU machine (which has torch,
transformers, onnx and onnxruntime; carry the `gguf` and `onnxruntime-genai` wheels):

1. Hugging Face transformers' own GGUF loader (dequantization, Q/K un-permutation and the
   Llama forward pass are all theirs), fp32 with TF32 off;
2. the public onnxruntime-genai builder, fed the model transformers loaded (saved as a Hugging
   Face folder), fp32 for the CPU: the layout our importer copies.

Our importer runs there too (the `qins` binary, carried). Both ONNX models run in the
machine's onnxruntime on the CPU. Everything is compared there; only summaries come back.

    python gpu_reference.py MODEL.gguf QINS_BINARY INPUTS.json OUT_DIR

INPUTS.json: {"ids": [[int, ...], ...], "texts": [str, ...]}. OUT_DIR gets summary.json.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np

gguf, qins, inputs_path, out = sys.argv[1:5]
os.makedirs(out, exist_ok=True)
W = "/tmp/gref"
os.makedirs(W, exist_ok=True)
inputs = json.load(open(inputs_path))
summary = {"inputs": {"sequences": [len(s) for s in inputs["ids"]], "texts": len(inputs["texts"])}}


def say(*a):
    print(*a, flush=True)


def save():
    json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1, default=str)


# 1. transformers
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_float32_matmul_precision("highest")
d, name = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
t0 = time.time()
tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
summary["transformers"] = {"version": transformers.__version__, "torch": torch.__version__, "load_s": time.time() - t0}
hf_logits = []
with torch.no_grad():
    m = hf.to("cuda")
    for ids in inputs["ids"]:
        x = torch.tensor([ids], device="cuda")
        hf_logits.append(m(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0].float().cpu().numpy())
    hf = m.to("cpu")
hf_dir = f"{W}/hf"
# transformers will not save a model it loaded from GGUF; a plain copy of its weights can be.
cfg = hf.config
if hasattr(cfg, "quantization_config"):
    del cfg.quantization_config
plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
plain.load_state_dict(hf.state_dict())
plain.save_pretrained(hf_dir, safe_serialization=True)
tok.save_pretrained(hf_dir)
say("transformers done", [l.shape for l in hf_logits])
save()

# 2. the builder, from the Hugging Face folder
builder_dir = f"{W}/builder"
t0 = time.time()
r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf_dir, "-o", builder_dir,
                    "-p", "fp32", "-e", "cpu", "-c", f"{W}/cache"], capture_output=True, text=True)
summary["builder"] = {"rc": r.returncode, "seconds": time.time() - t0, "stderr_tail": r.stderr[-1500:]}
say("builder rc", r.returncode, r.stderr[-800:] if r.returncode else "")
save()

# 3. ours
ours_dir = f"{W}/ours"
t0 = time.time()
r = subprocess.run([qins, "import-gguf", gguf, "-o", ours_dir, "--force"], capture_output=True, text=True)
summary["ours"] = {"rc": r.returncode, "seconds": time.time() - t0, "stdout_tail": r.stdout[-800:], "stderr_tail": r.stderr[-800:]}
say("ours rc", r.returncode)
save()

# 4. graphs and weights side by side
import onnx
from onnx import numpy_helper

def load(dir_):
    return onnx.load(os.path.join(dir_, "model.onnx"))

if summary["builder"]["rc"] == 0 and summary["ours"]["rc"] == 0:
    b, o = load(builder_dir), load(ours_dir)
    def nodes(m):
        return [(n.op_type, n.domain, n.name, list(n.input), list(n.output)) for n in m.graph.node]
    nb, no = nodes(b), nodes(o)
    diff_nodes = [(i, x, y) for i, (x, y) in enumerate(zip(nb, no)) if x != y]
    def attrs(m):
        return {n.name: sorted((a.name, str(onnx.helper.get_attribute_value(a))[:200]) for a in n.attribute
                               if a.type != onnx.AttributeProto.GRAPH) for n in m.graph.node}
    ab, ao = attrs(b), attrs(o)
    attr_diff = [k for k in ab if k in ao and ab[k] != ao[k]]
    ib = {t.name: t for t in b.graph.initializer}
    io_ = {t.name: t for t in o.graph.initializer}
    weight = {}
    for k in ib:
        if k in io_:
            x, y = numpy_helper.to_array(ib[k]).astype(np.float64), numpy_helper.to_array(io_[k]).astype(np.float64)
            weight[k] = float(np.abs(x - y).max()) if x.shape == y.shape else f"shape {x.shape} vs {y.shape}"
    def gio(vs):
        return [(v.name, v.type.tensor_type.elem_type, [dd.dim_param or dd.dim_value for dd in v.type.tensor_type.shape.dim]) for v in vs]
    summary["graph"] = {
        "nodes": [len(nb), len(no)],
        "node_mismatches": len(diff_nodes) + abs(len(nb) - len(no)),
        "first_node_mismatches": [str(x)[:400] for x in diff_nodes[:5]],
        "attribute_mismatches": attr_diff[:20],
        "initializers": [len(ib), len(io_)],
        "initializers_only_builder": sorted(set(ib) - set(io_))[:20],
        "initializers_only_ours": sorted(set(io_) - set(ib))[:20],
        "max_weight_diff": max((v for v in weight.values() if isinstance(v, float)), default=None),
        "weight_shape_mismatches": [k for k, v in weight.items() if not isinstance(v, float)][:20],
        "inputs_equal": gio(b.graph.input) == gio(o.graph.input),
        "outputs_equal": gio(b.graph.output) == gio(o.graph.output),
        "opsets": [[(x.domain, x.version) for x in b.opset_import], [(x.domain, x.version) for x in o.opset_import]],
        "genai_config_equal": json.load(open(f"{builder_dir}/genai_config.json")) == json.load(open(f"{ours_dir}/genai_config.json")),
    }
    worst = sorted(((v, k) for k, v in weight.items() if isinstance(v, float)), reverse=True)[:5]
    summary["graph"]["worst_weights"] = worst
    say(json.dumps(summary["graph"], indent=1, default=str)[:3000])
    save()

# 5. logits in onnxruntime (CPU) against transformers
import onnxruntime as ort

def ort_logits(dir_, ids):
    s = ort.InferenceSession(os.path.join(dir_, "model.onnx"), providers=["CPUExecutionProvider"])
    res = []
    for seq in ids:
        x = np.array([seq], dtype=np.int64)
        feed = {"input_ids": x, "attention_mask": np.ones_like(x)}
        for i in s.get_inputs():
            if i.name.startswith("past_key_values"):
                feed[i.name] = np.zeros((1, i.shape[1], 0, 64), dtype=np.float32)
        res.append(s.run(["logits"], feed)[0][0])
    return res

def compare(a, b):
    return {
        "max_abs": max(float(np.abs(x - y).max()) for x, y in zip(a, b)),
        "max_logit": max(float(np.abs(x).max()) for x in a),
        "argmax_agreement": float(np.mean(np.concatenate([x.argmax(-1) == y.argmax(-1) for x, y in zip(a, b)]))),
    }

summary["ort"] = ort.__version__
runs = {"transformers": hf_logits}
for label, dir_ in (("builder", builder_dir), ("ours", ours_dir)):
    if summary.get(label, {}).get("rc") == 0:
        runs[label] = ort_logits(dir_, inputs["ids"])
summary["logits"] = {}
for a, b in (("ours", "transformers"), ("builder", "transformers"), ("ours", "builder")):
    if a in runs and b in runs:
        summary["logits"][f"{a} vs {b}"] = compare(runs[b], runs[a])
say(json.dumps(summary["logits"], indent=1))
save()

# 6. tokenizers: transformers' GGUF tokenizer, the builder's copy of it, ours
from tokenizers import Tokenizer

texts = inputs["texts"]
enc = {"transformers": [tok(t, add_special_tokens=False)["input_ids"] for t in texts]}
for label, dir_ in (("builder", builder_dir), ("ours", ours_dir)):
    p = os.path.join(dir_, "tokenizer.json")
    if os.path.exists(p):
        enc[label] = [Tokenizer.from_file(p).encode(t, add_special_tokens=False).ids for t in texts]
summary["tokenizer"] = {}
for a in enc:
    if a != "transformers":
        bad = [i for i, (x, y) in enumerate(zip(enc["transformers"], enc[a])) if x != y]
        summary["tokenizer"][f"{a} vs transformers"] = {"mismatches": len(bad), "of": len(texts),
                                                       "examples": [(texts[i][:80], enc["transformers"][i][:30], enc[a][i][:30]) for i in bad[:5]]}
say(json.dumps(summary["tokenizer"], indent=1, ensure_ascii=False)[:3000])
save()
say("done")
