// Tensor-core helpers shared by the token-generation kernel (qins_matmul.cu, `gemv_tc`) and
// the prefill kernel (qins_matmul_prefill.cu, `gemm_tc`): the per-lane code table in shared
// memory, codes to f16 mma fragments, and the mma itself.
//
// Contract
// - The table lives at the start of the kernel's dynamic shared memory (`tc_smem`) and holds,
//   per code (bits 8/6) or per byte (bits 4: both of its weights), one 32-bit word of two f16:
//   round_f16(LUT[code]) twice (bits 8/6), or the byte's low-nibble weight then its
//   high-nibble weight (bits 4). One copy per lane, so that 32 random lookups never share a
//   bank.
// - Two layouts, by `SHIFT`: entry e of lane l at byte (e * 256 + 4 l) >> 0 (SPREAD: 256 B a
//   row, half of it unused, 64 KiB for 256 entries; the address of a byte-aligned code is one
//   byte permute, [4 l, code, 0, 0]) or at (e * 256 + 8 l) >> 1 = e * 128 + 4 l (COMPACT:
//   32 KiB; one shift more a lookup). gemv_tc is bound by instructions a code and takes the
//   first; gemm_tc reuses each decoded weight for many rows and needs the shared memory for
//   its activation tiles, so it takes the second.
#pragma once
#include "qins_common.cuh"

constexpr int TC_SPREAD = 0, TC_COMPACT = 1;

template <int BITS, int SHIFT = TC_SPREAD>
struct TcTable {
    static constexpr int ENTRIES = BITS == 6 ? 64 : 256;
    static constexpr int ROW = 256 >> SHIFT;  // bytes an entry
    static constexpr int BYTES = ENTRIES * ROW;
    // Byte 0 of the permuted address: this lane's offset before the shift.
    static __device__ __forceinline__ uint32_t lane_byte(int lane) { return (4u << SHIFT) * lane; }
};
extern __shared__ __align__(16) uint32_t tc_smem[];

// Table entry e: two f16 as one word (see the contract).
template <int BITS>
__device__ __forceinline__ uint32_t tc_table_word(int e) {
    const float* lut = Fmt<BITS>::lut();
    uint32_t lo, hi;
    if constexpr (BITS == 4) {
        // Byte e holds two codes: the low nibble is the earlier k.
        lo = __half_as_ushort(__float2half_rn(lut[e & 15]));
        hi = __half_as_ushort(__float2half_rn(lut[e >> 4]));
    } else {
        lo = hi = __half_as_ushort(__float2half_rn(lut[e]));
    }
    return lo | (hi << 16);
}

// One thread an entry: one conversion, then the row's eight 16-byte pieces (four lanes'
// copies each), started at piece e % 8 so that the 8 lanes of a store phase hit distinct
// banks. (Converting per piece, as first written, took 20 instructions per 16-byte store.)
template <int BITS, int SHIFT = TC_SPREAD>
__device__ __forceinline__ void stage_tc_table() {
    for (int e = threadIdx.x; e < TcTable<BITS, SHIFT>::ENTRIES; e += blockDim.x) {
        const uint32_t v = tc_table_word<BITS>(e);
        uint4* row = reinterpret_cast<uint4*>(tc_smem) + e * (TcTable<BITS, SHIFT>::ROW / 16);
#pragma unroll
        for (int i = 0; i < 8; i++) row[(i + e) & 7] = make_uint4(v, v, v, v);
    }
    __syncthreads();
}

// Word at byte `off` of the table at shared address `base`: through a generic pointer the
// compiler also re-masked the offset on every lookup. The add stays (ptxas does not fold the
// base into the load's offset); a variant with the base as an immediate ran no faster.
__device__ __forceinline__ uint32_t tc_lookup(uint32_t base, uint32_t off) {
    uint32_t v;
    asm("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(base + off));
    return v;
}

// Offset (before the layout's shift) of byte I of w in the table: [lane byte, byte I, 0, 0].
template <int I>
__device__ __forceinline__ uint32_t byte_addr(uint32_t w, uint32_t lane_b) {
    return __byte_perm(w, lane_b, 0x5504 | (I << 4));
}

template <bool SCALE>
__device__ __forceinline__ uint32_t scaled(uint32_t a, __half2 s) {
    if constexpr (SCALE) {
        __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), s);
        return *reinterpret_cast<uint32_t*>(&r);
    } else {
        return a;
    }
}

// The A-fragment words of mma step `s` of one row's chunk: (codes 4s, 4s+1) and
// (codes 4s+2, 4s+3) as f16 pairs, times `sc` unless the scale is applied to the sum.
// `lane_b`: TcTable<BITS, SHIFT>::lane_byte(lane).
template <int BITS, bool SCALE, int SHIFT = TC_SPREAD>
__device__ __forceinline__ void tc_pairs(const Chunk& ch, int s, uint32_t tbase, uint32_t lane_b, __half2 sc,
                                         uint32_t& p01, uint32_t& p23) {
    auto look = [&](uint32_t off) { return tc_lookup(tbase, off >> SHIFT); };
    if constexpr (BITS == 16) {
        // Already f16 pairs in k order; plain weights carry no scale.
        p01 = ch.w[2 * s];
        p23 = ch.w[2 * s + 1];
    } else if constexpr (BITS == 8) {
        const uint32_t w = ch.w[s];
        const uint32_t v0 = look(byte_addr<0>(w, lane_b)), v1 = look(byte_addr<1>(w, lane_b));
        const uint32_t v2 = look(byte_addr<2>(w, lane_b)), v3 = look(byte_addr<3>(w, lane_b));
        p01 = scaled<SCALE>(__byte_perm(v0, v1, 0x5410), sc);
        p23 = scaled<SCALE>(__byte_perm(v2, v3, 0x5410), sc);
    } else if constexpr (BITS == 4) {
        const uint32_t w = ch.w[s >> 1];
        if (s & 1) {
            p01 = scaled<SCALE>(look(byte_addr<2>(w, lane_b)), sc);
            p23 = scaled<SCALE>(look(byte_addr<3>(w, lane_b)), sc);
        } else {
            p01 = scaled<SCALE>(look(byte_addr<0>(w, lane_b)), sc);
            p23 = scaled<SCALE>(look(byte_addr<1>(w, lane_b)), sc);
        }
    } else {
        uint32_t v[4];
#pragma unroll
        for (int i = 0; i < 4; i++) v[i] = look((code_of<6>(ch, 4 * s + i) << 8) | lane_b);
        p01 = scaled<SCALE>(__byte_perm(v[0], v[1], 0x5410), sc);
        p23 = scaled<SCALE>(__byte_perm(v[2], v[3], 0x5410), sc);
    }
}

// VOLATILE keeps the mmas in program order (gemv_tc, measured that way); without it the
// compiler may move them among the loads that feed them (gemm_tc, where an in-order mma after
// each shared-memory load waited out the load's latency).
template <bool VOLATILE = true>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
    if constexpr (VOLATILE) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}
