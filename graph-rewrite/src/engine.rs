//! Running exported causal LMs (the onnxruntime-genai builder's graph I/O) through ONNX
//! Runtime with the `ort` crate, with the QINS custom-op library registered.
//!
//! ONNX Runtime is loaded at run time (`load-dynamic`): from `--ort-lib`, else the
//! `ORT_DYLIB_PATH` environment variable (scripts/setup.sh fetches
//! `libonnxruntime.so.1.31.1` from the `onnxruntime` wheel).

use anyhow::{anyhow, bail, Context, Result};
use half::f16;
use ort::environment::Environment;
use ort::session::{Session, SessionInputValue};
use ort::value::{Tensor, TensorElementType, ValueType};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();

/// Loads ONNX Runtime once per process.
pub fn init_ort(lib: Option<&Path>) -> Result<&'static Environment> {
    let env = ENV.get_or_init(|| {
        let path = match lib.map(Path::to_path_buf).or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from)) {
            Some(p) => p,
            None => {
                return Err("ONNX Runtime not found: set ORT_DYLIB_PATH to libonnxruntime.so (scripts/setup.sh \
                            fetches version 1.31.1) or pass --ort-lib"
                    .into())
            }
        };
        if !path.exists() {
            return Err(format!("ONNX Runtime library {} does not exist", path.display()));
        }
        ort::init_from(&path)
            .map_err(|e| format!("load {}: {e}", path.display()))?
            .with_name("qins")
            .build()
            .map_err(|e| format!("create the ONNX Runtime environment: {e}"))
    });
    env.as_ref().map_err(|e| anyhow!("{e}"))
}

/// Where the QINS custom-op library is: `QINS_PROVIDER_LIB`, else beside the running
/// executable (or one folder up, for test binaries in `target/*/deps`).
pub fn default_provider_lib() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QINS_PROVIDER_LIB") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let name = format!("{}qins_provider{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    exe.ancestors().skip(1).take(2).map(|d| d.join(&name)).find(|p| p.exists())
}

#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    pub ort_lib: Option<PathBuf>,
    /// The custom-op library; `None` looks in the default places and, if it is not
    /// there, runs without it (enough for models without QINS ops).
    pub provider_lib: Option<PathBuf>,
    /// Intra-op threads (0: ONNX Runtime's default).
    pub threads: usize,
}

/// A causal LM with the genai builder's inputs (`input_ids`, `attention_mask`,
/// `past_key_values.{i}.key/value`) and outputs (`logits`, `present.{i}.key/value`).
pub struct CausalLm {
    session: Session,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    cache_f16: bool,
    has_mask: bool,
    has_positions: bool,
    pub path: PathBuf,
}

impl CausalLm {
    pub fn open(model: &Path, opts: &EngineOptions) -> Result<CausalLm> {
        let env = init_ort(opts.ort_lib.as_deref())?;
        let onnx = if model.is_dir() { model.join("model.onnx") } else { model.to_path_buf() };
        let dir = onnx.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut b = Session::builder(env).map_err(|e| anyhow!("session options: {e}"))?;
        let lib = opts.provider_lib.clone().or_else(default_provider_lib);
        if let Some(lib) = &lib {
            b = b.with_operator_library(lib).map_err(|e| anyhow!("register {}: {e}", lib.display()))?;
        }
        if opts.threads > 0 {
            b = b.with_intra_threads(opts.threads).map_err(|e| anyhow!("intra-op threads: {e}"))?;
        }
        let session = b.commit_from_file(&onnx).map_err(|e| {
            let hint = if lib.is_none() { " (no QINS custom-op library was found; set QINS_PROVIDER_LIB)" } else { "" };
            anyhow!("load {}: {e}{hint}", onnx.display())
        })?;
        let names: Vec<String> = session.inputs().iter().map(|i| i.name().to_string()).collect();
        let layers = names.iter().filter(|n| n.starts_with("past_key_values.") && n.ends_with(".key")).count();
        if !names.iter().any(|n| n == "input_ids") {
            bail!("{}: no input_ids input; not a causal LM in the genai layout", onnx.display());
        }
        let past0 = session.inputs().iter().find(|i| i.name() == "past_key_values.0.key");
        let (mut kv_heads, mut head_dim, mut cache_f16) = (0, 0, false);
        if let Some(ValueType::Tensor { ty, shape, .. }) = past0.map(|p| p.dtype()) {
            cache_f16 = *ty == TensorElementType::Float16;
            kv_heads = shape.get(1).copied().unwrap_or(-1).max(0) as usize;
            head_dim = shape.get(3).copied().unwrap_or(-1).max(0) as usize;
        }
        // The builder leaves the head size symbolic; genai_config.json has it.
        if let Ok(text) = std::fs::read_to_string(dir.join("genai_config.json")) {
            let v: serde_json::Value = serde_json::from_str(&text).context("genai_config.json")?;
            let d = &v["model"]["decoder"];
            if head_dim == 0 {
                head_dim = d["head_size"].as_u64().unwrap_or(0) as usize;
            }
            if kv_heads == 0 {
                kv_heads = d["num_key_value_heads"].as_u64().unwrap_or(0) as usize;
            }
        }
        if layers > 0 && (kv_heads == 0 || head_dim == 0) {
            bail!("{}: cannot tell the KV cache shape (no genai_config.json with head_size)", onnx.display());
        }
        Ok(CausalLm {
            session,
            layers,
            kv_heads,
            head_dim,
            cache_f16,
            has_mask: names.iter().any(|n| n == "attention_mask"),
            has_positions: names.iter().any(|n| n == "position_ids"),
            path: onnx,
        })
    }

    /// Logits at every position of `ids` (batch 1, empty cache), as `[len, vocab]` f32.
    pub fn forward(&mut self, ids: &[i64]) -> Result<(Vec<f32>, usize)> {
        let n = ids.len();
        let mut inputs: Vec<(Cow<str>, SessionInputValue)> = Vec::new();
        inputs.push(("input_ids".into(), Tensor::from_array(([1usize, n], ids.to_vec()))?.into()));
        if self.has_mask {
            inputs.push(("attention_mask".into(), Tensor::from_array(([1usize, n], vec![1i64; n]))?.into()));
        }
        if self.has_positions {
            inputs.push((
                "position_ids".into(),
                Tensor::from_array(([1usize, n], (0..n as i64).collect::<Vec<_>>()))?.into(),
            ));
        }
        let shape = [1usize, self.kv_heads, 0, self.head_dim];
        for i in 0..self.layers {
            for kind in ["key", "value"] {
                let name = format!("past_key_values.{i}.{kind}");
                let v: SessionInputValue = if self.cache_f16 {
                    Tensor::<f16>::from_array((shape, Vec::<f16>::new()))?.into()
                } else {
                    Tensor::<f32>::from_array((shape, Vec::<f32>::new()))?.into()
                };
                inputs.push((name.into(), v));
            }
        }
        let out = self.session.run(inputs)?;
        let logits = &out["logits"];
        let (shape, data) = match logits.try_extract_tensor::<f32>() {
            Ok((s, d)) => (s.to_vec(), d.to_vec()),
            Err(_) => {
                let (s, d) = logits.try_extract_tensor::<f16>()?;
                (s.to_vec(), d.iter().map(|v| v.to_f32()).collect())
            }
        };
        let vocab = *shape.last().ok_or_else(|| anyhow!("logits without a shape"))? as usize;
        if data.len() != n * vocab {
            bail!("logits have shape {shape:?}, expected [1, {n}, vocab]");
        }
        Ok((data, vocab))
    }
}
