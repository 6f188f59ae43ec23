#!/usr/bin/env python3
"""Greedy decoding against a QINS model served by Triton, feeding the KV cache back.

NOT RUN AGAINST TRITON HERE: no Triton server (and no Docker daemon) was available on the
machine where this example was written. What was run is `--local`: the same loop, the same
request tensors, against ONNX Runtime in this process with the QINS library registered
(see README.md, "What was checked").

The model is an onnxruntime-genai builder graph (what `qins import-gguf` and `qins rewrite`
write): inputs input_ids, attention_mask and past_key_values.N.key/.value, outputs logits and
present.N.key/.value. Triton keeps no state between requests here, so every step sends the
whole cache back: step 0 sends the prompt with empty past tensors (past length 0), each later
step the one new token, the mask over every position so far, and the previous step's
present.N.* as past_key_values.N.*.

    python3 client.py --url localhost:8001 --model smollm2_qins --ids 1,9690,28,905 --new-tokens 8
    python3 client.py ... --tokenizer work/smollm2-qins-q8-g128/tokenizer.json --prompt "Hello"
    python3 client.py --local work/smollm2-qins-q8-g128 --lib target/release/libqins_provider.so --ids ...

--head-size is the last dimension of an empty past tensor where the config leaves it -1
(kv_cache_dim: 64 for SmolLM2, 96 for Phi-3.5-mini; genai_config.json's head_size).
"""

import argparse
import sys

import numpy as np

NP_TYPES = {
    "TYPE_FP32": np.float32,
    "TYPE_FP16": np.float16,
    "TYPE_INT64": np.int64,
    "TYPE_INT32": np.int32,
    "TYPE_UINT8": np.uint8,
}


class TritonModel:
    """The model as Triton serves it (gRPC)."""

    def __init__(self, url, name):
        import tritonclient.grpc as grpcclient

        self.grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url=url)
        self.name = name
        cfg = self.client.get_model_config(name, as_json=True)["config"]
        self.inputs, self.outputs = io_from_config(cfg)

    def request(self, feeds):
        """The gRPC request tensors for `feeds` (name -> numpy array), and the outputs asked for."""
        req = []
        for name, arr in feeds.items():
            t = self.grpc.InferInput(name, list(arr.shape), _triton_type(arr.dtype))
            t.set_data_from_numpy(arr)
            req.append(t)
        return req, [self.grpc.InferRequestedOutput(n) for n in self.outputs]

    def run(self, feeds):
        req, outs = self.request(feeds)
        res = self.client.infer(self.name, req, outputs=outs)
        return {n: res.as_numpy(n) for n in self.outputs}


def io_from_config(cfg):
    """([(name, numpy type, dims)], [output names]) from get_model_config(as_json=True)["config"]."""
    # MessageToJson writes int64 values, so the dims, as strings.
    inputs = [(i["name"], NP_TYPES[i["data_type"]], [int(d) for d in i["dims"]]) for i in cfg["input"]]
    return inputs, [o["name"] for o in cfg["output"]]


class LocalModel:
    """The same model in this process, through ONNX Runtime with the QINS library."""

    def __init__(self, folder, lib, provider):
        import os

        import onnxruntime as ort

        so = ort.SessionOptions()
        so.register_custom_ops_library(lib)
        path = os.path.join(folder, "model.onnx") if os.path.isdir(folder) else folder
        providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
        self.sess = ort.InferenceSession(path, so, providers=providers)
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                 "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}
        self.inputs = [(i.name, types[i.type], [d if isinstance(d, int) else -1 for d in i.shape])
                       for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def run(self, feeds):
        return dict(zip(self.outputs, self.sess.run(self.outputs, feeds)))


def _triton_type(dtype):
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)


def greedy(model, prompt_ids, new_tokens, head_size):
    """Greedy continuation of prompt_ids; returns the new token ids."""
    past_names = [(n, t, d) for n, t, d in model.inputs if n.startswith("past_key_values.")]
    if not past_names or "logits" not in model.outputs:
        sys.exit("not an onnxruntime-genai builder graph (no past_key_values.* inputs or no logits)")
    # Step 0: the prompt, and empty past tensors [1, kv_heads, 0, last].
    past = {}
    for name, np_type, dims in past_names:
        last = dims[3] if dims[3] != -1 else head_size
        past[name] = np.zeros((1, dims[1], 0, last), dtype=np_type)
    ids = np.array([prompt_ids], dtype=np.int64)
    total = len(prompt_ids)
    out = []
    for _ in range(new_tokens):
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), dtype=np.int64), **past}
        res = model.run(feeds)
        tok = int(np.argmax(res["logits"][0, -1]))
        out.append(tok)
        # present.N.key -> past_key_values.N.key for the next step.
        past = {"past_key_values." + n[len("present."):]: v for n, v in res.items() if n.startswith("present.")}
        ids = np.array([[tok]], dtype=np.int64)
        total += 1
    return out


def main():
    ap = argparse.ArgumentParser(description="greedy decoding through Triton (or --local ONNX Runtime)")
    ap.add_argument("--url", default="localhost:8001", help="Triton's gRPC endpoint")
    ap.add_argument("--model", default="smollm2_qins", help="Triton model name")
    ap.add_argument("--local", metavar="MODEL_DIR", help="run in-process with ONNX Runtime instead of Triton")
    ap.add_argument("--lib", default="target/release/libqins_provider.so", help="QINS library, --local only")
    ap.add_argument("--provider", default="CPUExecutionProvider", help="ORT execution provider, --local only")
    ap.add_argument("--ids", help="prompt token ids, comma-separated")
    ap.add_argument("--tokenizer", help="a tokenizer.json (needs the `tokenizers` package) for --prompt")
    ap.add_argument("--prompt", help="prompt text, with --tokenizer")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--head-size", type=int, default=64, help="kv_cache_dim where the config leaves it -1")
    a = ap.parse_args()

    tok = None
    if a.ids:
        prompt = [int(x) for x in a.ids.split(",")]
    elif a.tokenizer and a.prompt is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(a.tokenizer)
        prompt = tok.encode(a.prompt).ids
    else:
        sys.exit("give --ids, or --tokenizer and --prompt")

    model = LocalModel(a.local, a.lib, a.provider) if a.local else TritonModel(a.url, a.model)
    new = greedy(model, prompt, a.new_tokens, a.head_size)
    print("prompt ids:", prompt)
    print("new ids:   ", new)
    if tok is not None:
        print("text:      ", tok.decode(new))


if __name__ == "__main__":
    main()
