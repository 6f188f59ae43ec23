"""onnxruntime-genai runs a `qins rewrite` output folder as it is, and generates what the
engine generates.

    python genai_check.py MODEL_DIR QINS_BIN [--tokens N] [--min-equal K] [--json OUT]

MODEL_DIR is a rewrite's output (with the custom-op library and genai_config.json naming it,
as `qins rewrite` writes it); QINS_BIN the `qins` program. Runs in a Python that has
onnxruntime-genai (which brings its own onnxruntime); nothing is registered by hand: genai
reads the library from genai_config.json. For each prompt of a fixed set, greedy search with
genai and with `qins generate --json` (the project's engine, on the ONNX Runtime it finds)
for N new tokens, and compares the token ids. Two ONNX Runtime builds may round a near-tie of
two logits differently, after which greedy paths part, so the check is: every prompt's first
token equal, and at least K of the prompts equal over all N tokens (K defaults to all but one).
Prints a line per prompt and fails with exit status 1 otherwise.
"""
import argparse
import json
import subprocess
import sys

import onnxruntime_genai as og

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "def fibonacci(n):",
    "The largest planet in the solar system is",
    "To make a cup of tea, first",
    "Photosynthesis is the process by which",
]

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("qins")
ap.add_argument("--tokens", type=int, default=32)
ap.add_argument("--min-equal", type=int, default=len(PROMPTS) - 1)
ap.add_argument("--json")
a = ap.parse_args()

model = og.Model(a.model)
tok = og.Tokenizer(model)
rows = []
for p in PROMPTS:
    ids = [int(i) for i in tok.encode(p)]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + a.tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    r = subprocess.run(
        [a.qins, "generate", a.model, "--prompt", p, "--max-tokens", str(a.tokens), "--json", "-"],
        capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"qins generate failed on {p!r}:\n{r.stderr}")
    eng = json.loads(r.stdout)
    if eng["prompt_tokens"] != ids:
        sys.exit(f"the tokenizers disagree on {p!r}: genai {ids}, qins {eng['prompt_tokens']}")
    ref = eng["tokens"]
    same = next((i for i, (x, y) in enumerate(zip(got, ref)) if x != y), min(len(got), len(ref)))
    equal = got == ref
    rows.append({"prompt": p, "genai": got, "engine": ref, "equal": equal, "first_difference": None if equal else same})
    print(f"{'equal' if equal else f'differ at {same}':>12}  {len(got):>3} genai / {len(ref):>3} engine tokens  {p!r}")

n_equal = sum(r["equal"] for r in rows)
first_ok = all(r["genai"][:1] == r["engine"][:1] and r["genai"] for r in rows)
ok = first_ok and n_equal >= a.min_equal
print(f"onnxruntime-genai {og.__version__}: {n_equal} of {len(rows)} prompts equal over {a.tokens} tokens "
      f"(need {a.min_equal}), first tokens {'all equal' if first_ok else 'DIFFER'}: {'pass' if ok else 'FAIL'}")
if a.json:
    with open(a.json, "w") as f:
        json.dump({"genai": og.__version__, "tokens": a.tokens, "equal": n_equal, "pass": ok, "prompts": rows}, f, indent=1)
sys.exit(0 if ok else 1)
