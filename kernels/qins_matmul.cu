// QinsMatMul for token generation: Y[M, N] = A[M, K] W[K, N] on the codes, M small.
//
// Contract
// - A: T [M, K] row-major (T = float or __half); Y: T [M, N]; accumulation in f32, Y rounded
//   once. codes: uint8 [N, row_bytes] (bits 4/6/8) or float z [N, K] (bits 32); scales:
//   __half [N, groups] (float [N, 1] for bits 32), group g covering k in [gG, min(gG+G, K)).
// - Never writes decoded weights anywhere: each chunk of codes is read once from global memory
//   (16-byte loads, a warp reading 512 consecutive bytes of a row), decoded in registers from
//   a per-lane copy of the magnitude table in shared memory, and multiplied into MT
//   activation rows.
// - Grid: x over (channel block, row tile) pairs, row tiles fastest: `wpr` warps compute one
//   channel for MT activation rows; a row tile past the first re-reads the weights, from L2
//   since the tiles of one channel block run together. `cpg_shift`: see chunk_fma.
// - `vec_a`: A's rows start 16-byte aligned (K % 8 == 0 and A aligned), so activations are
//   read 8 at a time; otherwise one by one. Chunks that run past K always take the checked
//   path, so nothing past A[m, K-1] is read.
// - No shared state between blocks, no atomics: safe to replay in a CUDA graph.
#include "qins_common.cuh"

// Loads activations k0..k0+7 of row m (zeros past K).
template <typename T>
__device__ __forceinline__ void load_a8(const T* __restrict__ a_row, int k0, int K, bool vec, float (&out)[8]) {
    if (vec && k0 + 8 <= K) {
        if constexpr (sizeof(T) == 2) {
            uint4 v = __ldg(reinterpret_cast<const uint4*>(a_row + k0));
            const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float2 f = __half22float2(h[i]);
                out[2 * i] = f.x;
                out[2 * i + 1] = f.y;
            }
        } else {
            float4 x = __ldg(reinterpret_cast<const float4*>(a_row + k0));
            float4 y = __ldg(reinterpret_cast<const float4*>(a_row + k0) + 1);
            out[0] = x.x, out[1] = x.y, out[2] = x.z, out[3] = x.w;
            out[4] = y.x, out[5] = y.y, out[6] = y.z, out[7] = y.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++) out[i] = (k0 + i < K) ? to_f<T>(a_row[k0 + i]) : 0.0f;
    }
}

// Value of code i of a chunk, before the scale, from `lut`: the format's magnitudes
// (`Format::lut()`'s first half: codes with the sign bit clear), each repeated for the 32
// lanes at lut[m * 32 + lane], so that every lane reads its own bank: random codes in one table
// made most lookups bank conflicts. The sign bit of the code becomes the float's.
template <int BITS>
__device__ __forceinline__ float value_of(const Chunk& ch, int i, const float* lut) {
    if constexpr (BITS == 32) {
        return f32_value(ch.w[i]);
    } else {
        const uint32_t code = code_of<BITS>(ch, i);
        const uint32_t sign = (code << (32 - BITS)) & 0x80000000u;
        const float u = lut[(code & ((1u << (BITS - 1)) - 1)) * 32];
        return __uint_as_float(__float_as_uint(u) ^ sign);
    }
}

// Magnitudes per lane (see value_of); `lut` points at this lane's column afterwards.
template <int BITS>
__device__ __forceinline__ const float* stage_lut_lanes(float* table) {
    if constexpr (BITS != 32) {
        constexpr int MAGS = Fmt<BITS>::LUT / 2;
        for (int i = threadIdx.x; i < MAGS * 32; i += blockDim.x) table[i] = Fmt<BITS>::lut()[i >> 5];
    }
    __syncthreads();
    return table + (threadIdx.x & 31);
}

// Chunks that straddle a group boundary (G not a multiple of the chunk, or the tail at K):
// per-weight scales. Kept out of line so that the hot loop stays small (instruction-cache
// misses, not bytes, limited an earlier fully unrolled version).
template <int BITS, typename T, int MT>
__device__ __noinline__ void chunk_fma_slow(const Chunk ch, int c, const T* const* a_rows, const void* scales, int row,
                                            int K, int G, int groups, const float* lut, float* acc) {
    constexpr int CH = Fmt<BITS>::CH;
    const int k0 = c * CH;
    for (int i = 0; i < CH; i++) {
        const int k = k0 + i;
        if (k >= K) break;
        Chunk tmp = ch;
        float w;
        if constexpr (BITS == 32) {
            w = f32_value(tmp.w[i]);
        } else {
            // i is not a compile-time constant here: rebuild the code from the raw words.
            const int bit = i * BITS, word = bit >> 5, off = bit & 31;
            uint32_t v = tmp.w[word] >> off;
            if (off + BITS > 32) v |= tmp.w[word + 1] << (32 - off);
            const uint32_t code = v & ((1u << BITS) - 1);
            const float u = lut[(code & ((1u << (BITS - 1)) - 1)) * 32];
            w = (code >> (BITS - 1)) ? -u : u;
        }
        w *= scale_at<BITS>(scales, (long long)row * groups + k / G);
        for (int m = 0; m < MT; m++) acc[m] = fmaf(w, to_f<T>(a_rows[m][k]), acc[m]);
    }
}

// Usual case: the chunk lies in one group and inside K; its scale is applied once.
// `cpg_shift` >= 0: G is a power-of-two multiple of the chunk, 2^cpg_shift chunks a group, so
// no chunk straddles a group and the group is a shift away (integer division by a run-time G
// cost as much as the rest of the chunk's bookkeeping).
template <int BITS, typename T, int MT>
__device__ __forceinline__ void chunk_fma(const Chunk& ch, int c, const T* const (&a_rows)[MT],
                                          const void* __restrict__ scales, int row, int K, int G, int groups,
                                          int vec_a, int cpg_shift, const float* lut, float (&acc)[MT]) {
    constexpr int CH = Fmt<BITS>::CH;
    constexpr int SUB = CH < 8 ? CH : 8;
    const int k0 = c * CH;
    int g0;
    if (cpg_shift >= 0 && k0 + CH <= K) {
        g0 = c >> cpg_shift;
    } else {
        g0 = k0 / G;
        if (k0 + CH > K || (k0 + CH - 1) / G != g0) {
            chunk_fma_slow<BITS, T, MT>(ch, c, a_rows, scales, row, K, G, groups, lut, acc);
            return;
        }
    }
    // Two independent sums per row, so that consecutive FMAs do not wait on each other.
    float part[2][MT];
#pragma unroll
    for (int m = 0; m < MT; m++) part[0][m] = part[1][m] = 0.0f;
#pragma unroll
    for (int s = 0; s < CH / SUB; s++) {
        float w[SUB];
#pragma unroll
        for (int i = 0; i < SUB; i++) w[i] = value_of<BITS>(ch, SUB * s + i, lut);
#pragma unroll
        for (int m = 0; m < MT; m++) {
            float a[8];
            if constexpr (SUB == 8) {
                load_a8<T>(a_rows[m], k0 + 8 * s, K, vec_a, a);
            } else {
#pragma unroll
                for (int i = 0; i < SUB; i++) a[i] = to_f<T>(a_rows[m][k0 + i]);
            }
#pragma unroll
            for (int i = 0; i < SUB; i++) part[i & 1][m] = fmaf(w[i], a[i], part[i & 1][m]);
        }
    }
    const float sc = scale_at<BITS>(scales, (long long)row * groups + g0);
#pragma unroll
    for (int m = 0; m < MT; m++) acc[m] = fmaf(part[0][m] + part[1][m], sc, acc[m]);
}

// `wpr` warps (1, 2 or 4) compute one output channel for MT activation rows: their lanes
// stream the row's chunks (thread t of the row takes chunks t, t + 32 wpr, ...), UNROLL chunks
// loaded before any is used so that enough bytes are in flight; shuffles and, across the
// row's warps, shared memory reduce. The host picks wpr (1 but for very long rows). Consecutive
// blocks take the row tiles of the same channels, so a weight re-read for a second row tile
// comes from L2.
template <int BITS, typename T, int MT, int WPB>
__device__ __forceinline__ void gemv(const T* __restrict__ A, const uint8_t* __restrict__ codes,
                                     const void* __restrict__ scales, T* __restrict__ Y, int M, int K, int N, int G,
                                     int row_bytes, int groups, int vec_a, int cpg_shift, int wpr) {
    constexpr int CH = Fmt<BITS>::CH;
    constexpr int UNROLL = 4;
    __shared__ float table[Fmt<BITS>::LUT / 2 * 32 + 1];
    __shared__ float red[WPB][MT];
    const float* lut = stage_lut_lanes<BITS>(table);

    const int tiles_m = (M + MT - 1) / MT;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = (blockIdx.x / tiles_m) * (WPB / wpr) + warp / wpr;
    const int m0 = (blockIdx.x % tiles_m) * MT;
    const int stride = 32 * wpr;
    const int nchunks = (K + CH - 1) / CH;

    const T* a_rows[MT];
#pragma unroll
    for (int m = 0; m < MT; m++) a_rows[m] = A + (long long)min(m0 + m, M - 1) * K;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; m++) acc[m] = 0.0f;

    if (n < N) {
        for (int c = (warp % wpr) * 32 + lane; c < nchunks; c += UNROLL * stride) {
            Chunk ch[UNROLL];
#pragma unroll
            for (int j = 0; j < UNROLL; j++)
                if (c + stride * j < nchunks) ch[j] = load_row_chunk<BITS>(codes, n, c + stride * j, K, row_bytes);
#pragma unroll
            for (int j = 0; j < UNROLL; j++)
                if (c + stride * j < nchunks)
                    chunk_fma<BITS, T, MT>(ch[j], c + stride * j, a_rows, scales, n, K, G, groups, vec_a, cpg_shift,
                                           lut, acc);
        }
    }
#pragma unroll
    for (int m = 0; m < MT; m++) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
        if (lane == 0) red[warp][m] = acc[m];
    }
    __syncthreads();
    if (lane == 0 && warp % wpr == 0 && n < N) {
#pragma unroll
        for (int m = 0; m < MT; m++) {
            float v = 0.0f;
            for (int w = 0; w < wpr; w++) v += red[warp + w][m];
            if (m0 + m < M) Y[(long long)(m0 + m) * N + n] = from_f<T>(v);
        }
    }
}

// One entry point per (format, activation type, row tile); the host picks by name. A block
// is WPB warps, WPB / wpr output channels.
constexpr int WPB = 4;
#define QINS_GEMV(BITS, T, TN, MT)                                                                           \
    extern "C" __global__ void __launch_bounds__(WPB * 32)                                                   \
        qins_gemv_q##BITS##_##TN##_m##MT(const T* A, const uint8_t* codes, const void* scales, T* Y, int M, \
                                         int K, int N, int G, int row_bytes, int groups, int vec_a,           \
                                         int cpg_shift, int wpr) {                                            \
        gemv<BITS, T, MT, WPB>(A, codes, scales, Y, M, K, N, G, row_bytes, groups, vec_a, cpg_shift, wpr);   \
    }
#define QINS_GEMV_ALL_M(BITS, T, TN) \
    QINS_GEMV(BITS, T, TN, 1)        \
    QINS_GEMV(BITS, T, TN, 2)        \
    QINS_GEMV(BITS, T, TN, 4)        \
    QINS_GEMV(BITS, T, TN, 8)
#define QINS_GEMV_ALL(BITS)              \
    QINS_GEMV_ALL_M(BITS, __half, f16) \
    QINS_GEMV_ALL_M(BITS, float, f32)

QINS_GEMV_ALL(8)
QINS_GEMV_ALL(6)
QINS_GEMV_ALL(4)
QINS_GEMV_ALL(32)
