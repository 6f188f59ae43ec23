//! Seed inputs of each target: small, valid, and reaching deep (a model that loads and
//! plans, a GGUF that imports), so that mutations start from the interesting paths.
//! `fuzz/seed_corpus.sh` writes them into `fuzz/corpus/<target>/`.

use prost::Message;
use qins::onnx::build::{attr_int, node, tensor_raw, value_info, Dim};
use qins::onnx::dtype;
use qins::onnx::proto::{GraphProto, ModelProto, OperatorSetIdProto};

/// The fuzz targets by name.
pub const TARGETS: [&str; 5] = ["onnx_model", "gguf", "rewrite_plan", "op_inputs", "attention_inputs"];

/// The seeds of one target (of [`TARGETS`]).
pub fn of(target: &str) -> Vec<Vec<u8>> {
    match target {
        "onnx_model" => vec![onnx_model_seed(false), onnx_model_seed(true)],
        "gguf" => vec![gguf_seed(1), gguf_seed(2)],
        "rewrite_plan" => search(crate::rewrite_plan, 6),
        "op_inputs" => search(crate::op_inputs, 6),
        "attention_inputs" => search(crate::attention_inputs, 6),
        _ => panic!("no fuzz target '{target}'"),
    }
}

/// A Llama-shaped layer at hidden 16: packed qkv feeding GroupQueryAttention, o_proj, the
/// SwiGLU gate/up/Sigmoid/Mul/Mul, down; weights external (`[len][onnx][data]`) or inline.
fn llama_layer(external: bool) -> (ModelProto, Vec<u8>) {
    let h = 16i64;
    let mut data = Vec::new();
    let mut inits = Vec::new();
    let mut weight = |name: &str, k: i64, n: i64| {
        let raw: Vec<u8> = (0..k * n).flat_map(|i| (((i * 37 % 101) as f32 - 50.0) / 400.0).to_le_bytes()).collect();
        let mut t = tensor_raw(name, dtype::FLOAT, &[k, n], raw.clone());
        if external {
            use qins::onnx::proto::{tensor_proto::DataLocation, StringStringEntryProto as Kv};
            let kv = |k: &str, v: String| Kv { key: Some(k.into()), value: Some(v) };
            t.raw_data = None;
            t.set_data_location(DataLocation::External);
            t.external_data = vec![
                kv("location", "model.onnx.data".into()),
                kv("offset", data.len().to_string()),
                kv("length", raw.len().to_string()),
            ];
            data.extend(raw);
            data.resize(data.len().next_multiple_of(64), 0);
        }
        inits.push(t);
        name.to_string()
    };
    let p = "/model/layers.0";
    let qkv_w = weight("qkv.weight", h, 3 * h);
    let o_w = weight("o.weight", h, h);
    let g_w = weight("gate.weight", h, 32);
    let u_w = weight("up.weight", h, 32);
    let d_w = weight("down.weight", 32, h);
    let n = |op: &str, name: &str, ins: &[&str], out: &str| node(op, "", name, ins, &[out], vec![]);
    let nodes = vec![
        n("MatMul", &format!("{p}/attn/qkv_proj/MatMul"), &["x", &qkv_w], "qkv"),
        node(
            "GroupQueryAttention",
            "com.microsoft",
            &format!("{p}/attn/GroupQueryAttention"),
            &["qkv"],
            &["attn"],
            vec![attr_int("num_heads", 2), attr_int("kv_num_heads", 1)],
        ),
        n("MatMul", &format!("{p}/attn/o_proj/MatMul"), &["attn", &o_w], "o"),
        n("MatMul", &format!("{p}/mlp/gate_proj/MatMul"), &["o", &g_w], "g"),
        n("Sigmoid", &format!("{p}/mlp/act_fn/Sigmoid"), &["g"], "s"),
        n("Mul", &format!("{p}/mlp/act_fn/Mul"), &["g", "s"], "silu"),
        n("MatMul", &format!("{p}/mlp/up_proj/MatMul"), &["o", &u_w], "u"),
        n("Mul", &format!("{p}/mlp/Mul"), &["silu", "u"], "gu"),
        n("MatMul", &format!("{p}/mlp/down_proj/MatMul"), &["gu", &d_w], "y"),
    ];
    let vi = |name: &str, w: i64| value_info(name, dtype::FLOAT, &[Dim::Sym("batch"), Dim::Sym("seq"), Dim::Fixed(w)]);
    let model = ModelProto {
        ir_version: Some(10),
        opset_import: vec![
            OperatorSetIdProto { domain: Some(String::new()), version: Some(21) },
            OperatorSetIdProto { domain: Some("com.microsoft".into()), version: Some(1) },
        ],
        graph: Some(GraphProto {
            node: nodes,
            initializer: inits,
            input: vec![vi("x", h)],
            output: vec![vi("y", h)],
            name: Some("seed".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    (model, data)
}

fn onnx_model_seed(external: bool) -> Vec<u8> {
    let (model, data) = llama_layer(external);
    let m = model.encode_to_vec();
    let mut v = (m.len() as u32).to_le_bytes().to_vec();
    v.extend(m);
    v.extend(data);
    v
}

/// For the recipe targets, whose inputs are choices rather than a file format: the first
/// `want` pseudo-random byte strings (a fixed sequence) that the target takes all the way,
/// plus an empty one and one that reaches only part way.
fn search(target: fn(&[u8]) -> crate::Reached, want: usize) -> Vec<Vec<u8>> {
    let mut rng = qins::rng::SplitMix64::new(0);
    let mut found = vec![Vec::new()];
    let mut partial = None;
    for _ in 0..20_000 {
        let v: Vec<u8> = (0..96).map(|_| rng.next_u64() as u8).collect();
        match target(&v) {
            crate::Reached::End => found.push(v),
            crate::Reached::Parsed if partial.is_none() => partial = Some(v),
            _ => {}
        }
        if found.len() > want {
            break;
        }
    }
    found.extend(partial);
    found
}

/// A GGUF of a Llama model small enough to fuzz: hidden 32, 2 heads / 1 KV head x 16, ffn
/// 32, a 16-token byte-level BPE vocabulary; Q8_0 embeddings, Q4_1 matrices, F32 norms.
fn gguf_seed(layers: usize) -> Vec<u8> {
    let (h, ffn, vocab) = (32usize, 32usize, 16usize);
    let tokens: Vec<&str> =
        vec!["<unk>", "<s>", "</s>", "a", "b", "c", "Ġ", "ab", "Ġa", "Ġab", "1", "2", "x", "y", "xy", "<|endoftext|>"];
    let types: Vec<i32> = (0..vocab).map(|i| if i < 3 || i == 15 { 3 } else { 1 }).collect();
    let merges = ["a b", "Ġ a", "Ġa b", "x y"];
    let mut w = GgufWriter::default();
    w.str("general.architecture", "llama");
    w.u32("llama.block_count", layers as u32);
    w.u32("llama.context_length", 64);
    w.u32("llama.embedding_length", h as u32);
    w.u32("llama.feed_forward_length", ffn as u32);
    w.u32("llama.attention.head_count", 2);
    w.u32("llama.attention.head_count_kv", 1);
    w.f32("llama.rope.freq_base", 10000.0);
    w.f32("llama.attention.layer_norm_rms_epsilon", 1e-5);
    w.str("tokenizer.ggml.model", "gpt2");
    w.str("tokenizer.ggml.pre", "smollm");
    w.strs("tokenizer.ggml.tokens", &tokens);
    w.i32s("tokenizer.ggml.token_type", &types);
    w.strs("tokenizer.ggml.merges", &merges);
    w.u32("tokenizer.ggml.eos_token_id", 2);
    let norm = |n: usize| -> Vec<u8> { (0..n).flat_map(|i| (1.0f32 + i as f32 / 64.0).to_le_bytes()).collect() };
    w.tensor("token_embd.weight", &[h as u64, vocab as u64], 8, q8_0(h * vocab));
    for l in 0..layers {
        let b = |s: &str| format!("blk.{l}.{s}.weight");
        w.tensor(&b("attn_norm"), &[h as u64], 0, norm(h));
        w.tensor(&b("attn_q"), &[h as u64, h as u64], 3, q4_1(h * h));
        w.tensor(&b("attn_k"), &[h as u64, 16], 3, q4_1(h * 16));
        w.tensor(&b("attn_v"), &[h as u64, 16], 3, q4_1(h * 16));
        w.tensor(&b("attn_output"), &[h as u64, h as u64], 3, q4_1(h * h));
        w.tensor(&b("ffn_norm"), &[h as u64], 0, norm(h));
        w.tensor(&b("ffn_gate"), &[h as u64, ffn as u64], 3, q4_1(h * ffn));
        w.tensor(&b("ffn_up"), &[h as u64, ffn as u64], 3, q4_1(h * ffn));
        w.tensor(&b("ffn_down"), &[ffn as u64, h as u64], 3, q4_1(ffn * h));
    }
    w.tensor("output_norm.weight", &[h as u64], 0, norm(h));
    w.finish()
}

/// Q8_0 blocks (f16 scale, 32 int8) holding a simple ramp.
fn q8_0(n: usize) -> Vec<u8> {
    (0..n / 32)
        .flat_map(|b| {
            let mut blk = half::f16::from_f32(0.01).to_le_bytes().to_vec();
            blk.extend((0..32).map(|i| ((i + b) % 17) as u8));
            blk
        })
        .collect()
}

/// Q4_1 blocks (f16 scale, f16 minimum, 16 bytes of nibbles).
fn q4_1(n: usize) -> Vec<u8> {
    (0..n / 32)
        .flat_map(|b| {
            let mut blk = half::f16::from_f32(0.02).to_le_bytes().to_vec();
            blk.extend(half::f16::from_f32(-0.15).to_le_bytes());
            blk.extend((0..16).map(|i| ((i * 7 + b) % 256) as u8));
            blk
        })
        .collect()
}

/// Writes GGUF version 3: metadata as given, tensors aligned to 32 bytes.
#[derive(Default)]
struct GgufWriter {
    meta: Vec<u8>,
    n_meta: u64,
    infos: Vec<u8>,
    data: Vec<u8>,
    n_tensors: u64,
}

impl GgufWriter {
    fn key(&mut self, k: &str, ty: u32) {
        put_str(&mut self.meta, k);
        self.meta.extend(ty.to_le_bytes());
        self.n_meta += 1;
    }
    fn u32(&mut self, k: &str, v: u32) {
        self.key(k, 4);
        self.meta.extend(v.to_le_bytes());
    }
    fn f32(&mut self, k: &str, v: f32) {
        self.key(k, 6);
        self.meta.extend(v.to_le_bytes());
    }
    fn str(&mut self, k: &str, v: &str) {
        self.key(k, 8);
        put_str(&mut self.meta, v);
    }
    fn strs(&mut self, k: &str, v: &[&str]) {
        self.key(k, 9);
        self.meta.extend(8u32.to_le_bytes());
        self.meta.extend((v.len() as u64).to_le_bytes());
        v.iter().for_each(|s| put_str(&mut self.meta, s));
    }
    fn i32s(&mut self, k: &str, v: &[i32]) {
        self.key(k, 9);
        self.meta.extend(5u32.to_le_bytes());
        self.meta.extend((v.len() as u64).to_le_bytes());
        v.iter().for_each(|x| self.meta.extend(x.to_le_bytes()));
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, bytes: Vec<u8>) {
        put_str(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| self.infos.extend(d.to_le_bytes()));
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        self.data.extend(bytes);
        self.data.resize(self.data.len().next_multiple_of(32), 0);
        self.n_tensors += 1;
    }
    fn finish(self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(self.n_tensors.to_le_bytes());
        b.extend(self.n_meta.to_le_bytes());
        b.extend(self.meta);
        b.extend(self.infos);
        b.resize(b.len().next_multiple_of(32), 0);
        b.extend(self.data);
        b
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}
