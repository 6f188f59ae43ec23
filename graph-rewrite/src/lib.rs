//! The graph rewrite: finds the MatMul nodes a precision policy targets in an exported
//! model and replaces them with QINS ops, encoding their weights.
//!
//! ```no_run
//! use qins_graph_rewrite::{plan, rewrite, Format, Model, NoProgress, PlanOptions, RewriteOptions};
//! let model = Model::load("phi-3.5-mini/model.onnx".as_ref())?;
//! let plan = plan::plan(&model, &PlanOptions::default())?;
//! let opts = RewriteOptions { format: Format::Q8, group: 128, force: false, fsync: false, kv_v: None, library: None };
//! let report = rewrite::rewrite(&model, &plan, &opts, "phi-3.5-mini-qins".as_ref(), &mut NoProgress)?;
//! println!("{}", report.table());
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod calibrate;
pub mod chat;
pub mod engine;
pub mod gptq;
pub mod kv_v;
pub mod parity;
pub mod plan;
pub mod plot;
pub mod report;
pub mod rewrite;
pub mod roundtrip;
pub mod suite;

pub use plan::{PlanOptions, Preset};
pub use qins::codec::Format;
pub use qins::onnx::Model;
pub use rewrite::{NoProgress, Progress, RewriteOptions};
pub mod synth;
