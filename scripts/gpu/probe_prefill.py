"""Direct timings of the prefill kernel (kernels/qins_matmul/qins_matmul_prefill.cu, every compiled
configuration) against fp16 cuBLAS and decode + cuBLAS at the same shapes, in one run (no
ONNX Runtime): fat binaries loaded with CuPy, CUDA graphs of 20 launches replayed (median
of 15, CUDA events), rotating over weight copies (>= 256 MB) so that weights come from HBM.
Each configuration's output is checked against decode (kernels/qins_matmul/qins_decode.cu, held to the
CPU kernel by check.py) + an f32 matmul, by normalised squared error.
argv: FATBIN_DIR OUT_JSON. Env: PP_SHAPES=KxN,...  PP_FMTS=q8g128,...  PP_MS=32,...
"""
import json, os, re, sys
import cupy as cp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import graph_time, load_module, plain_time, prefill_smem as smem, random_weight, row_bytes  # noqa: E402

FAT, OUT = sys.argv[1], sys.argv[2]
pf = load_module(os.path.join(FAT, "qins_matmul_prefill.fatbin"))
dec = load_module(os.path.join(FAT, "qins_decode.fatbin"))
src = open(os.path.join(os.path.dirname(__file__), "../../kernels/qins_matmul/qins_matmul_prefill.cu")).read()
# Every instantiation: QINS_GEMM_TC(BITS, MB, T, WN, WK, STAGES, MINB).
configs = [tuple(int(v) for v in m.groups()) for m in
           re.finditer(r"QINS_GEMM_TC\(BITS, (\d+), (\d+), (\d+), (\d+), (\d+), \d+\)", src)]


def cdiv(a, b):
    return -(-a // b)


def any_time(launch):
    try:
        return graph_time(launch, reps=15)
    except Exception as e:  # noqa: BLE001
        print(f"   (no graph: {type(e).__name__}: {e})", flush=True)
        return plain_time(launch)


rng = np.random.default_rng(7)
src_b, dst_b = cp.empty(1 << 29, dtype=cp.uint8), cp.empty(1 << 29, dtype=cp.uint8)
copy_gbps = 2 * src_b.nbytes / graph_time(lambda i: cp.copyto(dst_b, src_b), reps=10, launches=5) / 1e9
del src_b, dst_b
print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
shapes = [tuple(int(v) for v in s.split("x")) for s in os.environ.get("PP_SHAPES", "3072x3072,3072x8192,8192x3072").split(",")]
fmts = os.environ.get("PP_FMTS", "q8g128,q4g32").split(",")
ms = [int(v) for v in os.environ.get("PP_MS", "32,64,128,256,512,1024,2048").split(",")]
rows = []
for k, n in shapes:
    fp_copies = max(2, int(np.ceil(256e6 / (2 * n * k))))
    w16 = [cp.asarray((rng.standard_normal((n, k)) * 0.02).astype(np.float16)) for _ in range(fp_copies)]
    for fmt in fmts:
        bits, g = int(fmt[1]), int(fmt.split("g")[1])
        ch = 32 if bits == 4 else 16
        c_np, s_np = random_weight(rng, bits, k, n, g)
        wbytes = c_np.nbytes + s_np.nbytes
        copies = max(2, int(np.ceil(256e6 / wbytes)))
        cs_ = [cp.asarray(c_np) for _ in range(copies)]
        ss = [cp.asarray(s_np) for _ in range(copies)]
        rb, groups = row_bytes(bits, k), -(-k // g)
        cpg = (g // ch).bit_length() - 1
        wdec = cp.empty((n, k), dtype=cp.float16)
        fdec = dec.get_function(f"qins_decode_q{bits}_f16")
        dints = (np.int32(k), np.int32(n), np.int32(g), np.int32(rb), np.int32(groups))
        fdec((-(-n // 8),), (32, 8), (cs_[0], ss[0], wdec) + dints)
        wref = wdec.astype(cp.float32)
        for m in ms:
            a = cp.asarray(rng.standard_normal((m, k)).astype(np.float16))
            y = cp.empty((m, n), dtype=cp.float16)
            yr = (a.astype(cp.float32) @ wref.T).astype(cp.float64)
            base = dict(K=k, N=n, M=m, bits=bits, G=g)
            t_fp = any_time(lambda i: cp.matmul(a, w16[i % fp_copies].T, out=y))
            t_dc = any_time(lambda i: (fdec((-(-n // 8),), (32, 8), (cs_[i % copies], ss[i % copies], wdec) + dints),
                                       cp.matmul(a, wdec.T, out=y)))
            rows.append(dict(base, kernel="fp16 cuBLAS", us=t_fp * 1e6))
            rows.append(dict(base, kernel="decode + cuBLAS", us=t_dc * 1e6))
            line = f"{k}x{n} {fmt:<7} M={m:<5} fp16 {t_fp * 1e6:8.1f}  decode+cuBLAS {t_dc * 1e6:8.1f}"
            best = None
            red = pf.get_function("qins_gemm_reduce")
            splits_env = [int(v) for v in os.environ.get("PP_SPLITS", "1,2,4,8").split(",")]
            for cfg, ks in [(c, z) for c in configs for z in splits_env]:
                mb, t, wn, wk, stg = cfg
                nst = cdiv(cdiv(cdiv(k, ch), 4), wk)  # stages of K
                if ks > 1 and (ks > nst or mb > 64):
                    continue
                name = f"qins_gemm_tc_q{bits}_m{mb}_t{t}_n{wn}_k{wk}_s{stg}"
                f = pf.get_function(name)
                sm = smem(bits, *cfg)
                if sm > 227 * 1024:  # an H100 block's most; the launcher never picks these
                    continue
                f.max_dynamic_shared_size_bytes = sm
                grid = (-(-n // (16 * t * wn)), -(-m // mb), ks)
                ints = (np.int32(m), np.int32(k), np.int32(n), np.int32(rb), np.int32(groups), np.int32(cpg))
                part = cp.empty((ks, m, n), dtype=cp.float32) if ks > 1 else np.uint64(0)  # null: write Y
                rgrid = (min(-(-m * n // 256), 4 * 132),)

                def run(i):
                    f(grid, (32 * wn * wk,), (a, cs_[i % copies], ss[i % copies], y, part) + ints, shared_mem=sm)
                    if ks > 1:
                        red(rgrid, (256,), (part, y, np.int64(m * n), np.int32(ks)))
                y.fill(cp.nan)
                run(0)
                nmse = float(((y.astype(cp.float64) - yr) ** 2).sum() / (yr ** 2).sum())
                tt = graph_time(run, reps=15)
                name = f"{name}_x{ks}"
                rows.append(dict(base, kernel=name, us=tt * 1e6, nmse=nmse, smem=sm, splits=ks))
                if best is None or tt < best[1]:
                    best = (name, tt, nmse)
                print(f"   {name:<40} {tt * 1e6:8.1f} us  nmse {nmse:.1e}  ({t_fp / tt:.2f}x fp16)", flush=True)
            print(line + f"  best {best[0]} {best[1] * 1e6:.1f} ({t_fp / best[1]:.2f}x fp16, nmse {best[2]:.1e})", flush=True)
        del cs_, ss
    del w16
json.dump(dict(copy_gbps=copy_gbps, configs=configs, rows=rows), open(OUT, "w"), indent=1)
