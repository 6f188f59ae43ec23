// Shared by every QINS kernel: the code formats of docs/FORMAT.md, read on the GPU.
//
// Contract
// - The magnitude tables are NOT computed here. The host copies `qins::codec::Format::lut()`
//   (the one definition of the format) into `qins_lut{8,6,4}` of each module once, when it
//   loads the module, so a GPU decode is the CPU decode: LUT[code] * scale.
// - A *chunk* is the run of consecutive codes one thread reads with one access:
//   q8 16 codes (16 bytes), q6 16 codes (12 bytes, three 32-bit words), q4 32 codes
//   (16 bytes), f32 4 values (16 bytes). Packed rows are `row_bytes` long, a multiple of 16
//   (q6: 48), so a chunk never leaves its row; codes past K are 0 and decode to 0.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

__constant__ float qins_lut8[256];
__constant__ float qins_lut6[64];
__constant__ float qins_lut4[16];

template <int BITS>
struct Fmt;
template <>
struct Fmt<8> {
    static constexpr int CH = 16, LUT = 256;
    static __device__ __forceinline__ const float* lut() { return qins_lut8; }
};
template <>
struct Fmt<6> {
    static constexpr int CH = 16, LUT = 64;
    static __device__ __forceinline__ const float* lut() { return qins_lut6; }
};
template <>
struct Fmt<4> {
    static constexpr int CH = 32, LUT = 16;
    static __device__ __forceinline__ const float* lut() { return qins_lut4; }
};
// Plain f16 weights (the float part of a mixed node, docs/FORMAT.md): rows of K halves, no
// scale, no table; 8 of them a 16-byte chunk. Only the tensor-core token kernel reads them.
template <>
struct Fmt<16> {
    static constexpr int CH = 8, LUT = 0;
    static __device__ __forceinline__ const float* lut() { return nullptr; }
};
// bits = 32: z kept as a float, [N, K] with no padding; one f32 scale per output channel.
template <>
struct Fmt<32> {
    static constexpr int CH = 4, LUT = 1;
    static __device__ __forceinline__ const float* lut() { return nullptr; }
};

// Raw bits of one chunk.
struct Chunk {
    uint32_t w[4];
};

// Loads chunk `c` of a packed row (bits 4/6/8). The row is 16-byte aligned (q6: 4-byte).
template <int BITS>
__device__ __forceinline__ Chunk load_chunk(const uint8_t* __restrict__ row, int c) {
    Chunk r;
    if constexpr (BITS == 6) {
        const uint32_t* p = reinterpret_cast<const uint32_t*>(row + 12 * c);
        r.w[0] = __ldg(p);
        r.w[1] = __ldg(p + 1);
        r.w[2] = __ldg(p + 2);
        r.w[3] = 0;
    } else {
        uint4 v = __ldg(reinterpret_cast<const uint4*>(row) + c);
        r.w[0] = v.x;
        r.w[1] = v.y;
        r.w[2] = v.z;
        r.w[3] = v.w;
    }
    return r;
}

// Chunk `c` of weight row `n`, any format. bits = 32 rows are K floats with no padding:
// 16-byte loads only where every row allows them (K % 4 == 0), and z = 1 (weight 0) past K.
template <int BITS>
__device__ __forceinline__ Chunk load_row_chunk(const uint8_t* __restrict__ codes, long long n, int c, int K,
                                                int row_bytes) {
    if constexpr (BITS == 32) {
        const float* row = reinterpret_cast<const float*>(codes) + n * K;
        const int k0 = c * 4;
        Chunk r;
        if ((K & 3) == 0) {
            float4 v = __ldg(reinterpret_cast<const float4*>(row + k0));
            r.w[0] = __float_as_uint(v.x), r.w[1] = __float_as_uint(v.y);
            r.w[2] = __float_as_uint(v.z), r.w[3] = __float_as_uint(v.w);
        } else {
#pragma unroll
            for (int i = 0; i < 4; i++) r.w[i] = k0 + i < K ? __float_as_uint(__ldg(row + k0 + i)) : 0x3f800000u;
        }
        return r;
    } else {
        return load_chunk<BITS>(codes + n * row_bytes, c);
    }
}

// Code `i` (compile-time after unrolling) of a chunk of a packed format.
template <int BITS>
__device__ __forceinline__ uint32_t code_of(const Chunk& ch, int i) {
    if constexpr (BITS == 8) {
        return (ch.w[i >> 2] >> (8 * (i & 3))) & 0xffu;
    } else if constexpr (BITS == 4) {
        return (ch.w[i >> 3] >> (4 * (i & 7))) & 0xfu;
    } else {
        // The row is a little-endian bit stream with code k at bit 6k.
        const int bit = 6 * i, word = bit >> 5, off = bit & 31;
        uint32_t v = ch.w[word] >> off;
        if (off > 26) v |= ch.w[word + 1] << (32 - off);
        return v & 0x3fu;
    }
}

// D(z) / s for bits = 32: sign(z) (1/|z| - 1). z = +-1 gives exactly 0.
__device__ __forceinline__ float f32_value(uint32_t bits) {
    const float z = __uint_as_float(bits);
    return copysignf(__frcp_rn(fabsf(z)) - 1.0f, z);
}

// The fused SwiGLU epilogue, `silu(g) * u` = g / (1 + e^-g) * u in f32: mirrors
// `qins::codec::silu_mul`. Output j of the fused op reads stored channels
// 16 (j / 8) + j % 8 (gate) and that + 8 (up) (`qins::codec::swiglu_row`).
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }
__device__ __forceinline__ int swiglu_row(int j) { return 16 * (j >> 3) + (j & 7); }

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

// Scale of group `g` of row `n`: f16 for packed formats, f32 for bits = 32.
template <int BITS>
__device__ __forceinline__ float scale_at(const void* __restrict__ scales, long long idx) {
    if constexpr (BITS == 32) {
        return __ldg(reinterpret_cast<const float*>(scales) + idx);
    } else {
        return __half2float(__ldg(reinterpret_cast<const __half*>(scales) + idx));
    }
}

// cp.async (sm_80+): 16 or 4 bytes from global into shared memory, in commit groups.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    // src-size 0 fills the 16 bytes with zeros (rows past M, k past K, chunks past the row).
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}
// Programmatic dependent launch (sm_90+; the launcher's `After::Overlap`): a kernel's blocks may
// start as the previous kernel's blocks exit, before its writes are visible. This waits until
// that kernel has completed and flushed. Before it a kernel touches only what no kernel writes:
// the module's tables, and the weights where the launcher has checked that they are constant
// initializers (gemv_tc). Without the launch attribute, and below sm_90, it does nothing.
// Once past the wait, a block also lets the next kernel launch (launch_dependents): its blocks
// then take multiprocessors as this kernel's blocks leave them and do their own pre-wait work
// (gemv_tc: request weights) during this kernel's last round, instead of after it. The
// trigger takes effect only when every block of this grid has given it (or exited), so they
// never take room this grid still needs, and being after the wait, at most two grids of a
// chain are in flight.
__device__ __forceinline__ void wait_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Copies the format's table from constant to shared memory: lookups with a different index
// in every lane would serialise on the constant cache.
template <int BITS>
__device__ __forceinline__ void stage_lut(float* lut) {
    if constexpr (BITS != 32) {
        for (int i = threadIdx.x; i < Fmt<BITS>::LUT; i += blockDim.x) lut[i] = Fmt<BITS>::lut()[i];
    }
    __syncthreads();
}
