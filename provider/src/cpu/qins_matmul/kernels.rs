//! The loop nests, written once over [`Simd`] and compiled per instruction set by
//! `multiversion!`. See the parent module for the two strategies.
//!
//! Everything here works on raw pointers into buffers whose sizes the parent module checked
//! (`Weights::new`, `check_lens`) or allocated to fit (`Plan`): every function is `unsafe`,
//! with the contract that those sizes hold.

// As in `simd.rs`: every function is `unsafe` under the one contract above, and its body is
// pointer arithmetic and primitives under it; the workspace's unsafe lints are allowed here.
#![allow(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

use std::ops::Range;

use qins::codec::Format;

use super::simd::{Isa, Simd, CHUNK};
use super::{Plan, MIXED};

/// Activation rows per register block of the dot kernel: 2 accumulators each, which with the
/// q8 tables still leaves AVX-512 registers to spare.
pub(super) const DOT_ROWS: usize = 4;
/// Lanes of `M` per GEMM panel (one vector).
pub(super) const PANEL: usize = 16;

/// Everything the loops read, as raw pointers: tasks on other threads share it.
#[derive(Clone, Copy)]
pub(super) struct Args {
    /// Permuted activations: `[M, K32]` for the dot kernel, `[ceil(M/16), K32, 16]` panels
    /// for the GEMM kernel.
    pub a: *const f32,
    pub m: usize,
    /// `Y [M, N]`.
    pub y: *mut f32,
    /// The task's own scratch, 64-byte aligned: the weight rows' f32 scales
    /// ([`Plan::scale_scratch`] floats per row, [`DOT_WEIGHT_ROWS`] rows), or for the GEMM
    /// kernel [`gemm_scratch`] floats.
    pub scratch: *mut f32,
}

/// A chunk's scale per lane: one broadcast when its weights share a group. `UNIFORM` promises
/// that all chunks do, which keeps the per-lane fallback (and the registers it needs) out of
/// the dot kernel's loop.
#[inline(always)]
unsafe fn scales<S: Simd, const UNIFORM: bool>(p: &Plan, srow: *const f32, c: usize) -> (S::F, S::F) {
    let g = *p.chunk_group.get_unchecked(c);
    if UNIFORM || g != MIXED {
        let s = S::splat(*srow.add(g as usize));
        return (s, s);
    }
    let idx = p.lane_group.as_ptr().add(c * CHUNK);
    let mut buf = [0f32; CHUNK];
    for (l, v) in buf.iter_mut().enumerate() {
        *v = *srow.add(*idx.add(l) as usize);
    }
    (S::load(buf.as_ptr()), S::load(buf.as_ptr().add(16)))
}

/// Chunk `c` of a row (`row` points at its codes or `z`): `LUT[code] * s` in lane order,
/// bit-identical to the codec's decode; in the last chunk, the lanes past K are +0.
#[inline(always)]
unsafe fn chunk<S: Simd, const B: u32, const UNIFORM: bool>(
    p: &Plan,
    lut: &S::Lut,
    row: *const u8,
    srow: *const f32,
    c: usize,
    tail: bool,
) -> (S::F, S::F) {
    let (u0, u1) = match B {
        8 => S::decode_q8(lut, row.add(c * CHUNK)),
        6 => S::decode_q6(lut, row.add(c * CHUNK * 3 / 4)),
        4 => S::decode_q4(lut, row.add(c * CHUNK / 2)),
        _ => {
            let z = row.cast::<f32>().add(c * CHUNK);
            // The z rows are not padded: the last chunk must not read past K.
            let (z0, z1) = if tail {
                let (n0, n1) = p.tail_lanes;
                (S::load_first(z, n0), S::load_first(z.add(16), n1))
            } else {
                (S::load(z), S::load(z.add(16)))
            };
            if matches!(p.w.data, super::WeightData::Plain { .. }) {
                (z0, z1)
            } else {
                (S::decode_z(z0), S::decode_z(z1))
            }
        }
    };
    let (s0, s1) = scales::<S, UNIFORM>(p, srow, c);
    let (v0, v1) = (S::mul(u0, s0), S::mul(u1, s1));
    if tail {
        // Zero, not LUT[0] * s: with a non-finite scale that would be NaN.
        let (n0, n1) = p.tail_lanes;
        (S::keep_first(v0, n0), S::keep_first(v1, n1))
    } else {
        (v0, v1)
    }
}

/// Converts row `n`'s scales to f32 at `srow`.
#[inline(always)]
unsafe fn row_scales<S: Simd>(p: &Plan, n: usize, srow: *mut f32) {
    let g = p.groups;
    match p.w.data {
        super::WeightData::Packed { scales, .. } => S::f16_to_f32(scales.as_ptr().add(n * g), srow, g),
        super::WeightData::F32 { scales, .. } => *srow = *scales.as_ptr().add(n),
        super::WeightData::Plain { .. } => *srow = 1.0,
    }
}

/// Start of row `n`'s codes (or `z`, for bits 32).
#[inline(always)]
unsafe fn row_ptr(p: &Plan, n: usize) -> *const u8 {
    match p.w.data {
        super::WeightData::Packed { codes, .. } => codes.as_ptr().add(n * p.row_bytes),
        super::WeightData::F32 { z, .. } | super::WeightData::Plain { w: z } => z.as_ptr().add(n * p.w.layout.k).cast(),
    }
}

/// Dot kernel (small M): each chunk of a weight row is decoded once, in registers, and
/// multiplied into up to [`DOT_ROWS`] activation rows; every output keeps two 16-lane partial
/// sums, added and reduced at the end of the row. Rows are taken [`DOT_WEIGHT_ROWS`] (M = 1)
/// or 2 at a time, for enough independent accumulators to hide the FMA latency.
#[inline(always)]
pub(super) unsafe fn dot<S: Simd, const B: u32>(p: &Plan, args: Args, rows: Range<usize>) {
    let lut = S::lut(p.w.layout.format);
    let uniform = p.lane_group.is_empty();
    // Several rows at a time only in the common case: with mixed-group chunks the fallback
    // needs the registers.
    let group = match (uniform, args.m) {
        (false, _) => 1,
        (true, 1) => DOT_WEIGHT_ROWS,
        (true, _) => 2,
    };
    let mut n = rows.start;
    while n < rows.end {
        let nr = if rows.end - n >= group { group } else { 1 };
        for r in 0..nr {
            row_scales::<S>(p, n + r, args.scratch.add(r * p.scale_scratch()));
        }
        let mut m0 = 0;
        while m0 < args.m {
            let mb = (args.m - m0).min(DOT_ROWS);
            let block =
                Block { n, a: args.a.add(m0 * p.k32), y: args.y.add(m0 * p.w.layout.n + n), srow: args.scratch };
            match (uniform, mb, nr) {
                (false, 1, _) => dot_block::<S, B, 1, 1, false>(p, &lut, block),
                (false, 2, _) => dot_block::<S, B, 2, 1, false>(p, &lut, block),
                (false, 3, _) => dot_block::<S, B, 3, 1, false>(p, &lut, block),
                (false, _, _) => dot_block::<S, B, DOT_ROWS, 1, false>(p, &lut, block),
                (true, 1, 1) => dot_block::<S, B, 1, 1, true>(p, &lut, block),
                (true, 1, 2) => dot_block::<S, B, 1, 2, true>(p, &lut, block),
                (true, 1, _) => dot_block::<S, B, 1, DOT_WEIGHT_ROWS, true>(p, &lut, block),
                (true, 2, 1) => dot_block::<S, B, 2, 1, true>(p, &lut, block),
                (true, 2, _) => dot_block::<S, B, 2, 2, true>(p, &lut, block),
                (true, 3, 1) => dot_block::<S, B, 3, 1, true>(p, &lut, block),
                (true, 3, _) => dot_block::<S, B, 3, 2, true>(p, &lut, block),
                (true, _, 1) => dot_block::<S, B, DOT_ROWS, 1, true>(p, &lut, block),
                (true, _, _) => dot_block::<S, B, DOT_ROWS, 2, true>(p, &lut, block),
            }
            m0 += mb;
        }
        n += nr;
    }
}

/// Weight rows the dot kernel takes at a time for a single activation row.
pub(super) const DOT_WEIGHT_ROWS: usize = 4;

/// Where one call of [`dot_block`] works: weight rows `n..`, activation rows at `a`, outputs
/// at `y` (column `n`), the rows' scales at `srow` (one [`Plan::scale_scratch`] each).
#[derive(Clone, Copy)]
struct Block {
    n: usize,
    a: *const f32,
    y: *mut f32,
    srow: *const f32,
}

#[inline(always)]
unsafe fn dot_block<S: Simd, const B: u32, const MB: usize, const NR: usize, const U: bool>(
    p: &Plan,
    lut: &S::Lut,
    b: Block,
) {
    let rows: [(*const u8, *const f32); NR] =
        std::array::from_fn(|r| (row_ptr(p, b.n + r), b.srow.add(r * p.scale_scratch())));
    let mut acc = [[[S::zero(); 2]; MB]; NR];
    let full = p.full_chunks();
    for c in 0..full {
        dot_step::<S, B, MB, NR, U>(p, lut, &rows, b.a, c, false, &mut acc);
    }
    if full < p.chunks {
        dot_step::<S, B, MB, NR, U>(p, lut, &rows, b.a, full, true, &mut acc);
    }
    for (r, acc) in acc.iter().enumerate() {
        for (i, acc) in acc.iter().enumerate() {
            *b.y.add(i * p.w.layout.n + r) = S::hsum(S::add(acc[0], acc[1]));
        }
    }
}

/// One chunk of [`dot_block`]. (A function, not a closure: closures are not always inlined,
/// and the accumulators must stay in registers.)
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn dot_step<S: Simd, const B: u32, const MB: usize, const NR: usize, const U: bool>(
    p: &Plan,
    lut: &S::Lut,
    rows: &[(*const u8, *const f32); NR],
    a: *const f32,
    c: usize,
    tail: bool,
    acc: &mut [[[S::F; 2]; MB]; NR],
) {
    for (acc, &(row, srow)) in acc.iter_mut().zip(rows) {
        S::prefetch(row.wrapping_add(p.prefetch_ahead(NR) + c * p.chunk_bytes()));
        let (v0, v1) = chunk::<S, B, U>(p, lut, row, srow, c, tail);
        for (i, acc) in acc.iter_mut().enumerate() {
            let a = a.add(i * p.k32 + c * CHUNK);
            acc[0] = S::fma(S::load(a), v0, acc[0]);
            acc[1] = S::fma(S::load(a.add(16)), v1, acc[1]);
        }
    }
}

/// Decodes chunks `chunks` of row `n` (lane order) to `dst`, as vectors of 16 spaced `stride`
/// floats apart, with the row's scales (already converted) at `srow`.
#[inline(always)]
unsafe fn decode_chunks<S: Simd, const B: u32>(
    p: &Plan,
    lut: &S::Lut,
    n: usize,
    srow: *const f32,
    chunks: Range<usize>,
    dst: *mut f32,
    stride: usize,
) {
    let row = row_ptr(p, n);
    let full = p.full_chunks();
    let mut dst = dst;
    for c in chunks {
        S::prefetch(row.wrapping_add(p.prefetch_ahead(1) + c * p.chunk_bytes()));
        let (v0, v1) = chunk::<S, B, false>(p, lut, row, srow, c, c >= full);
        S::store(dst, v0);
        S::store(dst.add(stride), v1);
        dst = dst.add(2 * stride);
    }
}

/// Decodes rows `rows` into `args.y` (`[rows.len(), K32]`, lane order): the kernels' decode
/// on its own, for tests and [`super::Weights::decode_row`].
#[inline(always)]
pub(super) unsafe fn decode<S: Simd, const B: u32>(p: &Plan, args: Args, rows: Range<usize>) {
    let lut = S::lut(p.w.layout.format);
    for (i, n) in rows.enumerate() {
        row_scales::<S>(p, n, args.scratch);
        decode_chunks::<S, B>(p, &lut, n, args.scratch, 0..p.chunks, args.y.add(i * p.k32), 16);
    }
}

/// Floats of task scratch [`gemm`] needs: the scales of `STRIPS` strips of `nr` rows, one
/// decoded block of them and their accumulators for `panels` panels.
pub(super) fn gemm_scratch(p: &Plan, nr: usize, panels: usize) -> usize {
    STRIPS * nr * (p.scale_scratch() + KC + panels * PANEL)
}

/// GEMM kernel (larger M), for strips of `NR` weight rows, [`STRIPS`] at a time, in blocks of
/// [`KC`] weights (k). Each block of the strips is decoded into scratch as
/// `[STRIPS, KC / 16, NR, 16]` (lane order: for each 16 k, the rows one after another, so that
/// the weights of one k are at fixed offsets from one pointer) and, still in L1, multiplied
/// with the same block of the 16-row panels of the activations (`A^T`, `[K32, 16]` each),
/// `PP` panels at a time, by an `NR x 16 PP` register tile: per k, `PP` panel vectors times
/// `NR` broadcast weights. The activations thus stream from L2 once per `STRIPS` strips, every
/// weight is decoded once, and the accumulators are parked in scratch between blocks. Each
/// output is one chain of fused multiply-adds over k, in order.
#[inline(always)]
pub(super) unsafe fn gemm<S: Simd, const B: u32, const NR: usize, const PP: usize>(
    p: &Plan,
    args: Args,
    strips: Range<usize>,
) {
    let lut = S::lut(p.w.layout.format);
    let k32 = p.k32;
    let n_all = p.w.layout.n;
    let panels = args.m.div_ceil(PANEL);
    let ss = p.scale_scratch();
    // [STRIPS, NR, scale_scratch]
    let srows = args.scratch;
    // [STRIPS, KC / 16, NR, 16]
    let w = srows.add(STRIPS * NR * ss);
    // [STRIPS, panels, NR, 16]
    let acc = w.add(STRIPS * NR * KC);
    let (ws, accs) = (NR * KC, panels * NR * PANEL);
    let mut s0 = strips.start;
    while s0 < strips.end {
        let group = STRIPS.min(strips.end - s0);
        let rows = |g: usize| NR.min(n_all - (s0 + g) * NR);
        for g in 0..group {
            for r in 0..rows(g) {
                row_scales::<S>(p, (s0 + g) * NR + r, srows.add((g * NR + r) * ss));
            }
        }
        for k0 in (0..k32).step_by(KC) {
            let kc = KC.min(k32 - k0);
            let first = k0 == 0;
            for g in 0..group {
                let wg = w.add(g * ws);
                let nr = rows(g);
                for r in 0..nr {
                    let (n, srow) = ((s0 + g) * NR + r, srows.add((g * NR + r) * ss));
                    decode_chunks::<S, B>(p, &lut, n, srow, k0 / CHUNK..(k0 + kc) / CHUNK, wg.add(r * 16), NR * 16);
                }
                // Rows past N multiply like the others and are dropped when stored.
                for b in 0..kc / 16 {
                    std::ptr::write_bytes(wg.add((b * NR + nr) * 16), 0, (NR - nr) * 16);
                }
            }
            let mut panel = 0;
            while panel < panels {
                let a = args.a.add((panel * k32 + k0) * PANEL);
                if panel + PP <= panels {
                    for g in 0..group {
                        tile::<S, NR, PP, 1>(w.add(g * ws), ws, a, k32, kc, acc.add(g * accs), accs, panel, first);
                    }
                    panel += PP;
                } else {
                    // A lone panel (M <= 16, or the last of an odd count): as many strips at
                    // a time as panels otherwise, to keep the same number of accumulators.
                    let mut g = 0;
                    while g + PP <= group {
                        tile::<S, NR, 1, PP>(w.add(g * ws), ws, a, k32, kc, acc.add(g * accs), accs, panel, first);
                        g += PP;
                    }
                    for g in g..group {
                        tile::<S, NR, 1, 1>(w.add(g * ws), ws, a, k32, kc, acc.add(g * accs), accs, panel, first);
                    }
                    panel += 1;
                }
            }
        }
        for g in 0..group {
            let n0 = (s0 + g) * NR;
            for panel in 0..panels {
                let m0 = panel * PANEL;
                let tile_acc = acc.add(g * accs + panel * NR * PANEL);
                for (l, m) in (m0..args.m.min(m0 + PANEL)).enumerate() {
                    let y = args.y.add(m * n_all + n0);
                    for r in 0..rows(g) {
                        *y.add(r) = *tile_acc.add(r * PANEL + l);
                    }
                }
            }
        }
        s0 += group;
    }
}

/// Strips the GEMM kernel decodes and multiplies together.
pub(super) const STRIPS: usize = 4;

/// Weights (k) per block of the GEMM kernel: a multiple of the chunk. [`STRIPS`] strips of 12
/// rows take 24 KiB of it, two panels 16 KiB: both fit L1 together. Measured with
/// `examples/bench.rs`.
const KC: usize = 128;

/// Adds `w_s[r, k] a_j[k, l]` over `k < kc` to the accumulators of strips `s < SS` and panels
/// `panel..panel + PP` (`acc + s * acc_stride`, `[panels, NR, 16]` each; zero instead of
/// their old value when `first`), for the strips `w_s = w + s * w_stride` (`[kc / 16, NR,
/// 16]` each) and the panels `a_j = a + j * lda * 16` (`[kc, 16]` each).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile<S: Simd, const NR: usize, const PP: usize, const SS: usize>(
    w: *const f32,
    w_stride: usize,
    a: *const f32,
    lda: usize,
    kc: usize,
    acc: *mut f32,
    acc_stride: usize,
    panel: usize,
    first: bool,
) {
    let slot = |s: usize, r: usize, j: usize| acc.add(s * acc_stride + ((panel + j) * NR + r) * PANEL);
    let mut t = [[[S::zero(); PP]; NR]; SS];
    if !first {
        for (s, t) in t.iter_mut().enumerate() {
            for (r, t) in t.iter_mut().enumerate() {
                for (j, t) in t.iter_mut().enumerate() {
                    *t = S::load(slot(s, r, j));
                }
            }
        }
    }
    for b in 0..kc / 16 {
        for kk in 0..16 {
            let k = b * 16 + kk;
            let mut av = [S::zero(); PP];
            for (j, av) in av.iter_mut().enumerate() {
                *av = S::load(a.add((j * lda + k) * PANEL));
            }
            for (s, t) in t.iter_mut().enumerate() {
                let wb = w.add(s * w_stride + b * NR * 16);
                for (r, t) in t.iter_mut().enumerate() {
                    let wv = S::splat(*wb.add(r * 16 + kk));
                    for (t, &av) in t.iter_mut().zip(&av) {
                        *t = S::fma(wv, av, *t);
                    }
                }
            }
        }
    }
    for (s, t) in t.iter().enumerate() {
        for (r, t) in t.iter().enumerate() {
            for (j, t) in t.iter().enumerate() {
                S::store(slot(s, r, j), *t);
            }
        }
    }
}

/// `match` on the format, with `$b` the kernel's `B` (bits) in each arm.
macro_rules! for_format {
    ($format:expr, $b:ident => $body:expr) => {
        match $format {
            Format::Q8 => {
                const $b: u32 = 8;
                $body
            }
            Format::Q6 => {
                const $b: u32 = 6;
                $body
            }
            Format::Q4 => {
                const $b: u32 = 4;
                $body
            }
            Format::F32 => {
                const $b: u32 = 32;
                $body
            }
        }
    };
}

/// Defines `$name(isa, plan, args, range)`, which runs `$body` with `$s` the [`Simd`] of
/// `isa`, `$nr` its GEMM strip height ([`gemm_rows`]) and `$pp` its panels per tile. The AVX variants are compiled
/// inside `#[target_feature]` functions, so that the inlined primitives and the loops around
/// them use those instructions.
macro_rules! multiversion {
    ($name:ident, $s:ident, $nr:ident, $pp:ident, $p:ident, $args:ident, $range:ident => $body:expr) => {
        pub(super) unsafe fn $name(isa: Isa, $p: &Plan, $args: Args, $range: Range<usize>) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
            unsafe fn avx512($p: &Plan, $args: Args, $range: Range<usize>) {
                type $s = super::simd::Avx512;
                const $nr: usize = GEMM_ROWS_AVX512;
                const $pp: usize = 2;
                $body
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2($p: &Plan, $args: Args, $range: Range<usize>) {
                type $s = super::simd::Avx2;
                const $nr: usize = GEMM_ROWS_NARROW;
                const $pp: usize = 1;
                $body
            }

            unsafe fn portable($p: &Plan, $args: Args, $range: Range<usize>) {
                type $s = super::simd::Portable;
                const $nr: usize = GEMM_ROWS_NARROW;
                const $pp: usize = 1;
                $body
            }

            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => avx512($p, $args, $range),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => avx2($p, $args, $range),
                Isa::Portable => portable($p, $args, $range),
            }
        }
    };
}

multiversion!(run_dot, S, _NR, _PP, p, args, rows => for_format!(p.w.layout.format, B => dot::<S, B>(p, args, rows)));
multiversion!(run_decode, S, _NR, _PP, p, args, rows => for_format!(p.w.layout.format, B => decode::<S, B>(p, args, rows)));
multiversion!(run_gemm, S, NR, PP, p, args, strips => for_format!(p.w.layout.format, B => gemm::<S, B, NR, PP>(p, args, strips)));

/// GEMM strip height with 32 vector registers: 12 rows x 2 panels of accumulators leave 8
/// registers for the panel vectors and the broadcast weight.
const GEMM_ROWS_AVX512: usize = 12;
/// With 16 registers (AVX2's 16-lane vectors are pairs of them), 4 rows x 1 panel.
const GEMM_ROWS_NARROW: usize = 4;

/// Strip height of [`run_gemm`] per instruction set.
pub(super) fn gemm_rows(isa: Isa) -> usize {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => GEMM_ROWS_AVX512,
        _ => GEMM_ROWS_NARROW,
    }
}
