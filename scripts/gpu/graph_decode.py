"""Greedy decode of genai-layout models in ORT's CUDA EP with each decode step replayed from
a CUDA graph, against the same loop without one: what the engine would gain from a graph.

Static buffers, as onnxruntime-genai keeps them for graph capture: one past/present buffer
per layer and K/V of [1, kv_heads, MAX_LEN, head] bound as both input and output (the
GroupQueryAttention kernel writes the new token in place), input_ids [1, 1] and an
attention mask [1, MAX_LEN] (ones up to the current length) at fixed device addresses,
updated in place between steps; logits at a fixed device address, copied out each step.
The prompt runs in the same session with graph capture off for that run (gpu_graph_id -1).
Both loops run the model with its rope-cache If node folded (see static_rope).

argv: MODEL_DIR... [--json OUT]; env QINS_PROVIDER_LIB (the custom-op library).
"""
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort

MAX_LEN, PROMPT, NEW = 512, 128, 128


def static_rope(model):
    """The model with its one If node (the builder's choice between the short and the long
    LongRoPE caches, on the mask length > original context) replaced by the short branch's
    constants: ORT's CUDA EP captures no graph with control flow. Exact while the mask stays
    at most the original context (4096 for Phi-3.5), as MAX_LEN does here. Written next to
    the model (same external data files)."""
    import onnx
    src = os.path.join(model, "model.onnx")
    dst = os.path.join(model, "model_static_rope.onnx")
    if os.path.exists(dst):
        return dst
    m = onnx.load(src, load_external_data=False)
    nodes = list(m.graph.node)
    ifs = [n for n in nodes if n.op_type == "If"]
    if not ifs:
        return src
    assert len(ifs) == 1, f"{len(ifs)} If nodes"
    node = ifs[0]
    branch = next(a.g for a in node.attribute if a.name == "else_branch")
    out = []
    for n in nodes:
        if n is node:
            for c, name in zip(branch.node, node.output):
                assert c.op_type == "Constant"
                c = onnx.NodeProto.FromString(c.SerializeToString())
                c.output[0] = name
                out.append(c)
        else:
            out.append(n)
    del m.graph.node[:]
    m.graph.node.extend(out)
    onnx.save(m, dst)
    return dst


def session(model, graph):
    so = ort.SessionOptions()
    so.register_custom_ops_library(os.environ["QINS_PROVIDER_LIB"])
    prov = [("CUDAExecutionProvider", {"enable_cuda_graph": "1" if graph else "0"})]
    return ort.InferenceSession(static_rope(model), so, providers=prov)


def decode(model, graph):
    s = session(model, graph)
    cfg = json.load(open(os.path.join(model, "genai_config.json")))["model"]["decoder"]
    heads, hd, layers = cfg["num_key_value_heads"], cfg["head_size"], cfg["num_hidden_layers"]
    names = {i.name for i in s.get_inputs()}
    logits_t = next(o for o in s.get_outputs() if o.name == "logits").type
    ldt = np.float16 if "float16" in logits_t else np.float32
    vocab = 32064
    kv = [ort.OrtValue.ortvalue_from_shape_and_type((1, heads, MAX_LEN, hd), np.float16, "cuda", 0)
          for _ in range(2 * layers)]
    mask_np = np.zeros((1, MAX_LEN), np.int64)
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 30000, size=(1, PROMPT), dtype=np.int64)

    def bind(ids, mask, logits):
        b = s.io_binding()
        b.bind_ortvalue_input("input_ids", ids)
        b.bind_ortvalue_input("attention_mask", mask)
        for i in range(2 * layers):
            kind = "key" if i % 2 == 0 else "value"
            b.bind_ortvalue_input(f"past_key_values.{i // 2}.{kind}", kv[i])
            b.bind_ortvalue_output(f"present.{i // 2}.{kind}", kv[i])
        b.bind_ortvalue_output("logits", logits)
        return b

    assert "position_ids" not in names, "position_ids input: not handled by this prototype"
    # Prompt: its own buffers, no capture.
    mask_np[0, :PROMPT] = 1
    p_ids = ort.OrtValue.ortvalue_from_numpy(prompt, "cuda", 0)
    p_mask = ort.OrtValue.ortvalue_from_numpy(mask_np, "cuda", 0)
    p_logits = ort.OrtValue.ortvalue_from_shape_and_type((1, PROMPT, vocab), ldt, "cuda", 0)
    ro_prompt = ort.RunOptions()
    ro_prompt.add_run_config_entry("gpu_graph_id", "-1")
    t0 = time.perf_counter()
    s.run_with_iobinding(bind(p_ids, p_mask, p_logits), ro_prompt)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    tok = int(np.argmax(p_logits.numpy()[0, -1]))
    # Decode: fixed buffers, updated in place.
    ids = ort.OrtValue.ortvalue_from_numpy(np.array([[tok]], np.int64), "cuda", 0)
    mask = ort.OrtValue.ortvalue_from_numpy(mask_np, "cuda", 0)
    logits = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, vocab), ldt, "cuda", 0)
    b = bind(ids, mask, logits)
    ro = ort.RunOptions()
    out, times = [tok], []
    for step in range(NEW):
        mask_np[0, PROMPT + step] = 1
        ids.update_inplace(np.array([[out[-1]]], np.int64))
        mask.update_inplace(mask_np)
        t = time.perf_counter()
        s.run_with_iobinding(b, ro)
        nxt = int(np.argmax(logits.numpy()[0, -1]))
        times.append(time.perf_counter() - t)
        out.append(nxt)
    # The first steps include warm-up and the capture.
    ms = float(np.median(times[8:]) * 1e3)
    return dict(model=model, graph=graph, prefill_128_ms=prefill_ms, decode_ms_per_token=ms,
                tokens_per_s=1e3 / ms, tokens=out)


def main():
    args = sys.argv[1:]
    out = None
    if "--json" in args:
        i = args.index("--json")
        out = args[i + 1]
        del args[i:i + 2]
    rows = []
    print(f"{'model':40s} {'graph':>6s} {'ms/token':>9s} {'tok/s':>7s} {'same tokens':>11s}", flush=True)
    for m in args:
        base = None
        for graph in (False, True):
            try:
                r = decode(m, graph)
            except Exception as e:  # report and go on: one model's failure is a result too
                r = dict(model=m, graph=graph, error=str(e)[:400])
                print(f"{m:40s} {graph!s:>6s} error: {r['error']}", flush=True)
                rows.append(r)
                continue
            same = "" if base is None else str(base == r["tokens"])
            base = base or r["tokens"]
            r["same_tokens_as_no_graph"] = same
            print(f"{os.path.basename(m):40s} {graph!s:>6s} {r['decode_ms_per_token']:9.3f} {r['tokens_per_s']:7.1f} {same:>11s}",
                  flush=True)
            rows.append(r)
    if out:
        json.dump(rows, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
