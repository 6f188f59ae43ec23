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
// - Every kernel calls wait_prior_grid() (qins_common.cuh) before it reads A or writes Y.
#include <type_traits>

#include "../common/qins_common.cuh"
#include "../common/qins_tc.cuh"

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
    wait_prior_grid();

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

// ---------------------------------------------------------------------------------------------
// Tensor-core variant for f16 activations and packed codes (bits 8/6/4): `qins_gemv_tc_*`.
//
// Contract (in addition to the file's)
// - A is f16, K % 8 == 0 and A 16-byte aligned; G % CH == 0 with G / CH a power of two
//   (`cpg_shift`), or one group per row (`cpg_shift` = 30). The host checks and otherwise runs
//   the kernel above. `cside` (G a multiple of 4 CH, or one group a row): the scale multiplies
//   the f32 partial sum of each 4-chunk step instead of every f16 weight pair.
// - A block of W warps computes 16 T output channels (T tiles of 16) for MT (8 or 16)
//   activation rows; grid (ceil(N / 16 T), ceil(M / MT)). The warps split K and add their
//   partial sums through shared memory, so no atomics and no state between launches.
//   SC_CHUNK kernels take M = 1 only. A warp holds U steps of chunks at a time; PIPE kernels
//   (U = 2) request step i + 1 before they multiply step i.
// - Why: the kernel above spends ~13 instructions a weight (extract, look up, sign, convert,
//   FMA per row). Here a code costs a byte permute, an add and one shared-memory lookup that
//   yields the f16 value with its sign (a q4 byte yields both of its weights), and the products
//   are one mma.sync per 16 x 16 weights for up to 8 rows (two for 16). The order of k
//   inside an mma does not matter, so each lane feeds the mma the codes it loaded, in load
//   order, and loads the activations at the same k.
// - The f16 weight is round_f16(LUT[code]) times the scale (in f16 when !cside, in f32 on the
//   partial sum when cside); accumulation is f32 in the tensor cores.
// - Dynamic shared memory: the SPREAD table of qins_tc.cuh (TcTable<BITS>::BYTES), or the
//   cross-warp sums' W * 16 T * (MT + 1) floats where larger (they reuse the table's memory at
//   the end): `tc_smem` in the launcher.

// Lane l = 4 g + q of every warp: A rows (channels) g and g + 8 of the block's 16, B column
// (activation row) g of each 8-row half of the tile, and chunk q of every 4-chunk step of K.
// mma step s of a chunk covers its codes 4s .. 4s+3.
// Rounds: warp w takes the 4-chunk steps w, w + W, ..., U of them at a time, loaded before
// any is multiplied. A step wholly inside K (every Phi-3.5 step) runs with no checks and
// addresses are a pointer per row plus compile-time offsets (5.4 instead of 6.4 instructions
// a code in the step's SASS; the executed total stayed about the same, as set-up grew, and
// the kernel ran 4-7% faster at M = 1 on q8 and q4 g32: docs/BENCHMARKS.md).
// Where the group scale is applied: SC_WEIGHT on each f16 weight pair; SC_STEP on the f32 sum
// of a 4-chunk step (G a multiple of 4 chunks, or one group a row); SC_CHUNK (M = 1 only) on
// the f32 sum of each lane's chunk, which the mma keeps apart in its own output column.
constexpr int SC_WEIGHT = 0, SC_STEP = 1, SC_CHUNK = 2;

template <int BITS, int MT, int W, int U, int SC, int T, bool PIPE = false>
__device__ __forceinline__ void gemv_tc(const __half* __restrict__ A, const uint8_t* __restrict__ codes,
                                         const __half* __restrict__ scales, __half* __restrict__ Y, int M, int K,
                                         int N, int row_bytes, int groups, int cpg_shift, int swiglu, int bx,
                                         int ldy) {
    constexpr int CH = Fmt<BITS>::CH;
    constexpr bool PLAIN = BITS == 16;  // f16 weights: no table, no scales
    constexpr int CB = CH * BITS / 8;  // bytes a chunk
    constexpr int STEPS = CH / 4;
    constexpr int HALVES = MT / 8;
    constexpr int R = 2 * T;  // weight rows a lane streams: g and g + 8 of each 16-channel tile
    constexpr bool CSIDE = SC != SC_WEIGHT;  // the scale multiplies f32 sums, not f16 weights
    static_assert(SC != SC_CHUNK || MT == 8, "one activation row, spread over the mma's columns");
    auto red = reinterpret_cast<float (*)[16 * T][MT + 1]>(tc_smem);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    const uint32_t lane4 = 4 * lane;
    const uint32_t tbase = static_cast<uint32_t>(__cvta_generic_to_shared(tc_smem));
    const int n0 = bx * 16 * T, m0 = blockIdx.y * MT;
    const uint8_t* rp[R];
    const __half* sp[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        const long long row = min(n0 + 16 * (r >> 1) + g + 8 * (r & 1), N - 1);
        rp[r] = codes + row * row_bytes + q * CB;
        sp[r] = PLAIN ? nullptr : scales + row * groups;
    }
    const uint4* ap[HALVES];
    bool a_ok[HALVES];
#pragma unroll
    for (int h = 0; h < HALVES; h++) {
        if constexpr (SC == SC_CHUNK) {
            // Column 2q of the mma gets row 0's activations at the k of quad q's chunks only, so
            // that column holds the sum over one chunk of each weight row: one group.
            a_ok[h] = g == 2 * q;
            ap[h] = reinterpret_cast<const uint4*>(A + q * CH);
        } else {
            a_ok[h] = m0 + 8 * h + g < M;
            ap[h] = reinterpret_cast<const uint4*>(A + (long long)min(m0 + 8 * h + g, M - 1) * K + q * CH);
        }
    }
    // Two accumulators per tile and half, alternating between mma steps, so that consecutive
    // mmas do not wait on each other.
    float d[2][T][HALVES][4];
#pragma unroll
    for (int p = 0; p < 2; p++)
#pragma unroll
        for (int t = 0; t < T; t++)
#pragma unroll
            for (int h = 0; h < HALVES; h++) d[p][t][h][0] = d[p][t][h][1] = d[p][t][h][2] = d[p][t][h][3] = 0.0f;

    const int nchunks = (K + CH - 1) / CH;
    const int steps_k = (nchunks + 3) / 4;
    // A step (4 chunks of every lane) is FULL when all of it lies inside K: then nothing in
    // it is checked. Only the last step of a row whose K is not a multiple of 4 chunks is not.
    auto step_full = [&](int st) { return (st + 1) * 4 * CH <= K; };
    Chunk ch[U][R];
    // Step st's chunks into buffer j.
    auto load_step = [&](int j, int st) {
        const bool full = step_full(st);
#pragma unroll
        for (int r = 0; r < R; r++) {
            // Every lane of the warp must join the mma, so chunks past K are zeros.
            if (full || st * 4 + q < nchunks) {
                ch[j][r] = load_chunk<BITS>(rp[r] + st * 4 * CB, 0);
            } else {
                ch[j][r].w[0] = ch[j][r].w[1] = ch[j][r].w[2] = ch[j][r].w[3] = 0;
            }
        }
    };
    auto load_round = [&](int it) {
#pragma unroll
        for (int j = 0; j < U; j++) {
            const int st = it + W * j;
            if (st >= steps_k) break;
            load_step(j, st);
        }
    };
    auto step = [&](int j, int st, auto full_tag) {
        constexpr bool FULL = decltype(full_tag)::value;
        const int c = st * 4 + q;
        const int left = K - c * CH;
        // SC_STEP: the scale multiplies sums over all four lanes' chunks, so every lane takes the
        // step's group (lanes past K included); otherwise its own chunk's.
        const int grp = SC == SC_STEP ? (4 * st) >> cpg_shift : (FULL || c < nchunks) ? (c >> cpg_shift) : 0;
        __half sv[R];
        __half2 sh[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            sv[r] = PLAIN ? __float2half_rn(1.0f) : __ldg(sp[r] + grp);
            sh[r] = __half2half2(sv[r]);
        }
        [[maybe_unused]] float acc[2][T][HALVES][4];
        if constexpr (CSIDE) {
#pragma unroll
            for (int p = 0; p < 2; p++)
#pragma unroll
                for (int t = 0; t < T; t++)
#pragma unroll
                    for (int h = 0; h < HALVES; h++)
                        acc[p][t][h][0] = acc[p][t][h][1] = acc[p][t][h][2] = acc[p][t][h][3] = 0.0f;
        }
#pragma unroll
        for (int s2 = 0; s2 < STEPS; s2 += 2) {
            // Eight activations (two mma steps) per 16-byte load; K % 8 == 0, so they are all
            // inside K or all past it.
            uint4 b[HALVES];
#pragma unroll
            for (int h = 0; h < HALVES; h++) {
                b[h] = make_uint4(0, 0, 0, 0);
                if (a_ok[h] && (FULL || 4 * s2 < left)) b[h] = __ldg(ap[h] + (st * 4 * CH + 4 * s2) / 8);
            }
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int s = s2 + e;
#pragma unroll
                for (int t = 0; t < T; t++) {
                    uint32_t a0, a1, a2, a3;
                    tc_pairs<BITS, !CSIDE>(ch[j][2 * t], s, tbase, lane4, sh[2 * t], a0, a2);
                    tc_pairs<BITS, !CSIDE>(ch[j][2 * t + 1], s, tbase, lane4, sh[2 * t + 1], a1, a3);
#pragma unroll
                    for (int h = 0; h < HALVES; h++) {
                        const uint32_t b0 = e ? b[h].z : b[h].x, b1 = e ? b[h].w : b[h].y;
                        if constexpr (CSIDE) {
                            mma_16816(acc[e][t][h], a0, a1, a2, a3, b0, b1);
                        } else {
                            mma_16816(d[e][t][h], a0, a1, a2, a3, b0, b1);
                        }
                    }
                }
            }
        }
        if constexpr (CSIDE) {
#pragma unroll
            for (int t = 0; t < T; t++) {
                const float f0 = __half2float(sv[2 * t]), f1 = __half2float(sv[2 * t + 1]);
#pragma unroll
                for (int h = 0; h < HALVES; h++) {
                    float(&o)[4] = d[j & 1][t][h];
                    o[0] = fmaf(acc[0][t][h][0] + acc[1][t][h][0], f0, o[0]);
                    o[1] = fmaf(acc[0][t][h][1] + acc[1][t][h][1], f0, o[1]);
                    o[2] = fmaf(acc[0][t][h][2] + acc[1][t][h][2], f1, o[2]);
                    o[3] = fmaf(acc[0][t][h][3] + acc[1][t][h][3], f1, o[3]);
                }
            }
        }
    };
    auto run_step = [&](int j, int st) {
        if (step_full(st)) {
            step(j, st, std::true_type{});
        } else {
            step(j, st, std::false_type{});
        }
    };
    // The first round's weights are requested before the table is built, so that building it
    // overlaps their trip from memory.
    if constexpr (PIPE) {
        static_assert(U == 2, "two buffers: one in use, one loading");
        if (warp < steps_k) load_step(0, warp);
    } else {
        load_round(warp);
    }
    if constexpr (PLAIN) {
        __syncthreads();
    } else {
        stage_tc_table<BITS>();
    }
    // Only the codes above were read before this (the launcher overlaps this kernel with the
    // previous one only where they are constant initializers).
    wait_prior_grid();
    if constexpr (PIPE) {
        // The next step's chunks are requested before this one is multiplied, so the warp's
        // loads overlap its own decode instead of waiting for it.
        for (int it = warp; it < steps_k; it += 2 * W) {
            if (it + W < steps_k) load_step(1, it + W);
            run_step(0, it);
            if (it + W >= steps_k) break;
            if (it + 2 * W < steps_k) load_step(0, it + 2 * W);
            run_step(1, it + W);
        }
    } else {
        for (int it = warp; it < steps_k; it += W * U) {
            if (it != warp) load_round(it);
#pragma unroll
            for (int j = 0; j < U; j++) {
                const int st = it + W * j;
                if (st >= steps_k) break;
                run_step(j, st);
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < T; t++)
#pragma unroll
        for (int h = 0; h < HALVES; h++) {
            const int c = 16 * t + g, m = 8 * h + 2 * q;
            red[warp][c][m] = d[0][t][h][0] + d[1][t][h][0];
            red[warp][c][m + 1] = d[0][t][h][1] + d[1][t][h][1];
            red[warp][c + 8][m] = d[0][t][h][2] + d[1][t][h][2];
            red[warp][c + 8][m + 1] = d[0][t][h][3] + d[1][t][h][3];
        }
    __syncthreads();
    // The block's sum for channel c (of its 16 T) and activation row m.
    auto sum_at = [&](int c, int m) {
        float v = 0.0f;
        if constexpr (SC == SC_CHUNK) {
            // Columns 2q hold quad q's chunks; the odd columns are zeros.
#pragma unroll
            for (int w = 0; w < W; w++) v += (red[w][c][0] + red[w][c][2]) + (red[w][c][4] + red[w][c][6]);
        } else {
#pragma unroll
            for (int w = 0; w < W; w++) v += red[w][c][m];
        }
        return v;
    };
    constexpr int MO = SC == SC_CHUNK ? 1 : MT;  // activation rows the block writes
    if (swiglu) {
        // Tile t holds the gate of outputs n0 / 2 + 8 t .. + 7 in its first 8 channels and
        // their up in the next 8 (N % 16 == 0, checked by the host).
        for (int i = threadIdx.x; i < 8 * T * MO; i += blockDim.x) {
            const int j = i / MO, m = i % MO, c = swiglu_row(j);
            if (n0 + c < N && m0 + m < M)
                Y[(long long)(m0 + m) * ldy + (n0 >> 1) + j] = __float2half_rn(silu_mul(sum_at(c, m), sum_at(c + 8, m)));
        }
    } else {
        for (int i = threadIdx.x; i < 16 * T * MO; i += blockDim.x) {
            const int c = i / MO, m = i % MO;
            if (n0 + c < N && m0 + m < M) Y[(long long)(m0 + m) * ldy + n0 + c] = __float2half_rn(sum_at(c, m));
        }
    }
}

// The fused SwiGLU's epilogue where the product came from another path (decode + cuBLAS, the
// prefill kernel, the CUDA-core kernel): y[m, j] = silu(y2[m, gate j]) * y2[m, up j] over a
// [M, 2 half] product, half % 8 == 0. The f16 product was rounded once already, as ORT's
// unfused graph rounds its two MatMul outputs.
template <typename T>
__device__ __forceinline__ void swiglu_combine(const T* __restrict__ y2, T* __restrict__ y, long long total, int half) {
    wait_prior_grid();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long m = i / half;
        const int c = swiglu_row(int(i - m * half));
        const T* row = y2 + m * 2 * half;
        y[i] = from_f<T>(silu_mul(to_f<T>(row[c]), to_f<T>(row[c + 8])));
    }
}
extern "C" __global__ void qins_swiglu_f16(const __half* y2, __half* y, long long total, int half) {
    swiglu_combine<__half>(y2, y, total, half);
}
extern "C" __global__ void qins_swiglu_f32(const float* y2, float* y, long long total, int half) {
    swiglu_combine<float>(y2, y, total, half);
}

// Entry points: qins_gemv_tc_q{bits}_m{MT}_w{W}_u{U}[_t{T}][_p][_cs|_c1] (the launcher's
// `tc_name`), with _p = PIPE (below), _cs = SC_STEP, _c1 = SC_CHUNK, else SC_WEIGHT. Where a
// PIPE kernel replaced one (16 channels up to 8 rows, q4 at 16 rows) and for q6 at 2 tiles,
// the launcher no longer picks these; they stay as scripts/gpu/probe.py's baselines, built
// only with QINS_PROBE_KERNELS (scripts/gpu/stage.sh), not into the library.
// Measured on an H100 at Phi-3.5's shapes (scripts/gpu/probe.py, docs/BENCHMARKS.md):
// - T = 1: for M <= 8, 16 warps (registers capped at 64 for two blocks a multiprocessor) beat
//   8 warps by 0-10%, and 4 chunks in flight a lane no better than 2; MT = 16 needs more
//   registers, so 8 warps.
// - T > 1 (16 T channels a block) where N / 16 would leave a thin last round of blocks or
//   many small ones: the launcher's `tc_tiles` picks T from N and the GPU's multiprocessors.
// - SC_CHUNK at M = 1 gained another 4-5% for q4 g32 with T >= 2, nothing at T = 1.
#define QINS_GEMV_TC_ENTRY(BITS, MT, W, U, T, MINB, CS, PIPE, NAME)                                          \
    extern "C" __global__ void __launch_bounds__(W * 32, MINB)                                                  \
        NAME(const __half* A, const uint8_t* codes, const __half* scales, __half* Y, int M, int K, int N,      \
             int row_bytes, int groups, int cpg_shift, int swiglu) {                                            \
        gemv_tc<BITS, MT, W, U, CS, T, PIPE>(A, codes, scales, Y, M, K, N, row_bytes, groups, cpg_shift, swiglu, \
                                             blockIdx.x, swiglu ? N >> 1 : N);                                \
    }
#define QINS_GEMV_TC(BITS, MT, W, U, T, MINB, CS, NAME) QINS_GEMV_TC_ENTRY(BITS, MT, W, U, T, MINB, CS, false, NAME)
#define QINS_GEMV_TC_P(BITS, MT, W, U, T, MINB, CS, NAME) QINS_GEMV_TC_ENTRY(BITS, MT, W, U, T, MINB, CS, true, NAME)
#define QINS_GEMV_TC_M8(BITS)                                                                      \
    QINS_GEMV_TC(BITS, 8, 16, 2, 1, 2, SC_WEIGHT, qins_gemv_tc_q##BITS##_m8_w16_u2)                \
    QINS_GEMV_TC(BITS, 8, 16, 2, 1, 2, SC_STEP, qins_gemv_tc_q##BITS##_m8_w16_u2_cs)
#define QINS_GEMV_TC_M16(BITS)                                                                     \
    QINS_GEMV_TC(BITS, 16, 8, 2, 1, 2, SC_WEIGHT, qins_gemv_tc_q##BITS##_m16_w8_u2)                \
    QINS_GEMV_TC(BITS, 16, 8, 2, 1, 2, SC_STEP, qins_gemv_tc_q##BITS##_m16_w8_u2_cs)
#define QINS_GEMV_TC_T2(BITS)                                                                      \
    QINS_GEMV_TC(BITS, 8, 16, 1, 2, 2, SC_WEIGHT, qins_gemv_tc_q##BITS##_m8_w16_u1_t2)             \
    QINS_GEMV_TC(BITS, 8, 16, 1, 2, 2, SC_STEP, qins_gemv_tc_q##BITS##_m8_w16_u1_t2_cs)            \
    QINS_GEMV_TC(BITS, 8, 16, 1, 2, 2, SC_CHUNK, qins_gemv_tc_q##BITS##_m8_w16_u1_t2_c1)
// 3 and 4 tiles: q4 only (q8 lost with them, see the launcher's `tc_tiles`). 8 warps, as 16
// would spill at 64 registers.
#define QINS_GEMV_TC_WIDE(BITS)                                                                    \
    QINS_GEMV_TC(BITS, 8, 8, 1, 3, 2, SC_WEIGHT, qins_gemv_tc_q##BITS##_m8_w8_u1_t3)               \
    QINS_GEMV_TC(BITS, 8, 8, 1, 3, 2, SC_STEP, qins_gemv_tc_q##BITS##_m8_w8_u1_t3_cs)              \
    QINS_GEMV_TC(BITS, 8, 8, 1, 3, 2, SC_CHUNK, qins_gemv_tc_q##BITS##_m8_w8_u1_t3_c1)             \
    QINS_GEMV_TC(BITS, 8, 8, 1, 4, 2, SC_WEIGHT, qins_gemv_tc_q##BITS##_m8_w8_u1_t4)               \
    QINS_GEMV_TC(BITS, 8, 8, 1, 4, 2, SC_STEP, qins_gemv_tc_q##BITS##_m8_w8_u1_t4_cs)              \
    QINS_GEMV_TC(BITS, 8, 8, 1, 4, 2, SC_CHUNK, qins_gemv_tc_q##BITS##_m8_w8_u1_t4_c1)

// PIPE: each warp requests its next step before it multiplies the current one. Without it a
// warp's loads and its decode took turns: a copy of the kernel that loads but does not
// multiply ran in 58-65% of the time. Direct times on an H100 (scripts/gpu/probe.py,
// docs/BENCHMARKS.md) against the kernels above, at Phi-3.5's shapes:
// - 16-channel blocks, scale on each pair, M <= 8: q8 and q4 1-5% faster (the scale on the
//   step sum was 1-3% slower than that); q6 0-3% faster at three of four shapes, 0.7% slower
//   at the fourth. 8 warps over 16 rows: q4 2-3% faster, q8 up to 8% slower (q8 keeps those
//   without it).
// - 32-channel blocks of 8 warps (128 registers; 16 warps spill), M = 1: 4-8% faster where
//   the grid is one round of blocks (N = 8192), slower beyond it (16384, 32064). With 48
//   channels they spill and lost (64 spill more).
#define QINS_GEMV_TC_PIPE(BITS)                                                                    \
    QINS_GEMV_TC_P(BITS, 8, 16, 2, 1, 2, SC_WEIGHT, qins_gemv_tc_q##BITS##_m8_w16_u2_p)            \
    QINS_GEMV_TC_P(BITS, 8, 8, 2, 2, 2, SC_CHUNK, qins_gemv_tc_q##BITS##_m8_w8_u2_t2_p_c1)

// What the launcher's `tc_name` picks (its test checks each is here).
QINS_GEMV_TC_M16(8)
QINS_GEMV_TC_M16(6)
QINS_GEMV_TC_T2(8)
QINS_GEMV_TC_T2(4)
QINS_GEMV_TC_WIDE(4)
QINS_GEMV_TC_PIPE(8)
QINS_GEMV_TC_PIPE(4)
QINS_GEMV_TC_P(6, 8, 16, 2, 1, 2, SC_WEIGHT, qins_gemv_tc_q6_m8_w16_u2_p)
QINS_GEMV_TC_P(4, 16, 8, 2, 1, 2, SC_WEIGHT, qins_gemv_tc_q4_m16_w8_u2_p)
#ifdef QINS_PROBE_KERNELS
// probe.py's baselines: the kernels the PIPE ones replaced, and q6 at 2 tiles (slower at
// every shape measured).
QINS_GEMV_TC_M8(8)
QINS_GEMV_TC_M8(6)
QINS_GEMV_TC_M8(4)
QINS_GEMV_TC_M16(4)
QINS_GEMV_TC_T2(6)
#endif

// Mixed nodes (a `float_weight` input, docs/FORMAT.md): Y[M, NF + N] = [A WF^T | A W] in one
// launch. The first ceil(NF / 16) blocks multiply the plain f16 rows of WF [NF, K] with the
// kernel above (BITS = 16: the rows' halves go to the mma as they are), the rest the codes,
// writing from column NF; both with the row stride NF + N. Why: Phi-3.5's packed qkv keeps
// Q and K in f16 and V in QINS, which otherwise costs a cuBLAS launch, the QINS launch and a
// Concat. The QINS part runs in 16-channel blocks with the scale on each pair (the launcher's
// pick for the V width at every format); the float part in blocks of 16 TF channels.
// Contract: as the kernels above, plus NF need not be a multiple of 16 TF (the tile's rows
// past NF are clamped and not written) and WF is 16-byte aligned with K % 8 == 0.
#define QINS_GEMV_TC_MIX(BITS, MT, W, TF, PIPE, NAME)                                                          \
    extern "C" __global__ void __launch_bounds__(W * 32, 2)                                                    \
        NAME(const __half* A, const __half* WF, const uint8_t* codes, const __half* scales, __half* Y, int M,  \
             int K, int NF, int N, int row_bytes, int groups, int cpg_shift) {                                 \
        const int fb = (NF + 16 * TF - 1) / (16 * TF);                                                         \
        if ((int)blockIdx.x < fb) {                                                                            \
            gemv_tc<16, MT, W, 2, SC_WEIGHT, TF, PIPE>(A, reinterpret_cast<const uint8_t*>(WF), nullptr, Y, M, K, \
                                                       NF, 2 * K, 0, 0, 0, blockIdx.x, NF + N);                  \
        } else {                                                                                               \
            gemv_tc<BITS, MT, W, 2, SC_WEIGHT, 1, PIPE>(A, codes, scales, Y + NF, M, K, N, row_bytes, groups,   \
                                                        cpg_shift, 0, blockIdx.x - fb, NF + N);                \
        }                                                                                                      \
    }
// What the launcher takes (`mix_plan`), from direct timings at Phi-3.5's qkv (K = 3072, 6144
// float and 3072 QINS channels; scripts/gpu/probe_mix.py, docs/BENCHMARKS.md): 8 warps, the
// float part in blocks of 32 (_f2) or 48 (_f3) channels, so that each lane streams 4 or 6
// float rows per activation load: q4 g32 at M = 1 took 19.4 us with _w8f2 against 20.2 with
// 16-channel float blocks of 16 warps (the first version, kept as the _m8 baseline); q8 g128
// 20.9 with _w8f3 against 23.2; at M = 16, _f2 22.8 (q4) and 24.9 (q8) against 27.5 and 28.4.
// The launcher's picks (`mix_plan`) are built into the library; probe_mix.py's other
// variants only with QINS_PROBE_KERNELS.
QINS_GEMV_TC_MIX(4, 8, 8, 2, true, qins_gemv_tc_mix_q4_m8_w8f2)
QINS_GEMV_TC_MIX(6, 8, 8, 3, true, qins_gemv_tc_mix_q6_m8_w8f3)
QINS_GEMV_TC_MIX(8, 8, 8, 3, true, qins_gemv_tc_mix_q8_m8_w8f3)
QINS_GEMV_TC_MIX(4, 16, 8, 2, true, qins_gemv_tc_mix_q4_m16_f2)
QINS_GEMV_TC_MIX(6, 16, 8, 2, false, qins_gemv_tc_mix_q6_m16_f2)
QINS_GEMV_TC_MIX(8, 16, 8, 2, false, qins_gemv_tc_mix_q8_m16_f2)
#ifdef QINS_PROBE_KERNELS
#define QINS_GEMV_TC_MIX_PROBE(BITS, PIPE16)                                                      \
    QINS_GEMV_TC_MIX(BITS, 8, 16, 1, true, qins_gemv_tc_mix_q##BITS##_m8)                        \
    QINS_GEMV_TC_MIX(BITS, 16, 8, 1, PIPE16, qins_gemv_tc_mix_q##BITS##_m16)
QINS_GEMV_TC_MIX_PROBE(8, false)
QINS_GEMV_TC_MIX_PROBE(6, false)
QINS_GEMV_TC_MIX_PROBE(4, true)
QINS_GEMV_TC_MIX(4, 8, 8, 3, true, qins_gemv_tc_mix_q4_m8_w8f3)
QINS_GEMV_TC_MIX(6, 8, 8, 2, true, qins_gemv_tc_mix_q6_m8_w8f2)
QINS_GEMV_TC_MIX(8, 8, 8, 2, true, qins_gemv_tc_mix_q8_m8_w8f2)
#endif

// Copies a [M, N] product into columns off .. off + N of a [M, ldy] output: the QINS part of a
// mixed node on the paths that write a dense product (decode + cuBLAS keeps its own stride).
template <typename T>
__device__ __forceinline__ void copy_cols(const T* __restrict__ src, T* __restrict__ y, long long total, int n, int ldy,
                                          int off) {
    wait_prior_grid();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long m = i / n;
        y[m * ldy + off + (i - m * n)] = src[i];
    }
}
extern "C" __global__ void qins_copy_cols_f16(const __half* src, __half* y, long long total, int n, int ldy, int off) {
    copy_cols<__half>(src, y, total, n, ldy, off);
}
extern "C" __global__ void qins_copy_cols_f32(const float* src, float* y, long long total, int n, int ldy, int off) {
    copy_cols<float>(src, y, total, n, ldy, off);
}
