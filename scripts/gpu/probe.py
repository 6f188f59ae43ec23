"""Direct timings of the QINS kernels (no ONNX Runtime): the embedded fat binaries loaded
with CuPy, CUDA events around replays of a CUDA graph of 20 launches (median of 15), rotating over weight copies
(>= 256 MB) so that every launch reads from HBM. Cross-checks bench_matmul.py's numbers,
which go through ORT's CUDA graphs. argv: FATBIN_DIR [OUT_JSON]
"""
import json, os, sys
import cupy as cp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import graph_time, load_module, random_weight, row_bytes  # noqa: E402

FAT = sys.argv[1]
mm = load_module(os.path.join(FAT, "qins_matmul.fatbin"))




rng = np.random.default_rng(1)
# Device-to-device copy bandwidth (read + write bytes), the yardstick of docs/BENCHMARKS.md.
src, dst = cp.empty(1 << 29, dtype=cp.uint8), cp.empty(1 << 29, dtype=cp.uint8)
t_copy = graph_time(lambda i: cp.copyto(dst, src), reps=10, launches=5)
copy_gbps = 2 * src.nbytes / t_copy / 1e9
print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
del src, dst
rows = []
# PROBE_ONLY=KxN[,bits] restricts the sweep (for profiling one kernel under ncu).
only = os.environ.get("PROBE_ONLY", "")
# PROBE_SHAPES=3072x16384,...: other shapes (Phi-3.5's fused gate_up is 3072x16384, qkv 3072x9216).
shapes = [(3072, 3072), (3072, 8192), (8192, 3072)]
if os.environ.get("PROBE_SHAPES"):
    shapes = [tuple(int(v) for v in s.split("x")) for s in os.environ["PROBE_SHAPES"].split(",")]
for k, n in shapes:
    for bits, g in ((8, 128), (6, 128), (4, 128), (4, 32)):
        if os.environ.get("PROBE_FMTS") and f"q{bits}g{g}" not in os.environ["PROBE_FMTS"].split(","):
            continue
        if only and (f"{k}x{n}" != only.split(",")[0] or ("," in only and str(bits) != only.split(",")[1])):
            continue
        c_np, s_np = random_weight(rng, bits, k, n, g)
        wbytes = c_np.nbytes + s_np.nbytes
        copies = max(2, int(np.ceil(256e6 / wbytes)))
        cs_ = [cp.asarray(c_np) for _ in range(copies)]
        ss = [cp.asarray(s_np) for _ in range(copies)]
        # PROBE_M=32,64,...: also time the tensor-core kernel over several 16-row tiles.
        extra_m = [(int(v), 8) for v in os.environ.get("PROBE_M", "").split(",") if v]
        ms = [(1, 1)] if only else [(1, 1), (4, 4), (8, 8), (16, 8)]
        if os.environ.get("PROBE_MS"):
            ms = [(m, mt) for m, mt in ms if str(m) in os.environ["PROBE_MS"].split(",")]
        for m, mt in ms + extra_m:
            a = cp.asarray(rng.standard_normal((m, k)).astype(np.float16))
            y = cp.empty((m, n), dtype=cp.float16)
            f = mm.get_function(f"qins_gemv_q{bits}_f16_m{mt}")
            ch = 32 if bits == 4 else 16
            nch = -(-k // ch)
            wpr = 1 if nch <= 512 else 2 if nch <= 1024 else 4
            blocks = -(-n // (4 // wpr)) * -(-m // mt)
            cpg = (g // ch).bit_length() - 1
            ints = (np.int32(m), np.int32(k), np.int32(n), np.int32(g), np.int32(row_bytes(bits, k)),
                    np.int32(-(-k // g)), np.int32(1), np.int32(cpg), np.int32(wpr))
            for i in range(20):
                f((blocks,), (128,), (a, cs_[i % copies], ss[i % copies], y) + ints)
            t = graph_time(lambda i: f((blocks,), (128,), (a, cs_[i % copies], ss[i % copies], y) + ints), reps=15)
            moved = wbytes + 2 * m * (k + n)
            rows.append(dict(K=k, N=n, M=m, bits=bits, G=g, kernel="gemv", us=t * 1e6, gbps=moved / t / 1e9))
            print(f"direct {k}x{n} q{bits} g{g} M={m:<3} {'gemv':<28} {t * 1e6:8.2f} us {moved / t / 1e9:7.0f} GB/s", flush=True)
            # The tensor-core kernel (what the library runs for f16 activations): its variants.
            mtc = 16 if m > 8 else 8
            cs_ok = g % (4 * ch) == 0
            wu = ((16, 2),) if mtc == 8 else ((8, 2),)
            variants = [(f"w{w}_u{u}", w, 1, cs) for w, u in wu for cs in ((False, True) if cs_ok else (False,))]
            # PROBE_TC_EXTRA=w16_u1_t2,w16_u2_c1,...: more tensor-core entry points (those not built
            # for a format or row tile are skipped): t<T> takes 16 T channels a block; c1 (M = 1
            # only) scales each chunk's sum; p is pipelined.
            for v in os.environ.get("PROBE_TC_EXTRA", "").split(","):
                if not v or (v.endswith("c1") and m != 1):
                    continue
                w_, t_ = int(v.split("_")[0][1:]), int(v.split("_t")[1][0]) if "_t" in v else 1
                for cs in ((False,) if v.endswith("c1") else (False, True) if cs_ok else (False,)):
                    variants.append((v, w_, t_, cs))
            # The CUDA-core kernel's output, the reference each variant is checked against.
            y_ref = cp.zeros((m, n), dtype=cp.float16)
            f((blocks,), (128,), (a, cs_[0], ss[0], y_ref) + ints)
            yr = y_ref.astype(cp.float64)
            for v, w, t_, cs in variants:
                name = f"qins_gemv_tc_q{bits}_m{mtc}_{v}" + ("_cs" if cs else "")
                try:
                    ftc = mm.get_function(name)
                except Exception:  # noqa: BLE001 (a variant built for other formats only)
                    print(f"direct {k}x{n} q{bits} g{g} M={m:<3} {name:<28} not built", flush=True)
                    continue
                # The launcher's tc_smem: the table (TcTable<BITS>::BYTES), or the cross-warp sums
                # where larger.
                smem = max((64 if bits == 6 else 256) * 256, w * 16 * t_ * (mtc + 1) * 4)
                ftc.max_dynamic_shared_size_bytes = smem
                tints = (np.int32(m), np.int32(k), np.int32(n), np.int32(row_bytes(bits, k)),
                         np.int32(-(-k // g)), np.int32(cpg), np.int32(0))  # swiglu off
                grid = (-(-n // (16 * t_)), -(-m // mtc))
                y.fill(cp.nan)
                ftc(grid, (32 * w,), (a, cs_[0], ss[0], y) + tints, shared_mem=smem)
                yt = y.astype(cp.float64)
                nmse = float(((yt - yr) ** 2).sum() / (yr ** 2).sum())
                ttc = graph_time(lambda i: ftc(grid, (32 * w,), (a, cs_[i % copies], ss[i % copies], y) + tints, shared_mem=smem), reps=15)
                rows.append(dict(K=k, N=n, M=m, bits=bits, G=g, kernel=name, us=ttc * 1e6, gbps=moved / ttc / 1e9,
                                 nmse_vs_gemv=nmse))
                print(f"direct {k}x{n} q{bits} g{g} M={m:<3} {name:<28} {ttc * 1e6:8.2f} us {moved / ttc / 1e9:7.0f} GB/s"
                      f"  nmse vs gemv {nmse:.1e}", flush=True)
        del cs_, ss
if len(sys.argv) > 2:
    json.dump(dict(copy_gbps=copy_gbps, rows=rows), open(sys.argv[2], "w"), indent=1)
