"""onnxruntime-genai's own decode speed on model folders, on the GPU machine (e2e.sh genai-cuda).

    python genai_speed.py MODEL_DIR... [--prompt 128] [--new 128] [--reps 3] [--json OUT]

Each folder runs as genai loads it (its genai_config.json: the builder's CUDA provider
options; a `qins rewrite` output also names the custom-op library placed beside the model, so
nothing is registered here). Batch 1, a prompt of random token ids, greedy search; the time of
each token after the first (the prompt's pass excluded), median over the repetitions after one
warm-up. Not run yet: written for the next GPU session (see docs/BENCHMARKS.md).
"""
import argparse
import json
import time

import numpy as np
import onnxruntime_genai as og

ap = argparse.ArgumentParser()
ap.add_argument("models", nargs="+")
ap.add_argument("--prompt", type=int, default=128)
ap.add_argument("--new", type=int, default=128)
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--json")
a = ap.parse_args()

rows = []
for path in a.models:
    model = og.Model(path)
    ids = np.random.default_rng(0).integers(100, 30000, a.prompt).astype(np.int32)
    times = []
    for rep in range(a.reps + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=a.prompt + a.new, min_length=a.prompt + a.new, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        gen.generate_next_token()  # the first token: from the prompt's pass
        t0 = time.perf_counter()
        n = 0
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        dt = time.perf_counter() - t0
        if rep > 0:
            times.append(1e3 * dt / max(n, 1))
        del gen
    ms = float(np.median(times))
    rows.append({"model": path, "ms_per_token": ms, "tokens_per_s": 1e3 / ms, "runs_ms": times})
    print(f"{path}: {ms:.3f} ms/token ({1e3 / ms:.1f} tokens/s), runs {', '.join(f'{t:.3f}' for t in times)}", flush=True)
if a.json:
    json.dump({"genai": og.__version__, "prompt": a.prompt, "new": a.new, "rows": rows}, open(a.json, "w"), indent=1)
