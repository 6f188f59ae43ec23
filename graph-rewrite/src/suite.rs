//! The validation suite A-E that decides whether a rewritten model may replace its
//! original: run side by side in ONNX Runtime, every number reported, pass or fail.
//!
//! How each test is read (docs/QUALITY.md has the tests and their bars):
//! - A. Round trip: the candidate's `qins_report.json` (written by the rewrite), every
//!   targeted tensor.
//! - B. Greedy stability: the original generates greedily; the candidate is teacher-forced
//!   on that text and must pick the same next token. The first miss is where a free-running
//!   candidate would have left the original's path.
//! - C. Sampling parity: the original samples (temperature 0.7, top-p 0.9, seeded); both
//!   models are teacher-forced on the sample; KL(p_orig || p_cand) of the temperature-0.7
//!   distributions and top-k overlap at every position.
//! - D. Perplexity over Wikipedia text with a sliding window.
//! - E. Long context: greedy continuations after long real-text contexts, as in B.

use crate::engine::{argmax, softmax, CausalLm, Sampling};
use anyhow::{ensure, Context, Result};
use serde::Serialize;
use std::path::Path;

/// Sizes of the suite: the full one (docs/QUALITY.md), or a reduced one for CI.
#[derive(Clone, Debug, Serialize)]
pub struct SuiteConfig {
    pub greedy_prompts: usize,
    pub greedy_tokens: usize,
    pub greedy_window: usize,
    pub sample_prompts: usize,
    pub sample_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub ppl_tokens: usize,
    pub ppl_window: usize,
    pub ppl_stride: usize,
    pub long_contexts: Vec<usize>,
    pub long_tokens: usize,
    pub seed: u64,
}

impl SuiteConfig {
    pub fn full() -> SuiteConfig {
        SuiteConfig {
            greedy_prompts: 10,
            greedy_tokens: 1000,
            greedy_window: 50,
            sample_prompts: 20,
            sample_tokens: 256,
            temperature: 0.7,
            top_p: 0.9,
            ppl_tokens: 50_000,
            ppl_window: 1024,
            ppl_stride: 512,
            // SmolLM2's context is 8192: "8k" leaves room for the 256 generated tokens.
            long_contexts: vec![2048, 4096, 7936],
            long_tokens: 256,
            seed: 1234,
        }
    }

    /// Small enough for CI on two cores, still exercising every bar's logic.
    pub fn ci() -> SuiteConfig {
        SuiteConfig {
            greedy_prompts: 2,
            greedy_tokens: 64,
            greedy_window: 16,
            sample_prompts: 2,
            sample_tokens: 48,
            ppl_tokens: 3000,
            ppl_window: 512,
            ppl_stride: 256,
            long_contexts: vec![1024],
            long_tokens: 48,
            ..SuiteConfig::full()
        }
    }
}

/// Prompts of different kinds for B (10) and C (20). Written for this suite, not tuned.
pub const GREEDY_PROMPTS: [&str; 10] = [
    "The city council voted on Tuesday to approve a new budget that",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Question: A train travels 120 km in 1.5 hours. What is its average speed?\nAnswer:",
    "<|im_start|>user\nCan you recommend a good book for a long flight?<|im_end|>\n<|im_start|>assistant\n",
    "If all roses are flowers and some flowers fade quickly, can we conclude that some roses fade quickly? Let's think step by step.",
    "The history of the printing press begins in",
    "Photosynthesis is the process by which",
    "<|im_start|>user\nWrite a short poem about autumn leaves.<|im_end|>\n<|im_start|>assistant\n",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN",
    "To solve the equation 3x + 7 = 22, we first",
];

pub const SAMPLE_PROMPTS: [&str; 20] = [
    "Once upon a time in a small village by the sea,",
    "The stock market fell sharply today after",
    "<|im_start|>user\nExplain how a rainbow forms.<|im_end|>\n<|im_start|>assistant\n",
    "Here is a Python function that reverses a linked list:\n",
    "The three most important inventions of the 20th century are",
    "In mathematics, a prime number is",
    "<|im_start|>user\nGive me three tips for learning a new language.<|im_end|>\n<|im_start|>assistant\n",
    "The recipe calls for two cups of flour,",
    "Climate scientists have warned that",
    "Dear hiring manager, I am writing to apply for",
    "The main character of the novel is a detective who",
    "<|im_start|>user\nWhat is the difference between weather and climate?<|im_end|>\n<|im_start|>assistant\n",
    "function debounce(fn, delay) {",
    "The Roman Empire reached its greatest extent under",
    "A good night's sleep is important because",
    "<|im_start|>user\nSummarize the plot of Romeo and Juliet in two sentences.<|im_end|>\n<|im_start|>assistant\n",
    "The football match ended in a draw after",
    "Quantum computers differ from classical computers in that",
    "To make a paper airplane, first",
    "The museum's new exhibition features",
];

/// One candidate's numbers for every test, and the bars.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CandidateResult {
    pub model: String,
    pub a: Option<RoundTrip>,
    pub b: Option<Greedy>,
    pub c: Option<SamplingParity>,
    pub d: Option<Perplexity>,
    pub e: Vec<LongContext>,
    pub bars: Vec<BarResult>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BarResult {
    pub test: String,
    pub bar: String,
    pub value: String,
    pub pass: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct RoundTrip {
    pub tensors: usize,
    pub min_cosine: f64,
    pub max_rel_fro: f64,
    pub bits_per_weight: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Greedy {
    /// Per prompt: match fraction per window of `greedy_window` positions.
    pub windows: Vec<Vec<f64>>,
    /// Per prompt: the first position where the candidate picked another token.
    pub first_miss: Vec<Option<usize>>,
    pub mean_match: f64,
    /// Late third minus early third, in percentage points.
    pub drift_points: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SamplingParity {
    pub positions: usize,
    pub mean_kl: f64,
    pub max_kl: f64,
    pub top1: f64,
    pub top5: f64,
    pub top10: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Perplexity {
    pub tokens_scored: usize,
    pub ppl_ref: f64,
    pub ppl: f64,
    pub delta: f64,
    pub delta_rel: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LongContext {
    pub context: usize,
    pub tokens: usize,
    pub match_frac: f64,
    pub drift_points: f64,
    pub first_miss: Option<usize>,
}

/// Everything the suite computes from the original alone, shared by every candidate.
struct Reference {
    greedy: Vec<(Vec<i64>, Vec<i64>)>,
    samples: Vec<(Vec<i64>, Vec<i64>)>,
    long: Vec<(Vec<i64>, Vec<i64>)>,
}

fn encode(tok: &tokenizers::Tokenizer, text: &str) -> Result<Vec<i64>> {
    Ok(tok
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("tokenize: {e}"))?
        .get_ids()
        .iter()
        .map(|&i| i as i64)
        .collect())
}

/// Which tests to run.
#[derive(Clone, Debug, Serialize)]
pub struct Selection {
    pub a: bool,
    pub b: bool,
    pub c: bool,
    pub d: bool,
    pub e: bool,
}

impl Selection {
    pub fn parse(s: &str) -> Result<Selection> {
        let s = s.to_ascii_uppercase();
        let sel = Selection {
            a: s.contains('A'),
            b: s.contains('B'),
            c: s.contains('C'),
            d: s.contains('D'),
            e: s.contains('E'),
        };
        ensure!(s.chars().all(|c| "ABCDE,".contains(c)), "tests are letters A to E, e.g. --tests A,B,D");
        Ok(sel)
    }

    /// Whether test `letter` ("A" to "E") is selected.
    pub fn has(&self, letter: &str) -> bool {
        match letter {
            "A" => self.a,
            "B" => self.b,
            "C" => self.c,
            "D" => self.d,
            "E" => self.e,
            _ => false,
        }
    }
}

impl CandidateResult {
    /// True when no selected test produced a number for this candidate.
    pub fn measured_nothing(&self) -> bool {
        self.a.is_none() && self.b.is_none() && self.c.is_none() && self.d.is_none() && self.e.is_empty()
    }

    /// The union of two runs of different tests on the same candidate, bars recomputed.
    pub fn merge(self, other: CandidateResult) -> CandidateResult {
        let mut m = CandidateResult {
            model: self.model,
            a: self.a.or(other.a),
            b: self.b.or(other.b),
            c: self.c.or(other.c),
            d: self.d.or(other.d),
            e: if self.e.is_empty() { other.e } else { self.e },
            bars: Vec::new(),
        };
        m.bars = bars(&m);
        m
    }
}

/// Runs the selected tests of the suite for every candidate against `reference`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    reference_dir: &Path,
    reference: &mut CausalLm,
    candidates: &mut [(String, CausalLm)],
    text: &str,
    cfg: &SuiteConfig,
    sel: &Selection,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<CandidateResult>> {
    let tok =
        crate::engine::load_tokenizer(reference_dir).context("the reference model folder needs its tokenizer.json")?;
    let mut results: Vec<CandidateResult> =
        candidates.iter().map(|(n, _)| CandidateResult { model: n.clone(), ..Default::default() }).collect();
    // Text for D and E: the evaluation text, tokenized once.
    let needed = cfg.ppl_tokens.max(cfg.long_contexts.iter().max().copied().unwrap_or(0)) + 16;
    let cut = text.char_indices().nth(needed * 8).map_or(text.len(), |(i, _)| i);
    let text_ids = encode(&tok, &text[..cut])?;

    if sel.a {
        for (r, (name, _)) in results.iter_mut().zip(candidates.iter()) {
            r.a = read_roundtrip(Path::new(name));
        }
    }

    // The original's own output, computed once.
    let mut refs = Reference { greedy: vec![], samples: vec![], long: vec![] };
    if sel.b {
        for (i, p) in GREEDY_PROMPTS.iter().take(cfg.greedy_prompts).enumerate() {
            log(&format!("B: original, greedy prompt {}/{}", i + 1, cfg.greedy_prompts));
            let prompt = encode(&tok, p)?;
            let g = reference.generate(&prompt, cfg.greedy_tokens, &Sampling::Greedy, &[], false)?;
            refs.greedy.push((prompt, g.tokens));
        }
    }
    if sel.c {
        for (i, p) in SAMPLE_PROMPTS.iter().take(cfg.sample_prompts).enumerate() {
            log(&format!("C: original, sampling prompt {}/{}", i + 1, cfg.sample_prompts));
            let prompt = encode(&tok, p)?;
            let s = Sampling::Sample { temperature: cfg.temperature, top_p: cfg.top_p, seed: cfg.seed + i as u64 };
            let g = reference.generate(&prompt, cfg.sample_tokens, &s, &[], false)?;
            refs.samples.push((prompt, g.tokens));
        }
    }
    if sel.e {
        for &ctx in &cfg.long_contexts {
            ensure!(text_ids.len() >= ctx, "only {} tokens of text for a {ctx}-token context", text_ids.len());
            log(&format!("E: original, {ctx}-token context"));
            let prompt = text_ids[..ctx].to_vec();
            let g = reference.generate(&prompt, cfg.long_tokens, &Sampling::Greedy, &[], false)?;
            refs.long.push((prompt, g.tokens));
        }
    }

    if sel.b {
        for (r, (name, lm)) in results.iter_mut().zip(candidates.iter_mut()) {
            log(&format!("B: {name}"));
            let mut g = Greedy::default();
            let mut all = Vec::new();
            for (prompt, cont) in &refs.greedy {
                let hits = teacher_forced_hits(lm, prompt, cont)?;
                g.first_miss.push(hits.iter().position(|h| !h));
                g.windows.push(hits.chunks(cfg.greedy_window).map(frac).collect());
                all.push(hits);
            }
            g.mean_match = mean(&all.iter().map(|h| frac(h)).collect::<Vec<_>>());
            g.drift_points = mean(&all.iter().map(|h| drift(h)).collect::<Vec<_>>());
            r.b = Some(g);
        }
    }
    if sel.c {
        for (r, (name, lm)) in results.iter_mut().zip(candidates.iter_mut()) {
            log(&format!("C: {name}"));
            let mut c = SamplingParity::default();
            let mut kl_sum = 0.0;
            let (mut t1, mut t5, mut t10) = (0.0, 0.0, 0.0);
            for (prompt, cont) in &refs.samples {
                let ids: Vec<i64> = prompt.iter().chain(cont).copied().collect();
                let (lr, vocab) = reference.forward(&ids)?;
                let (lc, _) = lm.forward(&ids)?;
                // Positions whose next token is a sampled one.
                for pos in prompt.len() - 1..ids.len() - 1 {
                    let (a, b) = (&lr[pos * vocab..(pos + 1) * vocab], &lc[pos * vocab..(pos + 1) * vocab]);
                    let (pa, pb) = (softmax(a, cfg.temperature), softmax(b, cfg.temperature));
                    let kl: f64 = pa
                        .iter()
                        .zip(&pb)
                        .map(|(p, q)| if *p > 0.0 { p * (p / q.max(1e-300)).ln() } else { 0.0 })
                        .sum();
                    kl_sum += kl;
                    c.max_kl = c.max_kl.max(kl);
                    t1 += overlap(a, b, 1);
                    t5 += overlap(a, b, 5);
                    t10 += overlap(a, b, 10);
                    c.positions += 1;
                }
            }
            let n = c.positions.max(1) as f64;
            (c.mean_kl, c.top1, c.top5, c.top10) = (kl_sum / n, t1 / n, t5 / n, t10 / n);
            r.c = Some(c);
        }
    }
    if sel.d {
        ensure!(
            text_ids.len() >= cfg.ppl_tokens,
            "only {} tokens of text, {} wanted for D",
            text_ids.len(),
            cfg.ppl_tokens
        );
        let ids = &text_ids[..cfg.ppl_tokens];
        log("D: original");
        let nll_ref = sliding_nll(reference, ids, cfg.ppl_window, cfg.ppl_stride)?;
        for (r, (name, lm)) in results.iter_mut().zip(candidates.iter_mut()) {
            log(&format!("D: {name}"));
            let nll = sliding_nll(lm, ids, cfg.ppl_window, cfg.ppl_stride)?;
            let (ppl_ref, ppl) = ((nll_ref.0 / nll_ref.1 as f64).exp(), (nll.0 / nll.1 as f64).exp());
            r.d = Some(Perplexity {
                tokens_scored: nll.1,
                ppl_ref,
                ppl,
                delta: ppl - ppl_ref,
                delta_rel: (ppl - ppl_ref) / ppl_ref,
            });
        }
    }
    if sel.e {
        for (r, (name, lm)) in results.iter_mut().zip(candidates.iter_mut()) {
            for (prompt, cont) in &refs.long {
                log(&format!("E: {name}, {}-token context", prompt.len()));
                let hits = teacher_forced_hits(lm, prompt, cont)?;
                r.e.push(LongContext {
                    context: prompt.len(),
                    tokens: hits.len(),
                    match_frac: frac(&hits),
                    drift_points: drift(&hits),
                    first_miss: hits.iter().position(|h| !h),
                });
            }
        }
    }
    for r in &mut results {
        r.bars = bars(r);
    }
    Ok(results)
}

/// Whether the model's argmax after `prompt + cont[..i]` is `cont[i]`, for every `i`.
fn teacher_forced_hits(lm: &mut CausalLm, prompt: &[i64], cont: &[i64]) -> Result<Vec<bool>> {
    let ids: Vec<i64> = prompt.iter().chain(cont).copied().collect();
    let (logits, vocab) = lm.forward(&ids[..ids.len() - 1])?;
    Ok(cont
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let pos = prompt.len() - 1 + i;
            argmax(&logits[pos * vocab..(pos + 1) * vocab]) as i64 == t
        })
        .collect())
}

/// Sum of NLL and count of scored tokens, HF-style sliding window: each window scores only
/// the tokens the previous window did not, so every token but the first is scored once,
/// with at least `window - stride` tokens of context after the first window.
fn sliding_nll(lm: &mut CausalLm, ids: &[i64], window: usize, stride: usize) -> Result<(f64, usize)> {
    let (mut nll, mut count, mut scored_to) = (0.0, 0usize, 1usize);
    let mut start = 0;
    loop {
        let end = (start + window).min(ids.len());
        let w = &ids[start..end];
        let (logits, vocab) = lm.forward(w)?;
        let first = scored_to.max(start + 1);
        for (target, &tok) in ids.iter().enumerate().take(end).skip(first) {
            let pos = target - 1 - start;
            nll -= log_softmax_at(&logits[pos * vocab..(pos + 1) * vocab], tok as usize);
            count += 1;
        }
        scored_to = end;
        if end == ids.len() {
            break;
        }
        start += stride;
    }
    Ok((nll, count))
}

fn log_softmax_at(x: &[f32], i: usize) -> f64 {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b)) as f64;
    let lse = x.iter().map(|v| (*v as f64 - m).exp()).sum::<f64>().ln() + m;
    x[i] as f64 - lse
}

/// Fraction of the reference's top-k tokens that are also in the candidate's top-k.
fn overlap(a: &[f32], b: &[f32], k: usize) -> f64 {
    let top = |x: &[f32]| {
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.select_nth_unstable_by(k - 1, |&i, &j| x[j].total_cmp(&x[i]));
        idx.truncate(k);
        idx
    };
    let (ta, tb) = (top(a), top(b));
    ta.iter().filter(|i| tb.contains(i)).count() as f64 / k as f64
}

fn frac(h: &[bool]) -> f64 {
    h.iter().filter(|x| **x).count() as f64 / h.len().max(1) as f64
}

/// Match % of the last third minus the first third, in points.
fn drift(h: &[bool]) -> f64 {
    let t = h.len() / 3;
    if t == 0 {
        return 0.0;
    }
    100.0 * (frac(&h[h.len() - t..]) - frac(&h[..t]))
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn read_roundtrip(dir: &Path) -> Option<RoundTrip> {
    let (folder, _) = qins::onnx::resolve_model_path(dir).ok()?;
    let bytes = folder.read_optional("qins_report.json", qins::files::MAX_CONFIG_BYTES).ok()??;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let layers = v["layers"].as_array()?;
    // No coded weights (a V-cache-only rewrite): nothing to report, not a vacuous pass.
    if layers.is_empty() {
        return None;
    }
    let (mut w, mut bits) = (0.0, 0.0);
    for l in layers {
        let n = l["shape"][0].as_f64()? * l["shape"][1].as_f64()?;
        w += n;
        bits += n * l["stats"]["bits_per_weight"].as_f64()?;
    }
    Some(RoundTrip {
        tensors: layers.len(),
        min_cosine: v["min_cosine"].as_f64()?,
        max_rel_fro: v["max_rel_fro"].as_f64()?,
        bits_per_weight: bits / w.max(1.0),
    })
}

fn bar(test: &str, bar: &str, value: String, pass: bool) -> BarResult {
    BarResult { test: test.into(), bar: bar.into(), value, pass }
}

/// The pass bars (docs/QUALITY.md).
pub fn bars(r: &CandidateResult) -> Vec<BarResult> {
    let mut v = Vec::new();
    if let Some(a) = &r.a {
        v.push(bar(
            "A",
            "cosine >= 0.9999 on every tensor",
            format!("min {:.6}", a.min_cosine),
            a.min_cosine >= 0.9999,
        ));
    }
    if let Some(b) = &r.b {
        v.push(bar("B", "mean greedy match >= 95%", format!("{:.2}%", 100.0 * b.mean_match), b.mean_match >= 0.95));
        v.push(bar("B", "drift >= -2 points", format!("{:+.2}", b.drift_points), b.drift_points >= -2.0));
    }
    if let Some(c) = &r.c {
        v.push(bar("C", "mean KL < 0.1", format!("{:.4}", c.mean_kl), c.mean_kl < 0.1));
        v.push(bar("C", "top-10 overlap >= 97%", format!("{:.2}%", 100.0 * c.top10), c.top10 >= 0.97));
    }
    if let Some(d) = &r.d {
        let ok = d.delta.abs() <= 0.1 || d.delta_rel.abs() <= 0.005;
        v.push(bar("D", "|dPPL| <= 0.1 or <= 0.5%", format!("{:+.3} ({:+.2}%)", d.delta, 100.0 * d.delta_rel), ok));
    }
    for e in &r.e {
        let t = format!("E{}", e.context);
        v.push(bar(&t, "match >= 95%", format!("{:.2}%", 100.0 * e.match_frac), e.match_frac >= 0.95));
        v.push(bar(&t, "drift >= -5 points", format!("{:+.2}", e.drift_points), e.drift_points >= -5.0));
    }
    v
}

/// The readable summary.
pub fn summary(results: &[CandidateResult]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for r in results {
        let _ = writeln!(s, "== {}", r.model);
        if let Some(b) = &r.b {
            let misses: Vec<String> = b.first_miss.iter().map(|m| m.map_or("-".into(), |x| x.to_string())).collect();
            let _ = writeln!(s, "   B first miss per prompt: {}", misses.join(" "));
        }
        if let Some(c) = &r.c {
            let _ = writeln!(
                s,
                "   C top-1/5/10 overlap {:.3}/{:.3}/{:.3}, max KL {:.3}",
                c.top1, c.top5, c.top10, c.max_kl
            );
        }
        if let Some(d) = &r.d {
            let _ = writeln!(s, "   D PPL {:.4} vs {:.4} over {} tokens", d.ppl, d.ppl_ref, d.tokens_scored);
        }
        for b in &r.bars {
            let _ =
                writeln!(s, "   [{}] {:<6} {:<36} {}", if b.pass { "PASS" } else { "FAIL" }, b.test, b.bar, b.value);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_and_fractions() {
        let h: Vec<bool> = (0..30).map(|i| i < 20).collect();
        assert!((frac(&h) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(drift(&h), -100.0);
        assert_eq!(drift(&[true; 9]), 0.0);
    }

    #[test]
    fn overlap_counts_shared_top_tokens() {
        let a = [5.0f32, 4.0, 3.0, 2.0, 1.0];
        let b = [1.0f32, 4.0, 3.0, 2.0, 5.0];
        assert_eq!(overlap(&a, &b, 1), 0.0);
        assert_eq!(overlap(&a, &b, 2), 0.5);
        assert_eq!(overlap(&a, &b, 4), 0.75);
        assert_eq!(overlap(&a, &a, 5), 1.0);
    }

    #[test]
    fn bars_fail_when_numbers_are_bad() {
        let r = CandidateResult {
            b: Some(Greedy { mean_match: 0.9, drift_points: -3.0, ..Default::default() }),
            d: Some(Perplexity { delta: 0.5, delta_rel: 0.01, ..Default::default() }),
            ..Default::default()
        };
        let b = bars(&r);
        assert_eq!(b.len(), 3);
        assert!(b.iter().all(|x| !x.pass));
        let good = CandidateResult {
            b: Some(Greedy { mean_match: 0.99, drift_points: -1.0, ..Default::default() }),
            d: Some(Perplexity { delta: 0.2, delta_rel: 0.004, ..Default::default() }),
            ..Default::default()
        };
        assert!(bars(&good).iter().all(|x| x.pass));
    }

    #[test]
    fn selection_parses() {
        let s = Selection::parse("A,B,D").unwrap();
        assert!(s.a && s.b && !s.c && s.d && !s.e);
        assert!(Selection::parse("A,Z").is_err());
    }
}
