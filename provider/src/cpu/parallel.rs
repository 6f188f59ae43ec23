//! Where the kernels' parallel loops run.
//!
//! Inside ONNX Runtime a kernel must use the session's intra-op thread pool
//! ([`KernelCtx`](crate::ort_api::KernelCtx) implements [`ParallelFor`] through
//! `KernelContext_ParallelFor`): a pool of our own would compete with ORT's threads, which
//! spin for a while after each op, and ignore the session's `intra_op_num_threads`. Called
//! directly from Rust there is no such pool, so the caller picks [`Sequential`] or
//! [`Rayon`].

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::ort_api::{panic_message, Error, KernelCtx, Result};

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

/// The session's intra-op thread pool ([`KernelCtx::parallel_for_raw`]). ORT runs the
/// iterations on its pool threads and the calling thread, or all on the calling thread when
/// the session has a single intra-op thread.
impl ParallelFor for KernelCtx {
    fn for_each(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) -> Result<()> {
        if tasks <= 1 {
            (0..tasks).for_each(f);
            return Ok(());
        }
        let job = Job { f, failed: AtomicBool::new(false), panic: Mutex::new(None) };
        // SAFETY: `run_job` only reads `job` through a shared reference and never unwinds;
        // `job` outlives the call, which returns only after every iteration has finished.
        unsafe { self.parallel_for_raw(run_job, tasks, (&job as *const Job).cast_mut().cast())? };
        match job.panic.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(msg) => Err(Error::fail(format!("internal error in a parallel task (panic: {msg})"))),
            None => Ok(()),
        }
    }
}

/// One `ParallelFor` call, shared by the threads running its iterations.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    /// Set after a panic: the remaining iterations are skipped.
    failed: AtomicBool,
    /// The first panic's message, reported as the op's error once ORT returns.
    panic: Mutex<Option<String>>,
}

impl Job<'_> {
    fn run(&self, i: usize) {
        if self.failed.load(Ordering::Relaxed) {
            return;
        }
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (self.f)(i))) {
            self.failed.store(true, Ordering::Relaxed);
            let msg = panic_message(&*payload).to_string();
            // A payload whose Drop panics again would unwind out of here; leaking it cannot.
            std::mem::forget(payload);
            let mut first = self.panic.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert(msg);
        }
    }
}

/// The iteration callback ORT calls from its threads. Unwinding into ORT's C++ frames is
/// undefined behaviour, so panics stop here ([`Job::run`]) and come back as a status.
unsafe extern "C" fn run_job(job: *mut c_void, i: usize) {
    // SAFETY: the pointer `for_each` passed, to a `Job` that outlives the ParallelFor call.
    if let Some(job) = unsafe { job.cast::<Job>().cast_const().as_ref() } {
        job.run(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_for_callback_contains_panics() {
        let f = |i: usize| {
            if i == 3 {
                panic!("task {i} failed");
            }
        };
        let job = Job { f: &f, failed: AtomicBool::new(false), panic: Mutex::new(None) };
        let data = (&job as *const Job).cast_mut().cast();
        for i in 0..6 {
            // SAFETY: `data` points at the live `job`, as ORT would pass it.
            unsafe { run_job(data, i) };
        }
        assert!(job.failed.load(Ordering::Relaxed));
        assert_eq!(job.panic.into_inner().unwrap().as_deref(), Some("task 3 failed"));
    }
}
