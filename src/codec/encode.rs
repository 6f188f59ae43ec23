//! Encoding: the MSE-chosen scale per group and the code assignment.

use super::{decode_z, encode_z, level, pack_row, Encoded, Format, Layout, RowErr};
use half::f16;
use rayon::prelude::*;

/// A `[K, N]` row-major weight as it lies in an ONNX initializer (little-endian).
#[derive(Clone, Copy)]
pub enum WeightSource<'a> {
    F32(&'a [u8]),
    F16(&'a [u8]),
}

impl WeightSource<'_> {
    fn elem_bytes(&self) -> usize {
        match self {
            WeightSource::F32(_) => 4,
            WeightSource::F16(_) => 2,
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            WeightSource::F32(b) | WeightSource::F16(b) => b,
        }
    }

    /// Copies `W[k, n0..n0+out.len()]` into `out` as f32.
    #[inline]
    fn read_row_segment(&self, k: usize, ncols: usize, n0: usize, out: &mut [f32]) {
        let eb = self.elem_bytes();
        let start = (k * ncols + n0) * eb;
        let seg = &self.bytes()[start..start + out.len() * eb];
        match self {
            WeightSource::F32(_) => {
                for (o, c) in out.iter_mut().zip(seg.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            WeightSource::F16(_) => {
                for (o, c) in out.iter_mut().zip(seg.chunks_exact(2)) {
                    *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
        }
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
}

/// Output channels handled together: the transpose reads `BLOCK` contiguous weights of
/// each of the K input rows, which keeps the strided reads at whole cache lines.
const BLOCK: usize = 32;

/// Encodes a `[K, N]` weight. Returns the encoded tensors and per-output-channel errors.
pub fn encode_matrix(src: WeightSource, layout: Layout) -> Result<(Encoded, Vec<RowErr>), EncodeError> {
    let Layout { k, n, .. } = layout;
    check_size(src, k, n)?;
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
            || (vec![0f32; BLOCK * k], vec![0f32; BLOCK], RowEncoder::new(layout)),
            |(buf, seg, enc), (blk, ((codes, scales), errs))| {
                let n0 = blk * BLOCK;
                let nb = errs.len();
                gather_block(src, k, n, n0, &mut seg[..nb], buf);
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

/// Transposes `W[0..K, n0..n0+seg.len()]` into `buf` as `[seg.len(), K]` f32 rows.
pub(crate) fn gather_block(src: WeightSource, k: usize, n: usize, n0: usize, seg: &mut [f32], buf: &mut [f32]) {
    for kk in 0..k {
        src.read_row_segment(kk, n, n0, seg);
        for (j, v) in seg.iter().enumerate() {
            buf[j * k + kk] = *v;
        }
    }
}

/// Runs `f` on every output channel (as a contiguous K-row), `BLOCK` channels per task.
pub(crate) fn map_channels<T: Send, S>(
    src: WeightSource,
    k: usize,
    n: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, &[f32], usize) -> T + Sync + Send,
) -> Vec<T> {
    let blocks: Vec<Vec<T>> = (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .map_init(
            || (vec![0f32; BLOCK * k], vec![0f32; BLOCK], init()),
            |(buf, seg, st), blk| {
                let n0 = blk * BLOCK;
                let nb = BLOCK.min(n - n0);
                gather_block(src, k, n, n0, &mut seg[..nb], buf);
                (0..nb).map(|j| f(st, &buf[j * k..(j + 1) * k], n0 + j)).collect()
            },
        )
        .collect();
    blocks.into_iter().flatten().collect()
}

pub(crate) fn check_size(src: WeightSource, k: usize, n: usize) -> Result<(), EncodeError> {
    let want = k * n * src.elem_bytes();
    if src.bytes().len() != want {
        return Err(EncodeError::Size { k, n, got: src.bytes().len(), want });
    }
    Ok(())
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
    /// `u[m] = D(z_m)` for `a = 1`.
    u: Vec<f32>,
    /// Midpoints `(u[m] + u[m+1]) / 2`.
    mid: Vec<f32>,
    /// `1 / dz`: `|z|` steps by `dz` between magnitudes, so `m ~ (1 - z) / dz`.
    inv_dz: f32,
    /// Clip ratios (times the absmax scale) tried before the Lloyd refinement.
    ratios: &'static [f32],
    lloyd_iters: usize,
}

impl Levels {
    fn new(format: Format) -> Levels {
        let m = format.magnitudes();
        let u: Vec<f32> = (0..m).map(|i| level(format, i) as f32).collect();
        let mid = u.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let dz = (1.0 - format.z_min()) / (m - 1) as f64;
        // Coarse formats gain most from clipping; 8-bit barely moves off the absmax scale.
        let (ratios, lloyd_iters): (&'static [f32], usize) = match format {
            Format::Q8 => (&[1.0], 2),
            Format::Q6 => (&[1.0, 0.9, 0.8], 2),
            _ => (&[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4], 3),
        };
        Levels { u, mid, inv_dz: (1.0 / dz) as f32, ratios, lloyd_iters }
    }

    /// Nearest magnitude to `y = |x| / s`. `t = y / (1 + y)` is `1 - z`, uniform in `m`, so
    /// its floor brackets `y`; one midpoint comparison picks the nearer level. Rounding at
    /// a bracket edge only shifts which midpoint is compared, never the answer.
    #[inline(always)]
    fn nearest(&self, y: f32) -> usize {
        let t = y / (1.0 + y);
        let r = ((t * self.inv_dz) as usize).min(self.u.len() - 2);
        r + (y > self.mid[r]) as usize
    }

    /// One assignment pass at scale `s`: the squared error and the Lloyd update of `s`.
    #[inline]
    fn pass(&self, x: &[f32], s: f32) -> (f32, f32) {
        let inv = 1.0 / s;
        let (mut err, mut xu, mut uu) = (0f32, 0f32, 0f32);
        for &v in x {
            let a = v.abs();
            let u = self.u[self.nearest(a * inv)];
            let d = a - u * s;
            err += d * d;
            xu += a * u;
            uu += u * u;
        }
        (err, if uu > 0.0 { xu / uu } else { s })
    }

    /// The MSE-minimising scale for one group: a few clip ratios, then Lloyd steps.
    fn search(&self, x: &[f32], absmax: f32) -> f32 {
        let s_max = absmax / self.u[self.u.len() - 1];
        let (mut best_err, mut best_s, mut next) = (f32::INFINITY, s_max, s_max);
        for &r in self.ratios {
            let s = s_max * r;
            let (e, upd) = self.pass(x, s);
            if e < best_err {
                (best_err, best_s, next) = (e, s, upd);
            }
        }
        for _ in 0..self.lloyd_iters {
            if !(next > 0.0) || next == best_s {
                break;
            }
            let (e, upd) = self.pass(x, next);
            if e < best_err {
                (best_err, best_s, next) = (e, next, upd);
            } else {
                break;
            }
        }
        best_s
    }
}

struct RowEncoder {
    layout: Layout,
    levels: Option<Levels>,
    codes: Vec<u8>,
}

impl RowEncoder {
    fn new(layout: Layout) -> RowEncoder {
        let levels = layout.format.is_integer().then(|| Levels::new(layout.format));
        let codes = vec![0u8; super::padded_k(layout.k)];
        RowEncoder { layout, levels, codes }
    }

    fn encode(
        &mut self,
        x: &[f32],
        n: usize,
        row: &mut [u8],
        scales: &mut [f32],
        err: &mut RowErr,
    ) -> Result<(), EncodeError> {
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(EncodeError::NonFinite { k: i, n, value: x[i] });
        }
        *err = RowErr::default();
        let Some(lv) = &self.levels else {
            return Ok(self.encode_f32(x, row, scales, err));
        };
        let f = self.layout.format;
        let sign_bit = 1u8 << (f.bits() - 1);
        let lut = f.lut();
        for (gi, xs) in x.chunks(self.layout.group).enumerate() {
            let absmax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = if absmax > 0.0 { lv.search(xs, absmax) } else { 0.0 };
            // Codes are chosen against the scale as stored, so decode sees what we measured.
            let s = f16::from_f32(s).to_f32();
            if !s.is_finite() {
                return Err(EncodeError::ScaleOverflow { n, group: gi, scale: absmax });
            }
            scales[gi] = s;
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            let base = gi * self.layout.group;
            for (j, &v) in xs.iter().enumerate() {
                let m = if s > 0.0 { lv.nearest(v.abs() * inv) as u8 } else { 0 };
                // m = 0 is the one zero: never emit a "negative zero" code.
                let c = if v < 0.0 && m != 0 { m | sign_bit } else { m };
                self.codes[base + j] = c;
                err.add(v, lut[c as usize] * s);
            }
        }
        pack_row(f, &self.codes[..x.len()], row);
        Ok(())
    }

    fn encode_f32(&mut self, x: &[f32], row: &mut [u8], scales: &mut [f32], err: &mut RowErr) {
        let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        // a = 1/absmax keeps |z| in [1/2, 1] where f32 spacing is finest; an all-zero row
        // still needs a > 0 so that z = 1 and not 0/0.
        let s = if absmax > 0.0 { absmax } else { 1.0 };
        scales[0] = s;
        for (&v, out) in x.iter().zip(row.chunks_exact_mut(4)) {
            let z = encode_z(v, s);
            out.copy_from_slice(&z.to_le_bytes());
            err.add(v, decode_z(z, s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn gaussianish(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n).map(|_| (0..4).map(|_| lcg(&mut s)).sum::<f32>() * 0.02).collect()
    }

    #[test]
    fn nearest_matches_brute_force() {
        for f in [Format::Q8, Format::Q6, Format::Q4] {
            let lv = Levels::new(f);
            let mut seed = 7;
            for _ in 0..20000 {
                let y = (lcg(&mut seed).abs() * 1.3).powi(2);
                let m = lv.nearest(y);
                let best = (0..lv.u.len())
                    .min_by(|&a, &b| (lv.u[a] - y).abs().partial_cmp(&(lv.u[b] - y).abs()).unwrap())
                    .unwrap();
                assert!((lv.u[m] - y).abs() <= (lv.u[best] - y).abs() + 1e-7, "{f} y={y} m={m} best={best}");
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
                let (a, ea) = encode_matrix(WeightSource::F32(&bytes), l).unwrap();
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
        let r = encode_matrix(WeightSource::F32(&[0u8; 12]), Layout::new(Format::Q8, 2, 2, 0));
        assert!(matches!(r, Err(EncodeError::Size { .. })));
        let big = vec![1e6f32; 64];
        assert!(matches!(encode_rows(&big, Layout::new(Format::Q4, 64, 1, 0)), Err(EncodeError::ScaleOverflow { .. })));
    }

    #[test]
    fn search_beats_absmax_scale() {
        let x = gaussianish(4096, 5);
        for f in [Format::Q8, Format::Q6, Format::Q4] {
            let lv = Levels::new(f);
            let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = lv.search(&x, absmax);
            let (e_best, _) = lv.pass(&x, s);
            let (e_abs, _) = lv.pass(&x, absmax);
            assert!(e_best <= e_abs, "{f}: {e_best} > {e_abs}");
        }
    }
}
