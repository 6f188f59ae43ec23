#!/usr/bin/env python3
"""The 4-bit table of docs/QUALITY.md from two runs of scripts/q4_ground.sh (one on the
de-gridded model, one on the original): each model's bits per weight, and its dPPL, KL and
argmax agreement against its own base model, side by side.

    python3 scripts/q4_table.py docs/quality/q4-degridded docs/quality/q4-original

Each prefix P names P.json (qins parity) and P-bits.json (scripts/bits_per_weight.py).
dPPL = exp(mean dNLL) - 1 over the scored positions; KL = mean KL(base || model).
"""
import json
import math
import os
import sys

ROWS = [  # (model folder name, quantizer, coverage)
    ("qins-q4-g32-ogud", "QINS q4 g32", "o, gate, up, down"),
    ("cal-qins-q4-g32-ogud", "QINS q4 g32, calibrated", "o, gate, up, down"),
    ("mnb4-sym", "ORT default RTN, symmetric", "o, gate, up, down"),
    ("mnb4-rtn", "ORT RTN (neural_compressor port)", "o, gate, up, down"),
    ("mnb4-asym", "ORT default RTN, asymmetric", "o, gate, up, down"),
    ("mnb4-kquant", "ORT k-quant", "o, gate, up, down"),
    ("mnb4-gptq", "ORT GPTQ, asymmetric, calibrated", "o, gate, up, down"),
    ("qins-q4-g16-ogud", "QINS q4 g16", "o, gate, up, down"),
    ("cal-qins-q4-g16-ogud", "QINS q4 g16, calibrated", "o, gate, up, down"),
    ("mnb4-hqq", "ORT HQQ", "o, gate, up, down"),
    ("qins-q4-g32", "QINS q4 g32", "+ V of qkv (default)"),
    ("cal-qins-q4-g32", "QINS q4 g32, calibrated", "+ V of qkv (default)"),
    ("qins-q6-g32", "QINS q6 g32", "+ V of qkv (default)"),
    ("cal-qins-q6-g32", "QINS q6 g32, calibrated", "+ V of qkv (default)"),
    ("qins-q8-g128", "QINS q8 g128", "+ V of qkv (default)"),
    ("cal-qins-q8-g128", "QINS q8 g128, calibrated", "+ V of qkv (default)"),
]


def load(prefix):
    parity = {os.path.basename(r["model"].rstrip("/")): r for r in json.load(open(prefix + ".json"))["results"]}
    bits = {os.path.basename(b["model"].rstrip("/")): b for b in json.load(open(prefix + "-bits.json"))}
    return parity, bits


def cells(r):
    if r is None:
        return ["-", "-", "-"]
    p = r["parity"]
    dppl = math.exp((p["nll_test"] - p["nll_ref"]) / r["scored"]) - 1
    return [f"{100 * dppl:+.1f}%", f"{p['kl'] / p['positions']:.3f}", f"{100 * p['argmax_agree'] / p['positions']:.1f}%"]


runs = [load(prefix) for prefix in sys.argv[1:3]]
print("| quantizer | coverage | bits/weight as stored (fp32 model) | in an fp16 model "
      "| de-gridded: dPPL | KL | argmax | original: dPPL | KL | argmax |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name, label, coverage in ROWS:
    found = [(parity.get(name), bits.get(name)) for parity, bits in runs]
    if all(p is None for p, _ in found):
        continue
    b = next((b for _, b in found if b), None)
    bits_cells = [f"{b['bits_per_weight']:.3f}", f"{b['bits_per_weight_fp16_model']:.3f}"] if b else ["-", "-"]
    print(f"| {label} | {coverage} | " + " | ".join(bits_cells + sum((cells(p) for p, _ in found), [])) + " |")
