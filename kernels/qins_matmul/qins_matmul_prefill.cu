// QinsMatMul for prefill: Y[M, N] = A[M, K] W[K, N] on the codes, for M past token
// generation (the launcher's `prefill` in provider/src/cuda/qins_matmul/prefill.rs).
//
// Contract
// - A: __half [M, K] row-major, K % 8 == 0, 16-byte aligned; Y: __half [M, N]. codes: uint8
//   [N, row_bytes] (bits 8/6/4, docs/FORMAT.md), scales: __half [N, groups]; G % CH == 0 with
//   G / CH a power of two (`cpg_shift`), or one group a row (`cpg_shift` = 30). The same
//   conditions as the token-generation kernel `gemv_tc`; the host checks.
// - Nothing decoded is written anywhere: every f16 weight pair is decoded in registers from
//   the COMPACT table of qins_tc.cuh (round_f16(LUT[code]) times the group scale, in f16: the
//   weights decode + cuBLAS would multiply) and feeds MB / 8 mmas, one per 8 activation rows,
//   with f32 accumulation.
// - Block: WN x WK warps computing 16 T WN output channels for MB activation rows. Warp
//   (wn, kw) owns channels n0 + 16 (wn T + t) + {g, g + 8}, t < T, and the 4-chunk steps
//   kw, kw + WK, ... of K. A *stage* is WK consecutive steps: the activations A[m0 .. m0 + MB,
//   stage's k] and every warp's codes for it, copied into shared memory by cp.async STAGES - 1
//   stages ahead of their use. The WK partial sums meet in shared memory at the end: no
//   atomics and no state between launches, so the kernel is safe in a CUDA graph.
// - Grid (ceil(N / (16 T WN)), ceil(M / MB), S), channel blocks fastest, so that the blocks
//   running together share their activation rows in L2. S > 1 splits K: block z takes the
//   z-th run of ceil(stages / S) stages and writes f32 partial sums to part[z] ([M, N]), which
//   `qins_gemm_reduce` adds into Y; S = 1 writes Y directly (part null). Splitting gives
//   small grids (N = 3072 is 24 blocks of 128 channels) enough blocks, and short K loops
//   less pipeline start-up each.
// - Dynamic shared memory: Prefill<...>::SMEM bytes, mirrored by `gemm_smem` in the launcher.
// - Both kernels wait_prior_grid() (qins_common.cuh) before their first global read or write.
// - Why: decode into scratch + cuBLAS writes and re-reads 2 bytes a weight on every call
//   (1.3-4x the fp16 time at M = 128-2048 on an H100, docs/BENCHMARKS.md), while here a
//   weight costs ~4 instructions once per MB rows and the codes are read once per row block.
#include "../common/qins_common.cuh"
#include "../common/qins_tc.cuh"

template <int BITS, int MB, int T, int WN, int WK, int STAGES>
struct Prefill {
    static constexpr int CH = Fmt<BITS>::CH;
    static constexpr int CB = CH * BITS / 8;  // bytes a chunk
    static constexpr int KSTEP = 4 * CH;      // k a warp step
    static constexpr int SK = WK * KSTEP;     // k a stage
    // Bytes an activation row takes in a stage: 16 more than its k, so that the 8 rows a warp
    // reads at once start 16 bytes apart in the banks.
    static constexpr int ROWB = 2 * SK + 16;
    static constexpr int ACT = MB * ROWB;
    static constexpr int WARPS = WN * WK;
    static constexpr int CODES = WARPS * 2 * T * 32 * 16;  // 16-byte slot per lane and row (q6 uses 12)
    static constexpr int STAGE = ACT + CODES;
    static constexpr int TABLE = TcTable<BITS, TC_COMPACT>::BYTES;
    // Partial sums of warps kw >= 1: T * MB / 8 * 4 floats a lane.
    static constexpr int SUMS = (WK - 1) * WN * T * MB * 64;
    static constexpr int SMEM = TABLE + (STAGES * STAGE > SUMS ? STAGES * STAGE : SUMS);
};

// 16 bytes at byte `off` of the dynamic shared memory. A C++ load, not asm, so that the
// compiler may issue it early, yet never before the barrier or cp.async wait that guards it.
__device__ __forceinline__ uint4 lds128(uint32_t off) {
    return *reinterpret_cast<const uint4*>(reinterpret_cast<const uint8_t*>(tc_smem) + off);
}

// Slot of 16-byte piece p (8 activations) in its stage row. A lane reads piece
// (q CH + 4 s2) / 8 of its rows: for q4 (CH = 32) quads 0 and 2 would hit the same banks,
// so the second 128 bytes of every 256 are turned by two pieces. q8 and q6 read 8 distinct
// pieces of a row at once already.
template <int BITS>
__device__ __forceinline__ int act_slot(int p) {
    if constexpr (BITS == 4) {
        return p ^ (((p >> 3) & 1) << 1);
    } else {
        return p;
    }
}

// Lane l = 4 g + q: A rows (channels) g and g + 8 of each of the warp's T tiles, B column
// (activation row) g of each 8-row group, chunk q of every 4-chunk step, as in gemv_tc.
template <int BITS, int MB, int T, int WN, int WK, int STAGES>
__device__ __forceinline__ void gemm_tc(const __half* __restrict__ A, const uint8_t* __restrict__ codes,
                                         const __half* __restrict__ scales, __half* __restrict__ Y,
                                         float* __restrict__ part, int M, int K, int N, int row_bytes, int groups,
                                         int cpg_shift) {
    using P = Prefill<BITS, MB, T, WN, WK, STAGES>;
    constexpr int CH = P::CH, CB = P::CB, STEPS = CH / 4, J = MB / 8, R = 2 * T;
    static_assert(STAGES >= 2 && MB % 8 == 0, "a stage in flight while one is used; 8-row groups");
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    const int wn = warp % WN, kw = warp / WN;
    const int n0 = blockIdx.x * 16 * T * WN, m0 = blockIdx.y * MB;
    const uint32_t tbase = static_cast<uint32_t>(__cvta_generic_to_shared(tc_smem));
    const uint32_t sbase = tbase + P::TABLE;
    const uint32_t lane_b = TcTable<BITS, TC_COMPACT>::lane_byte(lane);

    // Weight rows this lane streams (past N: the last row, whose results are not stored).
    int row[R];
#pragma unroll
    for (int r = 0; r < R; r++) row[r] = min(n0 + 16 * (wn * T + (r >> 1)) + g + 8 * (r & 1), N - 1);

    const int nchunks = (K + CH - 1) / CH;
    const int steps_k = (nchunks + 3) / 4;
    // This block's stages: split blockIdx.z of gridDim.z (possibly none, then it writes zeros).
    const int nst_all = (steps_k + WK - 1) / WK;
    const int per = (nst_all + gridDim.z - 1) / gridDim.z;
    const int st0 = blockIdx.z * per, nst = min(nst_all, st0 + per);

    // Stage st into slot (st - st0) % STAGES; past this block's last stage an empty group, so
    // that every thread has committed the same number of groups at every wait. A thread
    // copies the same piece p of rows r0, r0 + RSTEP, ... every stage, so its addresses are
    // set up once.
    constexpr int THREADS = 32 * P::WARPS, PER_ROW = P::SK / 8, RSTEP = THREADS / PER_ROW;
    static_assert(THREADS % PER_ROW == 0 && MB % RSTEP == 0, "a thread's pieces keep their column");
    const int p_own = threadIdx.x % PER_ROW, r0 = threadIdx.x / PER_ROW;
    const __half* a_own = A + (long long)min(m0 + r0, M - 1) * K + 8 * p_own;
    const uint32_t a_dst = r0 * P::ROWB + act_slot<BITS>(p_own) * 16;
    const uint8_t* c_own[R];
#pragma unroll
    for (int r = 0; r < R; r++) c_own[r] = codes + (long long)row[r] * row_bytes + q * CB;
    auto issue = [&](int st) {
        if (st < nst) {
            const uint32_t slot = sbase + ((st - st0) % STAGES) * P::STAGE;
            const bool k_ok = st * P::SK + 8 * p_own < K;
#pragma unroll
            for (int i = 0; i < MB / RSTEP; i++) {
                const bool ok = k_ok && m0 + r0 + i * RSTEP < M;
                const __half* src = a_own + (long long)i * RSTEP * K + st * P::SK;
                cp_async16(slot + a_dst + i * RSTEP * P::ROWB, ok ? src : A, ok);
            }
            const int cs = st * WK + kw;
            const bool ok = cs * 4 + q < nchunks;
            const uint32_t cslot = slot + P::ACT + (warp * R * 32 + lane) * 16;
#pragma unroll
            for (int r = 0; r < R; r++) {
                const uint8_t* src = ok ? c_own[r] + cs * 4 * CB : codes;
                if constexpr (BITS == 6) {
                    // 12-byte chunks: cp.async takes 4, 8 or 16 bytes, and 16 would run past the row.
#pragma unroll
                    for (int i = 0; i < 3; i++) cp_async4(cslot + r * 512 + 4 * i, src + 4 * i, ok);
                } else {
                    cp_async16(cslot + r * 512, src, ok);
                }
            }
        }
        cp_async_commit();
    };
    // Group scales of this lane's chunk of stage st (any group for chunks past the row: their
    // codes are zeros).
    auto load_scales = [&](int st, __half (&sv)[R]) {
        const int c = (st * WK + kw) * 4 + q;
        const int grp = c < nchunks ? c >> cpg_shift : 0;
#pragma unroll
        for (int r = 0; r < R; r++) sv[r] = __ldg(scales + (long long)row[r] * groups + grp);
    };

    // The first stages carry activations: nothing is read before the previous kernel is done.
    wait_prior_grid();
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) issue(st0 + s);
    stage_tc_table<BITS, TC_COMPACT>();

    float acc[T][J][4];
#pragma unroll
    for (int t = 0; t < T; t++)
#pragma unroll
        for (int j = 0; j < J; j++) acc[t][j][0] = acc[t][j][1] = acc[t][j][2] = acc[t][j][3] = 0.0f;
    __half sv[R];
    if (st0 < nst) load_scales(st0, sv);

    for (int st = st0; st < nst; st++) {
        cp_async_wait<STAGES - 2>();
        // Stage st is in every thread's view, and every warp is done with the slot refilled next.
        __syncthreads();
        issue(st + STAGES - 1);
        __half sn[R] = {};
        if (st + 1 < nst) load_scales(st + 1, sn);

        const uint32_t slot = sbase + ((st - st0) % STAGES) * P::STAGE;
        Chunk ch[R];
        __half2 sh[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const uint4 v = lds128(slot - tbase + P::ACT + (warp * R * 32 + lane) * 16 + r * 512);
            ch[r].w[0] = v.x, ch[r].w[1] = v.y, ch[r].w[2] = v.z, ch[r].w[3] = v.w;
            sh[r] = __half2half2(sv[r]);
        }
#pragma unroll
        for (int s2 = 0; s2 < STEPS; s2 += 2) {
            uint32_t a[T][2][4];
#pragma unroll
            for (int t = 0; t < T; t++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    tc_pairs<BITS, true, TC_COMPACT>(ch[2 * t], s2 + e, tbase, lane_b, sh[2 * t], a[t][e][0],
                                                     a[t][e][2]);
                    tc_pairs<BITS, true, TC_COMPACT>(ch[2 * t + 1], s2 + e, tbase, lane_b, sh[2 * t + 1],
                                                     a[t][e][1], a[t][e][3]);
                }
            // Activations k .. k + 7 of this lane's chunk: mma steps s2 and s2 + 1.
            const int p = (kw * P::KSTEP + q * CH) / 8 + s2 / 2;
            const uint32_t b_at = slot - tbase + g * P::ROWB + act_slot<BITS>(p) * 16;
#pragma unroll
            for (int j = 0; j < J; j++) {
                const uint4 b = lds128(b_at + 8 * j * P::ROWB);
#pragma unroll
                for (int t = 0; t < T; t++) mma_16816<false>(acc[t][j], a[t][0][0], a[t][0][1], a[t][0][2], a[t][0][3], b.x, b.y);
#pragma unroll
                for (int t = 0; t < T; t++) mma_16816<false>(acc[t][j], a[t][1][0], a[t][1][1], a[t][1][2], a[t][1][3], b.z, b.w);
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) sv[r] = sn[r];
    }
    cp_async_wait<0>();
    if constexpr (WK > 1) {
        // The stages' memory takes the partial sums of warps kw >= 1, lane fastest.
        __syncthreads();
        float* red = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(tc_smem) + P::TABLE);
        auto at = [&](int w, int t, int j, int i) { return ((((w - 1) * WN + wn) * T + t) * J + j) * 128 + i * 32 + lane; };
        if (kw > 0) {
#pragma unroll
            for (int t = 0; t < T; t++)
#pragma unroll
                for (int j = 0; j < J; j++)
#pragma unroll
                    for (int i = 0; i < 4; i++) red[at(kw, t, j, i)] = acc[t][j][i];
        }
        __syncthreads();
        if (kw > 0) return;
#pragma unroll
        for (int w = 1; w < WK; w++)
#pragma unroll
            for (int t = 0; t < T; t++)
#pragma unroll
                for (int j = 0; j < J; j++)
#pragma unroll
                    for (int i = 0; i < 4; i++) acc[t][j][i] += red[at(w, t, j, i)];
    }
#pragma unroll
    for (int t = 0; t < T; t++) {
        const int c = n0 + 16 * (wn * T + t) + g;
#pragma unroll
        for (int j = 0; j < J; j++) {
            const int m = m0 + 8 * j + 2 * q;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int cc = c + 8 * (i >> 1), mm = m + (i & 1);
                if (cc < N && mm < M) {
                    if (part) {
                        part[((long long)blockIdx.z * M + mm) * N + cc] = acc[t][j][i];
                    } else {
                        Y[(long long)mm * N + cc] = __float2half_rn(acc[t][j][i]);
                    }
                }
            }
        }
    }
}

// Entry points: qins_gemm_tc_q{bits}_m{MB}_t{T}_n{WN}_k{WK}_s{STAGES} (the launcher's
// `CONFIGS`, in this order). MINB: blocks a multiprocessor the registers are budgeted for. Of
// the configurations measured on an H100 (scripts/gpu/probe_prefill.py, docs/BENCHMARKS.md)
// these were the fastest at some Phi-3.5 shape and M in 16..1024; the launcher picks among
// them per call. (128, 2, 2, 4) does not fit a block's shared memory for q4. More stages than
// listed measured no faster, except (64, 2, 4, 2) with 3 instead of 2 (q8 -7%, q4 -1%).
#define QINS_GEMM_TC(BITS, MB, T, WN, WK, STAGES, MINB)                                                        \
    extern "C" __global__ void __launch_bounds__(WN * WK * 32, MINB)                                             \
        qins_gemm_tc_q##BITS##_m##MB##_t##T##_n##WN##_k##WK##_s##STAGES(                                         \
            const __half* A, const uint8_t* codes, const __half* scales, __half* Y, float* part, int M, int K,   \
            int N, int row_bytes, int groups, int cpg_shift) {                                                   \
        gemm_tc<BITS, MB, T, WN, WK, STAGES>(A, codes, scales, Y, part, M, K, N, row_bytes, groups, cpg_shift); \
    }
#define QINS_GEMM_TC_ALL(BITS)                 \
    QINS_GEMM_TC(BITS, 32, 2, 4, 2, 3, 2)      \
    QINS_GEMM_TC(BITS, 64, 2, 4, 1, 2, 2)      \
    QINS_GEMM_TC(BITS, 64, 2, 4, 2, 3, 1)      \
    QINS_GEMM_TC(BITS, 128, 2, 2, 4, 2, 1)     \
    QINS_GEMM_TC(BITS, 128, 2, 4, 1, 2, 1)     \
    QINS_GEMM_TC(BITS, 128, 2, 8, 1, 2, 1)

QINS_GEMM_TC_ALL(8)
QINS_GEMM_TC_ALL(6)
// q4 without (128, 2, 2, 4): its 256-entry table leaves that block more shared memory than
// any GPU gives one (the launcher's `gemm_name` has no name for it); probe_prefill.py's build
// keeps it so that the probe reports it as skipped.
QINS_GEMM_TC(4, 32, 2, 4, 2, 3, 2)
QINS_GEMM_TC(4, 64, 2, 4, 1, 2, 2)
QINS_GEMM_TC(4, 64, 2, 4, 2, 3, 1)
QINS_GEMM_TC(4, 128, 2, 4, 1, 2, 1)
QINS_GEMM_TC(4, 128, 2, 8, 1, 2, 1)
#ifdef QINS_PROBE_KERNELS
QINS_GEMM_TC(4, 128, 2, 2, 4, 2, 1)
#endif

// Split K (gridDim.z > 1 above): Y = f16(sum over the splits of part[z]), part f32
// [splits, M * N]. One thread an output, in split order, so the result does not depend on
// the schedule.
extern "C" __global__ void __launch_bounds__(256) qins_gemm_reduce(const float* __restrict__ part,
                                                                    __half* __restrict__ Y, long long mn, int splits) {
    wait_prior_grid();
    for (long long i = blockIdx.x * 256LL + threadIdx.x; i < mn; i += (long long)gridDim.x * 256) {
        float v = 0.0f;
        for (int z = 0; z < splits; z++) v += part[z * mn + i];
        Y[i] = __float2half_rn(v);
    }
}
