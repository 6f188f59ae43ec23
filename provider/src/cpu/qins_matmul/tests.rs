use super::*;
use crate::cpu::parallel::Sequential;
use qins::codec::{self, encode_rows, Encoded};

use qins::rng::SplitMix64 as Rng;

fn random_weights(rng: &mut Rng, k: usize, n: usize) -> Vec<f32> {
    // Gaussian with a few larger outliers, so the groups' scales differ.
    (0..k * n).map(|i| (rng.gauss() * if i % 97 == 0 { 4.0 } else { 0.05 }) as f32).collect()
}

fn encode(format: Format, k: usize, n: usize, group: usize, rng: &mut Rng) -> Encoded {
    let layout = Layout { format, k, n, group };
    encode_rows(&random_weights(rng, k, n), layout).expect("encode").0
}

/// `||y - ref|| / ||ref||` against an f64 matmul of `a` with the codec's decoded weight.
fn rel_err(a: &[f64], m: usize, e: &Encoded, y: &[f64]) -> f64 {
    let Layout { k, n, .. } = e.layout;
    let w = e.decode_kn();
    let (mut num, mut den) = (0f64, 0f64);
    for i in 0..m {
        for j in 0..n {
            let r: f64 = (0..k).map(|p| a[i * k + p] * w[p * n + j] as f64).sum();
            num += (y[i * n + j] - r).powi(2);
            den += r * r;
        }
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Random bytes as codes (every code, the negative zero and non-zero padding included) or
/// random `z` in +-[0.5, 1), with random fp16-exact scales.
fn arbitrary(format: Format, k: usize, n: usize, group: usize, rng: &mut Rng) -> Encoded {
    let layout = Layout { format, k, n, group };
    let codes: Vec<u8> = if format == Format::F32 {
        (0..n * k)
            .flat_map(|_| {
                let z = (0.5 + 0.5 * rng.unit()) as f32 * if rng.unit() < 0.5 { -1.0 } else { 1.0 };
                z.to_le_bytes()
            })
            .collect()
    } else {
        (0..layout.codes_len()).map(|_| rng.next_u64() as u8).collect()
    };
    let scales: Vec<f32> = (0..layout.scales_len()).map(|_| f16::from_f64(rng.unit() * 3.0).to_f32()).collect();
    Encoded { layout, codes, scales }
}

#[test]
fn decode_row_is_bit_identical_to_the_codec() {
    let mut rng = Rng::new(1);
    for format in Format::ALL {
        for (k, group) in [(1, 1), (5, 2), (64, 64), (100, 32), (130, 7), (333, 333), (257, 64), (96, 48), (40, 16)] {
            let group = if format == Format::F32 { k } else { group };
            let n = 3;
            let e = arbitrary(format, k, n, group, &mut rng);
            let owned = OwnedWeights::from_encoded(&e);
            let w = owned.view().unwrap();
            let mut theirs = vec![0f32; k];
            for &isa in Isa::available() {
                let mut ours = vec![f32::NAN; k];
                for row in 0..n {
                    e.decode_row(row, &mut theirs);
                    w.decode_row(Some(isa), row, &mut ours).unwrap();
                    for i in 0..k {
                        assert_eq!(
                            ours[i].to_bits(),
                            theirs[i].to_bits(),
                            "{isa:?} {format} k={k} g={group} row {row} i {i}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn negative_zero_code_decodes() {
    // The encoder never emits sign=1, m=0, but decoders must accept it.
    for format in [Format::Q8, Format::Q6, Format::Q4] {
        let layout = Layout { format, k: 4, n: 1, group: 4 };
        let mut codes = vec![0u8; layout.codes_len()];
        codebook_pack(format, &[1 << (format.bits() - 1); 4], &mut codes);
        let owned = OwnedWeights::from_encoded(&Encoded { layout, codes, scales: vec![1.0] });
        let mut y = [1f32];
        qins_matmul_f32(&[1.0; 4], 1, &owned.view().unwrap(), &mut y).unwrap();
        assert_eq!(y[0], 0.0);
    }
}

fn codebook_pack(format: Format, codes: &[u8], row: &mut [u8]) {
    codec::pack_row(format, codes, row);
}

#[test]
fn matmul_matches_f64_reference() {
    let mut rng = Rng::new(7);
    // Shapes cross every blocking boundary: K % 32 != 0, K % G != 0, groups straddling
    // chunks, N not a multiple of the strip height, odd N, M past a panel.
    let shapes = [(64, 16, 64), (100, 33, 32), (300, 65, 7), (257, 130, 257), (70, 1, 1), (200, 13, 48)];
    let paths = [None, Some(Path::Dot), Some(Path::Gemm)];
    for format in Format::ALL {
        for (k, n, group) in shapes {
            let group = if format == Format::F32 { k } else { group };
            let e = encode(format, k, n, group, &mut rng);
            let owned = OwnedWeights::from_encoded(&e);
            let w = owned.view().unwrap();
            for m in [0usize, 1, 2, 3, 4, 5, 17, 130] {
                let a: Vec<f32> = (0..m * k).map(|_| rng.gauss() as f32).collect();
                let ah: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
                for path in paths {
                    let opts = Options { path, ..Options::default() };
                    let mut y = vec![f32::NAN; m * n];
                    qins_matmul_f32_with(&opts, &Rayon, &a, m, &w, &mut y).unwrap();
                    let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
                    let y64: Vec<f64> = y.iter().map(|&v| v as f64).collect();
                    let err = rel_err(&a64, m, &e, &y64);
                    assert!(err < 1e-5, "f32 {format} K={k} N={n} G={group} M={m} {path:?}: rel err {err:e}");

                    let mut yh = vec![f16::NAN; m * n];
                    qins_matmul_f16_with(&opts, &Rayon, &ah, m, &w, &mut yh).unwrap();
                    let a64: Vec<f64> = ah.iter().map(|v| v.to_f64()).collect();
                    let y64: Vec<f64> = yh.iter().map(|v| v.to_f64()).collect();
                    let err = rel_err(&a64, m, &e, &y64);
                    // One rounding to f16 (2^-11 relative) on every output element.
                    assert!(err < 1e-3, "f16 {format} K={k} N={n} G={group} M={m} {path:?}: rel err {err:e}");
                }
            }
        }
    }
}

#[test]
fn dot_and_gemm_paths_agree() {
    // The same rows through both paths (M = 1 alone vs. inside a large M) must agree to f32
    // rounding, which catches a path that indexes the wrong output column or row.
    let mut rng = Rng::new(3);
    let (k, n) = (520, 77);
    let e = encode(Format::Q6, k, n, 40, &mut rng);
    let owned = OwnedWeights::from_encoded(&e);
    let w = owned.view().unwrap();
    let m = 70;
    let a: Vec<f32> = (0..m * k).map(|_| rng.gauss() as f32).collect();
    let mut y = vec![0f32; m * n];
    qins_matmul_f32(&a, m, &w, &mut y).unwrap();
    for i in [0, 1, 63, 64, 69] {
        let mut yi = vec![0f32; n];
        qins_matmul_f32(&a[i * k..(i + 1) * k], 1, &w, &mut yi).unwrap();
        for j in 0..n {
            let (p, q) = (y[i * n + j], yi[j]);
            assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "row {i} col {j}: {p} vs {q}");
        }
    }
}

#[test]
fn bad_buffers_are_errors_not_panics() {
    let mut rng = Rng::new(5);
    let e = encode(Format::Q4, 64, 4, 32, &mut rng);
    let owned = OwnedWeights::from_encoded(&e);
    let w = owned.view().unwrap();
    let mut y = vec![0f32; 4];
    assert!(qins_matmul_f32(&[0.0; 63], 1, &w, &mut y).is_err());
    assert!(qins_matmul_f32(&[0.0; 64], 1, &w, &mut y[..3]).is_err());
    assert!(qins_matmul_f32(&[0.0; 64], 2, &w, &mut y).is_err());
    let l = e.layout;
    let scales: Vec<f16> = vec![f16::ONE; 8];
    assert!(Weights::new(l, WeightData::Packed { codes: &e.codes[1..], scales: &scales }).is_err());
    assert!(Weights::new(l, WeightData::Packed { codes: &e.codes, scales: &scales[1..] }).is_err());
    assert!(Weights::new(l, WeightData::F32 { z: &[0.0; 256], scales: &[1.0; 4] }).is_err());
    assert!(Weights::new(Layout { group: 65, ..l }, WeightData::Packed { codes: &e.codes, scales: &scales }).is_err());
}

#[test]
fn every_isa_variant_gives_the_same_bits() {
    // The AVX-512 and AVX2 variants must reproduce the portable one exactly, on both paths:
    // every decode, tail mask, mixed-group chunk and reduction included.
    let variants = Isa::available();
    assert_eq!(variants[0], Isa::Portable);
    // On a CPU without AVX-512 this test silently covers less; a CI machine known to have it
    // can say so, and fail if the detection ever stops finding it.
    #[cfg(target_arch = "x86_64")]
    if std::env::var_os("QINS_REQUIRE_AVX512").is_some() {
        assert!(variants.contains(&Isa::Avx512), "AVX-512 required but not available: {variants:?}");
    }
    let mut rng = Rng::new(11);
    for format in Format::ALL {
        // Mixed-group chunks (48, 7), uniform ones with and without a short last chunk, and
        // N not a multiple of the dot kernel's row blocks or the GEMM strips.
        for (k, n, group) in [(333, 71, 48), (128, 30, 32), (576, 13, 128), (40, 5, 7), (100, 9, 32), (70, 27, 70)] {
            let group = if format == Format::F32 { k } else { group };
            let e = arbitrary(format, k, n, group, &mut rng);
            let owned = OwnedWeights::from_encoded(&e);
            let w = owned.view().unwrap();
            for m in [1usize, 2, 3, 4, 5, 17, 40] {
                let a: Vec<f32> = (0..m * k).map(|_| rng.gauss() as f32).collect();
                for path in [Path::Dot, Path::Gemm] {
                    let run = |isa| {
                        let opts = Options { isa: Some(isa), path: Some(path) };
                        let mut y = vec![0f32; m * n];
                        qins_matmul_f32_with(&opts, &Sequential, &a, m, &w, &mut y).unwrap();
                        y.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
                    };
                    let reference = run(Isa::Portable);
                    for &isa in &variants[1..] {
                        assert!(
                            run(isa) == reference,
                            "{format} K={k} N={n} G={group} M={m} {path:?}: {isa:?} differs from Portable"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn parallel_and_sequential_runs_agree() {
    let mut rng = Rng::new(13);
    let e = encode(Format::Q4, 300, 200, 32, &mut rng);
    let owned = OwnedWeights::from_encoded(&e);
    let w = owned.view().unwrap();
    for m in [1usize, 3, 40] {
        let a: Vec<f32> = (0..m * 300).map(|_| rng.gauss() as f32).collect();
        let (mut y1, mut y2) = (vec![0f32; m * 200], vec![1f32; m * 200]);
        qins_matmul_f32_with(&Options::default(), &Sequential, &a, m, &w, &mut y1).unwrap();
        qins_matmul_f32_with(&Options::default(), &Rayon, &a, m, &w, &mut y2).unwrap();
        assert_eq!(y1, y2, "M={m}");
    }
}

#[test]
fn swiglu_matches_f64_reference() {
    // The fused op against silu(gate) * up computed in f64 from the decoded weight's gate and
    // up rows (codec::swiglu_row), so a wrong pairing or a missing activation fails.
    let mut rng = Rng::new(11);
    for (format, k, n, group, m) in
        [(Format::Q4, 96, 32, 32, 1), (Format::Q8, 70, 48, 16, 5), (Format::Q6, 64, 16, 64, 17)]
    {
        let e = encode(format, k, n, group, &mut rng);
        let owned = OwnedWeights::from_encoded(&e);
        let w = owned.view().unwrap();
        let wd = e.decode_kn();
        let a: Vec<f32> = (0..m * k).map(|_| rng.gauss() as f32 * 4.0).collect();
        let mut y = vec![f32::NAN; m * n / 2];
        qins_swiglu_with::<f32>(&Options::default(), &Sequential, &a, m, &w, &mut y).unwrap();
        let ah: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
        let mut yh = vec![f16::NAN; m * n / 2];
        qins_swiglu_with::<f16>(&Options::default(), &Sequential, &ah, m, &w, &mut yh).unwrap();
        let (mut num, mut numh, mut den) = (0f64, 0f64, 0f64);
        for i in 0..m {
            for j in 0..n / 2 {
                let dot = |col: usize, a: &dyn Fn(usize) -> f64| {
                    (0..k).map(|p| a(i * k + p) * wd[p * n + col] as f64).sum::<f64>()
                };
                let f = |x: &dyn Fn(usize) -> f64| {
                    let (g, u) = (dot(codec::swiglu_row(j, false), x), dot(codec::swiglu_row(j, true), x));
                    g / (1.0 + (-g).exp()) * u
                };
                let r = f(&|p| a[p] as f64);
                let rh = f(&|p| ah[p].to_f64());
                num += (y[i * n / 2 + j] as f64 - r).powi(2);
                numh += (yh[i * n / 2 + j].to_f64() - rh).powi(2);
                den += r * r;
            }
        }
        let (err, errh) = ((num / den).sqrt(), (numh / den).sqrt());
        assert!(err < 1e-5, "{format} K={k} N={n} M={m}: f32 rel err {err:e}");
        assert!(errh < 1e-3, "{format} K={k} N={n} M={m}: f16 rel err {errh:e}");
    }
    let e = encode(Format::Q4, 64, 32, 32, &mut rng);
    let owned = OwnedWeights::from_encoded(&e);
    let mut y = vec![0f32; 15];
    let err = qins_swiglu_with::<f32>(&Options::default(), &Sequential, &[0.0; 64], 1, &owned.view().unwrap(), &mut y);
    assert!(err.is_err());
    // An empty batch (M = 0) is a valid call with an empty result; it once panicked on a
    // zero row width (found by the op_inputs fuzz target).
    let mut y: Vec<f32> = vec![];
    qins_swiglu_with::<f32>(&Options::default(), &Sequential, &[], 0, &owned.view().unwrap(), &mut y).unwrap();
}
