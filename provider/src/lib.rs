//! ONNX Runtime custom-op library with the QINS ops.
//!
//! Load it into any ONNX Runtime (C API >= 17, i.e. ORT >= 1.17; tested with 1.31.1) host: Python
//! `SessionOptions.register_custom_ops_library(path)`, the C API `RegisterCustomOpsLibrary_V2`,
//! or Rust `ort`'s `SessionBuilder::with_operator_library`. ORT calls [`RegisterCustomOps`],
//! which takes the API table from the host; the library itself never links `libonnxruntime`.
//!
//! Ops (domain `com.qins`, opset 1, see `docs/FORMAT.md`):
//! - `QinsMatMul`, `A`/`Y` float32 or float16, on the CPU execution provider and (in builds
//!   made where nvcc was found, see [`cuda`]) on the CUDA execution provider;
//! - `QinsGroupQueryAttention`, GroupQueryAttention over a QINS-coded V cache, float32 or
//!   float16, on the CPU execution provider (its CUDA kernels are built but not registered
//!   until they pass the GPU checks: [`cuda`]'s `register`).
//!
//! Inside ONNX Runtime the kernels run their parallel loops on the session's intra-op thread
//! pool (`KernelContext_ParallelFor`), so `intra_op_num_threads` bounds them like any other
//! op and the library starts no threads of its own. The CPU kernels are also usable directly
//! from Rust ([`cpu::qins_matmul`]), with a [`cpu::parallel::ParallelFor`] of the caller's
//! choice.

pub mod cpu;
pub mod cuda;
pub mod ops;
pub mod ort_api;

#[cfg(test)]
mod how_to_add_an_op;

use std::sync::{Mutex, OnceLock};

use ort_sys::{OrtApiBase, OrtCustomOpDomain, OrtSessionOptions, OrtStatus};

use crate::ort_api::custom_op::CustomOp;
use crate::ort_api::{ffi_guard, Api, Error, Result};

/// The op registrations, each execution provider's own (as ONNX Runtime's custom-op sample
/// does it: `Cpu::RegisterOps`, `Cuda::RegisterOps`), built once and never freed or moved: ORT
/// keeps raw pointers to them in every session that used this library, for as long as those
/// sessions live.
fn custom_ops() -> &'static [CustomOp] {
    static OPS: OnceLock<Vec<CustomOp>> = OnceLock::new();
    OPS.get_or_init(|| cpu::register().into_iter().chain(cuda::register()).map(CustomOp::new).collect())
}

/// Domains handed to ORT, as addresses. The session options only borrow a domain, so it must
/// outlive every session built from them; like the C++ samples, we keep them (one per
/// registration) until the process ends.
static DOMAINS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// The entry point ORT looks up after loading the library.
///
/// # Safety
/// Called by ONNX Runtime with its session options and API base.
#[no_mangle]
pub unsafe extern "system" fn RegisterCustomOps(
    options: *mut OrtSessionOptions,
    api_base: *const OrtApiBase,
) -> *mut OrtStatus {
    // SAFETY: ORT passes its API base (or the caller broke the contract and gets null back).
    let api = unsafe { api_base.as_ref() }.and_then(|base| {
        // SAFETY: GetApi returns ORT's static table for a supported version, else null.
        unsafe { Api::from_raw((base.GetApi)(ort_sys::ORT_API_VERSION)) }
    });
    ffi_guard(api, "RegisterCustomOps", || {
        let api = api.ok_or_else(|| {
            Error::fail(format!("ONNX Runtime does not provide C API version {}", ort_sys::ORT_API_VERSION))
        })?;
        if options.is_null() {
            return Err(Error::invalid("RegisterCustomOps: null OrtSessionOptions"));
        }
        // SAFETY: `options` is ORT's live session options; the domain is created, filled and
        // handed over here, and released only if ORT did not take it.
        unsafe { register_domain(api, options, ops::DOMAIN, custom_ops()) }
    })
    .0
}

/// Creates the domain `name` with `ops` and adds it to `options`.
///
/// # Safety
/// `options` is a live `OrtSessionOptions` of the ORT whose API `api` is.
pub(crate) unsafe fn register_domain(
    api: Api,
    options: *mut OrtSessionOptions,
    name: &std::ffi::CStr,
    ops: &'static [CustomOp],
) -> Result<()> {
    let raw = api.raw();
    let mut domain: *mut OrtCustomOpDomain = std::ptr::null_mut();
    // SAFETY: NUL-terminated name and a live out pointer.
    api.check(unsafe { (raw.CreateCustomOpDomain)(name.as_ptr(), &mut domain) }, "CreateCustomOpDomain")?;
    if domain.is_null() {
        return Err(Error::fail("CreateCustomOpDomain returned null"));
    }
    let filled = ops.iter().try_for_each(|op| {
        // SAFETY: the op is leaked (static), so the pointer stays valid as ORT requires.
        api.check(unsafe { (raw.CustomOpDomain_Add)(domain, op.as_ort()) }, "CustomOpDomain_Add")
    });
    // SAFETY: `options` is live; `domain` is ours.
    let added =
        filled.and_then(|()| api.check(unsafe { (raw.AddCustomOpDomain)(options, domain) }, "AddCustomOpDomain"));
    match added {
        Ok(()) => {
            // A poisoned lock only means another registration panicked after pushing; the
            // vector itself is fine.
            DOMAINS.lock().unwrap_or_else(|p| p.into_inner()).push(domain as usize);
            Ok(())
        }
        Err(e) => {
            // SAFETY: ORT did not take the domain, so nothing else refers to it.
            unsafe { (raw.ReleaseCustomOpDomain)(domain) };
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ffi_guard_contains_panics() {
        // Without an API table the guard can only report on stderr, but it must not unwind.
        let st = ffi_guard(None, "test", || panic!("boom"));
        assert!(st.0.is_null());
        let st = ffi_guard(None, "test", || Err(Error::invalid("bad")));
        assert!(st.0.is_null());
    }

    #[test]
    fn register_without_api_base_does_not_crash() {
        // SAFETY: null pointers are the case under test; nothing is dereferenced.
        let st = unsafe { RegisterCustomOps(std::ptr::null_mut(), std::ptr::null()) };
        assert!(st.is_null());
    }

    /// Every registration is described to ORT as its OpSpec says, and the getters stay in
    /// bounds; each execution provider's own tests check what it registers.
    #[test]
    fn ops_are_described_for_ort() {
        let ops = custom_ops();
        let expected = cpu::register().len() + cuda::register().len();
        assert_eq!(ops.len(), expected);
        assert!(!ops.is_empty());
        for op in ops {
            let raw = op.as_ort();
            let spec = op.spec();
            // SAFETY: `raw` points at a live, leaked OrtCustomOp built by `CustomOp::new`.
            unsafe {
                let o = &*raw;
                assert_eq!(o.version, ort_sys::ORT_API_VERSION);
                assert_eq!(std::ffi::CStr::from_ptr(o.GetName.unwrap()(raw)), spec.name);
                assert_eq!(std::ffi::CStr::from_ptr(o.GetExecutionProviderType.unwrap()(raw)), spec.ep);
                assert_eq!(o.GetInputTypeCount.unwrap()(raw), spec.inputs.len());
                assert_eq!(o.GetOutputTypeCount.unwrap()(raw), spec.outputs.len());
                use ort_sys::OrtCustomOpInputOutputCharacteristic::{INPUT_OUTPUT_OPTIONAL, INPUT_OUTPUT_REQUIRED};
                for i in 0..spec.inputs.len() {
                    let want = if i < spec.required_inputs { INPUT_OUTPUT_REQUIRED } else { INPUT_OUTPUT_OPTIONAL };
                    assert_eq!(o.GetInputCharacteristic.unwrap()(raw, i), want);
                    assert_eq!(o.GetInputType.unwrap()(raw, i), spec.inputs[i]);
                }
                // Out-of-range indices must not read past the tables.
                let undef = ort_sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
                assert_eq!(o.GetInputType.unwrap()(raw, 99), undef);
                assert_eq!(o.GetOutputType.unwrap()(raw, 99), undef);
                assert_eq!(o.GetStartVersion.unwrap()(raw), spec.since_version);
                assert!(o.CreateKernelV2.is_some() && o.KernelComputeV2.is_some() && o.KernelDestroy.is_some());
                assert!(o.CreateKernel.is_none() && o.KernelCompute.is_none());
            }
        }
    }
}
