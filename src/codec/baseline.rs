//! The quantizers a user would otherwise pick, measured on the same weights and groups as
//! QINS for the round-trip report. Scales are fp16, as in the peers' 4- and 8-bit models.

use super::encode::map_channels;
use super::{RowErr, WeightSource};
use half::f16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Baseline {
    /// Symmetric round-to-nearest, `scale = absmax / 127`.
    Int8,
    /// Symmetric round-to-nearest, `scale = absmax / 7` (MatMulNBits' symmetric 4-bit grid).
    Int4,
    /// NormalFloat-4 levels times the group absmax (bitsandbytes' NF4).
    Nf4,
}

/// The 16 NF4 levels of QLoRA (Dettmers et al., 2023), normalised to [-1, 1].
const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

impl Baseline {
    pub const ALL: [Baseline; 3] = [Baseline::Int8, Baseline::Int4, Baseline::Nf4];

    pub fn name(self) -> &'static str {
        match self {
            Baseline::Int8 => "int8",
            Baseline::Int4 => "int4",
            Baseline::Nf4 => "nf4",
        }
    }

    pub fn bits(self) -> u32 {
        match self {
            Baseline::Int8 => 8,
            _ => 4,
        }
    }

    fn roundtrip_group(self, x: &[f32], err: &mut RowErr) {
        let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let q = |v: f32| -> f32 {
            match self {
                Baseline::Int8 | Baseline::Int4 => {
                    let qmax = if self == Baseline::Int8 { 127.0 } else { 7.0 };
                    let s = f16::from_f32(absmax / qmax).to_f32();
                    if s == 0.0 {
                        0.0
                    } else {
                        (v / s).round().clamp(-qmax, qmax) * s
                    }
                }
                Baseline::Nf4 => {
                    let s = f16::from_f32(absmax).to_f32();
                    if s == 0.0 {
                        return 0.0;
                    }
                    let t = v / s;
                    let best = NF4.iter().min_by(|a, b| (*a - t).abs().total_cmp(&(*b - t).abs())).unwrap();
                    best * s
                }
            }
        };
        for &v in x {
            err.add(v, q(v));
        }
    }
}

/// Per-channel round-trip errors of a baseline on a `[K, N]` weight with group `group`
/// along K (`group >= k` or 0: per channel).
pub fn baseline_roundtrip(src: WeightSource, group: usize, kind: Baseline) -> Vec<RowErr> {
    let k = src.k();
    let group = if group == 0 || group > k { k } else { group };
    map_channels(
        src,
        || (),
        |_, row, _| {
            let mut e = RowErr::default();
            for g in row.chunks(group) {
                kind.roundtrip_group(g, &mut e);
            }
            e
        },
    )
}

/// Bits per weight of a baseline with fp16 scales.
pub fn baseline_bits_per_weight(kind: Baseline, k: usize, group: usize) -> f64 {
    let group = if group == 0 || group > k { k } else { group };
    kind.bits() as f64 + 16.0 * k.div_ceil(group) as f64 / k as f64
}
