//! Launchers of `kernels/qins_decode.cu`: codes -> f16/f32 weights `[N, K]`.

use std::ffi::{c_void, CStr};

use qins::codec::{Format, Layout};

use super::{launch, Args, Image, Loaded};
use crate::ort_api::Result;

/// Rows per block (a warp each).
const ROWS: usize = 8;

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
    let f = mods.function(Image::Decode, kernel_name(l.format, f16))?;
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
    unsafe { launch(f, (l.n.div_ceil(ROWS) as u32, 1, 1), (32, ROWS as u32), 0, stream, &args, mods.after(true)) }
}
