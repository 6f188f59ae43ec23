//! Launchers of `kernels/qins_matmul/qins_decode.cu`: codes -> f16/f32 weights `[N, K]`, for
//! decode + cuBLAS.

use std::ffi::{c_void, CStr};

use qins::codec::{Format, Layout};

use crate::cuda::module::{launch, Args, Image, Loaded};
use crate::ort_api::Result;

/// Rows per block (a warp each) of the chunked kernel.
const ROWS: usize = 8;
/// Threads a block of the runs kernel, and runs of 8 weights a thread (`RUNS_U`).
const RUNS_THREADS: usize = 128;
const RUNS_U: usize = 4;

/// The decode kernel's entry point for a format and output type.
pub(crate) fn kernel_name(format: Format, f16: bool) -> &'static CStr {
    match (format, f16) {
        (Format::Q8, true) => c"qins_decode_q8_f16",
        (Format::Q6, true) => c"qins_decode_q6_f16",
        (Format::Q4, true) => c"qins_decode_q4_f16",
        (Format::F32, true) => c"qins_decode_q32_f16",
        (Format::Q8, false) => c"qins_decode_q8_f32",
        (Format::Q6, false) => c"qins_decode_q6_f32",
        (Format::Q4, false) => c"qins_decode_q4_f32",
        (Format::F32, false) => c"qins_decode_q32_f32",
    }
}

/// The runs kernel's entry point where it applies (bits 8 and 4, K and G multiples of 8, N
/// within a grid's y), else None: the chunked kernel takes the rest.
pub(crate) fn runs_kernel_name(l: &Layout, f16: bool) -> Option<&'static CStr> {
    if !(l.k.is_multiple_of(8) && l.group.is_multiple_of(8) && l.n <= 65535) {
        return None;
    }
    match (l.format, f16) {
        (Format::Q8, true) => Some(c"qins_decode_runs_q8_f16"),
        (Format::Q4, true) => Some(c"qins_decode_runs_q4_f16"),
        (Format::Q8, false) => Some(c"qins_decode_runs_q8_f32"),
        (Format::Q4, false) => Some(c"qins_decode_runs_q4_f32"),
        _ => None,
    }
}

/// Decodes the weight into `out` (`[N, K]`, f16 when `f16`, else f32) on `stream`.
///
/// # Safety
/// `codes`, `scales` and `out` are device buffers of the layout's sizes on the current context.
pub unsafe fn decode(
    mods: &Loaded,
    stream: *mut c_void,
    l: &Layout,
    f16: bool,
    codes: *const c_void,
    scales: *const c_void,
    out: *mut c_void,
) -> Result<()> {
    // Both kernels take the same arguments.
    let (name, grid, block) = match runs_kernel_name(l, f16) {
        Some(name) => {
            (name, ((l.k / 8).div_ceil(RUNS_THREADS * RUNS_U) as u32, l.n as u32, 1), (RUNS_THREADS as u32, 1))
        }
        None => (kernel_name(l.format, f16), (l.n.div_ceil(ROWS) as u32, 1, 1), (32, ROWS as u32)),
    };
    let f = mods.function(Image::Decode, name)?;
    let args = Args::new()
        .ptr(codes)
        .ptr(scales)
        .ptr(out)
        .i32(l.k as i32)
        .i32(l.n as i32)
        .i32(l.group as i32)
        .i32(l.row_bytes() as i32)
        .i32(l.groups() as i32);
    // SAFETY: the buffers are as the caller promises; the arguments follow the kernel's list.
    unsafe { launch(f, grid, block, 0, stream, &args, mods.after(true)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_kernel_takes_what_it_can() {
        let name = |f, k, n, g| runs_kernel_name(&Layout::new(f, k, n, g), true);
        assert!(name(Format::Q4, 3072, 3072, 32).is_some());
        assert!(name(Format::Q8, 8192, 32064, 8192).is_some());
        // Not q6 or z floats; not K or G off a multiple of 8; not N past a grid's y.
        assert!(name(Format::Q6, 3072, 3072, 128).is_none());
        assert!(name(Format::F32, 3072, 3072, 3072).is_none());
        assert!(name(Format::Q8, 3076, 3072, 3076).is_none());
        assert!(name(Format::Q4, 3072, 3072, 30).is_none());
        assert!(name(Format::Q8, 3072, 128256, 128).is_none());
    }

    /// Every entry point the launcher can ask for is in the embedded module.
    #[test]
    fn every_decode_kernel_is_embedded() {
        use crate::cuda::module::{built_with_kernels, embeds, images};
        if !built_with_kernels() {
            eprintln!("built without CUDA kernels: nothing to check");
            return;
        }
        for format in Format::ALL {
            for f16 in [true, false] {
                let name = kernel_name(format, f16);
                assert!(embeds(images::QINS_DECODE, name), "{name:?} missing");
                let l = Layout::new(format, 3072, 3072, if format == Format::F32 { 3072 } else { 128 });
                if let Some(name) = runs_kernel_name(&l, f16) {
                    assert!(embeds(images::QINS_DECODE, name), "{name:?} missing");
                }
            }
        }
        // bench_decode.py's baseline is built only for the probes.
        assert!(!embeds(images::QINS_DECODE, c"qins_decode_naive_q8"));
    }
}
