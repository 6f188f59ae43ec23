//! The small kernels around a product (`kernels/qins_matmul/qins_matmul.cu`): the fused
//! SwiGLU's epilogue where the product went through scratch, and the copy of a mixed node's
//! QINS columns into place.

use std::ffi::c_void;

use crate::cuda::module::{launch, Args, Image, Loaded};
use crate::ops::qins_matmul::Act;
use crate::ort_api::Result;

/// The fused SwiGLU's epilogue over a `[m, 2 half]` product in `y2` (`qins_swiglu_*` in
/// kernels/qins_matmul/qins_matmul.cu).
///
/// # Safety
/// `y2` and `y` are device buffers of `m * 2 half` and `m * half` elements of `act`'s type.
pub(crate) unsafe fn swiglu_combine(
    mods: &Loaded,
    stream: *mut c_void,
    act: Act,
    y2: *const c_void,
    y: *mut c_void,
    m: usize,
    half: usize,
) -> Result<()> {
    let name = if act == Act::F16 { c"qins_swiglu_f16" } else { c"qins_swiglu_f32" };
    let f = mods.function(Image::Matmul, name)?;
    let total = m * half;
    let blocks = total.div_ceil(256).min(65535 * 8) as u32;
    let args = Args::new().ptr(y2).ptr(y).i64(total as i64).i32(half as i32);
    // SAFETY: as the caller promises; the arguments follow the kernel's list.
    unsafe { launch(f, (blocks, 1, 1), (256, 1), 0, stream, &args, mods.after(true)) }
}

/// Copies the `[m, n]` product in `src` into columns `off .. off + n` of the `[m, ldy]` `y`
/// (`qins_copy_cols_*`): a mixed node's QINS part on the paths that write a dense product.
///
/// # Safety
/// `src` and `y` are device buffers of `m * n` and `m * ldy` elements of `act`'s type, and
/// `off + n <= ldy`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn copy_cols(
    mods: &Loaded,
    stream: *mut c_void,
    act: Act,
    src: *const c_void,
    y: *mut c_void,
    m: usize,
    n: usize,
    ldy: usize,
    off: usize,
) -> Result<()> {
    let name = if act == Act::F16 { c"qins_copy_cols_f16" } else { c"qins_copy_cols_f32" };
    let f = mods.function(Image::Matmul, name)?;
    let total = m * n;
    let blocks = total.div_ceil(256).min(65535 * 8) as u32;
    let args = Args::new().ptr(src).ptr(y).i64(total as i64).i32(n as i32).i32(ldy as i32).i32(off as i32);
    // SAFETY: as the caller promises; the arguments follow the kernel's list.
    unsafe { launch(f, (blocks, 1, 1), (256, 1), 0, stream, &args, mods.after(true)) }
}

#[cfg(test)]
mod tests {
    use crate::cuda::module::{built_with_kernels, embeds, images};

    #[test]
    fn epilogue_kernels_are_embedded() {
        if !built_with_kernels() {
            return;
        }
        for name in [c"qins_swiglu_f16", c"qins_swiglu_f32", c"qins_copy_cols_f16", c"qins_copy_cols_f32"] {
            assert!(embeds(images::QINS_MATMUL, name), "{name:?} missing");
        }
    }
}
