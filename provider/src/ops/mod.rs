//! The ops' contracts, independent of where they run: names, attributes and their ranges, the
//! types and shapes of inputs and outputs, validation. Kernels (`cpu/`, `cuda/`) import these;
//! nothing here imports a kernel. docs/FORMAT.md is the specification; CONTRIBUTING.md says how
//! to add an op.

pub mod qins_attention;
pub mod qins_matmul;

use std::ffi::CStr;

/// The domain of every QINS op (docs/FORMAT.md).
pub const DOMAIN: &CStr = c"com.qins";

#[cfg(test)]
mod tests {
    /// The library registers the domain the rewrite writes.
    #[test]
    fn domain_matches_the_rewrite() {
        assert_eq!(super::DOMAIN.to_str().unwrap(), qins::onnx::QINS_DOMAIN);
        assert_eq!(super::qins_matmul::OPSET as i64, qins::onnx::QINS_OPSET);
        assert_eq!(super::qins_attention::OPSET as i64, qins::onnx::QINS_OPSET);
    }
}
