//! CPU kernels. Each module mirrors its op in `ops/` (and, later, its CUDA twin in `cuda/`).

pub mod parallel;
pub mod qins_matmul;
