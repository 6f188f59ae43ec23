// PROTOTYPE, not part of the library (build.rs does not compile it; no launcher calls it): a
// Hopper (sm_90a) prefill matmul on wgmma, kept with its probe (research/wgmma-prefill/probe_wgmma.py)
// because its measurements are in docs/BENCHMARKS.md ("A wgmma prefill kernel"). It computes
// the right result (checked against decode + an f32 matmul) but ran slower than decode +
// cuBLAS at M >= 512, so the library does not use it. Build: research/wgmma-prefill/build.sh.
//
// Y[M, N] = A[M, K] W[K, N] with the weights decoded in registers.
// - A: __half [M, K] row-major, K % 8 == 0, 16-byte aligned; Y: __half [M, N]. codes: uint8
//   [N, row_bytes] (bits 8 or 4, docs/FORMAT.md; rows padded to 64 codes), scales: __half
//   [N, groups]; `cpg_shift` as for gemm_tc (group = chunk >> cpg_shift, chunk = 16 codes for
//   q8, 32 for q4). The same arguments as gemm_tc (kernels/qins_matmul/qins_matmul_prefill.cu).
// - Roles are swapped against the usual GEMM: the wgmma's 64 "rows" are 64 output channels,
//   whose f16 weights each thread decodes straight into the A fragment registers (the same
//   table lookups and f16 group-scale multiply as gemm_tc and decode + cuBLAS), and its
//   "columns" are MB activation rows, read by the tensor cores from shared memory (128-byte
//   swizzle, K-major). Nothing decoded is stored anywhere.
// - Block: NW warpgroups, each T tiles of 64 channels, MB activation rows, K in stages of 64:
//   a stage's activations [MB, 64] and codes [64 NW T, 64] come in by cp.async STAGES - 1
//   stages ahead, one __syncthreads a stage. Grid (ceil(N / (64 NW T)), ceil(M / MB), S);
//   S > 1 splits K with f32 partial sums in part[z] ([M, N]), reduced by qins_gemm_reduce.
// - -DWG_NO_DECODE (constant fragments) and -DWG_NO_MMA (no wgmma) build the ablations.
#include "qins_common.cuh"
#include "qins_tc.cuh"

template <int BITS, int MB, int NW, int STAGES>
struct Wg {
    static constexpr int ACT = MB * 128;              // [MB, 64] f16
    static constexpr int CROW = 8 * BITS;             // bytes of a row's codes in a stage
    static constexpr int CODES = 64 * NW * CROW;
    static constexpr int STAGE = ACT + CODES;         // a multiple of 1024: the swizzle's period
    // The code table: one 32-bit word an entry as in qins_tc.cuh, but 8 copies (entry e of
    // copy c at word 8 e + c) instead of one a lane: 8 KiB, so that two blocks fit a
    // multiprocessor; lanes l and l + 8 k share a copy (a conflict only when two of them look
    // up different entries in the same bank row).
    static constexpr int TABLE = 256 * 4 * 8;
    static constexpr int SMEM = TABLE + 1024 + STAGES * STAGE;
    static_assert(STAGE % 1024 == 0 && TABLE % 1024 == 0, "128-byte swizzle needs 1024-byte aligned tiles");
};

// Entry e of copy c at byte 32 e + 4 c: the lookup address is [32 (lane & 7), code, 0, 0] >> 3.
template <int BITS>
__device__ __forceinline__ void stage_small_table() {
    for (int e = threadIdx.x; e < 256; e += blockDim.x) {
        const uint32_t v = tc_table_word<BITS>(e);
        uint4* row = reinterpret_cast<uint4*>(tc_smem) + 2 * e;
        row[0] = row[1] = make_uint4(v, v, v, v);
    }
    __syncthreads();
}

template <int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc);
template <>
__device__ __forceinline__ void wgmma_rs<64>(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
template <>
__device__ __forceinline__ void wgmma_rs<128>(float (&d)[64], const uint32_t (&a)[4], uint64_t desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
template <>
__device__ __forceinline__ void wgmma_rs<192>(float (&d)[96], const uint32_t (&a)[4], uint64_t desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %101, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, {%96, %97, %98, %99}, %100, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
template <>
__device__ __forceinline__ void wgmma_rs<256>(float (&d)[128], const uint32_t (&a)[4], uint64_t desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// cp.async writes through the generic proxy; wgmma reads shared memory through the async one.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps a register live (and unmoved) up to here: the compiler does not know that an issued
// wgmma still reads its A fragment after the asm statement.
__device__ __forceinline__ void keep(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void keep(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
    uint32_t v;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
}
__device__ __forceinline__ uint2 lds64(uint32_t addr) {
    uint2 v;
    asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr));
    return v;
}
// Swizzled 16-byte chunk of row r's codes in a stage (q8: 4 chunks a row, q4: 2), so that the
// 8 rows a warp reads at once fall in distinct banks.
template <int BITS>
__device__ __forceinline__ int code_chunk(int r, int c) {
    if constexpr (BITS == 8) {
        return c ^ ((r >> 1) & 3);
    } else {
        return c ^ ((r >> 2) & 1);
    }
}

// Group scales of a stage for rows srow (scale-row offsets), one per k16 step: one load a
// group, as a stage of 64 codes spans 1 to 4 of them.
template <int BITS, int R>
__device__ __forceinline__ void wg_scales(const __half* __restrict__ scales, const long long (&srow)[R], int st,
                                          int groups, int cpg_shift, __half2 (&sv)[R][4]) {
    int prev = -1;
#pragma unroll
    for (int s = 0; s < 4; s++) {
        const int c = BITS == 8 ? 4 * st + s : 2 * st + (s >> 1);
        const int grp = min(c >> cpg_shift, groups - 1);
#pragma unroll
        for (int i = 0; i < R; i++) sv[i][s] = grp != prev ? __half2half2(__ldg(scales + srow[i] + grp)) : sv[i][s > 0 ? s - 1 : 0];
        prev = grp;
    }
}

// A warp's accumulators of one wgmma tile: acc[4 j + 2 h + b] is channel c_h (c0 or c1),
// activation row m0 + 8 j + 2 q + b. Y in f16, or f32 partial sums of split blockIdx.z.
template <int MB>
__device__ __forceinline__ void wg_store(const float (&acc)[MB / 2], int c0, int c1, int m0, int q, int M, int N,
                                         __half* __restrict__ Y, float* __restrict__ part) {
#pragma unroll
    for (int j = 0; j < MB / 8; j++)
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int b = 0; b < 2; b++) {
                const int c = h ? c1 : c0, m = m0 + 8 * j + 2 * q + b;
                if (c < N && m < M) {
                    const float v = acc[4 * j + 2 * h + b];
                    if (part) {
                        part[((long long)blockIdx.z * M + m) * N + c] = v;
                    } else {
                        Y[(long long)m * N + c] = __float2half_rn(v);
                    }
                }
            }
}

template <int BITS, int MB, int NW, int T, int STAGES>
__device__ __forceinline__ void gemm_wg(const __half* __restrict__ A, const uint8_t* __restrict__ codes,
                                         const __half* __restrict__ scales, __half* __restrict__ Y,
                                         float* __restrict__ part, int M, int K, int N, int row_bytes, int groups,
                                         int cpg_shift) {
    using P = Wg<BITS, MB, NW * T, STAGES>;
    static_assert(BITS == 8 || BITS == 4, "q6 takes gemm_tc");
    constexpr int THREADS = 128 * NW, ROWS = 64 * NW * T, ND = MB / 2, R = 2 * T;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    const int n0 = blockIdx.x * ROWS, m0 = blockIdx.y * MB;
    const uint32_t tbase = static_cast<uint32_t>(__cvta_generic_to_shared(tc_smem));
    const uint32_t sbase = (tbase + P::TABLE + 1023) & ~1023u;
    const uint32_t lane_b = 32u * (lane & 7);

    const int nst_all = (K + 63) / 64;
    const int per = (nst_all + gridDim.z - 1) / gridDim.z;
    const int st0 = blockIdx.z * per, nst = min(nst_all, st0 + per);

    // Copies: activation piece pa (8 halves) of rows ra, ra + THREADS / 8, ...; code piece pc of
    // rows rc, rc + THREADS / PR, ...
    constexpr int PR = BITS / 2, ASTEP = THREADS / 8, CSTEP = THREADS / PR;
    static_assert(MB % ASTEP == 0 && ROWS % CSTEP == 0, "whole rows a round");
    const int pa = threadIdx.x & 7, ra = threadIdx.x >> 3;
    const int pc = threadIdx.x % PR, rc = threadIdx.x / PR;
    auto issue = [&](int st) {
        if (st < nst) {
            const uint32_t slot = sbase + ((st - st0) % STAGES) * P::STAGE;
            const int k = st * 64 + 8 * pa;
#pragma unroll
            for (int i = 0; i < MB / ASTEP; i++) {
                const int r = ra + i * ASTEP;
                const bool ok = k < K && m0 + r < M;
                cp_async16(slot + r * 128 + ((pa ^ (r & 7)) << 4), ok ? A + (long long)(m0 + r) * K + k : A, ok);
            }
#pragma unroll
            for (int i = 0; i < ROWS / CSTEP; i++) {
                const int r = rc + i * CSTEP;
                const long long n = min(n0 + r, N - 1);
                cp_async16(slot + P::ACT + r * P::CROW + (code_chunk<BITS>(r, pc) << 4),
                        codes + n * row_bytes + st * P::CROW + 16 * pc, true);
            }
        }
        cp_async_commit();
    };

    // This thread's channels (block rows): rows g and g + 8 of the A fragment of each of its
    // warpgroup's T tiles of 64.
    int row[R];
    long long srow[R];
#pragma unroll
    for (int i = 0; i < R; i++) {
        row[i] = 64 * (wg * T + (i >> 1)) + 16 * warp + g + 8 * (i & 1);
        srow[i] = (long long)min(n0 + row[i], N - 1) * groups;
    }
    auto load_scales = [&](int st, __half2 (&sv)[R][4]) { wg_scales<BITS, R>(scales, srow, st, groups, cpg_shift, sv); };
    // Byte selectors: this lane's codes 2q, 2q + 1 (q8: in the word at 4 (q >> 1), bytes
    // 2 (q & 1) and + 1; q4: byte q of each 8-byte k16 step).
    const uint32_t sel_a = 0x5504 | ((BITS == 8 ? 2 * (q & 1) : q) << 4);
    const uint32_t sel_b = 0x5504 | ((2 * (q & 1) + 1) << 4);
    auto look = [&](uint32_t w, uint32_t sel) { return tc_lookup(tbase, __byte_perm(w, lane_b, sel) >> 3); };

    // Pipeline: loads run STAGES - 1 stages ahead. Within a stage each k16 step is decoded
    // while the previous step's wgmmas run; the stage ends by waiting for its wgmmas, so the
    // barrier that follows frees its slot. (Carrying wgmmas across that barrier with a second
    // set of fragment registers made ptxas serialise them, C7513.)
    wait_prior_grid();
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) issue(st0 + s);
    stage_small_table<BITS>();

    float acc[T][ND];
#pragma unroll
    for (int t = 0; t < T; t++)
#pragma unroll
        for (int i = 0; i < ND; i++) acc[t][i] = 0.0f;
    __half2 sv[R][4];
    if (st0 < nst) load_scales(st0, sv);

    for (int st = st0; st < nst; st++) {
        cp_async_wait<STAGES - 2>();
        fence_proxy_async();
        __syncthreads();
        issue(st + STAGES - 1);
        __half2 sn[R][4];
        if (st + 1 < nst) load_scales(st + 1, sn);

        const uint32_t slot = sbase + ((st - st0) % STAGES) * P::STAGE;
        uint32_t a[4][T][4];
#pragma unroll
        for (int s = 0; s < 4; s++) {
#pragma unroll
            for (int i = 0; i < R; i++) {
                const uint32_t crow = slot + P::ACT + row[i] * P::CROW;
                uint32_t p01, p23;
                if constexpr (BITS == 8) {
                    const uint32_t at = crow + (code_chunk<8>(row[i], s) << 4) + 4 * (q >> 1);
                    const uint32_t u0 = lds32(at), u1 = lds32(at + 8);
                    p01 = __byte_perm(look(u0, sel_a), look(u0, sel_b), 0x5410);
                    p23 = __byte_perm(look(u1, sel_a), look(u1, sel_b), 0x5410);
                } else {
                    const uint2 u = lds64(crow + (code_chunk<4>(row[i], s >> 1) << 4) + 8 * (s & 1));
                    p01 = look(u.x, sel_a);
                    p23 = look(u.y, sel_a);
                }
                a[s][i >> 1][i & 1] = scaled<true>(p01, sv[i][s]);
                a[s][i >> 1][2 + (i & 1)] = scaled<true>(p23, sv[i][s]);
#ifdef WG_NO_DECODE
                a[s][i >> 1][i & 1] = a[s][i >> 1][2 + (i & 1)] = 0x3c003c00u + (uint32_t)st;
#endif
            }
#ifdef WG_NO_MMA
            acc[0][s] += __uint_as_float(a[s][0][0] ^ a[s][0][1] ^ a[s][0][2] ^ a[s][0][3]);
#else
            wgmma_fence();
#pragma unroll
            for (int t = 0; t < T; t++) wgmma_rs<MB>(acc[t], a[s][t], smem_desc(slot + 32 * s));
            wgmma_commit();
#endif
        }
        wgmma_wait<0>();
#pragma unroll
        for (int s = 0; s < 4; s++)
#pragma unroll
            for (int t = 0; t < T; t++)
#pragma unroll
                for (int i = 0; i < 4; i++) keep(a[s][t][i]);
#pragma unroll
        for (int i = 0; i < R; i++)
#pragma unroll
            for (int s = 0; s < 4; s++) sv[i][s] = sn[i][s];
    }
    cp_async_wait<0>();
#pragma unroll
    for (int t = 0; t < T; t++)
#pragma unroll
        for (int i = 0; i < ND; i++) keep(acc[t][i]);

#pragma unroll
    for (int t = 0; t < T; t++) wg_store<MB>(acc[t], n0 + row[2 * t], n0 + row[2 * t + 1], m0, q, M, N, Y, part);
}

#ifndef WG_NO_ENTRIES  // gemm_wgmma_tma.cu takes the helpers only
#define QINS_GEMM_WG(BITS, MB, NW, T, STAGES, MINB)                                                        \
    extern "C" __global__ void __launch_bounds__(NW * 128, MINB)                                                \
        qins_gemm_wg_q##BITS##_m##MB##_w##NW##_t##T##_s##STAGES(const __half* A, const uint8_t* codes,             \
                                                                 const __half* scales, __half* Y, float* part,     \
                                                                 int M, int K, int N, int row_bytes, int groups,   \
                                                                 int cpg_shift) {                                  \
        gemm_wg<BITS, MB, NW, T, STAGES>(A, codes, scales, Y, part, M, K, N, row_bytes, groups, cpg_shift);       \
    }
#define QINS_GEMM_WG_ALL(BITS)             \
    QINS_GEMM_WG(BITS, 128, 1, 1, 3, 3)    \
    QINS_GEMM_WG(BITS, 256, 1, 1, 3, 2)    \
    QINS_GEMM_WG(BITS, 128, 2, 1, 4, 1)    \
    QINS_GEMM_WG(BITS, 64, 2, 2, 4, 1)     \
    QINS_GEMM_WG(BITS, 128, 2, 2, 3, 1)    \
    QINS_GEMM_WG(BITS, 128, 1, 2, 4, 2)
QINS_GEMM_WG_ALL(8)
QINS_GEMM_WG_ALL(4)
#endif
