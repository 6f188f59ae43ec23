"""Calibration text for `qins rewrite --calibrate`, disjoint from the evaluation text.

    python scripts/calib_text.py SUMMARIES.json OUT.txt [--chars N]

The evaluation (qins parity, the suite) reads the Wikipedia summaries file from its start,
articles in sorted key order (graph-rewrite/src/parity.rs, read_text). This writes articles
from its END in the same order, until N characters (default 400,000: about 90k SmolLM2
tokens), as plain text with a blank line between articles, and says which articles it took.
"""
import argparse
import json
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument("text")
ap.add_argument("out")
ap.add_argument("--chars", type=int, default=400_000)
a = ap.parse_args()
if os.path.exists(a.out):
    sys.exit(f"{a.out} exists; choose another name or remove it")
extracts = []


def walk(v):
    # The order read_text uses: an object's "extract", else its keys sorted.
    if isinstance(v, dict):
        if isinstance(v.get("extract"), str):
            extracts.append(v["extract"])
        else:
            for k in sorted(v):
                walk(v[k])
    elif isinstance(v, list):
        for x in v:
            walk(x)


with open(a.text) as f:
    walk(json.load(f))
taken, n = [], 0
for e in reversed(extracts):
    if n >= a.chars:
        break
    taken.append(e)
    n += len(e) + 2
taken.reverse()
with open(a.out, "w") as f:
    f.write("\n\n".join(taken))
print(f"{a.out}: the last {len(taken)} of {len(extracts)} articles ({n} characters); "
      f"the evaluation reads from the first")
