//! Running exported causal LMs (the onnxruntime-genai builder's graph I/O) through ONNX
//! Runtime with the `ort` crate, with the QINS custom-op library registered.
//!
//! ONNX Runtime is loaded at run time (`load-dynamic`): from `--ort-lib`, else the
//! `ORT_DYLIB_PATH` environment variable, else the library inside a pip-installed
//! `onnxruntime` (or `onnxruntime-gpu`) that Python can import (scripts/setup.sh fetches
//! `libonnxruntime.so.1.31.1` from the `onnxruntime` wheel).

use anyhow::{anyhow, bail, Context, Result};
use half::f16;
use ort::environment::Environment;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, RunOptions, Session, SessionInputValue};
use ort::value::{Tensor, TensorElementType, ValueType};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();

/// Loads ONNX Runtime once per process.
pub fn init_ort(lib: Option<&Path>) -> Result<&'static Environment> {
    let env = ENV.get_or_init(|| {
        let path = match lib
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
            .or_else(pip_onnxruntime)
        {
            Some(p) => p,
            None => {
                return Err("ONNX Runtime not found: pass --ort-lib or set ORT_DYLIB_PATH to libonnxruntime.so, or \
                            `pip install onnxruntime` (1.23 or later) where python3 can import it"
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

/// The ONNX Runtime library of a pip-installed `onnxruntime` or `onnxruntime-gpu` package: the
/// one a Python user already has. Asked of the Python beside this program first (a venv's
/// `bin/`, where a wheel puts `qins`), then of `python3` on PATH. `find_spec` locates the
/// package without importing it (an import loads the library, which takes a second).
fn pip_onnxruntime() -> Option<PathBuf> {
    const FIND: &str = "import importlib.util as u\n\
        s = u.find_spec('onnxruntime')\n\
        print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')";
    let beside = std::env::current_exe().ok().and_then(|e| Some(e.parent()?.join("python3")));
    let pythons = beside.into_iter().filter(|p| p.is_file()).chain([PathBuf::from("python3")]);
    for py in pythons {
        let Ok(out) = std::process::Command::new(&py)
            .args(["-c", FIND])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
        else {
            continue;
        };
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || dir.is_empty() {
            continue;
        }
        // The wheel holds libonnxruntime.so.<version> (and providers' libraries, not wanted).
        let Ok(entries) = std::fs::read_dir(Path::new(&dir).join("capi")) else { continue };
        let mut libs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file() && p.file_name().is_some_and(|f| f.to_string_lossy().starts_with("libonnxruntime.so"))
            })
            .collect();
        libs.sort();
        if let Some(lib) = libs.pop() {
            return Some(lib);
        }
    }
    None
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

/// Where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// ONNX Runtime's CUDA execution provider on this GPU; the KV cache stays on it.
    Cuda(i32),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device '{s}': cpu, cuda or cuda:N")),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    pub device: Device,
    pub ort_lib: Option<PathBuf>,
    /// The custom-op library; `None` looks in the default places and, if it is not
    /// there, runs without it (enough for models without QINS ops).
    pub provider_lib: Option<PathBuf>,
    /// Intra-op threads (0: ONNX Runtime's default).
    pub threads: usize,
    /// CUDA only: replay each decode step from a CUDA graph (`generate`), with a shared
    /// past/present buffer of this many positions (0: off). See [`CausalLm::generate`].
    pub cuda_graph_len: usize,
    /// CPU only: intermediate tensors (name, ONNX element type) made graph outputs, which
    /// each [`CausalLm::extend`] then keeps for [`CausalLm::take_captured`] (calibration
    /// reads the inputs of the MatMuls it encodes this way).
    pub capture: Vec<(String, i32)>,
}

/// The `tokenizer.json` in a model folder (bounded, inside the folder).
pub fn load_tokenizer(model: &Path) -> Result<tokenizers::Tokenizer> {
    let (folder, _) = qins::onnx::resolve_model_path(model)?;
    let bytes = folder
        .read_optional("tokenizer.json", qins::files::MAX_TOKENIZER_BYTES)?
        .ok_or_else(|| anyhow!("{} has no tokenizer.json", folder.root().display()))?;
    tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| anyhow!("{}/tokenizer.json: {e}", folder.root().display()))
}

/// The context length `genai_config.json` gives for a model, if it has one.
pub fn context_length(model: &Path) -> Result<Option<usize>> {
    let (folder, _) = qins::onnx::resolve_model_path(model)?;
    let Some(text) = folder.read_optional("genai_config.json", qins::files::MAX_CONFIG_BYTES)? else { return Ok(None) };
    let v: serde_json::Value = serde_json::from_slice(&text).context("genai_config.json")?;
    Ok(v["model"]["context_length"].as_u64().map(|c| c as usize))
}

/// A causal LM with the genai builder's inputs (`input_ids`, `attention_mask`,
/// `past_key_values.{i}.key/value`) and outputs (`logits`, `present.{i}.key/value`).
pub struct CausalLm {
    session: Session,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Element type and `[kv_heads, last dim]` of each cache input `[k0, v0, k1, v1, ...]`,
    /// each from its own input: a QINS V cache is uint8 rows, ORT's quantized caches int8.
    caches: Vec<CacheSpec>,
    has_mask: bool,
    has_positions: bool,
    pub path: PathBuf,
    device: Device,
    /// Positions of the static KV buffer when decode steps replay a CUDA graph.
    graph_len: usize,
    /// The graph's buffers, kept for the session's life: a captured graph replays at the
    /// addresses it was captured with.
    graph: Option<GraphState>,
    /// [`EngineOptions::capture`]'s names, and what the last run gave for each, as `[rows,
    /// last dim]` bf16 (what calibration keeps; f32 would double the peak for Phi-3.5-mini's
    /// 128 captured tensors, 1.1 GB a window of 512 tokens).
    capture: Vec<String>,
    captured: Vec<(Vec<half::bf16>, usize)>,
}

/// Device buffers of CUDA-graph decoding (see [`CausalLm::generate`]).
struct GraphState {
    kv: Vec<ort::value::DynValue>,
    /// The decode step's binding and inputs, made after the first prompt (the logits'
    /// width is known then).
    step: Option<(IoBinding, Tensor<i64>, Tensor<i64>, DevLogits)>,
}

impl CausalLm {
    pub fn open(model: &Path, opts: &EngineOptions) -> Result<CausalLm> {
        let env = init_ort(opts.ort_lib.as_deref())?;
        let (folder, onnx) = qins::onnx::resolve_model_path(model)?;
        let mut b = Session::builder(env).map_err(|e| anyhow!("session options: {e}"))?;
        let lib = opts.provider_lib.clone().or_else(default_provider_lib);
        if let Some(lib) = &lib {
            b = b.with_operator_library(lib).map_err(|e| anyhow!("register {}: {e}", lib.display()))?;
        }
        let mut folded = None;
        if !opts.capture.is_empty() {
            if opts.device != Device::Cpu {
                bail!("capturing intermediate tensors runs on the CPU only");
            }
            folded = Some(FoldedModel::with_outputs(&onnx, &opts.capture)?);
        }
        if let Device::Cuda(id) = opts.device {
            let graph = opts.cuda_graph_len > 0;
            if graph {
                // ORT's CUDA EP captures no graph with control flow in it.
                folded = FoldedModel::create(&onnx, opts.cuda_graph_len)?;
            }
            let cuda = ort::ep::CUDA::default().with_device_id(id).with_cuda_graph(graph).build().error_on_failure();
            b = b.with_execution_providers([cuda]).map_err(|e| anyhow!("CUDA execution provider: {e}"))?;
        } else {
            // No CPU arena and no memory patterns: the parity suite keeps ten sessions open, and
            // after an 8k-token prefill each arena kept gigabytes (the full suite was OOM-killed
            // at 22 GB on a 24 GB machine). Buffers are then freed after every run.
            let cpu = ort::ep::CPU::default().with_arena_allocator(false).build();
            b = b.with_execution_providers([cpu]).map_err(|e| anyhow!("CPU execution provider: {e}"))?;
            b = b.with_memory_pattern(false).map_err(|e| anyhow!("memory pattern: {e}"))?;
        }
        if opts.threads > 0 {
            b = b.with_intra_threads(opts.threads).map_err(|e| anyhow!("intra-op threads: {e}"))?;
        }
        if !opts.capture.is_empty() {
            // Calibration reads a model once, and an fp16 one on the CPU runs through Casts
            // to f32 that constant folding would turn into an f32 copy of every weight (17 GB
            // for Phi-3.5-mini); unfolded, each Cast's output lives only while its MatMul
            // runs. Prepacking would copy the weights again.
            b = b
                .with_optimization_level(ort::session::builder::GraphOptimizationLevel::Disable)
                .map_err(|e| anyhow!("optimization level: {e}"))?
                .with_config_entry("session.disable_prepacking", "1")
                .map_err(|e| anyhow!("session options: {e}"))?;
        }
        if opts.cuda_graph_len > 0 && opts.device == Device::Cpu {
            bail!("CUDA graphs need --device cuda");
        }
        let session = match &folded {
            Some(f) => b
                .with_config_entry("session.model_external_initializers_file_folder_path", f.data_dir.to_string_lossy())
                .map_err(|e| anyhow!("session options: {e}"))?
                .commit_from_memory(&f.bytes),
            None => b.commit_from_file(&onnx),
        }
        .map_err(|e| {
            let hint = if lib.is_none() { " (no QINS custom-op library was found; set QINS_PROVIDER_LIB)" } else { "" };
            anyhow!("load {}: {e}{hint}", onnx.display())
        })?;
        let names: Vec<String> = session.inputs().iter().map(|i| i.name().to_string()).collect();
        let layers = names.iter().filter(|n| n.starts_with("past_key_values.") && n.ends_with(".key")).count();
        if !names.iter().any(|n| n == "input_ids") {
            bail!("{}: no input_ids input; not a causal LM in the genai layout", onnx.display());
        }
        let past0 = session.inputs().iter().find(|i| i.name() == "past_key_values.0.key");
        let (mut kv_heads, mut head_dim) = (0, 0);
        if let Some(ValueType::Tensor { shape, .. }) = past0.map(|p| p.dtype()) {
            kv_heads = shape.get(1).copied().unwrap_or(-1).max(0) as usize;
            head_dim = shape.get(3).copied().unwrap_or(-1).max(0) as usize;
        }
        // The builder leaves the head size symbolic; genai_config.json has it.
        if let Some(text) = folder.read_optional("genai_config.json", qins::files::MAX_CONFIG_BYTES)? {
            let v: serde_json::Value = serde_json::from_slice(&text).context("genai_config.json")?;
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
        let caches = (0..2 * layers)
            .map(|i| {
                let name = kv_name("past_key_values", i);
                let input = session.inputs().iter().find(|x| x.name() == name);
                let Some(ValueType::Tensor { ty, shape, .. }) = input.map(|x| x.dtype()) else {
                    bail!("{}: no tensor input {name}", onnx.display());
                };
                let fixed =
                    |d: usize, default: usize| shape.get(d).filter(|&&v| v > 0).map_or(default, |&v| v as usize);
                let spec = CacheSpec { ty: *ty, kv_heads: fixed(1, kv_heads), last: fixed(3, head_dim) };
                match spec.ty {
                    TensorElementType::Float32
                    | TensorElementType::Float16
                    | TensorElementType::Uint8
                    | TensorElementType::Int8 => Ok(spec),
                    t => bail!("{}: cache input {name} has element type {t:?}", onnx.display()),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CausalLm {
            session,
            layers,
            kv_heads,
            head_dim,
            caches,
            has_mask: names.iter().any(|n| n == "attention_mask"),
            has_positions: names.iter().any(|n| n == "position_ids"),
            path: onnx,
            device: opts.device,
            graph_len: opts.cuda_graph_len,
            graph: None,
            capture: opts.capture.iter().map(|(n, _)| n.clone()).collect(),
            captured: Vec::new(),
        })
    }

    /// Logits at every position of `ids` (batch 1, empty cache), as `[len, vocab]` f32.
    pub fn forward(&mut self, ids: &[i64]) -> Result<(Vec<f32>, usize)> {
        let mut cache = self.empty_cache()?;
        self.extend(&mut cache, ids, true)
    }

    /// A KV cache holding no tokens.
    pub fn empty_cache(&self) -> Result<Cache> {
        let values = self.caches.iter().map(|c| c.empty()).collect::<Result<Vec<_>>>()?;
        Ok(Cache { values, len: 0 })
    }

    /// Bytes the KV cache takes per token (every layer's K and V), from the inputs' types and
    /// shapes.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.caches.iter().map(|c| c.kv_heads * c.last * c.elem_bytes()).sum()
    }

    /// Runs `ids` after the tokens in `cache`, which then holds them too. The cache values
    /// move from the outputs of one run to the inputs of the next without a copy (on the
    /// CPU they stay where ONNX Runtime put them). Returns logits of every new position
    /// (`all`) or of the last only, as rows of `vocab` f32.
    pub fn extend(&mut self, cache: &mut Cache, ids: &[i64], all: bool) -> Result<(Vec<f32>, usize)> {
        let n = ids.len();
        if n == 0 {
            bail!("no tokens to run");
        }
        let total = cache.len + n;
        let mut inputs: Vec<(Cow<str>, SessionInputValue)> = Vec::with_capacity(3 + 2 * self.layers);
        inputs.push(("input_ids".into(), Tensor::from_array(([1usize, n], ids.to_vec()))?.into()));
        if self.has_mask {
            inputs.push(("attention_mask".into(), Tensor::from_array(([1usize, total], vec![1i64; total]))?.into()));
        }
        if self.has_positions {
            let pos: Vec<i64> = (cache.len as i64..total as i64).collect();
            inputs.push(("position_ids".into(), Tensor::from_array(([1usize, n], pos))?.into()));
        }
        let past = std::mem::take(&mut cache.values);
        // The outputs of a bound run borrow the binding, so it must outlive them.
        let binding;
        let mut out = if let Device::Cuda(id) = self.device {
            // On the GPU the cache lives in device memory: presents are bound to the device
            // and become the next step's pasts as they are; only ids, mask and logits cross
            // to or from the host.
            let mut b = self.session.create_binding()?;
            for (name, v) in inputs {
                b.bind_input(name.as_ref(), &*v)?;
            }
            for (i, v) in past.iter().enumerate() {
                b.bind_input(kv_name("past_key_values", i), v)?;
            }
            let gpu = MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default)?;
            let cpu = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::CPUOutput)?;
            for i in 0..2 * self.layers {
                b.bind_output_to_device(kv_name("present", i), &gpu)?;
            }
            b.bind_output_to_device("logits", &cpu)?;
            binding = b;
            self.session.run_binding(&binding)?
        } else {
            for (i, v) in past.into_iter().enumerate() {
                inputs.push((kv_name("past_key_values", i).into(), SessionInputValue::Owned(v)));
            }
            self.session.run(inputs)?
        };
        for i in 0..2 * self.layers {
            let name = kv_name("present", i);
            cache.values.push(out.remove(&name).ok_or_else(|| anyhow!("model has no output {name}"))?);
        }
        cache.len = total;
        self.captured.clear();
        for name in &self.capture {
            let v = out.get(name.as_str()).ok_or_else(|| anyhow!("model has no output {name}"))?;
            self.captured.push(float_rows(v).with_context(|| format!("captured tensor {name}"))?);
        }
        logits_rows(&out["logits"], n, all)
    }

    /// The tensors [`EngineOptions::capture`] named, from the last [`CausalLm::extend`], in
    /// that order: each as bf16 rows of its last dimension, and that dimension.
    pub fn take_captured(&mut self) -> Vec<(Vec<half::bf16>, usize)> {
        std::mem::take(&mut self.captured)
    }

    /// Generates `new` tokens after `prompt`. Returns the tokens and, when `record`, the
    /// logits at each generated position (the distribution each token was drawn from).
    pub fn generate(
        &mut self,
        prompt: &[i64],
        new: usize,
        sampling: &Sampling,
        stop: &[i64],
        record: bool,
    ) -> Result<Generation> {
        self.generate_streaming(prompt, new, sampling, stop, record, &mut |_| Ok(()))
    }

    /// [`generate`](Self::generate), calling `on_token` with each token as soon as it is
    /// picked (before the step that computes the next one), so that a caller can show it.
    pub fn generate_streaming(
        &mut self,
        prompt: &[i64],
        new: usize,
        sampling: &Sampling,
        stop: &[i64],
        record: bool,
        on_token: &mut dyn FnMut(i64) -> Result<()>,
    ) -> Result<Generation> {
        if self.graph_len > 0 {
            return self.generate_graph(prompt, new, sampling, stop, record, on_token);
        }
        let mut cache = self.empty_cache()?;
        let (logits, vocab) = self.extend(&mut cache, prompt, false)?;
        sample_loop(logits, vocab, new, sampling, stop, record, on_token, |tok, _| {
            Ok(self.extend(&mut cache, &[tok], false)?.0)
        })
    }

    /// `generate` with every decode step replayed from a CUDA graph, as onnxruntime-genai
    /// does it: one buffer per layer's keys and values of `graph_len` positions, bound as
    /// both past and present (GroupQueryAttention writes the new position in place, from the
    /// mask's count), and input_ids, a `[1, graph_len]` attention mask and the logits at
    /// fixed device addresses, rewritten in place between steps. The prompt runs in the same
    /// session with capture off for that run. Greedy tokens match `extend`'s until logits
    /// tie within rounding (docs/BENCHMARKS.md).
    fn generate_graph(
        &mut self,
        prompt: &[i64],
        new: usize,
        sampling: &Sampling,
        stop: &[i64],
        record: bool,
        on_token: &mut dyn FnMut(i64) -> Result<()>,
    ) -> Result<Generation> {
        let Device::Cuda(id) = self.device else { bail!("CUDA graphs need a CUDA device") };
        let max = self.graph_len;
        // The last token is picked, never run: prompt + new - 1 positions are written.
        if prompt.is_empty() || prompt.len() + new.max(1) - 1 > max {
            bail!("prompt of {} plus {new} new tokens does not fit the graph's {max} positions", prompt.len());
        }
        if self.has_positions || !self.has_mask {
            bail!(
                "{}: CUDA-graph decoding takes the genai layout with attention_mask and no position_ids",
                self.path.display()
            );
        }
        let gpu = MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default)?;
        let alloc = Allocator::new(&self.session, gpu)?;
        if self.graph.is_none() {
            let kv = self.caches.iter().map(|c| c.buffer(&alloc, max)).collect::<Result<Vec<_>>>()?;
            self.graph = Some(GraphState { kv, step: None });
        }
        let logits_f16 = self.logits_f16()?;
        let bind_kv = |b: &mut IoBinding, kv: &mut [ort::value::DynValue]| -> Result<()> {
            for (i, v) in kv.iter_mut().enumerate() {
                b.bind_input(kv_name("past_key_values", i), &*v)?;
                b.bind_output(kv_name("present", i), &mut *v)?;
            }
            Ok(())
        };
        let st = self.graph.as_mut().expect("made above");
        let mut mask = vec![0i64; max];
        mask[..prompt.len()].fill(1);

        // The prompt: host inputs, logits to the host, no capture.
        let (logits, vocab) = {
            let mut b = self.session.create_binding()?;
            b.bind_input("input_ids", &Tensor::from_array(([1usize, prompt.len()], prompt.to_vec()))?)?;
            b.bind_input("attention_mask", &Tensor::from_array(([1usize, max], mask.clone()))?)?;
            bind_kv(&mut b, &mut st.kv)?;
            let cpu = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::CPUOutput)?;
            b.bind_output_to_device("logits", &cpu)?;
            let mut ro = RunOptions::new()?;
            ro.set("gpu_graph_id", "-1")?;
            let out = self.session.run_binding_with_options(&b, &ro)?;
            logits_rows(&out["logits"], prompt.len(), false)?
        };

        // Decode: device inputs and output at fixed addresses, bound once.
        if st.step.is_none() {
            let ids = Tensor::<i64>::new(&alloc, [1usize, 1])?;
            let mask_dev = Tensor::<i64>::new(&alloc, [1usize, max])?;
            let mut logits_dev = if logits_f16 {
                DevLogits::F16(Tensor::<f16>::new(&alloc, [1usize, 1, vocab])?)
            } else {
                DevLogits::F32(Tensor::<f32>::new(&alloc, [1usize, 1, vocab])?)
            };
            let mut b = self.session.create_binding()?;
            b.bind_input("input_ids", &ids)?;
            b.bind_input("attention_mask", &mask_dev)?;
            bind_kv(&mut b, &mut st.kv)?;
            match &mut logits_dev {
                DevLogits::F16(t) => b.bind_output("logits", t)?,
                DevLogits::F32(t) => b.bind_output("logits", t)?,
            }
            st.step = Some((b, ids, mask_dev, logits_dev));
        }
        let (b, ids_dev, mask_dev, logits_dev) = st.step.as_mut().expect("made above");

        let session = &mut self.session;
        sample_loop(logits, vocab, new, sampling, stop, record, on_token, |tok, step| {
            mask[prompt.len() + step] = 1;
            // Synchronous copies: the graph's replay must see them.
            Tensor::from_array(([1usize, 1], vec![tok]))?.copy_into(&mut *ids_dev)?;
            Tensor::from_array(([1usize, max], mask.clone()))?.copy_into(&mut *mask_dev)?;
            session.run_binding(b)?;
            logits_dev.to_host(vocab)
        })
    }

    fn logits_f16(&self) -> Result<bool> {
        let o = self
            .session
            .outputs()
            .iter()
            .find(|o| o.name() == "logits")
            .ok_or_else(|| anyhow!("model has no logits output"))?;
        Ok(matches!(o.dtype(), ValueType::Tensor { ty: TensorElementType::Float16, .. }))
    }
}

/// Picks `new` tokens, the first from `logits` (the prompt's last row), each next from
/// `step(token, index)`, which runs the model on the token just picked; stops early at a
/// token of `stop`. `decode_s` is the time spent after the first pick.
#[allow(clippy::too_many_arguments)]
fn sample_loop(
    mut logits: Vec<f32>,
    vocab: usize,
    new: usize,
    sampling: &Sampling,
    stop: &[i64],
    record: bool,
    on_token: &mut dyn FnMut(i64) -> Result<()>,
    mut step: impl FnMut(i64, usize) -> Result<Vec<f32>>,
) -> Result<Generation> {
    let mut rng = Rng::seeded(match sampling {
        Sampling::Sample { seed, .. } => *seed,
        Sampling::Greedy => 0,
    });
    // `new` is a request, not a promise (a stop token may end it early): reserve a little.
    let mut out = Generation { tokens: Vec::with_capacity(new.min(4096)), logits: Vec::new(), vocab, decode_s: 0.0 };
    let t = std::time::Instant::now();
    for i in 0..new {
        let tok = sampling.pick(&logits, &mut rng);
        if record {
            out.logits.push(std::mem::take(&mut logits));
        }
        out.tokens.push(tok);
        on_token(tok)?;
        if stop.contains(&tok) || i + 1 == new {
            break;
        }
        logits = step(tok, i)?;
    }
    out.decode_s = t.elapsed().as_secs_f64();
    Ok(out)
}

/// Rows of a `[1, n, vocab]` logits value (f32 or f16) as f32: all `n` (`all`) or the last.
fn logits_rows(v: &ort::value::DynValue, n: usize, all: bool) -> Result<(Vec<f32>, usize)> {
    let rows = |shape: &[i64]| -> Result<usize> {
        let vocab = *shape.last().ok_or_else(|| anyhow!("logits without a shape"))? as usize;
        if shape.iter().product::<i64>() as usize != n * vocab {
            bail!("logits have shape {shape:?}, expected [1, {n}, vocab]");
        }
        Ok(vocab)
    };
    let take = |vocab: usize| if all { 0..n * vocab } else { (n - 1) * vocab..n * vocab };
    match v.try_extract_tensor::<f32>() {
        Ok((shape, d)) => {
            let vocab = rows(shape)?;
            Ok((d[take(vocab)].to_vec(), vocab))
        }
        Err(_) => {
            let (shape, d) = v.try_extract_tensor::<f16>()?;
            let vocab = rows(shape)?;
            Ok((d[take(vocab)].iter().map(|x| x.to_f32()).collect(), vocab))
        }
    }
}

/// A float tensor (f32, f16 or bf16) as bf16 rows of its last dimension, and that dimension.
fn float_rows(v: &ort::value::DynValue) -> Result<(Vec<half::bf16>, usize)> {
    use half::bf16;
    let (shape, d) = if let Ok((shape, d)) = v.try_extract_tensor::<f32>() {
        (shape.to_vec(), d.iter().map(|&x| bf16::from_f32(x)).collect())
    } else if let Ok((shape, d)) = v.try_extract_tensor::<f16>() {
        (shape.to_vec(), d.iter().map(|x| bf16::from_f32(x.to_f32())).collect())
    } else {
        let (shape, d) = v.try_extract_tensor::<bf16>()?;
        (shape.to_vec(), d.to_vec())
    };
    let last = shape.last().copied().filter(|&l| l > 0).ok_or_else(|| anyhow!("shape {shape:?} has no rows"))?;
    Ok((d, last as usize))
}

/// Makes each MatMul's 16-bit weight wait for its activation. ONNX Runtime's CPU EP has no
/// fp16 MatMul, so it casts such weights to f32 per run; a Cast of an initializer depends on
/// nothing, and its default order ran most of them early: one 512-token run of Phi-3.5-mini
/// peaked at 11.2 GB of anonymous memory (Python, ORT 1.31.1, optimization off), where ORT's
/// priority order, which the C API does not offer, peaked at 0.9 GB. Here each such weight goes
/// through a Reshape to its own shape whose shape input is computed from the activation
/// (`Gather(Shape(x), 0) * 0 + [K, N]`), so the Cast runs just before its MatMul and its f32
/// copy dies with it: 3.6 GB peak and 1.8x faster, the same run. The values are unchanged.
fn late_weight_casts(graph: &mut qins::onnx::proto::GraphProto) {
    use qins::onnx::build::{node, tensor_i64};
    use qins::onnx::dtype;
    use std::collections::HashMap;
    let half: HashMap<String, Vec<i64>> = graph
        .initializer
        .iter()
        .filter(|t| matches!(t.data_type(), dtype::FLOAT16 | dtype::BFLOAT16) && t.dims.len() == 2)
        .map(|t| (t.name().to_string(), t.dims.clone()))
        .collect();
    let (zero_i, scalar0) = ("qins_capture/zero_i64", "qins_capture/index0");
    let mut consts = vec![tensor_i64(zero_i, &[], &[0]), tensor_i64(scalar0, &[], &[0])];
    let mut zero_of: HashMap<String, String> = HashMap::new();
    let mut nodes = Vec::with_capacity(graph.node.len());
    for (i, mut n) in std::mem::take(&mut graph.node).into_iter().enumerate() {
        let dims = n.input.get(1).and_then(|w| half.get(w));
        if let (true, Some(dims), Some(x)) = (n.op_type() == "MatMul" && n.domain().is_empty(), dims, n.input.first()) {
            let x = x.clone();
            let zero = zero_of.entry(x.clone()).or_insert_with(|| {
                let z = format!("qins_capture/{i}/zero");
                let (sh, g) = (format!("{z}/shape"), format!("{z}/dim0"));
                nodes.push(node("Shape", "", &sh, &[&x], &[&sh], vec![]));
                nodes.push(node("Gather", "", &g, &[&sh, scalar0], &[&g], vec![]));
                nodes.push(node("Mul", "", &z, &[&g, zero_i], &[&z], vec![]));
                z
            });
            let w = n.input[1].clone();
            let (c, shape, late) = (
                format!("qins_capture/{i}/dims"),
                format!("qins_capture/{i}/shape"),
                format!("qins_capture/{i}/weight"),
            );
            consts.push(tensor_i64(&c, &[2], dims));
            nodes.push(node("Add", "", &shape, &[&c, zero.as_str()], &[&shape], vec![]));
            nodes.push(node("Reshape", "", &late, &[&w, &shape], &[&late], vec![]));
            n.input[1] = late;
        }
        nodes.push(n);
    }
    if !zero_of.is_empty() {
        graph.initializer.extend(consts);
    }
    graph.node = nodes;
}

/// Input or output name of cache value `i` of `[k0, v0, k1, v1, ...]`: `{prefix}.{layer}.key|value`.
fn kv_name(prefix: &str, i: usize) -> String {
    format!("{prefix}.{}.{}", i / 2, if i.is_multiple_of(2) { "key" } else { "value" })
}

/// The decode step's logits `[1, 1, vocab]` at a fixed device address.
enum DevLogits {
    F16(Tensor<f16>),
    F32(Tensor<f32>),
}

impl DevLogits {
    fn to_host(&self, vocab: usize) -> Result<Vec<f32>> {
        let host = Allocator::default();
        Ok(match self {
            DevLogits::F32(t) => {
                let mut h = Tensor::<f32>::new(&host, [1usize, 1, vocab])?;
                t.copy_into(&mut h)?;
                h.try_extract_tensor::<f32>()?.1.to_vec()
            }
            DevLogits::F16(t) => {
                let mut h = Tensor::<f16>::new(&host, [1usize, 1, vocab])?;
                t.copy_into(&mut h)?;
                h.try_extract_tensor::<f16>()?.1.iter().map(|x| x.to_f32()).collect()
            }
        })
    }
}

/// A model whose LongRoPE `If` (the builder's choice of the short or the long rotary
/// caches by mask length) is folded to its short branch, kept in memory: ONNX Runtime loads
/// it from these bytes with the original folder for its external data (it refuses external
/// data reached through links out of a model's folder, and the folder may be read-only).
/// Exact while the mask stays within the original context, which `create` checks against
/// the graph-capture length.
pub struct FoldedModel {
    /// The folded model's protobuf.
    pub bytes: Vec<u8>,
    /// The original model's folder, where its external data files are.
    pub data_dir: PathBuf,
}

impl FoldedModel {
    /// The model with intermediate tensors `(name, element type)` added to its graph outputs
    /// (nothing folded), loaded the same way: from bytes, with the original folder for its
    /// external data.
    pub fn with_outputs(onnx: &Path, outputs: &[(String, i32)]) -> Result<FoldedModel> {
        use prost::Message;
        use qins::onnx::proto::type_proto::Value;
        use qins::onnx::proto::ModelProto;
        let bytes = qins::files::read_bounded(onnx, 2 << 30)?;
        let mut model = ModelProto::decode(&bytes[..]).with_context(|| format!("decode {}", onnx.display()))?;
        let graph = model.graph.as_mut().ok_or_else(|| anyhow!("{}: no graph", onnx.display()))?;
        for (name, elem) in outputs {
            if !graph.node.iter().any(|n| n.output.iter().any(|o| o == name)) {
                bail!("{}: no node computes {name}", onnx.display());
            }
            if !graph.output.iter().any(|o| o.name() == name) {
                // No shape: ORT takes it from the node (an empty shape would say scalar).
                let mut v = qins::onnx::build::value_info(name, *elem, &[]);
                if let Some(Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
                    t.shape = None;
                }
                graph.output.push(v);
            }
        }
        late_weight_casts(graph);
        let data_dir = onnx.parent().unwrap_or(Path::new(".")).to_path_buf();
        Ok(FoldedModel { bytes: model.encode_to_vec(), data_dir })
    }

    /// `None` when the model has no `If` to fold.
    pub fn create(onnx: &Path, max_len: usize) -> Result<Option<FoldedModel>> {
        use prost::Message;
        use qins::onnx::proto::ModelProto;
        // The graph itself: protobuf caps it at 2 GB.
        let bytes = qins::files::read_bounded(onnx, 2 << 30)?;
        let mut model = ModelProto::decode(&bytes[..]).with_context(|| format!("decode {}", onnx.display()))?;
        let graph = model.graph.as_mut().ok_or_else(|| anyhow!("{}: no graph", onnx.display()))?;
        let ifs: Vec<usize> = (0..graph.node.len()).filter(|&i| graph.node[i].op_type() == "If").collect();
        let &[at] = ifs.as_slice() else {
            if ifs.is_empty() {
                return Ok(None);
            }
            bail!("{}: {} If nodes; CUDA graphs need a model without control flow", onnx.display(), ifs.len());
        };
        let node = graph.node[at].clone();
        // The builder's condition: Greater(mask length, /model/constants/INT64/<original context>).
        let cond = node.input.first().cloned().unwrap_or_default();
        let limit = graph
            .node
            .iter()
            .find(|n| n.op_type() == "Greater" && n.output.first() == Some(&cond))
            .and_then(|n| n.input.get(1))
            .and_then(|c| c.rsplit('/').next()?.parse::<usize>().ok())
            .ok_or_else(|| anyhow!("{}: the If is not the builder's LongRoPE cache choice", onnx.display()))?;
        if max_len > limit {
            bail!("CUDA-graph length {max_len} is past the original context {limit}: the long rotary caches would be needed");
        }
        let branch = node
            .attribute
            .iter()
            .find(|a| a.name() == "else_branch")
            .and_then(|a| a.g.as_ref())
            .ok_or_else(|| anyhow!("{}: If without an else branch", onnx.display()))?;
        if branch.node.len() != node.output.len() || branch.node.iter().any(|n| n.op_type() != "Constant") {
            bail!("{}: the If's short branch is not just constants", onnx.display());
        }
        let consts: Vec<_> = branch
            .node
            .iter()
            .zip(&node.output)
            .map(|(c, name)| {
                let mut c = c.clone();
                c.output = vec![name.clone()];
                c
            })
            .collect();
        graph.node.splice(at..at + 1, consts);

        let data_dir = onnx.parent().unwrap_or(Path::new(".")).to_path_buf();
        Ok(Some(FoldedModel { bytes: model.encode_to_vec(), data_dir }))
    }
}

impl Cache {
    /// Cache value `i` of `[k0, v0, k1, v1, ...]` as f32 with its shape (float caches on the
    /// host only): for measuring what a cache holds.
    pub fn float_value(&self, i: usize) -> Result<(Vec<i64>, Vec<f32>)> {
        let v = self.values.get(i).ok_or_else(|| anyhow!("no cache value {i}"))?;
        if let Ok((shape, d)) = v.try_extract_tensor::<f32>() {
            return Ok((shape.to_vec(), d.to_vec()));
        }
        let (shape, d) = v.try_extract_tensor::<f16>()?;
        Ok((shape.to_vec(), d.iter().map(|x| x.to_f32()).collect()))
    }
}

/// Element type and shape of one cache input, `[batch, kv_heads, seq, last]`.
#[derive(Clone, Copy, Debug)]
struct CacheSpec {
    ty: TensorElementType,
    kv_heads: usize,
    /// The head size for float caches, the row's bytes for a QINS V cache.
    last: usize,
}

impl CacheSpec {
    fn elem_bytes(&self) -> usize {
        match self.ty {
            TensorElementType::Float32 => 4,
            TensorElementType::Float16 => 2,
            _ => 1,
        }
    }

    /// A cache holding no tokens (batch 1).
    fn empty(&self) -> Result<ort::value::DynValue> {
        let shape = [1usize, self.kv_heads, 0, self.last];
        Ok(match self.ty {
            TensorElementType::Float16 => Tensor::<f16>::from_array((shape, Vec::<f16>::new()))?.into_dyn(),
            TensorElementType::Uint8 => Tensor::<u8>::from_array((shape, Vec::<u8>::new()))?.into_dyn(),
            TensorElementType::Int8 => Tensor::<i8>::from_array((shape, Vec::<i8>::new()))?.into_dyn(),
            _ => Tensor::<f32>::from_array((shape, Vec::<f32>::new()))?.into_dyn(),
        })
    }

    /// A buffer of `len` positions from `alloc` (batch 1), for CUDA-graph decoding.
    fn buffer(&self, alloc: &Allocator, len: usize) -> Result<ort::value::DynValue> {
        let shape = [1usize, self.kv_heads, len, self.last];
        Ok(match self.ty {
            TensorElementType::Float16 => Tensor::<f16>::new(alloc, shape)?.into_dyn(),
            TensorElementType::Uint8 => Tensor::<u8>::new(alloc, shape)?.into_dyn(),
            TensorElementType::Int8 => Tensor::<i8>::new(alloc, shape)?.into_dyn(),
            _ => Tensor::<f32>::new(alloc, shape)?.into_dyn(),
        })
    }
}

/// The past keys and values of every layer, `[k0, v0, k1, v1, ...]`, and how many tokens
/// they hold.
pub struct Cache {
    values: Vec<ort::value::DynValue>,
    pub len: usize,
}

#[derive(Clone, Debug)]
pub enum Sampling {
    Greedy,
    /// Temperature, then nucleus (top-p) sampling, from a seeded generator.
    Sample {
        temperature: f32,
        top_p: f32,
        seed: u64,
    },
}

impl Sampling {
    pub fn pick(&self, logits: &[f32], rng: &mut Rng) -> i64 {
        match self {
            Sampling::Greedy => argmax(logits) as i64,
            Sampling::Sample { temperature, top_p, .. } => {
                let probs = softmax(logits, *temperature);
                let mut idx: Vec<usize> = (0..probs.len()).collect();
                idx.sort_unstable_by(|&a, &b| probs[b].total_cmp(&probs[a]));
                let (mut mass, mut keep) = (0.0, 0);
                for &i in &idx {
                    mass += probs[i];
                    keep += 1;
                    if mass >= *top_p as f64 {
                        break;
                    }
                }
                let r = rng.unit() * mass;
                let mut acc = 0.0;
                for &i in &idx[..keep] {
                    acc += probs[i];
                    if acc >= r {
                        return i as i64;
                    }
                }
                idx[keep - 1] as i64
            }
        }
    }
}

/// Softmax of `logits / temperature` in f64.
pub fn softmax(logits: &[f32], temperature: f32) -> Vec<f64> {
    let t = temperature.max(1e-6) as f64;
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b)) as f64;
    let e: Vec<f64> = logits.iter().map(|v| ((*v as f64 - m) / t).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

pub fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, v)| if *v > bv { (i, *v) } else { (bi, bv) }).0
}

/// What `generate` produced.
pub struct Generation {
    pub tokens: Vec<i64>,
    /// Logits before each generated token (when recorded).
    pub logits: Vec<Vec<f32>>,
    pub vocab: usize,
    /// Seconds spent on the tokens after the first (each one step of the model).
    pub decode_s: f64,
}

/// The sampler's generator: the workspace's one (`qins::rng`), seeded with
/// [`Rng::seeded`], so sampled runs repeat exactly.
pub use qins::rng::SplitMix64 as Rng;

#[cfg(test)]
mod tests {
    use super::late_weight_casts;
    use qins::onnx::build::{node, tensor_raw};
    use qins::onnx::dtype;
    use qins::onnx::proto::GraphProto;

    #[test]
    fn a_16_bit_weight_waits_for_its_activation_and_others_are_left_alone() {
        let mut g = GraphProto {
            node: vec![
                node("MatMul", "", "a", &["x", "w16"], &["y"], vec![]),
                node("MatMul", "", "b", &["x", "w16b"], &["y2"], vec![]),
                node("MatMul", "", "c", &["y", "w32"], &["z"], vec![]),
            ],
            initializer: vec![
                tensor_raw("w16", dtype::FLOAT16, &[4, 3], vec![0u8; 24]),
                tensor_raw("w16b", dtype::BFLOAT16, &[4, 5], vec![0u8; 40]),
                tensor_raw("w32", dtype::FLOAT, &[3, 2], vec![0u8; 24]),
            ],
            ..Default::default()
        };
        late_weight_casts(&mut g);
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type()).collect();
        // One zero per activation (x is shared), then per 16-bit weight its shape and Reshape.
        assert_eq!(ops, ["Shape", "Gather", "Mul", "Add", "Reshape", "MatMul", "Add", "Reshape", "MatMul", "MatMul"]);
        assert_eq!(g.node[0].input, ["x"]);
        for (reshape, matmul, w) in [(4, 5, "w16"), (7, 8, "w16b")] {
            assert_eq!(g.node[reshape].input[0], w);
            assert_eq!(g.node[matmul].input[1], g.node[reshape].output[0]);
            // The shape input is computed (from x), not a constant.
            assert!(g.initializer.iter().all(|t| t.name() != g.node[reshape].input[1]));
        }
        assert_eq!(g.node[9].input, ["y", "w32"]);
        let dims = g.initializer.iter().find(|t| t.name() == g.node[3].input[0]).unwrap();
        assert_eq!(dims.int64_data.clone().into_iter().chain(raw_i64(dims)).collect::<Vec<_>>(), [4, 3]);
    }

    fn raw_i64(t: &qins::onnx::proto::TensorProto) -> Vec<i64> {
        t.raw_data
            .as_deref()
            .unwrap_or_default()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}
