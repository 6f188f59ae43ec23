"""Direct timings of the wgmma prefill prototype (research/wgmma-prefill/gemm_wgmma.cu, not in the
library; built into .wgart/ by research/wgmma-prefill/build.sh), every compiled configuration and
K splits, against fp16 cuBLAS, decode + cuBLAS (those two without a graph: CuPy refuses cuBLAS under capture) and the mma.sync prefill
kernel (gemm_tc) at the same shapes, in one run (no ONNX Runtime): fat binaries loaded with
CuPy, CUDA graphs of 20 launches replayed (median of 15, CUDA events), rotating over weight
copies (>= 256 MB) so that weights come from HBM. Every output is checked against decode
(kernels/qins_matmul/qins_decode.cu) + an f32 matmul by normalised squared error.
argv: FATBIN_DIR OUT_JSON. Env: WG_SHAPES=KxN,...  WG_FMTS=q8g128,q4g32  WG_MS=128,...  WG_SPLITS=1,2
WG_FATBIN=wg_NO_DECODE.fatbin (an ablation), WG_NO_TC=1 (skip gemm_tc), WG_VERBOSE=1 (every row),
WG_TMA=1 (time the TMA prototype, research/wgmma-prefill/gemm_wgmma_tma.cu, instead; WG_TMA_FATBIN=
wgt_NO_DECODE.fatbin for its ablation)
"""
import json, os, re, sys
import cupy as cp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../scripts/gpu"))
from common import graph_time, load_module, plain_time, prefill_smem, random_weight, row_bytes  # noqa: E402

FAT, OUT = sys.argv[1], sys.argv[2]
wgm = load_module(os.path.join(FAT, os.environ.get("WG_FATBIN", "qins_matmul_wgmma.fatbin")))
pf = load_module(os.path.join(FAT, "qins_matmul_prefill.fatbin"))
dec = load_module(os.path.join(FAT, "qins_decode.fatbin"))
src = open(os.path.join(os.path.dirname(__file__), "gemm_wgmma.cu")).read()
configs = [tuple(int(v) for v in m.groups()) for m in
           re.finditer(r"QINS_GEMM_WG\(BITS, (\d+), (\d+), (\d+), (\d+), (\d+)\)", src)]


def cdiv(a, b):
    return -(-a // b)


def wg_smem(bits, mb, nw, t, stages, minb):
    """Wg<...>::SMEM."""
    return 8192 + 1024 + stages * (mb * 128 + 64 * nw * t * 8 * bits)


def tensor_map(ptr, dtype, inner, outer, row_bytes, box_inner, box_outer, swizzle):
    """A CUtensorMap (cuTensorMapEncodeTiled) of a 2-D row-major tensor, copied to the GPU:
    the TMA kernels take it by pointer. dtype: 0 u8, 6 f16; swizzle: 0 none, 3 128-byte."""
    import ctypes
    cuda = ctypes.CDLL("libcuda.so.1")
    host = np.zeros(256, dtype=np.uint8)
    off = (-host.ctypes.data) % 64
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    r = cuda.cuTensorMapEncodeTiled(
        ctypes.c_void_p(host.ctypes.data + off), ctypes.c_int(dtype), u32(2), ctypes.c_void_p(ptr),
        (u64 * 2)(inner, outer), (u64 * 1)(row_bytes), (u32 * 2)(box_inner, box_outer), (u32 * 2)(1, 1),
        ctypes.c_int(0), ctypes.c_int(swizzle), ctypes.c_int(3), ctypes.c_int(0))
    if r != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled: CUresult {r}")
    return cp.asarray(host[off:off + 128].copy())


TMA = os.environ.get("WG_TMA") == "1"
if TMA:
    wgt = load_module(os.path.join(FAT, os.environ.get("WG_TMA_FATBIN", "qins_matmul_wgmma_tma.fatbin")))
    tsrc = open(os.path.join(os.path.dirname(__file__), "gemm_wgmma_tma.cu")).read()
    tma_configs = [tuple(int(v) for v in m.groups()) for m in
                   re.finditer(r"QINS_GEMM_WG_TMA\(BITS, (\d+), (\d+), (\d+)\)", tsrc)]

rng = np.random.default_rng(11)
shapes = [tuple(int(v) for v in s.split("x")) for s in os.environ.get("WG_SHAPES", "3072x3072,3072x8192,8192x3072").split(",")]
fmts = os.environ.get("WG_FMTS", "q8g128,q4g32").split(",")
ms = [int(v) for v in os.environ.get("WG_MS", "128,256,512,1024,2048").split(",")]
splits_env = [int(v) for v in os.environ.get("WG_SPLITS", "1,2,3").split(",")]
TC = [] if os.environ.get("WG_NO_TC") else [(64, 2, 4, 2, 3), (128, 2, 4, 1, 2)]
red = pf.get_function("qins_gemm_reduce")
rows = []
for k, n in shapes:
    fp_copies = max(2, cdiv(256_000_000, 2 * n * k))
    w16 = [cp.asarray((rng.standard_normal((n, k)) * 0.02).astype(np.float16)) for _ in range(fp_copies)]
    for fmt in fmts:
        bits, g = int(fmt[1]), int(fmt.split("g")[1])
        ch = 32 if bits == 4 else 16
        c_np, s_np = random_weight(rng, bits, k, n, g)
        copies = max(2, cdiv(256_000_000, c_np.nbytes + s_np.nbytes))
        cs_ = [cp.asarray(c_np) for _ in range(copies)]
        ss = [cp.asarray(s_np) for _ in range(copies)]
        rb, groups = row_bytes(bits, k), cdiv(k, g)
        cpg = (g // ch).bit_length() - 1
        wdec = cp.empty((n, k), dtype=cp.float16)
        fdec = dec.get_function(f"qins_decode_q{bits}_f16")
        dints = (np.int32(k), np.int32(n), np.int32(g), np.int32(rb), np.int32(groups))
        fdec((cdiv(n, 8),), (32, 8), (cs_[0], ss[0], wdec) + dints)
        wref = wdec.astype(cp.float32)
        for m in ms:
            a = cp.asarray(rng.standard_normal((m, k)).astype(np.float16))
            y = cp.empty((m, n), dtype=cp.float16)
            yr = (a.astype(cp.float32) @ wref.T).astype(cp.float64)
            base = dict(K=k, N=n, M=m, bits=bits, G=g)
            t_fp = plain_time(lambda i: cp.matmul(a, w16[i % fp_copies].T, out=y))
            t_dc = plain_time(lambda i: (fdec((cdiv(n, 8),), (32, 8), (cs_[i % copies], ss[i % copies], wdec) + dints),
                                         cp.matmul(a, wdec.T, out=y)))
            rows += [dict(base, kernel="fp16 cuBLAS", us=t_fp * 1e6), dict(base, kernel="decode + cuBLAS", us=t_dc * 1e6)]
            ints = (np.int32(m), np.int32(k), np.int32(n), np.int32(rb), np.int32(groups), np.int32(cpg))
            cands = [("tc", c, z) for c in TC for z in (1, 2)] + [("wg", c, z) for c in configs for z in splits_env]
            if TMA:
                cands = [("wgt", c, z) for c in tma_configs for z in splits_env]
            best = {}
            for kind, cfg, ks in cands:
                if kind == "wgt":
                    mb, nc, stg = cfg
                    name = f"qins_gemm_wgt_q{bits}_m{mb}_c{nc}_s{stg}"
                    f = wgt.get_function(name)
                    sm = 8192 + 1024 + stg * (mb * 128 + 64 * nc * 8 * bits) + 16 * stg
                    grid, block = (cdiv(n, 64 * nc), cdiv(m, mb), ks), (128 * (nc + 1),)
                    ta = tensor_map(a.data.ptr, 6, k, m, 2 * k, 64, mb, 3)
                    tcs = [tensor_map(c.data.ptr, 0, rb, n, rb, 8 * bits, 64 * nc, 0) for c in cs_]
                elif kind == "tc":
                    mb, t, wn, wk, stg = cfg
                    name = f"qins_gemm_tc_q{bits}_m{mb}_t{t}_n{wn}_k{wk}_s{stg}"
                    f, sm = pf.get_function(name), prefill_smem(bits, *cfg)
                    grid, block = (cdiv(n, 16 * t * wn), cdiv(m, mb), ks), (32 * wn * wk,)
                    if ks > 1 and mb > 64:
                        continue
                else:
                    mb, nw, t, stg, _ = cfg
                    name = f"qins_gemm_wg_q{bits}_m{mb}_w{nw}_t{t}_s{stg}"
                    f, sm = wgm.get_function(name), wg_smem(bits, *cfg)
                    grid, block = (cdiv(n, 64 * nw * t), cdiv(m, mb), ks), (128 * nw,)
                if ks > cdiv(k, 64):
                    continue
                f.max_dynamic_shared_size_bytes = sm
                part = cp.empty((ks, m, n), dtype=cp.float32) if ks > 1 else np.uint64(0)
                rgrid = (min(cdiv(m * n, 256), 4 * 132),)

                def run(i):
                    if kind == "wgt":
                        f(grid, block, (ta, tcs[i % copies], ss[i % copies], y, part, np.int32(m), np.int32(k),
                                        np.int32(n), np.int32(groups), np.int32(cpg)), shared_mem=sm)
                    else:
                        f(grid, block, (a, cs_[i % copies], ss[i % copies], y, part) + ints, shared_mem=sm)
                    if ks > 1:
                        red(rgrid, (256,), (part, y, np.int64(m * n), np.int32(ks)))
                y.fill(cp.nan)
                run(0)
                cp.cuda.Device().synchronize()
                nmse = float(((y.astype(cp.float64) - yr) ** 2).sum() / (yr ** 2).sum())
                tt = graph_time(run, reps=15)
                rows.append(dict(base, kernel=f"{name}_x{ks}", us=tt * 1e6, nmse=nmse, smem=sm, splits=ks))
                if nmse < 1e-5 and (kind not in best or tt < best[kind][1]):
                    best[kind] = (f"{name}_x{ks}", tt)
                if os.environ.get("WG_VERBOSE"):
                    print(f"   {name}_x{ks:<3} {tt * 1e6:8.1f} us  nmse {nmse:.1e}", flush=True)
                elif nmse >= 1e-5:
                    print(f"   FAIL {name}_x{ks} nmse {nmse:.1e}", flush=True)
            line = f"{k}x{n} {fmt:<7} M={m:<5} fp16 {t_fp * 1e6:7.1f}  dec+cuBLAS {t_dc * 1e6:7.1f}"
            for kind in ("tc", "wg", "wgt"):
                if kind in best:
                    line += f"  {kind} {best[kind][1] * 1e6:7.1f} ({best[kind][1] / t_fp:.2f}x fp16, {best[kind][0]})"
            print(line, flush=True)
        del cs_, ss
    del w16
    cp.get_default_memory_pool().free_all_blocks()
json.dump(dict(configs=configs, rows=rows), open(OUT, "w"), indent=1)
