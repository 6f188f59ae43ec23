//! Launchers of the token-generation kernels (`kernels/qins_matmul/qins_matmul.cu`): the
//! code-domain matmul for small `M`, on tensor cores (`gemv_tc`, f16 activations and the
//! layouts [`super::tc`] names) or CUDA cores (`gemv`, everything else), and the mixed node's
//! one-launch variant. Kernel names, tile plans and launch shapes, each with the measurement
//! that chose it.

use std::ffi::{c_void, CStr};

use qins::codec::Format;

use super::tc::{chunk_len, tc_args, tc_cpg_shift_for, tc_table_bytes, Buffers};
use crate::cuda::module::{launch, Args, Image, Loaded};
use crate::cuda::tuning::tuning;
use crate::ops::qins_matmul::{Act, Node};
use crate::ort_api::{Error, Result};

/// Largest `M` for the code-domain kernel by default; above it the weight is decoded for
/// cuBLAS. `QINS_CUDA_GEMV_MAX_M` overrides it ([`gemv_max_m`]).
pub const GEMV_MAX_M: usize = 4;

/// The same for the tensor-core kernel: one launch covers 16 rows at about the cost of one
/// (more rows run in tiles of 16, each re-reading the weights). On an H100 the prefill kernel
/// beat it from M = 32 (docs/BENCHMARKS.md); where that one does not apply or declines, the
/// tensor-core kernel still takes M <= 16.
pub const TC_MAX_M: usize = 16;

/// Largest `M` for the token kernels: the tensor-core one's or the CUDA-core one's default,
/// or `QINS_CUDA_GEMV_MAX_M` for both ([`crate::cuda::tuning`]), which is how
/// `scripts/gpu/bench_matmul.py` measures both paths.
pub(crate) fn gemv_max_m(tc: bool) -> Result<usize> {
    Ok(tuning()?.gemv_max_m.unwrap_or(if tc { TC_MAX_M } else { GEMV_MAX_M }))
}

/// Warps per block of the code-domain kernel (`WPB` in kernels/qins_matmul/qins_matmul.cu); 1, 2 or 4 of
/// them per output channel.
const WARPS_PER_BLOCK: usize = 4;

const THREADS: u32 = 32 * WARPS_PER_BLOCK as u32;

fn gemv_name(format: Format, act: Act, mt: usize) -> &'static CStr {
    macro_rules! pick {
        ($($f:ident $a:ident $m:literal => $n:literal),* $(,)?) => {
            match (format, act, mt) {
                $((Format::$f, Act::$a, $m) => $n,)*
                _ => unreachable!("row tile {mt}"),
            }
        };
    }
    pick! {
        Q8 F16 1 => c"qins_gemv_q8_f16_m1", Q8 F16 2 => c"qins_gemv_q8_f16_m2",
        Q8 F16 4 => c"qins_gemv_q8_f16_m4", Q8 F16 8 => c"qins_gemv_q8_f16_m8",
        Q8 F32 1 => c"qins_gemv_q8_f32_m1", Q8 F32 2 => c"qins_gemv_q8_f32_m2",
        Q8 F32 4 => c"qins_gemv_q8_f32_m4", Q8 F32 8 => c"qins_gemv_q8_f32_m8",
        Q6 F16 1 => c"qins_gemv_q6_f16_m1", Q6 F16 2 => c"qins_gemv_q6_f16_m2",
        Q6 F16 4 => c"qins_gemv_q6_f16_m4", Q6 F16 8 => c"qins_gemv_q6_f16_m8",
        Q6 F32 1 => c"qins_gemv_q6_f32_m1", Q6 F32 2 => c"qins_gemv_q6_f32_m2",
        Q6 F32 4 => c"qins_gemv_q6_f32_m4", Q6 F32 8 => c"qins_gemv_q6_f32_m8",
        Q4 F16 1 => c"qins_gemv_q4_f16_m1", Q4 F16 2 => c"qins_gemv_q4_f16_m2",
        Q4 F16 4 => c"qins_gemv_q4_f16_m4", Q4 F16 8 => c"qins_gemv_q4_f16_m8",
        Q4 F32 1 => c"qins_gemv_q4_f32_m1", Q4 F32 2 => c"qins_gemv_q4_f32_m2",
        Q4 F32 4 => c"qins_gemv_q4_f32_m4", Q4 F32 8 => c"qins_gemv_q4_f32_m8",
        F32 F16 1 => c"qins_gemv_q32_f16_m1", F32 F16 2 => c"qins_gemv_q32_f16_m2",
        F32 F16 4 => c"qins_gemv_q32_f16_m4", F32 F16 8 => c"qins_gemv_q32_f16_m8",
        F32 F32 1 => c"qins_gemv_q32_f32_m1", F32 F32 2 => c"qins_gemv_q32_f32_m2",
        F32 F32 4 => c"qins_gemv_q32_f32_m4", F32 F32 8 => c"qins_gemv_q32_f32_m8",
    }
}

/// Row tile of the code-domain kernel for `m` rows: the smallest compiled one that covers
/// them, 8 past that (more tiles then run side by side).
fn row_tile(m: usize) -> usize {
    match m {
        1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    }
}

/// Where the tensor-core kernel applies the group scale (`SC_*` in kernels/qins_matmul/qins_matmul.cu).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scale {
    /// On every f16 weight pair.
    Weight,
    /// On the f32 sum of a 4-chunk step (the step never straddles a group).
    Step,
    /// On the f32 sum of each lane's chunk, kept apart in its own mma column (M = 1 only).
    Chunk,
}

/// 16-channel tiles a block of the tensor-core kernel for `m` rows and `n` channels, on a GPU
/// that holds `slots` blocks at once (two a multiprocessor: 16 warps and 64 registers, or 8
/// warps and a 64 KiB table beside another block's). Its time goes as the rounds of resident
/// blocks times the work of a block, so take the tile count that minimises
/// `ceil(blocks / slots) * tiles`, the largest on a tie (fewer tables to build, fewer
/// cross-warp sums). Measured on an H100 (scripts/gpu/probe.py, docs/BENCHMARKS.md), q4 g32 at
/// M = 1: 3072 channels 1 tile, 8192 2 (-12%), 9216 3 (-20%), 16384 and 32064 4 (-21%);
/// q8 g128 gained only with 2 (8192, 16384, 32064: -3 to -10%) and lost with 3 or 4 (its
/// blocks carry twice the bytes), so q8 stops at 2; q6 g128 lost with 2 at every shape
/// measured (3072 to 9216 channels: 4-18% slower than 1 tile), so q6 keeps 1.
/// `cap` (`QINS_CUDA_TC_MAX_TILES`) lowers the cap (1 gives the 16-channel blocks, for
/// comparisons).
fn tc_tiles(format: Format, m: usize, n: usize, slots: usize, cap: Option<usize>) -> usize {
    if m > 8 {
        return 1;
    }
    let max = match format {
        Format::Q4 => 4,
        Format::Q8 => 2,
        _ => 1,
    };
    let max = cap.map_or(max, |c| c.clamp(1, max));
    let slots = slots.max(1);
    (1..=max).rev().min_by_key(|&t| n.div_ceil(16 * t).div_ceil(slots) * t).unwrap_or(1)
}

/// One launch of the tensor-core kernel: tiles a block, the scale's place, and whether each
/// warp requests its next step before it multiplies the current one (`PIPE` in the kernel).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct TcPlan {
    tiles: usize,
    scale: Scale,
    pipe: bool,
}

/// The launch for `m` rows and `n` channels. SC_CHUNK at M = 1 gained 4-5% on q4 g32 over
/// SC_WEIGHT with 2 or more tiles and nothing with 1 (docs/BENCHMARKS.md); a 4-chunk step
/// inside one group lets the scale go on the step's f32 sum. The pipelined kernels measured
/// faster (kernels/qins_matmul/qins_matmul.cu, `PIPE`) with one tile and the scale on each pair (q8, q6
/// and q4 up to 8 rows, q4 up to 16), and with two tiles at M = 1 (q8 and q4) where the grid
/// fits in one round of blocks; they are 8 warps a block at two tiles.
fn tc_plan(format: Format, m: usize, n: usize, cpg_shift: i32, slots: usize, cap: Option<usize>) -> TcPlan {
    let tiles = tc_tiles(format, m, n, slots, cap);
    let scale = match (m, tiles, cpg_shift >= 2) {
        (1, 2.., _) => Scale::Chunk,
        (_, _, true) => Scale::Step,
        _ => Scale::Weight,
    };
    let one_tile = match format {
        Format::Q8 | Format::Q6 => m <= 8,
        Format::Q4 => true,
        Format::F32 => false,
    };
    let two_tiles = matches!(format, Format::Q8 | Format::Q4) && m == 1 && n.div_ceil(32) <= slots.max(1);
    match tiles {
        1 if one_tile => TcPlan { tiles, scale: Scale::Weight, pipe: true },
        2 if two_tiles => TcPlan { tiles, scale, pipe: true },
        _ => TcPlan { tiles, scale, pipe: false },
    }
}

/// The tensor-core kernel and its block size (threads) for `m` rows and plan `p`: 16 warps
/// over 8 rows (8 warps at 3 or 4 tiles, and pipelined at 2), or 8 warps over 16 rows. Only the
/// plans `tc_plan` makes have a name; the kernel file's other entry points (the
/// non-pipelined 16-channel ones, q6 at 2 tiles) are `scripts/gpu/probe.py`'s baselines.
fn tc_name(format: Format, m: usize, p: TcPlan) -> Option<(&'static CStr, u32)> {
    use Format::{Q4, Q6, Q8};
    use Scale::{Chunk, Step, Weight};
    let TcPlan { tiles: t, scale, pipe } = p;
    let name = match (format, m > 8, t, scale, pipe) {
        (Q8, false, 1, Weight, true) => c"qins_gemv_tc_q8_m8_w16_u2_p",
        (Q8, false, 2, Weight, false) => c"qins_gemv_tc_q8_m8_w16_u1_t2",
        (Q8, false, 2, Step, false) => c"qins_gemv_tc_q8_m8_w16_u1_t2_cs",
        (Q8, false, 2, Chunk, false) => c"qins_gemv_tc_q8_m8_w16_u1_t2_c1",
        (Q8, false, 2, Chunk, true) => c"qins_gemv_tc_q8_m8_w8_u2_t2_p_c1",
        (Q8, true, 1, Weight, false) => c"qins_gemv_tc_q8_m16_w8_u2",
        (Q8, true, 1, Step, false) => c"qins_gemv_tc_q8_m16_w8_u2_cs",
        (Q6, false, 1, Weight, true) => c"qins_gemv_tc_q6_m8_w16_u2_p",
        (Q6, true, 1, Weight, false) => c"qins_gemv_tc_q6_m16_w8_u2",
        (Q6, true, 1, Step, false) => c"qins_gemv_tc_q6_m16_w8_u2_cs",
        (Q4, false, 1, Weight, true) => c"qins_gemv_tc_q4_m8_w16_u2_p",
        (Q4, false, 2, Weight, false) => c"qins_gemv_tc_q4_m8_w16_u1_t2",
        (Q4, false, 2, Step, false) => c"qins_gemv_tc_q4_m8_w16_u1_t2_cs",
        (Q4, false, 2, Chunk, false) => c"qins_gemv_tc_q4_m8_w16_u1_t2_c1",
        (Q4, false, 2, Chunk, true) => c"qins_gemv_tc_q4_m8_w8_u2_t2_p_c1",
        (Q4, false, 3, Weight, false) => c"qins_gemv_tc_q4_m8_w8_u1_t3",
        (Q4, false, 3, Step, false) => c"qins_gemv_tc_q4_m8_w8_u1_t3_cs",
        (Q4, false, 3, Chunk, false) => c"qins_gemv_tc_q4_m8_w8_u1_t3_c1",
        (Q4, false, 4, Weight, false) => c"qins_gemv_tc_q4_m8_w8_u1_t4",
        (Q4, false, 4, Step, false) => c"qins_gemv_tc_q4_m8_w8_u1_t4_cs",
        (Q4, false, 4, Chunk, false) => c"qins_gemv_tc_q4_m8_w8_u1_t4_c1",
        (Q4, true, 1, Weight, true) => c"qins_gemv_tc_q4_m16_w8_u2_p",
        _ => return None,
    };
    let warps = if m > 8 || t >= 3 || (pipe && t == 2) { 8 } else { 16 };
    Some((name, 32 * warps))
}

/// Dynamic shared memory of the tensor-core kernel (see `TcTable` in kernels/qins_matmul/qins_matmul.cu):
/// its table, or the cross-warp sums that reuse the table's memory where they are larger.
fn tc_smem(format: Format, mt: usize, threads: u32, t: usize) -> u32 {
    let sums = (threads as usize / 32) * 16 * t * (mt + 1) * 4;
    tc_table_bytes(format, false).max(sums) as u32
}

/// The tensor-core kernel (f16 activations, packed codes, K % 8 == 0, A 16-byte aligned, no
/// chunk across groups); false where it does not apply. `swiglu`: the kernel applies the fused
/// SwiGLU epilogue and `b.y` is `[M, N / 2]` (every other path writes the `[M, N]` product and
/// [`swiglu_combine`] follows).
///
/// # Safety
/// As [`gemv`].
pub(crate) unsafe fn gemv_tc(
    mods: &Loaded,
    stream: *mut c_void,
    node: &Node,
    m: usize,
    b: &Buffers,
    swiglu: bool,
) -> Result<bool> {
    let l = &node.layout;
    let Some(cpg_shift) = tc_cpg_shift_for(node, b.a) else {
        return Ok(false);
    };
    let plan = tc_plan(l.format, m, l.n, cpg_shift, 2 * mods.multiprocessors, tuning()?.tc_max_tiles);
    let t = plan.tiles;
    let Some((name, threads)) = tc_name(l.format, m, plan) else {
        return Ok(false);
    };
    let mt = if m > 8 { 16 } else { 8 };
    let smem = tc_smem(l.format, mt, threads, t);
    let f = mods.function_with_smem(Image::Matmul, name, smem)?;
    let grid_y = u32::try_from(m.div_ceil(mt)).ok().filter(|&y| y <= 65535);
    let grid_y = grid_y.ok_or_else(|| Error::invalid(format!("M={m} is too large for one launch")))?;
    let args = tc_args(b, None, m, l, cpg_shift).i32(swiglu as i32);
    // gemv_tc requests its first weights before it waits for the previous kernel (so that
    // they are on their way while that kernel finishes): it may overlap only where no kernel
    // writes them.
    let after = mods.after(b.weights_constant);
    // SAFETY: the buffers are as the caller promises; the arguments follow the kernel's list.
    unsafe { launch(f, (l.n.div_ceil(16 * t) as u32, grid_y, 1), (threads, 1), smem, stream, &args, after)? };
    Ok(true)
}

/// The mixed tensor-core kernel (`QINS_GEMV_TC_MIX` in kernels/qins_matmul/qins_matmul.cu) for up to 16
/// rows, where the tensor-core kernel applies; false otherwise.
///
/// # Safety
/// As [`gemv`], and `wf` is device memory of `[nf, K]` f16, 16-byte aligned.
pub(crate) unsafe fn gemv_tc_mixed(
    mods: &Loaded,
    stream: *mut c_void,
    node: &Node,
    m: usize,
    nf: usize,
    wf: *const c_void,
    b: &Buffers,
) -> Result<bool> {
    let l = &node.layout;
    let (Some(cpg_shift), true) = (tc_cpg_shift_for(node, b.a), m <= TC_MAX_M) else {
        return Ok(false);
    };
    let Some(MixPlan { name, threads, mt, tf }) = mix_plan(l.format, m) else {
        return Ok(false);
    };
    let smem = tc_smem(l.format, mt, threads, tf);
    let f = mods.function_with_smem(Image::Matmul, name, smem)?;
    let blocks = nf.div_ceil(16 * tf) + l.n.div_ceil(16);
    let blocks = u32::try_from(blocks).map_err(|_| Error::invalid(format!("NF={nf} is too large for one launch")))?;
    let args = Args::new()
        .ptr(b.a)
        .ptr(wf)
        .ptr(b.codes)
        .ptr(b.scales)
        .ptr(b.y)
        .i32(m as i32)
        .i32(l.k as i32)
        .i32(nf as i32)
        .i32(l.n as i32)
        .i32(l.row_bytes() as i32)
        .i32(l.groups() as i32)
        .i32(cpg_shift);
    // SAFETY: as the caller promises; the arguments follow the kernel's list. The float weight
    // is read before the wait too, so overlap needs it constant as well (`weights_constant`).
    unsafe { launch(f, (blocks, 1, 1), (threads, 1), smem, stream, &args, mods.after(b.weights_constant))? };
    Ok(true)
}

/// One launch of the mixed kernel: entry point, threads, row tile, and 16-channel tiles a
/// block of the float part.
struct MixPlan {
    name: &'static CStr,
    threads: u32,
    mt: usize,
    tf: usize,
}

/// The mixed kernel for `m` rows (at most 16): 8 warps, the float part in blocks of 32
/// channels (q4, and every format at 9-16 rows) or 48 (q8 and q6 up to 8 rows), as measured
/// fastest at Phi-3.5's qkv (kernels/qins_matmul/qins_matmul.cu, `QINS_GEMV_TC_MIX_ALL`). q6 follows q8
/// (its blocks carry as many bytes a code as q8's, nearly).
fn mix_plan(format: Format, m: usize) -> Option<MixPlan> {
    let (name, mt, tf) = match (format, m > 8) {
        (Format::Q4, false) => (c"qins_gemv_tc_mix_q4_m8_w8f2", 8, 2),
        (Format::Q6, false) => (c"qins_gemv_tc_mix_q6_m8_w8f3", 8, 3),
        (Format::Q8, false) => (c"qins_gemv_tc_mix_q8_m8_w8f3", 8, 3),
        (Format::Q4, true) => (c"qins_gemv_tc_mix_q4_m16_f2", 16, 2),
        (Format::Q6, true) => (c"qins_gemv_tc_mix_q6_m16_f2", 16, 2),
        (Format::Q8, true) => (c"qins_gemv_tc_mix_q8_m16_f2", 16, 2),
        (Format::F32, _) => return None,
    };
    Some(MixPlan { name, threads: 256, mt, tf })
}

/// The code-domain kernel over all `m` rows: the tensor-core one where it applies.
///
/// # Safety
/// The buffers are device memory of the node's layout and `m` rows, on the current context.
pub unsafe fn gemv(mods: &Loaded, stream: *mut c_void, node: &Node, m: usize, b: &Buffers) -> Result<()> {
    // SAFETY: as promised by the caller.
    if unsafe { gemv_tc(mods, stream, node, m, b, false)? } {
        return Ok(());
    }
    let l = &node.layout;
    let mt = row_tile(m);
    let f = mods.function(Image::Matmul, gemv_name(l.format, node.act, mt))?;
    let vec_a = l.k.is_multiple_of(8) && (b.a as usize).is_multiple_of(16);
    let chunk = chunk_len(l.format);
    let cpg_shift = if l.group.is_multiple_of(chunk) && (l.group / chunk).is_power_of_two() {
        (l.group / chunk).trailing_zeros() as i32
    } else {
        -1
    };
    // Warps per output channel: one, unless a row is so long that a warp would loop over more
    // than 16 chunks a thread. Measured on an H100 (scripts/gpu/probe.py): two warps a row
    // made q8 at K = 3072 20% slower, so Phi-3.5's shapes all run one warp a row.
    let wpr = match l.k.div_ceil(chunk) {
        0..=512 => 1,
        513..=1024 => 2,
        _ => 4,
    };
    let channels = WARPS_PER_BLOCK / wpr;
    let blocks = l.n.div_ceil(channels) as u64 * m.div_ceil(mt) as u64;
    let blocks = u32::try_from(blocks).map_err(|_| Error::invalid(format!("M={m} is too large for one launch")))?;
    let args = Args::new()
        .ptr(b.a)
        .ptr(b.codes)
        .ptr(b.scales)
        .ptr(b.y)
        .i32(i32::try_from(m).map_err(|_| Error::invalid(format!("M={m} is too large")))?)
        .i32(l.k as i32)
        .i32(l.n as i32)
        .i32(l.group as i32)
        .i32(l.row_bytes() as i32)
        .i32(l.groups() as i32)
        .i32(vec_a as i32)
        .i32(cpg_shift)
        .i32(wpr as i32);
    // SAFETY: the buffers are as the caller promises; the arguments follow the kernel's list.
    unsafe { launch(f, (blocks, 1, 1), (THREADS, 1), 0, stream, &args, mods.after(true)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::module::{built_with_kernels, embeds, images};

    /// Every entry point these launchers can ask for is in the embedded module (a renamed or
    /// dropped instantiation in the kernel file would otherwise fail only on a GPU).
    #[test]
    fn every_launched_kernel_is_embedded() {
        if !built_with_kernels() {
            eprintln!("built without CUDA kernels: nothing to check");
            return;
        }
        for format in Format::ALL {
            for act in [Act::F16, Act::F32] {
                for m in [1, 2, 3, 4, 5, 8, 16] {
                    let name = gemv_name(format, act, row_tile(m));
                    assert!(embeds(images::QINS_MATMUL, name), "{name:?} missing");
                }
            }
            for m in [1, 2, 8, 9, 16] {
                for n in [16, 3072, 8192, 9216, 16384, 40000] {
                    for cpg_shift in [0, 1, 2, 30] {
                        for cap in [None, Some(1), Some(2), Some(3)] {
                            let p = tc_plan(format, m, n, cpg_shift, H100_SLOTS, cap);
                            let Some((name, _)) = tc_name(format, m, p) else {
                                assert_eq!(format, Format::F32, "no kernel for m={m} n={n} {p:?}");
                                continue;
                            };
                            assert!(embeds(images::QINS_MATMUL, name), "{name:?} missing");
                        }
                    }
                }
            }
            for m in [1, 9] {
                if let Some(MixPlan { name, .. }) = mix_plan(format, m) {
                    assert!(embeds(images::QINS_MATMUL, name), "{name:?} missing");
                }
            }
        }
    }

    /// Two blocks on each of an H100's 132 multiprocessors.
    const H100_SLOTS: usize = 264;

    #[test]
    fn tiles_follow_the_h100_measurements() {
        let plan = |f, m, n, cpg| tc_plan(f, m, n, cpg, H100_SLOTS, None);
        let tiles = |f, n| plan(f, 1, n, 0).tiles;
        let p = |tiles, scale, pipe| TcPlan { tiles, scale, pipe };
        assert_eq!([3072, 8192, 9216, 16384, 32064].map(|n| tiles(Format::Q4, n)), [1, 2, 3, 4, 4]);
        assert_eq!([3072, 8192, 9216, 16384, 32064].map(|n| tiles(Format::Q8, n)), [1, 2, 1, 2, 2]);
        assert_eq!([3072, 8192, 32064].map(|n| tiles(Format::Q6, n)), [1, 1, 1]);
        // One tile: pipelined, the scale on each pair (q8 and q6 up to 8 rows, q4 up to 16).
        assert_eq!(plan(Format::Q4, 1, 3072, 0), p(1, Scale::Weight, true));
        assert_eq!(plan(Format::Q8, 1, 3072, 3), p(1, Scale::Weight, true));
        assert_eq!(plan(Format::Q8, 8, 9216, 3), p(1, Scale::Weight, true));
        assert_eq!(plan(Format::Q6, 1, 8192, 3), p(1, Scale::Weight, true));
        assert_eq!(plan(Format::Q4, 16, 16384, 2), p(1, Scale::Weight, true));
        assert_eq!(plan(Format::Q8, 16, 3072, 3), p(1, Scale::Step, false));
        assert_eq!(plan(Format::Q6, 9, 3072, 0), p(1, Scale::Weight, false));
        // Two tiles: pipelined at M = 1 while the grid is one round (256 blocks of 32 channels).
        assert_eq!(plan(Format::Q4, 1, 8192, 0), p(2, Scale::Chunk, true));
        assert_eq!(plan(Format::Q8, 1, 8192, 3), p(2, Scale::Chunk, true));
        assert_eq!(plan(Format::Q8, 1, 16384, 3), p(2, Scale::Chunk, false));
        assert_eq!(plan(Format::Q8, 4, 8192, 3), p(2, Scale::Step, false));
        assert_eq!(plan(Format::Q4, 1, 9216, 0), p(3, Scale::Chunk, false));
        assert_eq!(tc_name(Format::Q4, 1, plan(Format::Q4, 1, 8192, 0)).unwrap().1, 256);
        // A smaller GPU (114 multiprocessors) moves the choice.
        assert_eq!(tc_plan(Format::Q4, 1, 8192, 0, 228, None).tiles, 3);
        // QINS_CUDA_TC_MAX_TILES lowers the cap.
        assert_eq!(tc_plan(Format::Q4, 1, 16384, 0, H100_SLOTS, Some(1)).tiles, 1);
        assert_eq!(tc_plan(Format::Q4, 1, 16384, 0, H100_SLOTS, Some(2)).tiles, 2);
        // The sums of 8 warps over 64 channels and 8 rows fit beside the smaller q6 table.
        assert_eq!(tc_smem(Format::Q6, 8, 256, 4), 8 * 64 * 9 * 4);
        assert_eq!(tc_smem(Format::Q4, 8, 256, 4), 256 * 256);
    }

    /// The probes' baselines (`QINS_PROBE_KERNELS`) are not in the library.
    #[test]
    fn probe_kernels_are_not_embedded() {
        if !built_with_kernels() {
            return;
        }
        for name in [
            c"qins_gemv_tc_q8_m8_w16_u2",
            c"qins_gemv_tc_q4_m8_w16_u2_cs",
            c"qins_gemv_tc_q4_m16_w8_u2",
            c"qins_gemv_tc_q6_m8_w16_u1_t2",
            c"qins_gemv_tc_mix_q8_m8",
            c"qins_gemv_tc_mix_q4_m16",
            c"qins_gemv_tc_mix_q8_m8_w8f2",
        ] {
            assert!(!embeds(images::QINS_MATMUL, name), "{name:?} is a probe baseline, not a library kernel");
        }
    }

    #[test]
    fn row_tiles_cover_m() {
        for m in 1..=64 {
            let t = row_tile(m);
            assert!(t == 8 || t >= m, "m={m} tile {t}");
        }
    }
    #[test]
    fn chunk_lengths_match_the_kernels() {
        // Fmt<BITS>::CH in kernels/common/qins_common.cuh.
        assert_eq!([8, 6, 4, 32].map(|b| chunk_len(Format::from_bits(b).unwrap())), [16, 16, 32, 4]);
    }
}
