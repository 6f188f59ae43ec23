//! Per-layer tables: printed for people, written as JSON for tools.

use crate::plan::{Role, Target};
use qins::codec::{Layout, TensorStats};
use qins::onnx::{Model, SaveStats};
use serde::Serialize;
use std::fmt::Write;

#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub name: String,
    pub role: Role,
    pub layer: Option<usize>,
    pub weight: String,
    /// The up projection fused into this gate's op (`swiglu = 1`), if any.
    pub fused_up: Option<String>,
    /// `[K, N]` of the encoded part.
    pub shape: [usize; 2],
    /// Column range of the stored weight that was encoded.
    pub cols: [usize; 2],
    pub format: String,
    pub group: usize,
    pub stats: TensorStats,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub seconds: f64,
}

impl LayerReport {
    pub fn new(t: &Target, layout: &Layout, stats: TensorStats, seconds: f64) -> LayerReport {
        LayerReport {
            name: t.name.clone(),
            role: t.role,
            layer: t.layer,
            weight: t.weight.clone(),
            fused_up: t.swiglu.as_ref().map(|s| s.up_name.clone()),
            shape: [t.k, t.n()],
            cols: [t.cols.start, t.cols.end],
            format: layout.format.name().into(),
            group: layout.group,
            stats,
            bytes_before: (t.k * t.n() * t.elem.bytes()) as u64,
            bytes_after: layout.stored_bytes() as u64,
            seconds,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RewriteReport {
    pub input: String,
    pub format: String,
    pub group: usize,
    pub layers: Vec<LayerReport>,
    /// Bytes of weights read from the input (copied, sliced or encoded).
    pub input_weight_bytes: u64,
    pub output: SaveStats,
    pub seconds: f64,
    /// `input_weight_bytes / seconds`, MB/s (10^6).
    pub throughput_mb_s: f64,
    pub min_cosine: f64,
    pub max_rel_fro: f64,
    pub targeted_bytes_before: u64,
    pub targeted_bytes_after: u64,
    /// The V cache pass (`--kv-v`), if it ran.
    pub kv_v: Option<crate::kv_v::KvVReport>,
    /// `--calibrate`, if it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibSummary>,
}

impl RewriteReport {
    /// The report of a rewrite of `model` into `format` with groups of `group`.
    pub fn new(
        model: &Model,
        format: qins::codec::Format,
        group: usize,
        layers: Vec<LayerReport>,
        output: SaveStats,
        input_weight_bytes: u64,
        seconds: f64,
    ) -> RewriteReport {
        RewriteReport {
            input: model.path.display().to_string(),
            format: format.name().into(),
            group,
            min_cosine: layers.iter().map(|l| l.stats.cosine).fold(f64::INFINITY, f64::min),
            max_rel_fro: layers.iter().map(|l| l.stats.rel_fro).fold(0.0, f64::max),
            targeted_bytes_before: layers.iter().map(|l| l.bytes_before).sum(),
            targeted_bytes_after: layers.iter().map(|l| l.bytes_after).sum(),
            layers,
            input_weight_bytes,
            output,
            seconds,
            throughput_mb_s: input_weight_bytes as f64 / 1e6 / seconds.max(1e-9),
            kv_v: None,
            calibration: None,
        }
    }

    /// The per-layer table and a summary, for the terminal.
    pub fn table(&self) -> String {
        let mut s = String::new();
        if self.layers.is_empty() {
            // A V-cache-only rewrite: no weight table.
            let _ = writeln!(s, "no weights coded (--preset none)");
            return self.kv_v_line(s);
        }
        let _ = writeln!(
            s,
            "{:<44} {:>13} {:>4} {:>5} {:>10} {:>9} {:>9} {:>9} {:>6} {:>10} {:>10}",
            "node",
            "shape KxN",
            "fmt",
            "group",
            "cosine",
            "rel_fro",
            "p99_rel",
            "max_abs",
            "bpw",
            "bytes in",
            "bytes out"
        );
        for l in &self.layers {
            let _ = writeln!(
                s,
                "{:<44} {:>13} {:>4} {:>5} {:>10.7} {:>9.2e} {:>9.2e} {:>9.2e} {:>6.3} {:>10} {:>10}",
                short(&crate::plan::label(&l.name, l.fused_up.is_some()), 44),
                format!("{}x{}", l.shape[0], l.shape[1]),
                l.format,
                l.group,
                l.stats.cosine,
                l.stats.rel_fro,
                l.stats.p99_rel,
                l.stats.max_abs,
                l.stats.bits_per_weight,
                l.bytes_before,
                l.bytes_after
            );
        }
        let _ = writeln!(
            s,
            "{} tensors -> QINS {} (group {}): {:.1} MB -> {:.1} MB targeted, min cosine {:.7}, max rel_fro {:.2e}",
            self.layers.len(),
            self.format,
            if self.group == 0 { "per-channel".to_string() } else { self.group.to_string() },
            self.targeted_bytes_before as f64 / 1e6,
            self.targeted_bytes_after as f64 / 1e6,
            self.min_cosine,
            self.max_rel_fro
        );
        let _ = writeln!(
            s,
            "model weights read: {:.1} MB in {:.2} s ({:.0} MB/s); wrote {:.1} MB data + {:.2} MB graph",
            self.input_weight_bytes as f64 / 1e6,
            self.seconds,
            self.throughput_mb_s,
            self.output.data_bytes as f64 / 1e6,
            self.output.onnx_bytes as f64 / 1e6
        );
        self.kv_v_line(s)
    }

    fn kv_v_line(&self, mut s: String) -> String {
        if let Some(k) = &self.kv_v {
            let _ = writeln!(
                s,
                "V cache: {} GroupQueryAttention -> QinsGroupQueryAttention, v {} ({} bytes a row of {}); \
                 K+V cache {} -> {} bytes per token ({:.3}x)",
                k.nodes,
                k.format,
                k.row_bytes,
                k.head_dim,
                k.kv_bytes_per_token_before,
                k.kv_bytes_per_token_after,
                k.kv_bytes_per_token_after as f64 / k.kv_bytes_per_token_before.max(1) as f64
            );
        }
        s
    }
}

/// Keeps the end of long node names, where the distinguishing part is.
pub fn short(name: &str, width: usize) -> String {
    if name.chars().count() <= width {
        return name.to_string();
    }
    let tail: String = name.chars().rev().take(width - 1).collect::<Vec<_>>().into_iter().rev().collect();
    format!("…{tail}")
}

/// `--calibrate` as the rewrite report records it (`crate::calibrate` fills it in).
#[derive(Clone, Debug, serde::Serialize)]
pub struct CalibSummary {
    /// The text file's name.
    pub text: String,
    pub tokens: usize,
    pub windows: usize,
    pub seconds: f64,
    pub damp: f64,
    pub scale_rule: crate::gptq::ScaleRule,
    pub act_order: bool,
    pub method: &'static str,
}
