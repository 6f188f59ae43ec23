//! ggml tensor types: their storage sizes, and dequantization of the ones the importer reads.
//!
//! Block layouts follow ggml's `ggml-common.h`; every scale is an IEEE half. Values are
//! computed exactly as ggml's reference `dequantize_row_*` does (f32 multiply, then add),
//! so an import reproduces the weights llama.cpp itself would use.

use anyhow::{bail, Result};
use half::{bf16, f16};
use rayon::prelude::*;

/// The ggml types whose storage size is known, so that a file holding them can be checked.
/// Only some can be dequantized (see [`GgmlType::can_dequantize`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            BF16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            BF16 => "BF16",
        }
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (u64, u64) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2K => (256, 84),
            Q3K => (256, 110),
            Q4K => (256, 144),
            Q5K => (256, 176),
            Q6K => (256, 210),
            Q8K => (256, 292),
        }
    }

    /// Storage size of a tensor whose innermost dimension is `ne0`; ggml never splits a
    /// block across rows, so `ne0` must hold whole blocks.
    pub fn bytes_for(self, ne0: u64, numel: u64) -> Result<u64> {
        let (be, bb) = self.block();
        if !ne0.is_multiple_of(be) {
            bail!("{} stores blocks of {be} values, but rows have {ne0}", self.name());
        }
        (numel / be).checked_mul(bb).ok_or_else(|| anyhow::anyhow!("size overflows"))
    }

    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0)
    }
}

/// The types [`dequantize`] reads, for error messages.
pub const DEQUANTIZABLE: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0";

/// Dequantizes `data` (whole blocks of type `ty`) into `out`, in parallel for big tensors.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    if !ty.can_dequantize() {
        bail!("tensors of type {} cannot be read by this importer (it reads {DEQUANTIZABLE})", ty.name());
    }
    let (be, bb) = ty.block();
    let (be, bb) = (be as usize, bb as usize);
    if !out.len().is_multiple_of(be) || data.len() != out.len() / be * bb {
        bail!("{} data of {} bytes does not hold {} values", ty.name(), data.len(), out.len());
    }
    let f: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, o| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, o| o[0] = f16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::BF16 => |b, o| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => block_q4_0,
        GgmlType::Q4_1 => block_q4_1,
        GgmlType::Q5_0 => block_q5_0,
        GgmlType::Q5_1 => block_q5_1,
        GgmlType::Q8_0 => block_q8_0,
        _ => unreachable!("checked by can_dequantize"),
    };
    // Chunks of ~64K values: big enough that rayon's overhead vanishes, small enough to
    // spread a 576x576 matrix over all cores.
    let per_chunk = (1 << 16) / be;
    out.par_chunks_mut(per_chunk * be).zip(data.par_chunks(per_chunk * bb)).for_each(|(o, d)| {
        for (ob, db) in o.chunks_exact_mut(be).zip(d.chunks_exact(bb)) {
            f(db, ob);
        }
    });
    Ok(())
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `{ d: f16, qs: [u8; 16] }`: low nibbles are values 0..16, high nibbles 16..32, offset 8.
fn block_q4_0(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        o[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// `{ d: f16, m: f16, qs: [u8; 16] }`: value = q * d + m, nibbles as in Q4_0.
fn block_q4_1(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    for j in 0..16 {
        let q = b[4 + j];
        o[j] = (q & 0x0F) as f32 * d + m;
        o[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// `{ d: f16, qh: u32, qs: [u8; 16] }`: bit j of `qh` is the fifth bit of value j.
fn block_q5_0(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let q = b[6 + j];
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        o[j] = (((q & 0x0F) | h0) as i32 - 16) as f32 * d;
        o[j + 16] = (((q >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

/// `{ d: f16, m: f16, qh: u32, qs: [u8; 16] }`: Q5_0's bits, value = q * d + m.
fn block_q5_1(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let q = b[8 + j];
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        o[j] = ((q & 0x0F) | h0) as f32 * d + m;
        o[j + 16] = ((q >> 4) | h1) as f32 * d + m;
    }
}

/// `{ d: f16, qs: [i8; 32] }`.
fn block_q8_0(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    for j in 0..32 {
        o[j] = (b[2 + j] as i8) as f32 * d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q4_1_block_by_hand() {
        // d = 0.5, m = -1.0; byte j holds value j (low nibble) and 15 - j (high nibble).
        let mut b = Vec::new();
        b.extend(h(0.5));
        b.extend(h(-1.0));
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let mut o = [0f32; 32];
        dequantize(GgmlType::Q4_1, &b, &mut o).unwrap();
        for j in 0..16 {
            assert_eq!(o[j], j as f32 * 0.5 - 1.0, "low nibble {j}");
            assert_eq!(o[j + 16], (15 - j) as f32 * 0.5 - 1.0, "high nibble {j}");
        }
        assert_eq!(o[0], -1.0);
        assert_eq!(o[15], 6.5);
        assert_eq!(o[16], 6.5);
        assert_eq!(o[31], -1.0);
    }

    #[test]
    fn q8_0_block_by_hand() {
        let mut b = Vec::new();
        b.extend(h(0.25));
        let qs: Vec<i8> = (0..32).map(|j| (j as i8 - 16) * 8).collect();
        b.extend(qs.iter().map(|&q| q as u8));
        let mut o = [0f32; 32];
        dequantize(GgmlType::Q8_0, &b, &mut o).unwrap();
        assert_eq!(o[0], -32.0); // -128 * 0.25
        assert_eq!(o[16], 0.0);
        assert_eq!(o[31], 30.0); // 120 * 0.25
        for j in 0..32 {
            assert_eq!(o[j], qs[j] as f32 * 0.25);
        }
    }

    #[test]
    fn q8_0_uses_the_half_scale_as_stored() {
        // 0.1 is not a half: the stored scale is its nearest half, 0.0999755859375.
        let mut b = Vec::new();
        b.extend(h(0.1));
        b.extend([1u8, 0xFF].repeat(16));
        let mut o = [0f32; 32];
        dequantize(GgmlType::Q8_0, &b, &mut o).unwrap();
        assert_eq!(o[0], 0.099975586);
        assert_eq!(o[1], -0.099975586);
    }

    #[test]
    fn q4_0_block_by_hand() {
        let mut b = Vec::new();
        b.extend(h(2.0));
        for j in 0..16u8 {
            b.push(j | (8 << 4));
        }
        let mut o = [0f32; 32];
        dequantize(GgmlType::Q4_0, &b, &mut o).unwrap();
        assert_eq!(o[0], -16.0);
        assert_eq!(o[8], 0.0);
        assert_eq!(o[15], 14.0);
        assert!(o[16..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn q5_0_and_q5_1_fifth_bits() {
        // qs all zero; qh sets the fifth bit of values 1 and 17 (bits 1 and 17).
        let qh: u32 = (1 << 1) | (1 << 17);
        let mut b = Vec::new();
        b.extend(h(1.0));
        b.extend(qh.to_le_bytes());
        b.extend([0u8; 16]);
        let mut o = [0f32; 32];
        dequantize(GgmlType::Q5_0, &b, &mut o).unwrap();
        assert_eq!(o[0], -16.0);
        assert_eq!(o[1], 0.0);
        assert_eq!(o[17], 0.0);
        assert_eq!(o[16], -16.0);

        let mut b = Vec::new();
        b.extend(h(0.5));
        b.extend(h(3.0));
        b.extend(qh.to_le_bytes());
        b.extend([0x21u8; 16]); // low nibble 1, high nibble 2
        dequantize(GgmlType::Q5_1, &b, &mut o).unwrap();
        assert_eq!(o[0], 1.0 * 0.5 + 3.0);
        assert_eq!(o[1], 17.0 * 0.5 + 3.0);
        assert_eq!(o[16], 2.0 * 0.5 + 3.0);
        assert_eq!(o[17], 18.0 * 0.5 + 3.0);
    }

    #[test]
    fn plain_types() {
        let mut o = [0f32; 2];
        dequantize(GgmlType::F16, &[h(1.5), h(-2.0)].concat(), &mut o).unwrap();
        assert_eq!(o, [1.5, -2.0]);
        dequantize(
            GgmlType::BF16,
            &[bf16::from_f32(3.0).to_le_bytes(), bf16::from_f32(-0.5).to_le_bytes()].concat(),
            &mut o,
        )
        .unwrap();
        assert_eq!(o, [3.0, -0.5]);
        dequantize(GgmlType::F32, &[1.25f32.to_le_bytes(), 7f32.to_le_bytes()].concat(), &mut o).unwrap();
        assert_eq!(o, [1.25, 7.0]);
    }

    #[test]
    fn many_blocks_in_parallel_match_one_by_one() {
        // 3000 blocks crosses the parallel chunk boundary; each block has its own scale.
        let n = 3000;
        let mut b = Vec::new();
        for i in 0..n {
            b.extend(h(i as f32 / 64.0));
            b.extend(h(-(i as f32) / 128.0));
            b.extend((0..16).map(|j| ((i + j) % 256) as u8));
        }
        let mut o = vec![0f32; n * 32];
        dequantize(GgmlType::Q4_1, &b, &mut o).unwrap();
        for i in 0..n {
            let mut one = [0f32; 32];
            block_q4_1(&b[i * 20..(i + 1) * 20], &mut one);
            assert_eq!(&o[i * 32..(i + 1) * 32], &one);
        }
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let e = dequantize(GgmlType::Q6K, &[0u8; 210], &mut [0f32; 256]).unwrap_err();
        assert!(e.to_string().contains("Q6_K"), "{e}");
        let e = dequantize(GgmlType::Q4_1, &[0u8; 19], &mut [0f32; 32]).unwrap_err();
        assert!(e.to_string().contains("does not hold"), "{e}");
        assert!(GgmlType::Q4_1.bytes_for(48, 96).is_err());
        assert_eq!(GgmlType::Q4_1.bytes_for(64, 128).unwrap(), 80);
    }
}
