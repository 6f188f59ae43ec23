"""Markdown tables of docs/BENCHMARKS.md from the JSON of scripts/gpu/bench_matmul.py (and,
optionally, its decode + cuBLAS run), or from that of scripts/gpu/probe.py (direct kernel
times). argv: BENCH_JSON [CUBLAS_JSON] | PROBE_JSON"""
import json
import sys

d = json.load(open(sys.argv[1]))
if d["rows"] and "kernel" in d["rows"][0]:
    # probe.py: the CUDA-core kernel against the best tensor-core variant, M <= 16.
    by = {}
    for r in d["rows"]:
        by.setdefault((r["K"], r["N"], r["bits"], r["G"], r["M"]), []).append(r)
    print(f"device-to-device copy in the same run: {d['copy_gbps']:.0f} GB/s\n")
    print("| K x N | format | M | CUDA-core kernel (us) | tensor-core kernel (us, GB/s) | speed-up |")
    print("|---|---|---|---|---|---|")
    for (k, n, bits, g, m), rs in by.items():
        core = [r for r in rs if r["kernel"] == "gemv"]
        tc = [r for r in rs if r["kernel"].startswith("qins_gemv_tc_")]
        if m > 16 or not core or not tc:
            continue
        best = min(tc, key=lambda r: r["us"])
        print(f"| {k}x{n} | q{bits} g{g} | {m} | {core[0]['us']:.1f} | {best['us']:.1f}, {best['gbps']:.0f} | "
              f"{core[0]['us'] / best['us']:.2f}x |")
    sys.exit(0)
cub = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else None
copy = d["copy_gbps"]
rows = {(r["K"], r["N"], r["M"], r["variant"]): r for r in d["rows"]}
crow = {(r["K"], r["N"], r["M"], r["variant"]): r for r in cub["rows"]} if cub else {}
cols = ["fp16 MatMul", "MatMulNBits int8 b32", "MatMulNBits int8 b128", "MatMulNBits int4 b32",
        "MatMulNBits int4 b128", "QINS q8 g128", "QINS q6 g128", "QINS q4 g128", "QINS q4 g32"]
short = ["fp16", "MNB8 b32", "MNB8 b128", "MNB4 b32", "MNB4 b128", "q8 g128", "q6 g128", "q4 g128", "q4 g32"]
shapes = sorted({(k, n) for k, n, _, _ in rows}, key=lambda s: (s[0], s[1]))
ms = sorted({m for _, _, m, _ in rows})
extra = ["q8 via decode+cuBLAS", "q4 g32 via decode+cuBLAS"] if cub else []
print(f"device-to-device copy in the same run: {copy:.0f} GB/s\n")
print("| K x N | M | " + " | ".join(short + extra) + " |")
print("|---|---|" + "---|" * (len(short) + len(extra)))
for k, n in shapes:
    for m in ms:
        vals = [f"{rows[(k, n, m, c)]['us']:.1f}" for c in cols]
        if cub:
            vals += [f"{crow[(k, n, m, c)]['us']:.1f}" for c in ("QINS q8 g128", "QINS q4 g32")]
        print(f"| {k}x{n} | {m} | " + " | ".join(vals) + " |")
print()
print("| K x N | M | q8 GB/s | q8 % copy | q4 g32 GB/s | q4 g32 % copy | q8 / MNB8 b128 time | "
      "q4 g32 / MNB4 b32 time | q8 / fp16 time | q4 g32 / fp16 time |")
print("|---|---|---|---|---|---|---|---|---|---|")
for k, n in shapes:
    for m in ms:
        q8, q4 = rows[(k, n, m, "QINS q8 g128")], rows[(k, n, m, "QINS q4 g32")]
        f16 = rows[(k, n, m, "fp16 MatMul")]["us"]
        m8, m4 = rows[(k, n, m, "MatMulNBits int8 b128")]["us"], rows[(k, n, m, "MatMulNBits int4 b32")]["us"]
        print(f"| {k}x{n} | {m} | {q8['gbps']:.0f} | {q8['gbps'] / copy:.0%} | {q4['gbps']:.0f} | "
              f"{q4['gbps'] / copy:.0%} | {q8['us'] / m8:.2f} | {q4['us'] / m4:.2f} | {q8['us'] / f16:.2f} | "
              f"{q4['us'] / f16:.2f} |")
