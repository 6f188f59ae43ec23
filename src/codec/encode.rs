//! Encoding: the MSE-chosen scale per group and the code assignment.

use super::{decode_z, encode_z, level, pack_row, Encoded, Format, Layout, RowErr};
use crate::isa::Isa;
use half::f16;
use rayon::prelude::*;

fn bytemuck_u16_as_f16(v: &[u16]) -> &[f16] {
    // SAFETY: f16 is a repr(transparent) u16.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<f16>(), v.len()) }
}

/// Element type of a float weight as stored in ONNX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    F16,
    BF16,
}

impl Elem {
    pub fn bytes(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F16 | Elem::BF16 => 2,
        }
    }
}

/// A `[K, N]` row-major weight as it lies in an ONNX initializer (little-endian), or a
/// window of its columns (the V part of a packed qkv projection) read in place.
#[derive(Clone, Copy)]
pub struct WeightSource<'a> {
    bytes: &'a [u8],
    elem: Elem,
    k: usize,
    /// Columns of the stored matrix (its row stride).
    ld: usize,
    col0: usize,
    n: usize,
}

impl<'a> WeightSource<'a> {
    /// Wraps `bytes` as a `[k, n]` matrix; fails if the length does not match.
    pub fn new(bytes: &'a [u8], elem: Elem, k: usize, n: usize) -> Result<WeightSource<'a>, EncodeError> {
        let want = k * n * elem.bytes();
        if bytes.len() != want {
            return Err(EncodeError::Size { k, n, got: bytes.len(), want });
        }
        Ok(WeightSource { bytes, elem, k, ld: n, col0: 0, n })
    }

    /// Columns `range` of this matrix.
    pub fn columns(self, range: std::ops::Range<usize>) -> WeightSource<'a> {
        assert!(range.start <= range.end && range.end <= self.n, "column window out of range");
        WeightSource { col0: self.col0 + range.start, n: range.len(), ..self }
    }

    /// Output channels `n0..n0 + nb` as `nb` rows of K f32 (channel-major) in `out`.
    pub fn rows(&self, n0: usize, nb: usize, out: &mut Vec<f32>) {
        assert!(n0 + nb <= self.n, "channels {n0}..{} of {}", n0 + nb, self.n);
        out.resize(nb * self.k, 0.0);
        let mut bits = Vec::new();
        // `gather` takes at most BLOCK channels at a time.
        for b0 in (0..nb).step_by(BLOCK) {
            let bn = BLOCK.min(nb - b0);
            self.gather(n0 + b0, bn, &mut bits, &mut out[b0 * self.k..(b0 + bn) * self.k]);
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Transposes `W[0..K, n0..n0+nb]` (window coordinates) into `buf` as `[nb, K]` f32.
    /// 16-bit weights are moved as bits first and converted in one bulk call, which uses
    /// the F16C instructions where the CPU has them.
    fn gather(&self, n0: usize, nb: usize, bits: &mut Vec<u16>, buf: &mut [f32]) {
        let (k, eb) = (self.k, self.elem.bytes());
        let buf = &mut buf[..nb * k];
        if self.elem == Elem::F32 {
            for kk in 0..k {
                let start = (kk * self.ld + self.col0 + n0) * 4;
                for (j, c) in self.bytes[start..start + nb * 4].chunks_exact(4).enumerate() {
                    buf[j * k + kk] = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            return;
        }
        bits.resize(nb * k, 0);
        // 8 input rows at a time: each output row then receives 16 contiguous bytes.
        let mut tile = [[0u16; BLOCK]; 8];
        for k0 in (0..k).step_by(8) {
            let kh = 8.min(k - k0);
            for (r, t) in tile.iter_mut().enumerate().take(kh) {
                let start = ((k0 + r) * self.ld + self.col0 + n0) * eb;
                for (d, c) in t.iter_mut().zip(self.bytes[start..start + nb * eb].chunks_exact(2)) {
                    *d = u16::from_le_bytes([c[0], c[1]]);
                }
            }
            for (j, out) in bits.chunks_exact_mut(k).enumerate().take(nb) {
                for (r, o) in out[k0..k0 + kh].iter_mut().enumerate() {
                    *o = tile[r][j];
                }
            }
        }
        match self.elem {
            Elem::F16 => {
                use half::slice::HalfFloatSliceExt;
                let h: &[f16] = bytemuck_u16_as_f16(bits);
                h.convert_to_f32_slice(buf);
            }
            _ => {
                for (o, b) in buf.iter_mut().zip(bits.iter()) {
                    *o = f32::from_bits((*b as u32) << 16);
                }
            }
        }
    }

    /// Copies the window into `scratch` as a dense `[K, n]` matrix and reads from there.
    /// The transpose in the encoder touches one cache line of each of K rows at a time;
    /// from a file map that is a TLB miss per line, from huge-page-backed scratch memory it
    /// is not. The copy itself is sequential and cheap by comparison.
    pub fn stage<'s>(&self, scratch: &'s mut Scratch) -> WeightSource<'s> {
        let eb = self.elem.bytes();
        let buf = scratch.get(self.k * self.n * eb);
        let row = self.n * eb;
        for (k, dst) in buf.chunks_exact_mut(row).enumerate() {
            let start = (k * self.ld + self.col0) * eb;
            dst.copy_from_slice(&self.bytes[start..start + row]);
        }
        WeightSource { bytes: buf, elem: self.elem, k: self.k, ld: self.n, col0: 0, n: self.n }
    }

    /// The window's bytes transposed, as a dense `[n, K]` matrix of the same element type
    /// (a mixed QinsMatMul's `float_weight`, docs/FORMAT.md).
    pub fn to_transposed_bytes(&self) -> Vec<u8> {
        let eb = self.elem.bytes();
        let mut out = vec![0u8; self.k * self.n * eb];
        // Blocks of 64 x 64 elements keep both sides' lines in cache.
        const B: usize = 64;
        for k0 in (0..self.k).step_by(B) {
            for n0 in (0..self.n).step_by(B) {
                for k in k0..self.k.min(k0 + B) {
                    let row = (k * self.ld + self.col0) * eb;
                    for j in n0..self.n.min(n0 + B) {
                        let (src, dst) = (row + j * eb, (j * self.k + k) * eb);
                        out[dst..dst + eb].copy_from_slice(&self.bytes[src..src + eb]);
                    }
                }
            }
        }
        out
    }

    /// The window's bytes as a dense `[K, n]` matrix (a copy when it is a column window).
    pub fn to_dense_bytes(&self) -> Vec<u8> {
        let eb = self.elem.bytes();
        let mut out = Vec::with_capacity(self.k * self.n * eb);
        for k in 0..self.k {
            let start = (k * self.ld + self.col0) * eb;
            out.extend_from_slice(&self.bytes[start..start + self.n * eb]);
        }
        out
    }
}

/// The fused SwiGLU weight of `gate` and `up` (both `[K, I]`, `I % 8 == 0`, one element type)
/// as a dense `[K, 2I]` matrix in `scratch`, its columns ordered by [`super::swiglu_row`].
pub fn stage_swiglu<'s>(
    gate: &WeightSource,
    up: &WeightSource,
    scratch: &'s mut Scratch,
) -> Result<WeightSource<'s>, EncodeError> {
    let (k, i, elem) = (gate.k, gate.n, gate.elem);
    if up.k != k || up.n != i || up.elem != elem || !i.is_multiple_of(super::SWIGLU_TILE) {
        return Err(EncodeError::Shape { lk: k, ln: i, k: up.k, n: up.n });
    }
    let eb = elem.bytes();
    let t = super::SWIGLU_TILE * eb;
    let buf = scratch.get(k * 2 * i * eb);
    for (kk, dst) in buf.chunks_exact_mut(2 * i * eb).enumerate() {
        let (gs, us) = ((kk * gate.ld + gate.col0) * eb, (kk * up.ld + up.col0) * eb);
        let (g, u) = (&gate.bytes[gs..gs + i * eb], &up.bytes[us..us + i * eb]);
        for (j, d) in dst.chunks_exact_mut(2 * t).enumerate() {
            d[..t].copy_from_slice(&g[j * t..(j + 1) * t]);
            d[t..].copy_from_slice(&u[j * t..(j + 1) * t]);
        }
    }
    Ok(WeightSource { bytes: buf, elem, k, ld: 2 * i, col0: 0, n: 2 * i })
}

/// Reusable memory for [`WeightSource::stage`], backed by huge pages where the kernel
/// grants them.
#[derive(Default)]
pub struct Scratch {
    map: Option<memmap2::MmapMut>,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch::default()
    }

    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.map.as_ref().is_none_or(|m| m.len() < len) {
            let cap = len.next_multiple_of(2 << 20).max(2 << 20);
            let map = memmap2::MmapMut::map_anon(cap).expect("map scratch memory");
            #[cfg(target_os = "linux")]
            let _ = map.advise(memmap2::Advice::HugePage);
            self.map = Some(map);
        }
        &mut self.map.as_mut().expect("mapped above")[..len]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("weight [{k}, {n}] is not finite ({value}); QINS encodes finite weights only")]
    NonFinite { k: usize, n: usize, value: f32 },
    #[error("output channel {n} group {group}: scale {scale:e} does not fit fp16; use --bits f32 for this tensor")]
    ScaleOverflow { n: usize, group: usize, scale: f32 },
    #[error("weight data has {got} bytes, [{k}, {n}] needs {want}")]
    Size { k: usize, n: usize, got: usize, want: usize },
    #[error("layout is [{lk}, {ln}] but the weight is [{k}, {n}]")]
    Shape { lk: usize, ln: usize, k: usize, n: usize },
}

/// Output channels handled together: the transpose reads `BLOCK` contiguous weights of
/// each of the K input rows, which keeps the strided reads at whole cache lines.
const BLOCK: usize = 32;

/// Encodes a `[K, N]` weight. Returns the encoded tensors and per-output-channel errors.
pub fn encode_matrix(src: WeightSource, layout: Layout) -> Result<(Encoded, Vec<RowErr>), EncodeError> {
    let Layout { k, n, .. } = layout;
    if (src.k, src.n) != (k, n) {
        return Err(EncodeError::Shape { lk: k, ln: n, k: src.k, n: src.n });
    }
    let (rb, g) = (layout.row_bytes(), layout.groups());
    let mut codes = vec![0u8; layout.codes_len()];
    let mut scales = vec![0f32; layout.scales_len()];
    let mut errs = vec![RowErr::default(); n];
    codes
        .par_chunks_mut(BLOCK * rb)
        .zip(scales.par_chunks_mut(BLOCK * g))
        .zip(errs.par_chunks_mut(BLOCK))
        .enumerate()
        .try_for_each_init(
            || (vec![0f32; BLOCK * k], Vec::new(), RowEncoder::new(layout)),
            |(buf, bits, enc), (blk, ((codes, scales), errs))| {
                let n0 = blk * BLOCK;
                let nb = errs.len();
                src.gather(n0, nb, bits, buf);
                for j in 0..nb {
                    enc.encode(
                        &buf[j * k..(j + 1) * k],
                        n0 + j,
                        &mut codes[j * rb..(j + 1) * rb],
                        &mut scales[j * g..(j + 1) * g],
                        &mut errs[j],
                    )?;
                }
                Ok(())
            },
        )?;
    Ok((Encoded { layout, codes, scales }, errs))
}

/// Runs `f` on every output channel (as a contiguous K-row), `BLOCK` channels per task.
pub(crate) fn map_channels<T: Send, S>(
    src: WeightSource,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, &[f32], usize) -> T + Sync + Send,
) -> Vec<T> {
    let (k, n) = (src.k, src.n);
    let blocks: Vec<Vec<T>> = (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .map_init(
            || (vec![0f32; BLOCK * k], Vec::new(), init()),
            |(buf, bits, st), blk| {
                let n0 = blk * BLOCK;
                let nb = BLOCK.min(n - n0);
                src.gather(n0, nb, bits, buf);
                (0..nb).map(|j| f(st, &buf[j * k..(j + 1) * k], n0 + j)).collect()
            },
        )
        .collect();
    blocks.into_iter().flatten().collect()
}

/// Encodes rows given as `[N, K]` f32 (output channel major), e.g. for tests.
pub fn encode_rows(rows: &[f32], layout: Layout) -> Result<(Encoded, Vec<RowErr>), EncodeError> {
    let Layout { k, n, .. } = layout;
    assert_eq!(rows.len(), k * n);
    let (rb, g) = (layout.row_bytes(), layout.groups());
    let mut codes = vec![0u8; layout.codes_len()];
    let mut scales = vec![0f32; layout.scales_len()];
    let mut errs = vec![RowErr::default(); n];
    codes.par_chunks_mut(rb).zip(scales.par_chunks_mut(g)).zip(errs.par_iter_mut()).enumerate().try_for_each_init(
        || RowEncoder::new(layout),
        |enc, (i, ((c, s), e))| enc.encode(&rows[i * k..(i + 1) * k], i, c, s, e),
    )?;
    Ok((Encoded { layout, codes, scales }, errs))
}

/// The codebook of an integer format, in units of `s`, with what nearest-level search needs.
struct Levels {
    /// `u[m] = D(z_m)` for `a = 1`, exactly as the decode table has them.
    u: Vec<f32>,
    /// `|z|` steps by `dz` between magnitudes, so `1 - z = m dz`.
    dz: f32,
    inv_dz: f32,
    /// Clip ratios (times the absmax scale) tried before the Lloyd refinement.
    ratios: &'static [f32],
    lloyd_iters: usize,
}

impl Levels {
    fn new(format: Format) -> Levels {
        let m = format.magnitudes();
        let u: Vec<f32> = (0..m).map(|i| level(format, i) as f32).collect();
        let dz = (1.0 - format.z_min()) / (m - 1) as f64;
        // Coarse formats gain most from clipping; 8-bit barely moves off the absmax scale.
        let (ratios, lloyd_iters): (&'static [f32], usize) = match format {
            Format::Q8 => (&[1.0], 2),
            Format::Q6 => (&[1.0, 0.9, 0.8], 2),
            _ => (&[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4], 3),
        };
        Levels { u, dz: dz as f32, inv_dz: (1.0 / dz) as f32, ratios, lloyd_iters }
    }

    /// Codes for a group at scale `s` (`s > 0`): nearest magnitude from the grid formula,
    /// written branch-free so that it vectorizes; the midpoint it compares against can
    /// differ from the table's in the last bit, which only moves exact ties.
    #[inline(always)]
    fn assign(&self, xs: &[f32], s: f32, sign_bit: u8, codes: &mut [u8], simd: bool) {
        let inv = 1.0 / s;
        let rmax = (self.u.len() - 2) as f32;
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if simd {
            done = xs.len() / 8 * 8;
            // SAFETY: `simd` is only set when the CPU has AVX2 and FMA.
            unsafe { avx2::assign(&xs[..done], s, self.dz, self.inv_dz, rmax, sign_bit, &mut codes[..done]) };
        }
        for (&x, c) in xs[done..].iter().zip(codes[done..].iter_mut()) {
            let y = x.abs() * inv;
            let t = y / (1.0 + y);
            let r = ((t * self.inv_dz) as i32 as f32).min(rmax);
            let (t0, t1) = (r * self.dz, (r + 1.0) * self.dz);
            let mid2 = t0 / (1.0 - t0) + t1 / (1.0 - t1);
            let m = (r + if y + y > mid2 { 1.0 } else { 0.0 }) as i32 as u8;
            *c = if x < 0.0 && m != 0 { m | sign_bit } else { m };
        }
    }

    /// The level nearest `y`, computed from the grid formula instead of table lookups so
    /// that a pass over a group vectorizes. Its value can differ from the table's in the
    /// last bit; the search only needs its error sums, the codes come from `assign`.
    #[inline(always)]
    fn nearest_value(&self, y: f32) -> f32 {
        let t = y / (1.0 + y);
        let r = ((t * self.inv_dz) as i32 as f32).min((self.u.len() - 2) as f32);
        let (t0, t1) = (r * self.dz, (r + 1.0) * self.dz);
        let (u0, u1) = (t0 / (1.0 - t0), t1 / (1.0 - t1));
        if y + y > u0 + u1 {
            u1
        } else {
            u0
        }
    }

    /// One assignment pass at scale `s`: the squared error and the Lloyd update of `s`.
    /// Eight independent accumulators let the compiler keep the portable loop in vector
    /// registers; AVX2 and AVX-512 have hand-written versions.
    #[inline(always)]
    fn pass(&self, x: &[f32], s: f32, isa: Isa) -> (f32, f32) {
        let inv = 1.0 / s;
        let rmax = (self.u.len() - 2) as f32;
        let (mut err, mut xu, mut uu) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        let done = match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                let n = x.len() / 16 * 16;
                // SAFETY: `isa` says the CPU has these instructions.
                (err[0], xu[0], uu[0]) = unsafe { avx512::pass(&x[..n], s, self.dz, self.inv_dz, rmax) };
                n
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                let n = x.len() / 8 * 8;
                // SAFETY: `isa` says the CPU has these instructions.
                (err[0], xu[0], uu[0]) = unsafe { avx2::pass(&x[..n], s, self.dz, self.inv_dz, rmax) };
                n
            }
            _ => 0,
        };
        let chunks = x[done..].chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for l in 0..8 {
                let a = c[l].abs();
                let u = self.nearest_value(a * inv);
                let d = a - u * s;
                err[l] += d * d;
                xu[l] += a * u;
                uu[l] += u * u;
            }
        }
        for (l, v) in rest.iter().enumerate() {
            let a = v.abs();
            let u = self.nearest_value(a * inv);
            let d = a - u * s;
            err[l] += d * d;
            xu[l] += a * u;
            uu[l] += u * u;
        }
        let (err, xu, uu) = (err.iter().sum::<f32>(), xu.iter().sum::<f32>(), uu.iter().sum::<f32>());
        (err, if uu > 0.0 { xu / uu } else { s })
    }

    /// The MSE-minimising scale for one group: clip ratios from the largest down, stopping
    /// once two in a row do worse than the best (the error is near unimodal in the ratio),
    /// then Lloyd steps.
    #[inline(always)]
    fn search(&self, x: &[f32], absmax: f32, isa: Isa) -> f32 {
        self.search_with(absmax, |s| self.pass(x, s, isa))
    }

    /// [`Levels::search`] over any error: `pass(s)` gives the error at scale `s` and the
    /// Lloyd update of `s`.
    #[inline(always)]
    fn search_with(&self, absmax: f32, pass: impl Fn(f32) -> (f32, f32)) -> f32 {
        let s_max = absmax / self.u[self.u.len() - 1];
        let (mut best_err, mut best_s, mut next) = (f32::INFINITY, s_max, s_max);
        let mut worse = 0;
        for &r in self.ratios {
            let s = s_max * r;
            let (e, upd) = pass(s);
            if e < best_err {
                (best_err, best_s, next, worse) = (e, s, upd, 0);
            } else {
                worse += 1;
                if worse == 2 {
                    break;
                }
            }
        }
        for _ in 0..self.lloyd_iters {
            if next.is_nan() || next <= 0.0 || next == best_s {
                break;
            }
            let (e, upd) = pass(next);
            if e < best_err {
                (best_err, best_s, next) = (e, next, upd);
            } else {
                break;
            }
        }
        best_s
    }

    /// [`Levels::pass`] with a weight per element: `sum w (|x| - u s)^2` and the weighted
    /// Lloyd update `sum w |x| u / sum w u^2`. Portable only: it runs once per group and
    /// scale candidate in the calibrated encoder, whose error feedback costs K times more.
    fn pass_weighted(&self, x: &[f32], w: &[f32], s: f32) -> (f32, f32) {
        let inv = 1.0 / s;
        let (mut err, mut xu, mut uu) = (0f64, 0f64, 0f64);
        for (&v, &wt) in x.iter().zip(w) {
            let a = v.abs();
            let u = self.nearest_value(a * inv);
            let d = (a - u * s) as f64;
            let wt = wt as f64;
            err += wt * d * d;
            xu += wt * (a * u) as f64;
            uu += wt * (u * u) as f64;
        }
        (err as f32, if uu > 0.0 { (xu / uu) as f32 } else { s })
    }
}

/// An integer format's group quantizer on its own, for encoders that choose codes one weight
/// at a time (the calibrated encoder of the rewrite, which feeds each rounding error forward):
/// the scale search and the nearest-code rule of [`encode_matrix`], so that both write the
/// same grid.
pub struct GroupCoder {
    format: Format,
    levels: Levels,
    sign_bit: u8,
    isa: Isa,
}

impl GroupCoder {
    /// `None` for [`Format::F32`], which has no codebook.
    pub fn new(format: Format) -> Option<GroupCoder> {
        format.is_integer().then(|| GroupCoder {
            format,
            levels: Levels::new(format),
            sign_bit: 1u8 << (format.bits() - 1),
            isa: Isa::best(),
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The scale [`encode_matrix`] stores for a group (weight MSE, rounded to f16 as
    /// stored); 0 for a group of zeros. Non-finite input gives a non-finite or NaN scale,
    /// which the caller must refuse.
    pub fn scale(&self, xs: &[f32]) -> f32 {
        match absmax_finite(xs, false) {
            (_, false) => f32::NAN,
            (0.0, true) => 0.0,
            (amax, true) => f16::from_f32(self.levels.search(xs, amax, self.isa)).to_f32(),
        }
    }

    /// The scale that minimises `sum w (x - q)^2` over the group (`w >= 0`, one per weight),
    /// rounded to f16 as stored: an activation-weighted search when `w` is the diagonal of
    /// the inputs' second moment. The same candidates and Lloyd steps as [`GroupCoder::scale`].
    pub fn scale_weighted(&self, xs: &[f32], w: &[f32]) -> f32 {
        assert_eq!(xs.len(), w.len());
        match absmax_finite(xs, false) {
            (_, false) => f32::NAN,
            (0.0, true) => 0.0,
            (amax, true) => {
                f16::from_f32(self.levels.search_with(amax, |s| self.levels.pass_weighted(xs, w, s))).to_f32()
            }
        }
    }

    /// The code nearest `x` at scale `s` (the stored scale); code 0 (zero) when `s == 0`.
    #[inline]
    pub fn code(&self, x: f32, s: f32) -> u8 {
        if s > 0.0 {
            let mut c = [0u8];
            self.levels.assign(&[x], s, self.sign_bit, &mut c, false);
            c[0]
        } else {
            0
        }
    }
}

/// Largest magnitude of `x`, and whether every value is finite (NaN fails `<=`).
#[inline(always)]
fn absmax_finite(x: &[f32], simd: bool) -> (f32, bool) {
    let (mut m, mut ok) = (0f32, true);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if simd {
        done = x.len() / 8 * 8;
        // SAFETY: `simd` is only set when the CPU has AVX2 and FMA.
        (m, ok) = unsafe { avx2::absmax_finite(&x[..done]) };
    }
    for v in &x[done..] {
        m = m.max(v.abs());
        ok &= v.abs() <= f32::MAX;
    }
    (m, ok)
}

/// Adds `(x, y)` pairs to a row's error sums: f32 lanes over blocks of 64, each block
/// folded into f64. Cosine is later taken from `sxx`, `syy` and `see` (see
/// [`TensorStats`](super::TensorStats)), which keeps it meaningful to well under 1e-9 even
/// though the lanes are f32.
#[inline(always)]
fn accumulate(x: &[f32], y: &[f32], err: &mut RowErr, simd: bool) {
    let n = x.len() / 64 * 64;
    let sum = |v: [f32; 8]| v.iter().map(|x| *x as f64).sum::<f64>();
    for (bx, by) in x[..n].chunks_exact(64).zip(y[..n].chunks_exact(64)) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is only set when the CPU has AVX2 and FMA.
            let (sxx, syy, see, mx) = unsafe { avx2::block_sums(bx, by) };
            err.sxx += sum(sxx);
            err.syy += sum(syy);
            err.see += sum(see);
            err.max_abs = err.max_abs.max(mx as f64);
            continue;
        }
        let (mut sxx, mut syy, mut see, mut mx) = ([0f32; 8], [0f32; 8], [0f32; 8], 0f32);
        for (cx, cy) in bx.chunks_exact(8).zip(by.chunks_exact(8)) {
            for l in 0..8 {
                let (a, b) = (cx[l], cy[l]);
                let e = a - b;
                sxx[l] += a * a;
                syy[l] += b * b;
                see[l] += e * e;
                mx = mx.max(e.abs());
            }
        }
        err.sxx += sum(sxx);
        err.syy += sum(syy);
        err.see += sum(see);
        err.max_abs = err.max_abs.max(mx as f64);
    }
    err.count += n as u64;
    for (a, b) in x[n..].iter().zip(&y[n..]) {
        err.add(*a, *b);
    }
    err.sxy = 0.5 * (err.sxx + err.syy - err.see);
}

/// The f32 format's scale: the power of two `2^(e - 23)` with `2^e <= absmax < 2^(e+1)`.
/// Then `|x| / s < 2^24` for every weight of the channel, so `|x|/s + 1` is exact in f32 for
/// all but the tiniest weights (below `s`), and decoding is one rounding step.
pub(crate) fn f32_scale(absmax: f32) -> f32 {
    let e = ((absmax.to_bits() >> 23) & 0xff) as i32 - 127;
    if e - 23 < -126 {
        // Subnormal weights: any scale keeps z normal; the round trip is then exact anyway.
        return f32::MIN_POSITIVE;
    }
    f32::from_bits(((e - 23 + 127) as u32) << 23)
}

/// `z` for `x` at scale `s` in the f32 format, and what it decodes to. `E(x)` rounded to
/// f32 usually lands a few ulps off the `z` whose f32 decode gives back `x` exactly, so
/// the neighbours are tried: most weights then round-trip bit for bit, the rest (those
/// too small for the f32 spacing of `z` near 1) to the nearest value decode can produce.
#[inline]
fn exact_z(x: f32, s: f32) -> (f32, f32) {
    let z0 = encode_z(x, s);
    let mut best = (z0, decode_z(z0, s));
    if best.1 == x {
        return best;
    }
    for d in [-1i32, 1, -2, 2, -3, 3] {
        let z = f32::from_bits((z0.to_bits() as i32 + d) as u32);
        // Stay within the sign's half of (0, 1]: no z = 0, no |z| > 1.
        if z == 0.0 || z.abs() > 1.0 || z.signum() != z0.signum() {
            continue;
        }
        let y = decode_z(z, s);
        if (y - x).abs() < (best.1 - x).abs() {
            best = (z, y);
            if y == x {
                break;
            }
        }
    }
    best
}

/// The search pass with AVX2 intrinsics: reciprocal estimates refined by one Newton step
/// stand in for the three divisions, which dominate the portable version.
///
/// Every function here is `unsafe` for one reason, its caller's promise that the CPU has the
/// module's instruction set (`qins::isa`), and every line of it is an intrinsic under that
/// promise; the functions that take slices read only inside them. The workspace's unsafe
/// lints (an unsafe block per unsafe call, with its reason) would repeat that contract on every
/// line, so they are allowed here.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
mod avx2 {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn rcp(x: __m256) -> __m256 {
        let r = _mm256_rcp_ps(x);
        _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, _mm256_set1_ps(2.0)))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let mut a = [0f32; 8];
        _mm256_storeu_ps(a.as_mut_ptr(), v);
        a.iter().sum()
    }

    /// `x.len()` must be a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn pass(x: &[f32], s: f32, dz: f32, inv_dz: f32, rmax: f32) -> (f32, f32, f32) {
        let (vs, inv, one) = (_mm256_set1_ps(s), _mm256_set1_ps(1.0 / s), _mm256_set1_ps(1.0));
        let (vdz, vinv_dz, vrmax) = (_mm256_set1_ps(dz), _mm256_set1_ps(inv_dz), _mm256_set1_ps(rmax));
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let (mut e, mut xu, mut uu) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
        for c in x.chunks_exact(8) {
            let a = _mm256_and_ps(_mm256_loadu_ps(c.as_ptr()), abs);
            let y = _mm256_mul_ps(a, inv);
            let t = _mm256_mul_ps(y, rcp(_mm256_add_ps(one, y)));
            let r = _mm256_min_ps(_mm256_floor_ps(_mm256_mul_ps(t, vinv_dz)), vrmax);
            let t0 = _mm256_mul_ps(r, vdz);
            let t1 = _mm256_add_ps(t0, vdz);
            let u0 = _mm256_mul_ps(t0, rcp(_mm256_sub_ps(one, t0)));
            let u1 = _mm256_mul_ps(t1, rcp(_mm256_sub_ps(one, t1)));
            let up = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_add_ps(y, y), _mm256_add_ps(u0, u1));
            let u = _mm256_blendv_ps(u0, u1, up);
            let d = _mm256_fnmadd_ps(u, vs, a);
            e = _mm256_fmadd_ps(d, d, e);
            xu = _mm256_fmadd_ps(a, u, xu);
            uu = _mm256_fmadd_ps(u, u, uu);
        }
        (hsum(e), hsum(xu), hsum(uu))
    }

    /// `(max |x|, all finite)` over `x` (length a multiple of 8).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn absmax_finite(x: &[f32]) -> (f32, bool) {
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let big = _mm256_set1_ps(f32::MAX);
        let (mut m, mut ok) = (_mm256_setzero_ps(), _mm256_castsi256_ps(_mm256_set1_epi32(-1)));
        for c in x.chunks_exact(8) {
            let a = _mm256_and_ps(_mm256_loadu_ps(c.as_ptr()), abs);
            m = _mm256_max_ps(m, a);
            ok = _mm256_and_ps(ok, _mm256_cmp_ps::<_CMP_LE_OQ>(a, big));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        (lanes.iter().fold(0f32, |a, b| a.max(*b)), _mm256_movemask_ps(ok) == 0xff)
    }

    /// `(sum x^2, sum y^2, sum (x-y)^2, max |x-y|)` over 64 pairs, in f32 lanes.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block_sums(x: &[f32], y: &[f32]) -> ([f32; 8], [f32; 8], [f32; 8], f32) {
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let (mut sxx, mut syy, mut see, mut mx) =
            (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
        for (cx, cy) in x.chunks_exact(8).zip(y.chunks_exact(8)) {
            let (a, b) = (_mm256_loadu_ps(cx.as_ptr()), _mm256_loadu_ps(cy.as_ptr()));
            let e = _mm256_sub_ps(a, b);
            sxx = _mm256_fmadd_ps(a, a, sxx);
            syy = _mm256_fmadd_ps(b, b, syy);
            see = _mm256_fmadd_ps(e, e, see);
            mx = _mm256_max_ps(mx, _mm256_and_ps(e, abs));
        }
        let mut out = [[0f32; 8]; 4];
        for (o, v) in out.iter_mut().zip([sxx, syy, see, mx]) {
            _mm256_storeu_ps(o.as_mut_ptr(), v);
        }
        (out[0], out[1], out[2], out[3].iter().fold(0f32, |a, b| a.max(*b)))
    }

    /// Codes of `x` (length a multiple of 8) at scale `s`, as `Levels::assign` defines them.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn assign(x: &[f32], s: f32, dz: f32, inv_dz: f32, rmax: f32, sign_bit: u8, codes: &mut [u8]) {
        let (inv, one) = (_mm256_set1_ps(1.0 / s), _mm256_set1_ps(1.0));
        let (vdz, vinv_dz, vrmax) = (_mm256_set1_ps(dz), _mm256_set1_ps(inv_dz), _mm256_set1_ps(rmax));
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let (zero, sign) = (_mm256_setzero_si256(), _mm256_set1_epi32(sign_bit as i32));
        let mut lanes = [0i32; 8];
        for (c, out) in x.chunks_exact(8).zip(codes.chunks_exact_mut(8)) {
            let v = _mm256_loadu_ps(c.as_ptr());
            let y = _mm256_mul_ps(_mm256_and_ps(v, abs), inv);
            let t = _mm256_div_ps(y, _mm256_add_ps(one, y));
            let r = _mm256_min_ps(_mm256_floor_ps(_mm256_mul_ps(t, vinv_dz)), vrmax);
            let t0 = _mm256_mul_ps(r, vdz);
            let t1 = _mm256_add_ps(t0, vdz);
            let mid2 =
                _mm256_add_ps(_mm256_div_ps(t0, _mm256_sub_ps(one, t0)), _mm256_div_ps(t1, _mm256_sub_ps(one, t1)));
            let up = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_add_ps(y, y), mid2);
            let m = _mm256_cvttps_epi32(_mm256_add_ps(r, _mm256_and_ps(up, one)));
            let neg = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(v, _mm256_setzero_ps()));
            let nonzero = _mm256_xor_si256(_mm256_cmpeq_epi32(m, zero), _mm256_set1_epi32(-1));
            let code = _mm256_or_si256(m, _mm256_and_si256(_mm256_and_si256(neg, nonzero), sign));
            _mm256_storeu_si256(lanes.as_mut_ptr().cast(), code);
            for (o, l) in out.iter_mut().zip(lanes) {
                *o = l as u8;
            }
        }
    }
}

/// The search pass sixteen lanes wide, under the same contract as [`avx2`].
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
mod avx512 {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn rcp(x: __m512) -> __m512 {
        let r = _mm512_rcp14_ps(x);
        _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.0)))
    }

    /// `x.len()` must be a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pass(x: &[f32], s: f32, dz: f32, inv_dz: f32, rmax: f32) -> (f32, f32, f32) {
        let (vs, inv, one) = (_mm512_set1_ps(s), _mm512_set1_ps(1.0 / s), _mm512_set1_ps(1.0));
        let (vdz, vinv_dz, vrmax) = (_mm512_set1_ps(dz), _mm512_set1_ps(inv_dz), _mm512_set1_ps(rmax));
        let (mut e, mut xu, mut uu) = (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
        for c in x.chunks_exact(16) {
            let a = _mm512_abs_ps(_mm512_loadu_ps(c.as_ptr()));
            let y = _mm512_mul_ps(a, inv);
            let t = _mm512_mul_ps(y, rcp(_mm512_add_ps(one, y)));
            let r = _mm512_min_ps(
                _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(t, vinv_dz)),
                vrmax,
            );
            let t0 = _mm512_mul_ps(r, vdz);
            let t1 = _mm512_add_ps(t0, vdz);
            let u0 = _mm512_mul_ps(t0, rcp(_mm512_sub_ps(one, t0)));
            let u1 = _mm512_mul_ps(t1, rcp(_mm512_sub_ps(one, t1)));
            let up = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_add_ps(y, y), _mm512_add_ps(u0, u1));
            let u = _mm512_mask_blend_ps(up, u0, u1);
            let d = _mm512_fnmadd_ps(u, vs, a);
            e = _mm512_fmadd_ps(d, d, e);
            xu = _mm512_fmadd_ps(a, u, xu);
            uu = _mm512_fmadd_ps(u, u, uu);
        }
        (_mm512_reduce_add_ps(e), _mm512_reduce_add_ps(xu), _mm512_reduce_add_ps(uu))
    }
}

struct RowEncoder {
    layout: Layout,
    levels: Option<Levels>,
    codes: Vec<u8>,
    decoded: Vec<f32>,
    isa: Isa,
}

impl RowEncoder {
    fn new(layout: Layout) -> RowEncoder {
        let levels = layout.format.is_integer().then(|| Levels::new(layout.format));
        let kp = super::padded_k(layout.k);
        RowEncoder { layout, levels, codes: vec![0u8; kp], decoded: vec![0f32; kp], isa: Isa::best() }
    }

    fn encode(
        &mut self,
        x: &[f32],
        n: usize,
        row: &mut [u8],
        scales: &mut [f32],
        err: &mut RowErr,
    ) -> Result<(), EncodeError> {
        #[cfg(target_arch = "x86_64")]
        if self.isa != Isa::Portable {
            // SAFETY: the CPU has AVX2 and FMA (`Isa::best` picked a set that includes them).
            return unsafe { self.encode_avx2(x, n, row, scales, err) };
        }
        self.encode_impl::<false>(x, n, row, scales, err)
    }

    /// The same code compiled for AVX2 + FMA: the passes run eight lanes wide.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn encode_avx2(
        &mut self,
        x: &[f32],
        n: usize,
        row: &mut [u8],
        scales: &mut [f32],
        err: &mut RowErr,
    ) -> Result<(), EncodeError> {
        self.encode_impl::<true>(x, n, row, scales, err)
    }

    #[inline(always)]
    fn encode_impl<const SIMD: bool>(
        &mut self,
        x: &[f32],
        n: usize,
        row: &mut [u8],
        scales: &mut [f32],
        err: &mut RowErr,
    ) -> Result<(), EncodeError> {
        let (row_max, finite) = absmax_finite(x, SIMD);
        if !finite {
            let i = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Err(EncodeError::NonFinite { k: i, n, value: x[i] });
        }
        *err = RowErr::default();
        let Some(lv) = &self.levels else {
            self.encode_f32(x, row_max, row, scales, err, SIMD);
            return Ok(());
        };
        let f = self.layout.format;
        let sign_bit = 1u8 << (f.bits() - 1);
        let lut = f.lut();
        for (gi, xs) in x.chunks(self.layout.group).enumerate() {
            let amax = if xs.len() == x.len() { row_max } else { absmax_finite(xs, SIMD).0 };
            let s = if amax > 0.0 { lv.search(xs, amax, self.isa) } else { 0.0 };
            // Codes are chosen against the scale as stored, so decode sees what we measured.
            let s = f16::from_f32(s).to_f32();
            if !s.is_finite() {
                return Err(EncodeError::ScaleOverflow { n, group: gi, scale: amax });
            }
            scales[gi] = s;
            let base = gi * self.layout.group;
            let (codes, dec) = (&mut self.codes[base..base + xs.len()], &mut self.decoded[base..base + xs.len()]);
            // m = 0 is the one zero: `assign` never emits a "negative zero" code.
            if s > 0.0 {
                lv.assign(xs, s, sign_bit, codes, SIMD);
            } else {
                codes.fill(0);
            }
            for (c, d) in codes.iter().zip(dec.iter_mut()) {
                *d = lut[*c as usize] * s;
            }
        }
        accumulate(x, &self.decoded[..x.len()], err, SIMD);
        pack_row(f, &self.codes[..x.len()], row);
        Ok(())
    }

    #[inline(always)]
    fn encode_f32(&mut self, x: &[f32], amax: f32, row: &mut [u8], scales: &mut [f32], err: &mut RowErr, simd: bool) {
        // A power-of-two scale far below the weights makes decode a single rounding (see
        // `f32_scale`); an all-zero row still needs a > 0 so that z = 1 and not 0/0.
        let s = if amax > 0.0 { f32_scale(amax) } else { 1.0 };
        scales[0] = s;
        for ((&v, out), d) in x.iter().zip(row.chunks_exact_mut(4)).zip(self.decoded.iter_mut()) {
            let (z, y) = exact_z(v, s);
            out.copy_from_slice(&z.to_le_bytes());
            *d = y;
        }
        accumulate(x, &self.decoded[..x.len()], err, simd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sum of four uniforms in [-1, 1), scaled: a bell shape with bounded tails.
    fn gaussianish(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::SplitMix64::new(seed);
        (0..n).map(|_| (0..4).map(|_| r.unit() as f32 * 2.0 - 1.0).sum::<f32>() * 0.02).collect()
    }

    #[test]
    fn vectorized_assignment_is_nearest() {
        for f in [Format::Q8, Format::Q6, Format::Q4] {
            let lv = Levels::new(f);
            let xs: Vec<f32> = gaussianish(20000, 17);
            let s = 0.03;
            let (mut codes, mut portable) = (vec![0u8; xs.len()], vec![0u8; xs.len()]);
            lv.assign(&xs, s, 1 << (f.bits() - 1), &mut codes, true);
            lv.assign(&xs, s, 1 << (f.bits() - 1), &mut portable, false);
            assert_eq!(codes, portable, "{f}: SIMD and portable codes differ");
            let lut = f.lut();
            for (x, c) in xs.iter().zip(&codes) {
                let got = (lut[*c as usize] * s - x).abs();
                let best = lut.iter().map(|u| (u * s - x).abs()).fold(f32::INFINITY, f32::min);
                assert!(got <= best + 1e-6 * s, "{f}: x={x} code {c} err {got} > {best}");
            }
        }
    }

    #[test]
    fn simd_pass_matches_portable_pass() {
        #[cfg(target_arch = "x86_64")]
        if Isa::Avx2.is_available() {
            let x = gaussianish(1003, 23);
            for f in [Format::Q8, Format::Q6, Format::Q4] {
                let lv = Levels::new(f);
                for s in [0.01f32, 0.03, 0.08] {
                    let (a, la) = lv.pass(&x, s, Isa::Portable);
                    for isa in [Isa::Avx2, Isa::best()] {
                        let (b, lb) = lv.pass(&x, s, isa);
                        assert!((a - b).abs() <= 1e-4 * a.max(1e-12), "{f} {isa:?} s={s}: {a} vs {b}");
                        assert!((la - lb).abs() <= 1e-4 * la, "{f} {isa:?} s={s}: {la} vs {lb}");
                    }
                }
            }
        }
    }

    #[test]
    fn transposed_bytes_of_a_window() {
        // 2-byte elements (f16/bf16 move as bits) and 4-byte ones, a window that starts past
        // column 0, and sizes that are not multiples of the 64-element blocks.
        for (elem, eb) in [(Elem::F16, 2), (Elem::F32, 4)] {
            let (k, n) = (130, 71);
            let bytes: Vec<u8> = (0..k * n * eb).map(|i| (i * 7 + i / 251) as u8).collect();
            let win = WeightSource::new(&bytes, elem, k, n).unwrap().columns(5..69);
            let t = win.to_transposed_bytes();
            assert_eq!(t.len(), k * 64 * eb);
            for j in 0..64 {
                for kk in 0..k {
                    let src = (kk * n + 5 + j) * eb;
                    let dst = (j * k + kk) * eb;
                    assert_eq!(t[dst..dst + eb], bytes[src..src + eb], "{elem:?} k={kk} j={j}");
                }
            }
        }
    }

    #[test]
    fn matrix_and_rows_paths_agree_and_decode_matches_codes() {
        let (k, n) = (200, 70);
        let w_kn = gaussianish(k * n, 3);
        let bytes: Vec<u8> = w_kn.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut rows = vec![0f32; k * n];
        for kk in 0..k {
            for nn in 0..n {
                rows[nn * k + kk] = w_kn[kk * n + nn];
            }
        }
        for f in Format::ALL {
            for group in [0, 32, 64, 96] {
                let l = Layout::new(f, k, n, group);
                let (a, ea) = encode_matrix(WeightSource::new(&bytes, Elem::F32, k, n).unwrap(), l).unwrap();
                let (b, _) = encode_rows(&rows, l).unwrap();
                assert_eq!(a.codes, b.codes, "{f} g{group}");
                assert_eq!(a.scales, b.scales);
                // The stats were computed on exactly what decode returns.
                let dec = a.decode_kn();
                let see: f64 = dec.iter().zip(&w_kn).map(|(d, w)| ((d - w) as f64).powi(2)).sum();
                let want: f64 = ea.iter().map(|e| e.see).sum();
                assert!((see - want).abs() <= 1e-9 + 1e-6 * want, "{f} {see} {want}");
            }
        }
    }

    #[test]
    fn column_window_equals_encoding_the_slice() {
        let (k, n) = (96, 50);
        let w = gaussianish(k * n, 11);
        let bytes: Vec<u8> = w.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        let full = WeightSource::new(&bytes, Elem::F16, k, n).unwrap();
        let win = full.columns(30..50);
        let dense = win.to_dense_bytes();
        let l = Layout::new(Format::Q6, k, 20, 32);
        let (a, _) = encode_matrix(win, l).unwrap();
        let (b, _) = encode_matrix(WeightSource::new(&dense, Elem::F16, k, 20).unwrap(), l).unwrap();
        assert_eq!(a.codes, b.codes);
        assert_eq!(a.scales, b.scales);
    }

    #[test]
    fn zeros_and_signs() {
        let k = 64;
        let mut x = gaussianish(k, 9);
        x[3] = 0.0;
        x[4] = -0.0;
        x[5] = 1e-12;
        for f in Format::ALL {
            let (e, _) = encode_rows(&x, Layout::new(f, k, 1, 32)).unwrap();
            let mut d = vec![0f32; k];
            e.decode_row(0, &mut d);
            assert_eq!(d[3], 0.0, "{f}: x = 0 must decode to 0");
            assert_eq!(d[4], 0.0);
            for (a, b) in x.iter().zip(&d) {
                assert!(*b == 0.0 || a.signum() == b.signum(), "{f}: sign flipped {a} -> {b}");
            }
            if f != Format::F32 {
                for i in 0..k {
                    let c = super::super::code_at(f, &e.codes, i);
                    assert_ne!(c, 1 << (f.bits() - 1), "{f}: negative-zero code emitted");
                }
            }
        }
        let zero = vec![0f32; k];
        for f in Format::ALL {
            let (e, errs) = encode_rows(&zero, Layout::new(f, k, 1, 0)).unwrap();
            let mut d = vec![1f32; k];
            e.decode_row(0, &mut d);
            assert!(d.iter().all(|v| *v == 0.0), "{f}");
            assert_eq!(errs[0].see, 0.0);
        }
    }

    #[test]
    fn rejects_non_finite_and_bad_sizes() {
        let mut x = gaussianish(64, 1);
        x[10] = f32::NAN;
        assert!(matches!(
            encode_rows(&x, Layout::new(Format::Q8, 64, 1, 0)),
            Err(EncodeError::NonFinite { k: 10, .. })
        ));
        assert!(matches!(WeightSource::new(&[0u8; 12], Elem::F32, 2, 2), Err(EncodeError::Size { .. })));
        let src = WeightSource::new(&[0u8; 16], Elem::F32, 2, 2).unwrap();
        assert!(matches!(encode_matrix(src, Layout::new(Format::Q8, 2, 1, 0)), Err(EncodeError::Shape { .. })));
        let big = vec![1e6f32; 64];
        assert!(matches!(encode_rows(&big, Layout::new(Format::Q4, 64, 1, 0)), Err(EncodeError::ScaleOverflow { .. })));
    }

    #[test]
    fn search_beats_absmax_scale() {
        let x = gaussianish(4096, 5);
        for f in [Format::Q8, Format::Q6, Format::Q4] {
            let lv = Levels::new(f);
            let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = lv.search(&x, absmax, Isa::Portable);
            let (e_best, _) = lv.pass(&x, s, Isa::Portable);
            let (e_abs, _) = lv.pass(&x, absmax, Isa::Portable);
            assert!(e_best <= e_abs, "{f}: {e_best} > {e_abs}");
        }
    }
}
