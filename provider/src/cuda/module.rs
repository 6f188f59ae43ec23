//! The embedded kernel images and launching them.
//!
//! Modules are loaded lazily, once per CUDA context (the first run of a node; ORT's CUDA graph
//! capture only starts after warm-up runs, so loading never happens inside a capture), and
//! each module's copy of the magnitude tables is filled from [`qins::codec::Format::lut`] then.

use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};

use qins::codec::Format;

use super::driver::{
    driver, CuContext, CuFunction, CuModule, Driver, LaunchAttribute, LaunchConfig,
    LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
};
use super::tuning::tuning;
use crate::ort_api::{Error, Result};

/// The embedded fat binaries, one per `kernels/<op>/*.cu` that holds entry points.
pub(crate) mod images {
    #[cfg(qins_cuda_kernels)]
    pub const QINS_MATMUL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qins_matmul.fatbin"));
    #[cfg(qins_cuda_kernels)]
    pub const QINS_MATMUL_PREFILL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qins_matmul_prefill.fatbin"));
    #[cfg(qins_cuda_kernels)]
    pub const QINS_DECODE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qins_decode.fatbin"));
    #[cfg(qins_cuda_kernels)]
    pub const QINS_ATTENTION: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qins_attention.fatbin"));
    #[cfg(not(qins_cuda_kernels))]
    pub const QINS_MATMUL: &[u8] = &[];
    #[cfg(not(qins_cuda_kernels))]
    pub const QINS_MATMUL_PREFILL: &[u8] = &[];
    #[cfg(not(qins_cuda_kernels))]
    pub const QINS_DECODE: &[u8] = &[];
    #[cfg(not(qins_cuda_kernels))]
    pub const QINS_ATTENTION: &[u8] = &[];
}

/// Whether this build carries CUDA kernels (nvcc was found when it was compiled).
pub const fn built_with_kernels() -> bool {
    cfg!(qins_cuda_kernels)
}

/// Whether `image` has an entry point called `name` (its name is in the image's symbol and
/// PTX text): the launchers' tests check every name they can ask for.
#[cfg(test)]
pub(crate) fn embeds(image: &[u8], name: &CStr) -> bool {
    let needle = name.to_bytes_with_nul();
    image.windows(needle.len()).any(|w| w == needle)
}

/// Which embedded module an entry point lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Image {
    Matmul,
    MatmulPrefill,
    Decode,
    Attention,
}

impl Image {
    fn bytes(self) -> &'static [u8] {
        match self {
            Image::Matmul => images::QINS_MATMUL,
            Image::MatmulPrefill => images::QINS_MATMUL_PREFILL,
            Image::Decode => images::QINS_DECODE,
            Image::Attention => images::QINS_ATTENTION,
        }
    }
}

/// The modules of one CUDA context and the functions looked up in them so far.
pub struct Loaded {
    modules: HashMap<Image, CuModule>,
    /// The context's device ordinal.
    pub device: i32,
    /// Multiprocessors of that device (launch shapes depend on it).
    pub multiprocessors: usize,
    /// Dynamic shared memory a block may opt in to on that device.
    pub max_shared: usize,
    /// Whether launches may overlap the previous kernel ([`After::Overlap`]): an sm_90+
    /// device, a driver with `cuLaunchKernelEx`, and `QINS_CUDA_PDL=1` ([`super::tuning`]).
    overlap: bool,
    functions: Mutex<HashMap<&'static CStr, CuFunction>>,
    occupancy: Mutex<HashMap<&'static CStr, usize>>,
}

/// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`.
const MAX_DYNAMIC_SHARED: i32 = 8;

// SAFETY: CUDA module and function handles may be used from any thread that has their
// context current; the map of functions is behind a mutex.
unsafe impl Send for Loaded {}
// SAFETY: as above.
unsafe impl Sync for Loaded {}

impl Loaded {
    /// [`After::Overlap`] where `allowed` and this context can, else [`After::Completion`].
    pub fn after(&self, allowed: bool) -> After {
        if allowed && self.overlap {
            After::Overlap
        } else {
            After::Completion
        }
    }

    /// The kernel `name` (an `extern "C"` entry point of `image`).
    pub fn function(&self, image: Image, name: &'static CStr) -> Result<CuFunction> {
        self.function_with_smem(image, name, 0)
    }

    /// As [`Loaded::function`], allowed `shared` bytes of dynamic shared memory (above 48 KiB
    /// a launch needs the opt-in). Set when the function is first looked up, so a kernel that
    /// needs it must always be looked up through here.
    pub fn function_with_smem(&self, image: Image, name: &'static CStr, shared: u32) -> Result<CuFunction> {
        let mut f = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&func) = f.get(name) {
            return Ok(func);
        }
        let d = driver()?;
        let module = self.modules[&image];
        let mut func: CuFunction = std::ptr::null_mut();
        // SAFETY: live module of the current context, NUL-terminated name, valid out pointer.
        d.check(unsafe { (d.cuModuleGetFunction)(&mut func, module, name.as_ptr()) }, || {
            format!("kernel {name:?} not found in the embedded CUDA module")
        })?;
        if shared > 48 * 1024 {
            let bytes = i32::try_from(shared).map_err(|_| Error::fail("shared memory size"))?;
            // SAFETY: a function of a live module of the current context.
            d.check(unsafe { (d.cuFuncSetAttribute)(func, MAX_DYNAMIC_SHARED, bytes) }, || {
                format!("kernel {name:?}: {shared} bytes of shared memory")
            })?;
        }
        f.insert(name, func);
        Ok(func)
    }

    /// Blocks of kernel `name` that fit on one multiprocessor (asked of the driver once), 0
    /// where its shared memory is more than the device allows a block.
    pub fn blocks_per_multiprocessor(
        &self,
        image: Image,
        name: &'static CStr,
        threads: u32,
        shared: u32,
    ) -> Result<usize> {
        if shared as usize > self.max_shared {
            return Ok(0);
        }
        if let Some(&n) = self.occupancy.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
            return Ok(n);
        }
        let f = self.function_with_smem(image, name, shared)?;
        // SAFETY: a function of this context's modules.
        let n = unsafe { driver()?.blocks_per_multiprocessor(f, threads, shared)? };
        self.occupancy.lock().unwrap_or_else(|p| p.into_inner()).insert(name, n);
        Ok(n)
    }
}

/// Loaded modules by context. Entries are never removed: a context is destroyed only at
/// process exit in ORT's use of CUDA (the primary context), and a module costs a few MB.
fn cache() -> &'static Mutex<HashMap<usize, Arc<Loaded>>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Loaded>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Makes sure a context is current on this thread (the device that holds `device_ptr`, by its
/// primary context, which is the one ORT's CUDA runtime calls use) and returns the modules of
/// that context, loading them the first time (`Loaded::device` is that context's device).
pub fn modules_for(device_ptr: *const c_void) -> Result<Arc<Loaded>> {
    if !built_with_kernels() {
        return Err(Error::fail(
            "this build of the QINS library has no CUDA kernels (nvcc was not found at build time)",
        ));
    }
    let d = driver()?;
    let ctx = d.current_context(device_ptr)?;
    let mut cache = cache().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = cache.get(&(ctx as usize)) {
        return Ok(l.clone());
    }
    let loaded = Arc::new(load_all(d, ctx, d.context_device()?)?);
    cache.insert(ctx as usize, loaded.clone());
    Ok(loaded)
}

fn load_all(d: &Driver, _ctx: CuContext, device: i32) -> Result<Loaded> {
    let mut modules = HashMap::new();
    for image in [Image::Matmul, Image::MatmulPrefill, Image::Decode, Image::Attention] {
        let m = d.load_module(image.bytes())?;
        for (sym, format) in [(c"qins_lut8", Format::Q8), (c"qins_lut6", Format::Q6), (c"qins_lut4", Format::Q4)] {
            // SAFETY: `m` was just loaded in the current context.
            unsafe { d.write_global(m, sym, format.lut()) }?;
        }
        modules.insert(image, m);
    }
    let multiprocessors = d.multiprocessors(device)?;
    let max_shared = d.max_shared_optin(device)?;
    let overlap = tuning()?.pdl && d.cuLaunchKernelEx.is_some() && d.compute_major(device)? >= 9;
    Ok(Loaded {
        modules,
        device,
        multiprocessors,
        max_shared,
        overlap,
        functions: Mutex::new(HashMap::new()),
        occupancy: Mutex::new(HashMap::new()),
    })
}

/// How a launch waits for the kernel before it on the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// The ordinary way: the kernel starts once the previous one has completed.
    Completion,
    /// Programmatic dependent launch (sm_90+): the kernel's blocks may start as the previous
    /// kernel's blocks exit, which hides the launch latency between the two. Only for kernels
    /// that call `wait_prior_grid()` (kernels/common/qins_common.cuh), in every thread, before they
    /// touch memory an earlier kernel may have written. Since every kernel launched this way
    /// waits, a kernel completes only after its predecessor has, so the wait also orders
    /// everything after it behind all earlier kernels.
    Overlap,
}

/// Kernel arguments as the driver takes them: one pointer per parameter, to its value.
pub struct Args {
    values: Vec<[u8; 8]>,
}

impl Args {
    pub fn new() -> Args {
        Args { values: Vec::with_capacity(12) }
    }
    pub fn ptr(mut self, p: *const c_void) -> Args {
        self.values.push((p as u64).to_ne_bytes());
        self
    }
    pub fn i64(mut self, v: i64) -> Args {
        self.values.push(v.to_ne_bytes());
        self
    }
    pub fn f32(self, v: f32) -> Args {
        self.i32(v.to_bits() as i32)
    }
    pub fn i32(mut self, v: i32) -> Args {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&v.to_ne_bytes());
        self.values.push(b);
        self
    }
}

impl Default for Args {
    fn default() -> Self {
        Args::new()
    }
}

/// Launches `f` on `stream` with a grid of `grid` (x, y, z) blocks of `block` threads and
/// `shared` bytes of dynamic shared memory, ordered after the previous kernel as `after` says.
///
/// # Safety
/// `f` is a function of the current context's modules, `stream` a stream of that context (or
/// null), and `args` matches the kernel's parameters, with every pointer in it valid for
/// what the kernel reads and writes; with [`After::Overlap`], the kernel waits as that
/// variant requires.
pub unsafe fn launch(
    f: CuFunction,
    grid: (u32, u32, u32),
    block: (u32, u32),
    shared: u32,
    stream: *mut c_void,
    args: &Args,
    after: After,
) -> Result<()> {
    let d = driver()?;
    let mut ptrs: Vec<*mut c_void> = args.values.iter().map(|v| v.as_ptr().cast_mut().cast()).collect();
    let what = || format!("launching a QINS kernel (grid {grid:?}, block {block:?}, {after:?})");
    if let (After::Overlap, Some(launch_ex)) = (after, d.cuLaunchKernelEx) {
        let mut attr =
            LaunchAttribute { id: LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, pad: [0; 4], value: [0; 64] };
        // programmaticStreamSerializationAllowed: an int at the start of the value union.
        attr.value[..4].copy_from_slice(&1i32.to_ne_bytes());
        let config = LaunchConfig {
            grid: [grid.0, grid.1, grid.2],
            block: [block.0, block.1, 1],
            shared,
            stream,
            attrs: &mut attr,
            num_attrs: 1,
        };
        // SAFETY: as for cuLaunchKernel below; `config` and its one attribute are laid out as
        // cuda.h's CUlaunchConfig / CUlaunchAttribute (`launch_structs_match_cuda_h`) and live for
        // the call.
        return d.check(unsafe { launch_ex(&config, f, ptrs.as_mut_ptr(), std::ptr::null_mut()) }, what);
    }
    // SAFETY: per the caller's contract; `ptrs` points at one value per kernel parameter, laid
    // out as the kernel declares them (pointers 8 bytes, ints 4 bytes at the start of their
    // slot), alive for the call, which copies them.
    d.check(
        unsafe {
            (d.cuLaunchKernel)(
                f,
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                1,
                shared,
                stream,
                ptrs.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        },
        what,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The driver reads these structs by cuda.h's layout (CUDA 12/13, 64-bit).
    #[test]
    fn launch_structs_match_cuda_h() {
        assert_eq!(std::mem::size_of::<LaunchAttribute>(), 72);
        assert_eq!(std::mem::offset_of!(LaunchAttribute, value), 8);
        assert_eq!(std::mem::offset_of!(LaunchConfig, stream), 32);
        assert_eq!(std::mem::offset_of!(LaunchConfig, attrs), 40);
        assert_eq!(std::mem::offset_of!(LaunchConfig, num_attrs), 48);
        assert_eq!(std::mem::size_of::<LaunchConfig>(), 56);
    }
}
