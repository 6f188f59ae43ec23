"""Probe: can the weight decode of decode + cuBLAS (M >= 384) hide under the GEMM? The serial
path decodes all N rows, then one GEMM. The split path decodes piece 0 on the main stream,
then the other pieces on a second stream while the main stream multiplies the pieces already
decoded (fork/join with events), so that only piece 0's decode is exposed.
CuPy on the library's decode kernel (qins_decode_runs_*) and cuBLAS (cupy.matmul), f16.
Timing: a spin kernel holds the GPU while ITERS iterations are queued, so launches from
Python leave no gaps; then events around the ITERS iterations.
argv: FATBIN_DIR OUT_JSON
"""
import json, os, sys
import cupy as cp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import load_module, random_weight, row_bytes  # noqa: E402

FAT, OUT = sys.argv[1], sys.argv[2]
mod = load_module(os.path.join(FAT, "qins_decode.fatbin"))
spin = cp.RawKernel(r'''
extern "C" __global__ void spin(long long cycles) {
    long long t0 = clock64();
    while (clock64() - t0 < cycles) {}
}''', "spin")
rng = np.random.default_rng(0)
ITERS = 20
main, side = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)


def timed(body):
    with main:
        body()  # warm-up (cuBLAS picks its kernels)
        main.synchronize()
        spin((1,), (1,), (np.int64(2_000_000_000 // 100),))  # ~10 ms at ~2 GHz
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(main)
        for _ in range(ITERS):
            body()
        b.record(main)
        b.synchronize()
        return cp.cuda.get_elapsed_time(a, b) * 1e-3 / ITERS


rows = []
for k, n in [(3072, 3072), (3072, 8192), (8192, 3072), (3072, 16384)]:
    for bits, g in [(4, 32), (8, 128)]:
        c_np, s_np = random_weight(rng, bits, k, n, g)
        codes, scales = cp.asarray(c_np), cp.asarray(s_np)
        rb, groups = row_bytes(bits, k), -(-k // g)
        w = cp.empty((n, k), dtype=cp.float16)
        dec = mod.get_function(f"qins_decode_runs_q{bits}_f16")

        def decode(n0, n1):
            ns = n1 - n0
            dec((-(-(k // 8) // 512), ns), (128,), (codes[n0:], scales[n0:], w[n0:], np.int32(k), np.int32(ns),
                                                   np.int32(g), np.int32(rb), np.int32(groups)))

        for m in (512, 2048):
            x = cp.asarray(rng.standard_normal((m, k)).astype(np.float16))
            y = cp.empty((m, n), dtype=cp.float16)
            t_fp16 = timed(lambda: cp.matmul(x, w.T, out=y))
            t_dec = timed(lambda: decode(0, n))
            t_serial = timed(lambda: (decode(0, n), cp.matmul(x, w.T, out=y)))
            res = dict(K=k, N=n, M=m, bits=bits, G=g, fp16_us=t_fp16 * 1e6, decode_us=t_dec * 1e6,
                       serial_us=t_serial * 1e6)
            for s in (2, 4):
                bounds = [n * i // s // 16 * 16 for i in range(s)] + [n]
                ys = [cp.empty((m, bounds[i + 1] - bounds[i]), dtype=cp.float16) for i in range(s)]
                evs = [cp.cuda.Event(disable_timing=True) for _ in range(s)]

                def split():
                    decode(bounds[0], bounds[1])
                    evs[0].record(main)
                    side.wait_event(evs[0])
                    with side:
                        for i in range(1, s):
                            decode(bounds[i], bounds[i + 1])
                            evs[i].record(side)
                    for i in range(s):
                        if i:
                            main.wait_event(evs[i])
                        cp.matmul(x, w[bounds[i]:bounds[i + 1]].T, out=ys[i])

                res[f"split{s}_us"] = timed(split) * 1e6
            rows.append(res)
            print(f"{k}x{n} M={m:<5} q{bits} g{g}: fp16 {res['fp16_us']:7.1f}  decode {res['decode_us']:6.1f}  "
                  f"serial {res['serial_us']:7.1f} ({res['serial_us'] / res['fp16_us']:.2f}x)  "
                  f"split2 {res['split2_us']:7.1f} ({res['split2_us'] / res['fp16_us']:.2f}x)  "
                  f"split4 {res['split4_us']:7.1f} ({res['split4_us'] / res['fp16_us']:.2f}x)", flush=True)
json.dump(dict(device=os.popen("nvidia-smi --query-gpu=name --format=csv,noheader").read().strip(), rows=rows),
          open(OUT, "w"), indent=1)
