"""Would asking L2 for the next matmul's weights, before the non-matmul ops that run between two
matmuls of a token (attention, norms), make that matmul faster? A stand-in for each part: a
kernel that streams S bytes (the weights of one Phi-3.5 matmul), a one-block kernel that waits
T us on the global timer (the ops in between, which barely touch HBM), and a prefetch kernel
that only asks L2 for the S bytes (no registers or shared memory held, so in the library it
could be the tail of the previous QINS kernel). Per size and T, CUDA graphs of 20 iterations
over distinct buffers (>= 256 MB, so nothing is in L2 from the previous iteration), median of
10 replays, CUDA events:
  cold     = [wait T; read]             - [wait T]
  prefetch = [prefetch; wait T; read]   - [prefetch; wait T]
  hot      = read of one buffer 20 times in a row (L2 holds it when it fits)
argv: OUT_JSON
"""
import json, os, sys
import cupy as cp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import READ_ALL, graph_time  # noqa: E402

SRC = r'''
extern "C" __global__ void wait_ns(long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < (unsigned long long)ns);
}
// One bulk prefetch per thread of `chunk` bytes.
extern "C" __global__ void prefetch_bulk(const char* p, long long bytes, int chunk) {
    long long off = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * chunk;
    if (off >= bytes) return;
    long long len = bytes - off < chunk ? bytes - off : chunk;
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p + off), "r"((unsigned)len) : "memory");
}
// One prefetch instruction per 128-byte line, grid-stride.
extern "C" __global__ void prefetch_lines(const char* p, long long bytes, int evict_last) {
    const long long stride = (long long)gridDim.x * blockDim.x * 128;
    for (long long off = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 128; off < bytes; off += stride) {
        if (evict_last) asm volatile("prefetch.global.L2::evict_last [%0];" :: "l"(p + off));
        else asm volatile("prefetch.global.L2 [%0];" :: "l"(p + off));
    }
}
'''
mod = cp.RawModule(code=READ_ALL + SRC, options=("-std=c++17",))
read, wait, pf_bulk, pf_lines = (mod.get_function(n) for n in ("read_all", "wait_ns", "prefetch_bulk", "prefetch_lines"))
sms = cp.cuda.Device().attributes["MultiProcessorCount"]
out = cp.zeros(1, dtype=cp.uint32)

SIZES = {
    "3072x3072 q4 g32 (V, o_proj)": 5.3e6,
    "3072x3072 q8 g128": 9.6e6,
    "8192x3072 q4 g32 (down)": 14.2e6,
    "8192x3072 q8 g128": 25.6e6,
    "3072x16384 q4 g32 (gate_up)": 28.3e6,
    "qkv mixed q4 (Q/K f16 + V)": 43.0e6,
}
WAITS = [int(v) for v in os.environ.get("PF_WAITS", "3,10,25").split(",")]
PREFETCH = {
    "bulk64k": lambda p, s: pf_bulk((-(-s // (65536 * 128)),), (128,), (p, np.int64(s), np.int32(65536))),
    "bulk16k": lambda p, s: pf_bulk((-(-s // (16384 * 128)),), (128,), (p, np.int64(s), np.int32(16384))),
    "lines": lambda p, s: pf_lines((sms,), (256,), (p, np.int64(s), np.int32(0))),
    "lines_evict_last": lambda p, s: pf_lines((sms,), (256,), (p, np.int64(s), np.int32(1))),
}
rows = []
for name, size in SIZES.items():
    size = int(size) // 16 * 16
    count = max(2, -(-256_000_000 // size))
    bufs = [cp.empty(size, dtype=cp.uint8) for _ in range(count)]
    n16 = size // 16

    def rd(i, b=None):
        read((4 * sms,), (256,), (bufs[i % count] if b is None else b, np.int64(n16), out))

    hot = graph_time(lambda i: rd(0), reps=10)
    cold_plain = graph_time(lambda i: rd(i), reps=10)
    row = dict(name=name, bytes=size, read_cold_us=cold_plain * 1e6, read_hot_us=hot * 1e6, by_wait={})
    print(f"{name:<30} {size / 1e6:5.1f} MB: read cold {cold_plain * 1e6:6.2f} us, hot {hot * 1e6:6.2f} us", flush=True)
    for t in WAITS:
        ns = np.int64(t * 1000)
        w_only = graph_time(lambda i: wait((1,), (32,), (ns,)), reps=10)
        w_read = graph_time(lambda i: (wait((1,), (32,), (ns,)), rd(i)), reps=10)
        cell = dict(wait_us=w_only * 1e6, cold_us=(w_read - w_only) * 1e6)
        for pname, pf in PREFETCH.items():
            p_w = graph_time(lambda i: (pf(bufs[i % count], size), wait((1,), (32,), (ns,))), reps=10)
            p_w_r = graph_time(lambda i: (pf(bufs[i % count], size), wait((1,), (32,), (ns,)), rd(i)), reps=10)
            cell[pname] = dict(read_us=(p_w_r - p_w) * 1e6, prefetch_cost_us=(p_w - w_only) * 1e6)
        row["by_wait"][t] = cell
        print(f"   wait {t:3d} us: cold read {cell['cold_us']:6.2f} | " + " | ".join(
            f"{p} {cell[p]['read_us']:6.2f} (+{cell[p]['prefetch_cost_us']:5.2f})" for p in PREFETCH), flush=True)
    rows.append(row)
    del bufs
    cp.get_default_memory_pool().free_all_blocks()
json.dump(dict(device=cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), rows=rows), open(sys.argv[1], "w"), indent=1)
