//! The ops' contracts, independent of where they run: names, attributes and their ranges, the
//! types and shapes of inputs and outputs, validation. Kernels (`cpu/`, `cuda/`) import these;
//! nothing here imports a kernel. docs/FORMAT.md is the specification; CONTRIBUTING.md says how
//! to add an op.

pub mod qins_matmul;

use std::ffi::CStr;

/// The domain of every QINS op (docs/FORMAT.md).
pub const DOMAIN: &CStr = c"com.qins";
