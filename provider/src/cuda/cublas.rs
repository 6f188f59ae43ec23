//! `cublasGemmEx` for the prefill path, from the cuBLAS that ORT's CUDA EP has already loaded
//! (its handle comes from ORT too, bound to the node's stream).

use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

use libloading::os::unix::{Library, RTLD_NOW};

/// glibc's `RTLD_NOLOAD`: open only a library that is already loaded.
const RTLD_NOLOAD: std::ffi::c_int = 4;

use crate::ort_api::{Error, Result};

pub const OP_N: c_int = 0;
pub const OP_T: c_int = 1;
pub const R_32F: c_int = 0;
pub const R_16F: c_int = 2;
const COMPUTE_32F: c_int = 68;
const GEMM_DEFAULT: c_int = -1;

type GemmEx = unsafe extern "C" fn(
    *mut c_void,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    *const c_void,
    *const c_void,
    c_int,
    c_int,
    *const c_void,
    c_int,
    c_int,
    *const c_void,
    *mut c_void,
    c_int,
    c_int,
    c_int,
    c_int,
) -> c_int;
type SetStream = unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int;

pub struct Cublas {
    _lib: Library,
    gemm_ex: GemmEx,
    set_stream: SetStream,
}

// SAFETY: function pointers and a library handle.
unsafe impl Send for Cublas {}
// SAFETY: as above.
unsafe impl Sync for Cublas {}

/// The cuBLAS already in the process (CUDA 13 first, then 12), else a fresh load.
pub fn cublas() -> Result<&'static Cublas> {
    static C: OnceLock<std::result::Result<Cublas, String>> = OnceLock::new();
    C.get_or_init(|| {
        let names = ["libcublas.so.13", "libcublas.so.12"];
        let lib = names
            .iter()
            // SAFETY: RTLD_NOLOAD only returns a handle to a library that is already loaded.
            .find_map(|n| unsafe { Library::open(Some(*n), RTLD_NOW | RTLD_NOLOAD) }.ok())
            // SAFETY: loading cuBLAS runs its initialisers, as any CUDA program does.
            .or_else(|| names.iter().find_map(|n| unsafe { Library::open(Some(*n), RTLD_NOW) }.ok()))
            .ok_or_else(|| "cuBLAS (libcublas.so.13 or .12) is not available".to_string())?;
        // SAFETY: these symbols have these C signatures in cuBLAS 11-13.
        let gemm_ex = *unsafe { lib.get::<GemmEx>(b"cublasGemmEx\0") }.map_err(|e| e.to_string())?;
        // SAFETY: as above.
        let set_stream = *unsafe { lib.get::<SetStream>(b"cublasSetStream_v2\0") }.map_err(|e| e.to_string())?;
        Ok(Cublas { _lib: lib, gemm_ex, set_stream })
    })
    .as_ref()
    .map_err(|e| Error::fail(e.clone()))
}

impl Cublas {
    /// Row-major `Y[M, N] = A[M, K] W[N, K]^T` in `dtype` (R_16F or R_32F), f32 accumulation,
    /// `Y`'s rows `ldy >= N` elements apart (a mixed node writes its float part into the first
    /// columns of a wider output).
    ///
    /// # Safety
    /// `handle` is a live cuBLAS handle; the pointers are device buffers of those shapes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_rowmajor_abt(
        &self,
        handle: *mut c_void,
        stream: *mut c_void,
        dtype: c_int,
        m: usize,
        n: usize,
        k: usize,
        a: *const c_void,
        w: *const c_void,
        y: *mut c_void,
        ldy: usize,
    ) -> Result<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let dim = |v: usize| c_int::try_from(v).map_err(|_| Error::fail(format!("dimension {v} too large for cuBLAS")));
        let (m, n, k, ldy) = (dim(m)?, dim(n)?, dim(k)?, dim(ldy)?);
        // SAFETY: per the caller's contract.
        let st = unsafe { (self.set_stream)(handle, stream) };
        if st != 0 {
            return Err(Error::fail(format!("cublasSetStream failed ({st})")));
        }
        // Column-major view: Y^T[N, M] = W[N, K] (stored as K x N, transposed) * A^T (K x M).
        // SAFETY: per the caller's contract; alpha and beta are host scalars (ORT's handle
        // keeps the default host pointer mode).
        let st = unsafe {
            (self.gemm_ex)(
                handle,
                OP_T,
                OP_N,
                n,
                m,
                k,
                (&alpha as *const f32).cast(),
                w,
                dtype,
                k,
                a,
                dtype,
                k,
                (&beta as *const f32).cast(),
                y,
                dtype,
                ldy,
                COMPUTE_32F,
                GEMM_DEFAULT,
            )
        };
        if st != 0 {
            return Err(Error::fail(format!("cublasGemmEx failed (cuBLAS status {st})")));
        }
        Ok(())
    }
}
