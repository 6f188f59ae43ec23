"""The standalone decode kernels (codes -> f16 [N, K], kernels/qins_matmul/qins_decode.cu: the chunked one,
and for q8/q4 the runs kernel the library launches there) against the plain elementwise
decode in the same file, on Phi-3.5-mini weight shapes, with CUDA events (CuPy).

Each timing: a CUDA graph of 20 launches replayed 10 times (median), rotating over enough weight copies (>= 256 MB) that
every launch reads its codes from HBM; bandwidth counts codes + scales read and f16 written.
argv: FATBIN_DIR OUT_JSON [--quick]  (quick: one shape, for compute-sanitizer)
"""
import json, os, sys
import cupy as cp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import graph_time, load_module, random_weight, row_bytes  # noqa: E402

FAT, OUT = sys.argv[1], sys.argv[2]
mod = load_module(os.path.join(FAT, "qins_decode.fatbin"))





rng = np.random.default_rng(0)


def bench(kernel, args_of, grid, block, copies):
    for i in range(3):
        kernel(grid, block, args_of(i % copies))
    return graph_time(lambda i: kernel(grid, block, args_of(i % copies)), reps=10)


rows = []
QUICK = "--quick" in sys.argv
for k, n in [(200, 37)] if QUICK else [(3072, 3072), (3072, 8192), (8192, 3072)]:
    # Quick: a group that chunks straddle (the chunked kernel's slow path) and one the runs
    # kernel takes.
    for bits, ch, g in [(b, c, g) for b, c in [(8, 16), (6, 16), (4, 32)] for g in ((30, 32) if QUICK else (128,))]:
        c_np, s_np = random_weight(rng, bits, k, n, g)
        moved = c_np.nbytes + s_np.nbytes + 2 * n * k
        copies = 2 if QUICK else max(2, int(np.ceil(256e6 / moved)))
        cs = [cp.asarray(c_np) for _ in range(copies)]
        ss = [cp.asarray(s_np) for _ in range(copies)]
        out = cp.empty((n, k), dtype=cp.float16)
        out_naive = cp.empty((n, k), dtype=cp.float16)
        rb, groups = row_bytes(bits, k), -(-k // g)
        ints = (np.int32(k), np.int32(n), np.int32(g), np.int32(rb), np.int32(groups))
        vec = mod.get_function(f"qins_decode_q{bits}_f16")
        naive = mod.get_function(f"qins_decode_naive_q{bits}")
        t_vec = bench(vec, lambda i: (cs[i], ss[i], out) + ints, (-(-n // 8),), (32, 8), copies)
        t_naive = bench(naive, lambda i: (cs[i], ss[i], out_naive) + ints, (-(-k // 256), n), (256,), copies)
        diff = float(cp.abs(out.astype(cp.float32) - out_naive.astype(cp.float32)).max())
        timed = [("decode (chunked, LUT)", t_vec), ("naive elementwise", t_naive)]
        if bits != 6 and k % 8 == 0 and g % 8 == 0:
            runs = mod.get_function(f"qins_decode_runs_q{bits}_f16")
            out_runs = cp.empty((n, k), dtype=cp.float16)
            t_runs = bench(runs, lambda i: (cs[i], ss[i], out_runs) + ints, (-(-(k // 8) // 512), n), (128,), copies)
            # The same table and scale products in the same order: bit-identical, or it is wrong.
            same = bool((out_runs.view(cp.uint16) == out.view(cp.uint16)).all())
            print(f"   runs kernel identical to the chunked one: {same}", flush=True)
            timed.insert(1, ("decode (runs, LUT)", t_runs))
        for name, t in timed:
            rows.append(dict(K=k, N=n, bits=bits, kernel=name, us=t * 1e6, gbps=moved / t / 1e9))
            print(f"{k}x{n} q{bits} {name:<22} {t * 1e6:8.2f} us {moved / t / 1e9:7.0f} GB/s", flush=True)
        print(f"   max |vec - naive| = {diff:.3g} (the naive one evaluates D(z) in f32 instead of the table)", flush=True)
        del cs, ss
json.dump(dict(rows=rows), open(OUT, "w"), indent=1)
