//! `com.qins.QinsMatMul` (opset 1): `Y = A W` with `W` stored QINS-encoded (docs/FORMAT.md).
//!
//! This module is the op's contract, independent of where it runs: attributes and their
//! ranges, the types and shapes the inputs must have, and the output shape. Kernels (CPU here,
//! CUDA later) call [`Node::from_info`] when ORT creates them and [`Node::check`] on every run.

use std::ffi::CStr;

use ort_sys::ONNXTensorElementDataType as T;
use qins::codec::{Format, Layout};

use crate::ort_api::custom_op::{Kernel, OpSpec};
use crate::ort_api::{elem, Error, KernelCtx, KernelInfo, Result, Tensor, TensorInfo};

pub use super::DOMAIN;
pub const OP_NAME: &CStr = c"QinsMatMul";
pub const OPSET: i32 = 1;

/// Activation (and output) element type: the `T` of the spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    F32,
    F16,
}

impl Act {
    pub fn onnx(self) -> i32 {
        match self {
            Act::F32 => elem::FLOAT,
            Act::F16 => elem::FLOAT16,
        }
    }
}

/// Validates the attributes and turns them into the codec's layout.
pub fn layout_from_attrs(k: i64, n: i64, bits: i64, group_size: i64) -> Result<Layout> {
    let format = Format::from_bits(bits)
        .ok_or_else(|| Error::invalid(format!("attribute bits={bits} is not one of 4, 6, 8, 32")))?;
    // Bounded far below usize::MAX so that every size derived from them (row bytes, N * row
    // bytes, M * N) is computed without overflow on 64-bit hosts.
    const MAX_DIM: i64 = 1 << 31;
    if !(1..=MAX_DIM).contains(&k) {
        return Err(Error::invalid(format!("attribute K={k} must be in [1, 2^31]")));
    }
    if !(1..=MAX_DIM).contains(&n) {
        return Err(Error::invalid(format!("attribute N={n} must be in [1, 2^31]")));
    }
    if !(1..=k).contains(&group_size) {
        return Err(Error::invalid(format!("attribute group_size={group_size} must be in [1, K={k}]")));
    }
    if format == Format::F32 && group_size != k {
        return Err(Error::invalid(format!(
            "attribute group_size={group_size}: bits=32 stores one scale per output channel, so group_size must equal K={k}"
        )));
    }
    Ok(Layout { format, k: k as usize, n: n as usize, group: group_size as usize })
}

/// Expected element type and shape of `codes` for a layout.
pub fn codes_expectation(l: &Layout) -> TensorInfo {
    match l.format {
        Format::F32 => TensorInfo { elem: elem::FLOAT, shape: vec![l.n as i64, l.k as i64] },
        f => TensorInfo { elem: elem::UINT8, shape: vec![l.n as i64, f.row_bytes(l.k) as i64] },
    }
}

/// Expected element type and shape of `scales` for a layout.
pub fn scales_expectation(l: &Layout) -> TensorInfo {
    let elem = if l.format == Format::F32 { elem::FLOAT } else { elem::FLOAT16 };
    TensorInfo { elem, shape: vec![l.n as i64, l.groups() as i64] }
}

/// Checks the fused SwiGLU attribute against the layout: `N` is the encoded width `2I`,
/// a whole number of 16-row tiles (docs/FORMAT.md, [`qins::codec::swiglu_row`]).
pub fn swiglu_from_attr(v: i64, l: &Layout) -> Result<bool> {
    match v {
        0 => Ok(false),
        1 if l.n.is_multiple_of(2 * qins::codec::SWIGLU_TILE) => Ok(true),
        1 => Err(Error::invalid(format!(
            "attribute swiglu=1 needs N (gate and up channels together) to be a multiple of {}, got N={}",
            2 * qins::codec::SWIGLU_TILE,
            l.n
        ))),
        v => Err(Error::invalid(format!("attribute swiglu={v} must be 0 or 1"))),
    }
}

/// Shapes of one run, derived from the (checked) inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunShape {
    /// Rows of `A` once its leading dims are flattened.
    pub m: usize,
    /// `A.shape[..-1] + [NF + N]` (`[NF + N / 2]` with `swiglu = 1`).
    pub out_shape: Vec<i64>,
    /// Output channels of the optional `float_weight` (`[NF, K]`), which come first in `Y`;
    /// 0 without it.
    pub nf: usize,
}

/// One node's attributes, read and validated when ORT creates its kernel.
#[derive(Clone, Debug)]
pub struct Node {
    /// For error messages: ORT's node name (may be empty).
    pub name: String,
    pub layout: Layout,
    pub act: Act,
    /// `swiglu = 1`: `Y = silu(A Wg) * (A Wu)`, `[..., N / 2]`, from one weight holding both.
    pub swiglu: bool,
}

impl Node {
    pub fn from_info(info: &KernelInfo, act: Act) -> Result<Node> {
        let name = info.node_name().unwrap_or_default();
        let get = |a: &CStr| info.attr_i64(a);
        let (layout, swiglu) = (|| {
            let l = layout_from_attrs(get(c"K")?, get(c"N")?, get(c"bits")?, get(c"group_size")?)?;
            Ok((l, swiglu_from_attr(info.attr_i64_or(c"swiglu", 0)?, &l)?))
        })()
        .map_err(|e: Error| e.context(format!("QinsMatMul node '{name}'")))?;
        Ok(Node { name, layout, act, swiglu })
    }

    /// Prefix for errors about this node.
    pub fn describe(&self) -> String {
        let l = &self.layout;
        format!(
            "QinsMatMul node '{}' (K={}, N={}, bits={}, group_size={}{})",
            self.name,
            l.k,
            l.n,
            l.format.bits(),
            l.group,
            if self.swiglu { ", swiglu=1" } else { "" }
        )
    }

    /// Checks the inputs against the attributes; everything a kernel relies on to index its
    /// buffers safely is established here. `float_weight`: input 3, where the node has it.
    pub fn check(
        &self,
        inputs: usize,
        a: &TensorInfo,
        codes: &TensorInfo,
        scales: &TensorInfo,
        float_weight: Option<&TensorInfo>,
    ) -> Result<RunShape> {
        let run = || {
            let mut r = check_inputs(&self.layout, self.act, inputs, a, codes, scales, float_weight)?;
            if self.swiglu {
                if r.nf > 0 {
                    return Err(Error::invalid("swiglu=1 does not take a float_weight input"));
                }
                if let Some(last) = r.out_shape.last_mut() {
                    *last = (self.layout.n / 2) as i64;
                }
            }
            Ok(r)
        };
        run().map_err(|e: Error| e.context(self.describe()))
    }
}

/// One run's tensors, checked against the node ([`Node::begin`]).
pub struct Run<'ctx> {
    pub a: Tensor<'ctx>,
    pub codes: Tensor<'ctx>,
    pub scales: Tensor<'ctx>,
    pub float_weight: Option<Tensor<'ctx>>,
    pub y: Tensor<'ctx>,
    pub shape: RunShape,
}

impl Node {
    /// The prologue of every kernel of this op, whatever it runs on: the inputs read and
    /// checked ([`Node::check`]), the output allocated. `None` for an empty batch (M = 0),
    /// where the empty output is all there is to make.
    pub fn begin<'ctx>(&self, ctx: &'ctx KernelCtx) -> Result<Option<Run<'ctx>>> {
        let inputs = ctx.input_count()?;
        check_input_count(inputs).map_err(|e| e.context(self.describe()))?;
        let (a, codes, scales, wf) = (ctx.input(0)?, ctx.input(1)?, ctx.input(2)?, ctx.optional_input(3)?);
        let shape = self.check(inputs, &a.info, &codes.info, &scales.info, wf.as_ref().map(|t| &t.info))?;
        let y = ctx.output(0, &shape.out_shape)?;
        if shape.m == 0 {
            return Ok(None);
        }
        Ok(Some(Run { a, codes, scales, float_weight: wf, y, shape }))
    }
}

/// The node takes A, codes, scales and, optionally, float_weight. Kernels check this before
/// they read the inputs, [`check_inputs`] again with the rest.
pub fn check_input_count(inputs: usize) -> Result<()> {
    if (3..=4).contains(&inputs) {
        Ok(())
    } else {
        Err(Error::invalid(format!("expected 3 inputs (A, codes, scales) and an optional float_weight, got {inputs}")))
    }
}

/// [`Node::check`] without the node name (unit-testable without ORT).
pub fn check_inputs(
    l: &Layout,
    act: Act,
    inputs: usize,
    a: &TensorInfo,
    codes: &TensorInfo,
    scales: &TensorInfo,
    float_weight: Option<&TensorInfo>,
) -> Result<RunShape> {
    check_input_count(inputs)?;
    if a.elem != act.onnx() {
        return Err(Error::invalid(format!("A must be {}, got {a}", elem::name(act.onnx()))));
    }
    let Some((&last, lead)) = a.shape.split_last() else {
        return Err(Error::invalid(format!("A must be at least 1-D [..., K={}], got a scalar", l.k)));
    };
    if last != l.k as i64 {
        return Err(Error::invalid(format!("A must be [..., K={}], got {a}", l.k)));
    }
    let m = lead.iter().try_fold(1usize, |acc, &d| usize::try_from(d).ok().and_then(|d| acc.checked_mul(d)));
    let m = m.ok_or_else(|| Error::invalid(format!("A has a bad shape {:?}", a.shape)))?;
    if m.checked_mul(l.k.max(l.n)).is_none() {
        return Err(Error::invalid(format!("A {:?} is too large", a.shape)));
    }
    for (what, want, got) in [("codes", codes_expectation(l), codes), ("scales", scales_expectation(l), scales)] {
        if *got != want {
            return Err(Error::invalid(format!("{what} must be {want}, got {got}")));
        }
    }
    let nf = match float_weight {
        None => 0,
        Some(wf) => {
            let ok = wf.elem == act.onnx()
                && matches!(wf.shape[..], [nf, k] if nf >= 1 && k == l.k as i64 && nf <= (1 << 31));
            if !ok {
                return Err(Error::invalid(format!(
                    "float_weight must be {} [NF >= 1, K={}], got {wf}",
                    elem::name(act.onnx()),
                    l.k
                )));
            }
            wf.shape[0] as usize
        }
    };
    let width = nf + l.n;
    if m.checked_mul(width).is_none() {
        return Err(Error::invalid(format!("A {:?} with NF + N = {width} is too large", a.shape)));
    }
    let mut out_shape = lead.to_vec();
    out_shape.push(width as i64);
    Ok(RunShape { m, out_shape, nf })
}

// A, codes, scales, float_weight (optional, A's type).
const F32_IO: &[T] = &[
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
];
const F16_IO: &[T] = &[
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED,
    T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
];
/// Inputs from this index on are optional.
const REQUIRED_INPUTS: usize = 3;

/// The op's registrations for execution provider `ep`, whose kernels `f32` and `f16` create:
/// one per activation type, same name and domain. ORT merges the type constraints of
/// same-named ops and picks the kernel by `A`'s type. `codes` and `scales` are declared as any
/// type because their type depends on the `bits` attribute; [`check_inputs`] enforces it at
/// run time.
pub(crate) fn registrations(
    ep: &'static CStr,
    f32: fn(&KernelInfo) -> Result<Box<dyn Kernel>>,
    f16: fn(&KernelInfo) -> Result<Box<dyn Kernel>>,
) -> Vec<OpSpec> {
    let spec = |io: &'static [T], create| OpSpec {
        name: OP_NAME,
        ep,
        inputs: io,
        required_inputs: REQUIRED_INPUTS,
        outputs: &io[..1],
        host_inputs: &[],
        since_version: OPSET,
        end_version: OPSET,
        create,
    };
    vec![spec(F32_IO, f32), spec(F16_IO, f16)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ti(elem: i32, shape: &[i64]) -> TensorInfo {
        TensorInfo { elem, shape: shape.to_vec() }
    }

    #[test]
    fn attributes_are_validated() {
        assert!(layout_from_attrs(64, 8, 8, 32).is_ok());
        assert!(layout_from_attrs(64, 8, 32, 64).is_ok());
        for (k, n, bits, g) in
            [(64, 8, 5, 32), (0, 8, 8, 1), (64, 0, 8, 1), (64, 8, 8, 0), (64, 8, 8, 65), (64, 8, 32, 32)]
        {
            let e = layout_from_attrs(k, n, bits, g).unwrap_err();
            assert_eq!(e.code, ort_sys::OrtErrorCode::ORT_INVALID_ARGUMENT, "{e}");
        }
    }

    #[test]
    fn shapes_are_checked() {
        let l = layout_from_attrs(100, 7, 6, 30).unwrap();
        let codes = ti(elem::UINT8, &[7, Format::Q6.row_bytes(100) as i64]);
        let scales = ti(elem::FLOAT16, &[7, 4]);
        let a = ti(elem::FLOAT, &[2, 3, 100]);
        let r = check_inputs(&l, Act::F32, 3, &a, &codes, &scales, None).unwrap();
        assert_eq!(r, RunShape { m: 6, out_shape: vec![2, 3, 7], nf: 0 });
        let r = check_inputs(&l, Act::F32, 3, &ti(elem::FLOAT, &[0, 100]), &codes, &scales, None).unwrap();
        assert_eq!(r.m, 0);
        let bad = [
            (ti(elem::FLOAT, &[2, 99]), codes.clone(), scales.clone(), "K=100"),
            (ti(elem::FLOAT16, &[2, 100]), codes.clone(), scales.clone(), "A must be float"),
            (ti(elem::FLOAT, &[]), codes.clone(), scales.clone(), "scalar"),
            (a.clone(), ti(elem::UINT8, &[7, 75]), scales.clone(), "codes must be uint8 [7, 96]"),
            (a.clone(), ti(elem::FLOAT, &[7, 96]), scales.clone(), "codes must be uint8"),
            (a.clone(), codes.clone(), ti(elem::FLOAT16, &[7, 3]), "scales must be float16 [7, 4]"),
            (a.clone(), codes.clone(), ti(elem::FLOAT, &[7, 4]), "scales must be float16"),
        ];
        for (a, c, s, want) in bad {
            let e = check_inputs(&l, Act::F32, 3, &a, &c, &s, None).unwrap_err();
            assert!(e.msg.contains(want), "{e} should mention {want}");
        }
        assert!(check_inputs(&l, Act::F32, 2, &a, &codes, &scales, None).is_err());
    }

    #[test]
    fn swiglu_attribute_is_validated() {
        let l = layout_from_attrs(64, 32, 4, 32).unwrap();
        assert!(!swiglu_from_attr(0, &l).unwrap());
        assert!(swiglu_from_attr(1, &l).unwrap());
        assert!(swiglu_from_attr(2, &l).unwrap_err().msg.contains("0 or 1"));
        let odd = layout_from_attrs(64, 24, 4, 32).unwrap();
        assert!(swiglu_from_attr(1, &odd).unwrap_err().msg.contains("multiple of 16"));
        let node = Node { name: "n".into(), layout: l, act: Act::F32, swiglu: true };
        let codes = ti(elem::UINT8, &[32, Format::Q4.row_bytes(64) as i64]);
        let r = node.check(3, &ti(elem::FLOAT, &[2, 64]), &codes, &ti(elem::FLOAT16, &[32, 2]), None).unwrap();
        assert_eq!(r.out_shape, vec![2, 16]);
    }

    #[test]
    fn f32_format_shapes() {
        let l = layout_from_attrs(10, 3, 32, 10).unwrap();
        let a = ti(elem::FLOAT16, &[10]);
        let r = check_inputs(&l, Act::F16, 3, &a, &ti(elem::FLOAT, &[3, 10]), &ti(elem::FLOAT, &[3, 1]), None).unwrap();
        assert_eq!(r, RunShape { m: 1, out_shape: vec![3], nf: 0 });
        assert!(check_inputs(&l, Act::F16, 3, &a, &ti(elem::UINT8, &[3, 40]), &ti(elem::FLOAT, &[3, 1]), None).is_err());
    }

    #[test]
    fn float_weight_is_checked() {
        let l = layout_from_attrs(64, 32, 4, 32).unwrap();
        let codes = ti(elem::UINT8, &[32, Format::Q4.row_bytes(64) as i64]);
        let scales = ti(elem::FLOAT16, &[32, 2]);
        let a = ti(elem::FLOAT16, &[1, 3, 64]);
        let wf = ti(elem::FLOAT16, &[40, 64]);
        let r = check_inputs(&l, Act::F16, 4, &a, &codes, &scales, Some(&wf)).unwrap();
        assert_eq!(r, RunShape { m: 3, out_shape: vec![1, 3, 72], nf: 40 });
        for bad in [
            ti(elem::FLOAT, &[40, 64]),
            ti(elem::FLOAT16, &[40, 63]),
            ti(elem::FLOAT16, &[0, 64]),
            ti(elem::FLOAT16, &[64]),
        ] {
            let e = check_inputs(&l, Act::F16, 4, &a, &codes, &scales, Some(&bad)).unwrap_err();
            assert!(e.msg.contains("float_weight must be float16 [NF >= 1, K=64]"), "{e}");
        }
        assert!(check_inputs(&l, Act::F16, 5, &a, &codes, &scales, None).is_err());
        let node = Node { name: "n".into(), layout: l, act: Act::F16, swiglu: true };
        let e = node.check(4, &a, &codes, &scales, Some(&wf)).unwrap_err();
        assert!(e.msg.contains("does not take a float_weight"), "{e}");
    }
}
