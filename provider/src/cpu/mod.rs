//! CPU kernels of the QINS ops, on ONNX Runtime's intra-op thread pool ([`parallel`]). One
//! folder per op family ([`qins_matmul`]), whose `ops()` gives its registrations; the
//! instruction-set dispatch is `qins::isa`'s.

pub mod parallel;
pub mod qins_attention;
pub mod qins_matmul;

use crate::ort_api::custom_op::OpSpec;

/// The ops this execution provider runs, as ORT registers them.
pub(crate) fn register() -> Vec<OpSpec> {
    qins_matmul::ops().into_iter().chain(qins_attention::ops()).collect()
}
