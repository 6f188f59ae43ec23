//! Comparing a rewritten model's logits with the original's on the same tokens.

use serde::Serialize;

/// Running totals over positions.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LogitParity {
    pub positions: usize,
    /// Positions where both models put the same token first.
    pub argmax_agree: usize,
    /// Teacher-forced negative log-likelihood of the next token, summed (nats).
    pub nll_ref: f64,
    pub nll_test: f64,
    /// `KL(p_ref || p_test)` summed over positions (nats).
    pub kl: f64,
    pub max_abs_logit_diff: f64,
    /// Largest logit magnitude of the reference, for scale.
    pub max_abs_logit: f64,
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b)) as f64;
    let lse = x.iter().map(|v| (*v as f64 - m).exp()).sum::<f64>().ln() + m;
    x.iter().map(|v| *v as f64 - lse).collect()
}

fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, v)| if *v > bv { (i, *v) } else { (bi, bv) }).0
}

impl LogitParity {
    /// Adds positions `0..n` of `[n, vocab]` logits; `next[i]` is the token that follows
    /// position `i` (positions without one count for argmax, KL and logit error only).
    pub fn add(&mut self, reference: &[f32], test: &[f32], vocab: usize, next: &[Option<i64>]) {
        assert_eq!(reference.len(), test.len());
        for (i, (r, t)) in reference.chunks_exact(vocab).zip(test.chunks_exact(vocab)).enumerate() {
            self.positions += 1;
            self.argmax_agree += (argmax(r) == argmax(t)) as usize;
            for (a, b) in r.iter().zip(t) {
                self.max_abs_logit_diff = self.max_abs_logit_diff.max((a - b).abs() as f64);
                self.max_abs_logit = self.max_abs_logit.max(a.abs() as f64);
            }
            let (lr, lt) = (log_softmax(r), log_softmax(t));
            self.kl += lr.iter().zip(&lt).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
            if let Some(Some(tok)) = next.get(i) {
                self.nll_ref -= lr[*tok as usize];
                self.nll_test -= lt[*tok as usize];
            }
        }
    }

    pub fn scored(&self, next_count: usize) -> usize {
        next_count.min(self.positions)
    }

    pub fn argmax_agreement(&self) -> f64 {
        self.argmax_agree as f64 / self.positions.max(1) as f64
    }

    pub fn mean_kl(&self) -> f64 {
        self.kl / self.positions.max(1) as f64
    }
}

/// Windows of `len` tokens over `ids` (the last may be shorter, but at least 2 long).
pub fn windows(ids: &[i64], len: usize, max_windows: usize) -> Vec<&[i64]> {
    ids.chunks(len).filter(|w| w.len() >= 2).take(max_windows).collect()
}

/// Next-token targets of a window: position `i` predicts `w[i + 1]`.
pub fn next_tokens(w: &[i64]) -> Vec<Option<i64>> {
    (0..w.len()).map(|i| w.get(i + 1).copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_logits_agree_and_differing_ones_do_not() {
        let r = vec![1.0f32, 2.0, 3.0, 0.0, 5.0, 1.0];
        let mut p = LogitParity::default();
        p.add(&r, &r, 3, &[Some(2), None]);
        assert_eq!(p.argmax_agree, 2);
        assert!(p.kl.abs() < 1e-12);
        assert_eq!(p.nll_ref, p.nll_test);
        let t = vec![3.0f32, 2.0, 1.0, 0.0, 5.0, 1.0];
        let mut q = LogitParity::default();
        q.add(&r, &t, 3, &[Some(2), None]);
        assert_eq!(q.argmax_agree, 1);
        assert!(q.kl > 0.1);
        assert!(q.nll_test > q.nll_ref);
        assert_eq!(q.max_abs_logit_diff, 2.0);
    }
}
