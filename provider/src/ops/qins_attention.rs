//! `com.qins.QinsGroupQueryAttention` (opset 1): ONNX Runtime's `GroupQueryAttention` with the
//! V cache stored as QINS codes, one scale per row (`qins::codec::kv`, docs/FORMAT.md).
//!
//! This module is the op's contract, independent of where it runs: attributes and their
//! ranges, the types and shapes the inputs must have, the output shapes, and what each run
//! means (first prompt, continued prompt, token generation). Kernels call
//! [`Node::from_info`] when ORT creates them and [`Node::begin`] on every run.
//!
//! Inputs, as the onnxruntime-genai builder feeds `GroupQueryAttention` (T = float or float16):
//! 0 `query` T `[B, S, (H + 2 KVH) D]` (packed Q, K, V) or `[B, S, H D]`; 1 `key`, 2 `value`
//! T `[B, S, KVH D]` (both absent when packed); 3 `past_key` T `[B, KVH, P, D]`; 4
//! `past_value` uint8 `[B, KVH, P, R]` (R = the V row's bytes); 5 `seqlens_k` int32 `[B]`
//! (each sequence's total length - 1); 6 `total_sequence_length` int32 (one element); 7
//! `cos_cache`, 8 `sin_cache` T `[max_position, rotary_dim / 2]`.
//! Outputs: 0 `output` T `[B, S, H D]`; 1 `present_key` T `[B, KVH, P', D]`; 2
//! `present_value` uint8 `[B, KVH, P', R]` with `P' = max(total_sequence_length, P)`. Past and
//! present may be one buffer bound as both (then `P' = P` and only the new rows are written).

use std::ffi::CStr;

use ort_sys::ONNXTensorElementDataType as T;
use qins::codec::kv::{v_row_bytes, MAX_HEAD_DIM};
use qins::codec::Format;

pub use super::qins_matmul::Act;
use crate::ort_api::custom_op::{Kernel, OpSpec};
use crate::ort_api::{elem, Error, KernelCtx, KernelInfo, Result, Tensor, TensorInfo};

pub use super::DOMAIN;
pub const OP_NAME: &CStr = c"QinsGroupQueryAttention";
pub const OPSET: i32 = 1;

/// Largest head count, batch, and sequence length (query or cache) a node may be run with:
/// far beyond any model, and small enough that every size derived from them fits an i64.
pub const MAX_HEADS: usize = 1 << 12;
pub const MAX_LEN: usize = 1 << 24;

/// One node's attributes, read and validated when ORT creates its kernel.
#[derive(Clone, Debug)]
pub struct Node {
    /// For error messages: ORT's node name (may be empty).
    pub name: String,
    pub act: Act,
    pub heads: usize,
    pub kv_heads: usize,
    /// The softmax scale; 0 means `1 / sqrt(D)`.
    pub scale: f32,
    /// `softcap > 0`: scores become `softcap * tanh(score / softcap)` before the softmax.
    pub softcap: f32,
    pub rotary: Option<Rotary>,
    /// `local_window_size > 0`: each position sees itself and this many before it.
    pub window: Option<usize>,
    /// The V rows' format (attribute `v_bits`: 8 or 4).
    pub v_format: Format,
}

/// `do_rotary = 1`: rotary embedding of Q and K from the cos/sin caches, at each token's
/// position, in the model's type (as GroupQueryAttention does it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotary {
    /// `rotary_interleaved = 0`: element `i` pairs with `i + rotary_dim / 2`.
    Halves,
    /// `rotary_interleaved = 1`: elements `2i` and `2i + 1` pair.
    Interleaved,
}

impl Node {
    pub fn from_info(info: &KernelInfo, act: Act) -> Result<Node> {
        let name = info.node_name().unwrap_or_default();
        Node::from_attrs(
            name.clone(),
            act,
            |a| info.attr_i64(a),
            |a, d| info.attr_i64_or(a, d),
            |a, d| info.attr_f32_or(a, d),
        )
        .map_err(|e| e.context(format!("QinsGroupQueryAttention node '{name}'")))
    }

    /// [`Node::from_info`] over attribute getters (unit-testable without ORT).
    pub fn from_attrs(
        name: String,
        act: Act,
        int: impl Fn(&CStr) -> Result<i64>,
        int_or: impl Fn(&CStr, i64) -> Result<i64>,
        float_or: impl Fn(&CStr, f32) -> Result<f32>,
    ) -> Result<Node> {
        let heads = int(c"num_heads")?;
        let kv_heads = int(c"kv_num_heads")?;
        let range = 1..=MAX_HEADS as i64;
        if !range.contains(&heads) || !range.contains(&kv_heads) || heads % kv_heads != 0 {
            return Err(Error::invalid(format!(
                "num_heads={heads} and kv_num_heads={kv_heads} must be in [1, {MAX_HEADS}], num_heads a multiple of kv_num_heads"
            )));
        }
        let scale = float_or(c"scale", 0.0)?;
        if !scale.is_finite() || scale < 0.0 {
            return Err(Error::invalid(format!(
                "attribute scale={scale} must be finite and >= 0 (0: 1/sqrt(head size))"
            )));
        }
        let softcap = float_or(c"softcap", 0.0)?;
        if !softcap.is_finite() || softcap < 0.0 {
            return Err(Error::invalid(format!("attribute softcap={softcap} must be finite and >= 0 (0: off)")));
        }
        let bool_attr = |a: &CStr| -> Result<bool> {
            match int_or(a, 0)? {
                0 => Ok(false),
                1 => Ok(true),
                v => Err(Error::invalid(format!("attribute {}={v} must be 0 or 1", a.to_string_lossy()))),
            }
        };
        let rotary = match (bool_attr(c"do_rotary")?, bool_attr(c"rotary_interleaved")?) {
            (false, _) => None,
            (true, false) => Some(Rotary::Halves),
            (true, true) => Some(Rotary::Interleaved),
        };
        let window = match int_or(c"local_window_size", -1)? {
            -1 => None,
            w if (1..=MAX_LEN as i64).contains(&w) => Some(w as usize),
            w => {
                return Err(Error::invalid(format!(
                    "attribute local_window_size={w} must be -1 (off) or in [1, {MAX_LEN}]"
                )))
            }
        };
        // GroupQueryAttention's options this op does not implement: refused, never ignored.
        for (a, what) in [
            (c"smooth_softmax", "smooth softmax"),
            (c"qk_output", "the QK output"),
            (c"sliding_window_cache", "a sliding-window cache"),
        ] {
            let v = int_or(a, 0)?;
            if v != 0 {
                return Err(Error::invalid(format!(
                    "attribute {}={v}: {what} is not implemented (only 0)",
                    a.to_string_lossy()
                )));
            }
        }
        let v_format = match int(c"v_bits")? {
            8 => Format::Q8,
            4 => Format::Q4,
            b => return Err(Error::invalid(format!("attribute v_bits={b} must be 8 or 4"))),
        };
        Ok(Node {
            name,
            act,
            heads: heads as usize,
            kv_heads: kv_heads as usize,
            scale,
            softcap,
            rotary,
            window,
            v_format,
        })
    }

    /// The factor the scores get before the softmax: `scale`, or `1 / sqrt(head size)` where
    /// it is 0.
    pub fn softmax_scale(&self, head_dim: usize) -> f32 {
        if self.scale > 0.0 {
            self.scale
        } else {
            1.0 / (head_dim as f32).sqrt()
        }
    }

    /// Prefix for errors about this node.
    pub fn describe(&self) -> String {
        format!(
            "QinsGroupQueryAttention node '{}' (num_heads={}, kv_num_heads={}, v_bits={})",
            self.name,
            self.heads,
            self.kv_heads,
            self.v_format.bits()
        )
    }
}

/// What kind of run this is, from the query length `S` and `total_sequence_length`, as
/// GroupQueryAttention tells them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `S == total_sequence_length`: a prompt from an empty cache; sequence `b`'s first
    /// `seqlens_k[b] + 1` tokens are real (right padding past them).
    FirstPrompt,
    /// Anything after: `S` new tokens (1, or more with batch 1) after `seqlens_k[b] + 1 - S`
    /// cached ones.
    Continue,
}

/// One run's dimensions, checked against the node ([`Node::check`]). Every index a kernel
/// computes from them is in bounds of the checked tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    /// New tokens per sequence (`S`).
    pub seq: usize,
    pub head_dim: usize,
    /// Q, K and V packed in `query`.
    pub packed: bool,
    /// Positions in the past buffers (`P`, 0 without them).
    pub past: usize,
    /// Positions in the present buffers (`max(total, P)`).
    pub present: usize,
    pub total: usize,
    pub step: Step,
    /// Bytes of a V row.
    pub row_bytes: usize,
    /// Rotary caches' rows (positions) and rotary dimensions (twice their width); (0, 0)
    /// without rotary.
    pub rotary_positions: usize,
    pub rotary_dim: usize,
}

/// The infos of one run's inputs, as [`Node::check`] takes them.
pub struct Infos<'a> {
    pub query: &'a TensorInfo,
    pub key: Option<&'a TensorInfo>,
    pub value: Option<&'a TensorInfo>,
    pub past_key: Option<&'a TensorInfo>,
    pub past_value: Option<&'a TensorInfo>,
    pub seqlens_k: &'a TensorInfo,
    pub total: &'a TensorInfo,
    pub cos: Option<&'a TensorInfo>,
    pub sin: Option<&'a TensorInfo>,
}

fn dim(d: i64, max: usize, what: &str) -> Result<usize> {
    usize::try_from(d)
        .ok()
        .filter(|&d| d <= max)
        .ok_or_else(|| Error::invalid(format!("{what} is {d}, must be in [0, {max}]")))
}

impl Node {
    /// Checks one run's inputs; `total` is the value of `total_sequence_length`.
    pub fn check(&self, t: &Infos, total: i32) -> Result<Dims> {
        self.check_inner(t, total).map_err(|e| e.context(self.describe()))
    }

    fn check_inner(&self, t: &Infos, total: i32) -> Result<Dims> {
        let act = self.act.onnx();
        let want_t = |what: &str, i: &TensorInfo, rank: usize| -> Result<()> {
            if i.elem != act || i.shape.len() != rank {
                return Err(Error::invalid(format!("{what} must be a {rank}-D {} tensor, got {i}", elem::name(act))));
            }
            Ok(())
        };
        want_t("query", t.query, 3)?;
        let batch = dim(t.query.shape[0], MAX_LEN, "the batch size")?;
        let seq = dim(t.query.shape[1], MAX_LEN, "the query length")?;
        let width = dim(t.query.shape[2], MAX_HEADS * MAX_HEAD_DIM * 3, "query's last dimension")?;
        let (h, kvh) = (self.heads, self.kv_heads);
        let packed = match (t.key, t.value) {
            (None, None) => true,
            (Some(_), Some(_)) => false,
            _ => return Err(Error::invalid("key and value must both be given or both be absent (packed QKV)")),
        };
        let heads_in_query = if packed { h + 2 * kvh } else { h };
        if width % heads_in_query != 0 {
            return Err(Error::invalid(format!(
                "query's last dimension {width} is not a multiple of {heads_in_query} heads{}",
                if packed { " (num_heads + 2 kv_num_heads, packed)" } else { "" }
            )));
        }
        let head_dim = width / heads_in_query;
        let row_bytes = v_row_bytes(self.v_format, head_dim).ok_or_else(|| {
            Error::invalid(format!("head size {head_dim} must be a multiple of 8 in [8, {MAX_HEAD_DIM}]"))
        })?;
        if !packed {
            for (what, i) in [("key", t.key), ("value", t.value)] {
                let i = i.expect("both given (checked above)");
                want_t(what, i, 3)?;
                if i.shape != [batch as i64, seq as i64, (kvh * head_dim) as i64] {
                    return Err(Error::invalid(format!(
                        "{what} must be [{batch}, {seq}, {}] (kv_num_heads x head size), got {i}",
                        kvh * head_dim
                    )));
                }
            }
        }
        let past = match (t.past_key, t.past_value) {
            (None, None) => 0,
            (Some(k), Some(v)) => {
                want_t("past_key", k, 4)?;
                let p = dim(k.shape[2], MAX_LEN, "past_key's length")?;
                if k.shape != [batch as i64, kvh as i64, p as i64, head_dim as i64] {
                    return Err(Error::invalid(format!("past_key must be [{batch}, {kvh}, P, {head_dim}], got {k}")));
                }
                let want = [batch as i64, kvh as i64, p as i64, row_bytes as i64];
                if v.elem != elem::UINT8 || v.shape != want {
                    return Err(Error::invalid(format!(
                        "past_value must be uint8 {want:?} (QINS V rows of {row_bytes} bytes, v_bits={}), got {v}",
                        self.v_format.bits()
                    )));
                }
                p
            }
            _ => return Err(Error::invalid("past_key and past_value must both be given or both be absent")),
        };
        if t.seqlens_k.elem != elem::INT32 || t.seqlens_k.shape != [batch as i64] {
            return Err(Error::invalid(format!("seqlens_k must be int32 [{batch}], got {}", t.seqlens_k)));
        }
        if t.total.elem != elem::INT32 || t.total.numel()? != 1 {
            return Err(Error::invalid(format!("total_sequence_length must be one int32, got {}", t.total)));
        }
        let total = dim(total as i64, MAX_LEN, "total_sequence_length")?;
        let step = if seq == total {
            Step::FirstPrompt
        } else if seq == 1 || batch == 1 {
            Step::Continue
        } else {
            return Err(Error::invalid(format!(
                "{seq} new tokens after a cache (total_sequence_length {total}) need batch size 1, got {batch}"
            )));
        };
        if seq > total {
            return Err(Error::invalid(format!("total_sequence_length {total} is below the query length {seq}")));
        }
        let (rotary_positions, rotary_dim) = match (self.rotary, t.cos, t.sin) {
            (None, None, None) => (0, 0),
            (None, ..) => return Err(Error::invalid("cos_cache and sin_cache are given but do_rotary=0")),
            (Some(_), Some(c), Some(s)) => {
                want_t("cos_cache", c, 2)?;
                if s != c {
                    return Err(Error::invalid(format!("sin_cache {s} must match cos_cache {c}")));
                }
                let rows = dim(c.shape[0], MAX_LEN, "the rotary caches' length")?;
                let half = dim(c.shape[1], MAX_HEAD_DIM, "the rotary caches' width")?;
                if half == 0 || 2 * half > head_dim {
                    return Err(Error::invalid(format!(
                        "the rotary caches' width {half} must be in [1, head size / 2 = {}]",
                        head_dim / 2
                    )));
                }
                (rows, 2 * half)
            }
            (Some(_), ..) => return Err(Error::invalid("do_rotary=1 needs cos_cache and sin_cache")),
        };
        let present = total.max(past);
        Ok(Dims { batch, seq, head_dim, packed, past, present, total, step, row_bytes, rotary_positions, rotary_dim })
    }
}

impl Dims {
    pub fn output_shape(&self, heads: usize) -> [i64; 3] {
        [self.batch as i64, self.seq as i64, (heads * self.head_dim) as i64]
    }

    pub fn present_key_shape(&self, kv_heads: usize) -> [i64; 4] {
        [self.batch as i64, kv_heads as i64, self.present as i64, self.head_dim as i64]
    }

    pub fn present_value_shape(&self, kv_heads: usize) -> [i64; 4] {
        [self.batch as i64, kv_heads as i64, self.present as i64, self.row_bytes as i64]
    }

    /// Sequence `b`'s cached tokens before this run and its tokens after it, from its
    /// `seqlens_k` entry, checked against the buffers: `(past_b, total_b)`.
    pub fn lengths(&self, b: usize, seqlens_k: i32) -> Result<(usize, usize)> {
        let total_b = usize::try_from(seqlens_k as i64 + 1).unwrap_or(usize::MAX);
        let bad = |why: String| Err(Error::invalid(format!("seqlens_k[{b}] = {seqlens_k}: {why}")));
        match self.step {
            Step::FirstPrompt => {
                if !(1..=self.seq).contains(&total_b) {
                    return bad(format!(
                        "a first prompt of {} tokens needs it in [0, {}]",
                        self.seq,
                        self.seq as i64 - 1
                    ));
                }
                Ok((0, total_b))
            }
            Step::Continue => {
                // total_sequence_length is the longest sequence's length: no sequence is longer
                // (a shared buffer would otherwise let a bad seqlens_k reach past it).
                if total_b < self.seq || total_b > self.total.min(self.present) || total_b - self.seq > self.past {
                    return bad(format!(
                        "{} new tokens after {} cached ones need it in [{}, {}]",
                        self.seq,
                        self.past,
                        self.seq as i64 - 1,
                        (self.past + self.seq).min(self.present).min(self.total) as i64 - 1
                    ));
                }
                Ok((total_b - self.seq, total_b))
            }
        }
    }
}

/// One run's tensors, checked against the node ([`Node::begin`]).
pub struct Run<'ctx> {
    pub query: Tensor<'ctx>,
    pub key: Option<Tensor<'ctx>>,
    pub value: Option<Tensor<'ctx>>,
    pub past_key: Option<Tensor<'ctx>>,
    pub past_value: Option<Tensor<'ctx>>,
    pub seqlens_k: Tensor<'ctx>,
    pub cos: Option<Tensor<'ctx>>,
    pub sin: Option<Tensor<'ctx>>,
    pub output: Tensor<'ctx>,
    pub present_key: Tensor<'ctx>,
    pub present_value: Tensor<'ctx>,
    pub dims: Dims,
}

impl Node {
    /// The prologue of every kernel of this op: inputs read and checked, outputs allocated.
    /// `total_sequence_length` is read through `total` (a host read on the CPU; where the
    /// tensor lives is the kernel's business).
    pub fn begin<'ctx>(
        &self,
        ctx: &'ctx KernelCtx,
        total: impl FnOnce(Tensor<'ctx>) -> Result<i32>,
    ) -> Result<Run<'ctx>> {
        let inputs = ctx.input_count()?;
        if !(7..=9).contains(&inputs) {
            return Err(Error::invalid(format!(
                "{}: expected 7 to 9 inputs (query, key, value, past_key, past_value, seqlens_k, \
                 total_sequence_length[, cos_cache, sin_cache]), got {inputs}",
                self.describe()
            )));
        }
        let query = ctx.input(0)?;
        let (key, value) = (ctx.optional_input(1)?, ctx.optional_input(2)?);
        let (past_key, past_value) = (ctx.optional_input(3)?, ctx.optional_input(4)?);
        let seqlens_k = ctx.input(5)?;
        let total_t = ctx.input(6)?;
        let (cos, sin) = (ctx.optional_input(7)?, ctx.optional_input(8)?);
        if total_t.info.elem != elem::INT32 || total_t.info.numel()? != 1 {
            return Err(Error::invalid(format!(
                "{}: total_sequence_length must be one int32, got {}",
                self.describe(),
                total_t.info
            )));
        }
        let total_info = total_t.info.clone();
        let total = total(total_t).map_err(|e| e.context(self.describe()))?;
        let infos = Infos {
            query: &query.info,
            key: key.as_ref().map(|t| &t.info),
            value: value.as_ref().map(|t| &t.info),
            past_key: past_key.as_ref().map(|t| &t.info),
            past_value: past_value.as_ref().map(|t| &t.info),
            seqlens_k: &seqlens_k.info,
            total: &total_info,
            cos: cos.as_ref().map(|t| &t.info),
            sin: sin.as_ref().map(|t| &t.info),
        };
        let dims = self.check(&infos, total)?;
        let output = ctx.output(0, &dims.output_shape(self.heads))?;
        let present_key = ctx.output(1, &dims.present_key_shape(self.kv_heads))?;
        let present_value = ctx.output(2, &dims.present_value_shape(self.kv_heads))?;
        Ok(Run {
            query,
            key,
            value,
            past_key,
            past_value,
            seqlens_k,
            cos,
            sin,
            output,
            present_key,
            present_value,
            dims,
        })
    }
}

const F32_IN: &[T] = &[
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
];
const F16_IN: &[T] = &[
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
];
const F32_OUT: &[T] = &[
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
];
const F16_OUT: &[T] = &[
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
];

/// The op's registrations for execution provider `ep`: one per model type (query, K cache,
/// output), same name and domain; ORT picks the kernel by `query`'s type. Only `query` is
/// declared required; [`Node::begin`] requires seqlens_k and total_sequence_length itself
/// (ORT's custom ops know no required input after an optional one).
pub(crate) fn registrations(
    ep: &'static CStr,
    f32: fn(&KernelInfo) -> Result<Box<dyn Kernel>>,
    f16: fn(&KernelInfo) -> Result<Box<dyn Kernel>>,
) -> Vec<OpSpec> {
    let spec = |inputs: &'static [T], outputs: &'static [T], create| OpSpec {
        name: OP_NAME,
        ep,
        inputs,
        required_inputs: 1,
        outputs,
        // total_sequence_length sizes the present outputs: read on the host, as
        // GroupQueryAttention's CUDA kernel reads it.
        host_inputs: &[6],
        since_version: OPSET,
        end_version: OPSET,
        create,
    };
    vec![spec(F32_IN, F32_OUT, f32), spec(F16_IN, F16_OUT, f16)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(ints: &[(&str, i64)], floats: &[(&str, f32)]) -> Result<Node> {
        let find = |a: &CStr| ints.iter().find(|(n, _)| n.as_bytes() == a.to_bytes()).map(|(_, v)| *v);
        Node::from_attrs(
            "n".into(),
            Act::F32,
            |a| find(a).ok_or_else(|| Error::invalid(format!("missing {}", a.to_string_lossy()))),
            |a, d| Ok(find(a).unwrap_or(d)),
            |a, d| Ok(floats.iter().find(|(n, _)| n.as_bytes() == a.to_bytes()).map(|(_, v)| *v).unwrap_or(d)),
        )
    }

    const BASE: &[(&str, i64)] = &[("num_heads", 9), ("kv_num_heads", 3), ("v_bits", 8), ("do_rotary", 1)];

    #[test]
    fn attributes_are_validated() {
        let n = node(BASE, &[]).unwrap();
        assert_eq!(
            (n.heads, n.kv_heads, n.v_format, n.rotary, n.window),
            (9, 3, Format::Q8, Some(Rotary::Halves), None)
        );
        let with = |extra: (&str, i64)| {
            let mut a = BASE.to_vec();
            a.retain(|(k, _)| *k != extra.0);
            a.push(extra);
            node(&a, &[])
        };
        for bad in [
            ("num_heads", 8),
            ("kv_num_heads", 0),
            ("v_bits", 6),
            ("v_bits", 32),
            ("do_rotary", 2),
            ("local_window_size", 0),
            ("local_window_size", -2),
            ("smooth_softmax", 1),
            ("qk_output", 1),
        ] {
            let e = with(bad).unwrap_err();
            assert_eq!(e.code, ort_sys::OrtErrorCode::ORT_INVALID_ARGUMENT, "{bad:?}: {e}");
        }
        assert_eq!(with(("local_window_size", 128)).unwrap().window, Some(128));
        assert_eq!(with(("v_bits", 4)).unwrap().v_format, Format::Q4);
        assert!(node(BASE, &[("softcap", -1.0)]).is_err());
        assert!(node(BASE, &[("scale", f32::NAN)]).is_err());
        assert!(node(&BASE[1..], &[]).is_err());
    }

    fn ti(elem: i32, shape: &[i64]) -> TensorInfo {
        TensorInfo { elem, shape: shape.to_vec() }
    }

    /// SmolLM2's shapes: 9 heads, 3 KV heads, head size 64, packed.
    fn check(q: &[i64], past: Option<i64>, row: i64, total: i32, cos: Option<&[i64]>) -> Result<Dims> {
        let n = node(BASE, &[]).unwrap();
        let (f, u8_, i32_) = (elem::FLOAT, elem::UINT8, elem::INT32);
        let query = ti(f, q);
        let pk = past.map(|p| ti(f, &[q[0], 3, p, 64]));
        let pv = past.map(|p| ti(u8_, &[q[0], 3, p, row]));
        let sk = ti(i32_, &[q[0]]);
        let tot = ti(i32_, &[1]);
        let c = cos.map(|c| ti(f, c));
        n.check(
            &Infos {
                query: &query,
                key: None,
                value: None,
                past_key: pk.as_ref(),
                past_value: pv.as_ref(),
                seqlens_k: &sk,
                total: &tot,
                cos: c.as_ref(),
                sin: c.as_ref(),
            },
            total,
        )
    }

    #[test]
    fn shapes_and_steps() {
        let cos: &[i64] = &[8192, 32];
        let d = check(&[1, 7, 960], Some(0), 68, 7, Some(cos)).unwrap();
        assert_eq!((d.head_dim, d.step, d.present, d.rotary_dim, d.row_bytes), (64, Step::FirstPrompt, 7, 64, 68));
        assert_eq!(d.lengths(0, 6).unwrap(), (0, 7));
        assert_eq!(d.lengths(0, 3).unwrap(), (0, 4));
        assert!(d.lengths(0, 7).is_err() && d.lengths(0, -1).is_err());
        // Token generation, separate buffers: present grows by one.
        let d = check(&[2, 1, 960], Some(10), 68, 11, Some(cos)).unwrap();
        assert_eq!((d.step, d.present), (Step::Continue, 11));
        assert_eq!(d.lengths(1, 10).unwrap(), (10, 11));
        assert_eq!(d.lengths(0, 4).unwrap(), (4, 5));
        assert!(d.lengths(0, 11).is_err());
        // A shared buffer of 4096 positions: present is the buffer.
        let d = check(&[1, 1, 960], Some(4096), 68, 12, Some(cos)).unwrap();
        assert_eq!(d.present, 4096);
        assert_eq!(d.lengths(0, 11).unwrap(), (11, 12));
        assert!(d.lengths(0, 4096).is_err());
        // A continued prompt (batch 1).
        let d = check(&[1, 5, 960], Some(3), 68, 8, Some(cos)).unwrap();
        assert_eq!(d.lengths(0, 7).unwrap(), (3, 8));
        for (q, past, row, total, c, why) in [
            (&[2i64, 5, 960][..], Some(3), 68, 8, Some(cos), "batch"),
            (&[1, 7, 961], Some(0), 68, 7, Some(cos), "not a multiple"),
            (&[1, 7, 960], Some(0), 36, 7, Some(cos), "v_bits"),
            (&[1, 7, 960], Some(0), 68, 6, Some(cos), "below"),
            (&[1, 7, 960], Some(0), 68, 7, None, "needs cos_cache"),
            (&[1, 7, 960], Some(0), 68, 7, Some(&[8192, 33][..]), "width"),
            (&[1, 7, 960], Some(0), 68, -3, Some(cos), "total_sequence_length"),
            (&[1, 7, 15 * 4], Some(0), 6, 7, Some(&[8192, 2][..]), "head size"),
        ] {
            let e = check(q, past, row, total, c).unwrap_err();
            assert!(e.msg.contains(why), "{q:?} {past:?} {row} {total}: {e}");
        }
    }
}
