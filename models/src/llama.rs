//! Llama-architecture GGUF models as ONNX graphs in the onnxruntime-genai builder's layout.
//!
//! The layout is the builder's fp32 CPU output for Llama (checked node by node against its
//! `llama-gqa-tiny` fixture by the tests): an attention-mask subgraph feeding
//! GroupQueryAttention with fused rotary embedding (cos/sin caches as initializers), one
//! packed `qkv_proj` MatMul per layer, SkipSimplifiedLayerNormalization carrying the
//! residual stream, SiLU as Sigmoid * x, and with tied embeddings the token table read as
//! `Transpose(lm_head.MatMul.weight)`. Matrices are stored `[K, N]` (in, out).
//!
//! The graph is built with deferred initializers; their bytes are produced one tensor at a
//! time while the model is written ([`materialize`]), so the dequantized model is never
//! held in memory whole.

use crate::gguf::{quant::DEQUANTIZABLE, Gguf, TensorInfo};
use anyhow::{anyhow, bail, ensure, Result};
use qins::onnx::build::{
    attr_float, attr_int, attr_ints, attr_tensor, node, tensor_deferred, tensor_i64, value_info, Dim,
};
use qins::onnx::dtype;
use qins::onnx::proto::{
    type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, ValueInfoProto,
};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};

/// Hyperparameters of a Llama model, all read from the GGUF metadata.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
    pub architecture: String,
    pub name: Option<String>,
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub context_length: usize,
    pub rope_theta: f64,
    pub rms_eps: f32,
    pub tied_embeddings: bool,
}

/// Longest context an import accepts. The rotary caches hold `context x head_dim / 2`
/// floats each and are built in memory; real Llama-family models stop at 128k-1M.
pub const MAX_CONTEXT: usize = 1 << 20;
/// Largest rotary cache (elements, each of cos and sin): 1 GiB of f32 apiece.
const MAX_ROPE_CACHE: usize = 1 << 28;

const LAYER_TENSORS: [&str; 9] =
    ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"];

impl LlamaConfig {
    /// Reads the hyperparameters and checks that every tensor the graph needs is present,
    /// of the right shape and a readable type, and that nothing the graph would ignore is.
    pub fn from_gguf(g: &Gguf) -> Result<LlamaConfig> {
        let arch = g.get_str("general.architecture")?;
        if arch != "llama" {
            bail!("architecture '{arch}' is not supported: this importer builds Llama-architecture models ('llama')");
        }
        let key = |k: &str| format!("{arch}.{k}");
        let usize_of = |k: &str| -> Result<usize> {
            let v = g.get_int(&key(k))?;
            usize::try_from(v).ok().filter(|&v| v > 0).ok_or_else(|| anyhow!("metadata '{}' is {v}", key(k)))
        };
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            match g.get(&key(k)) {
                None => Ok(None),
                Some(crate::gguf::Value::Array(_)) => {
                    bail!("metadata '{}' varies per layer; only uniform layers are supported", key(k))
                }
                Some(_) => usize_of(k).map(Some),
            }
        };
        let n_layers = usize_of("block_count")?;
        // Each layer has its tensors in the file: a count past what the file holds is
        // damage, and would otherwise drive the loops and lists below.
        if n_layers > g.tensors.len() / LAYER_TENSORS.len() {
            bail!(
                "metadata '{}' is {n_layers}, but the file holds {} tensors ({} a layer)",
                key("block_count"),
                g.tensors.len(),
                LAYER_TENSORS.len()
            );
        }
        let hidden = usize_of("embedding_length")?;
        let ffn = opt_usize("feed_forward_length")?
            .ok_or_else(|| anyhow!("metadata '{}' is missing", key("feed_forward_length")))?;
        let n_heads = opt_usize("attention.head_count")?
            .ok_or_else(|| anyhow!("metadata '{}' is missing", key("attention.head_count")))?;
        let n_kv_heads = opt_usize("attention.head_count_kv")?.unwrap_or(n_heads);
        ensure!(hidden % n_heads == 0, "hidden size {hidden} is not a multiple of the {n_heads} attention heads");
        ensure!(n_heads % n_kv_heads == 0, "{n_heads} attention heads cannot share {n_kv_heads} KV heads evenly");
        let head_dim = hidden / n_heads;
        ensure!(head_dim % 2 == 0, "head size {head_dim} is odd; rotary embedding needs pairs");
        for k in ["attention.key_length", "attention.value_length", "rope.dimension_count"] {
            if let Some(v) = opt_usize(k)? {
                ensure!(
                    v == head_dim,
                    "metadata '{}' is {v} but the head size is {head_dim}: partial rotary or decoupled head sizes are not supported",
                    key(k)
                );
            }
        }
        if let Some(t) = g.get(&key("rope.scaling.type")) {
            let t = t.as_str().unwrap_or("?");
            ensure!(t == "none", "RoPE scaling '{t}' is not supported (only plain RoPE)");
        }
        if let Some(n) = g.get(&key("expert_count")).and_then(|v| v.as_i64()) {
            ensure!(n == 0, "mixture-of-experts models ({n} experts) are not supported");
        }
        let context_length = usize_of("context_length")?;
        ensure!(
            context_length <= MAX_CONTEXT,
            "metadata '{}' is {context_length}, past the {MAX_CONTEXT} tokens this importer builds rotary caches for",
            key("context_length")
        );
        ensure!(
            context_length.checked_mul(head_dim / 2).is_some_and(|n| n <= MAX_ROPE_CACHE),
            "a {context_length}-token context with head size {head_dim} needs rotary caches past {MAX_ROPE_CACHE} elements"
        );
        let rope_theta = match g.get(&key("rope.freq_base")) {
            Some(_) => g.get_f64(&key("rope.freq_base"))?,
            None => 10000.0,
        };
        ensure!(rope_theta > 1.0 && rope_theta.is_finite(), "RoPE base {rope_theta} is not usable");
        let rms_eps = g.get_f64(&key("attention.layer_norm_rms_epsilon"))? as f32;
        // RMSNorm divides by sqrt(mean + eps): eps must be a small positive number.
        ensure!(
            rms_eps.is_finite() && rms_eps > 0.0 && rms_eps < 1.0,
            "metadata '{}' is {rms_eps}; an RMS norm epsilon must be positive and below 1",
            key("attention.layer_norm_rms_epsilon")
        );

        let embd = need(g, "token_embd.weight")?;
        ensure!(
            embd.dims.len() == 2 && embd.dims[0] == hidden as u64,
            "token_embd.weight has dims {:?}, want [{hidden}, vocab]",
            embd.dims
        );
        let vocab = embd.dims[1] as usize;
        ensure!(vocab > 0, "token_embd.weight has no rows: a model needs a vocabulary");
        if let Some(v) = g.get(&key("vocab_size")) {
            ensure!(
                v.as_i64() == Some(vocab as i64),
                "metadata '{}' is {v:?} but token_embd.weight has {vocab} rows",
                key("vocab_size")
            );
        }
        let tied_embeddings = g.tensor("output.weight").is_none();

        let cfg = LlamaConfig {
            architecture: arch.to_string(),
            name: g.get("general.name").and_then(|v| v.as_str()).map(str::to_string),
            n_layers,
            hidden,
            ffn,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab,
            context_length,
            rope_theta,
            rms_eps,
            tied_embeddings,
        };
        cfg.check_tensors(g)?;
        Ok(cfg)
    }

    fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Expected ggml dims (innermost first) of every tensor the graph reads.
    fn expected_tensors(&self) -> Vec<(String, Vec<u64>)> {
        let (h, f, q, kv, v) =
            (self.hidden as u64, self.ffn as u64, self.q_dim() as u64, self.kv_dim() as u64, self.vocab as u64);
        let mut e = vec![("token_embd.weight".to_string(), vec![h, v]), ("output_norm.weight".into(), vec![h])];
        if !self.tied_embeddings {
            e.push(("output.weight".into(), vec![h, v]));
        }
        for l in 0..self.n_layers {
            for (t, dims) in LAYER_TENSORS.iter().zip([
                vec![h],
                vec![h, q],
                vec![h, kv],
                vec![h, kv],
                vec![q, h],
                vec![h],
                vec![h, f],
                vec![h, f],
                vec![f, h],
            ]) {
                e.push((format!("blk.{l}.{t}.weight"), dims));
            }
        }
        e
    }

    fn check_tensors(&self, g: &Gguf) -> Result<()> {
        let expected = self.expected_tensors();
        for (name, dims) in &expected {
            let t = need(g, name)?;
            ensure!(&t.dims == dims, "tensor '{name}' has dims {:?}, the metadata implies {dims:?}", t.dims);
            ensure!(
                t.ty.can_dequantize(),
                "tensor '{name}' is stored as {}, which this importer cannot read (it reads {DEQUANTIZABLE})",
                t.ty.name()
            );
        }
        let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(t) = g.tensors.iter().find(|t| !known.contains(t.name.as_str())) {
            bail!(
                "tensor '{}' is not part of the plain Llama layout this importer builds (biases, RoPE frequency factors \
                 and extra layers are not supported)",
                t.name
            );
        }
        Ok(())
    }

    /// Parameters of the model (the tied table counted once). Every term was checked
    /// against a tensor in the file, so the sum is bounded by the file; saturating all the
    /// same, since a count is no reason to panic.
    pub fn params(&self) -> u64 {
        let (h, f, q, kv, v) =
            (self.hidden as u64, self.ffn as u64, self.q_dim() as u64, self.kv_dim() as u64, self.vocab as u64);
        let m = u64::saturating_mul;
        let layer = m(2, h)
            .saturating_add(m(h, q.saturating_add(m(2, kv))))
            .saturating_add(m(q, h))
            .saturating_add(m(m(3, h), f));
        m(self.n_layers as u64, layer)
            .saturating_add(h)
            .saturating_add(m(m(v, h), if self.tied_embeddings { 1 } else { 2 }))
    }
}

fn need<'a>(g: &'a Gguf, name: &str) -> Result<&'a TensorInfo> {
    g.tensor(name).ok_or_else(|| anyhow!("tensor '{name}' is missing from the GGUF file"))
}

/// Where an initializer's values come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A GGUF tensor as it is (norm weights, an untied embedding table).
    Plain(String),
    /// A GGUF matrix `[out, in]`, transposed to the MatMul's `[in, out]`.
    Transposed(String),
    /// The packed projection: Q, K and V rows (Q and K un-permuted), then transposed.
    Qkv {
        q: String,
        k: String,
        v: String,
    },
    RopeCos,
    RopeSin,
}

/// A graph whose initializers are deferred, and the source of each.
pub struct Plan {
    pub model: ModelProto,
    pub sources: HashMap<String, Source>,
}

const MASK: &str = "/model/attn_mask_reformat/attn_mask_subgraph";

struct Builder {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    init_vi: Vec<ValueInfoProto>,
    node_vi: Vec<ValueInfoProto>,
    sources: HashMap<String, Source>,
}

impl Builder {
    fn init(&mut self, name: &str, dims: &[i64], src: Source) {
        self.inits.push(tensor_deferred(name, dtype::FLOAT, dims, name));
        let d: Vec<Dim> = dims.iter().map(|&d| Dim::Fixed(d)).collect();
        self.init_vi.push(value_info(name, dtype::FLOAT, &d));
        self.sources.insert(name.to_string(), src);
    }

    fn vi(&mut self, name: &str, elem: i32, dims: &[Dim]) {
        self.node_vi.push(value_info(name, elem, dims));
    }

    /// A `[batch_size, sequence_length, n]` float activation.
    fn act(&mut self, name: &str, n: usize) {
        self.vi(name, dtype::FLOAT, &[Dim::Sym("batch_size"), Dim::Sym("sequence_length"), Dim::Fixed(n as i64)]);
    }

    fn matmul(&mut self, path: &str, input: &str, weight: &str, n: usize) -> String {
        let out = format!("{path}/MatMul/output_0");
        self.nodes.push(node("MatMul", "", &format!("{path}/MatMul"), &[input, weight], &[&out], vec![]));
        self.act(&out, n);
        out
    }
}

/// Builds the graph for `cfg`. Initializers are deferred: [`Plan::sources`] says how to
/// compute each.
pub fn build(cfg: &LlamaConfig) -> Plan {
    let mut b = Builder { nodes: vec![], inits: vec![], init_vi: vec![], node_vi: vec![], sources: HashMap::new() };
    let (h, vocab) = (cfg.hidden, cfg.vocab);
    let qkv_n = cfg.q_dim() + 2 * cfg.kv_dim();

    // Attention-mask subgraph: GroupQueryAttention takes per-batch "past + current length
    // - 1" (int32) and the total sequence length (int32 scalar).
    let one_1 = "/model/constants/INT64/[1]";
    let one = "/model/constants/INT64/1";
    b.nodes.push(node(
        "Constant",
        "",
        "/model/constant_nodes/INT64/[1]",
        &[],
        &[one_1],
        vec![attr_tensor("value", tensor_i64(one_1, &[1], &[1]))],
    ));
    // The builder records this [1]-shaped constant as a scalar; kept so value_info matches.
    b.vi(one_1, dtype::INT64, &[]);
    let reduce = format!("{MASK}/ReduceSum/output_0");
    b.nodes.push(node(
        "ReduceSum",
        "",
        &format!("{MASK}/ReduceSum"),
        &["attention_mask", one_1],
        &[&reduce],
        vec![attr_int("keepdims", 0)],
    ));
    b.vi(&reduce, dtype::INT64, &[Dim::Sym("batch_size")]);
    let sub = format!("{MASK}/Sub/output_0");
    b.nodes.push(node("Sub", "", &format!("{MASK}/Sub"), &[&reduce, one_1], &[&sub], vec![]));
    b.vi(&sub, dtype::INT64, &[Dim::Sym("batch_size")]);
    let seqlens_k = format!("{MASK}/Sub/Cast/output_0");
    b.nodes.push(node(
        "Cast",
        "",
        &format!("{MASK}/Sub/Cast"),
        &[&sub],
        &[&seqlens_k],
        vec![attr_int("to", dtype::INT32 as i64)],
    ));
    b.vi(&seqlens_k, dtype::INT32, &[Dim::Sym("batch_size")]);
    let shape = format!("{MASK}/Shape/output_0");
    b.nodes.push(node("Shape", "", &format!("{MASK}/Shape"), &["attention_mask"], &[&shape], vec![]));
    b.vi(&shape, dtype::INT64, &[Dim::Fixed(2)]);
    b.nodes.push(node(
        "Constant",
        "",
        "/model/constant_nodes/INT64/1",
        &[],
        &[one],
        vec![attr_tensor("value", tensor_i64(one, &[], &[1]))],
    ));
    b.vi(one, dtype::INT64, &[]);
    let gather = format!("{MASK}/Gather/output_0");
    b.nodes.push(node("Gather", "", &format!("{MASK}/Gather"), &[&shape, one], &[&gather], vec![attr_int("axis", 0)]));
    b.vi(&gather, dtype::INT64, &[]);
    let total_len = format!("{MASK}/Gather/Cast/output_0");
    b.nodes.push(node(
        "Cast",
        "",
        &format!("{MASK}/Gather/Cast"),
        &[&gather],
        &[&total_len],
        vec![attr_int("to", dtype::INT32 as i64)],
    ));
    // The builder leaves this one's shape unset (rank unknown), unlike the scalars above.
    let mut v = value_info(&total_len, dtype::INT32, &[]);
    if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        t.shape = None;
    }
    b.node_vi.push(v);

    // Token embedding.
    let lm_head = "lm_head.MatMul.weight";
    let embed_out = "/model/embed_tokens/Gather/output_0";
    if cfg.tied_embeddings {
        let t = "/model/embed_tokens/Transpose/output_0";
        b.nodes.push(node(
            "Transpose",
            "",
            "/model/embed_tokens/Transpose",
            &[lm_head],
            &[t],
            vec![attr_ints("perm", &[1, 0])],
        ));
        b.vi(t, dtype::FLOAT, &[Dim::Fixed(vocab as i64), Dim::Fixed(h as i64)]);
        b.nodes.push(node("Gather", "", "/model/embed_tokens/Gather", &[t, "input_ids"], &[embed_out], vec![]));
    } else {
        let w = "model.embed_tokens.weight";
        b.init(w, &[vocab as i64, h as i64], Source::Plain("token_embd.weight".into()));
        b.nodes.push(node("Gather", "", "/model/embed_tokens/Gather", &[w, "input_ids"], &[embed_out], vec![]));
    }
    b.act(embed_out, h);

    let eps = attr_float("epsilon", cfg.rms_eps);
    let skip_ln =
        |b: &mut Builder, path: &str, residual: &str, x: &str, w: &str, with_residual_out: bool| -> (String, String) {
            let out0 = format!("{path}/output_0");
            let out3 = format!("{path}/output_3");
            let outs: Vec<&str> = if with_residual_out { vec![&out0, "", "", &out3] } else { vec![&out0] };
            b.nodes.push(node(
                "SkipSimplifiedLayerNormalization",
                "com.microsoft",
                &format!("{path}/SkipLayerNorm"),
                &[residual, x, w],
                &outs,
                vec![eps.clone()],
            ));
            b.act(&out0, h);
            if with_residual_out {
                b.act(&out3, h);
            }
            (out0, out3)
        };

    // `residual` is the stream before the pending addition of `pending` (the previous
    // sub-layer's output); SkipSimplifiedLayerNormalization adds them and normalizes.
    let mut residual = embed_out.to_string();
    let mut pending: Option<String> = None;
    for l in 0..cfg.n_layers {
        let p = format!("/model/layers.{l}");
        let wp = format!("model.layers.{l}");
        let blk = format!("blk.{l}");

        let ln_w = format!("{wp}.input_layernorm.weight");
        b.init(&ln_w, &[h as i64], Source::Plain(format!("{blk}.attn_norm.weight")));
        let normed = match pending.take() {
            None => {
                let out = format!("{p}/input_layernorm/output_0");
                b.nodes.push(node(
                    "SimplifiedLayerNormalization",
                    "",
                    &format!("{p}/input_layernorm/LayerNorm"),
                    &[&residual, &ln_w],
                    &[&out],
                    vec![eps.clone(), attr_int("axis", -1), attr_int("stash_type", 1)],
                ));
                b.act(&out, h);
                out
            }
            Some(x) => {
                let (out0, out3) = skip_ln(&mut b, &format!("{p}/input_layernorm"), &residual, &x, &ln_w, true);
                residual = out3;
                out0
            }
        };

        let qkv_w = format!("{wp}.attn.qkv_proj.MatMul.weight");
        b.init(
            &qkv_w,
            &[h as i64, qkv_n as i64],
            Source::Qkv {
                q: format!("{blk}.attn_q.weight"),
                k: format!("{blk}.attn_k.weight"),
                v: format!("{blk}.attn_v.weight"),
            },
        );
        let qkv = b.matmul(&format!("{p}/attn/qkv_proj"), &normed, &qkv_w, qkv_n);
        if l == 0 {
            let half = (cfg.head_dim / 2) as i64;
            b.init("cos_cache", &[cfg.context_length as i64, half], Source::RopeCos);
            b.init("sin_cache", &[cfg.context_length as i64, half], Source::RopeSin);
        }
        let attn_out = format!("{p}/attn/GroupQueryAttention/output_0");
        let (pk, pv) = (format!("past_key_values.{l}.key"), format!("past_key_values.{l}.value"));
        let (ck, cv) = (format!("present.{l}.key"), format!("present.{l}.value"));
        b.nodes.push(node(
            "GroupQueryAttention",
            "com.microsoft",
            &format!("{p}/attn/GroupQueryAttention"),
            &[&qkv, "", "", &pk, &pv, &seqlens_k, &total_len, "cos_cache", "sin_cache", "", "", ""],
            &[&attn_out, &ck, &cv],
            vec![
                attr_int("num_heads", cfg.n_heads as i64),
                attr_int("kv_num_heads", cfg.n_kv_heads as i64),
                attr_float("scale", (1.0 / (cfg.head_dim as f64).sqrt()) as f32),
                attr_int("local_window_size", -1),
                attr_float("softcap", 0.0),
                attr_int("do_rotary", 1),
                attr_int("rotary_interleaved", 0),
            ],
        ));
        b.act(&attn_out, cfg.q_dim());

        let o_w = format!("{wp}.attn.o_proj.MatMul.weight");
        b.init(&o_w, &[cfg.q_dim() as i64, h as i64], Source::Transposed(format!("{blk}.attn_output.weight")));
        let o = b.matmul(&format!("{p}/attn/o_proj"), &attn_out, &o_w, h);

        let post_w = format!("{wp}.post_attention_layernorm.weight");
        b.init(&post_w, &[h as i64], Source::Plain(format!("{blk}.ffn_norm.weight")));
        let (normed, out3) = skip_ln(&mut b, &format!("{p}/post_attention_layernorm"), &residual, &o, &post_w, true);
        residual = out3;

        let f = cfg.ffn;
        let gate_w = format!("{wp}.mlp.gate_proj.MatMul.weight");
        b.init(&gate_w, &[h as i64, f as i64], Source::Transposed(format!("{blk}.ffn_gate.weight")));
        let gate = b.matmul(&format!("{p}/mlp/gate_proj"), &normed, &gate_w, f);
        let up_w = format!("{wp}.mlp.up_proj.MatMul.weight");
        b.init(&up_w, &[h as i64, f as i64], Source::Transposed(format!("{blk}.ffn_up.weight")));
        let up = b.matmul(&format!("{p}/mlp/up_proj"), &normed, &up_w, f);
        let sig = format!("{p}/mlp/act_fn/Sigmoid/output_0");
        b.nodes.push(node("Sigmoid", "", &format!("{p}/mlp/act_fn/Sigmoid"), &[&gate], &[&sig], vec![]));
        b.act(&sig, f);
        let silu = format!("{p}/mlp/act_fn/Mul/output_0");
        b.nodes.push(node("Mul", "", &format!("{p}/mlp/act_fn/Mul"), &[&gate, &sig], &[&silu], vec![]));
        b.act(&silu, f);
        let prod = format!("{p}/mlp/Mul/output_0");
        b.nodes.push(node("Mul", "", &format!("{p}/mlp/Mul"), &[&silu, &up], &[&prod], vec![]));
        b.act(&prod, f);
        let down_w = format!("{wp}.mlp.down_proj.MatMul.weight");
        b.init(&down_w, &[f as i64, h as i64], Source::Transposed(format!("{blk}.ffn_down.weight")));
        pending = Some(b.matmul(&format!("{p}/mlp/down_proj"), &prod, &down_w, h));
    }

    let l = cfg.n_layers;
    let final_w = format!("model.layers.{l}.final_norm_layernorm.weight");
    b.init(&final_w, &[h as i64], Source::Plain("output_norm.weight".into()));
    let x = pending.expect("at least one layer");
    let (normed, _) =
        skip_ln(&mut b, &format!("/model/layers.{l}/final_norm_layernorm"), &residual, &x, &final_w, false);
    let lm_src = if cfg.tied_embeddings { "token_embd.weight" } else { "output.weight" };
    b.init(lm_head, &[h as i64, vocab as i64], Source::Transposed(lm_src.into()));
    b.nodes.push(node("MatMul", "", "/lm_head/MatMul", &[&normed, lm_head], &["logits"], vec![]));

    let kv = cfg.n_kv_heads as i64;
    let cache = |name: String, seq: &str| {
        value_info(
            &name,
            dtype::FLOAT,
            &[Dim::Sym("batch_size"), Dim::Fixed(kv), Dim::Sym(seq), Dim::Sym("kv_cache_dim")],
        )
    };
    let mut input = vec![
        value_info("input_ids", dtype::INT64, &[Dim::Sym("batch_size"), Dim::Sym("sequence_length")]),
        value_info("attention_mask", dtype::INT64, &[Dim::Sym("batch_size"), Dim::Sym("total_sequence_length")]),
    ];
    let mut output = vec![value_info(
        "logits",
        dtype::FLOAT,
        &[Dim::Sym("batch_size"), Dim::Sym("sequence_length"), Dim::Fixed(vocab as i64)],
    )];
    for kind in ["key", "value"] {
        for l in 0..cfg.n_layers {
            input.push(cache(format!("past_key_values.{l}.{kind}"), "past_sequence_length"));
            output.push(cache(format!("present.{l}.{kind}"), "total_sequence_length"));
        }
    }

    let mut value_info = b.init_vi;
    value_info.extend(b.node_vi);
    let graph = GraphProto {
        node: b.nodes,
        name: Some("main_graph".into()),
        initializer: b.inits,
        input,
        output,
        value_info,
        ..Default::default()
    };
    let opset = |domain: &str, version| OperatorSetIdProto { domain: Some(domain.into()), version: Some(version) };
    let model = ModelProto {
        ir_version: Some(10),
        opset_import: vec![opset("", 22), opset("com.microsoft", 1)],
        producer_name: Some("qins-models".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(graph),
        ..Default::default()
    };
    Plan { model, sources: b.sources }
}

/// The values of one initializer, row-major in its ONNX shape.
pub fn materialize(g: &Gguf, cfg: &LlamaConfig, src: &Source) -> Result<Vec<f32>> {
    let t = |name: &str| need(g, name);
    Ok(match src {
        Source::Plain(name) => g.dequantize(t(name)?)?,
        Source::Transposed(name) => {
            let ti = t(name)?;
            let (rows, cols) = matrix_dims(ti)?;
            transpose(&g.dequantize(ti)?, rows, cols)
        }
        Source::Qkv { q, k, v } => {
            let (tq, tk, tv) = (t(q)?, t(k)?, t(v)?);
            let cols = cfg.hidden;
            let mut rows = unpermute_rows(&g.dequantize(tq)?, cfg.q_dim(), cols, cfg.n_heads);
            rows.extend(unpermute_rows(&g.dequantize(tk)?, cfg.kv_dim(), cols, cfg.n_kv_heads));
            rows.extend(g.dequantize(tv)?);
            transpose(&rows, cfg.q_dim() + 2 * cfg.kv_dim(), cols)
        }
        Source::RopeCos => rope_caches(cfg.rope_theta, cfg.head_dim, cfg.context_length).0,
        Source::RopeSin => rope_caches(cfg.rope_theta, cfg.head_dim, cfg.context_length).1,
    })
}

fn matrix_dims(t: &TensorInfo) -> Result<(usize, usize)> {
    match t.dims[..] {
        [cols, rows] => Ok((rows as usize, cols as usize)),
        _ => bail!("tensor '{}' is not a matrix ({:?})", t.name, t.dims),
    }
}

/// Undoes llama.cpp's reordering of Q and K rows. Its converter permutes each head's rows
/// from Hugging Face's "first half, second half" rotary layout to interleaved pairs
/// (`reshape(n_head, 2, hd/2, cols).swapaxes(1, 2)`); GroupQueryAttention with
/// `rotary_interleaved = 0` wants the halves back, so HF row `(head, s, i)` is GGUF row
/// `(head, i, s)`.
pub fn unpermute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    assert_eq!(w.len(), rows * cols);
    assert_eq!(rows % (2 * n_head), 0, "rows must split into heads of pairs");
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(cols).enumerate().for_each(|(r, dst)| {
        let (head, within) = (r / hd, r % hd);
        let (s, i) = (within / half, within % half);
        let src = head * hd + 2 * i + s;
        dst.copy_from_slice(&w[src * cols..(src + 1) * cols]);
    });
    out
}

/// `[rows, cols]` row-major to `[cols, rows]`.
pub fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(w.len(), rows * cols);
    if w.is_empty() {
        return Vec::new();
    }
    // Blocks of output rows so each pass over an input row reads a contiguous run.
    const B: usize = 32;
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(B * rows).enumerate().for_each(|(blk, dst)| {
        let c0 = blk * B;
        let nc = dst.len() / rows;
        for r in 0..rows {
            let src = &w[r * cols + c0..r * cols + c0 + nc];
            for (j, &v) in src.iter().enumerate() {
                dst[j * rows + r] = v;
            }
        }
    });
    out
}

/// The builder's rotary caches, `[max_position, head_dim / 2]` each.
///
/// The builder (and Hugging Face's Llama at run time) computes these in float32 torch:
/// `inv_freq = 1 / theta ** (arange(0, d, 2) / d)` and `pos * inv_freq`, each step rounded
/// to f32. Replaying those roundings (with the power and cos/sin themselves evaluated in
/// f64) reproduces the builder's caches to 6e-8; evaluating everything in f64 instead
/// would move the angles at position 8191 by ~1e-4, a real difference from the reference.
pub fn rope_caches(theta: f64, head_dim: usize, max_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| {
            let e = (2 * i) as f32 / head_dim as f32;
            1.0f32 / (theta.powf(e as f64) as f32)
        })
        .collect();
    let mut cos = vec![0f32; max_pos * half];
    let mut sin = vec![0f32; max_pos * half];
    cos.par_chunks_mut(half).zip(sin.par_chunks_mut(half)).enumerate().for_each(|(p, (c, s))| {
        for i in 0..half {
            let a = (p as f32 * inv[i]) as f64;
            c[i] = a.cos() as f32;
            s[i] = a.sin() as f32;
        }
    });
    (cos, sin)
}

/// Counts of GGUF tensor types, for the report.
pub fn type_counts(g: &Gguf) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for t in &g.tensors {
        *m.entry(t.ty.name().to_string()).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's converter direction (`convert_hf_to_gguf.py`'s `permute`).
    fn permute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let hd = rows / n_head;
        let half = hd / 2;
        let mut out = vec![0f32; rows * cols];
        // reshape(n_head, 2, half, cols).swapaxes(1, 2): GGUF row (h, i, s) = HF row (h, s, i).
        for h in 0..n_head {
            for i in 0..half {
                for s in 0..2 {
                    let dst = h * hd + i * 2 + s;
                    let src = h * hd + s * half + i;
                    out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_by_hand() {
        // 2 heads of 4 rows, one column: GGUF rows hold HF rows in the order
        // (h0: 0, 2, 1, 3), (h1: 4, 6, 5, 7).
        let gguf = [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0];
        assert_eq!(unpermute_rows(&gguf, 8, 1, 2), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        // One head of 6 rows: GGUF order (0, 3, 1, 4, 2, 5).
        let gguf = [0.0, 3.0, 1.0, 4.0, 2.0, 5.0];
        assert_eq!(unpermute_rows(&gguf, 6, 1, 1), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn unpermute_inverts_the_converter() {
        for (rows, cols, heads) in [(576, 5, 9), (192, 3, 3), (64, 7, 4), (32, 2, 2)] {
            let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            assert_eq!(unpermute_rows(&permute_rows(&w, rows, cols, heads), rows, cols, heads), w);
        }
    }

    #[test]
    fn transpose_small_and_odd() {
        let w: Vec<f32> = (0..6).map(|i| i as f32).collect();
        assert_eq!(transpose(&w, 2, 3), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let (r, c) = (37, 101);
        let w: Vec<f32> = (0..r * c).map(|i| i as f32).collect();
        let t = transpose(&w, r, c);
        for i in 0..r {
            for j in 0..c {
                assert_eq!(t[j * r + i], w[i * c + j]);
            }
        }
    }

    #[test]
    fn rope_caches_match_the_builder() {
        // Values read from the builder's llama-gqa-tiny fixture (theta 1e5, head 16).
        let (cos, sin) = rope_caches(1e5, 16, 8192);
        let at = |v: &Vec<f32>, p: usize, i: usize| v[p * 8 + i];
        assert_eq!(at(&cos, 0, 0), 1.0);
        assert_eq!(at(&sin, 0, 3), 0.0);
        assert_eq!(at(&cos, 1, 0), 0.540_302_3);
        assert_eq!(at(&sin, 1, 0), 0.841_470_96);
        assert_eq!(at(&sin, 1, 7), 4.216_965_3e-5);
        let samples: [(usize, usize, f32, f32); 12] = [
            (17, 1, -0.629_611_97, -0.776_909_77),
            (100, 2, 0.790_131_87, -0.612_936_9),
            (1000, 1, -0.052_861_076, -0.998_601_85),
            (4097, 3, -0.336_779_9, -0.941_583_4),
            (5000, 0, 0.154_668_4, -0.987_966_4),
            (6143, 2, 0.991_699_6, -0.128_576_41),
            (8000, 1, 0.911_826_3, -0.410_576_13),
            (8191, 0, -0.646_390_5, -0.763_006_8),
            (8191, 1, 0.631_096_84, 0.775_704),
            (8191, 4, 0.718_274_9, 0.695_759_4),
            (7777, 6, 0.186_725_91, 0.982_412_04),
            (3000, 7, 0.992_008_4, 0.126_171_78),
        ];
        for (p, i, c, s) in samples {
            assert!((at(&cos, p, i) - c).abs() <= 1.2e-7, "cos[{p}][{i}] {} vs {c}", at(&cos, p, i));
            assert!((at(&sin, p, i) - s).abs() <= 1.2e-7, "sin[{p}][{i}] {} vs {s}", at(&sin, p, i));
        }
    }
}
