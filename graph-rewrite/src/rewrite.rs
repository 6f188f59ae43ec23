//! Applying a plan: graph edits, lazy encoding while the output is written, the report.

use crate::calibrate::Calibration;
use crate::gptq::GptqOptions;
use crate::plan::{Plan, Target};
use crate::report::{LayerReport, RewriteReport};
use anyhow::{anyhow, bail, Context, Result};
use qins::codec::{encode_matrix, stage_swiglu, Encoded, Format, Layout, Scratch, TensorStats, WeightSource};
use qins::files::{write_json_output, Inputs};
use qins::onnx::build::{attr_int, node, tensor_deferred, DEFERRED};
use qins::onnx::proto::{GraphProto, ModelProto, OperatorSetIdProto, TensorProto};
use qins::onnx::{dtype, external_ref, save_model, AtomicDir, Model, SaveOptions};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The op domain and name of the QINS matmul (docs/FORMAT.md).
pub use qins::onnx::{QINS_DOMAIN as DOMAIN, QINS_OPSET as OPSET};
pub const OP: &str = "QinsMatMul";

#[derive(Clone, Debug)]
pub struct RewriteOptions {
    pub format: Format,
    /// Group size along K; 0 for one scale per output channel.
    pub group: usize,
    /// Replace a non-empty output folder.
    pub force: bool,
    /// fsync the output before renaming it into place.
    pub fsync: bool,
    /// Code the V cache (`--kv-v`, [`crate::kv_v`]): q8 or q4; `None` leaves attention alone.
    pub kv_v: Option<Format>,
    /// The QINS custom-op library to place in the output folder, named in its
    /// `genai_config.json` (`model.decoder.session_options.custom_ops_library`) so that
    /// onnxruntime-genai runs the folder as it is; `None` leaves it out.
    pub library: Option<PathBuf>,
}

/// Progress callbacks: bytes of input weights handled so far, and the current tensor.
pub trait Progress {
    fn start(&mut self, total_bytes: u64);
    fn advance(&mut self, bytes: u64, what: &str);
    fn finish(&mut self);
}

/// A progress sink that does nothing.
pub struct NoProgress;
impl Progress for NoProgress {
    fn start(&mut self, _: u64) {}
    fn advance(&mut self, _: u64, _: &str) {}
    fn finish(&mut self) {}
}

/// What to put in each deferred tensor of the new graph.
enum Job {
    Codes(usize),
    Scales(usize),
    /// The float columns of a split weight: `(target, columns)`.
    FloatPart(usize),
}

fn job_key(j: &Job) -> String {
    match j {
        Job::Codes(i) => format!("codes/{i}"),
        Job::Scales(i) => format!("scales/{i}"),
        Job::FloatPart(i) => format!("float/{i}"),
    }
}

fn parse_job(loc: &str) -> Option<Job> {
    let key = loc.strip_prefix(DEFERRED)?;
    let (kind, i) = key.split_once('/')?;
    let i = i.parse().ok()?;
    Some(match kind {
        "codes" => Job::Codes(i),
        "scales" => Job::Scales(i),
        "float" => Job::FloatPart(i),
        _ => return None,
    })
}

/// Edits the graph: each target becomes a QinsMatMul (a split weight's float columns go in as
/// its `float_weight`, or, unmixed, into a float MatMul and a Concat beside it). Returns the
/// new model; its new tensors are deferred.
pub fn rewrite_graph(model: &Model, plan: &Plan, opts: &RewriteOptions) -> Result<ModelProto> {
    Ok(rewrite_graph_kv(model, plan, opts)?.0)
}

/// [`rewrite_graph`], with what the V cache pass did.
pub fn rewrite_graph_kv(
    model: &Model,
    plan: &Plan,
    opts: &RewriteOptions,
) -> Result<(ModelProto, Option<crate::kv_v::KvVReport>)> {
    let mut proto = model.proto.clone();
    let graph = proto.graph.as_mut().ok_or_else(|| anyhow!("model has no graph"))?;
    let by_node: HashMap<usize, (usize, &Target)> =
        plan.targets.iter().enumerate().map(|(i, t)| (t.node, (i, t))).collect();
    // The up MatMuls and activations that fused gate targets absorb.
    let absorbed: HashSet<usize> = plan
        .targets
        .iter()
        .filter_map(|t| t.swiglu.as_ref())
        .flat_map(|s| std::iter::once(s.up_node).chain(s.act_nodes))
        .collect();
    let old_nodes = std::mem::take(&mut graph.node);
    let mut new_inits: Vec<TensorProto> = Vec::new();
    let mut replaced: HashSet<String> = HashSet::new();
    let names: HashSet<String> = old_nodes.iter().flat_map(|n| n.output.iter().cloned()).collect();
    for (idx, n) in old_nodes.into_iter().enumerate() {
        if absorbed.contains(&idx) {
            continue;
        }
        let Some(&(ti, t)) = by_node.get(&idx) else {
            graph.node.push(n);
            continue;
        };
        let layout = Layout::new(opts.format, t.k, t.n(), opts.group);
        let (codes_dt, scales_dt) = match opts.format {
            Format::F32 => (dtype::FLOAT, dtype::FLOAT),
            _ => (dtype::UINT8, dtype::FLOAT16),
        };
        let base = encoded_base(t);
        let codes = format!("{base}.qins_codes");
        let scales = format!("{base}.qins_scales");
        new_inits.push(tensor_deferred(&codes, codes_dt, &layout.codes_shape(), &job_key(&Job::Codes(ti))));
        new_inits.push(tensor_deferred(&scales, scales_dt, &layout.scales_shape(), &job_key(&Job::Scales(ti))));
        let a = n.input[0].as_str();
        let out = t.swiglu.as_ref().map_or(n.output[0].as_str(), |s| s.output.as_str());
        let attrs = || {
            let mut v = vec![
                attr_int("K", t.k as i64),
                attr_int("N", t.n() as i64),
                attr_int("bits", opts.format.bits() as i64),
                attr_int("group_size", layout.group as i64),
            ];
            if t.swiglu.is_some() {
                v.push(attr_int("swiglu", 1));
            }
            v
        };
        if t.mixed {
            let float_w = format!("{}.float_part_t", t.weight);
            let float_dt = model.initializer(&t.weight).map(|w| w.data_type()).unwrap_or(dtype::FLOAT);
            let shape = [t.cols.start as i64, t.k as i64];
            new_inits.push(tensor_deferred(&float_w, float_dt, &shape, &job_key(&Job::FloatPart(ti))));
            let inputs = [a, codes.as_str(), scales.as_str(), float_w.as_str()];
            graph.node.push(node(OP, DOMAIN, &format!("{}_QINS", n.name()), &inputs, &[out], attrs()));
        } else if t.is_split() {
            let unique = |s: String| {
                if names.contains(&s) {
                    format!("{s}_qins")
                } else {
                    s
                }
            };
            let float_w = format!("{}.float_part", t.weight);
            let (float_out, qins_out) = (unique(format!("{out}/float_part")), unique(format!("{out}/qins_part")));
            let float_dt = model.initializer(&t.weight).map(|w| w.data_type()).unwrap_or(dtype::FLOAT);
            let float_cols = t.cols.start as i64;
            new_inits.push(tensor_deferred(
                &float_w,
                float_dt,
                &[t.k as i64, float_cols],
                &job_key(&Job::FloatPart(ti)),
            ));
            let name = n.name();
            graph.node.push(node("MatMul", "", &format!("{name}_float_part"), &[a, &float_w], &[&float_out], vec![]));
            graph.node.push(node(OP, DOMAIN, &format!("{name}_QINS"), &[a, &codes, &scales], &[&qins_out], attrs()));
            graph.node.push(node(
                "Concat",
                "",
                &format!("{name}_concat"),
                &[&float_out, &qins_out],
                &[out],
                vec![attr_int("axis", -1)],
            ));
        } else {
            graph.node.push(node(OP, DOMAIN, &format!("{}_QINS", n.name()), &[a, &codes, &scales], &[out], attrs()));
        }
        replaced.insert(t.weight.clone());
        if let Some(s) = &t.swiglu {
            replaced.insert(s.up_weight.clone());
        }
    }
    // A float weight goes only when no node, here or in a subgraph, still reads it (a tied
    // embedding can share its weight with a MatMul).
    let mut used = HashSet::new();
    collect_inputs(graph, &mut used);
    let dead: HashSet<String> = replaced.into_iter().filter(|w| !used.contains(w)).collect();
    graph.initializer.retain(|t| !dead.contains(t.name()));
    graph.value_info.retain(|v| !dead.contains(v.name()));
    graph.input.retain(|v| !dead.contains(v.name()));
    graph.initializer.extend(new_inits);
    if !proto.opset_import.iter().any(|o| o.domain() == DOMAIN) {
        proto.opset_import.push(OperatorSetIdProto { domain: Some(DOMAIN.into()), version: Some(OPSET) });
    }
    let kv = opts.kv_v.map(|f| crate::kv_v::apply(&mut proto, model, f)).transpose()?;
    Ok((proto, kv))
}

fn collect_inputs(g: &GraphProto, used: &mut HashSet<String>) {
    for n in &g.node {
        used.extend(n.input.iter().cloned());
        for a in &n.attribute {
            for sg in a.g.iter().chain(a.graphs.iter()) {
                collect_inputs(sg, used);
            }
        }
    }
    used.extend(g.output.iter().map(|o| o.name().to_string()));
}

/// Rewrites `model` into the folder `out` (atomically) and returns the report.
pub fn rewrite(
    model: &Model,
    plan: &Plan,
    opts: &RewriteOptions,
    out: &Path,
    progress: &mut dyn Progress,
) -> Result<RewriteReport> {
    rewrite_calibrated(model, plan, opts, None, out, progress)
}

/// [`rewrite`], encoding each target against its calibration Hessian ([`crate::gptq`]) when
/// `calib` is given.
pub fn rewrite_calibrated<'m>(
    model: &'m Model,
    plan: &Plan,
    opts: &RewriteOptions,
    calib: Option<&Calibration>,
    out: &Path,
    progress: &mut dyn Progress,
) -> Result<RewriteReport> {
    // The model folder holds everything the model references (Model::load sees to that)
    // and the files copied beside it: the output may not touch it.
    if plan.targets.is_empty() && opts.kv_v.is_none() {
        bail!("nothing to rewrite: the plan takes no weight and no V cache format was asked for (--kv-v)");
    }
    let out = Inputs::new().with(&model.dir)?.check_output(out, "output")?;
    let t0 = Instant::now();
    let (mut proto, kv_v) = rewrite_graph_kv(model, plan, opts)?;
    let dir = AtomicDir::create(&out, opts.force)?;
    let onnx_name = model.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or("model.onnx".into());
    let data_name = format!("{onnx_name}.data");

    let total = model.external_tensor_bytes();
    progress.start(total);
    let mut layers: Vec<Option<LayerReport>> = vec![None; plan.targets.len()];
    let mut pending_scales: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut input_bytes = 0u64;
    let mut scratch = Scratch::new();
    let mut factors = Factors::new(calib);
    let resolve = &mut |t: &TensorProto| -> Result<Cow<'m, [u8]>> {
        let r = external_ref(t)?.ok_or_else(|| anyhow!("tensor '{}' is not external", t.name()))?;
        let Some(job) = parse_job(&r.location) else {
            let bytes = model.external_bytes(&r).with_context(|| format!("tensor '{}'", t.name()))?;
            input_bytes += bytes.len() as u64;
            progress.advance(bytes.len() as u64, t.name());
            return Ok(Cow::Borrowed(bytes));
        };
        match job {
            Job::Codes(i) => {
                let target = &plan.targets[i];
                let started = Instant::now();
                let (enc, stats) = encode_target(model, target, opts, factors.get(i)?.as_deref(), &mut scratch)?;
                let src_bytes = (target.k * target.n() * target.elem.bytes()) as u64;
                input_bytes += src_bytes;
                progress.advance(src_bytes, &target.name);
                layers[i] = Some(LayerReport::new(target, &enc.layout, stats, started.elapsed().as_secs_f64()));
                pending_scales.insert(i, enc.scale_bytes());
                Ok(Cow::Owned(enc.codes))
            }
            Job::Scales(i) => pending_scales.remove(&i).map(Cow::Owned).ok_or_else(|| anyhow!("scales before codes")),
            Job::FloatPart(i) => {
                let target = &plan.targets[i];
                // The encoded columns are the tail (V of packed qkv); the head stays float.
                let head = full_weight(model, &target.weight, target)?.columns(0..target.cols.start);
                let part = if target.mixed { head.to_transposed_bytes() } else { head.to_dense_bytes() };
                input_bytes += part.len() as u64;
                progress.advance(part.len() as u64, &target.name);
                Ok(Cow::Owned(part))
            }
        }
    };
    let onnx_path = dir.path().join(&onnx_name);
    let save = save_model(
        &mut proto,
        &onnx_path,
        &SaveOptions { data_file: data_name, fsync: opts.fsync, ..Default::default() },
        resolve,
    )?;
    progress.finish();
    copy_sidecars(model, dir.path())?;
    if let Some(lib) = &opts.library {
        place_library(lib, dir.path())?;
    }

    let layers: Vec<LayerReport> = layers.into_iter().map(|l| l.expect("every target encoded")).collect();
    let mut report =
        RewriteReport::new(model, opts.format, opts.group, layers, save, input_bytes, t0.elapsed().as_secs_f64());
    report.kv_v = kv_v;
    report.calibration = calib.map(Calibration::summary);
    write_json_output(&dir.path().join("qins_report.json"), &report)?;
    // Reopen what we wrote: every external reference must resolve before it goes live.
    Model::load(&onnx_path).context("the written model does not reload")?;
    dir.commit()?;
    Ok(report)
}

/// Name stem of a target's codes and scales initializers.
pub fn encoded_base(t: &Target) -> String {
    if t.swiglu.is_some() {
        format!("{}.swiglu", t.weight)
    } else if t.is_split() {
        format!("{}.v", t.weight)
    } else {
        t.weight.clone()
    }
}

/// The weight a target encodes, as a dense `[K, n()]` matrix in `scratch`: its columns, or
/// for a fused SwiGLU both projections interleaved (`qins::codec::swiglu_row`).
pub fn staged_source<'s>(model: &Model, t: &Target, scratch: &'s mut Scratch) -> Result<WeightSource<'s>> {
    let gate = full_weight(model, &t.weight, t)?.columns(t.cols.clone());
    match &t.swiglu {
        None => Ok(gate.stage(scratch)),
        Some(s) => {
            let up = full_weight(model, &s.up_weight, t)?;
            stage_swiglu(&gate, &up, scratch).with_context(|| format!("fuse {} with {}", t.name, s.up_name))
        }
    }
}

/// A stored `[K, n_total]` weight of `t`'s shape and type.
fn full_weight<'a>(model: &'a Model, name: &str, t: &Target) -> Result<WeightSource<'a>> {
    let w = model.initializer(name).ok_or_else(|| anyhow!("initializer {name} vanished"))?;
    let bytes = match model.tensor_bytes(w)? {
        Cow::Borrowed(b) => b,
        Cow::Owned(_) => bail!("{name}: weights stored as typed fields are not supported; re-save with raw data"),
    };
    Ok(WeightSource::new(bytes, t.elem, t.k, t.n_total)?)
}

/// The calibrated encoder's inputs for one MatMul input: the inverse factor and `diag(H)`.
struct Factor {
    u: Vec<f32>,
    diag: Vec<f32>,
    /// The input order, under act-order.
    perm: Option<Vec<usize>>,
    opts: GptqOptions,
}

/// Inverse factors, each computed (with its Hessian, which is dropped then) at its input's
/// first target and dropped after its last (the largest, Phi-3.5's down_proj input, is
/// 268 MB).
struct Factors<'c> {
    calib: Option<&'c Calibration>,
    live: HashMap<String, (std::rc::Rc<Factor>, usize)>,
    uses: HashMap<String, usize>,
}

impl<'c> Factors<'c> {
    fn new(calib: Option<&'c Calibration>) -> Factors<'c> {
        Factors { calib, live: HashMap::new(), uses: calib.map(|c| c.uses()).unwrap_or_default() }
    }

    fn get(&mut self, target: usize) -> Result<Option<std::rc::Rc<Factor>>> {
        let Some(c) = self.calib else { return Ok(None) };
        let name = &c.input_of[target];
        if !self.live.contains_key(name) {
            let h = c.hessian(target)?;
            let diag = h.diag();
            let perm = c.opts.act_order.then(|| crate::gptq::act_order(&diag));
            let h = match &perm {
                Some(p) => h.permuted(p),
                None => h,
            };
            let u = crate::gptq::inverse_factor(&h, c.opts.damp).with_context(|| format!("calibration of {name}"))?;
            let f = Factor { u, diag, perm, opts: c.opts };
            self.live.insert(name.clone(), (std::rc::Rc::new(f), 0));
        }
        let (f, used) = self.live.get_mut(name).expect("inserted above");
        *used += 1;
        let f = f.clone();
        if Some(&*used) == self.uses.get(name) {
            self.live.remove(name);
        }
        Ok(Some(f))
    }
}

fn encode_target(
    model: &Model,
    t: &Target,
    opts: &RewriteOptions,
    factor: Option<&Factor>,
    scratch: &mut Scratch,
) -> Result<(Encoded, TensorStats)> {
    let src = staged_source(model, t, scratch)?;
    let layout = Layout::new(opts.format, t.k, t.n(), opts.group);
    let (enc, rows) = match factor {
        Some(f) => crate::gptq::encode(src, layout, &f.u, &f.diag, f.perm.as_deref(), &f.opts),
        None => encode_matrix(src, layout).map_err(Into::into),
    }
    .with_context(|| format!("encode {}", t.name))?;
    let stats = TensorStats::from_rows(&rows, layout.bits_per_weight());
    Ok((enc, stats))
}

/// Copies the files that travel with a model (genai_config.json, tokenizer files) but not
/// the model, its data, subfolders or our own marker files. A symlink is copied as the
/// file it names if that lies inside the model folder, and refused if it leads out of it;
/// a FIFO, socket or device is refused (it could block or never end).
fn copy_sidecars(model: &Model, out: &Path) -> Result<()> {
    let skip: HashSet<String> = model.data_files().into_iter().map(|(f, _)| f).collect();
    for e in std::fs::read_dir(&model.dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let ty = e.file_type()?;
        if ty.is_dir()
            || skip.contains(&name)
            || name.ends_with(".onnx")
            || name.ends_with(".onnx.data")
            || name.ends_with(".onnx_data")
            || qins::files::OUTPUT_MARKERS.contains(&name.as_str())
        {
            continue;
        }
        let copy = || -> Result<()> {
            let real = model.folder().inside(Path::new(&e.file_name()))?;
            if real.is_dir() {
                return Ok(());
            }
            copy_regular(&real, &out.join(e.file_name()))
        };
        copy().with_context(|| format!("copy {name} from the model folder"))?;
    }
    Ok(())
}

/// Copies the custom-op library into the output folder and names it, by its bare file name,
/// in the decoder's session options of `genai_config.json` (when the model has one).
/// onnxruntime-genai resolves a relative library path against the config's folder, and
/// refuses absolute paths outside its allowed folders, `..` and symlinks leading out: a
/// copy, not a link, is what it accepts.
fn place_library(lib: &Path, out: &Path) -> Result<()> {
    let name = lib.file_name().ok_or_else(|| anyhow!("custom-op library {}: not a file name", lib.display()))?;
    copy_regular(lib, &out.join(name))
        .with_context(|| format!("copy the custom-op library {} (--no-library leaves it out)", lib.display()))?;
    let config = out.join("genai_config.json");
    if !config.exists() {
        return Ok(());
    }
    let text = std::fs::read(&config).context("genai_config.json")?;
    let mut v: serde_json::Value = serde_json::from_slice(&text).context("genai_config.json")?;
    let decoder = v
        .get_mut("model")
        .and_then(|m| m.get_mut("decoder"))
        .and_then(serde_json::Value::as_object_mut)
        .ok_or_else(|| anyhow!("genai_config.json has no model.decoder object to name the custom-op library in"))?;
    let options = decoder.entry("session_options").or_insert_with(|| serde_json::json!({}));
    let options = options
        .as_object_mut()
        .ok_or_else(|| anyhow!("genai_config.json: model.decoder.session_options is not an object"))?;
    options.insert("custom_ops_library".into(), name.to_string_lossy().into_owned().into());
    // The builder writes four-space indentation; keep it (the keys come out sorted).
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    serde::Serialize::serialize(&v, &mut serde_json::Serializer::with_formatter(&mut buf, fmt))?;
    std::fs::write(&config, buf).context("write genai_config.json")
}

/// Copies a regular file (a FIFO or device is refused by `open_regular`, not waited on) into
/// the output folder being written.
fn copy_regular(src: &Path, dst: &Path) -> Result<()> {
    let mut src = qins::files::open_regular(src)?;
    let mut dst = std::fs::File::create(dst)?;
    std::io::copy(&mut src, &mut dst)?;
    Ok(())
}
