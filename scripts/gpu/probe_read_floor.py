"""What the M = 1 targets ask of a kernel at Phi-3.5's sizes: the time a plain kernel takes to
read S bytes (each thread streams 16-byte loads, grid-stride, 4 in flight, and XORs them;
nothing else) and a device-to-device copy of S bytes (cudaMemcpyAsync: read S, write S), for S
= the weight bytes of each matmul of the kernel table, against the large-copy bandwidth that
the targets' "% of copy" is stated in. Each timing: a CUDA graph of 20 launches over distinct
buffers (>= 256 MB in all, so that reads come from HBM, not the 50 MB L2), replayed 10
times, median, CUDA events; clocks warmed by 0.5 s of copies first. argv: OUT_JSON
"""
import json, os, sys, time
import cupy as cp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import READ_ALL, graph_time  # noqa: E402

SIZES = {  # bytes of weights (codes + scales) per matmul, as bench_matmul.py counts them
    "3072x3072 q4 g32": 3072 * 3072 // 2 + 3072 * 96 * 2,
    "3072x3072 q8 g128": 3072 * 3072 + 3072 * 24 * 2,
    "3072x3072 fp16": 3072 * 3072 * 2,
    "3072x8192 q4 g32": 3072 * 8192 // 2 + 8192 * 96 * 2,
    "3072x8192 q8 g128": 3072 * 8192 + 8192 * 24 * 2,
    "3072x8192 fp16": 3072 * 8192 * 2,
    "8192x3072 q4 g32": 8192 * 3072 // 2 + 3072 * 256 * 2,
    "8192x3072 q8 g128": 8192 * 3072 + 3072 * 64 * 2,
    "3072x16384 q4 g32 (fused gate/up)": 3072 * 16384 // 2 + 16384 * 96 * 2,
    "3072x16384 q8 g128 (fused gate/up)": 3072 * 16384 + 16384 * 24 * 2,
}
read = cp.RawKernel(READ_ALL, "read_all")
sms = cp.cuda.Device().attributes["MultiProcessorCount"]

big, big2 = cp.empty(1 << 30, dtype=cp.uint8), cp.empty(1 << 30, dtype=cp.uint8)
t0 = time.perf_counter()
while time.perf_counter() - t0 < 0.5:
    big2.data.copy_from_device_async(big.data, big.nbytes)
cp.cuda.Device().synchronize()
t_big = graph_time(lambda i: big2.data.copy_from_device_async(big.data, big.nbytes), reps=5, launches=4)
bw = 2 * big.nbytes / t_big
print(f"1 GiB copy: {t_big * 1e6:.0f} us, {bw / 1e9:.0f} GB/s (read + write)", flush=True)
del big, big2
out = cp.zeros(1, dtype=cp.uint32)
rows = []
for name, size in SIZES.items():
    size = size // 16 * 16
    count = max(2, -(-256_000_000 // size))
    src = [cp.empty(size, dtype=cp.uint8) for _ in range(count)]
    dst = [cp.empty(size, dtype=cp.uint8) for _ in range(count)]
    n16 = size // 16
    res = {}
    for blocks_per_sm in (2, 4, 8):
        res[blocks_per_sm] = graph_time(
            lambda i: read((blocks_per_sm * sms,), (256,), (src[i % count], np.int64(n16), out)), reps=10)
    t_read = min(res.values())
    t_copy = graph_time(lambda i: dst[i % count].data.copy_from_device_async(src[i % count].data, size), reps=10)
    at_bw = size / bw  # the kernel table's 100% of copy: S bytes at the copy's bytes per second
    rows.append(dict(name=name, bytes=size, read_us=t_read * 1e6, read_us_by_blocks_per_sm={k: v * 1e6 for k, v in res.items()},
                     copy_us=t_copy * 1e6, at_copy_bw_us=at_bw * 1e6))
    print(f"{name:<36} {size / 1e6:6.1f} MB: read {t_read * 1e6:6.2f} us ({size / t_read / 1e9:5.0f} GB/s, "
          f"{100 * at_bw / t_read:3.0f}% of copy), copy {t_copy * 1e6:6.2f} us; 100% of copy bandwidth {at_bw * 1e6:6.2f} us",
          flush=True)
    del src, dst
    cp.get_default_memory_pool().free_all_blocks()
json.dump(dict(device=cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), copy_gbps=bw / 1e9, rows=rows),
          open(sys.argv[1], "w"), indent=1)
