//! Thin safe wrappers over the few `OrtApi` calls the ops need.
//!
//! The API table comes from the host process (whatever ONNX Runtime loaded this library), so
//! this crate never links `libonnxruntime`. Every wrapper turns a non-null `OrtStatus` into an
//! [`Error`] (releasing the status), so callers only ever see `Result`. [`custom_op`] is the
//! `OrtCustomOp` plumbing; [`ffi_guard`] guards every callback ORT makes into this library.

pub mod custom_op;

use std::any::Any;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{self, NonNull};

use half::f16;
use ort_sys::{
    ONNXTensorElementDataType, OrtApi, OrtErrorCode, OrtKernelContext, OrtKernelInfo, OrtStatus, OrtStatusPtr,
    OrtTensorTypeAndShapeInfo, OrtValue,
};

/// Runs `f` at an FFI boundary: errors become ORT statuses and panics are caught, since
/// unwinding into ONNX Runtime's C++ frames is undefined behaviour. Every callback this
/// library hands to ORT that returns a status goes through here.
///
/// Without an API table no status can be made; the error is printed and "success" returned,
/// which is the best that can be done (ORT then reports the op as unknown or unrun).
pub fn ffi_guard(api: Option<Api>, what: &str, f: impl FnOnce() -> Result<()>) -> OrtStatusPtr {
    let err = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return OrtStatusPtr::default(),
        Ok(Err(e)) => e,
        Err(payload) => Error::fail(format!("{what}: internal error (panic: {})", panic_message(&*payload))),
    };
    match api {
        // Status creation only allocates; a panic there is not worth a second guard.
        Some(api) => api.status(&err),
        None => {
            eprintln!("qins_provider: {what}: {err} (no OrtApi to report it through)");
            OrtStatusPtr::default()
        }
    }
}

/// The message of a caught panic's payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "non-string payload"
    }
}

/// An error on its way back to ONNX Runtime as an `OrtStatus`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub code: OrtErrorCode,
    pub msg: String,
}

impl Error {
    /// The model or its inputs are wrong (shapes, types, attributes).
    pub fn invalid(msg: impl Into<String>) -> Error {
        Error { code: OrtErrorCode::ORT_INVALID_ARGUMENT, msg: msg.into() }
    }

    /// Anything else: an ORT call failed, or a bug (a caught panic).
    pub fn fail(msg: impl Into<String>) -> Error {
        Error { code: OrtErrorCode::ORT_FAIL, msg: msg.into() }
    }

    /// Prefixes the message, keeping the code (used to name the node).
    pub fn context(self, prefix: impl fmt::Display) -> Error {
        Error { code: self.code, msg: format!("{prefix}: {}", self.msg) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// ONNX element type codes (TensorProto.DataType). Kept as plain integers: reading an ORT enum
/// we did not compile against straight into a Rust enum would be undefined behaviour if a newer
/// runtime reports a value the binding lacks.
pub mod elem {
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT32: i32 = 6;
    pub const FLOAT16: i32 = 10;

    pub fn name(t: i32) -> String {
        let s = match t {
            0 => "undefined",
            1 => "float",
            2 => "uint8",
            3 => "int8",
            4 => "uint16",
            5 => "int16",
            6 => "int32",
            7 => "int64",
            8 => "string",
            9 => "bool",
            10 => "float16",
            11 => "double",
            12 => "uint32",
            13 => "uint64",
            16 => "bfloat16",
            _ => return format!("element type {t}"),
        };
        s.to_string()
    }
}

/// Rust types a tensor buffer may be viewed as.
pub trait Elem: Copy + Send + Sync + 'static {
    const ONNX: i32;
}

impl Elem for f32 {
    const ONNX: i32 = elem::FLOAT;
}

impl Elem for f16 {
    const ONNX: i32 = elem::FLOAT16;
}

impl Elem for u8 {
    const ONNX: i32 = elem::UINT8;
}

impl Elem for i32 {
    const ONNX: i32 = elem::INT32;
}

/// Element type and shape of a tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub elem: i32,
    pub shape: Vec<i64>,
}

impl TensorInfo {
    /// Number of elements, or an error when a dimension is negative or the product overflows.
    pub fn numel(&self) -> Result<usize> {
        self.shape.iter().try_fold(1usize, |acc, &d| {
            usize::try_from(d)
                .ok()
                .and_then(|d| acc.checked_mul(d))
                .ok_or_else(|| Error::invalid(format!("bad tensor shape {:?}", self.shape)))
        })
    }
}

impl fmt::Display for TensorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", elem::name(self.elem), self.shape)
    }
}

/// The host's API table. Copyable: ORT keeps the table alive for the whole process.
#[derive(Clone, Copy)]
pub struct Api(&'static OrtApi);

impl Api {
    /// # Safety
    /// `api` must be null or the table returned by `OrtApiBase::GetApi` (static in ORT).
    pub unsafe fn from_raw(api: *const OrtApi) -> Option<Api> {
        // SAFETY: per the contract, a non-null pointer is ORT's static API table.
        unsafe { api.as_ref() }.map(Api)
    }

    pub fn raw(self) -> &'static OrtApi {
        self.0
    }

    /// An `OrtStatus` carrying `err`; ORT takes ownership.
    pub fn status(self, err: &Error) -> OrtStatusPtr {
        // Interior NULs would truncate the message; nothing else can make CString fail.
        let msg = CString::new(err.msg.replace('\0', " ")).unwrap_or_default();
        // SAFETY: CreateStatus copies the message; the pointer is valid for the call.
        unsafe { (self.0.CreateStatus)(err.code, msg.as_ptr()) }
    }

    /// Converts (and releases) a status returned by an ORT call.
    pub fn check(self, status: OrtStatusPtr, what: &str) -> Result<()> {
        let Some(st) = NonNull::new(status.0) else { return Ok(()) };
        let st: *mut OrtStatus = st.as_ptr();
        // SAFETY: `st` is a live status that we own; it is released exactly once, after its
        // message has been copied.
        unsafe {
            let code = (self.0.GetErrorCode)(st) as i32;
            let msg = (self.0.GetErrorMessage)(st);
            let msg = if msg.is_null() { String::new() } else { CStr::from_ptr(msg).to_string_lossy().into_owned() };
            (self.0.ReleaseStatus)(st);
            let code = if code == OrtErrorCode::ORT_INVALID_ARGUMENT as i32 {
                OrtErrorCode::ORT_INVALID_ARGUMENT
            } else {
                OrtErrorCode::ORT_FAIL
            };
            Err(Error { code, msg: format!("{what}: {msg}") })
        }
    }
}

/// Read access to an `OrtKernelInfo` during kernel creation.
#[derive(Clone, Copy)]
pub struct KernelInfo {
    api: Api,
    ptr: *const OrtKernelInfo,
}

impl KernelInfo {
    /// # Safety
    /// `ptr` must be the kernel info ORT passed to `CreateKernelV2`, used only during that call.
    pub unsafe fn new(api: Api, ptr: *const OrtKernelInfo) -> Result<KernelInfo> {
        if ptr.is_null() {
            return Err(Error::fail("ONNX Runtime passed a null OrtKernelInfo"));
        }
        Ok(KernelInfo { api, ptr })
    }

    /// An int attribute; a missing one is an error that names it.
    pub fn attr_i64(&self, name: &CStr) -> Result<i64> {
        let mut v = 0i64;
        // SAFETY: valid info, NUL-terminated name and a live out pointer.
        let st = unsafe { (self.api.0.KernelInfoGetAttribute_int64)(self.ptr, name.as_ptr(), &mut v) };
        self.api
            .check(st, &format!("missing or non-int attribute '{}'", name.to_string_lossy()))
            .map_err(|e| Error::invalid(e.msg))?;
        Ok(v)
    }

    /// An optional int attribute: `default` where the node does not carry it. Any other
    /// failure (an attribute of another type) is an error that names it.
    pub fn attr_i64_or(&self, name: &CStr, default: i64) -> Result<i64> {
        match self.attr_i64(name) {
            // ORT's words for an absent attribute (OpNodeProtoHelper::GetAttr).
            Err(e) if e.msg.contains("No attribute with name") => Ok(default),
            r => r,
        }
    }

    /// An optional float attribute: `default` where the node does not carry it.
    pub fn attr_f32_or(&self, name: &CStr, default: f32) -> Result<f32> {
        let mut v = 0f32;
        // SAFETY: valid info, NUL-terminated name and a live out pointer.
        let st = unsafe { (self.api.0.KernelInfoGetAttribute_float)(self.ptr, name.as_ptr(), &mut v) };
        match self.api.check(st, &format!("missing or non-float attribute '{}'", name.to_string_lossy())) {
            Ok(()) => Ok(v),
            Err(e) if e.msg.contains("No attribute with name") => Ok(default),
            Err(e) => Err(Error::invalid(e.msg)),
        }
    }

    /// Inputs the node has (an optional one left out at the end is not counted).
    pub fn input_count(&self) -> Result<usize> {
        let mut n = 0usize;
        // SAFETY: valid info and out pointer.
        let st = unsafe { (self.api.0.KernelInfo_GetInputCount)(self.ptr, &mut n) };
        self.api.check(st, "KernelInfo_GetInputCount")?;
        Ok(n)
    }

    /// Whether input `index` is a constant initializer (its value fixed for the session).
    pub fn input_is_constant(&self, index: usize) -> Result<bool> {
        let mut constant: c_int = 0;
        let mut value: *const OrtValue = ptr::null();
        // SAFETY: valid info and out pointers; ORT keeps ownership of the value, which is not used.
        let st = unsafe { (self.api.0.KernelInfoGetConstantInput_tensor)(self.ptr, index, &mut constant, &mut value) };
        self.api.check(st, "KernelInfoGetConstantInput_tensor")?;
        Ok(constant != 0)
    }

    pub fn node_name(&self) -> Result<String> {
        let mut len = 0usize;
        // SAFETY: a null buffer asks for the size (including the NUL).
        let st = unsafe { (self.api.0.KernelInfo_GetNodeName)(self.ptr, ptr::null_mut(), &mut len) };
        self.api.check(st, "KernelInfo_GetNodeName")?;
        let mut buf = vec![0u8; len.max(1)];
        len = buf.len();
        // SAFETY: `buf` holds `len` writable bytes.
        let st = unsafe { (self.api.0.KernelInfo_GetNodeName)(self.ptr, buf.as_mut_ptr().cast::<c_char>(), &mut len) };
        self.api.check(st, "KernelInfo_GetNodeName")?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }
}

/// The `OrtKernelContext` of one `Compute` call. Borrows of tensors it hands out live no longer
/// than the context itself, which ORT keeps valid for the duration of the call.
pub struct KernelCtx {
    api: Api,
    ptr: *mut OrtKernelContext,
}

impl KernelCtx {
    /// # Safety
    /// `ptr` must be the context ORT passed to `KernelComputeV2`, and the returned value must
    /// not outlive that call.
    pub unsafe fn new(api: Api, ptr: *mut OrtKernelContext) -> Result<KernelCtx> {
        if ptr.is_null() {
            return Err(Error::fail("ONNX Runtime passed a null OrtKernelContext"));
        }
        Ok(KernelCtx { api, ptr })
    }

    pub fn input_count(&self) -> Result<usize> {
        let mut n = 0usize;
        // SAFETY: valid context and out pointer.
        let st = unsafe { (self.api.0.KernelContext_GetInputCount)(self.ptr, &mut n) };
        self.api.check(st, "KernelContext_GetInputCount")?;
        Ok(n)
    }

    /// Input `index`, which the node must give (past the count or null is an error).
    pub fn input(&self, index: usize) -> Result<Tensor<'_>> {
        self.optional_input(index)?.ok_or_else(|| Error::invalid(format!("input {index} is missing")))
    }

    /// Input `index` where the node gives it (an optional input left out is either past the
    /// count or null, depending on its position).
    pub fn optional_input(&self, index: usize) -> Result<Option<Tensor<'_>>> {
        if index >= self.input_count()? {
            return Ok(None);
        }
        // SAFETY: the index was checked against the count.
        unsafe { self.input_unchecked(index) }
    }

    /// Input `index`, or None where ORT passes a null value.
    ///
    /// # Safety
    /// `index` is below `input_count()`.
    unsafe fn input_unchecked(&self, index: usize) -> Result<Option<Tensor<'_>>> {
        let mut v: *const OrtValue = ptr::null();
        // SAFETY: valid context and out pointer; the index is in range (the caller's contract).
        let st = unsafe { (self.api.0.KernelContext_GetInput)(self.ptr, index, &mut v) };
        self.api.check(st, "KernelContext_GetInput")?;
        if v.is_null() {
            return Ok(None);
        }
        let info = tensor_info(self.api, v)?;
        Ok(Some(Tensor { api: self.api, value: v.cast_mut(), info, _ctx: std::marker::PhantomData }))
    }

    /// Allocates output `index` with `shape`.
    pub fn output(&self, index: usize, shape: &[i64]) -> Result<Tensor<'_>> {
        let mut v: *mut OrtValue = ptr::null_mut();
        // SAFETY: valid context; `shape` is read for the duration of the call.
        let st = unsafe { (self.api.0.KernelContext_GetOutput)(self.ptr, index, shape.as_ptr(), shape.len(), &mut v) };
        self.api.check(st, "KernelContext_GetOutput")?;
        if v.is_null() {
            return Err(Error::fail(format!("ONNX Runtime returned no buffer for output {index}")));
        }
        let info = tensor_info(self.api, v)?;
        if info.shape != shape {
            return Err(Error::fail(format!("output {index} was allocated as {info}, asked for {shape:?}")));
        }
        Ok(Tensor { api: self.api, value: v, info, _ctx: std::marker::PhantomData })
    }
}

impl KernelCtx {
    /// The CUDA stream ORT runs this node on (`cudaStream_t`); null if the EP has none.
    pub fn gpu_stream(&self) -> Result<*mut c_void> {
        let mut s: *mut c_void = ptr::null_mut();
        // SAFETY: valid context and out pointer.
        let st = unsafe { (self.api.0.KernelContext_GetGPUComputeStream)(self.ptr, &mut s) };
        self.api.check(st, "KernelContext_GetGPUComputeStream")?;
        Ok(s)
    }

    /// An execution-provider resource (`KernelContext_GetResource`), e.g. the CUDA EP's cuBLAS
    /// handle; null where the EP does not provide it.
    pub fn resource(&self, version: i32, id: i32) -> Result<*mut c_void> {
        let mut r: *mut c_void = ptr::null_mut();
        // SAFETY: valid context and out pointer; ORT fills it or leaves it null.
        let st = unsafe { (self.api.0.KernelContext_GetResource)(self.ptr, version, id, &mut r) };
        self.api.check(st, "KernelContext_GetResource")?;
        Ok(r)
    }

    /// `bytes` of scratch on device `device` of the allocator named `name` (ORT's "Cuda"
    /// arena), freed when the returned guard drops.
    pub fn scratch(&self, name: &CStr, device: i32, bytes: usize) -> Result<Scratch> {
        let raw = self.api.0;
        let mut info: *mut ort_sys::OrtMemoryInfo = ptr::null_mut();
        // SAFETY: NUL-terminated name, valid out pointer; released below.
        let st = unsafe {
            (raw.CreateMemoryInfo)(
                name.as_ptr(),
                ort_sys::OrtAllocatorType::OrtDeviceAllocator,
                device,
                ort_sys::OrtMemType::OrtMemTypeDefault,
                &mut info,
            )
        };
        self.api.check(st, "CreateMemoryInfo")?;
        let mut alloc: *mut ort_sys::OrtAllocator = ptr::null_mut();
        // SAFETY: valid context and memory info.
        let st = unsafe { (raw.KernelContext_GetAllocator)(self.ptr, info, &mut alloc) };
        // SAFETY: created above, released once; the allocator does not keep it.
        unsafe { (raw.ReleaseMemoryInfo)(info) };
        self.api.check(st, "KernelContext_GetAllocator")?;
        if alloc.is_null() {
            return Err(Error::fail("ONNX Runtime returned no device allocator"));
        }
        // SAFETY: a live allocator from ORT.
        let p = unsafe { (*alloc).Alloc.map(|f| f(alloc, bytes.max(1))) }.unwrap_or(ptr::null_mut());
        if p.is_null() {
            // SAFETY: obtained above, released once.
            unsafe { (raw.ReleaseAllocator)(alloc) };
            return Err(Error::fail(format!("could not allocate {bytes} bytes of device scratch")));
        }
        Ok(Scratch { api: self.api, alloc, ptr: p })
    }
}

/// Device memory from an ORT allocator. ORT's CUDA allocator is stream-ordered for the
/// session's stream, so freeing right after the last launch that uses it is safe.
pub struct Scratch {
    api: Api,
    alloc: *mut ort_sys::OrtAllocator,
    pub ptr: *mut c_void,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from this allocator's Alloc; both are released once.
        unsafe {
            if let Some(free) = (*self.alloc).Free {
                free(self.alloc, self.ptr);
            }
            (self.api.0.ReleaseAllocator)(self.alloc);
        }
    }
}

impl KernelCtx {
    /// Runs `run(data, i)` for every `i` in `0..tasks` on the session's intra-op thread pool
    /// (`KernelContext_ParallelFor`, C API 17): on its pool threads and the calling thread, or
    /// all on the calling thread when the session has a single intra-op thread. Returns after
    /// every call has finished. `num_batch = 0` lets ORT hand out iterations one at a time to
    /// whichever thread is free.
    ///
    /// # Safety
    /// `run` must be safe to call with `data` from several threads at once, and must not
    /// unwind (ORT's C++ frames are on the stack); `data` must outlive this call.
    pub unsafe fn parallel_for_raw(
        &self,
        run: unsafe extern "C" fn(*mut c_void, usize),
        tasks: usize,
        data: *mut c_void,
    ) -> Result<()> {
        // SAFETY: valid context; the caller vouches for `run` and `data`.
        let st = unsafe { (self.api.0.KernelContext_ParallelFor)(self.ptr, run, tasks, 0, data) };
        self.api.check(st, "KernelContext_ParallelFor")
    }
}

/// One input or output tensor of a running kernel.
pub struct Tensor<'ctx> {
    api: Api,
    value: *mut OrtValue,
    pub info: TensorInfo,
    _ctx: std::marker::PhantomData<&'ctx KernelCtx>,
}

impl<'ctx> Tensor<'ctx> {
    fn data_ptr<T: Elem>(&self) -> Result<(*mut T, usize)> {
        if self.info.elem != T::ONNX {
            return Err(Error::invalid(format!(
                "tensor is {}, expected {}",
                elem::name(self.info.elem),
                elem::name(T::ONNX)
            )));
        }
        let len = self.info.numel()?;
        if len == 0 {
            // An empty tensor may have no buffer at all; a dangling, aligned pointer is what an
            // empty slice needs.
            return Ok((NonNull::<T>::dangling().as_ptr(), 0));
        }
        let mut p: *mut c_void = ptr::null_mut();
        // SAFETY: `value` is a live tensor of this context.
        let st = unsafe { (self.api.0.GetTensorMutableData)(self.value, &mut p) };
        self.api.check(st, "GetTensorMutableData")?;
        if p.is_null() || !(p as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return Err(Error::fail(format!("tensor buffer {p:p} is null or misaligned for {}", elem::name(T::ONNX))));
        }
        Ok((p.cast::<T>(), len))
    }

    /// The buffer's address, wherever it lives (a device pointer on a GPU EP), after the same
    /// type check as [`HostTensor::slice`]. Null for an empty tensor. Only `unsafe` code can do
    /// anything with it.
    pub fn raw<T: Elem>(&self) -> Result<*mut c_void> {
        let (p, len) = self.data_ptr::<T>()?;
        Ok(if len == 0 { ptr::null_mut() } else { p.cast() })
    }

    /// The tensor as host memory, which safe code may read as a slice: refused unless ORT says
    /// the buffer lives in CPU memory (a CUDA EP's tensors live on the GPU, where a slice
    /// would be undefined behaviour on first touch).
    pub fn host(self) -> Result<HostTensor<'ctx>> {
        let mut info: *const ort_sys::OrtMemoryInfo = ptr::null();
        // SAFETY: `value` is a live tensor of this context; the info it returns is ORT's, not
        // ours to release, and lives as long as the value.
        let st = unsafe { (self.api.0.GetTensorMemoryInfo)(self.value, &mut info) };
        self.api.check(st, "GetTensorMemoryInfo")?;
        if info.is_null() {
            return Err(Error::fail("GetTensorMemoryInfo returned null"));
        }
        let mut device = ort_sys::OrtMemoryInfoDeviceType::OrtMemoryInfoDeviceType_GPU;
        // SAFETY: live info and out pointer.
        unsafe { (self.api.0.MemoryInfoGetDeviceType)(info, &mut device) };
        if device != ort_sys::OrtMemoryInfoDeviceType::OrtMemoryInfoDeviceType_CPU {
            return Err(Error::fail(format!("a host view of a tensor in {device:?} memory was asked for (a bug)")));
        }
        Ok(HostTensor { t: self })
    }
}

/// A tensor whose buffer ORT placed in CPU memory ([`Tensor::host`]).
pub struct HostTensor<'ctx> {
    t: Tensor<'ctx>,
}

impl<'ctx> HostTensor<'ctx> {
    pub fn info(&self) -> &TensorInfo {
        &self.t.info
    }

    /// The tensor's elements.
    pub fn slice<T: Elem>(&self) -> Result<&'ctx [T]> {
        let (p, len) = self.t.data_ptr::<T>()?;
        // SAFETY: ORT owns a buffer of `len` elements of type T (checked above) at `p`, in host
        // memory (checked by `Tensor::host`), alive until Compute returns, which outlives
        // 'ctx. Inputs are not written during Compute.
        Ok(unsafe { std::slice::from_raw_parts(p, len) })
    }

    /// The tensor's elements, writable. Only for outputs of this kernel; consuming the handle
    /// keeps a second mutable view from being made through it.
    pub fn into_slice_mut<T: Elem>(self) -> Result<&'ctx mut [T]> {
        let (p, len) = self.t.data_ptr::<T>()?;
        // SAFETY: as in `slice`; an output buffer belongs to this kernel alone during Compute
        // (no in-place or alias hints are declared) and `output` is called once per index.
        Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
    }
}

fn tensor_info(api: Api, v: *const OrtValue) -> Result<TensorInfo> {
    let mut value_type = 0i32;
    // SAFETY: `v` is a live value; the out pointer is an i32, the size of ORT's enum.
    let st = unsafe { (api.0.GetValueType)(v, (&mut value_type as *mut i32).cast()) };
    api.check(st, "GetValueType")?;
    if value_type != ort_sys::ONNXType::ONNX_TYPE_TENSOR as i32 {
        return Err(Error::invalid(format!("expected a tensor, got ONNX value type {value_type}")));
    }
    let mut info: *mut OrtTensorTypeAndShapeInfo = ptr::null_mut();
    // SAFETY: `v` is a live tensor; `info` is released below on every path.
    let st = unsafe { (api.0.GetTensorTypeAndShape)(v, &mut info) };
    api.check(st, "GetTensorTypeAndShape")?;
    if info.is_null() {
        return Err(Error::fail("GetTensorTypeAndShape returned null"));
    }
    let res = (|| {
        let mut et = 0i32;
        // SAFETY: live info; i32 out pointer as above.
        let st =
            unsafe { (api.0.GetTensorElementType)(info, (&mut et as *mut i32).cast::<ONNXTensorElementDataType>()) };
        api.check(st, "GetTensorElementType")?;
        let mut rank = 0usize;
        // SAFETY: live info.
        let st = unsafe { (api.0.GetDimensionsCount)(info, &mut rank) };
        api.check(st, "GetDimensionsCount")?;
        let mut shape = vec![0i64; rank];
        // SAFETY: `shape` has room for `rank` dims.
        let st = unsafe { (api.0.GetDimensions)(info, shape.as_mut_ptr(), rank) };
        api.check(st, "GetDimensions")?;
        Ok(TensorInfo { elem: et, shape })
    })();
    // SAFETY: `info` was created above and is released once.
    unsafe { (api.0.ReleaseTensorTypeAndShapeInfo)(info) };
    res
}
