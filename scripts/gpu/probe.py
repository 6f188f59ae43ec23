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
rows = []
for k, n in [(3072, 3072), (3072, 8192), (8192, 3072)]:
    for bits in (8, 4):
        g = 128
        c_np, s_np = random_weight(rng, bits, k, n, g)
        wbytes = c_np.nbytes + s_np.nbytes
        copies = max(2, int(np.ceil(256e6 / wbytes)))
        cs = [cp.asarray(c_np) for _ in range(copies)]
        ss = [cp.asarray(s_np) for _ in range(copies)]
        for m, mt in [(1, 1), (4, 4), (16, 8)]:
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
                f((blocks,), (128,), (a, cs[i % copies], ss[i % copies], y) + ints)
            t = graph_time(lambda i: f((blocks,), (128,), (a, cs[i % copies], ss[i % copies], y) + ints), reps=15)
            moved = wbytes + 2 * m * (k + n)
            rows.append(dict(K=k, N=n, M=m, bits=bits, us=t * 1e6, gbps=moved / t / 1e9))
            print(f"direct {k}x{n} q{bits} M={m:<3} {t * 1e6:8.2f} us {moved / t / 1e9:7.0f} GB/s", flush=True)
        del cs, ss
if len(sys.argv) > 2:
    json.dump(dict(rows=rows), open(sys.argv[2], "w"), indent=1)
