//! The KV cache's V format (`docs/FORMAT.md`, "The V cache"): the one definition used by the
//! attention op's CPU kernel, its CUDA kernels' references and the tests.
//!
//! A *V row* is one position of one KV head: `head_dim` values, stored as QINS codes on the
//! weights' grid ([`Format::lut`]) followed by the row's scale `s = 1/a` as a little-endian
//! f32. Decoding is `LUT[code] * s`, as for weights. Keys are not coded (the Q/K path stays
//! float). Each row gets its own scale when it is written: no calibration, nothing clipped
//! when a prompt leaves a calibrated range, and a row never changes once written.
//!
//! Row bytes: `head_dim` codes for q8 (one byte each), `head_dim / 2` for q4 (low nibble
//! first, as [`super::pack_row`] packs weights), then 4 scale bytes; `head_dim` must be a
//! multiple of 8, so that the scale sits 4-byte aligned and every row starts 4-byte aligned
//! (q8 64: 68 bytes, q8 96: 100, q4 64: 36). No further padding: vector loads of 4 bytes are
//! what a warp reading a row needs, and padding to 16 would cost 12-18% more V bytes.

use super::Format;

/// Bytes of a row's scale (an f32 after the codes).
pub const V_SCALE_BYTES: usize = 4;

/// Largest head size a V row may have. Bounds every buffer the attention op sizes from it.
pub const MAX_HEAD_DIM: usize = 512;

/// Clip ratios (times the absmax scale) tried for a row, largest first, before one Lloyd
/// step. On SmolLM2's V rows (`graph-rewrite/examples/kv_rows.rs`, docs/FORMAT.md) the search
/// has 4% (q8) and 10% (q4) less squared error than the absmax scale alone.
pub fn v_ratios(format: Format) -> &'static [f32] {
    match format {
        Format::Q8 => &[1.0, 0.96, 0.92, 0.88, 0.84, 0.8],
        _ => &[1.0, 0.9, 0.8, 0.7, 0.6, 0.5],
    }
}

/// The formats a V row may take.
pub fn is_v_format(format: Format) -> bool {
    matches!(format, Format::Q8 | Format::Q4)
}

/// Bytes of one V row of `head_dim` values, or `None` where the format or the head size is
/// not one a V row can have (q8 or q4; `head_dim` a multiple of 8 in `8..=MAX_HEAD_DIM`).
pub fn v_row_bytes(format: Format, head_dim: usize) -> Option<usize> {
    if !is_v_format(format) || head_dim == 0 || !head_dim.is_multiple_of(8) || head_dim > MAX_HEAD_DIM {
        return None;
    }
    Some(head_dim * format.bits() as usize / 8 + V_SCALE_BYTES)
}

/// The head size a V row of `row_bytes` bytes holds (the inverse of [`v_row_bytes`]).
pub fn v_head_dim(format: Format, row_bytes: usize) -> Option<usize> {
    let codes = row_bytes.checked_sub(V_SCALE_BYTES)?;
    let hd = codes * 8 / format.bits() as usize;
    (v_row_bytes(format, hd) == Some(row_bytes)).then_some(hd)
}

/// The grid's nearest magnitude to `y = |x| / s` (`y >= 0`), from the grid formula: `|z|`
/// is uniform in steps of `dz`, so `t = y / (1 + y) = 1 - |z|` lies between magnitudes
/// `floor(t / dz)` and the next, and the nearer of their levels in `y` wins. The CUDA
/// kernels compute the same expression.
#[inline(always)]
fn nearest(format: Format, y: f32) -> u8 {
    let mm = format.magnitudes();
    let dz = ((1.0 - format.z_min()) / (mm - 1) as f64) as f32;
    let inv_dz = (1.0 / ((1.0 - format.z_min()) / (mm - 1) as f64)) as f32;
    let t = y / (1.0 + y);
    let r = ((t * inv_dz) as i32 as f32).clamp(0.0, (mm - 2) as f32);
    let (t0, t1) = (r * dz, (r + 1.0) * dz);
    let mid2 = t0 / (1.0 - t0) + t1 / (1.0 - t1);
    (r + if y + y > mid2 { 1.0 } else { 0.0 }) as u8
}

/// The row's squared error at scale `s` and the Lloyd update of `s` (the least-squares scale
/// for the codes `s` picks).
fn pass(format: Format, x: &[f32], s: f32) -> (f32, f32) {
    let lut = format.lut();
    let inv = 1.0 / s;
    let (mut err, mut xu, mut uu) = (0f32, 0f32, 0f32);
    for &v in x {
        let a = v.abs();
        let u = lut[nearest(format, a * inv) as usize];
        let d = a - u * s;
        err += d * d;
        xu += a * u;
        uu += u * u;
    }
    (err, if uu > 0.0 { xu / uu } else { s })
}

/// The scale a row is stored with: the best of [`v_ratios`] times the absmax scale, then one
/// Lloyd step where it lowers the error. `absmax` is the row's largest magnitude (> 0).
pub fn v_row_scale(format: Format, x: &[f32], absmax: f32) -> f32 {
    // The grid's largest level is 1 (z_min = 1/2), so s = absmax reaches the largest value.
    let (mut best_e, mut best_s, mut next) = (f32::INFINITY, absmax, absmax);
    for &r in v_ratios(format) {
        let s = absmax * r;
        let (e, upd) = pass(format, x, s);
        if e < best_e {
            (best_e, best_s, next) = (e, s, upd);
        }
    }
    if next.is_finite() && next > 0.0 && next != best_s && pass(format, x, next).0 < best_e {
        best_s = next;
    }
    best_s
}

/// Encodes one row of `head_dim = x.len()` values into `row` (`v_row_bytes` bytes). A row
/// with a NaN or an infinity is stored with a NaN scale, so that it decodes to NaN as a float
/// cache would carry it; an all-zero row has scale 0.
pub fn encode_v_row(format: Format, x: &[f32], row: &mut [u8]) {
    let hd = x.len();
    let codes_len = hd * format.bits() as usize / 8;
    assert_eq!(Some(row.len()), v_row_bytes(format, hd), "V row of {hd} values");
    let absmax = x.iter().fold(0f32, |m, v| if v.abs() > m || v.is_nan() { v.abs() } else { m });
    let (codes, scale) = row.split_at_mut(codes_len);
    if !absmax.is_finite() || absmax == 0.0 {
        codes.fill(0);
        let s = if absmax == 0.0 { 0.0 } else { f32::NAN };
        scale.copy_from_slice(&s.to_le_bytes());
        return;
    }
    encode_v_row_at(format, x, v_row_scale(format, x, absmax), row);
}

/// Encodes one finite row at a given scale `s > 0` (for comparing scale rules; the cache
/// uses [`encode_v_row`]).
pub fn encode_v_row_at(format: Format, x: &[f32], s: f32, row: &mut [u8]) {
    let codes_len = x.len() * format.bits() as usize / 8;
    let (codes, scale) = row.split_at_mut(codes_len);
    let inv = 1.0 / s;
    let sign_bit = 1u8 << (format.bits() - 1);
    let code = |v: f32| {
        let m = nearest(format, v.abs() * inv);
        // m = 0 is the one zero: no "negative zero" code.
        if v < 0.0 && m != 0 {
            m | sign_bit
        } else {
            m
        }
    };
    match format {
        Format::Q8 => codes.iter_mut().zip(x).for_each(|(c, &v)| *c = code(v)),
        _ => codes.iter_mut().zip(x.chunks_exact(2)).for_each(|(c, p)| *c = code(p[0]) | code(p[1]) << 4),
    }
    scale.copy_from_slice(&s.to_le_bytes());
}

/// The row's scale.
#[inline]
pub fn v_scale(row: &[u8]) -> f32 {
    let b = &row[row.len() - V_SCALE_BYTES..];
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Decodes one row into `out[..head_dim]`: `LUT[code] * s`. The reference every kernel is
/// checked against.
pub fn decode_v_row(format: Format, row: &[u8], out: &mut [f32]) {
    let s = v_scale(row);
    let lut = format.lut();
    let codes = &row[..row.len() - V_SCALE_BYTES];
    match format {
        Format::Q8 => out.iter_mut().zip(codes).for_each(|(o, &c)| *o = lut[c as usize] * s),
        _ => {
            for (o, &c) in out.chunks_exact_mut(2).zip(codes) {
                o[0] = lut[(c & 0x0f) as usize] * s;
                o[1] = lut[(c >> 4) as usize] * s;
            }
        }
    }
}

/// The uniform int8 row at the same bytes (absmax / 127, round to nearest, an f32 scale): the
/// baseline QINS V rows are compared with (`graph-rewrite/examples/kv_rows.rs`). Returns the decoded row.
pub fn uniform_int8_row(x: &[f32], out: &mut [f32]) {
    let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s = absmax / 127.0;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = if s > 0.0 { (v / s).round().clamp(-127.0, 127.0) * s } else { 0.0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(hd: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::SplitMix64::seeded(seed);
        // A bell shape with a few outliers, as V rows have them.
        (0..hd)
            .map(|i| {
                let g = (0..4).map(|_| r.unit() as f32 * 2.0 - 1.0).sum::<f32>() * 0.4;
                if i % 29 == 3 {
                    g * 6.0
                } else {
                    g
                }
            })
            .collect()
    }

    fn nmse(a: &[f32], b: &[f32]) -> f64 {
        let e: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let s: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
        e / s
    }

    #[test]
    fn row_sizes() {
        assert_eq!(v_row_bytes(Format::Q8, 64), Some(68));
        assert_eq!(v_row_bytes(Format::Q8, 96), Some(100));
        assert_eq!(v_row_bytes(Format::Q4, 64), Some(36));
        assert_eq!(v_row_bytes(Format::Q4, 96), Some(52));
        for (f, hd) in [(Format::Q8, 60), (Format::Q6, 64), (Format::F32, 64), (Format::Q8, 0), (Format::Q8, 520)] {
            assert_eq!(v_row_bytes(f, hd), None, "{f} {hd}");
        }
        for f in [Format::Q8, Format::Q4] {
            for hd in [8, 64, 96, 128, 512] {
                assert_eq!(v_head_dim(f, v_row_bytes(f, hd).unwrap()), Some(hd));
            }
            assert_eq!(v_head_dim(f, 3), None);
            assert_eq!(v_head_dim(f, 69), None);
        }
    }

    #[test]
    fn round_trip_error_is_small_and_beats_absmax() {
        for (f, bar) in [(Format::Q8, 2e-4), (Format::Q4, 4e-2)] {
            let rb = v_row_bytes(f, 96).unwrap();
            let (mut tot, mut tot_abs) = (0.0, 0.0);
            for seed in 0..200 {
                let x = row(96, seed);
                let mut enc = vec![0u8; rb];
                encode_v_row(f, &x, &mut enc);
                let mut y = vec![0f32; 96];
                decode_v_row(f, &enc, &mut y);
                let e = nmse(&x, &y);
                assert!(e < bar, "{f} seed {seed}: nMSE {e}");
                tot += e;
                // The absmax scale alone, for comparison: the search must never be worse.
                let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let e_abs = pass(f, &x, absmax).0 as f64 / x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
                assert!(e <= e_abs * 1.0001, "{f} seed {seed}: {e} > absmax {e_abs}");
                tot_abs += e_abs;
            }
            // Rows with outliers leave q8 little room below absmax; q4 gains more.
            let gain = if f == Format::Q8 { 0.99 } else { 0.95 };
            assert!(tot < tot_abs * gain, "{f}: the search gains too little over absmax ({tot} vs {tot_abs})");
        }
    }

    #[test]
    fn codes_decode_through_the_weights_table() {
        let x = row(64, 7);
        let mut enc = vec![0u8; 68];
        encode_v_row(Format::Q8, &x, &mut enc);
        let s = v_scale(&enc);
        let mut y = vec![0f32; 64];
        decode_v_row(Format::Q8, &enc, &mut y);
        for i in 0..64 {
            assert_eq!(y[i], Format::Q8.lut()[enc[i] as usize] * s);
            // Nearest level: no other code of the same sign is closer.
            let best = (0..128u8)
                .map(|m| if x[i] < 0.0 && m != 0 { m | 0x80 } else { m })
                .map(|c| (Format::Q8.lut()[c as usize] * s - x[i]).abs())
                .fold(f32::INFINITY, f32::min);
            assert!((y[i] - x[i]).abs() <= best * 1.0001 + 1e-9, "value {i}");
        }
    }

    #[test]
    fn zero_and_non_finite_rows() {
        let mut enc = vec![0xffu8; 68];
        encode_v_row(Format::Q8, &[0.0; 64], &mut enc);
        let mut y = vec![1f32; 64];
        decode_v_row(Format::Q8, &enc, &mut y);
        assert!(y.iter().all(|v| *v == 0.0));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = row(64, 3);
            x[10] = bad;
            encode_v_row(Format::Q8, &x, &mut enc);
            decode_v_row(Format::Q8, &enc, &mut y);
            assert!(v_scale(&enc).is_nan() && y.iter().all(|v| v.is_nan()));
        }
    }

    #[test]
    fn qins_q8_rows_against_uniform_int8() {
        // On bell-shaped rows the grid's finer steps near zero win over uniform steps (the
        // measured numbers on real V rows are in docs/FORMAT.md).
        let (mut q, mut u) = (0.0, 0.0);
        for seed in 0..100 {
            let x = row(64, 100 + seed);
            let mut enc = vec![0u8; 68];
            encode_v_row(Format::Q8, &x, &mut enc);
            let mut y = vec![0f32; 64];
            decode_v_row(Format::Q8, &enc, &mut y);
            q += nmse(&x, &y);
            uniform_int8_row(&x, &mut y);
            u += nmse(&x, &y);
        }
        assert!(q < u && q / 100.0 < 1e-4, "qins {q}, int8 {u}");
    }
}
