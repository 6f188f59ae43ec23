#!/usr/bin/env python3
"""End-to-end check of the importer against Hugging Face logits, without quantization.

Takes the onnxruntime-genai builder's fp32 fixture of a tiny random Llama
(`llama-gqa-tiny-fp32-cpu`, from the project's shared reference fixtures), turns its weights
back into a GGUF file the way llama.cpp's converter would (F32 tensors, Q and K rows
permuted, llama.* metadata), imports that with the Rust importer, and compares the imported
model's logits in ONNX Runtime with the Hugging Face logits the fixture was made with.

    python fixture_roundtrip.py FIXTURE_DIR HF_LOGITS.npy IMPORTER WORK_DIR

IMPORTER is a command that takes `GGUF OUT_DIR`, e.g. the example binary
`target/release/examples/import_gguf`.
"""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

PROMPT_IDS = [1, 450, 7483, 310, 3444, 338, 3681, 29889, 32007, 32001, 13, 306]


def gguf_write(path, meta, tensors):
    def s(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)))
    for k, v in meta:
        out += s(k)
        if isinstance(v, bool):
            out += struct.pack("<IB", 7, v)
        elif isinstance(v, int):
            out += struct.pack("<II", 4, v)
        elif isinstance(v, float):
            out += struct.pack("<If", 6, v)
        elif isinstance(v, str):
            out += struct.pack("<I", 8) + s(v)
        elif isinstance(v, list) and all(isinstance(e, str) for e in v):
            out += struct.pack("<IIQ", 9, 8, len(v)) + b"".join(s(e) for e in v)
        else:
            out += struct.pack("<IIQ", 9, 5, len(v)) + b"".join(struct.pack("<i", e) for e in v)
    off = 0
    blobs = []
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr, np.float32)
        out += s(name) + struct.pack("<I", arr.ndim) + b"".join(struct.pack("<Q", d) for d in reversed(arr.shape))
        out += struct.pack("<IQ", 0, off)
        blobs.append(arr.tobytes())
        off += (len(blobs[-1]) + 31) // 32 * 32
    out += b"\0" * (-len(out) % 32)
    for b in blobs:
        out += b + b"\0" * (-len(b) % 32)
    open(path, "wb").write(out)


def permute(w, n_head):  # convert_hf_to_gguf.py: Hugging Face -> llama.cpp row order
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def main():
    fx, hf_logits, importer, work = sys.argv[1:5]
    os.makedirs(work, exist_ok=True)
    cfg = json.load(open(f"{fx}/genai_config.json"))["model"]
    dec = cfg["decoder"]
    L, H, KV, D = dec["num_hidden_layers"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"]
    hidden, vocab = dec["hidden_size"], cfg["vocab_size"]
    m = onnx.load(f"{fx}/model.onnx")
    w = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    eps = [a.f for n in m.graph.node if n.op_type == "SimplifiedLayerNormalization" for a in n.attribute if a.name == "epsilon"][0]
    ffn = w["model.layers.0.mlp.gate_proj.MatMul.weight"].shape[1]

    tensors = [("token_embd.weight", w["lm_head.MatMul.weight"].T)]
    for i in range(L):
        p = f"model.layers.{i}"
        qkv = w[f"{p}.attn.qkv_proj.MatMul.weight"].T
        q, k, v = qkv[:H * D], qkv[H * D:(H + KV) * D], qkv[(H + KV) * D:]
        tensors += [
            (f"blk.{i}.attn_norm.weight", w[f"{p}.input_layernorm.weight"]),
            (f"blk.{i}.attn_q.weight", permute(q, H)),
            (f"blk.{i}.attn_k.weight", permute(k, KV)),
            (f"blk.{i}.attn_v.weight", v),
            (f"blk.{i}.attn_output.weight", w[f"{p}.attn.o_proj.MatMul.weight"].T),
            (f"blk.{i}.ffn_norm.weight", w[f"{p}.post_attention_layernorm.weight"]),
            (f"blk.{i}.ffn_gate.weight", w[f"{p}.mlp.gate_proj.MatMul.weight"].T),
            (f"blk.{i}.ffn_up.weight", w[f"{p}.mlp.up_proj.MatMul.weight"].T),
            (f"blk.{i}.ffn_down.weight", w[f"{p}.mlp.down_proj.MatMul.weight"].T),
        ]
    tensors.append(("output_norm.weight", w[f"model.layers.{L}.final_norm_layernorm.weight"]))

    # A stand-in byte-level vocabulary of the right size (the fixture's own is SentencePiece).
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    tokens = [chr(c) for c in cs] + [f"<unused{i}>" for i in range(256, vocab)]
    meta = [
        ("general.architecture", "llama"), ("general.name", "llama-gqa-tiny"),
        ("llama.block_count", L), ("llama.context_length", cfg["context_length"]),
        ("llama.embedding_length", hidden), ("llama.feed_forward_length", ffn),
        ("llama.attention.head_count", H), ("llama.attention.head_count_kv", KV),
        ("llama.rope.freq_base", 100000.0), ("llama.attention.layer_norm_rms_epsilon", eps),
        ("tokenizer.ggml.model", "gpt2"), ("tokenizer.ggml.pre", "gpt2"), ("tokenizer.ggml.tokens", tokens),
        ("tokenizer.ggml.token_type", [1] * vocab), ("tokenizer.ggml.merges", []),
        ("tokenizer.ggml.bos_token_id", cfg["bos_token_id"]), ("tokenizer.ggml.eos_token_id", cfg["eos_token_id"]),
    ]
    gguf = f"{work}/llama-gqa-tiny.gguf"
    gguf_write(gguf, meta, tensors)
    out = f"{work}/imported"
    subprocess.run([importer, gguf, out, "--force"], check=True)

    so = ort.SessionOptions()
    so.log_severity_level = 3
    results = []
    for model_dir in (out, fx):
        s = ort.InferenceSession(f"{model_dir}/model.onnx", so, providers=["CPUExecutionProvider"])
        feeds = {"input_ids": np.array([PROMPT_IDS], np.int64), "attention_mask": np.ones((1, len(PROMPT_IDS)), np.int64)}
        for i in s.get_inputs():
            if i.name.startswith("past"):
                feeds[i.name] = np.zeros((1, KV, 0, D), np.float32)
        results.append(s.run(["logits"], feeds)[0][0])
    ref = np.load(hf_logits)
    d_hf = float(np.abs(results[0] - ref).max())
    d_fx = float(np.abs(results[0] - results[1]).max())
    print(f"imported vs Hugging Face logits: max abs diff {d_hf:.3e} (logit scale {np.abs(ref).max():.3f})")
    print(f"imported vs the builder's own model: max abs diff {d_fx:.3e}")
    return 0 if d_hf < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
