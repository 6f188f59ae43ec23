//! The kernels' primitives, once per instruction set, on vectors of 16 f32 lanes.
//!
//! The kernels (in `kernels.rs`) are written once, generic over [`Simd`], and compiled once
//! per implementation inside a `#[target_feature]` function; the primitives are `#[inline]`
//! with the same features, so the whole loop nest ends up in one function using the wider
//! registers. One binary thus runs on any x86-64 (and any other target, through
//! [`Portable`]) and picks the best variant at run time ([`Isa::best`], `qins::isa`).
//!
//! Every implementation computes the same bits: decoding is exact (a table lookup, one
//! multiply by the scale), accumulation is lane-wise with fused multiply-adds in a fixed
//! order, and [`Simd::hsum`] adds the 16 lanes in one fixed tree. [`Portable`] spells that
//! order out in scalar code and is what the tests hold the others to.
//!
//! Weights are decoded 32 at a time (one *chunk*) into two vectors whose lanes follow the
//! format's natural unpacking order ([`chunk_lane_k`]): k order for q8, q6 and f32; for q4 the
//! even k (low nibbles) in the first vector and the odd k in the second, which saves
//! re-interleaving the nibbles. The kernels permute the activations into the same order
//! once per call, and a dot product does not care about the order of its terms.

// Every primitive here is `unsafe` for the one reason the trait documents (the CPU has the
// implementation's instruction set; pointers valid for the stated lengths), and every line of
// it is an intrinsic under that contract. The workspace's unsafe lints would repeat the
// contract on every line, so they are allowed in this module and in `kernels.rs`.
#![allow(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

use half::f16;
use qins::codec::Format;

/// Weights per chunk.
pub const CHUNK: usize = 32;

/// Offset within its chunk of the weight that lane `lane` (0..32: vector `lane / 16`, lane
/// `lane % 16`) of a decoded chunk holds.
#[inline(always)]
pub fn chunk_lane_k(format: Format, lane: usize) -> usize {
    match format {
        Format::Q4 if lane < 16 => 2 * lane,
        Format::Q4 => 2 * (lane - 16) + 1,
        _ => lane,
    }
}

/// Instruction sets with their own variant of the kernels: the workspace's one detection.
pub use qins::isa::Isa;

/// Primitives on 16 f32 lanes.
///
/// # Safety
/// Implementations other than [`Portable`] may only be used on CPUs that have their
/// instruction set ([`Isa::available`]); all methods are `unsafe` for that reason, and
/// those taking pointers also need them valid for the stated number of elements.
pub unsafe trait Simd: Copy {
    /// 16 f32 lanes.
    type F: Copy;
    /// A format's decode table, prepared for the decoders (in registers, where they fit).
    type Lut: Copy;

    unsafe fn zero() -> Self::F;
    unsafe fn splat(x: f32) -> Self::F;
    /// Reads 16 floats.
    unsafe fn load(p: *const f32) -> Self::F;
    /// Reads `n <= 16` floats, the other lanes +0 (nothing past `p + n` is touched).
    unsafe fn load_first(p: *const f32, n: usize) -> Self::F;
    /// Writes 16 floats.
    unsafe fn store(p: *mut f32, v: Self::F);
    unsafe fn add(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
    /// `a * b + c` with one rounding.
    unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// Lanes `n..16` set to +0.
    unsafe fn keep_first(v: Self::F, n: usize) -> Self::F;
    /// Sum of the lanes: `t[j] = v[j] + v[j + 8]`, then `+4`, `+2`, `+1` the same way.
    unsafe fn hsum(v: Self::F) -> f32;
    /// Converts `n` scales.
    unsafe fn f16_to_f32(src: *const f16, dst: *mut f32, n: usize);
    /// Asks for the cache line at `p` (any address: nothing is read and nothing can fault).
    unsafe fn prefetch(p: *const u8);

    unsafe fn lut(format: Format) -> Self::Lut;
    /// `LUT[code]` for the 32 codes of a chunk of packed codes (32, 24 or 16 bytes at `p`).
    unsafe fn decode_q8(lut: &Self::Lut, p: *const u8) -> (Self::F, Self::F);
    unsafe fn decode_q6(lut: &Self::Lut, p: *const u8) -> (Self::F, Self::F);
    unsafe fn decode_q4(lut: &Self::Lut, p: *const u8) -> (Self::F, Self::F);
    /// `sign(z) (1/|z| - 1)` per lane, the sign applied where `z < 0` (as
    /// [`qins::codec::decode_z`] before its multiply by the scale).
    unsafe fn decode_z(z: Self::F) -> Self::F;
}

/// The reference implementation, in plain Rust.
#[derive(Clone, Copy, Debug)]
pub struct Portable;

// SAFETY: plain Rust; the pointer contracts are the callers'.
unsafe impl Simd for Portable {
    type F = [f32; 16];
    type Lut = &'static [f32];

    #[inline(always)]
    unsafe fn zero() -> [f32; 16] {
        [0.0; 16]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> [f32; 16] {
        [x; 16]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; 16] {
        p.cast::<[f32; 16]>().read_unaligned()
    }
    #[inline(always)]
    unsafe fn load_first(p: *const f32, n: usize) -> [f32; 16] {
        let mut v = [0.0; 16];
        std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), n.min(16));
        v
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [f32; 16]) {
        p.cast::<[f32; 16]>().write_unaligned(v)
    }
    #[inline(always)]
    unsafe fn add(a: [f32; 16], b: [f32; 16]) -> [f32; 16] {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn mul(a: [f32; 16], b: [f32; 16]) -> [f32; 16] {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn fma(a: [f32; 16], b: [f32; 16], c: [f32; 16]) -> [f32; 16] {
        // One rounding, as the SIMD variants' FMA instructions: that is what makes all variants
        // agree bit for bit. Without FMA hardware (x86-64 before AVX2, where nothing else runs
        // this) it is a slow libm call; on AArch64 it is one instruction.
        std::array::from_fn(|i| a[i].mul_add(b[i], c[i]))
    }
    #[inline(always)]
    unsafe fn keep_first(v: [f32; 16], n: usize) -> [f32; 16] {
        std::array::from_fn(|i| if i < n { v[i] } else { 0.0 })
    }
    #[inline(always)]
    unsafe fn hsum(v: [f32; 16]) -> f32 {
        let t: [f32; 8] = std::array::from_fn(|j| v[j] + v[j + 8]);
        let u: [f32; 4] = std::array::from_fn(|j| t[j] + t[j + 4]);
        let w: [f32; 2] = std::array::from_fn(|j| u[j] + u[j + 2]);
        w[0] + w[1]
    }
    #[inline(always)]
    unsafe fn f16_to_f32(src: *const f16, dst: *mut f32, n: usize) {
        for i in 0..n {
            *dst.add(i) = (*src.add(i)).to_f32();
        }
    }

    #[inline(always)]
    unsafe fn prefetch(_: *const u8) {}

    #[inline(always)]
    unsafe fn lut(format: Format) -> &'static [f32] {
        format.lut()
    }
    #[inline(always)]
    unsafe fn decode_q8(lut: &&'static [f32], p: *const u8) -> ([f32; 16], [f32; 16]) {
        let at = |i: usize| lut[*p.add(i) as usize];
        (std::array::from_fn(at), std::array::from_fn(|i| at(i + 16)))
    }
    #[inline(always)]
    unsafe fn decode_q6(lut: &&'static [f32], p: *const u8) -> ([f32; 16], [f32; 16]) {
        let at = |i: usize| {
            let b = p.add(i / 4 * 3);
            let w = *b as u32 | (*b.add(1) as u32) << 8 | (*b.add(2) as u32) << 16;
            lut[((w >> (6 * (i % 4))) & 63) as usize]
        };
        (std::array::from_fn(at), std::array::from_fn(|i| at(i + 16)))
    }
    #[inline(always)]
    unsafe fn decode_q4(lut: &&'static [f32], p: *const u8) -> ([f32; 16], [f32; 16]) {
        let byte = |i: usize| *p.add(i) as usize;
        (std::array::from_fn(|i| lut[byte(i) & 15]), std::array::from_fn(|i| lut[byte(i) >> 4]))
    }
    #[inline(always)]
    unsafe fn decode_z(z: [f32; 16]) -> [f32; 16] {
        std::array::from_fn(|i| {
            let v = 1.0 / z[i].abs() - 1.0;
            if z[i] < 0.0 {
                -v
            } else {
                v
            }
        })
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;
    use qins::codec::Format;

    use super::Simd;

    /// `a ^ (b & c)` for `_mm*_ternarylogic_epi32`.
    const XOR_AND: i32 = 0x78;

    /// Byte shuffle that spreads 4 six-bit codes (3 bytes at `base + 3 q`) over the 4 dwords of
    /// 128-bit lane `q`, for a variable right shift by `6 i` to finish.
    const fn q6_shuffle<const N: usize>(base: i8) -> [i8; N] {
        let mut c = [0i8; N];
        let mut i = 0;
        while i < N {
            let (q, b) = ((i / 16) as i8, (i % 4) as i8);
            c[i] = if b == 3 { -128 } else { base + 3 * q + b };
            i += 1;
        }
        c
    }

    /// AVX-512 F/BW/VL. q4 decodes with one in-register permute of the 16-entry signed table
    /// per 16 codes, q6 with a two-register permute of the 32 magnitudes plus the sign bit,
    /// q8 with four such permutes over the 128 magnitudes and two blends plus the sign bit.
    #[derive(Clone, Copy, Debug)]
    pub struct Avx512;

    /// Tables for [`Avx512`]: q8 uses all 8 registers (128 magnitudes), q6 the first 2
    /// (32 magnitudes), q4 the first (the 16 signed entries).
    #[derive(Clone, Copy)]
    pub struct Lut512([__m512; 8]);

    static Q6_SHUF_512: [[i8; 64]; 2] = [q6_shuffle(0), q6_shuffle(4)];
    static Q6_SHUF_256: [[i8; 32]; 4] = [q6_shuffle(0), q6_shuffle(6), q6_shuffle(4), q6_shuffle(10)];

    macro_rules! avx512 {
        ($($item:item)*) => {$(
            #[inline]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
            $item
        )*};
    }

    // SAFETY: only ever run (through `Isa::Avx512`) on CPUs reporting these features.
    unsafe impl Simd for Avx512 {
        type F = __m512;
        type Lut = Lut512;

        avx512! {
            unsafe fn zero() -> __m512 { _mm512_setzero_ps() }
            unsafe fn splat(x: f32) -> __m512 { _mm512_set1_ps(x) }
            unsafe fn load(p: *const f32) -> __m512 { _mm512_loadu_ps(p) }
            unsafe fn load_first(p: *const f32, n: usize) -> __m512 { _mm512_maskz_loadu_ps(mask16(n), p) }
            unsafe fn store(p: *mut f32, v: __m512) { _mm512_storeu_ps(p, v) }
            unsafe fn add(a: __m512, b: __m512) -> __m512 { _mm512_add_ps(a, b) }
            unsafe fn mul(a: __m512, b: __m512) -> __m512 { _mm512_mul_ps(a, b) }
            unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 { _mm512_fmadd_ps(a, b, c) }
            unsafe fn keep_first(v: __m512, n: usize) -> __m512 { _mm512_maskz_mov_ps(mask16(n), v) }

            unsafe fn hsum(v: __m512) -> f32 {
                let hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v));
                hsum8(_mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(hi)))
            }

            unsafe fn f16_to_f32(src: *const f16, dst: *mut f32, n: usize) {
                let mut i = 0;
                while i + 16 <= n {
                    _mm512_storeu_ps(dst.add(i), _mm512_cvtph_ps(_mm256_loadu_si256(src.add(i).cast())));
                    i += 16;
                }
                if i < n {
                    let m = mask16(n - i);
                    let h = _mm256_maskz_loadu_epi16(m, src.add(i).cast());
                    _mm512_mask_storeu_ps(dst.add(i), m, _mm512_cvtph_ps(h));
                }
            }

            unsafe fn prefetch(p: *const u8) { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }

            unsafe fn lut(format: Format) -> Lut512 {
                let lut = format.lut();
                // q8 and q6 take the magnitudes (the first half), q4 the whole signed table.
                let entries = match format {
                    Format::Q8 => 128,
                    Format::Q6 => 32,
                    _ => lut.len().min(16),
                };
                let mut t = [_mm512_setzero_ps(); 8];
                for (j, r) in t.iter_mut().enumerate().take(entries.div_ceil(16)) {
                    *r = _mm512_maskz_loadu_ps(mask16(entries - 16 * j), lut.as_ptr().add(16 * j));
                }
                Lut512(t)
            }

            unsafe fn decode_q8(lut: &Lut512, p: *const u8) -> (__m512, __m512) {
                let c0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()));
                let c1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(16).cast()));
                (q8_one(lut, c0), q8_one(lut, c1))
            }

            unsafe fn decode_q6(lut: &Lut512, p: *const u8) -> (__m512, __m512) {
                // Codes 0-15 are bytes 0-11, codes 16-31 bytes 12-23; the second load starts
                // at byte 8 so that neither reads past the chunk.
                let shifts = _mm512_set_epi32(18, 12, 6, 0, 18, 12, 6, 0, 18, 12, 6, 0, 18, 12, 6, 0);
                let one = |src: *const u8, shuf: &[i8; 64]| {
                    let x = _mm512_broadcast_i32x4(_mm_loadu_si128(src.cast()));
                    let c = _mm512_srlv_epi32(_mm512_shuffle_epi8(x, _mm512_loadu_si512(shuf.as_ptr().cast())), shifts);
                    let mag = _mm512_permutex2var_ps(lut.0[0], c, lut.0[1]);
                    with_sign_bit(mag, _mm512_slli_epi32::<26>(c))
                };
                (one(p, &Q6_SHUF_512[0]), one(p.add(8), &Q6_SHUF_512[1]))
            }

            unsafe fn decode_q4(lut: &Lut512, p: *const u8) -> (__m512, __m512) {
                let c = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()));
                // The permute reads only the low 4 bits of each index.
                (_mm512_permutexvar_ps(c, lut.0[0]), _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(c), lut.0[0]))
            }

            unsafe fn decode_z(z: __m512) -> __m512 {
                let v = _mm512_sub_ps(_mm512_div_ps(_mm512_set1_ps(1.0), _mm512_abs_ps(z)), _mm512_set1_ps(1.0));
                let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(z, _mm512_setzero_ps());
                let vi = _mm512_castps_si512(v);
                _mm512_castsi512_ps(_mm512_mask_xor_epi32(vi, neg, vi, _mm512_set1_epi32(i32::MIN)))
            }
        }
    }

    avx512! {
        /// One 16-code half of a q8 chunk: magnitudes from 4 permutes of 32 entries picked
        /// by bits 5 and 6, then bit 7 as the sign.
        unsafe fn q8_one(lut: &Lut512, c: __m512i) -> __m512 {
            let t = &lut.0;
            let r0 = _mm512_permutex2var_ps(t[0], c, t[1]);
            let r1 = _mm512_permutex2var_ps(t[2], c, t[3]);
            let r2 = _mm512_permutex2var_ps(t[4], c, t[5]);
            let r3 = _mm512_permutex2var_ps(t[6], c, t[7]);
            let b5 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(32));
            let b6 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(64));
            let lo = _mm512_mask_blend_ps(b5, r0, r1);
            let hi = _mm512_mask_blend_ps(b5, r2, r3);
            with_sign_bit(_mm512_mask_blend_ps(b6, lo, hi), _mm512_slli_epi32::<24>(c))
        }

        /// `mag` with its sign flipped where bit 31 of `s` is set, which is exactly the
        /// codec's `-LUT[m]` for the negative codes.
        unsafe fn with_sign_bit(mag: __m512, s: __m512i) -> __m512 {
            let r = _mm512_ternarylogic_epi32::<XOR_AND>(_mm512_castps_si512(mag), s, _mm512_set1_epi32(i32::MIN));
            _mm512_castsi512_ps(r)
        }
    }

    #[inline(always)]
    fn mask16(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// The fixed tree of `Simd::hsum` from its second step on (`t[j] + t[j + 4]`, ...).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum8(t: __m256) -> f32 {
        let u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
        let w = _mm_add_ps(u, _mm_movehl_ps(u, u));
        _mm_cvtss_f32(_mm_add_ss(w, _mm_shuffle_ps::<1>(w, w)))
    }

    /// AVX2 + FMA + F16C, each 16-lane vector a pair of registers. q4 decodes with an
    /// in-register permute of the 8 magnitudes plus the sign bit; q8 and q6, whose tables do
    /// not fit 8-lane permutes, gather from the table in memory (it stays in L1).
    #[derive(Clone, Copy, Debug)]
    pub struct Avx2;

    /// Tables for [`Avx2`]: the signed table in memory for the gathers, and the first 8
    /// entries (q4's magnitudes) in a register.
    #[derive(Clone, Copy)]
    pub struct Lut256 {
        table: *const f32,
        q4: __m256,
    }

    macro_rules! avx2 {
        ($($item:item)*) => {$(
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            $item
        )*};
    }

    // SAFETY: only ever run (through `Isa::Avx2`) on CPUs reporting these features.
    unsafe impl Simd for Avx2 {
        type F = [__m256; 2];
        type Lut = Lut256;

        avx2! {
            unsafe fn zero() -> [__m256; 2] { [_mm256_setzero_ps(); 2] }
            unsafe fn splat(x: f32) -> [__m256; 2] { [_mm256_set1_ps(x); 2] }
            unsafe fn load(p: *const f32) -> [__m256; 2] { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))] }
            unsafe fn load_first(p: *const f32, n: usize) -> [__m256; 2] {
                let (lo, hi) = masks8(n);
                // Masked-off lanes are neither read nor able to fault.
                [_mm256_maskload_ps(p, lo), _mm256_maskload_ps(p.add(8), hi)]
            }
            unsafe fn store(p: *mut f32, v: [__m256; 2]) {
                _mm256_storeu_ps(p, v[0]);
                _mm256_storeu_ps(p.add(8), v[1]);
            }
            unsafe fn add(a: [__m256; 2], b: [__m256; 2]) -> [__m256; 2] {
                [_mm256_add_ps(a[0], b[0]), _mm256_add_ps(a[1], b[1])]
            }
            unsafe fn mul(a: [__m256; 2], b: [__m256; 2]) -> [__m256; 2] {
                [_mm256_mul_ps(a[0], b[0]), _mm256_mul_ps(a[1], b[1])]
            }
            unsafe fn fma(a: [__m256; 2], b: [__m256; 2], c: [__m256; 2]) -> [__m256; 2] {
                [_mm256_fmadd_ps(a[0], b[0], c[0]), _mm256_fmadd_ps(a[1], b[1], c[1])]
            }
            unsafe fn keep_first(v: [__m256; 2], n: usize) -> [__m256; 2] {
                let (lo, hi) = masks8(n);
                [_mm256_and_ps(v[0], _mm256_castsi256_ps(lo)), _mm256_and_ps(v[1], _mm256_castsi256_ps(hi))]
            }
            unsafe fn hsum(v: [__m256; 2]) -> f32 { hsum8(_mm256_add_ps(v[0], v[1])) }

            unsafe fn f16_to_f32(src: *const f16, dst: *mut f32, n: usize) {
                let mut i = 0;
                while i + 8 <= n {
                    _mm256_storeu_ps(dst.add(i), _mm256_cvtph_ps(_mm_loadu_si128(src.add(i).cast())));
                    i += 8;
                }
                for j in i..n {
                    *dst.add(j) = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128((*src.add(j)).to_bits() as i32)));
                }
            }

            unsafe fn prefetch(p: *const u8) { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }

            unsafe fn lut(format: Format) -> Lut256 {
                let lut = format.lut();
                let q4 = if lut.len() >= 8 { _mm256_loadu_ps(lut.as_ptr()) } else { _mm256_setzero_ps() };
                Lut256 { table: lut.as_ptr(), q4 }
            }

            unsafe fn decode_q8(lut: &Lut256, p: *const u8) -> ([__m256; 2], [__m256; 2]) {
                let g = |o: usize| {
                    let c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(o).cast()));
                    _mm256_i32gather_ps::<4>(lut.table, c)
                };
                ([g(0), g(8)], [g(16), g(24)])
            }

            unsafe fn decode_q6(lut: &Lut256, p: *const u8) -> ([__m256; 2], [__m256; 2]) {
                let shifts = _mm256_setr_epi32(0, 6, 12, 18, 0, 6, 12, 18);
                let x0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast()));
                let x1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.add(8).cast()));
                let g = |x: __m256i, shuf: &[i8; 32]| {
                    let c = _mm256_shuffle_epi8(x, _mm256_loadu_si256(shuf.as_ptr().cast()));
                    let c = _mm256_and_si256(_mm256_srlv_epi32(c, shifts), _mm256_set1_epi32(63));
                    _mm256_i32gather_ps::<4>(lut.table, c)
                };
                ([g(x0, &Q6_SHUF_256[0]), g(x0, &Q6_SHUF_256[1])], [g(x1, &Q6_SHUF_256[2]), g(x1, &Q6_SHUF_256[3])])
            }

            unsafe fn decode_q4(lut: &Lut256, p: *const u8) -> ([__m256; 2], [__m256; 2]) {
                let one = |c: __m256i| {
                    // The permute reads the low 3 bits (the magnitude); bit 3 is the sign.
                    let mag = _mm256_castps_si256(_mm256_permutevar8x32_ps(lut.q4, c));
                    let r = xor_sign_bit(mag, _mm256_slli_epi32::<28>(c));
                    _mm256_castsi256_ps(r)
                };
                let lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast()));
                let hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8).cast()));
                ([one(lo), one(hi)], [one(_mm256_srli_epi32::<4>(lo)), one(_mm256_srli_epi32::<4>(hi))])
            }

            unsafe fn decode_z(z: [__m256; 2]) -> [__m256; 2] {
                let one = |z: __m256| {
                    let abs = _mm256_and_ps(z, _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX)));
                    let v = _mm256_sub_ps(_mm256_div_ps(_mm256_set1_ps(1.0), abs), _mm256_set1_ps(1.0));
                    let neg = _mm256_cmp_ps::<_CMP_LT_OQ>(z, _mm256_setzero_ps());
                    _mm256_xor_ps(v, _mm256_and_ps(neg, _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN))))
                };
                [one(z[0]), one(z[1])]
            }
        }
    }

    avx2! {
        /// `mag ^ (s & sign bit)`: AVX2 has no ternary logic.
        unsafe fn xor_sign_bit(mag: __m256i, s: __m256i) -> __m256i {
            _mm256_xor_si256(mag, _mm256_and_si256(s, _mm256_set1_epi32(i32::MIN)))
        }

        /// All-ones in lanes `< n` of a 16-lane vector split in two halves.
        unsafe fn masks8(n: usize) -> (__m256i, __m256i) {
            let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let n = n.min(16) as i32;
            (_mm256_cmpgt_epi32(_mm256_set1_epi32(n), iota), _mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8), iota))
        }
    }
}
