//! The fuzz targets: each takes arbitrary bytes, must never panic, hang or allocate without
//! bound, and checks what must hold of whatever it accepts. `fuzz/fuzz_targets/*.rs` hands
//! them to libFuzzer (`scripts/fuzz.sh`, cargo-fuzz on stable with `--sanitizer none`);
//! `tests/replay.rs` runs the seed corpus and a seeded mutation of it on every `cargo test`.
//!
//! | target | input | reaches |
//! |---|---|---|
//! | [`onnx_model`] | `u32` length, `model.onnx` bytes, `model.onnx.data` bytes | `Model::load` with external data, every tensor's bytes |
//! | [`gguf`] | a GGUF file | the reader, `LlamaConfig`, tokenizer, graph, every initializer |
//! | [`rewrite_plan`] | a recipe for a graph (see [`graph_from`]) | `plan`, then the whole rewrite and a reload of its output |
//! | [`op_inputs`] | attributes and input shapes | the op contract, then the CPU kernel on what it accepts |
//! | [`attention_inputs`] | attributes, shapes and lengths | the attention op's contract, then its CPU kernel |

pub mod seeds;
mod unstructured;

pub use unstructured::Unstructured;

use anyhow::{ensure, Result};
use prost::Message;
use qins::onnx::proto::ModelProto;
use std::path::{Path, PathBuf};

/// A folder of this thread for the files a target writes (a thread runs one input at a
/// time; libFuzzer runs one thread, the replay test one per target).
fn work_dir(what: &str) -> PathBuf {
    let thread = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_digit(), "");
    let d = std::env::temp_dir().join(format!("qins-fuzz-{}-{thread}-{what}", std::process::id()));
    std::fs::create_dir_all(&d).expect("a scratch folder");
    d
}

fn write_model(dir: &Path, model: &[u8], data: Option<&[u8]>) {
    for e in std::fs::read_dir(dir).expect("scratch folder").flatten() {
        let _ = if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(e.path())
        } else {
            std::fs::remove_file(e.path())
        };
    }
    std::fs::write(dir.join("model.onnx"), model).expect("write model.onnx");
    if let Some(d) = data {
        std::fs::write(dir.join("model.onnx.data"), d).expect("write model.onnx.data");
    }
}

/// How far an input got: the replay test checks that mutations still reach the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reached {
    /// Refused at the first check.
    Nothing,
    /// Past parsing (the model loaded, the GGUF opened, the contract was read).
    Parsed,
    /// All the way (every tensor read, the import's initializers built, the rewrite
    /// written and reloaded, the kernel run).
    End,
}

/// The ONNX reader: `[len u32 LE][model.onnx: len bytes][model.onnx.data: the rest]`.
pub fn onnx_model(data: &[u8]) -> Reached {
    let Some((head, rest)) = data.split_first_chunk::<4>() else { return Reached::Nothing };
    let n = (u32::from_le_bytes(*head) as usize).min(rest.len());
    let dir = work_dir("onnx");
    write_model(&dir, &rest[..n], Some(&rest[n..]));
    let Ok(m) = qins::onnx::Model::load(&dir) else { return Reached::Nothing };
    let mut all = true;
    // Whatever loads must give every tensor's bytes or a clean error, within the file.
    let total: u64 = m.data_files().iter().map(|(_, l)| l).sum();
    for t in &m.graph().initializer {
        match m.tensor_bytes(t) {
            Ok(b) => {
                if let Ok(Some(r)) = qins::onnx::external_ref(t) {
                    assert!(b.len() as u64 == r.length && r.length <= total, "{}: bytes outside the data", t.name());
                }
            }
            Err(_) => all = false,
        }
    }
    assert!(m.external_tensor_bytes() <= total.saturating_mul(m.graph().initializer.len().max(1) as u64));
    if all {
        Reached::End
    } else {
        Reached::Parsed
    }
}

/// The GGUF reader and importer up to the bytes of every initializer (nothing written).
pub fn gguf(data: &[u8]) -> Reached {
    let Ok(g) = qins_models::Gguf::from_bytes(Path::new("fuzz.gguf"), data.to_vec()) else { return Reached::Nothing };
    for t in &g.tensors {
        assert!(t.file_offset + t.n_bytes <= data.len() as u64, "{}: outside the file", t.name);
        if t.ty.can_dequantize() {
            let _ = g.dequantize(t);
        }
    }
    let Ok(cfg) = qins_models::LlamaConfig::from_gguf(&g) else { return Reached::Parsed };
    let mut all = qins_models::tokenizer::build(&g).is_ok();
    let plan = qins_models::llama::build(&cfg);
    for src in plan.sources.values() {
        match qins_models::llama::materialize(&g, &cfg, src) {
            Ok(v) => assert!(v.iter().all(|x| x.is_finite()), "a non-finite value was accepted"),
            Err(_) => all = false,
        }
    }
    if all {
        Reached::End
    } else {
        Reached::Parsed
    }
}

/// The rewrite on an arbitrary graph: plan it with options drawn from the input, rewrite it
/// whole (encode, save, reload), and check that the output has one QINS op per target.
pub fn rewrite_plan(data: &[u8]) -> Reached {
    let mut u = Unstructured::new(data);
    let (model, genai) = graph_from(&mut u);
    let opts = qins_graph_rewrite::PlanOptions {
        fuse_mlp: u.bool(),
        fuse_qkv: u.bool(),
        qkv_split: u.bool().then(|| [u.int(0, 40), u.int(0, 40), u.int(0, 40)]),
        ..Default::default()
    };
    let format = [qins::codec::Format::Q8, qins::codec::Format::Q6, qins::codec::Format::Q4, qins::codec::Format::F32]
        [u.int(0, 3)];
    let group = [0, 1, 2, 8, 16, 32, 128][u.int(0, 6)];
    let dir = work_dir("plan");
    write_model(&dir, &model.encode_to_vec(), None);
    if let Some(g) = genai {
        std::fs::write(dir.join("genai_config.json"), g).expect("write genai_config.json");
    }
    let Ok(m) = qins::onnx::Model::load(&dir) else { return Reached::Nothing };
    let Ok(plan) = qins_graph_rewrite::plan::plan(&m, &opts) else { return Reached::Nothing };
    let out = work_dir("plan-out").join("out");
    let ropts =
        qins_graph_rewrite::RewriteOptions { format, group, force: true, fsync: false, kv_v: None, library: None };
    let r = qins_graph_rewrite::rewrite::rewrite(&m, &plan, &ropts, &out, &mut qins_graph_rewrite::NoProgress);
    match r {
        Ok(report) => {
            check_rewritten(&out, &plan, &report).expect("the rewrite's output is consistent");
            Reached::End
        }
        Err(e) => {
            if std::env::var_os("QINS_FUZZ_DEBUG").is_some() {
                eprintln!("rewrite: {e:#}");
            }
            Reached::Parsed
        }
    }
}

fn check_rewritten(
    out: &Path,
    plan: &qins_graph_rewrite::plan::Plan,
    report: &qins_graph_rewrite::report::RewriteReport,
) -> Result<()> {
    let m = qins::onnx::Model::load(out)?;
    let ops = m.graph().node.iter().filter(|n| n.op_type() == "QinsMatMul").count();
    ensure!(ops == plan.targets.len(), "{ops} QinsMatMul nodes for {} targets", plan.targets.len());
    ensure!(report.layers.len() == plan.targets.len(), "a layer report per target");
    Ok(())
}

/// Op types a fuzzed graph is built from.
const OPS: [&str; 8] = ["MatMul", "MatMul", "MatMul", "Sigmoid", "Mul", "GroupQueryAttention", "Concat", "Identity"];
/// Node-name stems: each role the plan knows, and some it does not.
const NAMES: [&str; 12] = [
    "attn/qkv_proj",
    "self_attn/q_proj",
    "self_attn/k_proj",
    "self_attn/v_proj",
    "attn/o_proj",
    "mlp/gate_proj",
    "mlp/up_proj",
    "mlp/gate_up_proj",
    "mlp/down_proj",
    "mlp/act_fn",
    "other",
    "lm_head",
];

/// Builds a graph from the input: nodes drawn from [`OPS`] and named after [`NAMES`], whose
/// inputs are earlier values or new initializers of drawn type and shape (inline data, of
/// the right size or not), plus, sometimes, a `genai_config.json` with drawn head counts.
pub fn graph_from(u: &mut Unstructured) -> (ModelProto, Option<Vec<u8>>) {
    use qins::onnx::build::{attr_int, node, tensor_raw, value_info, Dim};
    use qins::onnx::dtype;
    use qins::onnx::proto::{GraphProto, OperatorSetIdProto};
    let k0 = u.int(1, 40) as i64;
    let mut values = vec![("x".to_string(), k0)];
    let mut nodes = Vec::new();
    let mut inits = Vec::new();
    let n_nodes = u.int(1, 16);
    for i in 0..n_nodes {
        let op = OPS[u.int(0, OPS.len() - 1)];
        let layer = u.int(0, 2);
        let stem = NAMES[u.int(0, NAMES.len() - 1)];
        let name = if stem == "lm_head" {
            "/lm_head/MatMul".to_string()
        } else {
            format!("/model/layers.{layer}/{stem}/{op}")
        };
        let (a, ka) = values[u.int(0, values.len() - 1)].clone();
        let mut inputs = vec![a];
        let mut width = ka;
        match op {
            "MatMul" => {
                let dt = [dtype::FLOAT, dtype::FLOAT, dtype::FLOAT16, dtype::BFLOAT16, dtype::INT8, dtype::INT64]
                    [u.int(0, 5)];
                let n = u.int(1, 48) as i64;
                let mut dims = vec![if u.ratio(9, 10) { ka } else { u.int(0, 40) as i64 }, n];
                if u.ratio(1, 10) {
                    dims.truncate(u.int(0, 1));
                } else if u.ratio(1, 10) {
                    dims.insert(0, u.int(0, 3) as i64);
                }
                let elems = dims.iter().product::<i64>().max(0) as usize;
                // Values from one drawn byte (the input's bytes go to the graph's shape):
                // weights of a trained model's size, or, now and then, any bit pattern.
                let salt = u.byte_or(0) as usize;
                let value = |j: usize| ((j.wrapping_mul(31) ^ salt) % 200) as f32 / 400.0 - 0.25;
                let mut raw: Vec<u8> = match dt {
                    dtype::FLOAT => (0..elems).flat_map(|j| value(j).to_le_bytes()).collect(),
                    dtype::FLOAT16 => (0..elems).flat_map(|j| half::f16::from_f32(value(j)).to_le_bytes()).collect(),
                    dtype::BFLOAT16 => (0..elems).flat_map(|j| half::bf16::from_f32(value(j)).to_le_bytes()).collect(),
                    _ => (0..elems * dtype::bits(dt).unwrap_or(8) as usize / 8).map(|j| (j ^ salt) as u8).collect(),
                };
                if u.ratio(1, 20) {
                    raw.iter_mut().enumerate().for_each(|(j, b)| *b = (j.wrapping_mul(131) ^ salt) as u8);
                }
                if u.ratio(1, 20) {
                    raw.truncate(u.int(0, raw.len()));
                }
                let w = format!("w{i}");
                inits.push(tensor_raw(&w, dt, &dims, raw));
                if u.ratio(1, 20) {
                    // The weight given as A: "both inputs are initializers".
                    inputs[0] = w.clone();
                }
                inputs.push(w);
                width = n;
            }
            "Mul" | "Concat" => {
                let (b, kb) = values[u.int(0, values.len() - 1)].clone();
                inputs.push(b);
                if op == "Concat" {
                    width = ka + kb;
                }
            }
            _ => {}
        }
        let out = format!("v{i}");
        let mut attrs = vec![];
        if op == "GroupQueryAttention" {
            attrs.push(attr_int("num_heads", u.int(0, 6) as i64 - 1));
            attrs.push(attr_int("kv_num_heads", u.int(0, 6) as i64 - 1));
        }
        if op == "Concat" {
            attrs.push(attr_int("axis", -1));
        }
        let ins: Vec<&str> = inputs.iter().map(String::as_str).collect();
        nodes.push(node(
            op,
            if op == "GroupQueryAttention" { "com.microsoft" } else { "" },
            &name,
            &ins,
            &[&out],
            attrs,
        ));
        values.push((out, width));
    }
    let outputs: Vec<_> = values
        .iter()
        .skip(1)
        .filter(|_| u.ratio(1, 3))
        .chain(values.last())
        .map(|(v, w)| value_info(v, dtype::FLOAT, &[Dim::Sym("batch"), Dim::Fixed(*w)]))
        .collect();
    let graph = GraphProto {
        node: nodes,
        initializer: inits,
        input: vec![value_info("x", dtype::FLOAT, &[Dim::Sym("batch"), Dim::Fixed(k0)])],
        output: outputs,
        name: Some("fuzz".into()),
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: Some(10),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(21) }],
        graph: Some(graph),
        ..Default::default()
    };
    let genai = u.bool().then(|| {
        let (h, kv) = (u.int(0, 5) as i64 - 1, u.int(0, 5) as i64 - 1);
        serde_json::to_vec(
            &serde_json::json!({"model": {"decoder": {"num_attention_heads": h, "num_key_value_heads": kv}}}),
        )
        .expect("json")
    });
    (model, genai)
}

/// The op contract: attributes and input shapes drawn from the input; what the contract
/// accepts runs through the CPU kernel on data of exactly the accepted sizes.
pub fn op_inputs(data: &[u8]) -> Reached {
    use qins_provider::cpu::parallel::Sequential;
    use qins_provider::cpu::qins_matmul::{
        qins_matmul_f32_with, qins_matmul_mixed_with, qins_swiglu_with, Options, WeightData, Weights,
    };
    use qins_provider::ops::qins_matmul::{layout_from_attrs, swiglu_from_attr, Act, Node};
    use qins_provider::ort_api::{elem, TensorInfo};
    let mut u = Unstructured::new(data);
    let small = |u: &mut Unstructured| u.int(0, 70) as i64 - 2;
    let attr = |u: &mut Unstructured| if u.ratio(1, 8) { u.i64() } else { small(u) };
    let (k, n) = (attr(&mut u), attr(&mut u));
    let bits = [4, 6, 8, 32, 0, 5, 16, -1][u.int(0, 7)];
    let group = if u.bool() { k } else { attr(&mut u) };
    let Ok(layout) = layout_from_attrs(k, n, bits, group) else { return Reached::Nothing };
    let Ok(swiglu) = swiglu_from_attr(u.int(0, 2) as i64, &layout) else { return Reached::Nothing };
    let act = if u.bool() { Act::F32 } else { Act::F16 };
    let shape = |u: &mut Unstructured, like: &[i64]| -> Vec<i64> {
        if u.ratio(3, 4) {
            like.iter().map(|&d| if u.ratio(1, 16) { attr(u) } else { d }).collect()
        } else {
            (0..u.int(0, 4)).map(|_| attr(u)).collect()
        }
    };
    let elem_of = |u: &mut Unstructured, want: i32| {
        if u.ratio(7, 8) {
            want
        } else {
            [elem::FLOAT, elem::FLOAT16, elem::UINT8][u.int(0, 2)]
        }
    };
    let want_codes = qins_provider::ops::qins_matmul::codes_expectation(&layout);
    let want_scales = qins_provider::ops::qins_matmul::scales_expectation(&layout);
    let a_elem = elem_of(&mut u, act.onnx());
    let m_rows = u.int(0, 3) as i64;
    let a = TensorInfo { elem: a_elem, shape: shape(&mut u, &[1, m_rows, k]) };
    let codes = TensorInfo { elem: elem_of(&mut u, want_codes.elem), shape: shape(&mut u, &want_codes.shape) };
    let scales = TensorInfo { elem: elem_of(&mut u, want_scales.elem), shape: shape(&mut u, &want_scales.shape) };
    let fw = if u.ratio(1, 4) {
        let elem = elem_of(&mut u, act.onnx());
        let nf = u.int(0, 5) as i64;
        Some(TensorInfo { elem, shape: shape(&mut u, &[nf, k]) })
    } else {
        None
    };
    let inputs = if fw.is_some() { 4 } else { 3 + u.int(0, 1) * [0, 2][u.int(0, 1)] };
    let node = Node { name: "fuzz".into(), layout, act, swiglu };
    let Ok(run) = node.check(inputs, &a, &codes, &scales, fw.as_ref()) else { return Reached::Parsed };
    // Accepted: the sizes the contract promises must be safe to index. Small ones only, so
    // each input stays fast.
    let (m, nk) = (run.m, layout.k * layout.n);
    if m > 64 || nk > 1 << 14 || run.nf > 64 {
        return Reached::Parsed;
    }
    let codes_len = want_codes.shape.iter().product::<i64>() as usize;
    let scales_len = want_scales.shape.iter().product::<i64>() as usize;
    let salt = u.byte_or(0) as usize;
    let codes_bytes: Vec<u8> = (0..codes_len).map(|i| (i.wrapping_mul(37) ^ salt) as u8).collect();
    let z: Vec<f32> = codes_bytes.iter().map(|&b| (b as f32 - 128.0) / 128.0).collect();
    let sc16: Vec<half::f16> = (0..scales_len).map(|i| half::f16::from_f32(0.5 + ((i ^ salt) % 8) as f32)).collect();
    let sc32: Vec<f32> = sc16.iter().map(|s| s.to_f32()).collect();
    let wdata = if layout.format == qins::codec::Format::F32 {
        WeightData::F32 { z: &z, scales: &sc32 }
    } else {
        WeightData::Packed { codes: &codes_bytes, scales: &sc16 }
    };
    let w = Weights::new(layout, wdata).expect("weights of the accepted shapes are valid");
    let a_vals: Vec<f32> = (0..m * layout.k).map(|i| (i % 7) as f32 - 3.0).collect();
    let width: usize = run.out_shape.last().copied().unwrap_or(1) as usize;
    let mut y = vec![0f32; m * width];
    let opts = Options::default();
    let r = if swiglu {
        qins_swiglu_with::<f32>(&opts, &Sequential, &a_vals, m, &w, &mut y)
    } else if run.nf > 0 {
        let wf: Vec<f32> = (0..run.nf * layout.k).map(|i| (i % 5) as f32).collect();
        qins_matmul_mixed_with::<f32>(&opts, &Sequential, &a_vals, m, &wf, run.nf, &w, &mut y)
    } else {
        qins_matmul_f32_with(&opts, &Sequential, &a_vals, m, &w, &mut y)
    };
    r.expect("a kernel refused what the contract accepted");
    Reached::End
}

/// The attention op: attributes, input shapes, `total_sequence_length` and `seqlens_k` from
/// the bytes; the contract ([`qins_provider::ops::qins_attention::Node`]), then, on what it
/// accepts (small sizes), the CPU kernel with every `seqlens_k` the input gives. A bad length
/// must be an error, never a panic or an out-of-bounds write; a good one must run.
pub fn attention_inputs(data: &[u8]) -> Reached {
    use qins_provider::cpu::parallel::Sequential;
    use qins_provider::cpu::qins_attention::{attention, Buffers};
    use qins_provider::ops::qins_attention::{Act, Infos, Node};
    use qins_provider::ort_api::{elem, Error, TensorInfo};
    let mut u = Unstructured::new(data);
    let small = |u: &mut Unstructured| u.int(0, 40) as i64 - 2;
    let attr = |u: &mut Unstructured| if u.ratio(1, 10) { u.i64() } else { small(u) };
    let heads = [1i64, 2, 3, 4, 6][u.int(0, 4)];
    let kv = [1i64, 2, 3][u.int(0, 2)];
    let ints: Vec<(&str, i64)> = vec![
        ("num_heads", if u.ratio(1, 8) { attr(&mut u) } else { heads }),
        ("kv_num_heads", if u.ratio(1, 8) { attr(&mut u) } else { kv }),
        ("v_bits", if u.ratio(1, 8) { attr(&mut u) } else { [8, 4][u.int(0, 1)] }),
        ("do_rotary", if u.ratio(1, 8) { attr(&mut u) } else { u.int(0, 1) as i64 }),
        ("rotary_interleaved", u.int(0, 1) as i64),
        ("local_window_size", if u.ratio(1, 4) { attr(&mut u) } else { -1 }),
    ];
    let softcap = if u.ratio(1, 4) { u.int(0, 50) as f32 - 2.0 } else { 0.0 };
    let find = |a: &std::ffi::CStr| ints.iter().find(|(n, _)| n.as_bytes() == a.to_bytes()).map(|(_, v)| *v);
    let node = Node::from_attrs(
        "fuzz".into(),
        Act::F32,
        |a| find(a).ok_or_else(|| Error::invalid("missing")),
        |a, d| Ok(find(a).unwrap_or(d)),
        |a, d| Ok(if a.to_bytes() == b"softcap" { softcap } else { d }),
    );
    let Ok(node) = node else { return Reached::Nothing };
    let (h, kvh) = (node.heads as i64, node.kv_heads as i64);
    let hd = [8i64, 16, 24][u.int(0, 2)];
    let rb = hd * node.v_format.bits() as i64 / 8 + 4;
    let batch = u.int(0, 3) as i64;
    let seq = u.int(0, 9) as i64;
    let past = [0i64, 1, 3, 8, 16][u.int(0, 4)];
    let packed = u.ratio(3, 4);
    let perturb = |u: &mut Unstructured, v: Vec<i64>| -> Vec<i64> {
        if u.ratio(1, 12) {
            v.iter().map(|&d| if u.ratio(1, 3) { attr(u) } else { d }).collect()
        } else {
            v
        }
    };
    let f = elem::FLOAT;
    let ti = |e: i32, s: Vec<i64>| TensorInfo { elem: e, shape: s };
    let width = if packed { (h + 2 * kvh) * hd } else { h * hd };
    let query = ti(f, perturb(&mut u, vec![batch, seq, width]));
    let kvi = ti(f, perturb(&mut u, vec![batch, seq, kvh * hd]));
    let has_past = u.ratio(3, 4);
    let pk = ti(f, perturb(&mut u, vec![batch, kvh, past, hd]));
    let pv = ti(if u.ratio(1, 16) { f } else { elem::UINT8 }, perturb(&mut u, vec![batch, kvh, past, rb]));
    let sk = ti(elem::INT32, perturb(&mut u, vec![batch]));
    let tot = ti(elem::INT32, vec![1]);
    let rot_rows = [0i64, 4, 32, 64][u.int(0, 3)];
    let cos = ti(f, perturb(&mut u, vec![rot_rows, hd / 2]));
    let total =
        if u.ratio(1, 6) { attr(&mut u) as i32 } else { (past + seq) as i32 - u.int(0, 1) as i32 * past as i32 };
    let infos = Infos {
        query: &query,
        key: (!packed).then_some(&kvi),
        value: (!packed).then_some(&kvi),
        past_key: has_past.then_some(&pk),
        past_value: has_past.then_some(&pv),
        seqlens_k: &sk,
        total: &tot,
        cos: (node.rotary.is_some() || u.ratio(1, 8)).then_some(&cos),
        sin: (node.rotary.is_some() || u.ratio(1, 8)).then_some(&cos),
    };
    let Ok(dims) = node.check(&infos, total) else { return Reached::Parsed };
    let numel = |t: &TensorInfo| t.numel().unwrap_or(usize::MAX);
    if numel(&query) > 1 << 14 || dims.present > 64 || dims.batch > 3 || dims.rotary_positions > 4096 {
        return Reached::Parsed;
    }
    // Buffers as the checked shapes say; seqlens_k from the input, anything.
    let seqlens: Vec<i32> = (0..dims.batch)
        .map(|_| if u.ratio(1, 4) { u.i64() as i32 } else { dims.total as i32 - 1 - u.int(0, 2) as i32 })
        .collect();
    let vals = |n: usize, k: usize| -> Vec<f32> { (0..n).map(|i| ((i * 31 + k) % 17) as f32 / 8.0 - 1.0).collect() };
    let q = vals(numel(&query), 1);
    let kv_in = vals(if packed { 0 } else { numel(&kvi) }, 2);
    let past_k = vals(if has_past { numel(&pk) } else { 0 }, 3);
    let mut past_v = vec![0u8; if has_past { numel(&pv) } else { 0 }];
    for row in past_v.chunks_exact_mut(dims.row_bytes) {
        qins::codec::kv::encode_v_row(node.v_format, &vals(dims.head_dim, row.len()), row);
    }
    let rot = vals(if infos.cos.is_some() { numel(&cos) } else { 0 }, 4);
    let groups = dims.batch * node.kv_heads;
    let mut out = vec![0f32; dims.batch * dims.seq * node.heads * dims.head_dim];
    let mut present_k = vec![0f32; groups * dims.present * dims.head_dim];
    let mut present_v = vec![0u8; groups * dims.present * dims.row_bytes];
    let r = attention(
        &node,
        &dims,
        Buffers {
            query: &q,
            key: (!packed).then_some(&kv_in[..]),
            value: (!packed).then_some(&kv_in[..]),
            past_key: has_past.then_some(&past_k[..]),
            past_value: has_past.then_some(&past_v[..]),
            seqlens_k: &seqlens,
            cos: &rot,
            sin: &rot,
            output: &mut out,
            present_key: &mut present_k,
            present_value: &mut present_v,
        },
        &Sequential,
    );
    // Lengths every sequence can have, with rotary caches long enough: it must run.
    let valid = seqlens.iter().enumerate().all(|(b, &s)| dims.lengths(b, s).is_ok())
        && (node.rotary.is_none() || dims.present.max(dims.total) <= dims.rotary_positions);
    if valid {
        r.expect("the kernel refused lengths the contract accepts");
        assert!(out.iter().all(|x| x.is_finite()), "non-finite output from finite inputs");
    }
    Reached::End
}
