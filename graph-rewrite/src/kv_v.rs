//! `--kv-v q8|q4`: every `com.microsoft.GroupQueryAttention` becomes a
//! `com.qins.QinsGroupQueryAttention` whose V cache holds QINS rows (`qins::codec::kv`,
//! docs/FORMAT.md), and each layer's `past_key_values.N.value` / `present.N.value` becomes
//! uint8 `[batch, kv_heads, seq, row_bytes]`, so the graph's I/O says what the cache holds.
//! Keys, weights and everything else are untouched.

use anyhow::{anyhow, bail, Result};
use qins::codec::kv::v_row_bytes;
use qins::codec::Format;
use qins::onnx::proto::tensor_shape_proto::dimension::Value as DimValue;
use qins::onnx::proto::type_proto::Value as TypeValue;
use qins::onnx::proto::{AttributeProto, ModelProto, NodeProto, ValueInfoProto};
use qins::onnx::{dtype, Model};
use serde::Serialize;

pub const OP: &str = "QinsGroupQueryAttention";

/// What the pass did, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct KvVReport {
    pub format: String,
    pub nodes: usize,
    pub head_dim: usize,
    pub kv_heads: usize,
    /// Bytes of one V row (one position of one KV head).
    pub row_bytes: usize,
    /// K + V cache bytes per token (all layers) before and after, in the cache's float type
    /// for K (and V before).
    pub kv_bytes_per_token_before: usize,
    pub kv_bytes_per_token_after: usize,
}

/// GroupQueryAttention attributes the op carries over, and those it takes only at their
/// default (anything else is refused by name: a model must not silently change meaning).
const CARRIED: &[&str] =
    &["num_heads", "kv_num_heads", "scale", "softcap", "do_rotary", "rotary_interleaved", "local_window_size"];
const DEFAULT_ONLY: &[&str] = &["smooth_softmax", "qk_output", "sliding_window_cache", "kv_cache_bit_width"];
/// Inputs past `sin_cache` (position_ids, attention_bias, head_sink, k_scale, v_scale,
/// q_norm_weight, k_norm_weight), by index, for error messages.
const EXTRA_INPUTS: &[&str] =
    &["position_ids", "attention_bias", "head_sink", "k_scale", "v_scale", "q_norm_weight", "k_norm_weight"];

/// The model's head size: the past key's last dimension where it is fixed, else
/// genai_config.json's `head_size`.
pub fn head_dim(model: &Model) -> Result<usize> {
    let graph = model.proto.graph.as_ref().ok_or_else(|| anyhow!("model has no graph"))?;
    if let Some(d) = graph.input.iter().find(|i| i.name() == "past_key_values.0.key").and_then(|i| fixed_dim(i, 3)) {
        return Ok(d);
    }
    let text = model
        .folder()
        .read_optional("genai_config.json", qins::files::MAX_CONFIG_BYTES)?
        .ok_or_else(|| anyhow!("--kv-v: the head size is not in the graph and there is no genai_config.json"))?;
    let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| anyhow!("genai_config.json: {e}"))?;
    v["model"]["decoder"]["head_size"]
        .as_u64()
        .map(|d| d as usize)
        .ok_or_else(|| anyhow!("--kv-v: genai_config.json has no model.decoder.head_size"))
}

fn fixed_dim(v: &ValueInfoProto, i: usize) -> Option<usize> {
    let Some(TypeValue::TensorType(t)) = v.r#type.as_ref()?.value.as_ref() else { return None };
    match t.shape.as_ref()?.dim.get(i)?.value.as_ref()? {
        DimValue::DimValue(d) if *d > 0 => Some(*d as usize),
        _ => None,
    }
}

fn elem_type(v: &ValueInfoProto) -> Option<i32> {
    match v.r#type.as_ref()?.value.as_ref()? {
        TypeValue::TensorType(t) => t.elem_type,
        _ => None,
    }
}

/// Rewrites the attention of `proto` (whose original is `model`) for a V cache in `format`.
pub fn apply(proto: &mut ModelProto, model: &Model, format: Format) -> Result<KvVReport> {
    let hd = head_dim(model)?;
    let rb = v_row_bytes(format, hd).ok_or_else(|| {
        anyhow!("--kv-v {format}: head size {hd} is not supported (a multiple of 8 up to 512; q8 or q4)")
    })?;
    let graph = proto.graph.as_mut().ok_or_else(|| anyhow!("model has no graph"))?;
    let mut nodes = 0;
    let mut kv_heads = 0;
    let mut caches: Vec<(String, String)> = Vec::new();
    for n in graph.node.iter_mut().filter(|n| n.op_type() == "GroupQueryAttention") {
        let what = format!("GroupQueryAttention node '{}'", n.name());
        if n.domain() != "com.microsoft" {
            bail!("{what} is in domain '{}', not com.microsoft", n.domain());
        }
        convert_node(n, format).map_err(|e| anyhow!("--kv-v: {what}: {e}"))?;
        let kvh = n.attribute.iter().find(|a| a.name() == "kv_num_heads").and_then(|a| a.i).unwrap_or(0);
        kv_heads = kvh as usize;
        let past = n.input.get(4).cloned().unwrap_or_default();
        let present = n.output.get(2).cloned().unwrap_or_default();
        if past.is_empty() || present.is_empty() {
            bail!("--kv-v: {what} has no past or present value (a model without a KV cache)");
        }
        caches.push((past, present));
        nodes += 1;
    }
    if nodes == 0 {
        bail!("--kv-v: the model has no GroupQueryAttention node (the onnxruntime-genai builder's attention)");
    }
    // The caches' I/O: uint8 rows of `rb` bytes, so every runtime allocates them as they are.
    let mut float_bytes = 0;
    for (past, present) in &caches {
        for (list, name) in [(&mut graph.input, past), (&mut graph.output, present)] {
            let v = list.iter_mut().find(|v| v.name() == name).ok_or_else(|| {
                anyhow!("--kv-v: '{name}' is not a graph input/output; the V cache must be the model's I/O")
            })?;
            float_bytes = match elem_type(v) {
                Some(dtype::FLOAT) => 4,
                Some(dtype::FLOAT16) => 2,
                t => bail!("--kv-v: '{name}' has element type {t:?}; a float or float16 cache is expected"),
            };
            set_value_cache(v, rb)?;
        }
    }
    // value_info entries for the caches would contradict the new types.
    let names: std::collections::HashSet<&str> = caches.iter().flat_map(|(a, b)| [a.as_str(), b.as_str()]).collect();
    graph.value_info.retain(|v| !names.contains(v.name()));
    add_opset(proto);
    let per_layer_k = kv_heads * hd * float_bytes;
    Ok(KvVReport {
        format: format.name().into(),
        nodes,
        head_dim: hd,
        kv_heads,
        row_bytes: rb,
        kv_bytes_per_token_before: nodes * 2 * per_layer_k,
        kv_bytes_per_token_after: nodes * (per_layer_k + kv_heads * rb),
    })
}

fn add_opset(proto: &mut ModelProto) {
    use qins::onnx::proto::OperatorSetIdProto;
    let d = qins::onnx::QINS_DOMAIN;
    if !proto.opset_import.iter().any(|o| o.domain() == d) {
        proto.opset_import.push(OperatorSetIdProto { domain: Some(d.into()), version: Some(qins::onnx::QINS_OPSET) });
    }
}

/// `[batch, kv_heads, seq, head_dim]` float becomes `[batch, kv_heads, seq, rb]` uint8.
fn set_value_cache(v: &mut ValueInfoProto, rb: usize) -> Result<()> {
    use qins::onnx::proto::tensor_shape_proto::Dimension;
    let name = v.name().to_string();
    let Some(TypeValue::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) else {
        bail!("--kv-v: '{name}' is not a tensor");
    };
    let shape = t.shape.as_mut().ok_or_else(|| anyhow!("--kv-v: '{name}' has no shape"))?;
    if shape.dim.len() != 4 {
        bail!("--kv-v: '{name}' has rank {}, expected [batch, kv_heads, seq, head_size]", shape.dim.len());
    }
    t.elem_type = Some(dtype::UINT8);
    shape.dim[3] = Dimension { value: Some(DimValue::DimValue(rb as i64)), ..Default::default() };
    Ok(())
}

fn convert_node(n: &mut NodeProto, format: Format) -> Result<()> {
    for a in &n.attribute {
        let name = a.name();
        if CARRIED.contains(&name) {
            continue;
        }
        let default = DEFAULT_ONLY.contains(&name) && a.i.unwrap_or(0) == 0;
        let quant_none = matches!(name, "k_quant_type" | "v_quant_type")
            && a.s.as_deref().map(|s| s.eq_ignore_ascii_case(b"NONE")).unwrap_or(true);
        if !(default || quant_none) {
            bail!("attribute '{name}' is not supported by {OP} (a quantized or special attention)");
        }
    }
    for (i, extra) in EXTRA_INPUTS.iter().enumerate() {
        if n.input.get(9 + i).is_some_and(|s| !s.is_empty()) {
            bail!("input {} ({extra}) is not supported by {OP}", 9 + i);
        }
    }
    if n.output.get(3).is_some_and(|s| !s.is_empty()) {
        bail!("output 3 (output_qk) is not supported by {OP}");
    }
    n.input.truncate(9);
    n.output.truncate(3);
    n.attribute.retain(|a| CARRIED.contains(&a.name()));
    n.attribute.push(AttributeProto {
        name: Some("v_bits".into()),
        r#type: Some(qins::onnx::proto::attribute_proto::AttributeType::Int as i32),
        i: Some(format.bits() as i64),
        ..Default::default()
    });
    n.op_type = Some(OP.into());
    n.domain = Some(qins::onnx::QINS_DOMAIN.into());
    if let Some(name) = n.name.as_mut() {
        name.push_str("_QINS_KV");
    }
    Ok(())
}

/// A `--kv-v` value: the V rows' format, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VCache(pub Option<Format>);

/// `--kv-v` values: q8, q4 or none.
pub fn parse(s: &str) -> Result<VCache, String> {
    match s.to_ascii_lowercase().as_str() {
        "none" | "off" => Ok(VCache(None)),
        "q8" | "8" => Ok(VCache(Some(Format::Q8))),
        "q4" | "4" => Ok(VCache(Some(Format::Q4))),
        _ => Err(format!("unknown V cache format '{s}': q8, q4 or none")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_values() {
        assert_eq!(parse("q8"), Ok(VCache(Some(Format::Q8))));
        assert_eq!(parse("Q4"), Ok(VCache(Some(Format::Q4))));
        assert_eq!(parse("none"), Ok(VCache(None)));
        assert!(parse("q6").is_err() && parse("").is_err());
    }

    fn gqa(attrs: Vec<AttributeProto>, inputs: usize) -> NodeProto {
        let mut input: Vec<String> = (0..inputs).map(|i| format!("in{i}")).collect();
        input[1] = String::new();
        input[2] = String::new();
        NodeProto {
            op_type: Some("GroupQueryAttention".into()),
            domain: Some("com.microsoft".into()),
            name: Some("attn".into()),
            input,
            output: vec!["o".into(), "pk".into(), "pv".into()],
            attribute: attrs,
            ..Default::default()
        }
    }

    fn int(name: &str, v: i64) -> AttributeProto {
        qins::onnx::build::attr_int(name, v)
    }

    #[test]
    fn nodes_convert_or_are_refused_by_name() {
        let mut n =
            gqa(vec![int("num_heads", 9), int("kv_num_heads", 3), int("do_rotary", 1), int("smooth_softmax", 0)], 12);
        n.input[9] = String::new();
        n.input[10] = String::new();
        n.input[11] = String::new();
        convert_node(&mut n, Format::Q8).unwrap();
        assert_eq!((n.op_type(), n.domain(), n.input.len()), (OP, "com.qins", 9));
        assert!(n.attribute.iter().any(|a| a.name() == "v_bits" && a.i == Some(8)));
        assert!(!n.attribute.iter().any(|a| a.name() == "smooth_softmax"));
        for (attrs, inputs, why) in [
            (vec![int("smooth_softmax", 1)], 9, "smooth_softmax"),
            (vec![int("kv_cache_bit_width", 8)], 9, "kv_cache_bit_width"),
            (vec![int("mystery", 0)], 9, "mystery"),
            (vec![], 10, "position_ids"),
            (vec![], 14, "v_scale"),
        ] {
            let mut n = gqa(attrs, inputs);
            if inputs == 14 {
                // Only v_scale (input 13) given among the extra inputs.
                n.input[9..13].iter_mut().for_each(|s| s.clear());
            }
            let e = convert_node(&mut n, Format::Q8).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }
}
