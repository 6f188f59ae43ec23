//! Synthetic models with real shapes and random weights, for benchmarks: the graph of a
//! small model built by the onnxruntime-genai builder, grown to full size (more layers,
//! real widths). Nothing here is a trained model; it exists to measure speed and memory.

use anyhow::{anyhow, bail, Context, Result};
use half::f16;
use qins::onnx::build::{tensor_deferred, DEFERRED};
use qins::onnx::proto::{tensor_shape_proto::dimension::Value as DimValue, NodeProto, TensorProto, ValueInfoProto};
use qins::onnx::{dtype, external_ref, save_model, AtomicDir, Model, SaveOptions};
use rayon::prelude::*;
use regex::Regex;
use std::borrow::Cow;
use std::path::Path;

/// Dimensions of a Phi-3-architecture model.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Phi3Config {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub original_max_positions: usize,
}

impl Phi3Config {
    /// Phi-3.5-mini-instruct: 3.8 B parameters.
    pub fn phi35_mini() -> Phi3Config {
        Phi3Config {
            layers: 32,
            hidden: 3072,
            heads: 32,
            kv_heads: 32,
            head_dim: 96,
            intermediate: 8192,
            vocab: 32064,
            max_positions: 131072,
            original_max_positions: 4096,
        }
    }

    /// Shape of an initializer of the builder's layout, by name.
    fn shape_of(&self, name: &str) -> Option<Vec<i64>> {
        let (h, i, v) = (self.hidden as i64, self.intermediate as i64, self.vocab as i64);
        let qkv = ((self.heads + 2 * self.kv_heads) * self.head_dim) as i64;
        let attn = (self.heads * self.head_dim) as i64;
        Some(match name {
            _ if name.ends_with("layernorm.weight") => vec![h],
            "model.embed_tokens.weight" => vec![v, h],
            "lm_head.MatMul.weight" => vec![h, v],
            _ if name.ends_with("qkv_proj.MatMul.weight") => vec![h, qkv],
            _ if name.ends_with("o_proj.MatMul.weight") => vec![attn, h],
            _ if name.ends_with("gate_proj.MatMul.weight") || name.ends_with("up_proj.MatMul.weight") => vec![h, i],
            _ if name.ends_with("down_proj.MatMul.weight") => vec![i, h],
            _ => return None,
        })
    }

    pub fn parameters(&self) -> u64 {
        let (h, i, v) = (self.hidden as u64, self.intermediate as u64, self.vocab as u64);
        let qkv = ((self.heads + 2 * self.kv_heads) * self.head_dim) as u64;
        let attn = (self.heads * self.head_dim) as u64;
        let per_layer = 2 * h + h * qkv + attn * h + 3 * h * i;
        per_layer * self.layers as u64 + 2 * v * h + h
    }
}

/// Rewrites layer indices in a name: `layers.N`, `past_key_values.N`, `present.N`.
fn remap(s: &str, f: &dyn Fn(usize) -> usize) -> String {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"(layers|past_key_values|present)\.(\d+)").unwrap());
    re.replace_all(s, |c: &regex::Captures| format!("{}.{}", &c[1], f(c[2].parse().unwrap()))).into_owned()
}

fn remap_node(n: &NodeProto, f: &dyn Fn(usize) -> usize) -> NodeProto {
    let mut n = n.clone();
    n.name = n.name.map(|s| remap(&s, f));
    n.input = n.input.iter().map(|s| remap(s, f)).collect();
    n.output = n.output.iter().map(|s| remap(s, f)).collect();
    n
}

fn layer_index(name: &str) -> Option<usize> {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"/layers\.(\d+)/").unwrap());
    re.captures(name).map(|c| c[1].parse().unwrap())
}

fn set_dims(v: &mut ValueInfoProto, dims: &[Option<i64>]) {
    use qins::onnx::proto::type_proto::Value;
    if let Some(Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        if let Some(shape) = t.shape.as_mut() {
            for (d, new) in shape.dim.iter_mut().zip(dims) {
                if let Some(x) = new {
                    d.value = Some(DimValue::DimValue(*x));
                }
            }
        }
    }
}

/// Random weights: uniform with the standard deviation `std`, from a per-tensor seed, so
/// a tensor's bytes do not depend on which thread made them.
fn random_f16(n: usize, std: f32, seed: u64) -> Vec<u8> {
    use half::slice::HalfFloatSliceExt;
    let a = std * 3f32.sqrt();
    let mut out = vec![0u8; n * 2];
    out.par_chunks_mut(1 << 17).enumerate().for_each(|(ci, chunk)| {
        let mut s = seed ^ (ci as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        let vals: Vec<f32> = (0..chunk.len() / 2)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
            })
            .collect();
        let mut h = vec![f16::ZERO; vals.len()];
        h.convert_from_f32_slice(&vals);
        for (p, v) in chunk.chunks_exact_mut(2).zip(h) {
            p.copy_from_slice(&v.to_le_bytes());
        }
    });
    out
}

fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Builds a full-size model from the builder's 2-layer fp16 Phi-3 template at `template`.
pub fn synthesize_phi3(template: &Path, out: &Path, cfg: &Phi3Config, force: bool) -> Result<u64> {
    let tpl = Model::load(template).context("load the template model")?;
    let mut proto = tpl.proto.clone();
    let g = proto.graph.as_mut().ok_or_else(|| anyhow!("template has no graph"))?;
    let tpl_layers = g.node.iter().filter_map(|n| layer_index(n.name())).max().unwrap_or(0);
    if tpl_layers < 2 {
        bail!("the template needs at least 2 layers and a final norm");
    }
    let (last, n) = (tpl_layers - 1, cfg.layers);
    // Layer 0 is special (plain norm on the embeddings); later layers repeat the template's
    // layer `last`, whose inputs name the layer before it.
    let mut nodes = Vec::new();
    let old = std::mem::take(&mut g.node);
    let prelude: Vec<_> = old.iter().take_while(|x| layer_index(x.name()).is_none()).cloned().collect();
    let body: Vec<_> = old.iter().skip(prelude.len()).collect();
    nodes.extend(prelude);
    nodes.extend(body.iter().filter(|x| layer_index(x.name()) == Some(0)).map(|x| (*x).clone()));
    let repeat: Vec<_> = body.iter().filter(|x| layer_index(x.name()) == Some(last)).collect();
    for i in 1..n {
        nodes.extend(repeat.iter().map(|x| remap_node(x, &|j| if j == last { i } else { i - 1 })));
    }
    let tail: Vec<_> = body.iter().filter(|x| layer_index(x.name()).is_none_or(|j| j > last)).collect();
    nodes.extend(tail.iter().map(|x| remap_node(x, &|j| if j > last { n } else { n - 1 })));
    let scale = 1.0 / (cfg.head_dim as f32).sqrt();
    for node in &mut nodes {
        let op = node.op_type().to_string();
        for a in &mut node.attribute {
            match (op.as_str(), a.name()) {
                ("GroupQueryAttention", "num_heads") => a.i = Some(cfg.heads as i64),
                ("GroupQueryAttention", "kv_num_heads") => a.i = Some(cfg.kv_heads as i64),
                ("GroupQueryAttention", "scale") => a.f = Some(scale),
                _ => {}
            }
        }
        if op == "If" {
            for a in &mut node.attribute {
                let rows = if a.name() == "then_branch" { cfg.max_positions } else { cfg.original_max_positions };
                let Some(sub) = a.g.as_mut() else { continue };
                for o in &mut sub.output {
                    set_dims(o, &[Some(rows as i64), Some((cfg.head_dim / 2) as i64)]);
                }
                for c in &mut sub.node {
                    let cos = c.output.first().is_some_and(|o| o.starts_with("cos"));
                    if let Some(t) = c.attribute.iter_mut().find_map(|x| x.t.as_mut()) {
                        *t = rope_cache(t, rows, cfg.head_dim / 2, cos);
                    }
                }
            }
        }
    }
    g.node = nodes;

    let past = |kind: &str, i: usize| format!("past_key_values.{i}.{kind}");
    let present = |kind: &str, i: usize| format!("present.{i}.{kind}");
    let grow = |list: &[ValueInfoProto], name: &dyn Fn(&str, usize) -> String| -> Vec<ValueInfoProto> {
        let mut out: Vec<ValueInfoProto> = list.iter().filter(|v| layer_of_io(v.name()).is_none()).cloned().collect();
        for kind in ["key", "value"] {
            let proto_vi = list.iter().find(|v| v.name() == name(kind, 0)).expect("template has layer-0 cache I/O");
            for i in 0..n {
                let mut v = proto_vi.clone();
                v.name = Some(name(kind, i));
                set_dims(&mut v, &[None, Some(cfg.kv_heads as i64)]);
                out.push(v);
            }
        }
        out
    };
    g.input = grow(&g.input, &past);
    g.output = grow(&g.output, &present);
    for o in &mut g.output {
        if o.name() == "logits" {
            set_dims(o, &[None, None, Some(cfg.vocab as i64)]);
        }
    }
    g.value_info.clear();

    let mut inits = Vec::new();
    let names: Vec<String> = g.initializer.iter().map(|t| t.name().to_string()).collect();
    let dt = g.initializer.first().map(|t| t.data_type()).unwrap_or(dtype::FLOAT16);
    if dt != dtype::FLOAT16 {
        bail!("the template must be fp16 (got {})", dtype::name(dt));
    }
    let mut add = |name: String| -> Result<()> {
        let dims = cfg.shape_of(&name).ok_or_else(|| anyhow!("no shape rule for initializer {name}"))?;
        inits.push(tensor_deferred(&name, dt, &dims, &name));
        Ok(())
    };
    for name in &names {
        match layer_of_init(name) {
            None => add(name.clone())?,
            Some(0) => add(name.clone())?,
            Some(j) if j == last => {
                for i in 1..n {
                    add(remap(name, &|_| i))?;
                }
            }
            Some(j) if j > last => add(remap(name, &|_| n))?,
            Some(_) => {}
        }
    }
    g.initializer = inits;

    let out = qins::files::Inputs::new().with(&tpl.dir)?.check_output(out, "output")?;
    let dir = AtomicDir::create(&out, force)?;
    let mut written = 0u64;
    let resolve = &mut |t: &TensorProto| -> Result<Cow<'static, [u8]>> {
        let r = external_ref(t)?.ok_or_else(|| anyhow!("{} not deferred", t.name()))?;
        let name = r.location.strip_prefix(DEFERRED).ok_or_else(|| anyhow!("{}: unexpected data", t.name()))?;
        let numel = t.dims.iter().product::<i64>() as usize;
        let (std, base) = if name.ends_with("layernorm.weight") { (0.05, 1.0) } else { (0.02, 0.0) };
        let mut bytes = random_f16(numel, std, hash(name));
        if base != 0.0 {
            for p in bytes.chunks_exact_mut(2) {
                let v = f16::from_le_bytes([p[0], p[1]]).to_f32() + base;
                p.copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        written += bytes.len() as u64;
        Ok(Cow::Owned(bytes))
    };
    save_model(&mut proto, &dir.path().join("model.onnx"), &SaveOptions::default(), resolve)?;
    let folder = tpl.folder();
    if let Some(cfg_text) = folder.read_optional("genai_config.json", qins::files::MAX_CONFIG_BYTES)? {
        let cfg_text = String::from_utf8(cfg_text).context("genai_config.json is not UTF-8")?;
        std::fs::write(dir.path().join("genai_config.json"), genai_config(&cfg_text, cfg)?)?;
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        if let Some(bytes) = folder.read_optional(f, qins::files::MAX_TOKENIZER_BYTES)? {
            std::fs::write(dir.path().join(f), bytes)?;
        }
    }
    // The mark that lets a later run replace this folder as ours.
    let note = serde_json::json!({"synthesized": cfg.parameters(), "template": tpl.path});
    qins::files::write_json_output(&dir.path().join("qins_synth.json"), &note)?;
    dir.commit()?;
    Ok(written)
}

fn layer_of_io(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("past_key_values.").or_else(|| name.strip_prefix("present."))?;
    rest.split('.').next()?.parse().ok()
}

fn layer_of_init(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// cos/sin of `p * theta^(-2i/d)`: a plain RoPE cache of the right size (the real model's
/// LongRoPE factors only rescale the frequencies; the benchmark needs the bytes).
fn rope_cache(t: &TensorProto, rows: usize, half_dim: usize, cos: bool) -> TensorProto {
    let mut data = Vec::with_capacity(rows * half_dim * 2);
    for p in 0..rows {
        for i in 0..half_dim {
            let f = (p as f64) * 10000f64.powf(-(2.0 * i as f64) / (2 * half_dim) as f64);
            let v = if cos { f.cos() } else { f.sin() };
            data.extend_from_slice(&f16::from_f64(v).to_le_bytes());
        }
    }
    TensorProto {
        dims: vec![rows as i64, half_dim as i64],
        raw_data: Some(data.into()),
        data_location: None,
        external_data: vec![],
        ..t.clone()
    }
}

fn genai_config(text: &str, cfg: &Phi3Config) -> Result<String> {
    let mut v: serde_json::Value = serde_json::from_str(text)?;
    let d = &mut v["model"]["decoder"];
    d["head_size"] = cfg.head_dim.into();
    d["hidden_size"] = cfg.hidden.into();
    d["num_attention_heads"] = cfg.heads.into();
    d["num_hidden_layers"] = cfg.layers.into();
    d["num_key_value_heads"] = cfg.kv_heads.into();
    v["model"]["context_length"] = cfg.max_positions.into();
    v["search"]["max_length"] = cfg.max_positions.into();
    Ok(serde_json::to_string_pretty(&v)?)
}
