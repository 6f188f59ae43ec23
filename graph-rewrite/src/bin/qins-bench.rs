//! Benchmarks of the rewrite: a full-size synthetic Phi-3.5-mini (fp16, real shapes,
//! random weights) rewritten in each format, with throughput and memory. Prints a table
//! and writes JSON; results are recorded in docs/BENCHMARKS.md.

use anyhow::{bail, Context, Result};
use clap::Parser;
use qins_graph_rewrite::plan::{self, PlanOptions};
use qins_graph_rewrite::rewrite::{self, NoProgress, RewriteOptions};
use qins_graph_rewrite::synth::{synthesize_phi3, Phi3Config};
use qins_graph_rewrite::{Format, Model};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "QINS benchmarks: rewrite throughput and memory, CPU forward time")]
enum Cmd {
    /// Rewrite a full-size synthetic Phi-3.5-mini (fp16) in each format.
    Rewrite(Args),
    /// Time one forward pass (prefill of N tokens, batch 1) of each model through ONNX
    /// Runtime on the CPU, with the QINS library.
    Forward(ForwardArgs),
    /// End to end: prefill time and greedy decode ms/token of each model, batch 1, KV cache
    /// kept on the device, all models in one run.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model folders.
    #[arg(required = true)]
    models: Vec<PathBuf>,
    /// cpu or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: qins_graph_rewrite::engine::Device,
    /// Prompt lengths whose prefill is timed.
    #[arg(long, default_value = "128,1024", value_delimiter = ',')]
    prefill: Vec<usize>,
    /// Decode: prompt length, then this many greedy tokens.
    #[arg(long, default_value_t = 128)]
    decode_prompt: usize,
    /// Greedy tokens generated after the decode prompt (each one timed step).
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Repetitions of each measurement after one warm-up; the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Also time decode with each step replayed from a CUDA graph (--device cuda).
    #[arg(long)]
    cuda_graph: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ForwardArgs {
    /// Model folders; the first is the baseline.
    #[arg(required = true)]
    models: Vec<PathBuf>,
    /// Prompt lengths to time (comma-separated).
    #[arg(long, default_value = "1,128")]
    tokens: String,
    /// Repetitions after one warm-up; the median is reported.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Intra-op threads (0: ONNX Runtime's choice).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
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
    /// Formats to rewrite into, one run each: 8, 6, 4 or f32 (comma-separated).
    #[arg(long, default_value = "8,4", value_delimiter = ',')]
    bits: Vec<String>,
    /// Group size along K; 0 = one scale per output channel.
    #[arg(long, default_value_t = 128)]
    group: usize,
    /// Fewer layers for a quick run (the full model has 32).
    #[arg(long)]
    layers: Option<usize>,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Ask the kernel to drop the page cache before each run (needs root), so the input
    /// is read from disk rather than memory.
    #[arg(long)]
    cold: bool,
    /// fsync the output (wait for the disk) inside the timed region.
    #[arg(long)]
    fsync: bool,
    /// Calibrate on this text (`qins rewrite --calibrate`), inside the timed region.
    #[arg(long, value_name = "TEXT")]
    calibrate: Option<PathBuf>,
    /// Tokens of the calibration text.
    #[arg(long, default_value_t = 8192, requires = "calibrate")]
    calib_tokens: usize,
    /// The tokenizer.json to place in the synthetic model's folder for calibration (it has
    /// none of its own).
    #[arg(long, default_value = "../shared/data/phi3-tokenizer.json", requires = "calibrate")]
    tokenizer: PathBuf,
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
    fsync: bool,
    min_cosine: f64,
    /// With --calibrate: tokens run, and seconds of the capture (part of `seconds`).
    #[serde(skip_serializing_if = "Option::is_none")]
    calib_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    calib_capture_seconds: Option<f64>,
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
    qins::onnx::install_interrupt_cleanup();
    qins::mapped::install_sigbus_guard();
    let cmd = Cmd::parse();
    // A JSON path that could not take the results fails now, not after the benchmark.
    let json = match &cmd {
        Cmd::Rewrite(a) => &a.json,
        Cmd::Forward(a) => &a.json,
        Cmd::Generate(a) => &a.json,
    };
    if let Some(p) = json {
        qins::files::check_output_file(p, &qins::files::Inputs::new(), "--json")?;
    }
    match cmd {
        Cmd::Rewrite(a) => rewrite_bench(a),
        Cmd::Forward(a) => forward_bench(a),
        Cmd::Generate(a) => generate_bench(a),
    }
}

fn generate_bench(a: GenerateArgs) -> Result<()> {
    use qins_graph_rewrite::engine::{CausalLm, EngineOptions, Sampling};
    let opts = EngineOptions { device: a.device, ..Default::default() };
    // Random ids, as a benchmark prompt needs no meaning; the same for every model.
    let mut rng = qins_graph_rewrite::engine::Rng::seeded(7);
    let longest = a.prefill.iter().copied().chain([a.decode_prompt]).max().unwrap_or(1);
    let ids: Vec<i64> = (0..longest).map(|_| 100 + (rng.next_u64() % 20_000) as i64).collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut rows = Vec::new();
    for m in &a.models {
        let t = Instant::now();
        let mut lm = CausalLm::open(m, &opts)?;
        let load_s = t.elapsed().as_secs_f64();
        let mut row = serde_json::json!({"model": m.display().to_string(), "load_s": load_s});
        for &n in &a.prefill {
            let mut times = Vec::new();
            for _ in 0..a.reps + 1 {
                let mut cache = lm.empty_cache()?;
                let t = Instant::now();
                lm.extend(&mut cache, &ids[..n], false)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.remove(0);
            row[format!("prefill_{n}_ms")] = median(times).into();
        }
        let mut per_token = Vec::new();
        for _ in 0..a.reps + 1 {
            let mut cache = lm.empty_cache()?;
            let (logits, _) = lm.extend(&mut cache, &ids[..a.decode_prompt], false)?;
            let mut tok = Sampling::Greedy.pick(&logits, &mut rng);
            let t = Instant::now();
            for _ in 0..a.new_tokens {
                let (l, _) = lm.extend(&mut cache, &[tok], false)?;
                tok = Sampling::Greedy.pick(&l, &mut rng);
            }
            per_token.push(t.elapsed().as_secs_f64() * 1e3 / a.new_tokens as f64);
        }
        per_token.remove(0);
        let ms = median(per_token);
        row["decode_ms_per_token"] = ms.into();
        row["decode_tokens_per_s"] = (1e3 / ms).into();
        if a.cuda_graph {
            drop(lm);
            let len = (a.decode_prompt + a.new_tokens).next_multiple_of(256);
            let mut lm = CausalLm::open(m, &EngineOptions { cuda_graph_len: len, ..opts.clone() })?;
            let mut per_token = Vec::new();
            let mut tokens = Vec::new();
            for _ in 0..a.reps + 1 {
                let g = lm.generate(&ids[..a.decode_prompt], a.new_tokens + 1, &Sampling::Greedy, &[], false)?;
                per_token.push(g.decode_s * 1e3 / a.new_tokens as f64);
                tokens = g.tokens;
            }
            // The first run includes the graph's capture.
            per_token.remove(0);
            let ms = median(per_token);
            row["graph_decode_ms_per_token"] = ms.into();
            row["graph_decode_tokens_per_s"] = (1e3 / ms).into();
            row["graph_tokens_head"] = serde_json::json!(tokens.iter().take(16).collect::<Vec<_>>());
        }
        eprintln!("{row}");
        rows.push(row);
    }
    println!(
        "end to end, {:?}, batch 1: prefill (ms) and greedy decode after {} tokens (median of {})",
        a.device, a.decode_prompt, a.reps
    );
    print!("{:<44}", "model");
    for n in &a.prefill {
        print!(" {:>12}", format!("prefill {n}"));
    }
    print!(" {:>10} {:>8}", "ms/token", "tok/s");
    println!(
        "{}",
        if a.cuda_graph { format!(" {:>15} {:>11}", "graph ms/token", "graph tok/s") } else { String::new() }
    );
    for r in &rows {
        print!("{:<44}", qins_graph_rewrite::report::short(r["model"].as_str().unwrap_or(""), 44));
        for n in &a.prefill {
            print!(" {:>12.2}", r[format!("prefill_{n}_ms")].as_f64().unwrap_or(0.0));
        }
        print!(
            " {:>10.3} {:>8.1}",
            r["decode_ms_per_token"].as_f64().unwrap_or(0.0),
            r["decode_tokens_per_s"].as_f64().unwrap_or(0.0)
        );
        if a.cuda_graph {
            print!(
                " {:>15.3} {:>11.1}",
                r["graph_decode_ms_per_token"].as_f64().unwrap_or(0.0),
                r["graph_decode_tokens_per_s"].as_f64().unwrap_or(0.0)
            );
        }
        println!();
    }
    if let Some(p) = a.json {
        let doc = serde_json::json!({"bench": "generate", "device": format!("{:?}", a.device), "rows": rows});
        qins::files::write_json_output(&p, &doc)?;
    }
    Ok(())
}

fn forward_bench(a: ForwardArgs) -> Result<()> {
    use qins_graph_rewrite::engine::{CausalLm, EngineOptions};
    let tokens: Vec<usize> = a.tokens.split(',').map(|t| t.trim().parse()).collect::<Result<_, _>>()?;
    let opts = EngineOptions { threads: a.threads, ..Default::default() };
    let mut rows = Vec::new();
    for m in &a.models {
        let mut lm = CausalLm::open(m, &opts)?;
        let bytes: u64 = std::fs::read_dir(m)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("model.onnx"))
            .map(|e| e.metadata().map(|md| md.len()).unwrap_or(0))
            .sum();
        for &n in &tokens {
            let ids: Vec<i64> = (0..n as i64).map(|i| 100 + (i * 37) % 5000).collect();
            lm.forward(&ids)?;
            let mut times: Vec<f64> = (0..a.reps)
                .map(|_| {
                    let t = Instant::now();
                    lm.forward(&ids).map(|_| t.elapsed().as_secs_f64() * 1e3)
                })
                .collect::<Result<_>>()?;
            times.sort_by(f64::total_cmp);
            rows.push(serde_json::json!({"model": m.display().to_string(), "model_bytes": bytes, "tokens": n, "median_ms": times[times.len() / 2], "min_ms": times[0]}));
        }
    }
    println!(
        "CPU forward (batch 1, empty cache), {} CPUs, median of {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        a.reps
    );
    println!("{:<40} {:>10} {:>7} {:>10} {:>10}", "model", "MB", "tokens", "median ms", "min ms");
    for r in &rows {
        println!(
            "{:<40} {:>10.1} {:>7} {:>10.2} {:>10.2}",
            qins_graph_rewrite::report::short(r["model"].as_str().unwrap_or(""), 40),
            r["model_bytes"].as_u64().unwrap_or(0) as f64 / 1e6,
            r["tokens"],
            r["median_ms"].as_f64().unwrap_or(0.0),
            r["min_ms"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(p) = a.json {
        qins::files::write_json_output(&p, &serde_json::json!({"bench": "forward", "rows": rows}))?;
    }
    Ok(())
}

fn rewrite_bench(a: Args) -> Result<()> {
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
    if a.calibrate.is_some() && !a.model.join("tokenizer.json").exists() {
        std::fs::copy(&a.tokenizer, a.model.join("tokenizer.json"))
            .with_context(|| format!("copy {} into the synthetic model", a.tokenizer.display()))?;
    }
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut rows = Vec::new();
    for b in &a.bits {
        let format = Format::parse(b).with_context(|| format!("bad format {b}"))?;
        // Start each run from the same state: no earlier output, nothing left to write back
        // from it (the last run's dirty pages would otherwise throttle this one's writes).
        if a.out.exists() {
            // Only an earlier output of ours goes; anything else at that path stays.
            if !qins::files::is_our_output_dir(&a.out)? {
                bail!("{} exists and is not an earlier qins output; not removing it", a.out.display());
            }
            std::fs::remove_dir_all(&a.out)?;
        }
        let cold = if a.cold {
            drop_caches()
        } else {
            // SAFETY: sync(2) has no preconditions.
            unsafe { libc_sync() };
            // Warm means the input is in the page cache: read it once, untimed, in case
            // earlier outputs pushed part of it out.
            for f in std::fs::read_dir(&a.model)? {
                let mut file = std::fs::File::open(f?.path())?;
                std::io::copy(&mut file, &mut std::io::sink())?;
            }
            false
        };
        let model = Model::load(&a.model)?;
        let plan = plan::plan(&model, &PlanOptions::default())?;
        let opts = RewriteOptions { format, group: a.group, force: true, fsync: a.fsync, kv_v: None, library: None };
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
        let calib = match &a.calibrate {
            Some(text) => {
                use qins_graph_rewrite::calibrate::{calibrate, text_ids, CalibOptions};
                let ids = text_ids(&model, text, a.calib_tokens)?;
                let spill_dir = a.out.parent().unwrap_or(Path::new(".")).to_path_buf();
                let co = CalibOptions { window: 512, spill_dir, ..Default::default() };
                Some(calibrate(&model, &plan, &ids, &co, &mut |i, n| eprint!("\r  calibration window {i}/{n}"))?)
            }
            None => None,
        };
        let report = rewrite::rewrite_calibrated(&model, &plan, &opts, calib.as_ref(), &a.out, &mut NoProgress)?;
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
            // /proc reports KiB; every size this project prints is decimal (MB = 10^6 bytes).
            // Runs recorded before 2026-12-07 divided by 1024 (MiB labelled MB: 4.9% lower).
            peak_anon_mb: (peak_anon.load(Ordering::Relaxed).saturating_sub(base_anon)) as f64 * 1024.0 / 1e6,
            peak_rss_mb: peak_rss.load(Ordering::Relaxed) as f64 * 1024.0 / 1e6,
            cold_cache: cold,
            fsync: a.fsync,
            min_cosine: report.min_cosine,
            calib_tokens: calib.as_ref().map(|c| c.tokens),
            calib_capture_seconds: calib.as_ref().map(|c| c.seconds),
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
        "{:<6} {:>6} {:>9} {:>9} {:>8} {:>9} {:>12} {:>11} {:>5} {:>10} {:>13}",
        "format",
        "group",
        "in GB",
        "out GB",
        "sec",
        "MB/s",
        "peak anon MB",
        "peak RSS MB",
        "cold",
        "min cos",
        "calib tok/s"
    );
    for r in &rows {
        println!(
            "{:<6} {:>6} {:>9.2} {:>9.2} {:>8.1} {:>9.0} {:>12.0} {:>11.0} {:>5} {:>10.6} {:>13}",
            r.format,
            r.group,
            r.input_weight_gb,
            r.output_gb,
            r.seconds,
            r.mb_per_s,
            r.peak_anon_mb,
            r.peak_rss_mb,
            r.cold_cache,
            r.min_cosine,
            match (r.calib_tokens, r.calib_capture_seconds) {
                (Some(t), Some(c)) => format!("{t} in {c:.0} s"),
                _ => "-".into(),
            }
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
        qins::files::write_json_output(&p, &doc)?;
    }
    Ok(())
}
