//! The calibrated encoder: GPTQ's error feedback (Frantar et al., 2022) with the QINS grid as
//! the rounding set.
//!
//! For a MatMul `Y = X W` with calibration inputs `X` (`[T, K]`), the error of output channel
//! `n` is `(w - q)ᵀ H (w - q)` with `H = XᵀX`. GPTQ chooses the codes of a channel one input
//! row `k` at a time, in order, and after each one moves the not-yet-coded weights to cancel
//! the output error the rounding made, using the Cholesky factor of `H⁻¹`. Each output
//! channel is independent given that factor, so channels run in parallel blocks; within a
//! block the feedback is applied eagerly inside 128 columns and lazily (one matrix product)
//! beyond them.
//!
//! The group scale is chosen when the feedback reaches the group's first row, from the
//! weights as they stand then (already corrected for the rows before), by the codec's own
//! search ([`GroupCoder`]): weight MSE, or the error weighted by `diag(H)` (each input's
//! second moment) with [`ScaleRule::Activation`]. The codes and scales are the codec's
//! format, unchanged: only which code each weight gets differs from [`qins::codec::encode_matrix`].

use anyhow::{bail, Result};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};
use qins::codec::{pack_row, Encoded, GroupCoder, Layout, RowErr, WeightSource};
use rayon::prelude::*;

/// `XᵀX` of one MatMul input over the calibration tokens: `[K, K]`, symmetric, of which only
/// the lower triangle is summed and kept (half the products; Phi-3.5-mini's 128 Hessians over
/// 8192 tokens are 50 TFLOP in full). Read it through [`Hessian::at`].
pub struct Hessian {
    pub k: usize,
    /// The lower triangle (`i >= j`) is `XᵀX`; the rest is zero.
    h: Mat<f32>,
    /// Rows of `X` summed in.
    pub tokens: usize,
}

impl Hessian {
    pub fn new(k: usize) -> Hessian {
        Hessian { k, h: Mat::zeros(k, k), tokens: 0 }
    }

    /// Adds `XᵀX` for `x`, `[rows, K]` row-major.
    pub fn add(&mut self, x: &[f32]) {
        let rows = x.len() / self.k;
        // Row-major [rows, K] read column-major is Xᵀ, [K, rows].
        let xt = MatRef::from_column_major_slice(&x[..rows * self.k], self.k, rows);
        triangular::matmul(
            self.h.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Add,
            xt,
            BlockStructure::Rectangular,
            xt.transpose(),
            BlockStructure::Rectangular,
            1.0f32,
            Par::rayon(0),
        );
        self.tokens += rows;
    }

    /// `H[i, j]`.
    #[inline]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        if i >= j {
            self.h[(i, j)]
        } else {
            self.h[(j, i)]
        }
    }

    pub fn diag(&self) -> Vec<f32> {
        (0..self.k).map(|i| self.h[(i, i)]).collect()
    }
}

/// How a group's scale is chosen (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRule {
    /// The weights' squared error, as the calibration-free encoder.
    Weight,
    /// The squared error weighted by each input's mean square on the calibration text.
    Activation,
}

/// The options of the feedback.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct GptqOptions {
    /// Added to `H`'s diagonal, as a fraction of its mean (GPTQ's 1%): it keeps `H`
    /// invertible and limits how far the feedback moves weights on thin evidence.
    pub damp: f32,
    pub scale_rule: ScaleRule,
    /// Code the inputs in order of decreasing `diag(H)` (GPTQ's act-order), so that the
    /// inputs that matter most are coded while the most weights are left to absorb their
    /// error. Group scales are then chosen up front from the original weights (the groups
    /// stay contiguous in K, as the format has them).
    pub act_order: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions { damp: 0.01, scale_rule: ScaleRule::Weight, act_order: false }
    }
}

/// The input order of [`GptqOptions::act_order`]: decreasing `diag`, ties by index.
pub fn act_order(diag: &[f32]) -> Vec<usize> {
    let mut p: Vec<usize> = (0..diag.len()).collect();
    p.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]).then(a.cmp(&b)));
    p
}

impl Hessian {
    /// `P H Pᵀ` for the order `perm` (row `i` of the result is row `perm[i]` of `H`).
    pub fn permuted(&self, perm: &[usize]) -> Hessian {
        let mut h = Mat::<f32>::zeros(self.k, self.k);
        for j in 0..self.k {
            for i in j..self.k {
                h[(i, j)] = self.at(perm[i], perm[j]);
            }
        }
        Hessian { k: self.k, h, tokens: self.tokens }
    }
}

/// Columns between the lazy updates: the eager work grows with it, the product shrinks.
const BLOCK_COLS: usize = 128;
/// Output channels a task runs together.
const BLOCK_ROWS: usize = 64;

/// `U`, the upper Cholesky factor of `(H + λI)⁻¹`, row-major `[K, K]`: row `k` holds how the
/// error of input `k` feeds into the inputs after it. Computed without forming `H⁻¹`: with
/// `J` the order reversal, `J H J = L Lᵀ` gives `H = (J L J)(J L J)ᵀ`, and `U = J L⁻¹ J`.
pub fn inverse_factor(h: &Hessian, damp: f32) -> Result<Vec<f32>> {
    let k = h.k;
    if k == 0 {
        bail!("an empty Hessian");
    }
    let diag = h.diag();
    if diag.iter().any(|d| !d.is_finite()) {
        bail!("the calibration inputs are not finite");
    }
    let mean = diag.iter().map(|&d| d as f64).sum::<f64>() / k as f64;
    // An input that was zero on every calibration token gets the mean (its weights then
    // round as without calibration): it has no evidence to feed back.
    let lambda = (damp as f64 * mean).max(f32::MIN_POSITIVE as f64) as f32;
    let mut r = Mat::<f32>::zeros(k, k);
    for j in 0..k {
        for i in 0..k {
            r[(i, j)] = h.at(k - 1 - i, k - 1 - j);
        }
        let d = &mut r[(j, j)];
        *d = if *d > 0.0 { *d + lambda } else { mean.max(1.0) as f32 };
    }
    let llt = r
        .llt(Side::Lower)
        .map_err(|e| anyhow::anyhow!("the Hessian is not positive definite ({e:?}); raise the damping"))?;
    let mut inv = Mat::<f32>::zeros(k, k);
    faer::linalg::triangular_inverse::invert_lower_triangular(inv.as_mut(), llt.L(), Par::rayon(0));
    let mut u = vec![0f32; k * k];
    for i in 0..k {
        for j in i..k {
            u[i * k + j] = inv[(k - 1 - i, k - 1 - j)];
        }
    }
    if u.iter().any(|v| !v.is_finite()) {
        bail!("the Hessian's inverse factor is not finite; raise the damping");
    }
    Ok(u)
}

/// Encodes `src` (`[K, N]`) in `layout` with error feedback through `u` ([`inverse_factor`]
/// of `H`, or with `perm` of `P H Pᵀ`, the inputs then coded in the order `perm`). `diag` is
/// `H`'s diagonal in the original order (the weights of [`ScaleRule::Activation`]). Returns
/// the encoded tensors and, per output channel, the weight error (which the feedback trades
/// for output error: it is larger than the calibration-free encoder's).
pub fn encode(
    src: WeightSource,
    layout: Layout,
    u: &[f32],
    diag: &[f32],
    perm: Option<&[usize]>,
    opts: &GptqOptions,
) -> Result<(Encoded, Vec<RowErr>)> {
    let (k, n) = (layout.k, layout.n);
    if (src.k(), src.n()) != (k, n) || u.len() != k * k || diag.len() != k || perm.is_some_and(|p| p.len() != k) {
        bail!("calibrated encode: weight [{}, {}], layout [{k}, {n}], factor {} values", src.k(), src.n(), u.len());
    }
    let Some(coder) = GroupCoder::new(layout.format) else {
        bail!("calibration applies to the integer formats, not {}", layout.format);
    };
    let group = if layout.group == 0 { k } else { layout.group };
    // Blocks hold whole groups, so a group's scale never sees half-applied feedback.
    let block = BLOCK_COLS.div_ceil(group).max(1) * group;
    let (rb, g) = (layout.row_bytes(), layout.groups());
    let mut codes = vec![0u8; layout.codes_len()];
    let mut scales = vec![0f32; layout.scales_len()];
    let mut errs = vec![RowErr::default(); n];
    codes
        .par_chunks_mut(BLOCK_ROWS * rb)
        .zip(scales.par_chunks_mut(BLOCK_ROWS * g))
        .zip(errs.par_chunks_mut(BLOCK_ROWS))
        .enumerate()
        .try_for_each(|(b, ((codes, scales), errs))| -> Result<()> {
            let (n0, nb) = (b * BLOCK_ROWS, errs.len());
            let mut orig = Vec::new();
            src.rows(n0, nb, &mut orig);
            if let Some(i) = orig.iter().position(|v| !v.is_finite()) {
                bail!("weight [{}, {}] is not finite", i % k, n0 + i / k);
            }
            let mut q = vec![0u8; nb * k];
            match perm {
                None => {
                    let mut w = orig.clone();
                    feedback(&coder, &mut w, &mut q, scales, nb, k, group, block, u, diag, None, opts.scale_rule)?;
                }
                Some(p) => {
                    // Static groups: every scale from the original weights, then the
                    // feedback over the permuted inputs; codes back in K order after.
                    for r in 0..nb {
                        for (gi, xs) in orig[r * k..(r + 1) * k].chunks(group).enumerate() {
                            let s = match opts.scale_rule {
                                ScaleRule::Weight => coder.scale(xs),
                                ScaleRule::Activation => {
                                    coder.scale_weighted(xs, &diag[gi * group..gi * group + xs.len()])
                                }
                            };
                            if !s.is_finite() {
                                bail!("group {gi} of channel {} has no finite f16 scale", n0 + r);
                            }
                            scales[r * g + gi] = s;
                        }
                    }
                    let mut w: Vec<f32> = (0..nb * k).map(|i| orig[i / k * k + p[i % k]]).collect();
                    let mut qp = vec![0u8; nb * k];
                    feedback(&coder, &mut w, &mut qp, scales, nb, k, group, block, u, diag, Some(p), opts.scale_rule)?;
                    for (i, c) in qp.iter().enumerate() {
                        q[i / k * k + p[i % k]] = *c;
                    }
                }
            }
            let lut = layout.format.lut();
            for j in 0..nb {
                let row = &q[j * k..(j + 1) * k];
                pack_row(layout.format, row, &mut codes[j * rb..(j + 1) * rb]);
                for (i, (&c, &x)) in row.iter().zip(&orig[j * k..(j + 1) * k]).enumerate() {
                    errs[j].add(x, lut[c as usize] * scales[j * g + i / group]);
                }
            }
            Ok(())
        })?;
    Ok((Encoded { layout, codes, scales }, errs))
}

/// GPTQ over `nb` rows of `w` (`[nb, K]`, changed in place), writing codes `q` and, without
/// `perm`, the scales as each group is reached. With `perm`, `w`'s column `i` is input
/// `perm[i]` and the scales are given (static groups).
#[allow(clippy::too_many_arguments)]
fn feedback(
    coder: &GroupCoder,
    w: &mut [f32],
    q: &mut [u8],
    scales: &mut [f32],
    nb: usize,
    k: usize,
    group: usize,
    block: usize,
    u: &[f32],
    diag: &[f32],
    perm: Option<&[usize]>,
    rule: ScaleRule,
) -> Result<()> {
    let g = k.div_ceil(group);
    let lut = coder.format().lut();
    let mut err = vec![0f32; nb * block];
    for b0 in (0..k).step_by(block) {
        let b1 = (b0 + block).min(k);
        let bw = b1 - b0;
        for i in b0..b1 {
            if perm.is_none() && i % group == 0 {
                let end = (i + group).min(k);
                for r in 0..nb {
                    let xs = &w[r * k + i..r * k + end];
                    let s = match rule {
                        ScaleRule::Weight => coder.scale(xs),
                        ScaleRule::Activation => coder.scale_weighted(xs, &diag[i..end]),
                    };
                    if !s.is_finite() {
                        bail!("group {} of a channel has no finite f16 scale", i / group);
                    }
                    scales[r * g + i / group] = s;
                }
            }
            let d = u[i * k + i];
            let urow = &u[i * k + i + 1..i * k + b1];
            let gi = perm.map_or(i, |p| p[i]) / group;
            for r in 0..nb {
                let s = scales[r * g + gi];
                let row = &mut w[r * k..(r + 1) * k];
                let c = coder.code(row[i], s);
                q[r * k + i] = c;
                let e = (row[i] - lut[c as usize] * s) / d;
                err[r * block + (i - b0)] = e;
                for (x, &f) in row[i + 1..b1].iter_mut().zip(urow) {
                    *x -= e * f;
                }
            }
        }
        if b1 < k {
            // W[:, b1..] -= E U[b0..b1, b1..]
            let dst = MatMut::from_row_major_slice_mut(w, nb, k).submatrix_mut(0, b1, nb, k - b1);
            let e = MatRef::from_row_major_slice(&err, nb, block).submatrix(0, 0, nb, bw);
            let um = MatRef::from_row_major_slice(u, k, k).submatrix(b0, b1, bw, k - b1);
            matmul(dst, Accum::Add, e, um, -1.0f32, Par::Seq);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use qins::codec::{encode_matrix, Elem, Format};
    use qins::rng::SplitMix64;

    /// Inputs with correlated features and uneven scales, as activations have.
    fn inputs(t: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        let mut x = vec![0f32; t * k];
        for row in x.chunks_exact_mut(k) {
            let common = r.unit() as f32 * 2.0 - 1.0;
            for (i, v) in row.iter_mut().enumerate() {
                let own = (0..3).map(|_| r.unit() as f32 * 2.0 - 1.0).sum::<f32>();
                *v = (own + 2.0 * common) * (1.0 + (i % 7) as f32);
            }
        }
        x
    }

    fn weights(k: usize, n: usize, seed: u64) -> Vec<u8> {
        let mut r = SplitMix64::new(seed);
        (0..k * n).flat_map(|_| ((0..4).map(|_| r.unit() as f32 - 0.5).sum::<f32>() * 0.05).to_le_bytes()).collect()
    }

    /// `sum over tokens and channels of (X (W - Q))^2`.
    fn output_error(x: &[f32], w: &[f32], q: &[f32], k: usize, n: usize) -> f64 {
        let mut total = 0f64;
        for row in x.chunks_exact(k) {
            for j in 0..n {
                let d: f64 = (0..k).map(|i| row[i] as f64 * (w[i * n + j] - q[i * n + j]) as f64).sum();
                total += d * d;
            }
        }
        total
    }

    #[test]
    fn feedback_lowers_the_output_error_on_the_calibration_inputs() {
        let (t, k, n) = (512, 96, 40);
        let x = inputs(t, k, 1);
        let wb = weights(k, n, 2);
        let w: Vec<f32> = wb.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let mut h = Hessian::new(k);
        h.add(&x);
        assert_eq!(h.tokens, t);
        let u = inverse_factor(&h, 0.01).unwrap();
        for (format, group) in [(Format::Q4, 32), (Format::Q4, 0), (Format::Q6, 32), (Format::Q8, 64)] {
            let layout = Layout::new(format, k, n, group);
            let src = WeightSource::new(&wb, Elem::F32, k, n).unwrap();
            let (plain, _) = encode_matrix(src, layout).unwrap();
            let perm = act_order(&h.diag());
            let up = inverse_factor(&h.permuted(&perm), 0.01).unwrap();
            for (rule, ordered) in
                [(ScaleRule::Weight, false), (ScaleRule::Activation, false), (ScaleRule::Weight, true)]
            {
                let opts = GptqOptions { damp: 0.01, scale_rule: rule, act_order: ordered };
                let (cal, errs) = if ordered {
                    encode(src, layout, &up, &h.diag(), Some(&perm), &opts).unwrap()
                } else {
                    encode(src, layout, &u, &h.diag(), None, &opts).unwrap()
                };
                let (e0, e1) =
                    (output_error(&x, &w, &plain.decode_kn(), k, n), output_error(&x, &w, &cal.decode_kn(), k, n));
                assert!(
                    e1 < 0.8 * e0,
                    "{format} g{group} {rule:?} act-order {ordered}: output error {e1} not below {e0}"
                );
                // The stats describe what decode gives.
                let see: f64 = cal.decode_kn().iter().zip(&w).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                let want: f64 = errs.iter().map(|e| e.see).sum();
                assert!((see - want).abs() <= 1e-6 * want.max(1e-12), "{see} {want}");
            }
        }
    }

    #[test]
    fn hessian_sums_xtx_over_every_add() {
        let k = 37;
        let x = inputs(90, k, 3);
        let mut h = Hessian::new(k);
        // Two adds of uneven row counts sum as one.
        h.add(&x[..50 * k]);
        h.add(&x[50 * k..]);
        assert_eq!(h.tokens, 90);
        for i in 0..k {
            for j in 0..k {
                let want: f64 = (0..90).map(|t| x[t * k + i] as f64 * x[t * k + j] as f64).sum();
                assert!((h.at(i, j) as f64 - want).abs() <= 1e-4 * want.abs().max(1.0), "({i}, {j})");
            }
        }
    }

    #[test]
    fn inverse_factor_is_the_cholesky_factor_of_the_inverse() {
        let k = 24;
        let mut h = Hessian::new(k);
        h.add(&inputs(100, k, 5));
        let u = inverse_factor(&h, 0.0).unwrap();
        // Uᵀ U (H + 0) = I within f32 rounding.
        for i in 0..k {
            for j in 0..k {
                let mut v = 0f64;
                for m in 0..k {
                    let uu: f64 = (0..k).map(|l| u[l * k + i] as f64 * u[l * k + m] as f64).sum();
                    v += uu * h.at(m, j) as f64;
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 2e-3, "({i}, {j}): {v}");
            }
        }
        assert!((0..k).all(|i| (0..i).all(|j| u[i * k + j] == 0.0)), "U is upper triangular");
    }

    #[test]
    fn a_dead_input_and_the_same_input_twice_give_a_factor() {
        let k = 16;
        let mut x = inputs(64, k, 9);
        for row in x.chunks_exact_mut(k) {
            row[3] = 0.0;
            row[5] = row[4];
        }
        let mut h = Hessian::new(k);
        h.add(&x);
        assert!(inverse_factor(&h, 0.01).is_ok());
        let mut bad = Hessian::new(k);
        bad.add(&vec![f32::NAN; k]);
        assert!(inverse_factor(&bad, 0.01).is_err());
    }
}
