//! `qins rewrite --calibrate`: the targeted MatMuls' inputs on calibration text, through ONNX
//! Runtime on the original model; [`crate::gptq`] then encodes each weight against the
//! Hessian `XᵀX` of its input (the V of qkv, and gate with up, share theirs).
//!
//! The inputs are kept, not their Hessians: one `[tokens, K]` bf16 region per distinct input
//! in a temporary file beside the output, read back through a map when its first weight is
//! encoded. Hessians of every input at once would take `sum K²` f32 (12 GB for Phi-3.5-mini);
//! this takes `tokens x sum K x 2` bytes of disk (2.3 GB at 2048 tokens for Phi-3.5-mini,
//! 1.6 GB at 8192 for SmolLM2), and memory for one Hessian at a time. bf16 keeps any
//! activation's range; its 8-bit mantissa adds noise of about 0.2% to each product, well
//! below the damping.

use crate::engine::{load_tokenizer, CausalLm, EngineOptions};
use crate::gptq::{GptqOptions, Hessian};
use crate::plan::{Plan, Target};
use crate::report::CalibSummary;
use anyhow::{anyhow, bail, Context, Result};
use qins::codec::Elem;
use qins::onnx::Model;
use std::collections::HashMap;
use std::path::Path;

/// How `--calibrate` runs.
#[derive(Clone, Debug, Default)]
pub struct CalibOptions {
    /// Tokens per forward pass (each pass starts with an empty cache).
    pub window: usize,
    /// Where the temporary file of captured inputs goes (beside the output).
    pub spill_dir: std::path::PathBuf,
    pub gptq: GptqOptions,
    /// ONNX Runtime and its threads.
    pub engine: EngineOptions,
}

/// Where one input's rows lie in the spill file.
#[derive(Clone, Copy, Debug)]
struct Region {
    /// Bytes from the file's start.
    offset: usize,
    k: usize,
}

/// The largest input width calibration takes: its `XᵀX` and inverse factor are `K x K` f32
/// (4.3 GB each at this K; Phi-3.5-mini's largest K is 8192, Llama-3-70B's 28672).
pub const MAX_K: usize = 32768;

/// The captured inputs of a plan's targets.
pub struct Calibration {
    /// By MatMul input tensor.
    regions: HashMap<String, Region>,
    /// `[tokens, K]` bf16 per region; the (unnamed) file is freed when this is dropped.
    spill: memmap2::Mmap,
    _file: std::fs::File,
    /// Target index to its input tensor.
    pub input_of: Vec<String>,
    pub tokens: usize,
    pub windows: usize,
    pub seconds: f64,
    pub opts: GptqOptions,
    /// The calibration text's file name, for the report (set by the caller, who read it).
    pub text: String,
}

impl Calibration {
    /// The Hessian target `i` is encoded against, summed from its captured inputs.
    pub fn hessian(&self, i: usize) -> Result<Hessian> {
        let name = self.input_of.get(i).ok_or_else(|| anyhow!("no target {i}"))?;
        let r = *self.regions.get(name).ok_or_else(|| anyhow!("no calibration inputs for {name}"))?;
        let mut h = Hessian::new(r.k);
        // 256 rows at a time: one f32 buffer of 256 x K.
        let mut buf = Vec::new();
        for t0 in (0..self.tokens).step_by(256) {
            let rows = 256.min(self.tokens - t0);
            let bytes = &self.spill[r.offset + t0 * r.k * 2..r.offset + (t0 + rows) * r.k * 2];
            buf.clear();
            buf.extend(bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()));
            h.add(&buf);
        }
        Ok(h)
    }

    /// The distinct MatMul inputs captured.
    pub fn inputs(&self) -> usize {
        self.regions.len()
    }

    /// What the report says about it.
    pub fn summary(&self) -> CalibSummary {
        CalibSummary {
            text: self.text.clone(),
            tokens: self.tokens,
            windows: self.windows,
            seconds: self.seconds,
            // As typed (0.01), not as the f32's exact value in f64 (0.009999999776...).
            damp: self.opts.damp.to_string().parse().unwrap_or(f64::from(self.opts.damp)),
            scale_rule: self.opts.scale_rule,
            act_order: self.opts.act_order,
            method: "gptq",
        }
    }

    /// How many targets read each input: a factor can be dropped after its last use.
    pub fn uses(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for n in &self.input_of {
            *m.entry(n.clone()).or_insert(0) += 1;
        }
        m
    }
}

/// The activation tensor a target multiplies (the MatMul's first input).
pub fn input_of(model: &Model, t: &Target) -> Result<String> {
    let node = model.graph().node.get(t.node).ok_or_else(|| anyhow!("{}: node index out of range", t.name))?;
    node.input.first().filter(|s| !s.is_empty()).cloned().ok_or_else(|| anyhow!("{}: MatMul without an input", t.name))
}

/// Bytes of disk the captured inputs of `plan` take over `tokens` tokens (bf16, one
/// `[tokens, K]` region per distinct input).
pub fn spill_bytes(model: &Model, plan: &Plan, tokens: usize) -> Result<u64> {
    let mut seen = HashMap::new();
    for t in &plan.targets {
        seen.insert(input_of(model, t)?, t.k as u64);
    }
    Ok(seen.values().map(|k| k * 2 * tokens as u64).sum())
}

/// The first `tokens` tokens of the calibration text, by the model's tokenizer.
pub fn text_ids(model: &Model, text: &Path, tokens: usize) -> Result<Vec<i64>> {
    let tok = load_tokenizer(&model.path)?;
    let text_s = crate::parity::read_text(text)?;
    // Enough characters for the tokens asked for (a token is rarely more than 8 of them).
    let cut = text_s.char_indices().nth(tokens.saturating_mul(8)).map_or(text_s.len(), |(i, _)| i);
    let enc = tok.encode(&text_s[..cut], false).map_err(|e| anyhow!("tokenize {}: {e}", text.display()))?;
    Ok(enc.get_ids().iter().take(tokens).map(|&i| i as i64).collect())
}

/// Runs `ids` (the calibration tokens) through the original model, `opts.window` at a time,
/// and sums each target input's `XᵀX`. `progress(windows done, windows)` is called after
/// each window.
pub fn calibrate(
    model: &Model,
    plan: &Plan,
    ids: &[i64],
    opts: &CalibOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Calibration> {
    let t0 = std::time::Instant::now();
    if opts.window < 2 {
        bail!("--calib-window must be at least 2");
    }
    // Each input's Hessian and its inverse factor are K x K f32 in memory, while the weight
    // that names K may be as thin as one column: K is bounded before anything is allocated.
    if let Some(t) = plan.targets.iter().find(|t| t.k > MAX_K) {
        bail!(
            "{}: K = {} is beyond what calibration supports ({MAX_K}: two {} MB matrices)",
            t.name,
            t.k,
            MAX_K * MAX_K * 4 / 1_000_000
        );
    }
    let input_of = plan.targets.iter().map(|t| input_of(model, t)).collect::<Result<Vec<_>>>()?;
    let windows: Vec<&[i64]> = ids.chunks(opts.window).filter(|w| w.len() >= 2).collect();
    if windows.is_empty() {
        bail!("{} calibration tokens: not one window of at least 2", ids.len());
    }
    let tokens: usize = windows.iter().map(|w| w.len()).sum();
    // Distinct inputs in plan order, with their element type and where their rows go.
    let mut names: Vec<(String, i32)> = Vec::new();
    let mut regions: HashMap<String, Region> = HashMap::new();
    let mut size = 0usize;
    for (t, name) in plan.targets.iter().zip(&input_of) {
        if let Some(r) = regions.get(name) {
            if r.k != t.k {
                bail!("{name} feeds MatMuls with K = {} and {}", r.k, t.k);
            }
            continue;
        }
        let elem = match t.elem {
            Elem::F32 => 1,
            Elem::F16 => 10,
            Elem::BF16 => 16,
        };
        names.push((name.clone(), elem));
        regions.insert(name.clone(), Region { offset: size, k: t.k });
        size =
            t.k.checked_mul(2 * tokens)
                .and_then(|b| size.checked_add(b))
                .ok_or_else(|| anyhow!("the calibration inputs would not fit an address space"))?;
    }
    std::fs::create_dir_all(&opts.spill_dir).with_context(|| format!("create {}", opts.spill_dir.display()))?;
    // Unnamed (O_TMPFILE, or unlinked at once): the system frees it when the last handle
    // closes, so a run killed mid-way leaves no gigabytes behind.
    let file = tempfile::tempfile_in(&opts.spill_dir)
        .with_context(|| format!("a temporary file in {}", opts.spill_dir.display()))?;
    file.set_len(size as u64).with_context(|| format!("reserve {size} bytes for the calibration inputs"))?;

    let engine = EngineOptions { capture: names.clone(), ..opts.engine.clone() };
    let mut lm = CausalLm::open(&model.path, &engine).context("open the model to calibrate")?;
    let mut row0 = 0;
    let mut bytes = Vec::new();
    for (i, w) in windows.iter().enumerate() {
        lm.forward(w)?;
        for ((name, _), (x, last)) in names.iter().zip(lm.take_captured()) {
            let r = regions[name];
            if last != r.k || x.len() != w.len() * r.k {
                bail!("{name}: captured {} values of width {last}, expected {} x {}", x.len(), w.len(), r.k);
            }
            if x.iter().any(|v| !v.is_finite()) {
                bail!("{name}: the model computes non-finite values on the calibration text");
            }
            bytes.clear();
            bytes.extend(x.iter().flat_map(|v| v.to_le_bytes()));
            std::os::unix::fs::FileExt::write_all_at(&file, &bytes, (r.offset + row0 * r.k * 2) as u64)
                .context("write the calibration inputs")?;
        }
        row0 += w.len();
        progress(i + 1, windows.len());
    }
    drop(lm);
    // SAFETY: the file is ours (created above, unnamed: no other program finds it by name)
    // and nothing writes it after this point; the map lives in the same struct as the file.
    let spill = unsafe { memmap2::Mmap::map(&file) }.context("map the calibration inputs")?;
    Ok(Calibration {
        regions,
        spill,
        _file: file,
        input_of,
        tokens,
        windows: windows.len(),
        seconds: t0.elapsed().as_secs_f64(),
        opts: opts.gptq,
        text: String::new(),
    })
}
