// QINS decode: codes -> T [N, K] (T = __half or float), the design notes' "fused decode".
//
// Contract
// - Input as for qins_matmul.cu (codes [N, row_bytes] or z [N, K]; scales [N, groups]).
//   Output W: T [N, K] row-major, W[n, k] = LUT[code(n, k)] * scale(n, k / G), computed in
//   f32 and rounded once, exactly what the CPU reference decodes before its own rounding.
// - `qins_decode_*`: blocks of 32 x 8 threads, a warp per row, a thread per chunk at a time
//   (16-byte code loads, the LUT in shared memory, 16-byte stores where K % 8 == 0). The
//   QinsMatMul prefill path decodes into scratch with it (or the runs kernel) and hands the
//   result to cuBLAS.
// - `qins_decode_runs_*` (bits 8 and 4, K % 8 == 0, G % 8 == 0): blocks of 128 threads over one
//   row, a thread per run of 8 weights at a time (8 or 4 bytes of codes, one 16-byte f16 store),
//   so that a warp reads 32 consecutive runs of codes and writes 512 consecutive bytes. The
//   launcher takes it wherever it applies: the chunked kernel's lanes each wrote their own 64
//   bytes (q4) and it reached 1.2-1.4 TB/s against the copy's ~2.9 (docs/BENCHMARKS.md).
// - `qins_decode_naive_*` (QINS_PROBE_KERNELS only): the plain elementwise baseline it is measured against: one thread
//   per weight, one byte load, and D(z) evaluated from the code by the formula.
// - Grid: `qins_decode_*` x over tiles of 8 rows; `qins_decode_runs_*` (the same arguments)
//   x over 128 RUNS_U-run pieces of a row, y over rows; the naive one x over elements of a
//   row, y over rows. No shared state between blocks. All wait_prior_grid()
//   (qins_common.cuh) before their first global read or write.
#include "../common/qins_common.cuh"

template <int BITS, typename T>
__device__ __forceinline__ void decode_chunk(const Chunk& ch, const void* __restrict__ scales, T* __restrict__ W,
                                             int K, int n, int G, int groups, const float* lut, int c) {
    constexpr int CH = Fmt<BITS>::CH;
    const int k0 = c * CH;
    const long long srow = (long long)n * groups;
    const bool one_group = (min(k0 + CH, K) - 1) / G == k0 / G;
    const float s0 = scale_at<BITS>(scales, srow + k0 / G);
    T* out = W + (long long)n * K + k0;
    float v[CH];
#pragma unroll
    for (int i = 0; i < CH; i++) {
        float u;
        if constexpr (BITS == 32) {
            u = f32_value(ch.w[i]);
        } else {
            u = lut[code_of<BITS>(ch, i)];
        }
        const float s = one_group ? s0 : (k0 + i < K ? scale_at<BITS>(scales, srow + (k0 + i) / G) : 0.0f);
        v[i] = u * s;
    }
    const bool vec = (K & 7) == 0 && k0 + CH <= K && CH >= 8;
    if (vec) {
#pragma unroll
        for (int j = 0; j < CH / 8; j++) {
            if constexpr (sizeof(T) == 2) {
                __half2 h[4];
#pragma unroll
                for (int i = 0; i < 4; i++) h[i] = __floats2half2_rn(v[8 * j + 2 * i], v[8 * j + 2 * i + 1]);
                *reinterpret_cast<uint4*>(out + 8 * j) = *reinterpret_cast<uint4*>(h);
            } else {
                float4* o = reinterpret_cast<float4*>(out + 8 * j);
                o[0] = make_float4(v[8 * j], v[8 * j + 1], v[8 * j + 2], v[8 * j + 3]);
                o[1] = make_float4(v[8 * j + 4], v[8 * j + 5], v[8 * j + 6], v[8 * j + 7]);
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < CH; i++)
            if (k0 + i < K) out[i] = from_f<T>(v[i]);
    }
}

// A block of 32 x 8 threads decodes 8 rows, a warp per row striding over its chunks, so the
// table staged in shared memory serves a whole 8-row tile.
template <int BITS, typename T>
__device__ __forceinline__ void decode(const uint8_t* __restrict__ codes, const void* __restrict__ scales,
                                       T* __restrict__ W, int K, int N, int G, int row_bytes, int groups) {
    constexpr int CH = Fmt<BITS>::CH;
    __shared__ float lut[Fmt<BITS>::LUT];
    stage_lut<BITS>(lut);
    // The codes may be a computed tensor, and W is scratch an earlier kernel may still read.
    wait_prior_grid();
    const int n = blockIdx.x * blockDim.y + threadIdx.y;
    if (n >= N) return;
    const int nchunks = (K + CH - 1) / CH;
    // Four chunks per thread per step, loaded before any is used: one load at a time per
    // thread leaves too few bytes in flight to cover memory latency.
    for (int c = threadIdx.x; c < nchunks; c += 4 * 32) {
        Chunk ch[4];
#pragma unroll
        for (int j = 0; j < 4; j++)
            if (c + 32 * j < nchunks) ch[j] = load_row_chunk<BITS>(codes, n, c + 32 * j, K, row_bytes);
#pragma unroll
        for (int j = 0; j < 4; j++)
            if (c + 32 * j < nchunks) decode_chunk<BITS, T>(ch[j], scales, W, K, n, G, groups, lut, c + 32 * j);
    }
}

constexpr int RUNS_U = 4;

// Run j of row n: weights 8j .. 8j+7, one group (G % 8 == 0). RUNS_U runs a thread, loaded
// before any is decoded.
template <int BITS, typename T>
__device__ __forceinline__ void decode_runs(const uint8_t* __restrict__ codes, const __half* __restrict__ scales,
                                            T* __restrict__ W, int K, int N, int G, int row_bytes, int groups) {
    static_assert(BITS == 8 || BITS == 4, "runs of 8 codes in 8 or 4 bytes");
    __shared__ float lut[Fmt<BITS>::LUT];
    stage_lut<BITS>(lut);
    wait_prior_grid();
    const long long n = blockIdx.y;
    if (n >= N) return;
    const int runs = K / 8;
    const int j0 = blockIdx.x * blockDim.x * RUNS_U + threadIdx.x;
    const uint8_t* row = codes + n * row_bytes;
    uint2 w[RUNS_U];
#pragma unroll
    for (int u = 0; u < RUNS_U; u++) {
        const int j = j0 + u * blockDim.x;
        if (j < runs) {
            if constexpr (BITS == 8) {
                w[u] = __ldg(reinterpret_cast<const uint2*>(row) + j);
            } else {
                w[u].x = __ldg(reinterpret_cast<const uint32_t*>(row) + j);
            }
        }
    }
#pragma unroll
    for (int u = 0; u < RUNS_U; u++) {
        const int j = j0 + u * blockDim.x;
        if (j >= runs) break;
        const float s = __half2float(__ldg(scales + n * groups + 8 * j / G));
        float v[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const uint32_t code = BITS == 8 ? ((i < 4 ? w[u].x : w[u].y) >> (8 * (i & 3))) & 0xffu
                                            : (w[u].x >> (4 * i)) & 0xfu;
            v[i] = lut[code] * s;
        }
        T* out = W + n * K + 8 * j;
        if constexpr (sizeof(T) == 2) {
            __half2 h[4];
#pragma unroll
            for (int i = 0; i < 4; i++) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
            *reinterpret_cast<uint4*>(out) = *reinterpret_cast<uint4*>(h);
        } else {
            reinterpret_cast<float4*>(out)[0] = make_float4(v[0], v[1], v[2], v[3]);
            reinterpret_cast<float4*>(out)[1] = make_float4(v[4], v[5], v[6], v[7]);
        }
    }
}

#define QINS_DECODE_RUNS(BITS, T, TN)                                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                                        \
        qins_decode_runs_q##BITS##_##TN(const uint8_t* codes, const __half* scales, T* W, int K, int N, int G, \
                                        int row_bytes, int groups) {                                          \
        decode_runs<BITS, T>(codes, scales, W, K, N, G, row_bytes, groups);                                  \
    }
QINS_DECODE_RUNS(8, __half, f16)
QINS_DECODE_RUNS(4, __half, f16)
QINS_DECODE_RUNS(8, float, f32)
QINS_DECODE_RUNS(4, float, f32)

#define QINS_DECODE(BITS, T, TN)                                                                           \
    extern "C" __global__ void qins_decode_q##BITS##_##TN(const uint8_t* codes, const void* scales, T* W, \
                                                          int K, int N, int G, int row_bytes, int groups) { \
        decode<BITS, T>(codes, scales, W, K, N, G, row_bytes, groups);                                     \
    }
QINS_DECODE(8, __half, f16)
QINS_DECODE(6, __half, f16)
QINS_DECODE(4, __half, f16)
QINS_DECODE(32, __half, f16)
QINS_DECODE(8, float, f32)
QINS_DECODE(6, float, f32)
QINS_DECODE(4, float, f32)
QINS_DECODE(32, float, f32)

#ifdef QINS_PROBE_KERNELS
// The plain baseline of scripts/gpu/bench_decode.py (built by scripts/gpu/stage.sh, not into
// the library): code k of row n by its byte, D(z) by the formula of docs/FORMAT.md.
template <int BITS>
__device__ __forceinline__ void decode_naive(const uint8_t* __restrict__ codes, const void* __restrict__ scales,
                                             __half* __restrict__ W, int K, int N, int G, int row_bytes,
                                             int groups) {
    wait_prior_grid();
    const int n = blockIdx.y;
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= K) return;
    const uint8_t* row = codes + (long long)n * row_bytes;
    uint32_t code;
    if constexpr (BITS == 8) {
        code = row[k];
    } else if constexpr (BITS == 4) {
        code = (row[k >> 1] >> (4 * (k & 1))) & 0xfu;
    } else {
        // A code that straddles two bytes reads the second; the row's last byte has no successor.
        const int bit = 6 * k;
        uint32_t v = row[bit >> 3];
        if ((bit & 7) > 2) v |= (uint32_t)row[(bit >> 3) + 1] << 8;
        code = (v >> (bit & 7)) & 0x3fu;
    }
    constexpr int M = 1 << (BITS - 1);
    const uint32_t m = code & (M - 1);
    const float z = 1.0f - (float)m * (0.5f / (M - 1));
    const float u = (1.0f - z) / z;
    const float s = __half2float(reinterpret_cast<const __half*>(scales)[(long long)n * groups + k / G]);
    W[(long long)n * K + k] = __float2half_rn((code >> (BITS - 1)) ? -u * s : u * s);
}

#define QINS_DECODE_NAIVE(BITS)                                                                             \
    extern "C" __global__ void qins_decode_naive_q##BITS(const uint8_t* codes, const void* scales, __half* W, \
                                                         int K, int N, int G, int row_bytes, int groups) {   \
        decode_naive<BITS>(codes, scales, W, K, N, G, row_bytes, groups);                                   \
    }
QINS_DECODE_NAIVE(8)
QINS_DECODE_NAIVE(6)
QINS_DECODE_NAIVE(4)
#endif
