//! The few CUDA driver entry points the library uses, from `libcuda.so.1` opened at run time,
//! so that the library loads (and its CPU kernels work) on machines without CUDA.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

use libloading::Library;

use crate::ort_api::{Error, Result};

pub type CuResult = c_int;
pub type CuContext = *mut c_void;
pub type CuModule = *mut c_void;
pub type CuFunction = *mut c_void;
pub type CuDevicePtr = u64;

const CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: c_int = 9;

macro_rules! driver_fns {
    (required { $($name:ident: fn($($arg:ty),*);)* } optional { $($opt:ident: fn($($oarg:ty),*);)* }) => {
        /// Function pointers into `libcuda`; the library stays loaded for the process. The
        /// optional ones are absent from older drivers.
        #[allow(non_snake_case)]
        pub struct Driver {
            _lib: Library,
            $(pub $name: unsafe extern "C" fn($($arg),*) -> CuResult,)*
            $(pub $opt: Option<unsafe extern "C" fn($($oarg),*) -> CuResult>,)*
        }

        impl Driver {
            #[allow(non_snake_case)]
            fn open() -> std::result::Result<Driver, String> {
                // SAFETY: loading the NVIDIA driver library runs its initialisers, which is
                // what every CUDA program does.
                let lib = unsafe { Library::new("libcuda.so.1") }.map_err(|e| format!("cannot load libcuda.so.1: {e}"))?;
                $(
                    // SAFETY: the symbol has this C signature in every CUDA driver >= 11.
                    let $name = *unsafe { lib.get::<unsafe extern "C" fn($($arg),*) -> CuResult>(concat!(stringify!($name), "\0").as_bytes()) }
                        .map_err(|e| format!("libcuda.so.1 lacks {}: {e}", stringify!($name)))?;
                )*
                $(
                    // SAFETY: as above, in the drivers that have it.
                    let $opt = unsafe { lib.get::<unsafe extern "C" fn($($oarg),*) -> CuResult>(concat!(stringify!($opt), "\0").as_bytes()) }
                        .ok()
                        .map(|f| *f);
                )*
                Ok(Driver { _lib: lib, $($name,)* $($opt,)* })
            }
        }
    };
}

driver_fns! {
    required {
        cuInit: fn(c_uint);
        cuGetErrorString: fn(CuResult, *mut *const c_char);
        cuCtxGetCurrent: fn(*mut CuContext);
        cuCtxSetCurrent: fn(CuContext);
        cuCtxGetDevice: fn(*mut c_int);
        cuDeviceGetAttribute: fn(*mut c_int, c_int, c_int);
        cuDevicePrimaryCtxRetain: fn(*mut CuContext, c_int);
        cuPointerGetAttribute: fn(*mut c_void, c_int, CuDevicePtr);
        cuModuleLoadData: fn(*mut CuModule, *const c_void);
        cuModuleGetFunction: fn(*mut CuFunction, CuModule, *const c_char);
        cuModuleGetGlobal_v2: fn(*mut CuDevicePtr, *mut usize, CuModule, *const c_char);
        cuMemcpyHtoD_v2: fn(CuDevicePtr, *const c_void, usize);
        cuFuncSetAttribute: fn(CuFunction, c_int, c_int);
        cuOccupancyMaxActiveBlocksPerMultiprocessor: fn(*mut c_int, CuFunction, c_int, usize);
        cuLaunchKernel: fn(CuFunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, *mut c_void, *mut *mut c_void, *mut *mut c_void);
    }
    optional {
        // CUDA >= 12.0 drivers: launches with attributes (programmatic dependent launch).
        cuLaunchKernelEx: fn(*const LaunchConfig, CuFunction, *mut *mut c_void, *mut *mut c_void);
    }
}

/// `CUlaunchAttribute`: an attribute id, padding to 8 bytes, then a 64-byte value union.
#[repr(C)]
pub struct LaunchAttribute {
    pub id: c_int,
    pub pad: [u8; 4],
    pub value: [u8; 64],
}

/// `CUlaunchConfig`.
#[repr(C)]
pub struct LaunchConfig {
    pub grid: [c_uint; 3],
    pub block: [c_uint; 3],
    pub shared: c_uint,
    pub stream: *mut c_void,
    pub attrs: *mut LaunchAttribute,
    pub num_attrs: c_uint,
}

/// `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`.
pub const LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION: c_int = 6;

// SAFETY: function pointers and a library handle; the driver API is thread-safe.
unsafe impl Send for Driver {}
// SAFETY: as above.
unsafe impl Sync for Driver {}

/// The driver, opened and initialised once.
pub fn driver() -> Result<&'static Driver> {
    static D: OnceLock<std::result::Result<Driver, String>> = OnceLock::new();
    D.get_or_init(|| {
        let d = Driver::open()?;
        // SAFETY: cuInit(0) is the documented first call; repeated calls are harmless.
        let r = unsafe { (d.cuInit)(0) };
        if r != 0 {
            return Err(format!("cuInit failed: {}", d.error_string(r)));
        }
        Ok(d)
    })
    .as_ref()
    .map_err(|e| Error::fail(e.clone()))
}

impl Driver {
    pub fn error_string(&self, r: CuResult) -> String {
        let mut s: *const c_char = std::ptr::null();
        // SAFETY: valid out pointer; the driver returns a static string or leaves it null.
        unsafe { (self.cuGetErrorString)(r, &mut s) };
        if s.is_null() {
            format!("CUDA error {r}")
        } else {
            // SAFETY: a static NUL-terminated string from the driver.
            format!("{} (CUDA error {r})", unsafe { CStr::from_ptr(s) }.to_string_lossy())
        }
    }

    pub fn check(&self, r: CuResult, what: impl FnOnce() -> String) -> Result<()> {
        if r == 0 {
            Ok(())
        } else {
            Err(Error::fail(format!("{}: {}", what(), self.error_string(r))))
        }
    }

    /// The current context, or (when the thread has none) the primary context of the device
    /// that holds `device_ptr`, made current.
    pub fn current_context(&self, device_ptr: *const c_void) -> Result<CuContext> {
        let mut ctx: CuContext = std::ptr::null_mut();
        // SAFETY: valid out pointer.
        self.check(unsafe { (self.cuCtxGetCurrent)(&mut ctx) }, || "cuCtxGetCurrent".into())?;
        if !ctx.is_null() {
            return Ok(ctx);
        }
        let mut ordinal: c_int = -1;
        self.check(
            // SAFETY: valid out pointer of the attribute's type (int).
            unsafe {
                (self.cuPointerGetAttribute)(
                    (&mut ordinal as *mut c_int).cast(),
                    CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                    device_ptr as CuDevicePtr,
                )
            },
            || "the QINS op's input is not CUDA device memory".into(),
        )?;
        // SAFETY: valid out pointer and device ordinal; the retained context is kept for the
        // process, as ORT's runtime keeps it.
        self.check(unsafe { (self.cuDevicePrimaryCtxRetain)(&mut ctx, ordinal) }, || {
            "cuDevicePrimaryCtxRetain".into()
        })?;
        // SAFETY: a live context.
        self.check(unsafe { (self.cuCtxSetCurrent)(ctx) }, || "cuCtxSetCurrent".into())?;
        Ok(ctx)
    }

    pub fn context_device(&self) -> Result<i32> {
        let mut dev: c_int = -1;
        // SAFETY: valid out pointer; a context is current.
        self.check(unsafe { (self.cuCtxGetDevice)(&mut dev) }, || "cuCtxGetDevice".into())?;
        Ok(dev)
    }

    /// Attribute `attr` (a `CU_DEVICE_ATTRIBUTE_*` value, `name` for errors) of `device`.
    fn device_attribute(&self, device: i32, attr: c_int, name: &str) -> Result<c_int> {
        let mut n: c_int = 0;
        // SAFETY: valid out pointer; the driver checks the attribute and device ordinal.
        self.check(unsafe { (self.cuDeviceGetAttribute)(&mut n, attr, device) }, || {
            format!("cuDeviceGetAttribute({name})")
        })?;
        Ok(n)
    }

    /// Multiprocessors of `device` (`CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`).
    pub fn multiprocessors(&self, device: i32) -> Result<usize> {
        Ok(self.device_attribute(device, 16, "MULTIPROCESSOR_COUNT")?.max(1) as usize)
    }

    /// The major compute capability of `device` (`CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR`).
    pub fn compute_major(&self, device: i32) -> Result<i32> {
        self.device_attribute(device, 75, "COMPUTE_CAPABILITY_MAJOR")
    }

    /// Shared memory a block may opt in to on `device`
    /// (`CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`).
    pub fn max_shared_optin(&self, device: i32) -> Result<usize> {
        Ok(self.device_attribute(device, 97, "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN")?.max(0) as usize)
    }

    /// Blocks of `f` (`threads` each, `shared` bytes of dynamic shared memory) that fit on one
    /// multiprocessor at once.
    ///
    /// # Safety
    /// `f` is a function of a live module of the current context.
    pub unsafe fn blocks_per_multiprocessor(&self, f: CuFunction, threads: u32, shared: u32) -> Result<usize> {
        let mut n: c_int = 0;
        self.check(
            // SAFETY: valid out pointer; `f` as the caller promises.
            unsafe { (self.cuOccupancyMaxActiveBlocksPerMultiprocessor)(&mut n, f, threads as c_int, shared as usize) },
            || "cuOccupancyMaxActiveBlocksPerMultiprocessor".into(),
        )?;
        Ok(n.max(0) as usize)
    }

    pub fn load_module(&self, image: &[u8]) -> Result<CuModule> {
        let mut m: CuModule = std::ptr::null_mut();
        // SAFETY: `image` is a fat binary produced by nvcc at build time; the driver copies it.
        self.check(unsafe { (self.cuModuleLoadData)(&mut m, image.as_ptr().cast()) }, || {
            "loading the QINS CUDA kernels (is the GPU older than sm_80?)".into()
        })?;
        Ok(m)
    }

    /// Copies `values` into the module's `__constant__` array `name`, whose size must match.
    ///
    /// # Safety
    /// `m` is a live module of the current context.
    pub unsafe fn write_global(&self, m: CuModule, name: &CStr, values: &[f32]) -> Result<()> {
        let (mut p, mut size) = (0 as CuDevicePtr, 0usize);
        // SAFETY: live module (the caller's contract), NUL-terminated name, valid out pointers.
        self.check(unsafe { (self.cuModuleGetGlobal_v2)(&mut p, &mut size, m, name.as_ptr()) }, || {
            format!("kernel table {name:?}")
        })?;
        if size != std::mem::size_of_val(values) {
            return Err(Error::fail(format!(
                "kernel table {name:?} is {size} bytes, the codec's {}",
                size_of_val(values)
            )));
        }
        // SAFETY: `p` is `size` bytes of device memory, `values` as many bytes of host memory.
        self.check(unsafe { (self.cuMemcpyHtoD_v2)(p, values.as_ptr().cast(), size) }, || format!("filling {name:?}"))
    }
}
