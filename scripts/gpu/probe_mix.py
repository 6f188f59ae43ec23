"""Direct timings of the mixed tensor-core kernel (a QinsMatMul with float_weight: Phi-3.5's
qkv, 6144 f16 Q/K channels and 3072 QINS V channels, K = 3072) and its variants, against
cuBLAS on the packed f16 weight and on the Q/K part alone plus the token kernel on V. No ORT:
the fat binary loaded with CuPy, CUDA graphs of 20 launches rotating over weight copies
(>= 256 MB), as scripts/gpu/probe.py. Each variant's output is checked against cuBLAS (float
part) and the token kernel (QINS part). PROBE_MIX_CHECK_ONLY=1: one launch of each, no timing
(for compute-sanitizer). argv: FATBIN_DIR OUT_JSON
"""
import json, os, sys
import cupy as cp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import graph_time, load_module, random_weight, row_bytes  # noqa: E402

import torch  # noqa: E402


def torch_graph_time(launch, reps=15, launches=20):
    """common.graph_time for torch work (cuBLAS), captured with torch.cuda.CUDAGraph."""
    import statistics
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for i in range(launches):
            launch(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(launches):
            launch(i)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e-3 / launches)
    return statistics.median(ts)


CHECK_ONLY = os.environ.get("PROBE_MIX_CHECK_ONLY") == "1"
if CHECK_ONLY:
    def graph_time(launch, reps, launches=20):  # noqa: F811 (one launch, untimed)
        launch(0)
        return float("nan")


mm = load_module(os.path.join(sys.argv[1], "qins_matmul.fatbin"))
K, NF, NV = 3072, 6144, 3072
rng = np.random.default_rng(3)
rows = []
for bits, g in ((4, 32), (8, 128), (6, 128)):
    c_np, s_np = random_weight(rng, bits, K, NV, g)
    wqk_np = (rng.standard_normal((NF, K), dtype=np.float32) * 0.02).astype(np.float16)
    wbytes = c_np.nbytes + s_np.nbytes + wqk_np.nbytes
    copies = max(2, int(np.ceil(256e6 / wbytes)))
    cs_ = [cp.asarray(c_np) for _ in range(copies)]
    ss = [cp.asarray(s_np) for _ in range(copies)]
    wt = [cp.asarray(wqk_np) for _ in range(copies)]  # [NF, K]
    tpk = [torch.randn(K, NF + NV, device="cuda", dtype=torch.float16) * 0.02
           for _ in range(max(2, int(np.ceil(256e6 / (K * (NF + NV) * 2)))))]
    twt = [torch.from_dlpack(w) for w in wt]
    ch = 32 if bits == 4 else 16
    cpg = (g // ch).bit_length() - 1
    table = 256 * 256
    for m in (1, 8, 16):
        mt = 16 if m > 8 else 8
        a = cp.asarray(rng.standard_normal((m, K)).astype(np.float16))
        moved = wbytes + 2 * m * (K + NF + NV)
        # cuBLAS on the packed f16 weight (what the fp16 model runs) and on Q/K alone, through
        # torch (CuPy cannot capture cuBLAS in a graph).
        at = torch.from_dlpack(a)
        # Under compute-sanitizer no cuBLAS (racecheck cannot follow its kernels).
        t_pk = float("nan") if CHECK_ONLY else torch_graph_time(lambda i: torch.matmul(at, tpk[i % len(tpk)]))
        t_qk = float("nan") if CHECK_ONLY else torch_graph_time(lambda i: torch.matmul(at, twt[i % copies].t()))
        # The token kernel on V alone (the launcher's 16-channel pick), into its own buffer.
        tc = mm.get_function(f"qins_gemv_tc_q{bits}_m{mt}_w{16 if mt == 8 else 8}_u2" + ("_p" if mt == 8 or bits == 4 else ""))
        tw = 16 if mt == 8 else 8
        tc.max_dynamic_shared_size_bytes = table
        yv = cp.empty((m, NV), dtype=cp.float16)
        vints = (np.int32(m), np.int32(K), np.int32(NV), np.int32(row_bytes(bits, K)), np.int32(-(-K // g)),
                 np.int32(cpg), np.int32(0))
        t_v = graph_time(lambda i: tc((NV // 16, 1), (32 * tw,), (a, cs_[i % copies], ss[i % copies], yv) + vints,
                                      shared_mem=table), reps=15)
        print(f"M={m:<3} q{bits} g{g}: cuBLAS packed f16 {t_pk * 1e6:7.2f} us, cuBLAS Q/K {t_qk * 1e6:7.2f} + token V "
              f"{t_v * 1e6:6.2f} = {(t_qk + t_v) * 1e6:7.2f} us", flush=True)
        rows += [dict(M=m, bits=bits, G=g, kernel="cublas_packed_f16", us=t_pk * 1e6),
                 dict(M=m, bits=bits, G=g, kernel="cublas_qk", us=t_qk * 1e6),
                 dict(M=m, bits=bits, G=g, kernel="token_v", us=t_v * 1e6)]
        if CHECK_ONLY:
            qk = cp.asarray(cp.asnumpy(a).astype(np.float64) @ wqk_np.astype(np.float64).T)
        else:
            qk = cp.from_dlpack(torch.matmul(at, twt[0].t()).contiguous())
        ref = cp.concatenate([qk, yv * 0], axis=1).astype(cp.float64)
        tc((NV // 16, 1), (32 * tw,), (a, cs_[0], ss[0], yv) + vints, shared_mem=table)
        ref[:, NF:] = yv.astype(cp.float64)
        variants = [("", 8, 1), ("_f2", 8, 2)] if mt == 16 else [("", 16, 1), ("_w8f2", 8, 2), ("_w8f3", 8, 3)]
        for suf, w, tf in variants:
            name = f"qins_gemv_tc_mix_q{bits}_m{mt}{suf}"
            f = mm.get_function(name)
            smem = max(table, w * 16 * tf * (mt + 1) * 4)
            f.max_dynamic_shared_size_bytes = smem
            y = cp.full((m, NF + NV), cp.nan, dtype=cp.float16)
            ints = (np.int32(m), np.int32(K), np.int32(NF), np.int32(NV), np.int32(row_bytes(bits, K)),
                    np.int32(-(-K // g)), np.int32(cpg))
            grid = (-(-NF // (16 * tf)) + NV // 16, 1)
            f(grid, (32 * w,), (a, wt[0], cs_[0], ss[0], y) + ints, shared_mem=smem)
            got = y.astype(cp.float64)
            nmse = float(((got - ref) ** 2).sum() / (ref ** 2).sum()) if bool(cp.isfinite(got).all()) else float("inf")
            t = graph_time(lambda i: f(grid, (32 * w,), (a, wt[i % copies], cs_[i % copies], ss[i % copies], y) + ints,
                                       shared_mem=smem), reps=15)
            rows.append(dict(M=m, bits=bits, G=g, kernel=name, us=t * 1e6, gbps=moved / t / 1e9, nmse=nmse))
            print(f"M={m:<3} q{bits} g{g}: {name:<30} {t * 1e6:7.2f} us {moved / t / 1e9:6.0f} GB/s  nmse {nmse:.1e}",
                  flush=True)
        del a
    del cs_, ss, wt, tpk, twt
json.dump(dict(device=cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), rows=rows), open(sys.argv[2], "w"),
          indent=1)
