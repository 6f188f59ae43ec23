//! QINS: a companding weight codec for ONNX models.
//!
//! [`codec`] is the single definition of the storage format: the rewrite encodes with it
//! and every kernel's reference decodes with it. [`onnx`] reads and writes ONNX models
//! with external data.

pub mod codec;
pub mod onnx;
