//! Imports real models from GGUF files into fp32 ONNX models in the onnxruntime-genai
//! builder's layout (`model.onnx` + `model.onnx.data`, `genai_config.json`,
//! `tokenizer.json`, `tokenizer_config.json`), so that the rest of the workspace can treat
//! them exactly like the builder's own output.
//!
//! - [`gguf`]: the GGUF container (memory-mapped, every offset checked) and dequantization.
//! - [`llama`]: Llama hyperparameters and the graph.
//! - [`tokenizer`]: a Hugging Face `tokenizer.json` from the GGUF vocabulary and merges.

pub mod gguf;
pub mod llama;
pub mod tokenizer;

use anyhow::{anyhow, ensure, Context, Result};
use qins::onnx::build::DEFERRED;
use qins::onnx::{save_model, AtomicDir, SaveOptions};
use rayon::prelude::*;
use serde::Serialize;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use gguf::Gguf;
pub use llama::LlamaConfig;
pub use tokenizer::TokenizerInfo;

/// What an import read and wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ImportReport {
    pub source: PathBuf,
    pub out_dir: PathBuf,
    pub config: LlamaConfig,
    pub gguf_tensors: usize,
    /// GGUF tensor counts by ggml type.
    pub gguf_types: BTreeMap<String, usize>,
    pub initializers: usize,
    /// Model parameters (a tied embedding table counted once; rotary caches not counted).
    pub params: u64,
    pub onnx_bytes: u64,
    pub data_bytes: u64,
    /// Every file of the output folder together.
    pub bytes_written: u64,
    pub tokenizer: TokenizerInfo,
    pub seconds: f64,
}

impl std::fmt::Display for ImportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        let types: Vec<String> = self.gguf_types.iter().map(|(k, v)| format!("{v} {k}")).collect();
        writeln!(f, "{} -> {}", self.source.display(), self.out_dir.display())?;
        writeln!(
            f,
            "  {} ({}): {} layers, hidden {}, ffn {}, {} heads / {} KV heads x {}, vocab {}, context {}, rope theta {}, {} embeddings",
            c.architecture,
            c.name.as_deref().unwrap_or("unnamed"),
            c.n_layers,
            c.hidden,
            c.ffn,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.vocab,
            c.context_length,
            c.rope_theta,
            if c.tied_embeddings { "tied" } else { "separate" }
        )?;
        writeln!(f, "  GGUF: {} tensors ({})", self.gguf_tensors, types.join(", "))?;
        writeln!(
            f,
            "  ONNX: {} initializers, {:.1} M parameters, model.onnx {} bytes + model.onnx.data {} bytes; {} bytes written in {:.1} s",
            self.initializers,
            self.params as f64 / 1e6,
            self.onnx_bytes,
            self.data_bytes,
            self.bytes_written,
            self.seconds
        )?;
        let t = &self.tokenizer;
        write!(
            f,
            "  tokenizer: {} tokens, {} merges, {} special, pre-tokenizer '{}', bos {:?} eos {:?} pad {:?}, add_bos {}",
            t.vocab_size, t.merges, t.special_tokens, t.pre, t.bos_token_id, t.eos_token_id, t.pad_token_id, t.add_bos
        )
    }
}

/// genai_config.json, in the builder's field order.
#[derive(Serialize)]
struct GenaiConfig {
    model: GenaiModel,
    search: GenaiSearch,
}

#[derive(Serialize)]
struct GenaiModel {
    #[serde(skip_serializing_if = "Option::is_none")]
    bos_token_id: Option<u32>,
    context_length: usize,
    decoder: GenaiDecoder,
    eos_token_id: u32,
    pad_token_id: u32,
    #[serde(rename = "type")]
    model_type: &'static str,
    vocab_size: usize,
}

#[derive(Serialize)]
struct GenaiDecoder {
    session_options: GenaiSessionOptions,
    filename: &'static str,
    head_size: usize,
    hidden_size: usize,
    inputs: GenaiInputs,
    outputs: GenaiOutputs,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    num_key_value_heads: usize,
}

#[derive(Serialize)]
struct GenaiSessionOptions {
    log_id: &'static str,
    provider_options: [(); 0],
}

#[derive(Serialize)]
struct GenaiInputs {
    input_ids: &'static str,
    attention_mask: &'static str,
    past_key_names: &'static str,
    past_value_names: &'static str,
}

#[derive(Serialize)]
struct GenaiOutputs {
    logits: &'static str,
    present_key_names: &'static str,
    present_value_names: &'static str,
}

#[derive(Serialize)]
struct GenaiSearch {
    diversity_penalty: f64,
    do_sample: bool,
    early_stopping: bool,
    length_penalty: f64,
    max_length: usize,
    min_length: usize,
    no_repeat_ngram_size: usize,
    num_beams: usize,
    num_return_sequences: usize,
    past_present_share_buffer: bool,
    repetition_penalty: f64,
    temperature: f64,
    top_k: usize,
    top_p: f64,
}

fn genai_config(c: &LlamaConfig, t: &TokenizerInfo) -> Result<GenaiConfig> {
    let eos = t.eos_token_id.ok_or_else(|| anyhow!("the GGUF names no EOS token (tokenizer.ggml.eos_token_id)"))?;
    Ok(GenaiConfig {
        model: GenaiModel {
            bos_token_id: t.bos_token_id,
            context_length: c.context_length,
            decoder: GenaiDecoder {
                session_options: GenaiSessionOptions { log_id: "onnxruntime-genai", provider_options: [] },
                filename: "model.onnx",
                head_size: c.head_dim,
                hidden_size: c.hidden,
                inputs: GenaiInputs {
                    input_ids: "input_ids",
                    attention_mask: "attention_mask",
                    past_key_names: "past_key_values.%d.key",
                    past_value_names: "past_key_values.%d.value",
                },
                outputs: GenaiOutputs {
                    logits: "logits",
                    present_key_names: "present.%d.key",
                    present_value_names: "present.%d.value",
                },
                num_attention_heads: c.n_heads,
                num_hidden_layers: c.n_layers,
                num_key_value_heads: c.n_kv_heads,
            },
            eos_token_id: eos,
            pad_token_id: t.pad_token_id.unwrap_or(eos),
            model_type: "llama",
            vocab_size: c.vocab,
        },
        search: GenaiSearch {
            diversity_penalty: 0.0,
            do_sample: false,
            early_stopping: true,
            length_penalty: 1.0,
            max_length: c.context_length,
            min_length: 0,
            no_repeat_ngram_size: 0,
            num_beams: 1,
            num_return_sequences: 1,
            past_present_share_buffer: true,
            repetition_penalty: 1.0,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
        },
    })
}

fn write_json(path: &Path, v: &impl Serialize, indent: &[u8]) -> Result<()> {
    let mut buf = Vec::new();
    let mut ser =
        serde_json::Serializer::with_formatter(&mut buf, serde_json::ser::PrettyFormatter::with_indent(indent));
    v.serialize(&mut ser)?;
    std::fs::write(path, buf).with_context(|| format!("write {}", path.display()))
}

fn f32_le_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * 4];
    out.par_chunks_mut(1 << 18).zip(v.par_chunks(1 << 16)).for_each(|(o, s)| {
        for (o4, x) in o.chunks_exact_mut(4).zip(s) {
            o4.copy_from_slice(&x.to_le_bytes());
        }
    });
    out
}

/// Imports a Llama-architecture GGUF file into `out_dir` (which appears only once
/// complete, with the report as `qins_import.json`). Refuses an output that is, holds or
/// lies inside the GGUF, and an existing non-empty `out_dir` unless `overwrite` and it is
/// an earlier output of ours. Everything is checked (architecture, tensor shapes and
/// types, tokenizer) before anything is written.
pub fn import_gguf(
    gguf: &Path,
    out_dir: &Path,
    overwrite: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<ImportReport> {
    let start = Instant::now();
    let out_dir = &qins::files::Inputs::new().with(gguf)?.check_output(out_dir, "output")?;
    progress(&format!("reading {}", gguf.display()));
    let g = Gguf::open(gguf)?;
    let cfg = LlamaConfig::from_gguf(&g).with_context(|| format!("{} cannot be imported", gguf.display()))?;
    let tok = tokenizer::build(&g).with_context(|| format!("{}: tokenizer", gguf.display()))?;
    ensure!(
        tok.info.vocab_size <= cfg.vocab,
        "the tokenizer has {} tokens but the embedding table only {} rows",
        tok.info.vocab_size,
        cfg.vocab
    );
    if tok.info.duplicate_tokens > 0 {
        progress(&format!("warning: {} tokens repeat an earlier token's text", tok.info.duplicate_tokens));
    }
    let genai = genai_config(&cfg, &tok.info)?;

    let dir = AtomicDir::create(out_dir, overwrite)?;
    let llama::Plan { mut model, sources } = llama::build(&cfg);
    let initializers = model.graph.as_ref().map_or(0, |g| g.initializer.len());
    let n_layers = cfg.n_layers;
    let mut last_layer = None;
    let opts = SaveOptions { externalize_min_bytes: Some(1024), ..Default::default() };
    let stats = save_model(&mut model, &dir.path().join("model.onnx"), &opts, &mut |t| {
        let name = t.name();
        let key = t
            .external_data
            .iter()
            .find(|e| e.key() == "location")
            .and_then(|e| e.value().strip_prefix(DEFERRED))
            .ok_or_else(|| anyhow!("initializer '{name}' has no source"))?;
        let src = sources.get(key).ok_or_else(|| anyhow!("initializer '{name}' has no source"))?;
        let layer =
            name.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).and_then(|l| l.parse::<usize>().ok());
        if layer.is_some() && layer != last_layer && layer < Some(n_layers) {
            progress(&format!("layer {}/{n_layers}", layer.unwrap_or(0) + 1));
            last_layer = layer;
        } else if name == "lm_head.MatMul.weight" || name == "model.embed_tokens.weight" {
            progress(&format!("{name} ({} x {})", t.dims[0], t.dims[1]));
        }
        let values = llama::materialize(&g, &cfg, src).with_context(|| format!("initializer '{name}'"))?;
        Ok(Cow::Owned(f32_le_bytes(&values)))
    })?;

    progress("writing tokenizer and configuration");
    write_json(&dir.path().join("genai_config.json"), &genai, b"    ")?;
    write_json(&dir.path().join("tokenizer.json"), &tok.tokenizer_json, b"  ")?;
    write_json(&dir.path().join("tokenizer_config.json"), &tok.tokenizer_config, b"  ")?;
    let mut bytes_written = 0;
    for e in std::fs::read_dir(dir.path())? {
        bytes_written += e?.metadata()?.len();
    }
    let report = ImportReport {
        source: gguf.to_path_buf(),
        out_dir: out_dir.to_path_buf(),
        gguf_tensors: g.tensors.len(),
        gguf_types: llama::type_counts(&g),
        initializers,
        params: cfg.params(),
        onnx_bytes: stats.onnx_bytes,
        data_bytes: stats.data_bytes,
        bytes_written,
        tokenizer: tok.info,
        config: cfg,
        seconds: start.elapsed().as_secs_f64(),
    };
    // Also the mark that lets a later `--force` know this folder is ours to replace.
    qins::files::write_json_output(&dir.path().join("qins_import.json"), &report)?;
    dir.commit()?;
    Ok(report)
}
