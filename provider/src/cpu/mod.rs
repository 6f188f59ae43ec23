//! CPU kernels of the QINS ops, on ONNX Runtime's intra-op thread pool ([`parallel`]). One
//! folder per op family ([`qins_matmul`], [`qins_attention`]), whose `ops()` gives its
//! registrations; the instruction-set dispatch is `qins::isa`'s; [`ActElem`] is how both
//! families widen the model's float type to f32 and back.

pub mod parallel;
pub mod qins_attention;
pub mod qins_matmul;

use std::borrow::Cow;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::ort_api::custom_op::OpSpec;

/// The ops this execution provider runs, as ORT registers them.
pub(crate) fn register() -> Vec<OpSpec> {
    qins_matmul::ops().into_iter().chain(qins_attention::ops()).collect()
}

/// Activation element types: the kernels compute in f32, so f16 activations are widened once
/// and outputs rounded once.
pub trait ActElem: Copy {
    fn widen(a: &[Self]) -> Cow<'_, [f32]>;
    fn narrow(src: &[f32], dst: &mut [Self]);
}

impl ActElem for f32 {
    fn widen(a: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(a)
    }
    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl ActElem for f16 {
    fn widen(a: &[f16]) -> Cow<'_, [f32]> {
        let mut af = vec![0f32; a.len()];
        a.convert_to_f32_slice(&mut af);
        Cow::Owned(af)
    }
    fn narrow(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
}
