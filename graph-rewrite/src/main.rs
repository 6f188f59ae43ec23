//! `qins`: inspect, rewrite and report on ONNX models; import real models.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use qins::files::{check_output_file, write_json_output, Inputs};
use qins_graph_rewrite::engine::Device;
use qins_graph_rewrite::gptq::{GptqOptions, ScaleRule};
use qins_graph_rewrite::plan::{self, parse_qkv_split, PlanOptions, Preset};
use qins_graph_rewrite::report::short;
use qins_graph_rewrite::rewrite::{self, Progress, RewriteOptions};
use qins_graph_rewrite::{roundtrip, Format, Model};
use regex::Regex;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "qins", version, about = "QINS weight compression for ONNX Runtime models")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the MatMul nodes, their shapes, and which ones a rewrite would take.
    Inspect {
        /// Model folder or .onnx file.
        model: PathBuf,
        #[command(flatten)]
        select: Select,
        /// Write the candidates as JSON to this file ('-': to stdout, instead of the table).
        #[arg(long, value_name = "FILE")]
        json: Option<JsonOut>,
    },
    /// Replace the targeted MatMuls with QINS ops and write a new model folder.
    Rewrite {
        /// Model folder (with model.onnx) or .onnx file.
        model: PathBuf,
        /// Output folder (created; never the input's folder). The model is written into it
        /// as model.onnx with its data, config and tokenizer files beside it.
        #[arg(short, long, value_name = "DIR")]
        out: PathBuf,
        /// Storage format: 8, 6, 4 (integer codes) or f32 (z kept as float).
        #[arg(long, default_value = "8", value_parser = parse_format)]
        bits: Format,
        /// Group size along K for the scales; 0 = one scale per output channel.
        #[arg(long, default_value_t = 128)]
        group: usize,
        /// V cache format: q8 or q4 replaces each GroupQueryAttention with
        /// QinsGroupQueryAttention over a QINS-coded V cache (K stays float); none leaves
        /// attention as it is. Use with --preset none to leave the weights untouched.
        #[arg(long, default_value = "none", value_parser = qins_graph_rewrite::kv_v::parse)]
        kv_v: qins_graph_rewrite::kv_v::VCache,
        #[command(flatten)]
        select: Select,
        /// Show the plan and the expected sizes, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Replace the output folder if it is an earlier output of qins.
        #[arg(long)]
        force: bool,
        /// Wait until the output is on disk before finishing (fsync).
        #[arg(long)]
        fsync: bool,
        /// Also write the per-layer report as JSON to this file ('-': stdout); it is always
        /// in the output folder as qins_report.json.
        #[arg(long, value_name = "FILE", alias = "report")]
        json: Option<JsonOut>,
        /// The QINS custom-op library copied into the output folder for onnxruntime-genai
        /// (default: $QINS_PROVIDER_LIB, or the one beside this program).
        #[arg(long, value_name = "FILE")]
        provider_lib: Option<PathBuf>,
        /// Leave the custom-op library out of the output folder (for apps that register it
        /// themselves); genai_config.json is then left as the input's.
        #[arg(long)]
        no_library: bool,
        #[command(flatten)]
        calib: CalibArgs,
        /// No progress bar and no per-layer table.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Import a GGUF model (Llama architecture, e.g. SmolLM2) into an fp32 ONNX model in
    /// the onnxruntime-genai builder's layout, with tokenizer.json and genai_config.json.
    ImportGguf {
        /// The .gguf file.
        gguf: PathBuf,
        /// Output folder (created), for model.onnx and the files beside it.
        #[arg(short, long, value_name = "DIR")]
        out: PathBuf,
        /// Replace the output folder if it is an earlier import of qins.
        #[arg(long)]
        force: bool,
        /// Also write the import report as JSON to this file ('-': stdout).
        #[arg(long, value_name = "FILE")]
        json: Option<JsonOut>,
    },
    /// Compare rewritten models with the original on real text (teacher-forced logits:
    /// argmax agreement, NLL, KL) through ONNX Runtime with the QINS library.
    Parity {
        /// The original model folder (its tokenizer.json encodes the text).
        reference: PathBuf,
        /// Rewritten model folders.
        #[arg(required = true)]
        models: Vec<PathBuf>,
        /// Text to score: a .txt file, or the JSON of Wikipedia summaries.
        #[arg(long)]
        text: PathBuf,
        /// quick: teacher-forced logits over text windows (argmax agreement, NLL, KL);
        /// full: the validation suite A-E (docs/QUALITY.md); ci: the suite, reduced.
        #[arg(long, value_enum, default_value_t = SuiteKind::Quick)]
        suite: SuiteKind,
        /// Tests of the suite to run (letters A to E).
        #[arg(long, default_value = "ABCDE")]
        tests: String,
        /// Where the suite writes its plots (PNG).
        #[arg(long, value_name = "DIR")]
        plots: Option<PathBuf>,
        /// quick: tokens per window (at least 2: one token and the next it predicts).
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(2..=1_000_000))]
        window: u32,
        /// quick: number of windows (at least 1).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        windows: u32,
        #[command(flatten)]
        runtime: Runtime,
        /// Intra-op threads (0: ONNX Runtime's choice; at most 4 per core of this machine).
        #[arg(long, default_value_t = 0, value_parser = parse_threads)]
        threads: usize,
        /// Write the results as JSON to this file ('-': stdout).
        #[arg(long, value_name = "FILE")]
        json: Option<JsonOut>,
    },
    /// Generate text with a model (original or rewritten) through ONNX Runtime, printing
    /// tokens as they come and the speed at the end.
    Generate {
        /// Model folder (with model.onnx and tokenizer.json) or .onnx file.
        model: PathBuf,
        /// The prompt (as is, or as the user's turn with --chat).
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt in the model's chat template (tokenizer_config.json's
        /// chat_template), as one user turn followed by the assistant's.
        #[arg(long)]
        chat: bool,
        /// With --chat: a system turn before the user's.
        #[arg(long, requires = "chat")]
        system: Option<String>,
        /// Most tokens to generate (fewer if the model ends its answer).
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// Sampling temperature; 0 is greedy (the most likely token each step).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling: draw from the smallest set of tokens whose probability reaches this.
        #[arg(long, default_value_t = 0.9)]
        top_p: f32,
        /// Seed of the sampler (the same seed gives the same tokens).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// With --device cuda: replay each decode step from a CUDA graph (static KV buffer,
        /// onnxruntime-genai builder models within their original context).
        #[arg(long)]
        cuda_graph: bool,
        #[command(flatten)]
        runtime: Runtime,
        /// Write the prompt's and the generated tokens, the text and the timings as JSON to
        /// this file ('-': stdout; the text then goes to stderr).
        #[arg(long, value_name = "FILE")]
        json: Option<JsonOut>,
    },
    /// Round-trip every targeted weight through each QINS format and int8/int4/NF4.
    Report {
        /// Model folder or .onnx file.
        model: PathBuf,
        /// Group size along K; 0 = per output channel.
        #[arg(long, default_value_t = 128)]
        group: usize,
        #[command(flatten)]
        select: Select,
        /// Write the full report as JSON to this file ('-': stdout, instead of the table).
        #[arg(long, value_name = "FILE")]
        json: Option<JsonOut>,
        /// Print every tensor, not only the summary.
        #[arg(long)]
        per_tensor: bool,
    },
}

/// `qins rewrite --calibrate` and the options that go with it.
#[derive(Args)]
struct CalibArgs {
    /// Calibrate on this text (plain text, or JSON as parity --text reads it): the original
    /// model runs on it through ONNX Runtime, and each weight is encoded to minimise the
    /// error of its MatMul's output on those inputs (GPTQ's error feedback on the QINS grid;
    /// docs/FORMAT.md). Integer formats only. Do not calibrate on the text you evaluate on.
    #[arg(long, value_name = "TEXT")]
    calibrate: Option<PathBuf>,
    /// Tokens of the calibration text to run, from its start.
    #[arg(long, default_value_t = 8192, requires = "calibrate", value_name = "N")]
    calib_tokens: usize,
    /// Tokens per forward pass of the calibration.
    #[arg(long, default_value_t = 512, requires = "calibrate", value_name = "N")]
    calib_window: usize,
    /// Added to the Hessian's diagonal, as a fraction of its mean.
    #[arg(long, default_value_t = 0.01, requires = "calibrate", value_name = "X")]
    damp: f32,
    /// How group scales are chosen under calibration: weight (the weights' squared error)
    /// or activation (weighted by each input's mean square on the text).
    #[arg(long, default_value = "weight", requires = "calibrate", value_parser = parse_scale_rule)]
    scale_rule: ScaleRule,
    /// Code each weight's inputs in order of decreasing importance on the text (GPTQ's
    /// act-order; the group scales are then chosen before the feedback).
    #[arg(long, requires = "calibrate")]
    act_order: bool,
    /// ONNX Runtime threads for the calibration runs (0: its default).
    #[arg(long, default_value_t = 0, requires = "calibrate", value_name = "N")]
    calib_threads: usize,
    /// ONNX Runtime library for the calibration runs (default: $ORT_DYLIB_PATH, else the one
    /// of a pip-installed onnxruntime that python3 can import).
    #[arg(long, value_name = "FILE", requires = "calibrate")]
    ort_lib: Option<PathBuf>,
}

fn parse_scale_rule(s: &str) -> Result<ScaleRule, String> {
    match s {
        "weight" => Ok(ScaleRule::Weight),
        "activation" => Ok(ScaleRule::Activation),
        _ => Err(format!("'{s}': expected weight or activation")),
    }
}

/// Where a model runs: the commands that run one through ONNX Runtime.
#[derive(Args)]
struct Runtime {
    /// cpu, or cuda[:N] (ONNX Runtime with the CUDA execution provider).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// ONNX Runtime library (default: $ORT_DYLIB_PATH, else the one of a pip-installed
    /// onnxruntime that python3 can import).
    #[arg(long, value_name = "FILE")]
    ort_lib: Option<PathBuf>,
    /// QINS custom-op library (default: $QINS_PROVIDER_LIB, or the one beside this program).
    #[arg(long, value_name = "FILE")]
    provider_lib: Option<PathBuf>,
}

/// `--json FILE`, the same in every command: a file, checked like every output, or `-` for
/// stdout (a command's human-readable table then goes to stderr, so that stdout stays JSON).
#[derive(Clone, Debug)]
enum JsonOut {
    File(PathBuf),
    Stdout,
}

impl std::str::FromStr for JsonOut {
    type Err = String;
    fn from_str(s: &str) -> Result<JsonOut, String> {
        match s {
            "" => Err("--json needs a file name, or '-' for stdout".into()),
            "-" => Ok(JsonOut::Stdout),
            _ => Ok(JsonOut::File(s.into())),
        }
    }
}

impl JsonOut {
    /// Checks a file destination against the command's inputs before any work starts.
    fn checked(self, inputs: &Inputs) -> Result<JsonOut> {
        match self {
            JsonOut::File(p) => Ok(JsonOut::File(check_output_file(&p, inputs, "--json")?)),
            JsonOut::Stdout => Ok(JsonOut::Stdout),
        }
    }
    fn write<T: serde::Serialize>(&self, value: &T) -> Result<()> {
        match self {
            JsonOut::File(p) => write_json_output(p, value),
            JsonOut::Stdout => {
                use std::io::Write as _;
                let mut o = std::io::stdout().lock();
                serde_json::to_writer_pretty(&mut o, &qins::files::json_document(value)?)?;
                writeln!(o)?;
                Ok(())
            }
        }
    }
}

/// Whether a command's table goes to stdout: not when stdout carries its JSON.
fn table_to_stdout(json: Option<&JsonOut>) -> bool {
    !matches!(json, Some(JsonOut::Stdout))
}

/// `-o` names a folder. A path ending in `.onnx` is almost surely meant as the model file;
/// taking it as a folder name would leave a folder called `model.onnx` that ONNX Runtime
/// then fails to parse.
fn output_folder(out: &std::path::Path) -> Result<()> {
    let is_onnx = out.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx"));
    // An existing path is left to the output checks (an input, or not an output of ours).
    if is_onnx && std::fs::symlink_metadata(out).is_err() {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("DIR"));
        bail!(
            "-o {} names a model file, but -o takes the output folder: use -o {} (the model is written into it as \
             model.onnx, with its data and config files beside it)",
            out.display(),
            parent.display()
        );
    }
    Ok(())
}

#[derive(Args)]
struct Select {
    /// Precision policy.
    #[arg(long, value_enum, default_value_t = Preset::Phi3)]
    preset: Preset,
    /// Also take MatMul nodes whose name matches (regex; repeatable).
    #[arg(long)]
    include: Vec<Regex>,
    /// Never take MatMul nodes whose name matches (regex; repeatable).
    #[arg(long)]
    exclude: Vec<Regex>,
    /// Q,K,V output widths of packed qkv weights, if the model does not tell.
    #[arg(long, value_parser = parse_qkv_split)]
    qkv_split: Option<[usize; 3]>,
    /// Keep gate and up as two QinsMatMuls followed by the graph's own activation, instead of
    /// one fused QinsMatMul (swiglu=1) that also applies silu(gate) * up.
    #[arg(long)]
    no_fuse_mlp: bool,
    /// Write a split qkv as a float MatMul, a QinsMatMul and a Concat, instead of one
    /// QinsMatMul that takes the float Q/K columns as its float_weight input.
    #[arg(long)]
    no_fuse_qkv: bool,
}

impl Select {
    fn options(&self) -> PlanOptions {
        PlanOptions {
            preset: self.preset,
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            qkv_split: self.qkv_split,
            fuse_mlp: !self.no_fuse_mlp,
            fuse_qkv: !self.no_fuse_qkv,
            allow_empty: false,
        }
    }
}

/// Threads beyond a few per core only cost memory (each has its stack and ORT's buffers);
/// an absurd count once grew memory without end.
fn parse_threads(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|_| format!("'{s}' is not a thread count"))?;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    if n > 4 * cores {
        return Err(format!("{n} threads on a machine with {cores} cores: at most {} (4 per core)", 4 * cores));
    }
    Ok(n)
}

fn parse_format(s: &str) -> Result<Format, String> {
    Format::parse(s).ok_or_else(|| format!("unknown format '{s}': use 8, 6, 4 or f32"))
}

struct Bar(Option<ProgressBar>);

impl Progress for Bar {
    fn start(&mut self, total: u64) {
        if self.0.is_some() {
            return;
        }
        let pb = ProgressBar::new(total);
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {wide_msg}",
            )
            .expect("valid template"),
        );
        self.0 = Some(pb);
    }
    fn advance(&mut self, bytes: u64, what: &str) {
        if let Some(pb) = &self.0 {
            pb.inc(bytes);
            pb.set_message(short(what, 48));
        }
    }
    fn finish(&mut self) {
        if let Some(pb) = self.0.take() {
            pb.finish_and_clear();
        }
    }
}

struct Quiet;
impl Progress for Quiet {
    fn start(&mut self, _: u64) {}
    fn advance(&mut self, _: u64, _: &str) {}
    fn finish(&mut self) {}
}

/// `println!` that returns an error instead of panicking when stdout is gone (a closed
/// pipe: `qins inspect MODEL | head -1`); `main` ends quietly on that error.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($t)*)?
    }};
}
/// `print!` of a finished table, as [`out!`].
macro_rules! out_raw {
    ($s:expr) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout().lock();
        o.write_all($s.as_bytes())?;
        o.flush()?
    }};
}
/// `eprintln!` for progress and notes: a closed stderr is no reason to stop the work.
macro_rules! note {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($t)*);
    }};
}
/// `eprint!`, as [`note!`].
macro_rules! note_raw {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr().lock(), $($t)*);
    }};
}
/// A command's finished table: to stdout, or to stderr when stdout carries its JSON
/// (`--json -`).
macro_rules! table {
    ($json:expr, $s:expr) => {{
        if table_to_stdout($json) {
            out_raw!($s);
        } else {
            note_raw!("{}", $s);
        }
    }};
}

fn main() {
    // Before any thread starts: interrupts clean up partial outputs, and a truncated input
    // becomes an error instead of a crash (qins::mapped).
    qins::onnx::install_interrupt_cleanup();
    qins::mapped::install_sigbus_guard();
    // A panic is a bug; say so plainly, once, without a backtrace dump aimed at developers.
    std::panic::set_hook(Box::new(|info| {
        note!("error: internal error (a bug in qins; please report it with the command that caused it): {info}");
    }));
    let r = std::panic::catch_unwind(|| run(Cli::parse()).and_then(|()| qins::mapped::check_intact()));
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) if is_broken_pipe(&e) => {}
        Ok(Err(e)) => {
            note!("error: {e:#}");
            std::process::exit(1);
        }
        Err(_) => std::process::exit(101),
    }
}

/// True when the error is stdout's reader having gone away.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Inspect { model, select, json } => {
            let m = Model::load(&model)?;
            let json = json.map(|j| j.checked(&Inputs::new().with(&m.dir)?)).transpose()?;
            let p = plan::plan(&m, &select.options());
            match &p {
                Ok(p) => {
                    if let Some(j) = &json {
                        j.write(&p.candidates)?;
                    }
                    if table_to_stdout(json.as_ref()) {
                        print_inspect(&m, p)?;
                    }
                }
                Err(e) => {
                    note!("{e:#}");
                    std::process::exit(2);
                }
            }
        }
        Cmd::Rewrite {
            model,
            out,
            bits,
            group,
            kv_v,
            select,
            dry_run,
            force,
            fsync,
            json,
            provider_lib,
            no_library,
            calib,
            quiet,
        } => {
            output_folder(&out)?;
            let m = Model::load(&model)?;
            // With --kv-v the V cache alone is a rewrite; without it a plan must take a weight.
            let p = plan::plan(&m, &PlanOptions { allow_empty: kv_v.0.is_some(), ..select.options() })?;
            let library = if no_library { None } else { Some(find_library(provider_lib)?) };
            let opts = RewriteOptions { format: bits, group, force, fsync, kv_v: kv_v.0, library };
            if dry_run {
                return print_dry_run(&m, &p, &opts);
            }
            // Every path is checked before the work: a long rewrite must not fail at its end
            // over a report path that could never have been written.
            let mut inputs = Inputs::new().with(&m.dir)?;
            if let Some(text) = &calib.calibrate {
                inputs.add(text)?;
            }
            inputs.check_output(&out, "output")?;
            let json = json.map(|j| j.checked(&inputs)).transpose()?;
            let calibration = match &calib.calibrate {
                Some(text) => {
                    if !bits.is_integer() {
                        bail!("--calibrate applies to the integer formats (--bits 8, 6 or 4), not {bits}");
                    }
                    Some(run_calibration(&m, &p, &calib, text, &out, quiet)?)
                }
                None => None,
            };
            let mut progress: Box<dyn Progress> = if quiet { Box::new(Quiet) } else { Box::new(Bar(None)) };
            let r = rewrite::rewrite_calibrated(&m, &p, &opts, calibration.as_ref(), &out, progress.as_mut())?;
            if let Some(j) = &json {
                j.write(&r)?;
            }
            if !quiet {
                table!(json.as_ref(), r.table());
            }
            match &opts.library {
                Some(lib) => note!(
                    "wrote {} (with {}, named in its genai_config.json where it has one)",
                    out.display(),
                    lib.file_name().map(|f| f.to_string_lossy()).unwrap_or_default()
                ),
                None => note!("wrote {}", out.display()),
            }
        }
        Cmd::ImportGguf { gguf, out, force, json } => {
            output_folder(&out)?;
            let json = json.map(|j| j.checked(&Inputs::new().with(&gguf)?)).transpose()?;
            let r = qins_models::import_gguf(&gguf, &out, force, &mut |msg| note!("{msg}"))?;
            if let Some(j) = &json {
                j.write(&r)?;
            }
            table!(json.as_ref(), format!("{r}\n"));
        }
        Cmd::Parity { reference, models, text, suite, tests, plots, window, windows, runtime, threads, json } => {
            use qins_graph_rewrite::engine::{load_tokenizer, CausalLm, EngineOptions};
            use qins_graph_rewrite::parity;
            let mut inputs = Inputs::new();
            for m in std::iter::once(&reference).chain(&models) {
                let (folder, _) = qins::onnx::resolve_model_path(m)?;
                inputs.add(folder.root())?;
            }
            inputs.add(&text)?;
            let json = json.map(|j| j.checked(&inputs)).transpose()?;
            let plots = plots.map(|d| inputs.check_output(&d, "--plots")).transpose()?;
            let Runtime { device, ort_lib, provider_lib } = runtime;
            let opts = EngineOptions { ort_lib, provider_lib, threads, device, ..Default::default() };
            if suite != SuiteKind::Quick {
                return run_suite(&reference, &models, &text, suite, &tests, plots.as_deref(), json.as_ref(), &opts);
            }
            let (window, windows) = (window as usize, windows as usize);
            let tok = load_tokenizer(&reference)?;
            let text = parity::read_text(&text)?;
            let need = window.saturating_mul(windows).saturating_mul(6);
            let cut = text.char_indices().nth(need).map_or(text.len(), |(i, _)| i);
            let enc = tok.encode(&text[..cut], false).map_err(|e| anyhow::anyhow!("tokenize: {e}"))?;
            let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
            if parity::windows(&ids, window, windows).is_empty() {
                bail!("the text gives {} tokens: not one window of at least 2 tokens to score", ids.len());
            }
            let mut r = CausalLm::open(&reference, &opts)?;
            let mut tests = models
                .iter()
                .map(|m| Ok((m.display().to_string(), CausalLm::open(m, &opts)?)))
                .collect::<Result<Vec<_>>>()?;
            let live = std::io::stderr().is_terminal();
            let res = parity::teacher_forced(&mut r, &mut tests, &ids, window, windows, &mut |i, n| {
                if live {
                    note_raw!("\rwindow {}/{n}", i + 1)
                }
            })?;
            if live {
                note!();
            }
            if let Some(m) = res.iter().find(|m| m.scored == 0) {
                bail!("{}: no position was scored; nothing was measured", m.model);
            }
            if let Some(j) = &json {
                j.write(&res)?;
            }
            table!(json.as_ref(), parity::table(&res));
        }
        Cmd::Generate {
            model,
            prompt,
            chat,
            system,
            max_tokens,
            temperature,
            top_p,
            seed,
            cuda_graph,
            runtime,
            json,
        } => {
            use qins_graph_rewrite::chat::{stop_tokens, ChatTemplate};
            use qins_graph_rewrite::engine::{context_length, load_tokenizer, CausalLm, EngineOptions, Sampling};
            let (folder, _) = qins::onnx::resolve_model_path(&model)?;
            let json = json.map(|j| j.checked(&Inputs::new().with(folder.root())?)).transpose()?;
            let tok = load_tokenizer(&model)?;
            let text = if chat { ChatTemplate::load(&model)?.render(&prompt, system.as_deref())? } else { prompt };
            let ids: Vec<i64> = tok
                .encode(text.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenize: {e}"))?
                .get_ids()
                .iter()
                .map(|&i| i as i64)
                .collect();
            if ids.is_empty() {
                bail!("the prompt encodes to no tokens");
            }
            // Checked before the model runs: past its context a model fails (or, worse, runs
            // on without the positions it was trained for) after all the work is done.
            if let Some(ctx) = context_length(&model)? {
                if ids.len().saturating_add(max_tokens) > ctx {
                    bail!(
                        "{} prompt tokens + --max-tokens {max_tokens} = {} is past the model's context of {ctx} tokens \
                         (genai_config.json); shorten the prompt or ask for at most {} new tokens",
                        ids.len(),
                        ids.len().saturating_add(max_tokens),
                        ctx.saturating_sub(ids.len())
                    );
                }
            }
            let graph_len = if cuda_graph {
                let n = ids.len().checked_add(max_tokens).and_then(|n| n.checked_next_multiple_of(256));
                n.ok_or_else(|| anyhow::anyhow!("--max-tokens {max_tokens} is more than a CUDA graph can hold"))?
            } else {
                0
            };
            let Runtime { device, ort_lib, provider_lib } = runtime;
            let opts = EngineOptions { ort_lib, provider_lib, device, cuda_graph_len: graph_len, ..Default::default() };
            let mut lm = CausalLm::open(&model, &opts)?;
            let sampling =
                if temperature > 0.0 { Sampling::Sample { temperature, top_p, seed } } else { Sampling::Greedy };
            let stop = stop_tokens(&model, &tok)?;
            let to_stdout = table_to_stdout(json.as_ref());
            let t0 = std::time::Instant::now();
            let mut first = None;
            let mut stream = TextStream::default();
            let g = lm.generate_streaming(&ids, max_tokens, &sampling, &stop, false, &mut |t| {
                first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                // The end token is not text; everything before it is shown as it comes.
                if !stop.contains(&t) {
                    let piece = stream.push(&tok, t)?;
                    if to_stdout {
                        out_raw!(piece);
                    } else {
                        note_raw!("{piece}");
                    }
                }
                Ok(())
            })?;
            let secs = t0.elapsed().as_secs_f64();
            if to_stdout {
                out!();
            } else {
                note!();
            }
            let prefill_s = first.unwrap_or(secs);
            let n = g.tokens.len();
            // The first token comes from the prompt's pass; each later one from one step.
            let decode_tps = if n > 1 && g.decode_s > 0.0 { (n - 1) as f64 / g.decode_s } else { 0.0 };
            note!(
                "{} prompt tokens in {prefill_s:.2} s ({:.0} tokens/s), {n} new tokens, {decode_tps:.1} tokens/s after the \
                 first ({secs:.2} s in all)",
                ids.len(),
                ids.len() as f64 / prefill_s.max(1e-9)
            );
            if let Some(j) = &json {
                let new: Vec<u32> = g.tokens.iter().map(|&t| t as u32).collect();
                j.write(&serde_json::json!({
                    "model": model,
                    "prompt_tokens": ids,
                    "tokens": g.tokens,
                    "text": tok.decode(&new, true).map_err(|e| anyhow::anyhow!("decode: {e}"))?,
                    "prefill_s": prefill_s,
                    "decode_s": g.decode_s,
                    "decode_tokens_per_s": decode_tps,
                }))?;
            }
        }
        Cmd::Report { model, group, select, json, per_tensor } => {
            let m = Model::load(&model)?;
            let json = json.map(|j| j.checked(&Inputs::new().with(&m.dir)?)).transpose()?;
            let p = plan::plan(&m, &select.options())?;
            let total = p.targets.len();
            let mut i = 0;
            // A line rewritten in place is for a person watching; in a log it is noise.
            let live = std::io::stderr().is_terminal();
            let r = roundtrip::roundtrip(&m, &p, group, &mut |t| {
                i += 1;
                if live {
                    note_raw!("\r[{i}/{total}] {:<60}", short(&t.label(), 60));
                }
            })?;
            if live {
                note!();
            }
            qins::mapped::check_intact()?;
            if let Some(j) = &json {
                j.write(&r)?;
            }
            if table_to_stdout(json.as_ref()) {
                out_raw!(r.table(per_tensor));
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SuiteKind {
    Quick,
    Full,
    Ci,
}

#[allow(clippy::too_many_arguments)]
fn run_suite(
    reference: &std::path::Path,
    models: &[PathBuf],
    text: &std::path::Path,
    kind: SuiteKind,
    tests: &str,
    plots: Option<&std::path::Path>,
    json: Option<&JsonOut>,
    opts: &qins_graph_rewrite::engine::EngineOptions,
) -> Result<()> {
    use qins_graph_rewrite::engine::CausalLm;
    use qins_graph_rewrite::{parity, plot, suite};
    let cfg = if kind == SuiteKind::Full { suite::SuiteConfig::full() } else { suite::SuiteConfig::ci() };
    let sel = suite::Selection::parse(tests)?;
    let text = parity::read_text(text)?;
    let mut r = CausalLm::open(reference, opts)?;
    let mut cands =
        models.iter().map(|m| Ok((m.display().to_string(), CausalLm::open(m, opts)?))).collect::<Result<Vec<_>>>()?;
    let t0 = std::time::Instant::now();
    // One test at a time, the JSON rewritten after each: a full run takes hours on a small
    // machine, and what finished must survive a crash or a kill of a later test.
    let save = |res: &[suite::CandidateResult], complete: bool| -> Result<()> {
        // Stdout gets the document once, complete; a file is rewritten after each test.
        match json {
            Some(j) if complete || matches!(j, JsonOut::File(_)) => j.write(
                &serde_json::json!({"config": cfg, "reference": reference, "results": res, "complete": complete}),
            ),
            _ => Ok(()),
        }
    };
    let mut res: Vec<suite::CandidateResult> = Vec::new();
    for letter in ["A", "B", "C", "D", "E"].into_iter().filter(|l| sel.has(l)) {
        let one = suite::Selection::parse(letter)?;
        let part = suite::run(reference, &mut r, &mut cands, &text, &cfg, &one, &mut |msg| {
            note!("[{:>6.0}s] {msg}", t0.elapsed().as_secs_f64())
        })?;
        res = if res.is_empty() { part } else { res.into_iter().zip(part).map(|(a, b)| a.merge(b)).collect() };
        save(&res, false)?;
    }
    qins::mapped::check_intact()?;
    if let Some(c) = res.iter().find(|c| c.measured_nothing()) {
        bail!("{}: none of the selected tests measured anything (A needs the candidate's qins_report.json)", c.model);
    }
    table!(json, suite::summary(&res));
    if let Some(dir) = plots {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        for (i, c) in res.iter().enumerate() {
            let name = std::path::Path::new(&c.model)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or(i.to_string());
            if let Some(b) = &c.b {
                let series: Vec<(String, Vec<f64>)> = b
                    .windows
                    .iter()
                    .enumerate()
                    .map(|(p, w)| (format!("prompt {}", p + 1), w.iter().map(|x| 100.0 * x).collect()))
                    .collect();
                let path = dir.join(format!("greedy-{name}.png"));
                // Only an image of the same name (an earlier plot) is replaced.
                if std::fs::symlink_metadata(&path).is_ok() && !is_png(&path) {
                    bail!("{} exists and is not a PNG image; not replacing it", path.display());
                }
                let title = format!("B greedy match, {name} vs original");
                plot::lines(
                    &path,
                    &title,
                    "generated token",
                    "match % (per window)",
                    &series,
                    0.0,
                    cfg.greedy_window as f64,
                )?;
                note!("plot: {}", path.display());
            }
        }
    }
    save(&res, true)
}

fn is_png(path: &std::path::Path) -> bool {
    let mut head = [0u8; 8];
    qins::files::open_regular(path).is_ok_and(|mut f| std::io::Read::read_exact(&mut f, &mut head).is_ok())
        && head == *b"\x89PNG\r\n\x1a\n"
}

fn print_inspect(m: &Model, p: &plan::Plan) -> Result<()> {
    out!("{}: {} nodes, {} MatMul", m.path.display(), m.graph().node.len(), p.candidates.len());
    out!("{:<48} {:<8} {:>13} {:<8} rewrite", "node", "role", "weight KxN", "dtype");
    for c in &p.candidates {
        let shape = c.shape.map(|[k, n]| format!("{k}x{n}")).unwrap_or_else(|| "-".into());
        let verdict = match (&c.skipped, &c.cols) {
            (Some(why), _) => format!("no: {why}"),
            (None, Some(cols)) if c.shape.is_some_and(|s| cols.len() != s[1]) => {
                format!("yes: columns {}..{} (V part), the rest stays float", cols.start, cols.end)
            }
            (None, _) => "yes".into(),
        };
        // A fused pair is one op: say so on both of its MatMuls.
        let fused = p.targets.iter().find_map(|t| {
            let s = t.swiglu.as_ref()?;
            (t.name == c.name || s.up_name == c.name).then_some("gate, up and their SiLU fused into one op (swiglu=1)")
        });
        let verdict = match fused {
            Some(f) => format!("{verdict}: {f}"),
            None => verdict,
        };
        out!("{:<48} {:<8} {:>13} {:<8} {}", short(&c.name, 48), c.role.name(), shape, c.dtype.unwrap_or("-"), verdict);
    }
    let fused = p.targets.iter().filter(|t| t.swiglu.is_some()).count();
    out!(
        "{} of {} MatMuls would become QINS, as {} QinsMatMul nodes ({fused} gate/up pairs fused with their SiLU)",
        p.targets.len() + fused,
        p.candidates.len(),
        p.targets.len()
    );
    Ok(())
}

fn print_dry_run(m: &Model, p: &plan::Plan, opts: &RewriteOptions) -> Result<()> {
    let mut before = 0u64;
    let mut after = 0u64;
    out!("{:<48} {:>13} {:>10} {:>10}", "node", "KxN", "bytes in", "bytes out");
    for t in &p.targets {
        let l = qins::codec::Layout::new(opts.format, t.k, t.n(), opts.group);
        let (b, a) = ((t.k * t.n() * t.elem.bytes()) as u64, l.stored_bytes() as u64);
        before += b;
        after += a;
        out!("{:<48} {:>13} {:>10} {:>10}", short(&t.label(), 48), format!("{}x{}", t.k, t.n()), b, a);
    }
    let total: u64 = m.data_files().iter().map(|(_, l)| l).sum();
    out!(
        "dry run: {} tensors, {:.1} MB -> {:.1} MB as {} (group {}); external data {:.1} MB -> about {:.1} MB",
        p.targets.len(),
        before as f64 / 1e6,
        after as f64 / 1e6,
        opts.format,
        opts.group,
        total as f64 / 1e6,
        (total + after - before) as f64 / 1e6
    );
    if let Some(v) = opts.kv_v {
        // The same pass the rewrite makes, on a copy of the graph: its checks and its sizes.
        let mut proto = m.proto.clone();
        let k = qins_graph_rewrite::kv_v::apply(&mut proto, m, v)?;
        out!(
            "dry run: V cache {}: {} GroupQueryAttention -> QinsGroupQueryAttention, K+V cache {} -> {} bytes per token",
            k.format,
            k.nodes,
            k.kv_bytes_per_token_before,
            k.kv_bytes_per_token_after
        );
    }
    Ok(())
}

/// Text of a token stream, shown piece by piece. A token may be part of a character
/// (byte-level vocabularies) or change how its neighbour decodes (spaces, merges), so each
/// piece is the growth of the text of a short window: the tokens from the one before the last
/// piece shown (`prefix`) to the end, against the same window up to where the last piece
/// ended (`read`). Each token is decoded a bounded number of times.
#[derive(Default)]
struct TextStream {
    tokens: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl TextStream {
    fn push(&mut self, tok: &tokenizers::Tokenizer, t: i64) -> Result<String> {
        self.tokens.push(t as u32);
        let decode = |ids: &[u32]| tok.decode(ids, true).map_err(|e| anyhow::anyhow!("decode: {e}"));
        let before = decode(&self.tokens[self.prefix..self.read])?;
        let now = decode(&self.tokens[self.prefix..])?;
        // An incomplete UTF-8 sequence decodes as U+FFFD until its last byte comes.
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') || !now.starts_with(&before) {
            return Ok(String::new());
        }
        self.prefix = self.read;
        self.read = self.tokens.len();
        Ok(now[before.len()..].to_string())
    }
}

/// The custom-op library `qins rewrite` places in its output for onnxruntime-genai.
fn find_library(given: Option<PathBuf>) -> Result<PathBuf> {
    let lib = given.or_else(qins_graph_rewrite::engine::default_provider_lib).ok_or_else(|| {
        anyhow::anyhow!(
            "the QINS custom-op library (libqins_provider.so) is neither beside qins nor in $QINS_PROVIDER_LIB: \
             pass --provider-lib FILE, or --no-library to write the model without it"
        )
    })?;
    if !lib.is_file() {
        bail!("custom-op library {} is not a file (--provider-lib, or --no-library to leave it out)", lib.display());
    }
    Ok(lib)
}

/// Runs `--calibrate`, with a progress bar on a terminal.
fn run_calibration(
    m: &Model,
    p: &plan::Plan,
    a: &CalibArgs,
    text: &std::path::Path,
    out: &std::path::Path,
    quiet: bool,
) -> Result<qins_graph_rewrite::calibrate::Calibration> {
    use qins_graph_rewrite::calibrate::{calibrate, spill_bytes, text_ids, CalibOptions};
    use qins_graph_rewrite::engine::EngineOptions;
    let engine = EngineOptions { ort_lib: a.ort_lib.clone(), threads: a.calib_threads, ..Default::default() };
    // The captured inputs go to an unnamed temporary file beside the output (freed when done,
    // or when the process dies).
    let spill_dir =
        out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new(".")).to_path_buf();
    let opts = CalibOptions {
        window: a.calib_window,
        spill_dir,
        gptq: GptqOptions { damp: a.damp, scale_rule: a.scale_rule, act_order: a.act_order },
        engine,
    };
    if !(a.damp.is_finite() && a.damp >= 0.0) {
        bail!("--damp {}: expected a finite value >= 0", a.damp);
    }
    if a.calib_tokens < 2 {
        bail!("--calib-tokens {}: at least 2", a.calib_tokens);
    }
    let ids = text_ids(m, text, a.calib_tokens)?;
    if !quiet {
        note!(
            "calibrating on {} tokens of {} ({} MB of captured inputs, in an unnamed temporary file in {})",
            ids.len(),
            text.display(),
            spill_bytes(m, p, ids.len())?.div_ceil(1_000_000),
            opts.spill_dir.display()
        );
    }
    let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} window {pos}/{len}")
                .expect("valid template"),
        );
        pb
    });
    let mut c = calibrate(m, p, &ids, &opts, &mut |done, total| {
        if let Some(pb) = &bar {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        }
    })?;
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    c.text = text.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    if !quiet {
        note!("calibrated on {} tokens ({} windows) in {:.1} s", c.tokens, c.windows, c.seconds);
    }
    Ok(c)
}
