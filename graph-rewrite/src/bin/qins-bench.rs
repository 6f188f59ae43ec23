//! Benchmarks of the rewrite: a full-size synthetic Phi-3.5-mini (fp16, real shapes,
//! random weights) rewritten in each format, with throughput and memory. Prints a table
//! and writes JSON; results are recorded in docs/BENCHMARKS.md.

use anyhow::{Context, Result};
use clap::Parser;
use qins_graph_rewrite::plan::{self, PlanOptions};
use qins_graph_rewrite::rewrite::{self, NoProgress, RewriteOptions};
use qins_graph_rewrite::synth::{synthesize_phi3, Phi3Config};
use qins_graph_rewrite::{Format, Model};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Rewrite throughput and memory on a full-size synthetic Phi-3.5-mini")]
struct Args {
    /// The builder's tiny fp16 Phi-3 model, grown into the full-size one.
    #[arg(long, default_value = "tests/fixtures/phi35-tiny-fp16-cuda")]
    template: PathBuf,
    /// Where the synthetic model lives (made once, reused).
    #[arg(long, default_value = "target/bench/phi35-mini-fp16")]
    model: PathBuf,
    /// Where rewritten models go (replaced each run).
    #[arg(long, default_value = "target/bench/out")]
    out: PathBuf,
    #[arg(long, default_value = "8,4", value_delimiter = ',')]
    bits: Vec<String>,
    #[arg(long, default_value_t = 128)]
    group: usize,
    /// Fewer layers for a quick run (the full model has 32).
    #[arg(long)]
    layers: Option<usize>,
    /// Also write the results here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Ask the kernel to drop the page cache before each run (needs root), so the input
    /// is read from disk rather than memory.
    #[arg(long)]
    cold: bool,
}

#[derive(serde::Serialize)]
struct Row {
    format: String,
    group: usize,
    input_weight_gb: f64,
    output_gb: f64,
    seconds: f64,
    mb_per_s: f64,
    peak_anon_mb: f64,
    peak_rss_mb: f64,
    cold_cache: bool,
    min_cosine: f64,
}

/// Reads `RssAnon` and `VmRSS` (kB) of this process.
fn rss() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |k: &str| {
        s.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok())
    };
    (get("RssAnon:").unwrap_or(0), get("VmRSS:").unwrap_or(0))
}

fn drop_caches() -> bool {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc_sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

extern "C" {
    #[link_name = "sync"]
    fn libc_sync();
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut cfg = Phi3Config::phi35_mini();
    if let Some(l) = a.layers {
        cfg.layers = l;
    }
    let onnx = a.model.join("model.onnx");
    let fresh = !onnx.exists() || Model::load(&a.model).map(|m| m.graph().node.len()).unwrap_or(0) == 0;
    if fresh {
        eprintln!("synthesizing {} ({:.2} B parameters) ...", a.model.display(), cfg.parameters() as f64 / 1e9);
        let t = Instant::now();
        let bytes = synthesize_phi3(&a.template, &a.model, &cfg, true).context("synthesize")?;
        eprintln!("  {:.1} GB in {:.1} s", bytes as f64 / 1e9, t.elapsed().as_secs_f64());
    }
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut rows = Vec::new();
    for b in &a.bits {
        let format = Format::parse(b).with_context(|| format!("bad format {b}"))?;
        let cold = a.cold && drop_caches();
        let model = Model::load(&a.model)?;
        let plan = plan::plan(&model, &PlanOptions::default())?;
        let opts = RewriteOptions { format, group: a.group, force: true };
        let base_anon = rss().0;
        let (stop, peak_anon, peak_rss) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let sampler = {
            let (stop, peak_anon, peak_rss) = (stop.clone(), peak_anon.clone(), peak_rss.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (an, r) = rss();
                    peak_anon.fetch_max(an, Ordering::Relaxed);
                    peak_rss.fetch_max(r, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let t = Instant::now();
        let report = rewrite::rewrite(&model, &plan, &opts, &a.out, &mut NoProgress)?;
        let secs = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        sampler.join().ok();
        let row = Row {
            format: format.name().into(),
            group: a.group,
            input_weight_gb: report.input_weight_bytes as f64 / 1e9,
            output_gb: report.output.data_bytes as f64 / 1e9,
            seconds: secs,
            mb_per_s: report.input_weight_bytes as f64 / 1e6 / secs,
            peak_anon_mb: (peak_anon.load(Ordering::Relaxed).saturating_sub(base_anon)) as f64 / 1024.0,
            peak_rss_mb: peak_rss.load(Ordering::Relaxed) as f64 / 1024.0,
            cold_cache: cold,
            min_cosine: report.min_cosine,
        };
        eprintln!("{} done: {:.1} s", row.format, secs);
        rows.push(row);
    }
    println!(
        "rewrite of synthetic Phi-3.5-mini ({} layers, {:.2} B params, fp16), {cpus} CPUs",
        cfg.layers,
        cfg.parameters() as f64 / 1e9
    );
    println!(
        "{:<6} {:>6} {:>9} {:>9} {:>8} {:>9} {:>12} {:>11} {:>5} {:>10}",
        "format", "group", "in GB", "out GB", "sec", "MB/s", "peak anon MB", "peak RSS MB", "cold", "min cos"
    );
    for r in &rows {
        println!(
            "{:<6} {:>6} {:>9.2} {:>9.2} {:>8.1} {:>9.0} {:>12.0} {:>11.0} {:>5} {:>10.6}",
            r.format,
            r.group,
            r.input_weight_gb,
            r.output_gb,
            r.seconds,
            r.mb_per_s,
            r.peak_anon_mb,
            r.peak_rss_mb,
            r.cold_cache,
            r.min_cosine
        );
    }
    let doc = serde_json::json!({
        "bench": "rewrite",
        "model": cfg,
        "parameters": cfg.parameters(),
        "cpus": cpus,
        "rows": rows,
    });
    if let Some(p) = a.json {
        std::fs::write(&p, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}
