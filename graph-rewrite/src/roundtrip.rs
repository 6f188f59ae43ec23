//! The round-trip report: every targeted weight through each QINS format and through the
//! quantizers a user would otherwise pick, on the same groups, side by side.

use crate::plan::{Plan, Target};
use crate::report::short;
use crate::rewrite::staged_source;
use anyhow::Result;
use qins::codec::{
    baseline_bits_per_weight, baseline_roundtrip, encode_matrix, Baseline, Format, Layout, Scratch, TensorStats,
};
use qins::onnx::Model;
use serde::Serialize;
use std::fmt::Write;

/// A quantizer in the report: a QINS format or a baseline.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Method {
    Qins(Format),
    Base(Baseline),
}

impl Method {
    pub fn name(&self) -> String {
        match self {
            Method::Qins(f) => format!("qins-{}", f.name()),
            Method::Base(b) => b.name().to_string(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TensorRow {
    pub name: String,
    pub shape: [usize; 2],
    /// Method name -> stats, in `RoundTripReport::methods` order.
    pub stats: Vec<TensorStats>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MethodSummary {
    pub method: String,
    pub min_cosine: f64,
    pub mean_cosine: f64,
    pub mean_rel_fro: f64,
    pub max_rel_fro: f64,
    pub max_p99_rel: f64,
    pub max_abs: f64,
    pub bits_per_weight: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Bar {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct RoundTripReport {
    pub model: String,
    pub group: usize,
    pub methods: Vec<String>,
    pub summary: Vec<MethodSummary>,
    pub bars: Vec<Bar>,
    pub tensors: Vec<TensorRow>,
}

pub fn methods() -> Vec<Method> {
    vec![
        Method::Qins(Format::F32),
        Method::Qins(Format::Q8),
        Method::Base(Baseline::Int8),
        Method::Qins(Format::Q6),
        Method::Qins(Format::Q4),
        Method::Base(Baseline::Int4),
        Method::Base(Baseline::Nf4),
    ]
}

/// Runs every method on every target of `plan` with group size `group` (0: per channel).
pub fn roundtrip(
    model: &Model,
    plan: &Plan,
    group: usize,
    progress: &mut dyn FnMut(&Target),
) -> Result<RoundTripReport> {
    let methods = methods();
    let mut tensors = Vec::new();
    let mut scratch = Scratch::new();
    for t in &plan.targets {
        progress(t);
        let src = staged_source(model, t, &mut scratch)?;
        let mut stats = Vec::new();
        for m in &methods {
            stats.push(match m {
                Method::Qins(f) => {
                    let layout = Layout::new(*f, t.k, t.n(), group);
                    let (_, rows) = encode_matrix(src, layout)?;
                    TensorStats::from_rows(&rows, layout.bits_per_weight())
                }
                Method::Base(b) => {
                    let rows = baseline_roundtrip(src, group, *b);
                    TensorStats::from_rows(&rows, baseline_bits_per_weight(*b, t.k, group))
                }
            });
        }
        tensors.push(TensorRow { name: t.label(), shape: [t.k, t.n()], stats });
    }
    let weights: Vec<f64> = tensors.iter().map(|r| (r.shape[0] * r.shape[1]) as f64).collect();
    let total_w: f64 = weights.iter().sum();
    let summary = methods
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let col = || tensors.iter().map(move |r| r.stats[i]);
            let n = tensors.len().max(1) as f64;
            MethodSummary {
                method: m.name(),
                min_cosine: col().map(|s| s.cosine).fold(f64::INFINITY, f64::min),
                mean_cosine: col().map(|s| s.cosine).sum::<f64>() / n,
                mean_rel_fro: col().map(|s| s.rel_fro).sum::<f64>() / n,
                max_rel_fro: col().map(|s| s.rel_fro).fold(0.0, f64::max),
                max_p99_rel: col().map(|s| s.p99_rel).fold(0.0, f64::max),
                max_abs: col().map(|s| s.max_abs).fold(0.0, f64::max),
                bits_per_weight: col().zip(&weights).map(|(s, w)| s.bits_per_weight * w).sum::<f64>()
                    / total_w.max(1.0),
            }
        })
        .collect();
    let col = |m: Method| methods.iter().position(|x| *x == m).expect("method listed");
    let (f32i, q8i, q4i, i4i) = (
        col(Method::Qins(Format::F32)),
        col(Method::Qins(Format::Q8)),
        col(Method::Qins(Format::Q4)),
        col(Method::Base(Baseline::Int4)),
    );
    let count = |f: &dyn Fn(&TensorRow) -> bool| tensors.iter().filter(|r| f(r)).count();
    let n = tensors.len();
    let f32_ok = count(&|r| r.stats[f32i].cosine >= 0.999999 && r.stats[f32i].max_abs <= 1e-6);
    let q8_ok = count(&|r| r.stats[q8i].cosine >= 0.9999);
    let q4_ok = count(&|r| r.stats[q4i].rel_fro <= r.stats[i4i].rel_fro);
    let bars = vec![
        Bar {
            name: "f32: cosine >= 0.999999 and max_abs <= 1e-6 on every tensor".into(),
            pass: f32_ok == n,
            detail: format!("{f32_ok}/{n} tensors"),
        },
        Bar {
            name: "q8: cosine >= 0.9999 on every tensor".into(),
            pass: q8_ok == n,
            detail: format!("{q8_ok}/{n} tensors"),
        },
        Bar {
            name: "q4: rel_fro <= int4 round-to-nearest (same group) on every tensor".into(),
            pass: q4_ok == n,
            detail: format!("{q4_ok}/{n} tensors"),
        },
    ];
    Ok(RoundTripReport {
        model: model.path.display().to_string(),
        group,
        methods: methods.iter().map(Method::name).collect(),
        summary,
        bars,
        tensors,
    })
}

impl RoundTripReport {
    pub fn table(&self, per_tensor: bool) -> String {
        let mut s = String::new();
        let g = if self.group == 0 { "per-channel".to_string() } else { format!("group {}", self.group) };
        let _ = writeln!(s, "round trip of {} tensors, {g} (f32 is always per-channel)", self.tensors.len());
        let _ = writeln!(
            s,
            "{:<10} {:>6} {:>11} {:>11} {:>10} {:>10} {:>10} {:>10}",
            "method", "bpw", "min cos", "mean cos", "mean rel", "max rel", "max p99", "max abs"
        );
        for m in &self.summary {
            let _ = writeln!(
                s,
                "{:<10} {:>6.3} {:>11.8} {:>11.8} {:>10.3e} {:>10.3e} {:>10.3e} {:>10.3e}",
                m.method,
                m.bits_per_weight,
                m.min_cosine,
                m.mean_cosine,
                m.mean_rel_fro,
                m.max_rel_fro,
                m.max_p99_rel,
                m.max_abs
            );
        }
        if per_tensor {
            let _ = write!(s, "\n{:<44} {:>11}", "tensor rel_fro", "shape");
            for m in &self.methods {
                let _ = write!(s, " {m:>9}");
            }
            let _ = writeln!(s);
            for r in &self.tensors {
                let _ = write!(s, "{:<44} {:>11}", short(&r.name, 44), format!("{}x{}", r.shape[0], r.shape[1]));
                for st in &r.stats {
                    let _ = write!(s, " {:>9.3e}", st.rel_fro);
                }
                let _ = writeln!(s);
            }
        }
        for b in &self.bars {
            let _ = writeln!(s, "[{}] {} ({})", if b.pass { "PASS" } else { "FAIL" }, b.name, b.detail);
        }
        s
    }
}
