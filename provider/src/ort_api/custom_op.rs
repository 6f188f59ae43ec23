//! The `OrtCustomOp` plumbing that exposes a kernel to ONNX Runtime: what one registration
//! says about its op ([`OpSpec`]), the callbacks ORT makes, and the kernel object behind them
//! ([`Kernel`]). Each execution provider's module builds its `OpSpec`s (`cpu::register`,
//! `cuda::register`); nothing here knows an op.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::mem::MaybeUninit;

use ort_sys::{
    ONNXTensorElementDataType, OrtApi, OrtCustomOp, OrtCustomOpInputOutputCharacteristic, OrtKernelContext,
    OrtKernelInfo, OrtMemType, OrtStatusPtr,
};

use super::{ffi_guard, Api, Error, KernelCtx, KernelInfo, Result};

/// The CPU execution provider's name as ORT spells it.
pub const CPU_EP: &CStr = c"CPUExecutionProvider";
/// The CUDA execution provider's name as ORT spells it.
pub const CUDA_EP: &CStr = c"CUDAExecutionProvider";

/// One kernel instance (one node of one session). ORT may run a session from several threads
/// at once, so `compute` takes `&self` and kernels must be `Sync`.
pub(crate) trait Kernel: Send + Sync {
    fn compute(&self, ctx: &KernelCtx) -> Result<()>;
}

/// What ORT needs to know about one registered (name, EP, type) variant of an op.
pub(crate) struct OpSpec {
    pub name: &'static CStr,
    pub ep: &'static CStr,
    pub inputs: &'static [ONNXTensorElementDataType],
    /// Inputs past this many are optional.
    pub required_inputs: usize,
    pub outputs: &'static [ONNXTensorElementDataType],
    /// Inputs the kernel reads on the host even on a GPU execution provider (ORT copies them
    /// there: `OrtMemTypeCPUInput`), such as a length that sizes the outputs.
    pub host_inputs: &'static [usize],
    pub since_version: c_int,
    pub end_version: c_int,
    pub create: fn(&KernelInfo) -> Result<Box<dyn Kernel>>,
}

/// An `OrtCustomOp` followed by our data. `repr(C)` puts `ort` at offset 0, so the
/// `*const OrtCustomOp` ORT hands back to every callback is also a `*const CustomOp`.
#[repr(C)]
pub(crate) struct CustomOp {
    ort: OrtCustomOp,
    spec: OpSpec,
}

/// The kernel object behind ORT's `void*` kernel handle.
struct KernelBox {
    api: Api,
    kernel: Box<dyn Kernel>,
}

impl CustomOp {
    pub fn new(spec: OpSpec) -> CustomOp {
        // Zeroing first keeps this correct whatever optional (api-18+) fields the ort-sys
        // features add: every field is an integer or a nullable function pointer, and ORT only
        // reads the fields that `version` says exist.
        // SAFETY: all-zero is a valid OrtCustomOp (0 and `None` for every field).
        let mut ort: OrtCustomOp = unsafe { MaybeUninit::zeroed().assume_init() };
        ort.version = ort_sys::ORT_API_VERSION;
        ort.CreateKernel = None;
        ort.KernelCompute = None;
        ort.CreateKernelV2 = Some(create_kernel);
        ort.KernelComputeV2 = Some(compute_kernel);
        ort.KernelDestroy = Some(destroy_kernel);
        ort.GetName = Some(get_name);
        ort.GetExecutionProviderType = Some(get_ep);
        ort.GetInputType = Some(get_input_type);
        ort.GetInputTypeCount = Some(get_input_count);
        ort.GetOutputType = Some(get_output_type);
        ort.GetOutputTypeCount = Some(get_output_count);
        ort.GetInputCharacteristic = Some(get_input_characteristic);
        ort.GetOutputCharacteristic = Some(get_output_characteristic);
        ort.GetInputMemoryType = Some(get_input_memory_type);
        ort.GetVariadicInputMinArity = Some(variadic_min_arity);
        ort.GetVariadicInputHomogeneity = Some(variadic_homogeneity);
        ort.GetVariadicOutputMinArity = Some(variadic_min_arity);
        ort.GetVariadicOutputHomogeneity = Some(variadic_homogeneity);
        ort.GetStartVersion = Some(get_start_version);
        ort.GetEndVersion = Some(get_end_version);
        CustomOp { ort, spec }
    }

    pub fn as_ort(&self) -> *const OrtCustomOp {
        &self.ort
    }

    #[cfg(test)]
    pub fn spec(&self) -> &OpSpec {
        &self.spec
    }
}

/// # Safety
/// `op` must be null or point at the `ort` field of a live `CustomOp`.
unsafe fn spec<'a>(op: *const OrtCustomOp) -> Option<&'a OpSpec> {
    // SAFETY: `ort` is the first field of the repr(C) `CustomOp`, so the cast is exact; ops
    // are leaked at registration and live for the process.
    unsafe { op.cast::<CustomOp>().as_ref() }.map(|c| &c.spec)
}

// The getters below cannot panic (no indexing, no allocation), so they need no guard.

unsafe extern "system" fn get_name(op: *const OrtCustomOp) -> *const c_char {
    // SAFETY: ORT passes back the op it was given.
    unsafe { spec(op) }.map_or(std::ptr::null(), |s| s.name.as_ptr())
}

unsafe extern "system" fn get_ep(op: *const OrtCustomOp) -> *const c_char {
    // SAFETY: as above.
    unsafe { spec(op) }.map_or(std::ptr::null(), |s| s.ep.as_ptr())
}

unsafe extern "system" fn get_input_type(op: *const OrtCustomOp, index: usize) -> ONNXTensorElementDataType {
    // SAFETY: as above.
    unsafe { spec(op) }
        .and_then(|s| s.inputs.get(index).copied())
        .unwrap_or(ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED)
}

unsafe extern "system" fn get_input_count(op: *const OrtCustomOp) -> usize {
    // SAFETY: as above.
    unsafe { spec(op) }.map_or(0, |s| s.inputs.len())
}

unsafe extern "system" fn get_output_type(op: *const OrtCustomOp, index: usize) -> ONNXTensorElementDataType {
    // SAFETY: as above.
    unsafe { spec(op) }
        .and_then(|s| s.outputs.get(index).copied())
        .unwrap_or(ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED)
}

unsafe extern "system" fn get_output_count(op: *const OrtCustomOp) -> usize {
    // SAFETY: as above.
    unsafe { spec(op) }.map_or(0, |s| s.outputs.len())
}

unsafe extern "system" fn get_input_characteristic(
    op: *const OrtCustomOp,
    index: usize,
) -> OrtCustomOpInputOutputCharacteristic {
    // SAFETY: as above.
    match unsafe { spec(op) } {
        Some(s) if index >= s.required_inputs => OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL,
        _ => OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED,
    }
}

unsafe extern "system" fn get_output_characteristic(
    _: *const OrtCustomOp,
    _: usize,
) -> OrtCustomOpInputOutputCharacteristic {
    OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED
}

unsafe extern "system" fn get_input_memory_type(op: *const OrtCustomOp, index: usize) -> OrtMemType {
    // SAFETY: as above.
    match unsafe { spec(op) } {
        Some(s) if s.host_inputs.contains(&index) => OrtMemType::OrtMemTypeCPUInput,
        _ => OrtMemType::OrtMemTypeDefault,
    }
}

unsafe extern "system" fn variadic_min_arity(_: *const OrtCustomOp) -> c_int {
    1
}

unsafe extern "system" fn variadic_homogeneity(_: *const OrtCustomOp) -> c_int {
    0
}

unsafe extern "system" fn get_start_version(op: *const OrtCustomOp) -> c_int {
    // SAFETY: as above.
    unsafe { spec(op) }.map_or(1, |s| s.since_version)
}

unsafe extern "system" fn get_end_version(op: *const OrtCustomOp) -> c_int {
    // SAFETY: as above.
    unsafe { spec(op) }.map_or(1, |s| s.end_version)
}

unsafe extern "system" fn create_kernel(
    op: *const OrtCustomOp,
    api: *const OrtApi,
    info: *const OrtKernelInfo,
    kernel: *mut *mut c_void,
) -> OrtStatusPtr {
    // SAFETY: ORT passes its own API table.
    let api = unsafe { Api::from_raw(api) };
    ffi_guard(api, "QINS kernel creation", || {
        let api = api.ok_or_else(|| Error::fail("null OrtApi"))?;
        // SAFETY: ORT passes back the op it was given.
        let spec = unsafe { spec(op) }.ok_or_else(|| Error::fail("null OrtCustomOp"))?;
        if kernel.is_null() {
            return Err(Error::fail("null kernel out-pointer"));
        }
        // SAFETY: `info` is valid for this call only, and KernelInfo does not escape it.
        let info = unsafe { KernelInfo::new(api, info) }?;
        let k = (spec.create)(&info)?;
        // SAFETY: checked non-null above; ORT hands this pointer back to compute and destroy.
        unsafe { *kernel = Box::into_raw(Box::new(KernelBox { api, kernel: k })).cast() };
        Ok(())
    })
}

unsafe extern "system" fn compute_kernel(kernel: *mut c_void, context: *mut OrtKernelContext) -> OrtStatusPtr {
    // SAFETY: `kernel` is null or the KernelBox made by `create_kernel`, alive until destroy;
    // only shared references are made, since ORT may call Compute from several threads.
    let Some(kb) = (unsafe { kernel.cast::<KernelBox>().as_ref() }) else {
        // Without the kernel there is no API table to build a status with.
        return OrtStatusPtr::default();
    };
    ffi_guard(Some(kb.api), "QINS kernel compute", || {
        // SAFETY: `context` is valid for this call, and `ctx` is dropped before it returns.
        let ctx = unsafe { KernelCtx::new(kb.api, context) }?;
        kb.kernel.compute(&ctx)
    })
}

unsafe extern "system" fn destroy_kernel(kernel: *mut c_void) {
    if kernel.is_null() {
        return;
    }
    // A panicking Drop must not unwind into ORT; there is no status to report it through.
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: made by Box::into_raw in `create_kernel`; ORT destroys each kernel once.
        drop(unsafe { Box::from_raw(kernel.cast::<KernelBox>()) });
    });
}
