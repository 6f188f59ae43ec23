//! What the tensor-core kernels of this op family share (`kernels/common/qins_tc.cuh`'s
//! side in Rust): where they apply, their tables, their arguments, and a run's buffers.

use std::ffi::c_void;

use qins::codec::{Format, Layout};

use crate::cuda::module::Args;
use crate::ops::qins_matmul::{Act, Node};

/// Device buffers of one run.
pub struct Buffers {
    pub a: *const c_void,
    pub codes: *const c_void,
    pub scales: *const c_void,
    pub y: *mut c_void,
    /// Codes and scales are constant initializers: no kernel writes them, so a kernel launched
    /// to overlap its predecessor may read them before `wait_prior_grid()`.
    pub weights_constant: bool,
}

/// Codes per thread per load in the kernels (their `Fmt<BITS>::CH`).
pub(crate) fn chunk_len(format: Format) -> usize {
    match format {
        Format::Q8 | Format::Q6 => 16,
        Format::Q4 => 32,
        Format::F32 => 4,
    }
}

/// `TcTable<BITS, SHIFT>::BYTES` of kernels/common/qins_tc.cuh: 64 entries for q6 (a code each), 256
/// otherwise (q8 codes, q4 bytes), 256 bytes an entry (SPREAD, the token kernel's) or 128
/// (`compact`, the prefill kernel's).
pub(crate) fn tc_table_bytes(format: Format, compact: bool) -> usize {
    let entries = if format == Format::Q6 { 64 } else { 256 };
    entries * if compact { 128 } else { 256 }
}

/// `cpg_shift` of the tensor-core kernel: log2 of the chunks a group, 30 (every chunk in
/// group 0) for one group a row, None where a chunk can straddle groups.
pub(crate) fn tc_cpg_shift(l: &Layout) -> Option<i32> {
    let chunk = chunk_len(l.format);
    if l.groups() == 1 {
        Some(30)
    } else if l.group.is_multiple_of(chunk) && (l.group / chunk).is_power_of_two() {
        Some((l.group / chunk).trailing_zeros() as i32)
    } else {
        None
    }
}

/// Where the tensor-core kernels (token, mixed and prefill) apply: f16 activations, packed
/// codes, K a multiple of 8, A 16-byte aligned, and no chunk straddling two groups. Returns
/// the kernels' `cpg_shift` there, `None` elsewhere (the caller takes another path).
pub(crate) fn tc_cpg_shift_for(node: &Node, a: *const c_void) -> Option<i32> {
    let l = &node.layout;
    let applies =
        node.act == Act::F16 && l.format != Format::F32 && l.k.is_multiple_of(8) && (a as usize).is_multiple_of(16);
    applies.then(|| tc_cpg_shift(l)).flatten()
}

/// The arguments of the tensor-core kernels: `(A, codes, scales, Y, [part,] M, K, N,
/// row_bytes, groups, cpg_shift)`, `part` (the prefill kernel's split-K sums, maybe null) only
/// where given.
pub(crate) fn tc_args(b: &Buffers, part: Option<*mut c_void>, m: usize, l: &Layout, cpg_shift: i32) -> Args {
    let args = Args::new().ptr(b.a).ptr(b.codes).ptr(b.scales).ptr(b.y);
    let args = match part {
        Some(p) => args.ptr(p),
        None => args,
    };
    args.i32(m as i32).i32(l.k as i32).i32(l.n as i32).i32(l.row_bytes() as i32).i32(l.groups() as i32).i32(cpg_shift)
}
