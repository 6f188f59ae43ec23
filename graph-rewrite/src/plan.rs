//! Which MatMul nodes a rewrite takes: the precision policy, by op type and node name,
//! with every candidate's shapes checked before anything is written.

use anyhow::{bail, Context, Result};
use qins::codec::Elem;
use qins::onnx::proto::{GraphProto, NodeProto};
use qins::onnx::{dtype, Model};
use regex::Regex;
use serde::Serialize;
use std::collections::HashMap;
use std::ops::Range;

/// What a MatMul does in a transformer block, read from its node name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Packed Q, K and V projection.
    Qkv,
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    GateUp,
    Down,
    LmHead,
    Other,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Qkv => "qkv",
            Role::Q => "q",
            Role::K => "k",
            Role::V => "v",
            Role::O => "o",
            Role::Gate => "gate",
            Role::Up => "up",
            Role::GateUp => "gate_up",
            Role::Down => "down",
            Role::LmHead => "lm_head",
            Role::Other => "other",
        }
    }
}

/// Node-name patterns of the exporters we know. The onnxruntime-genai builder names
/// nodes `/model/layers.{i}/attn/qkv_proj/MatMul`, Hugging Face exports (torch.onnx,
/// optimum) `/model/layers.{i}/self_attn/q_proj/MatMul`; both share the projection names.
const ROLE_PATTERNS: &[(&str, Role)] = &[
    (r"(^|/)lm_head(/|$)", Role::LmHead),
    (r"/(self_attn|attn|attention)/(qkv_proj|query_key_value|Wqkv)/MatMul(_\d+)?$", Role::Qkv),
    (r"/(self_attn|attn|attention)/(q_proj|query)/MatMul(_\d+)?$", Role::Q),
    (r"/(self_attn|attn|attention)/(k_proj|key)/MatMul(_\d+)?$", Role::K),
    (r"/(self_attn|attn|attention)/(v_proj|value)/MatMul(_\d+)?$", Role::V),
    (r"/(self_attn|attn|attention)/(o_proj|out_proj|dense)/MatMul(_\d+)?$", Role::O),
    (r"/mlp/gate_up_proj/MatMul(_\d+)?$", Role::GateUp),
    (r"/mlp/(gate_proj|w1)/MatMul(_\d+)?$", Role::Gate),
    (r"/mlp/(up_proj|w3)/MatMul(_\d+)?$", Role::Up),
    (r"/mlp/(down_proj|w2)/MatMul(_\d+)?$", Role::Down),
];

/// A precision policy: which roles become QINS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Preset {
    /// The default policy, for Phi-3 (also right for Llama-family models): the V part
    /// of attention, o_proj, gate/up and down become QINS; Q, K, norms, embeddings and
    /// lm_head stay float.
    Phi3,
    /// Nothing by default: only what `--include` names.
    None,
}

impl Preset {
    fn takes(self, role: Role) -> bool {
        match self {
            Preset::Phi3 => {
                matches!(role, Role::Qkv | Role::V | Role::O | Role::Gate | Role::Up | Role::GateUp | Role::Down)
            }
            Preset::None => false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub preset: Preset,
    /// Extra MatMul node names to take (regexes), whole weight.
    pub include: Vec<Regex>,
    /// Node names never to take (regexes); wins over everything.
    pub exclude: Vec<Regex>,
    /// Output widths of Q, K and V in a packed qkv weight, when the model does not say.
    pub qkv_split: Option<[usize; 3]>,
    /// Fuse each taken gate/up pair and its `silu(gate) * up` into one QinsMatMul
    /// (`swiglu = 1`), where the graph has that pattern.
    pub fuse_mlp: bool,
    /// Keep the float Q/K columns of a split qkv in the same QinsMatMul (its `float_weight`
    /// input) instead of a float MatMul and a Concat beside it.
    pub fuse_qkv: bool,
    /// An empty plan is not an error (a rewrite that codes the V cache alone, `--kv-v`).
    pub allow_empty: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            preset: Preset::Phi3,
            include: vec![],
            exclude: vec![],
            qkv_split: None,
            fuse_mlp: true,
            fuse_qkv: true,
            allow_empty: false,
        }
    }
}

/// One MatMul that will become a QINS op.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// Index of the node in the main graph.
    pub node: usize,
    pub name: String,
    pub role: Role,
    pub layer: Option<usize>,
    /// The `[K, N]` weight initializer.
    pub weight: String,
    pub k: usize,
    /// Columns of the stored weight.
    pub n_total: usize,
    /// Columns that become QINS (all of them, or the V part of a packed qkv).
    pub cols: Range<usize>,
    #[serde(skip)]
    pub elem: Elem,
    /// The up projection and activation this gate absorbs, when fused.
    pub swiglu: Option<SwiGlu>,
    /// A split weight whose float columns become the node's `float_weight` input (stored
    /// transposed, `[cols.start, K]`), so that one node writes the whole output.
    pub mixed: bool,
}

/// What a fused gate target takes over: `silu(A Wg) * (A Wu)` becomes one QinsMatMul with
/// `swiglu = 1` over both weights (docs/FORMAT.md).
#[derive(Clone, Debug, Serialize)]
pub struct SwiGlu {
    /// The up projection's MatMul node, its name and its `[K, I]` weight.
    pub up_node: usize,
    pub up_name: String,
    pub up_weight: String,
    /// The Sigmoid, the Mul of silu and the Mul by up: they go.
    pub act_nodes: [usize; 3],
    /// The last Mul's output, which the fused node now produces.
    pub output: String,
}

impl Target {
    /// Columns of the encoded weight: both projections' for a fused SwiGLU.
    pub fn n(&self) -> usize {
        self.cols.len() * if self.swiglu.is_some() { 2 } else { 1 }
    }

    /// The node name, marked `+up` for a fused SwiGLU (whose weight holds both projections).
    pub fn label(&self) -> String {
        label(&self.name, self.swiglu.is_some())
    }

    /// True when only the tail columns `cols` are encoded and `0..cols.start` stay float.
    pub fn is_split(&self) -> bool {
        debug_assert_eq!(self.cols.end, self.n_total, "only a tail of columns can be split off");
        self.cols.start > 0
    }
}

/// A MatMul with its verdict, as `qins inspect` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    pub name: String,
    pub role: Role,
    pub weight: Option<String>,
    pub shape: Option<[usize; 2]>,
    pub dtype: Option<&'static str>,
    /// `None` when it is taken; else why not.
    pub skipped: Option<String>,
    pub cols: Option<Range<usize>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub targets: Vec<Target>,
    pub candidates: Vec<Candidate>,
}

/// A target's name for tables: marked `+up` where the gate took in its up projection.
pub fn label(name: &str, fused: bool) -> String {
    if fused {
        format!("{name} +up")
    } else {
        name.to_string()
    }
}

pub fn role_of(name: &str) -> Role {
    static RES: std::sync::OnceLock<Vec<(Regex, Role)>> = std::sync::OnceLock::new();
    let res = RES.get_or_init(|| ROLE_PATTERNS.iter().map(|(p, r)| (Regex::new(p).unwrap(), *r)).collect());
    res.iter().find(|(re, _)| re.is_match(name)).map(|(_, r)| *r).unwrap_or(Role::Other)
}

fn layer_of(name: &str) -> Option<usize> {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"layers?[./_](\d+)").unwrap());
    re.captures(name).and_then(|c| c[1].parse().ok())
}

/// Head counts of the attention that consumes a packed qkv output: from the fused
/// attention node's attributes, else the model folder's config files.
fn qkv_split(
    model: &Model,
    graph: &GraphProto,
    node: &NodeProto,
    n_total: usize,
    opts: &PlanOptions,
) -> Result<[usize; 3]> {
    if let Some(s) = opts.qkv_split {
        // As `parse_qkv_split` checks for the command line: an empty V would be a weight of
        // no columns, an empty Q or K no packed qkv at all.
        if s.contains(&0) {
            bail!("--qkv-split {},{},{}: every width must be at least 1", s[0], s[1], s[2]);
        }
        let sum = s.iter().try_fold(0usize, |a, &x| a.checked_add(x));
        if sum != Some(n_total) {
            let sum = sum.map_or_else(|| "more than any weight could have".to_string(), |x| x.to_string());
            bail!("--qkv-split {},{},{} adds up to {sum}, but the weight has {n_total} columns", s[0], s[1], s[2]);
        }
        return Ok(s);
    }
    let out = node.output.first().map(String::as_str).unwrap_or_default();
    let heads = graph
        .node
        .iter()
        .filter(|n| n.input.first().map(String::as_str) == Some(out))
        .find_map(|n| {
            let nh = qins::onnx::build::get_int(n, "num_heads")?;
            let kv = qins::onnx::build::get_int(n, "kv_num_heads").unwrap_or(nh);
            Some((nh, kv))
        })
        .map(Ok)
        .or_else(|| config_heads(model).transpose())
        .transpose()?;
    let Some((nh, kv)) = heads else {
        bail!(
            "{}: cannot tell where V starts in the packed qkv weight (no attention node with num_heads, no genai_config.json/config.json); pass --qkv-split Q,K,V",
            node.name()
        );
    };
    // Head counts come from the file: checked, so that a hostile one can neither wrap
    // the arithmetic nor divide by zero.
    let heads = usize::try_from(nh).ok().zip(usize::try_from(kv).ok()).filter(|&(q, k)| q > 0 && k > 0);
    let units = heads.and_then(|(q, k)| k.checked_mul(2).and_then(|k2| k2.checked_add(q)));
    let (Some((nh, kv)), Some(units)) = (heads, units) else {
        bail!("{}: the model gives {nh} query and {kv} key/value heads, which no attention has", node.name());
    };
    if !n_total.is_multiple_of(units) {
        bail!("{}: {n_total} columns do not split into {nh} query and 2x{kv} key/value heads", node.name());
    }
    let hd = n_total / units;
    Ok([nh * hd, kv * hd, kv * hd])
}

/// Head counts from `genai_config.json`, else `config.json`, beside the model.
fn config_heads(model: &Model) -> Result<Option<(i64, i64)>> {
    let read = |f: &str| -> Result<Option<serde_json::Value>> {
        let Some(bytes) = model.folder().read_optional(f, qins::files::MAX_CONFIG_BYTES)? else { return Ok(None) };
        Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("{f} in {}", model.dir.display()))?))
    };
    let int = |v: &serde_json::Value| v.as_i64();
    if let Some(v) = read("genai_config.json")? {
        let d = &v["model"]["decoder"];
        let Some(nh) = int(&d["num_attention_heads"]) else { return Ok(None) };
        return Ok(Some((nh, int(&d["num_key_value_heads"]).unwrap_or(nh))));
    }
    let Some(v) = read("config.json")? else { return Ok(None) };
    let Some(nh) = int(&v["num_attention_heads"]) else { return Ok(None) };
    Ok(Some((nh, int(&v["num_key_value_heads"]).unwrap_or(nh))))
}

/// Decides the targets. Fails, naming the reason, when nothing matches.
pub fn plan(model: &Model, opts: &PlanOptions) -> Result<Plan> {
    let graph = model.graph();
    let inits: HashMap<&str, usize> = graph.initializer.iter().enumerate().map(|(i, t)| (t.name(), i)).collect();
    let mut targets = Vec::new();
    let mut candidates = Vec::new();
    for (idx, node) in graph.node.iter().enumerate() {
        if node.op_type() != "MatMul" || !node.domain().is_empty() {
            continue;
        }
        let name = node.name().to_string();
        let role = role_of(&name);
        let mut cand =
            Candidate { name: name.clone(), role, weight: None, shape: None, dtype: None, skipped: None, cols: None };
        let wanted = if opts.exclude.iter().any(|re| re.is_match(&name)) {
            Err("excluded by --exclude".to_string())
        } else if opts.include.iter().any(|re| re.is_match(&name)) || opts.preset.takes(role) {
            Ok(())
        } else {
            Err(format!("{} stays float under the {:?} preset", role.name(), opts.preset))
        };
        let weight = node.input.get(1).and_then(|w| inits.get(w.as_str()).map(|&i| &graph.initializer[i]));
        let checked = match weight {
            None => Err("its B input is not an initializer".to_string()),
            Some(_) if node.input.first().is_some_and(|a| inits.contains_key(a.as_str())) => {
                Err("both inputs are initializers".to_string())
            }
            Some(w) => {
                cand.weight = Some(w.name().to_string());
                cand.dtype = Some(dtype::name(w.data_type()));
                let elem = match w.data_type() {
                    dtype::FLOAT => Some(Elem::F32),
                    dtype::FLOAT16 => Some(Elem::F16),
                    dtype::BFLOAT16 => Some(Elem::BF16),
                    _ => None,
                };
                // The bytes must be there as the shape says: found now, not after the
                // encoding of every other weight.
                let data = model.tensor_bytes(w).map(|_| ()).map_err(|e| format!("its data is unreadable: {e:#}"));
                match (w.dims.as_slice(), elem) {
                    (_, Some(_)) if data.is_err() => Err(data.unwrap_err()),
                    (&[k, n], Some(elem)) if k > 0 && n > 0 => {
                        cand.shape = Some([k as usize, n as usize]);
                        Ok((w.name().to_string(), k as usize, n as usize, elem))
                    }
                    (_, None) => Err(format!("weight type {} is not a float type", dtype::name(w.data_type()))),
                    (d, _) => Err(format!("weight shape {d:?} is not 2-D")),
                }
            }
        };
        match (wanted, checked) {
            (Err(why), _) | (Ok(()), Err(why)) => cand.skipped = Some(why),
            (Ok(()), Ok((weight, k, n_total, elem))) => {
                let cols = if role == Role::Qkv && !opts.include.iter().any(|re| re.is_match(&name)) {
                    let [q, kk, v] = qkv_split(model, graph, node, n_total, opts)?;
                    q + kk..q + kk + v
                } else {
                    0..n_total
                };
                cand.cols = Some(cols.clone());
                // float_weight must have the activations' type, which the op takes as f32 or f16.
                let mixed = cols.start > 0 && opts.fuse_qkv && matches!(elem, Elem::F32 | Elem::F16);
                targets.push(Target {
                    node: idx,
                    name,
                    role,
                    layer: layer_of(node.name()),
                    weight,
                    k,
                    n_total,
                    cols,
                    elem,
                    swiglu: None,
                    mixed,
                });
            }
        }
        candidates.push(cand);
    }
    if targets.is_empty() && !opts.allow_empty {
        let ops: HashMap<&str, usize> = graph.node.iter().fold(HashMap::new(), |mut m, n| {
            *m.entry(n.op_type()).or_default() += 1;
            m
        });
        let mut why = format!("no MatMul node matched the {:?} preset and --include patterns", opts.preset);
        if let Some(c) = ops.get("QinsMatMul") {
            why += &format!("; the model already has {c} QinsMatMul nodes (rewritten before?)");
        } else if let Some(c) = ops.get("MatMulNBits") {
            why += &format!("; the model has {c} MatMulNBits nodes: it is already quantized");
        } else if candidates.is_empty() {
            why += "; the model has no MatMul nodes";
        } else {
            // Say why each one was passed over, most common reason first.
            let mut reasons: Vec<(String, usize, &str)> = Vec::new();
            for c in &candidates {
                let r = c.skipped.clone().unwrap_or_default();
                match reasons.iter_mut().find(|(x, _, _)| *x == r) {
                    Some(e) => e.1 += 1,
                    None => reasons.push((r, 1, &c.name)),
                }
            }
            reasons.sort_by_key(|r| std::cmp::Reverse(r.1));
            let list: Vec<String> = reasons.iter().map(|(r, n, first)| format!("{n} x {r} (e.g. '{first}')")).collect();
            why +=
                &format!(" ({} MatMuls seen, run `qins inspect` to list them): {}", candidates.len(), list.join("; "));
        }
        bail!(why);
    }
    if opts.fuse_mlp {
        fuse_swiglu(graph, &mut targets);
    }
    Ok(Plan { targets, candidates })
}

/// Pairs each gate target with the up target and activation it feeds, where the graph has
/// exactly `Mul(Mul(G, Sigmoid(G)), U)` with `G = MatMul(X, Wg)`, `U = MatMul(X, Wu)` (the
/// builder's and Hugging Face's SiLU), nothing else reading `G`, `U` or the intermediates,
/// and both weights `[K, I]` of one type with `I % 8 == 0`. The up target then leaves the
/// list. Anything else stays two QinsMatMuls.
fn fuse_swiglu(graph: &GraphProto, targets: &mut Vec<Target>) {
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for x in &n.input {
            readers.entry(x.as_str()).or_default().push(i);
        }
    }
    let outputs: std::collections::HashSet<&str> = graph.output.iter().map(|o| o.name()).collect();
    let by_node: HashMap<usize, usize> = targets.iter().enumerate().map(|(i, t)| (t.node, i)).collect();
    // The one node reading `x`, if that is all that reads it (graph outputs count as readers).
    let sole_reader = |x: &str| match readers.get(x).map(Vec::as_slice) {
        Some(&[r]) if !outputs.contains(x) => Some(r),
        _ => None,
    };
    let op = |i: usize, ty: &str| graph.node[i].op_type() == ty && graph.node[i].domain().is_empty();
    let mut absorbed = Vec::new();
    for ti in 0..targets.len() {
        let t = &targets[ti];
        if t.role != Role::Gate || t.is_split() || !t.n().is_multiple_of(qins::codec::SWIGLU_TILE) {
            continue;
        }
        let gate = &graph.node[t.node];
        let g = gate.output[0].as_str();
        let found = (|| {
            let rs = readers.get(g)?;
            if rs.len() != 2 || outputs.contains(g) {
                return None;
            }
            let sig = *rs.iter().find(|&&r| op(r, "Sigmoid"))?;
            let mul1 = *rs.iter().find(|&&r| r != sig && op(r, "Mul"))?;
            let s_out = graph.node[sig].output.first()?.as_str();
            let m1 = &graph.node[mul1];
            if sole_reader(s_out)? != mul1
                || !(m1.input.len() == 2 && m1.input.iter().any(|x| x == g) && m1.input.iter().any(|x| x == s_out))
            {
                return None;
            }
            let mul2 = sole_reader(m1.output.first()?)?;
            let m2 = &graph.node[mul2];
            if !op(mul2, "Mul") || m2.input.len() != 2 {
                return None;
            }
            let u_out = m2.input.iter().find(|x| *x != &m1.output[0])?;
            let (un, ui) = graph
                .node
                .iter()
                .enumerate()
                .find(|(_, n)| n.output.first() == Some(u_out))
                .and_then(|(i, _)| by_node.get(&i).map(|&ti| (i, ti)))?;
            let up = &targets[ui];
            let same = up.role == Role::Up
                && !up.is_split()
                && up.swiglu.is_none()
                && graph.node[un].input.first() == gate.input.first()
                && (up.k, up.n_total, up.elem) == (t.k, t.n_total, t.elem);
            if !same || sole_reader(u_out)? != mul2 {
                return None;
            }
            Some((
                ui,
                SwiGlu {
                    up_node: un,
                    up_name: up.name.clone(),
                    up_weight: up.weight.clone(),
                    act_nodes: [sig, mul1, mul2],
                    output: m2.output.first()?.clone(),
                },
            ))
        })();
        if let Some((ui, sg)) = found {
            targets[ti].swiglu = Some(sg);
            absorbed.push(ui);
        }
    }
    let mut i = 0;
    targets.retain(|_| {
        i += 1;
        !absorbed.contains(&(i - 1))
    });
}

/// Parses `--qkv-split Q,K,V`: three widths, each at least 1 (a packed qkv has all three).
pub fn parse_qkv_split(s: &str) -> Result<[usize; 3]> {
    let v: Vec<usize> =
        s.split(',').map(|p| p.trim().parse::<usize>()).collect::<Result<_, _>>().context("--qkv-split")?;
    match *v.as_slice() {
        [q, k, v] if q > 0 && k > 0 && v > 0 => Ok([q, k, v]),
        [_, _, _] => bail!("--qkv-split widths must all be at least 1 (a packed qkv has Q, K and V columns)"),
        _ => bail!("--qkv-split takes three numbers: Q,K,V"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn roles_of_known_exporters() {
        assert_eq!(role_of("/model/layers.3/attn/qkv_proj/MatMul"), Role::Qkv);
        assert_eq!(role_of("/model/layers.3/attn/o_proj/MatMul"), Role::O);
        assert_eq!(role_of("/model/layers.0/self_attn/v_proj/MatMul"), Role::V);
        assert_eq!(role_of("/model/layers.0/self_attn/q_proj/MatMul"), Role::Q);
        assert_eq!(role_of("/model/layers.0/mlp/gate_up_proj/MatMul"), Role::GateUp);
        assert_eq!(role_of("/model/layers.0/mlp/down_proj/MatMul"), Role::Down);
        assert_eq!(role_of("/lm_head/MatMul"), Role::LmHead);
        assert_eq!(role_of("/foo/MatMul"), Role::Other);
        assert_eq!(layer_of("/model/layers.12/mlp/up_proj/MatMul"), Some(12));
    }

    /// The SwiGLU fusion takes a layer only where nothing else reads the values it removes.
    #[test]
    fn swiglu_fusion_refuses_shared_intermediates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/phi35-tiny-fp32-cpu");
        let model = Model::load(&dir).unwrap();
        let unfused = plan(&model, &PlanOptions { fuse_mlp: false, ..Default::default() }).unwrap().targets;
        let fused_layers = |g: &GraphProto| {
            let mut t = unfused.clone();
            fuse_swiglu(g, &mut t);
            let mut l: Vec<usize> = t.iter().filter(|t| t.swiglu.is_some()).filter_map(|t| t.layer).collect();
            l.sort();
            l
        };
        let graph = model.graph().clone();
        assert_eq!(fused_layers(&graph), vec![0, 1]);
        let output_of = |layer: usize, role: Role| {
            let t = unfused.iter().find(|t| t.layer == Some(layer) && t.role == role).unwrap();
            graph.node[t.node].output[0].clone()
        };
        let sigmoid_of = |layer: usize| {
            let g = output_of(layer, Role::Gate);
            let n = graph.node.iter().find(|n| n.op_type() == "Sigmoid" && n.input[0] == g).unwrap();
            n.output[0].clone()
        };
        let extra_reader = |x: String| {
            let mut g = graph.clone();
            g.node.push(qins::onnx::build::node("Identity", "", "extra", &[&x], &["extra_out"], vec![]));
            g
        };
        // Another reader of the gate product, of the sigmoid, or of the up product.
        assert_eq!(fused_layers(&extra_reader(output_of(0, Role::Gate))), vec![1]);
        assert_eq!(fused_layers(&extra_reader(sigmoid_of(1))), vec![0]);
        assert_eq!(fused_layers(&extra_reader(output_of(1, Role::Up))), vec![0]);
        // The up product as a graph output.
        let mut g = graph.clone();
        let mut vi = g.output[0].clone();
        vi.name = Some(output_of(0, Role::Up));
        g.output.push(vi);
        assert_eq!(fused_layers(&g), vec![1]);
    }

    /// A split from the library API is checked as the command line's is: a zero width once
    /// planned a V of no columns, which panicked in the encoder (found by fuzzing).
    #[test]
    fn qkv_split_widths_are_checked() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/phi35-tiny-fp32-cpu");
        let model = Model::load(&dir).unwrap();
        for s in [[96, 0, 0], [0, 0, 96], [32, 32, 0], [usize::MAX, 1, 94]] {
            let e = plan(&model, &PlanOptions { qkv_split: Some(s), ..Default::default() }).unwrap_err();
            assert!(format!("{e:#}").contains("--qkv-split"), "{s:?}: {e:#}");
        }
        assert!(plan(&model, &PlanOptions { qkv_split: Some([32, 32, 32]), ..Default::default() }).is_ok());
        assert!(parse_qkv_split("960,0,0").is_err() && parse_qkv_split("1,2").is_err());
    }

    #[test]
    fn policy_keeps_q_k_and_lm_head_float() {
        let p = Preset::Phi3;
        for r in [Role::Q, Role::K, Role::LmHead, Role::Other] {
            assert!(!p.takes(r), "{r:?}");
        }
        for r in [Role::Qkv, Role::V, Role::O, Role::Gate, Role::Up, Role::GateUp, Role::Down] {
            assert!(p.takes(r), "{r:?}");
        }
    }
}
