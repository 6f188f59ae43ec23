// PROTOTYPE, not part of the library: gemm_wgmma.cu's decode-into-wgmma kernel with the
// loads of a Hopper GEMM instead of cp.async and a block barrier a stage. One producer thread
// issues TMA copies (activations through a 128-byte-swizzled tensor map, codes through a plain
// one) into a ring of STAGES slots, signalled by mbarriers (full: bytes arrived; empty: every
// consumer warp is done with the slot); NC consumer warpgroups each decode 64 channels and run
// their wgmmas on the shared activation tile, never waiting for one another. Same result and
// arguments as gemm_wg except the two tensor maps (CUtensorMap in global memory, built by the
// probe with cuTensorMapEncodeTiled): A [M, K] f16, box [64, MB], 128-byte swizzle; codes
// [N, row_bytes] u8, box [8 BITS, 64 NC], no swizzle. Probe: research/wgmma-prefill/probe_wgmma.py
// (WG_TMA=1); results in docs/BENCHMARKS.md ("A wgmma prefill kernel"). Also unlike gemm_wg:
// each consumer decodes stage st + 1 while stage st's wgmmas run, q4 decodes from registers
// (no shared-memory table), and setmaxnreg moves registers from the producer to the consumers.
#define WG_NO_ENTRIES
#include "gemm_wgmma.cu"

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
    asm volatile(
        "{\n.reg .pred P1;\nLAB_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
        "@P1 bra DONE;\nbra LAB_WAIT;\nDONE:\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void tma_2d(uint32_t dst, const void* tmap, int x, int y, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
        "l"(tmap), "r"(x), "r"(y), "r"(bar)
        : "memory");
}

template <int BITS, int MB, int NC, int STAGES>
__device__ __forceinline__ void gemm_wg_tma(const void* tmap_a, const void* tmap_c, const __half* __restrict__ scales,
                                             __half* __restrict__ Y, float* __restrict__ part, int M, int K, int N,
                                             int groups, int cpg_shift) {
    using P = Wg<BITS, MB, NC, STAGES>;
    static_assert(BITS == 8 || BITS == 4, "q8 and q4");
    constexpr int ROWS = 64 * NC, ND = MB / 2;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    const int n0 = blockIdx.x * ROWS, m0 = blockIdx.y * MB;
    const uint32_t tbase = static_cast<uint32_t>(__cvta_generic_to_shared(tc_smem));
    const uint32_t sbase = (tbase + P::TABLE + 1023) & ~1023u;
    const uint32_t bars = sbase + STAGES * P::STAGE;  // full[s] at bars + 8 s, empty[s] at bars + 8 (STAGES + s)
    const uint32_t lane_b = 32u * (lane & 7);

    const int nst_all = (K + 63) / 64;
    const int per = (nst_all + gridDim.z - 1) / gridDim.z;
    const int st0 = blockIdx.z * per, nst = min(nst_all, st0 + per);

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(bars + 8 * s, 1);
            mbar_init(bars + 8 * (STAGES + s), 4 * NC);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    wait_prior_grid();
    stage_small_table<BITS>();  // ends with __syncthreads: the barriers are initialised too

    if (wg == 0) {
        // The producer needs few registers; the consumers take the rest (the accumulators).
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (threadIdx.x == 0) {
            for (int st = st0, i = 0; st < nst; st++, i++) {
                const int slot = i % STAGES;
                if (i >= STAGES) mbar_wait(bars + 8 * (STAGES + slot), ((i / STAGES) - 1) & 1);
                const uint32_t full = bars + 8 * slot, dst = sbase + slot * P::STAGE;
                mbar_expect_tx(full, P::STAGE);
                tma_2d(dst, tmap_a, st * 64, m0, full);
                tma_2d(dst + P::ACT, tmap_c, st * P::CROW, n0, full);
            }
        }
        return;
    }
    constexpr int CREGS = ((65536 - 128 * 40) / (128 * NC)) & ~7;
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CREGS < 256 ? CREGS : 256) : "memory");
    const int cw = wg - 1;
    int row[2];
    long long srow[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        row[h] = 64 * cw + 16 * warp + g + 8 * h;
        srow[h] = (long long)min(n0 + row[h], N - 1) * groups;
    }
    auto load_scales = [&](int st, __half2 (&sv)[2][4]) { wg_scales<BITS, 2>(scales, srow, st, groups, cpg_shift, sv); };
    // q4 decodes without the shared table: the 8 magnitudes' f16 low and high bytes sit in
    // four registers, a byte permute looks up four codes at once, and the sign (bit 3 of a
    // code) goes straight into the high byte. Shared memory is then left to the wgmmas'
    // activation reads and the TMA writes, which it was short of.
    uint32_t rlo[2] = {0, 0}, rhi[2] = {0, 0};
    if constexpr (BITS == 4) {
#pragma unroll
        for (int m = 0; m < 8; m++) {
            const uint32_t h = __half_as_ushort(__float2half_rn(Fmt<4>::lut()[m]));
            rlo[m >> 2] |= (h & 0xffu) << (8 * (m & 3));
            rhi[m >> 2] |= (h >> 8) << (8 * (m & 3));
        }
    }
    const uint32_t sel_g = q | ((q + 4) << 4);
    const uint32_t sel_a = 0x5504 | ((BITS == 8 ? 2 * (q & 1) : q) << 4);
    const uint32_t sel_b = 0x5504 | ((2 * (q & 1) + 1) << 4);
    auto look = [&](uint32_t w, uint32_t sel) { return tc_lookup(tbase, __byte_perm(w, lane_b, sel) >> 3); };

    float acc[ND];
#pragma unroll
    for (int i = 0; i < ND; i++) acc[i] = 0.0f;
    __half2 sv[2][4];
    if (st0 < nst) load_scales(st0, sv);
    // The next stage is decoded while this stage's wgmmas run: decode(st + 1) sits between
    // the issue of stage st's wgmmas and the wait<0> that retires them, and writes the other
    // set of fragment registers. (Waiting with wait<1> instead made ptxas serialise the
    // wgmmas, C7513: it cannot tell which group a wait<1> retires.)
    auto decode = [&](int st, int i, uint32_t (&a)[4][4]) {
        __half2 sn[2][4];
        if (st + 1 < nst) load_scales(st + 1, sn);
        const int slot = i % STAGES;
        mbar_wait(bars + 8 * slot, (i / STAGES) & 1);
        const uint32_t sl = sbase + slot * P::STAGE;
#pragma unroll
        for (int s = 0; s < 4; s++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const uint32_t crow = sl + P::ACT + row[h] * P::CROW;
                uint32_t p01, p23;
                if constexpr (BITS == 8) {
                    const uint32_t at = crow + 16 * s + 4 * (q >> 1);
                    const uint32_t u0 = lds32(at), u1 = lds32(at + 8);
                    p01 = __byte_perm(look(u0, sel_a), look(u0, sel_b), 0x5410);
                    p23 = __byte_perm(look(u1, sel_a), look(u1, sel_b), 0x5410);
                } else {
                    const uint2 u = lds64(crow + 8 * s);
                    // Byte q of each word: codes 2q, 2q + 1 and 2q + 8, 2q + 9 of the k16 step.
                    const uint32_t gq = __byte_perm(u.x, u.y, sel_g), sel = gq & 0x7777u;
                    const uint32_t l4 = __byte_perm(rlo[0], rlo[1], sel);
                    const uint32_t h4 = __byte_perm(rhi[0], rhi[1], sel) | (__byte_perm(gq << 4, gq, 0x5140) & 0x80808080u);
                    p01 = __byte_perm(l4, h4, 0x5140);
                    p23 = __byte_perm(l4, h4, 0x7362);
                }
                a[s][h] = scaled<true>(p01, sv[h][s]);
                a[s][2 + h] = scaled<true>(p23, sv[h][s]);
#ifdef WG_NO_DECODE
                a[s][h] = a[s][2 + h] = 0x3c003c00u + (uint32_t)st;
#endif
            }
        }
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int s = 0; s < 4; s++) sv[h][s] = sn[h][s];
    };
    auto mma = [&](int i, uint32_t (&a)[4][4]) {
        const uint32_t sl = sbase + (i % STAGES) * P::STAGE;
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < 4; s++) wgmma_rs<MB>(acc, a[s], smem_desc(sl + 32 * s));
        wgmma_commit();
    };
    auto release = [&](int i) {
        wgmma_wait<0>();
        __syncwarp();
        if (lane == 0) mbar_arrive(bars + 8 * (STAGES + i % STAGES));
    };
    uint32_t a0[4][4], a1[4][4];
    if (st0 < nst) decode(st0, 0, a0);
    for (int st = st0, i = 0; st < nst; st += 2, i += 2) {
        mma(i, a0);
        if (st + 1 < nst) decode(st + 1, i + 1, a1);
        release(i);
        if (st + 1 < nst) {
            mma(i + 1, a1);
            if (st + 2 < nst) decode(st + 2, i + 2, a0);
            release(i + 1);
        }
    }
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < ND; i++) keep(acc[i]);
    wg_store<MB>(acc, n0 + row[0], n0 + row[1], m0, q, M, N, Y, part);
}

// Dynamic shared memory: Wg<BITS, MB, NC, STAGES>::SMEM + 16 STAGES (the barriers).
#define QINS_GEMM_WG_TMA(BITS, MB, NC, STAGES)                                                                   \
    extern "C" __global__ void __launch_bounds__((NC + 1) * 128, 1) qins_gemm_wgt_q##BITS##_m##MB##_c##NC##_s##STAGES( \
        const void* tmap_a, const void* tmap_c, const __half* scales, __half* Y, float* part, int M, int K, int N,   \
        int groups, int cpg_shift) {                                                                              \
        gemm_wg_tma<BITS, MB, NC, STAGES>(tmap_a, tmap_c, scales, Y, part, M, K, N, groups, cpg_shift);            \
    }
#define QINS_GEMM_WG_TMA_ALL(BITS)       \
    QINS_GEMM_WG_TMA(BITS, 128, 2, 6)    \
    QINS_GEMM_WG_TMA(BITS, 256, 2, 4)    \
    QINS_GEMM_WG_TMA(BITS, 256, 2, 5)    \
    QINS_GEMM_WG_TMA(BITS, 192, 2, 5)    \
    QINS_GEMM_WG_TMA(BITS, 128, 3, 5)    \
    QINS_GEMM_WG_TMA(BITS, 192, 3, 4)
QINS_GEMM_WG_TMA_ALL(4)
QINS_GEMM_WG_TMA_ALL(8)
