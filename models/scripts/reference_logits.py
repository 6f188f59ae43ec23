#!/usr/bin/env python3
"""Reference logits and tokenizations from Hugging Face transformers' own GGUF loader.

A second, independent reference for the Rust importer: transformers dequantizes the GGUF
with the `gguf` package, undoes llama.cpp's Q/K permutation itself and runs its own Llama.

    # here (CPU): token ids from the imported tokenizer, and the texts to tokenize
    python check_import.py MODEL.gguf ONNX_DIR --write-inputs inputs.json
    # where transformers, torch and gguf are installed:
    python reference_logits.py MODEL.gguf inputs.json OUT_DIR [--device cpu|cuda]
    # back here:
    python check_import.py MODEL.gguf ONNX_DIR --compare-hf OUT_DIR

OUT_DIR gets `logits_<i>.npy` (float32 [T, vocab], one per id sequence, empty past, no
padding), `encodings.json` (transformers' tokenization of every text, with and without
special tokens, and its decode), `inputs.json` (a copy of the input) and `meta.json`.

Expect identical tokenization except possibly where whitespace runs precede digits: SmolLM2's
original tokenizer (and llama.cpp's 'smollm' pre-tokenizer, which the importer follows)
splits digits off before the GPT-2 regex, and transformers' GGUF converter may not.
"""

import argparse
import json
import os
import shutil

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("inputs", help='JSON: {"ids": [[int, ...], ...], "texts": [str, ...]}')
    ap.add_argument("out_dir")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda; fp32 either way, TF32 off")
    args = ap.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Full fp32 matmuls on GPUs too, so differences are the importer's, not TF32's.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    gguf = os.path.abspath(args.gguf)
    d, name = os.path.dirname(gguf), os.path.basename(gguf)
    inputs = json.load(open(args.inputs))
    os.makedirs(args.out_dir, exist_ok=True)
    shutil.copy(args.inputs, os.path.join(args.out_dir, "inputs.json"))

    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, torch_dtype=torch.float32)
    model = model.to(args.device).eval()

    with torch.no_grad():
        for i, ids in enumerate(inputs["ids"]):
            x = torch.tensor([ids], dtype=torch.long, device=args.device)
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0]
            logits = logits.float().cpu().numpy()
            np.save(os.path.join(args.out_dir, f"logits_{i}.npy"), logits)
            print(f"sequence {i}: {len(ids)} tokens, logits {logits.shape}, greedy next {int(logits[-1].argmax())}")

    texts = inputs.get("texts", [])
    enc = {
        "texts": texts,
        "ids_no_special": [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
        "ids_default": [tok(t)["input_ids"] for t in texts],
    }
    enc["decoded"] = [tok.decode(ids, skip_special_tokens=False) for ids in enc["ids_no_special"]]
    json.dump(enc, open(os.path.join(args.out_dir, "encodings.json"), "w"), ensure_ascii=False, indent=1)

    cfg = model.config
    meta = {
        "gguf": name,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": args.device,
        "tokenizer_class": type(tok).__name__,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "config": {k: getattr(cfg, k, None) for k in (
            "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings")},
    }
    json.dump(meta, open(os.path.join(args.out_dir, "meta.json"), "w"), indent=1, default=str)
    print(json.dumps(meta, indent=1, default=str))


if __name__ == "__main__":
    main()
