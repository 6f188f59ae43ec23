#!/usr/bin/env python3
"""Checks an imported GGUF model (the output of `qins import-gguf`) against independent references.

Nothing here shares code with the Rust importer: the GGUF file is parsed and dequantized
again in numpy, the Llama forward pass is written out in numpy (float64), and the tokenizer
is checked against a small byte-level BPE written from the GPT-2 algorithm and llama.cpp's
pre-tokenizer regexes.

    python check_import.py MODEL.gguf ONNX_DIR [--gen-tokens 40]
    python check_import.py MODEL.gguf ONNX_DIR --write-inputs inputs.json   # for reference_logits.py
    python check_import.py MODEL.gguf ONNX_DIR --compare-hf HF_OUT         # its output, back here

Needs numpy, onnxruntime, tokenizers and regex. Prints the tokenizer comparison, the max
abs logit difference between ONNX Runtime and the numpy reference, greedy continuations,
and a chat generation that runs through the KV cache (present -> past).
"""

import argparse
import json
import struct
import sys
import time

import numpy as np

# ---------------------------------------------------------------------------------------
# GGUF reading and dequantization
# ---------------------------------------------------------------------------------------
SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class GGUF:
    def __init__(self, path):
        self.buf = open(path, "rb").read()
        self.pos = 0
        assert self.buf[:4] == b"GGUF", "not a GGUF file"
        self.pos = 4
        self.version = self._u("<I")
        n_tensors, n_kv = self._u("<Q"), self._u("<Q")
        self.kv = {}
        for _ in range(n_kv):
            key = self._s()
            self.kv[key] = self._val(self._u("<I"))
        self.tensors = {}
        for _ in range(n_tensors):
            name = self._s()
            dims = [self._u("<Q") for _ in range(self._u("<I"))]
            typ, off = self._u("<I"), self._u("<Q")
            self.tensors[name] = (dims, typ, off)
        align = self.kv.get("general.alignment", 32)
        self.data0 = (self.pos + align - 1) // align * align

    def _u(self, fmt):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def _s(self):
        n = self._u("<Q")
        v = self.buf[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return v

    def _val(self, t):
        if t in SCALAR:
            return self._u(SCALAR[t])
        if t == 8:
            return self._s()
        if t == 9:
            et, n = self._u("<I"), self._u("<Q")
            return [self._val(et) for _ in range(n)]
        raise ValueError(f"metadata type {t}")

    def tensor(self, name):
        """Dequantized, numpy (row-major) shape = ggml dims reversed."""
        dims, typ, off = self.tensors[name]
        n = int(np.prod(dims))
        shape = list(reversed(dims))
        p = self.data0 + off
        if typ == 0:
            return np.frombuffer(self.buf, np.float32, n, p).reshape(shape).copy()
        if typ == 1:
            return np.frombuffer(self.buf, np.float16, n, p).astype(np.float32).reshape(shape)
        if typ == 8:  # Q8_0: f16 scale, 32 int8
            raw = np.frombuffer(self.buf, np.uint8, n // 32 * 34, p).reshape(-1, 34)
            d = raw[:, :2].copy().view(np.float16).astype(np.float32)
            q = raw[:, 2:].copy().view(np.int8).astype(np.float32)
            return (d * q).reshape(shape)
        if typ == 3:  # Q4_1: f16 scale, f16 min, 16 bytes; low nibbles are x[0:16], high x[16:32]
            raw = np.frombuffer(self.buf, np.uint8, n // 32 * 20, p).reshape(-1, 20)
            d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
            m = raw[:, 2:4].copy().view(np.float16).astype(np.float32)
            qs = raw[:, 4:]
            q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32)
            return (d * q + m).reshape(shape)
        raise ValueError(f"{name}: ggml type {typ} not handled by this checker")


# ---------------------------------------------------------------------------------------
# Reference Llama forward pass (float64)
# ---------------------------------------------------------------------------------------
class Reference:
    def __init__(self, g):
        a = g.kv["general.architecture"]
        self.L = g.kv[f"{a}.block_count"]
        self.H = g.kv[f"{a}.attention.head_count"]
        self.KV = g.kv.get(f"{a}.attention.head_count_kv", self.H)
        self.D = g.kv[f"{a}.embedding_length"] // self.H
        self.theta = g.kv.get(f"{a}.rope.freq_base", 10000.0)
        self.eps = g.kv[f"{a}.attention.layer_norm_rms_epsilon"]
        f64 = lambda x: x.astype(np.float64)
        self.embd = f64(g.tensor("token_embd.weight"))
        self.out = f64(g.tensor("output.weight")) if "output.weight" in g.tensors else self.embd
        self.norm = f64(g.tensor("output_norm.weight"))

        def unpermute(w, n_head):  # llama.cpp -> Hugging Face row order
            rows, cols = w.shape
            return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)

        self.layers = []
        for i in range(self.L):
            t = lambda n: f64(g.tensor(f"blk.{i}.{n}.weight"))
            self.layers.append(dict(
                attn_norm=t("attn_norm"), q=unpermute(t("attn_q"), self.H), k=unpermute(t("attn_k"), self.KV),
                v=t("attn_v"), o=t("attn_output"), ffn_norm=t("ffn_norm"), gate=t("ffn_gate"), up=t("ffn_up"),
                down=t("ffn_down")))

    def rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):  # x [heads, T, D], Hugging Face rotate_half convention
        inv = 1.0 / self.theta ** (np.arange(0, self.D, 2) / self.D)
        ang = np.outer(pos, inv)
        cos = np.concatenate([np.cos(ang)] * 2, -1)
        sin = np.concatenate([np.sin(ang)] * 2, -1)
        h = self.D // 2
        rot = np.concatenate([-x[..., h:], x[..., :h]], -1)
        return x * cos + rot * sin

    def logits(self, ids):
        T = len(ids)
        x = self.embd[ids]
        pos = np.arange(T)
        mask = np.triu(np.full((T, T), -np.inf), 1)
        for p in self.layers:
            h = self.rms(x, p["attn_norm"])
            q = (h @ p["q"].T).reshape(T, self.H, self.D).transpose(1, 0, 2)
            k = (h @ p["k"].T).reshape(T, self.KV, self.D).transpose(1, 0, 2)
            v = (h @ p["v"].T).reshape(T, self.KV, self.D).transpose(1, 0, 2)
            q, k = self.rope(q, pos), self.rope(k, pos)
            rep = self.H // self.KV
            k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
            s = q @ k.transpose(0, 2, 1) / np.sqrt(self.D) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = (s @ v).transpose(1, 0, 2).reshape(T, self.H * self.D)
            x = x + a @ p["o"].T
            h = self.rms(x, p["ffn_norm"])
            gt = h @ p["gate"].T
            x = x + ((gt / (1 + np.exp(-gt))) * (h @ p["up"].T)) @ p["down"].T
        return self.rms(x, self.norm) @ self.out.T


# ---------------------------------------------------------------------------------------
# Reference byte-level BPE (GPT-2 algorithm, llama.cpp pre-tokenizer regexes)
# ---------------------------------------------------------------------------------------
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class RefBPE:
    GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, g):
        import regex
        self.re = regex
        self.tokens = g.kv["tokenizer.ggml.tokens"]
        self.ids = {t: i for i, t in reversed(list(enumerate(self.tokens)))}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(g.kv["tokenizer.ggml.merges"])}
        types = g.kv["tokenizer.ggml.token_type"]
        self.special = sorted((t for t, ty in zip(self.tokens, types) if ty == 3), key=len, reverse=True)
        self.pre = g.kv.get("tokenizer.ggml.pre", "gpt2")
        self.b2u = bytes_to_unicode()

    def _bpe(self, word):
        word = list(word)
        while len(word) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 60), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            r, _ = min(pairs)
            if r == 1 << 60:
                break
            best = None
            for i in range(len(word) - 1):
                if self.ranks.get((word[i], word[i + 1])) == r:
                    best = (word[i], word[i + 1])
                    break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return word

    def _pieces(self, text):
        chunks = [text]
        if self.pre == "smollm":  # llama.cpp: "\p{N}" first, then the GPT-2 regex
            chunks = [c for c in self.re.split(r"(\p{N})", text) if c]
        for c in chunks:
            yield from self.re.findall(self.GPT2, c)

    def encode(self, text):
        ids = []
        pat = "(" + "|".join(self.re.escape(s) for s in self.special) + ")"
        for part in self.re.split(pat, text):
            if not part:
                continue
            if part in self.special:
                ids.append(self.ids[part])
                continue
            for piece in self._pieces(part):
                sym = "".join(self.b2u[b] for b in piece.encode("utf-8"))
                ids.extend(self.ids[s] for s in self._bpe(sym) if s in self.ids)
        return ids


TEXTS = [
    "The capital of France is",
    "Hello, world! How are you doing today?",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "Numbers: 12345, 3.14159, 1,000,000 and 2024-11-22; 7x8=56.",
    "a  5 and b   42 (two and three spaces before digits)",
    "Café naïve résumé façade Ångström — “quotes” …",
    "你好，世界！日本語のテキスト 한국어 Россия مرحبا",
    "Emoji: 😀👍🏽🇺🇸 and ❤️",
    "def foo(x):\n    return x ** 2  # comment\n\n\tindented\ttabs\r\nwindows",
    "   leading spaces and trailing   ",
    "\n\n\nnewlines\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "not <|a special|> token <|im_start",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ and ½ ² Ⅻ",
    "x" * 50 + " " + "ab" * 30,
]


def check_tokenizer(g, onnx_dir):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(f"{onnx_dir}/tokenizer.json")
    ref = RefBPE(g)
    ok = True
    for t in TEXTS:
        a = tok.encode(t, add_special_tokens=True).ids
        b = ref.encode(t)
        dec = tok.decode(a, skip_special_tokens=False)
        same = a == b
        rt = dec == t
        ok &= same and rt
        print(f"  {'OK ' if same and rt else 'BAD'} ids_match={same} roundtrip={rt} n={len(a)} {t[:40]!r}")
        if not same:
            print("     tokenizer.json:", a)
            print("     reference    :", b)
        if not rt:
            print("     decoded:", repr(dec))
    return tok, ok


# ---------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------
def ort_session(onnx_dir):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(f"{onnx_dir}/model.onnx", so, providers=["CPUExecutionProvider"])


def empty_past(sess, batch=1):
    feeds = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            kv_heads = i.shape[1]
            head = json.load(open(sess._model_path.rsplit("/", 1)[0] + "/genai_config.json"))["model"]["decoder"]["head_size"]
            feeds[i.name] = np.zeros((batch, kv_heads, 0, head), np.float32)
    return feeds


def run(sess, ids, past):
    total = len(ids) + (next(iter(past.values())).shape[2] if past else 0)
    feeds = dict(past)
    feeds["input_ids"] = np.array([ids], np.int64)
    feeds["attention_mask"] = np.ones((1, total), np.int64)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, feeds)))
    new_past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
    return outs["logits"][0], new_past


def greedy(sess, tok, ids, n, eos):
    past = empty_past(sess)
    out = []
    cur = list(ids)
    for _ in range(n):
        logits, past = run(sess, cur, past)
        nxt = int(logits[-1].argmax())
        if nxt in eos:
            break
        out.append(nxt)
        cur = [nxt]
    return out


def long_ids(tok, n=600):
    """A long real-text sequence, to exercise rotary positions far beyond a short prompt."""
    ids = []
    while len(ids) < n:
        ids += tok.encode(" ".join(TEXTS[:3] + TEXTS[5:9])).ids
    return ids[:n]


def write_inputs(path, tok):
    seqs = [tok.encode(t).ids for t in (TEXTS[0], TEXTS[2], TEXTS[11])] + [long_ids(tok)]
    json.dump({"ids": seqs, "texts": TEXTS}, open(path, "w"), ensure_ascii=False, indent=1)
    print(f"wrote {len(seqs)} id sequences and {len(TEXTS)} texts to {path}")


def compare_hf(sess, tok, hf_dir):
    """Compares with what reference_logits.py wrote (transformers' GGUF loader)."""
    inputs = json.load(open(f"{hf_dir}/inputs.json"))
    worst = 0.0
    for i, ids in enumerate(inputs["ids"]):
        ref = np.load(f"{hf_dir}/logits_{i}.npy")
        lo, _ = run(sess, ids, empty_past(sess))
        d = float(np.abs(lo - ref).max())
        worst = max(worst, d)
        agree = float((lo.argmax(-1) == ref.argmax(-1)).mean())
        print(f"  seq {i} ({len(ids)} tokens): max |ORT - transformers| = {d:.3e}, argmax agreement {agree:.3f}")
    enc = json.load(open(f"{hf_dir}/encodings.json"))
    same = 0
    for text, hf_ids in zip(enc["texts"], enc["ids_no_special"]):
        ours = tok.encode(text, add_special_tokens=False).ids
        same += ours == hf_ids
        if ours != hf_ids:
            print(f"  tokenization differs for {text[:40]!r}:\n    ours {ours}\n    hf   {hf_ids}")
    print(f"  tokenization: {same}/{len(enc['texts'])} texts identical to transformers' GGUF tokenizer")
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("onnx_dir")
    ap.add_argument("--gen-tokens", type=int, default=40)
    ap.add_argument("--write-inputs", metavar="JSON", help="write the id sequences and texts for reference_logits.py")
    ap.add_argument("--compare-hf", metavar="DIR", help="compare with reference_logits.py's output folder")
    args = ap.parse_args()

    t0 = time.time()
    g = GGUF(args.gguf)
    print(f"GGUF v{g.version}: {len(g.tensors)} tensors, pre-tokenizer {g.kv.get('tokenizer.ggml.pre')!r}, "
          f"add_bos_token {g.kv.get('tokenizer.ggml.add_bos_token')}")

    print("tokenizer.json vs reference BPE (and decode round trip):")
    tok, tok_ok = check_tokenizer(g, args.onnx_dir)
    if args.write_inputs:
        write_inputs(args.write_inputs, tok)
        return 0

    sess = ort_session(args.onnx_dir)
    if args.compare_hf:
        worst = compare_hf(sess, tok, args.compare_hf)
        print(f"RESULT max_abs_logit_diff_vs_transformers={worst:.3e}")
        return 0

    ref = Reference(g)
    print(f"reference weights ready in {time.time() - t0:.1f} s")

    worst = 0.0
    seqs = [tok.encode(t).ids for t in ("The capital of France is", TEXTS[2], TEXTS[11])] + [long_ids(tok)]
    for ids in seqs:
        lo, _ = run(sess, ids, empty_past(sess))
        lr = ref.logits(np.array(ids))
        d = float(np.abs(lo - lr).max())
        worst = max(worst, d)
        agree = float((lo.argmax(-1) == lr.argmax(-1)).mean())
        print(f"  {len(ids)} tokens {tok.decode(ids[:8])!r}...: max |ORT - numpy| = {d:.3e} "
              f"(logits {lr.min():.1f}..{lr.max():.1f}), argmax agreement {agree:.3f}")

    # The same logits through the cache: prefill all but the last token, then decode it.
    ids = tok.encode(TEXTS[2]).ids
    full, _ = run(sess, ids, empty_past(sess))
    _, past = run(sess, ids[:-1], empty_past(sess))
    last, _ = run(sess, ids[-1:], past)
    dcache = float(np.abs(full[-1] - last[-1]).max())
    print(f"  prefill+decode vs one pass, last position: max diff {dcache:.3e}")

    eos = {json.load(open(f"{args.onnx_dir}/genai_config.json"))["model"]["eos_token_id"]}
    prompt = "The capital of France is"
    out = greedy(sess, tok, tok.encode(prompt).ids, 12, eos)
    print(f"greedy: {prompt!r} -> {tok.decode(out)!r}")
    for q in ["What is the capital of France?", "Write a haiku about the sea.",
              "Explain in two sentences why the sky is blue."]:
        chat = f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
        out = greedy(sess, tok, tok.encode(chat).ids, args.gen_tokens, eos | {0})
        print(f"chat: {q!r} -> {tok.decode(out)!r} ({len(out)} tokens)")
    print(f"RESULT tokenizer_ok={tok_ok} max_abs_logit_diff={worst:.3e} cache_diff={dcache:.3e}")
    return 0 if tok_ok and worst < 1e-2 and dcache < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
