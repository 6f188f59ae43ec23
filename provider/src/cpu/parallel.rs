//! Where the kernels' parallel loops run.
//!
//! Inside ONNX Runtime a kernel must use the session's intra-op thread pool
//! ([`KernelCtx`](crate::ort_api::KernelCtx) implements [`ParallelFor`] through
//! `KernelContext_ParallelFor`): a pool of our own would compete with ORT's threads, which
//! spin for a while after each op, and ignore the session's `intra_op_num_threads`. Called
//! directly from Rust there is no such pool, so the caller picks [`Sequential`] or
//! [`Rayon`].

use rayon::prelude::*;

use crate::ort_api::Result;

/// Runs a loop whose iterations are independent.
pub trait ParallelFor {
    /// Calls `f(i)` once for every `i` in `0..tasks`, in any order and on any threads, and
    /// returns when all calls have finished (or with an error saying why some did not).
    fn for_each(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) -> Result<()>;
}

/// Every iteration on the calling thread, in order.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sequential;

impl ParallelFor for Sequential {
    fn for_each(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) -> Result<()> {
        (0..tasks).for_each(f);
        Ok(())
    }
}

/// Rayon's global pool (for Rust callers only; a panic in `f` resumes in the caller).
#[derive(Clone, Copy, Debug, Default)]
pub struct Rayon;

impl ParallelFor for Rayon {
    fn for_each(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) -> Result<()> {
        if tasks <= 1 {
            return Sequential.for_each(tasks, f);
        }
        (0..tasks).into_par_iter().for_each(f);
        Ok(())
    }
}
