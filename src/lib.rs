//! QINS: a companding weight codec for ONNX models.
//!
//! [`codec`] is the single definition of the storage format: the rewrite encodes with it
//! and every kernel's reference decodes with it. [`onnx`] reads and writes ONNX models
//! with external data. [`files`] and [`mapped`] keep reads inside a model's folder and
//! outputs away from anything read.

pub mod codec;
pub mod files;
pub mod isa;
pub mod mapped;
pub mod onnx;
pub mod rng;
