//! The QINS codec: the one definition of the storage format.
//!
//! QINS companding maps a real `x` to `z = E(x) = sign(x) / (1 + a|x|)` in `[-1, 1]` and
//! back with `D(z) = sign(z) (1 - |z|) / (a |z|)`. Kept as a float, `z` round-trips `x`
//! to float precision ([`Format::F32`]). Stored as an integer code it is a non-uniform
//! quantizer: the magnitude of `z` is restricted to a fixed grid, so decoding a code is
//! `LUT[code] * s` with `s = 1/a` stored per output channel or per group along K.
//!
//! `docs/FORMAT.md` is the prose version of this module; keep the two in step.
//!
//! Layout of an encoded `[K, N]` MatMul weight (ONNX `B` of `Y = A B`):
//! - codes: `[N, row_bytes]` bytes, row `n` holding `W[0..K, n]` packed along K, padded
//!   with zero codes to `K_pad = round_up(K, 64)` so every row starts 16-byte aligned for
//!   vector loads on the GPU;
//! - scales: `[N, ceil(K / G)]`, `s = 1/a` of group `g` covering `k` in `[g G, (g+1) G)`;
//!   fp16 for the integer formats, f32 for [`Format::F32`].

mod baseline;
mod encode;
pub mod kv;
mod stats;

pub use baseline::{baseline_bits_per_weight, baseline_roundtrip, Baseline};
pub use encode::{encode_matrix, encode_rows, stage_swiglu, Elem, EncodeError, GroupCoder, Scratch, WeightSource};
pub use stats::{RowErr, TensorStats};

use std::sync::OnceLock;

/// Rows of codes are padded to a multiple of this many weights (see the module docs).
pub const K_ALIGN: usize = 64;

/// How the companded value `z` is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Format {
    /// `z` as an IEEE f32 per weight, `a` per output channel: float precision, 32 bits.
    F32,
    /// 1 sign bit + 7 magnitude bits, one byte per weight.
    Q8,
    /// 1 sign bit + 5 magnitude bits; 4 codes in 3 bytes.
    Q6,
    /// 1 sign bit + 3 magnitude bits; 2 codes per byte, low nibble first.
    Q4,
}

impl Format {
    pub const ALL: [Format; 4] = [Format::F32, Format::Q8, Format::Q6, Format::Q4];

    /// Bits per stored weight (the `bits` attribute of the op).
    pub const fn bits(self) -> u32 {
        match self {
            Format::F32 => 32,
            Format::Q8 => 8,
            Format::Q6 => 6,
            Format::Q4 => 4,
        }
    }

    pub fn from_bits(bits: i64) -> Option<Format> {
        match bits {
            32 => Some(Format::F32),
            8 => Some(Format::Q8),
            6 => Some(Format::Q6),
            4 => Some(Format::Q4),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::Q8 => "q8",
            Format::Q6 => "q6",
            Format::Q4 => "q4",
        }
    }

    pub fn parse(s: &str) -> Option<Format> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "32" | "float" => Some(Format::F32),
            "q8" | "8" => Some(Format::Q8),
            "q6" | "6" => Some(Format::Q6),
            "q4" | "4" => Some(Format::Q4),
            _ => None,
        }
    }

    pub const fn is_integer(self) -> bool {
        !matches!(self, Format::F32)
    }

    /// Number of magnitude levels `M` (including the zero level) of an integer format.
    pub const fn magnitudes(self) -> usize {
        match self {
            Format::F32 => 0,
            Format::Q8 => 128,
            Format::Q6 => 32,
            Format::Q4 => 8,
        }
    }

    /// Smallest `|z|` on the grid. `z_min = 1/2` puts the grid on `a|x|` in `[0, 1]`, so
    /// `1/a` is the clipping level; it was chosen on synthetic Gaussian, Laplace and
    /// Student-t weights (see docs/FORMAT.md), not on any evaluation model.
    pub const fn z_min(self) -> f64 {
        0.5
    }

    /// The fixed decode table: `LUT[code] * s` is the weight. Indexed by the full signed
    /// code (`2^bits` entries); empty for [`Format::F32`].
    pub fn lut(self) -> &'static [f32] {
        static LUTS: OnceLock<[Vec<f32>; 3]> = OnceLock::new();
        let luts = LUTS.get_or_init(|| [build_lut(Format::Q8), build_lut(Format::Q6), build_lut(Format::Q4)]);
        match self {
            Format::F32 => &[],
            Format::Q8 => &luts[0],
            Format::Q6 => &luts[1],
            Format::Q4 => &luts[2],
        }
    }

    /// Bytes of one packed row of `k` weights (padded to [`K_ALIGN`]).
    pub const fn row_bytes(self, k: usize) -> usize {
        padded_k(k) * self.bits() as usize / 8
    }

    /// ONNX element type of the scales tensor: FLOAT16 for integer codes, FLOAT for F32.
    pub const fn scale_elem_type(self) -> i32 {
        match self {
            Format::F32 => 1,
            _ => 10,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub const fn padded_k(k: usize) -> usize {
    k.div_ceil(K_ALIGN) * K_ALIGN
}

/// Grid of `|z|` for magnitude `m` of an integer format: uniform on `[z_min, 1]`, with
/// `m = 0` at `z = 1` (the weight 0) and `m = M-1` at `z_min`. No code stands for `z = 0`.
pub fn z_grid(format: Format, m: usize) -> f64 {
    let mm = format.magnitudes();
    assert!(mm > 0 && m < mm);
    1.0 - m as f64 * (1.0 - format.z_min()) / (mm - 1) as f64
}

/// `D(z)` with `a = 1`: the magnitude of the weight that code magnitude `m` stands for,
/// in units of `s = 1/a`.
pub fn level(format: Format, m: usize) -> f64 {
    let z = z_grid(format, m);
    (1.0 - z) / z
}

fn build_lut(format: Format) -> Vec<f32> {
    let bits = format.bits();
    let sign_bit = 1usize << (bits - 1);
    (0..1usize << bits)
        .map(|code| {
            let v = level(format, code & (sign_bit - 1)) as f32;
            if code & sign_bit != 0 {
                -v
            } else {
                v
            }
        })
        .collect()
}

/// Shape and format of one encoded weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Layout {
    pub format: Format,
    /// Input features (rows of the ONNX weight).
    pub k: usize,
    /// Output features (columns of the ONNX weight).
    pub n: usize,
    /// Group size along K; `group == k` is one scale per output channel.
    pub group: usize,
}

impl Layout {
    /// `group == 0` means per output channel. F32 is always per channel.
    pub fn new(format: Format, k: usize, n: usize, group: usize) -> Layout {
        let group = if group == 0 || group >= k || format == Format::F32 { k } else { group };
        Layout { format, k, n, group }
    }

    pub fn groups(&self) -> usize {
        self.k.div_ceil(self.group)
    }

    /// Bytes of one row of the codes tensor (for F32: `4 K`, unpadded floats).
    pub fn row_bytes(&self) -> usize {
        match self.format {
            Format::F32 => 4 * self.k,
            f => f.row_bytes(self.k),
        }
    }

    pub fn codes_len(&self) -> usize {
        self.n * self.row_bytes()
    }

    pub fn scales_len(&self) -> usize {
        self.n * self.groups()
    }

    pub fn scale_bytes(&self) -> usize {
        match self.format {
            Format::F32 => 4,
            _ => 2,
        }
    }

    /// Stored bytes (codes, padding and scales).
    pub fn stored_bytes(&self) -> usize {
        self.codes_len() + self.scales_len() * self.scale_bytes()
    }

    /// Bits per weight including padding and scales.
    pub fn bits_per_weight(&self) -> f64 {
        self.stored_bytes() as f64 * 8.0 / (self.k * self.n) as f64
    }

    /// ONNX shape of the codes tensor: `[N, row_bytes]` uint8, or `[N, K]` float for F32.
    pub fn codes_shape(&self) -> [i64; 2] {
        match self.format {
            Format::F32 => [self.n as i64, self.k as i64],
            _ => [self.n as i64, self.row_bytes() as i64],
        }
    }

    pub fn scales_shape(&self) -> [i64; 2] {
        [self.n as i64, self.groups() as i64]
    }
}

/// Output channels of one half-tile of the fused SwiGLU layout (`swiglu = 1`, docs/FORMAT.md).
pub const SWIGLU_TILE: usize = 8;

/// Stored row (output channel of the encoded `[K, 2I]` weight) that holds output `j` of a
/// fused SwiGLU's gate (`up = false`) or up projection. Every 16 stored rows are 8 gate
/// channels then the same 8 up channels: a block of the CUDA token kernel, which takes whole
/// 16-channel tiles, then holds both factors of its outputs.
pub const fn swiglu_row(j: usize, up: bool) -> usize {
    2 * SWIGLU_TILE * (j / SWIGLU_TILE) + j % SWIGLU_TILE + if up { SWIGLU_TILE } else { 0 }
}

/// `silu(g) * u` = `g / (1 + e^-g) * u` in f32: the fused op's epilogue, on every path.
pub fn silu_mul(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

/// Applies the fused SwiGLU epilogue to `m` rows of a `[m, 2I]` product laid out by
/// [`swiglu_row`], giving `[m, I]`.
pub fn swiglu_combine(y2: &[f32], m: usize, y: &mut [f32]) {
    // No rows (M = 0, a valid empty batch): nothing to combine, and no row width to step by.
    if m == 0 || y.is_empty() {
        return;
    }
    let i = y.len() / m;
    for (out, row) in y.chunks_exact_mut(i).zip(y2.chunks_exact(2 * i)) {
        for (j, o) in out.iter_mut().enumerate() {
            *o = silu_mul(row[swiglu_row(j, false)], row[swiglu_row(j, true)]);
        }
    }
}

/// An encoded weight: the two tensors the QINS op takes besides the activations.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub layout: Layout,
    /// `[N, row_bytes]`: packed codes, or for F32 the little-endian f32 `z` values.
    pub codes: Vec<u8>,
    /// `[N, groups]`: `s = 1/a`, already rounded to fp16 for the integer formats.
    pub scales: Vec<f32>,
}

impl Encoded {
    /// Scales as stored in the model: fp16 or f32 little-endian bytes.
    pub fn scale_bytes(&self) -> Vec<u8> {
        match self.layout.format {
            Format::F32 => self.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
            _ => self.scales.iter().flat_map(|s| half::f16::from_f32(*s).to_le_bytes()).collect(),
        }
    }

    /// Decodes the whole weight back to `[K, N]` (ONNX layout), for tests and reports.
    pub fn decode_kn(&self) -> Vec<f32> {
        let l = self.layout;
        let mut out = vec![0f32; l.k * l.n];
        let mut row = vec![0f32; l.k];
        for n in 0..l.n {
            self.decode_row(n, &mut row);
            for (k, v) in row.iter().enumerate() {
                out[k * l.n + n] = *v;
            }
        }
        out
    }

    /// Decodes output channel `n` (`W[0..K, n]`) into `out[..K]`.
    pub fn decode_row(&self, n: usize, out: &mut [f32]) {
        let l = self.layout;
        let g = l.groups();
        decode_row(
            l.format,
            l.k,
            l.group,
            &self.codes[n * l.row_bytes()..(n + 1) * l.row_bytes()],
            &self.scales[n * g..(n + 1) * g],
            out,
        );
    }
}

/// Reads code `i` of a packed row. The reference for every kernel's unpacking.
#[inline(always)]
pub fn code_at(format: Format, row: &[u8], i: usize) -> u8 {
    match format {
        Format::Q8 => row[i],
        Format::Q4 => (row[i / 2] >> ((i & 1) * 4)) & 0x0f,
        Format::Q6 => {
            let b = &row[i / 4 * 3..i / 4 * 3 + 3];
            let w = b[0] as u32 | (b[1] as u32) << 8 | (b[2] as u32) << 16;
            ((w >> ((i & 3) * 6)) & 0x3f) as u8
        }
        Format::F32 => panic!("F32 rows hold floats, not codes"),
    }
}

/// Packs one code per weight (`codes.len() <= K_pad`) into a row of `format.row_bytes`.
pub fn pack_row(format: Format, codes: &[u8], row: &mut [u8]) {
    row.fill(0);
    match format {
        Format::Q8 => row[..codes.len()].copy_from_slice(codes),
        Format::Q4 => {
            let pairs = codes.chunks_exact(2);
            let odd = pairs.remainder().first().copied();
            let n = codes.len() / 2;
            for (b, p) in row[..n].iter_mut().zip(pairs) {
                *b = (p[0] & 0x0f) | (p[1] & 0x0f) << 4;
            }
            if let Some(c) = odd {
                row[n] = c & 0x0f;
            }
        }
        Format::Q6 => {
            let quads = codes.chunks_exact(4);
            let rest = quads.remainder();
            let n = codes.len() / 4;
            let pack = |q: &[u8]| q.iter().enumerate().fold(0u32, |w, (t, &c)| w | ((c & 0x3f) as u32) << (6 * t));
            for (dst, q) in row[..3 * n].chunks_exact_mut(3).zip(quads) {
                dst.copy_from_slice(&pack(q).to_le_bytes()[..3]);
            }
            if !rest.is_empty() {
                row[3 * n..3 * n + 3].copy_from_slice(&pack(rest).to_le_bytes()[..3]);
            }
        }
        Format::F32 => panic!("F32 rows hold floats, not codes"),
    }
}

/// Decodes one row (`k` weights) of codes with its per-group scales: the CPU reference
/// that every kernel is checked against.
pub fn decode_row(format: Format, k: usize, group: usize, row: &[u8], scales: &[f32], out: &mut [f32]) {
    let out = &mut out[..k];
    if format == Format::F32 {
        let s = scales[0];
        for (o, z) in out.iter_mut().zip(row.chunks_exact(4)) {
            *o = decode_z(f32::from_le_bytes([z[0], z[1], z[2], z[3]]), s);
        }
        return;
    }
    let lut = format.lut();
    match format {
        Format::Q8 => {
            for (g, chunk) in out.chunks_mut(group).enumerate() {
                let s = scales[g];
                let base = g * group;
                for (j, o) in chunk.iter_mut().enumerate() {
                    *o = lut[row[base + j] as usize] * s;
                }
            }
        }
        _ => {
            for (g, chunk) in out.chunks_mut(group).enumerate() {
                let s = scales[g];
                let base = g * group;
                for (j, o) in chunk.iter_mut().enumerate() {
                    *o = lut[code_at(format, row, base + j) as usize] * s;
                }
            }
        }
    }
}

/// `E(x)` with `a = 1/s`, in f64 so the only rounding is the final one to f32.
/// `x = 0` maps to `z = +1` (the code for 0), never to `z = 0` (which stands for infinity).
#[inline]
pub fn encode_z(x: f32, s: f32) -> f32 {
    let (x, s) = (x as f64, s as f64);
    let z = s / (s + x.abs());
    (if x < 0.0 { -z } else { z }) as f32
}

/// `D(z)` with `a = 1/s`, as `s (1/|z| - 1)`: with `s` a power of two (as the f32 encoder
/// picks it) the reciprocal is the only rounding step, since subtracting 1 from a float in
/// [1, 2^24) and scaling by 2^k are exact. That is what lets most weights round-trip bit
/// for bit.
#[inline]
pub fn decode_z(z: f32, s: f32) -> f32 {
    let m = z.abs();
    let v = (1.0 / m - 1.0) * s;
    if z < 0.0 {
        -v
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_staging_follows_swiglu_row() {
        let (k, i) = (3, 24);
        let g: Vec<f32> = (0..k * i).map(|v| v as f32).collect();
        let u: Vec<f32> = (0..k * i).map(|v| -(v as f32) - 1.0).collect();
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (gb, ub) = (bytes(&g), bytes(&u));
        let gs = WeightSource::new(&gb, Elem::F32, k, i).unwrap();
        let us = WeightSource::new(&ub, Elem::F32, k, i).unwrap();
        let mut scratch = Scratch::new();
        let w = stage_swiglu(&gs, &us, &mut scratch).unwrap().to_dense_bytes();
        let at = |kk: usize, c: usize| {
            let o = (kk * 2 * i + c) * 4;
            f32::from_le_bytes(w[o..o + 4].try_into().unwrap())
        };
        for kk in 0..k {
            for j in 0..i {
                assert_eq!(at(kk, swiglu_row(j, false)), g[kk * i + j]);
                assert_eq!(at(kk, swiglu_row(j, true)), u[kk * i + j]);
            }
        }
        let odd = WeightSource::new(&gb[..k * 12 * 4], Elem::F32, k, 12).unwrap();
        assert!(stage_swiglu(&odd, &odd, &mut scratch).is_err());
        let mut y = [0.0f32; 8];
        let y2: Vec<f32> = (0..16).map(|v| v as f32 - 4.0).collect();
        swiglu_combine(&y2, 1, &mut y);
        assert_eq!(y[1], silu_mul(-3.0, 5.0));
        assert!((silu_mul(2.0, 3.0) - 2.0 / (1.0 + (-2.0f32).exp()) * 3.0).abs() < 1e-6);
    }

    #[test]
    fn lut_is_monotone_and_zero_is_exact() {
        for f in [Format::Q8, Format::Q6, Format::Q4] {
            let lut = f.lut();
            let m = f.magnitudes();
            assert_eq!(lut.len(), 2 * m);
            assert_eq!(lut[0], 0.0);
            for i in 1..m {
                assert!(lut[i] > lut[i - 1], "{f} level {i}");
                assert_eq!(lut[m + i], -lut[i]);
            }
            // z_min = 1/2 puts the top level at a|x| = 1.
            assert!((lut[m - 1] - 1.0).abs() < 1e-7);
        }
    }

    #[test]
    fn pack_unpack_round_trip() {
        for f in [Format::Q8, Format::Q6, Format::Q4] {
            for k in [1usize, 3, 4, 63, 64, 65, 200] {
                let codes: Vec<u8> = (0..k).map(|i| ((i * 37 + 11) % (1 << f.bits())) as u8).collect();
                let mut row = vec![0xAAu8; f.row_bytes(k)];
                pack_row(f, &codes, &mut row);
                for (i, &c) in codes.iter().enumerate() {
                    assert_eq!(code_at(f, &row, i), c, "{f} k={k} i={i}");
                }
                for i in k..padded_k(k) {
                    assert_eq!(code_at(f, &row, i), 0, "padding must decode to 0");
                }
            }
        }
    }

    #[test]
    fn z_of_zero_is_one_not_zero() {
        assert_eq!(encode_z(0.0, 0.5), 1.0);
        assert_eq!(decode_z(1.0, 0.5), 0.0);
        assert_eq!(encode_z(-0.0, 0.5), 1.0);
    }
}
