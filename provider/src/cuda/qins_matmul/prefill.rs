//! Launcher of `kernels/qins_matmul/qins_matmul_prefill.cu`: `com.qins.QinsMatMul` on the codes for
//! prefill-sized `M` (f16 activations and the layouts of the token-generation tensor-core
//! kernel), without decoding the weight into memory.
//!
//! Which configuration, how many K splits, and whether to run it at all (rather than decode +
//! cuBLAS) come from a small time model fitted to H100 measurements
//! (`scripts/gpu/probe_prefill.py`, docs/BENCHMARKS.md): see [`plan`].

use std::ffi::CStr;

use qins::codec::Format;

use super::tc::{chunk_len, tc_args, tc_cpg_shift_for, tc_table_bytes, Buffers};
use crate::cuda::module::{launch, Args, Image, Loaded};
use crate::cuda::tuning::{tuning, Prefill};
use crate::ops::qins_matmul::Node;
use crate::ort_api::{Error, KernelCtx, Result};

/// One compiled configuration of `gemm_tc`: `mb` activation rows and `16 t wn` channels a
/// block of `wn x wk` warps, `stages` shared-memory stages (`QINS_GEMM_TC` in the kernel file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub mb: usize,
    pub t: usize,
    pub wn: usize,
    pub wk: usize,
    pub stages: usize,
}

const fn cfg(mb: usize, t: usize, wn: usize, wk: usize, stages: usize) -> Config {
    Config { mb, t, wn, wk, stages }
}

/// The instantiations of `QINS_GEMM_TC_ALL`, in its order.
pub const CONFIGS: [Config; 6] = [
    cfg(32, 2, 4, 2, 3),
    cfg(64, 2, 4, 1, 2),
    cfg(64, 2, 4, 2, 3),
    cfg(128, 2, 2, 4, 2),
    cfg(128, 2, 4, 1, 2),
    cfg(128, 2, 8, 1, 2),
];

/// Microseconds one block of each configuration (CONFIGS' order) took at K = 3072 on an H100
/// when the grid fit in one round of blocks (medians over Phi-3.5's shapes, M = 16..1024,
/// `probe_prefill.py`): q4 g32, q8 g128, q6 g128. None: does not fit a block's shared memory.
/// For q4 and q8 the third configuration was measured with 2 stages; 3 ran 0.99x (q4) and
/// 0.93x (q8) of that in one later run, which these values include. q6 is slower per block
/// than q8 (12-byte chunks, codes cut from 32-bit words), by 1.2-1.6x.
const BLOCK_US: [[Option<f64>; 6]; 3] = [
    [Some(22.4), Some(32.2), Some(31.5), None, Some(50.9), Some(80.9)],
    [Some(28.9), Some(42.5), Some(37.1), Some(34.6), Some(57.6), Some(94.8)],
    [Some(47.3), Some(55.4), Some(53.5), Some(41.4), Some(77.6), Some(126.8)],
];

impl Config {
    pub fn threads(self) -> u32 {
        (32 * self.wn * self.wk) as u32
    }
    pub fn channels(self) -> usize {
        16 * self.t * self.wn
    }
}

/// The kernel's name for a format and configuration; `None` where none is built (q4 in
/// `CONFIGS[3]`: its 256-entry table leaves that block more shared memory than any GPU has).
pub fn gemm_name(format: Format, c: Config) -> Option<&'static CStr> {
    let i = CONFIGS.iter().position(|&x| x == c)?;
    if (format, i) == (Format::Q4, 3) {
        return None;
    }
    let names: [&'static CStr; 6] = match format {
        Format::Q8 => [
            c"qins_gemm_tc_q8_m32_t2_n4_k2_s3",
            c"qins_gemm_tc_q8_m64_t2_n4_k1_s2",
            c"qins_gemm_tc_q8_m64_t2_n4_k2_s3",
            c"qins_gemm_tc_q8_m128_t2_n2_k4_s2",
            c"qins_gemm_tc_q8_m128_t2_n4_k1_s2",
            c"qins_gemm_tc_q8_m128_t2_n8_k1_s2",
        ],
        Format::Q6 => [
            c"qins_gemm_tc_q6_m32_t2_n4_k2_s3",
            c"qins_gemm_tc_q6_m64_t2_n4_k1_s2",
            c"qins_gemm_tc_q6_m64_t2_n4_k2_s3",
            c"qins_gemm_tc_q6_m128_t2_n2_k4_s2",
            c"qins_gemm_tc_q6_m128_t2_n4_k1_s2",
            c"qins_gemm_tc_q6_m128_t2_n8_k1_s2",
        ],
        Format::Q4 => [
            c"qins_gemm_tc_q4_m32_t2_n4_k2_s3",
            c"qins_gemm_tc_q4_m64_t2_n4_k1_s2",
            c"qins_gemm_tc_q4_m64_t2_n4_k2_s3",
            c"qins_gemm_tc_q4_m128_t2_n2_k4_s2",
            c"qins_gemm_tc_q4_m128_t2_n4_k1_s2",
            c"qins_gemm_tc_q4_m128_t2_n8_k1_s2",
        ],
        Format::F32 => return None,
    };
    Some(names[i])
}

/// Dynamic shared memory of a configuration: `Prefill<...>::SMEM` in the kernel file (the
/// COMPACT table, then the stages, whose memory the partial sums reuse at the end).
pub fn gemm_smem(format: Format, c: Config) -> u32 {
    let sk = c.wk * 4 * chunk_len(format);
    let stage = c.mb * (2 * sk + 16) + c.wn * c.wk * 2 * c.t * 32 * 16;
    let sums = (c.wk - 1) * c.wn * c.t * c.mb * 64;
    (tc_table_bytes(format, true) + (c.stages * stage).max(sums)) as u32
}

/// A launch: configuration and K splits (> 1: f32 partial sums, then `qins_gemm_reduce`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub config: Config,
    pub splits: usize,
}

/// Splits tried: each must leave every split at least this many stages.
const SPLITS: [usize; 4] = [1, 2, 4, 8];
const MIN_STAGES_A_SPLIT: usize = 2;

/// The model's estimate of one launch in microseconds, from `BLOCK_US`: a block's time scales
/// with its share of K past a fixed ~2 us (start-up, table, epilogue); the busiest
/// multiprocessor gets `ceil(blocks / sms)` blocks and takes that many block times, or 3/4 of
/// that where two or more fit at once (two resident blocks measured 1.5 block times, not 1).
/// Splits add the f32 partial sums' trip through memory and the reduce launch.
fn estimate(
    block_us: f64,
    c: Config,
    per_sm: usize,
    splits: usize,
    (m, n, k): (usize, usize, usize),
    sms: usize,
) -> f64 {
    const FIXED_US: f64 = 2.0;
    let blocks = n.div_ceil(c.channels()) * m.div_ceil(c.mb) * splits;
    let load = blocks.div_ceil(sms.max(1));
    let rounds = match (load, per_sm) {
        (1, _) => 1.0,
        (_, 2..) => 0.75 * load as f64,
        _ => load as f64,
    };
    let mut t = ((block_us - FIXED_US) * k as f64 / 3072.0 / splits as f64 + FIXED_US) * rounds;
    if splits > 1 {
        // Written once and read once, mostly in L2: ~4 TB/s (bytes per microsecond: 4e6) and
        // 1 us for the reduce launch fitted the final probe best (docs/BENCHMARKS.md).
        t += 1.0 + (8 * splits * m * n) as f64 / 4.0e6;
    }
    t
}

/// The same for decode + cuBLAS, from the H100 measurements (docs/BENCHMARKS.md): the decode
/// kernel's time per weight (q8 and q4: the runs kernel, `scripts/gpu/bench_decode.py`), then
/// the fp16 GEMM at the larger of its weight traffic (~2.4 TB/s) and its arithmetic
/// (~620 TFLOP/s).
fn estimate_decode_cublas(format: Format, m: usize, n: usize, k: usize) -> f64 {
    // q8 (runs kernel) and q6 (chunked kernel) measured alike.
    let per_weight_us = if format == Format::Q4 { 0.95e-6 } else { 1.25e-6 };
    let nk = (n * k) as f64;
    let gemm = (2.0 * nk / 2.4e6 + 2.0).max(2.0 * m as f64 * nk / 620e6);
    nk * per_weight_us + gemm
}

/// The fastest plan by the model for `m` rows, `n` channels and `k`, on `sms` multiprocessors,
/// `per_sm(config)` blocks of a configuration resident on one (0: it does not fit); None where
/// `cublas` (decode + cuBLAS is available) and estimated faster.
pub fn plan(
    format: Format,
    m: usize,
    n: usize,
    k: usize,
    sms: usize,
    cublas: bool,
    per_sm: impl Fn(Config) -> usize,
) -> Option<Plan> {
    let row = match format {
        Format::Q4 => 0,
        Format::Q8 => 1,
        Format::Q6 => 2,
        Format::F32 => return None,
    };
    let stages = k.div_ceil(chunk_len(format)).div_ceil(4);
    let mut best: Option<(f64, Plan)> = None;
    for (i, &c) in CONFIGS.iter().enumerate() {
        let Some(block_us) = BLOCK_US[row][i] else { continue };
        let resident = per_sm(c);
        if resident == 0 {
            continue;
        }
        for splits in SPLITS {
            if splits > 1 && stages.div_ceil(c.wk) < splits * MIN_STAGES_A_SPLIT {
                break;
            }
            let t = estimate(block_us, c, resident, splits, (m, n, k), sms);
            if best.is_none_or(|(bt, _)| t < bt) {
                best = Some((t, Plan { config: c, splits }));
            }
        }
    }
    let (t, p) = best?;
    (!cublas || t < estimate_decode_cublas(format, m, n, k)).then_some(p)
}

/// Runs the prefill kernel over all `m` rows; false where it does not apply or, `cublas`
/// being available, decode + cuBLAS is estimated faster (the caller then does that).
///
/// # Safety
/// The buffers are device memory of the node's layout and `m` rows, on the current context.
pub unsafe fn prefill(
    mods: &Loaded,
    ctx: &KernelCtx,
    node: &Node,
    m: usize,
    cublas: bool,
    b: &Buffers,
) -> Result<bool> {
    let l = &node.layout;
    let Some(cpg_shift) = tc_cpg_shift_for(node, b.a) else {
        return Ok(false);
    };
    let per_sm = |c: Config| {
        gemm_name(l.format, c)
            .and_then(|name| {
                mods.blocks_per_multiprocessor(Image::MatmulPrefill, name, c.threads(), gemm_smem(l.format, c)).ok()
            })
            .unwrap_or(0)
    };
    let planned = match tuning()?.prefill {
        Prefill::Off => None,
        Prefill::Auto => plan(l.format, m, l.n, l.k, mods.multiprocessors, cublas, per_sm),
        Prefill::On => plan(l.format, m, l.n, l.k, mods.multiprocessors, false, per_sm),
        Prefill::Fixed { config, splits } => {
            let config = *CONFIGS.get(config).ok_or_else(|| {
                Error::invalid(format!("QINS_CUDA_PREFILL={config}:{splits}: C must be below {}", CONFIGS.len()))
            })?;
            (per_sm(config) > 0).then_some(Plan { config, splits })
        }
    };
    let Some(p) = planned else {
        return Ok(false);
    };
    let c = p.config;
    let stream = ctx.gpu_stream()?;
    let name = gemm_name(l.format, c).ok_or_else(|| Error::fail("no prefill kernel"))?;
    let smem = gemm_smem(l.format, c);
    let f = mods.function_with_smem(Image::MatmulPrefill, name, smem)?;
    let grid_y = u32::try_from(m.div_ceil(c.mb)).ok().filter(|&y| y <= 65535);
    let grid_y = grid_y.ok_or_else(|| Error::invalid(format!("M={m} is too large for one launch")))?;
    let part = if p.splits > 1 { Some(ctx.scratch(c"Cuda", mods.device, p.splits * m * l.n * 4)?) } else { None };
    let part_ptr = part.as_ref().map_or(std::ptr::null_mut(), |s| s.ptr);
    let args = tc_args(b, Some(part_ptr), m, l, cpg_shift);
    let grid = (l.n.div_ceil(c.channels()) as u32, grid_y, p.splits as u32);
    // SAFETY: the buffers are as the caller promises (`part` holds splits x M x N floats); the
    // arguments follow the kernel's list.
    unsafe { launch(f, grid, (c.threads(), 1), smem, stream, &args, mods.after(true))? };
    if let Some(part) = &part {
        let reduce = mods.function(Image::MatmulPrefill, c"qins_gemm_reduce")?;
        let mn = (m * l.n) as u64;
        let blocks = mn.div_ceil(256).min(4 * mods.multiprocessors as u64) as u32;
        let args = Args::new().ptr(part.ptr).ptr(b.y).i64(mn as i64).i32(p.splits as i32);
        // SAFETY: `part` holds the partial sums just written on this stream; Y holds M x N.
        unsafe { launch(reduce, (blocks, 1, 1), (256, 1), 0, stream, &args, mods.after(true))? };
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks an H100 multiprocessor holds of each configuration (cuOccupancy... on the GPU
    /// machine, by shared memory and registers), for the tests.
    fn h100_per_sm(format: Format) -> impl Fn(Config) -> usize {
        move |c| {
            let smem = gemm_smem(format, c) as usize + 1024;
            if smem > 227 * 1024 + 1024 {
                return 0;
            }
            let regs = if c.mb == 128 {
                255
            } else if c.wk == 1 || c.mb == 32 {
                128
            } else {
                168
            };
            (228 * 1024 / smem).min(65536 / (regs * 32 * c.wn * c.wk)).max(1)
        }
    }

    #[test]
    fn q4_does_not_take_the_config_that_overflows_shared_memory() {
        assert!(gemm_smem(Format::Q4, cfg(128, 2, 2, 4, 2)) as usize > 227 * 1024);
        for m in [17, 64, 128, 256, 512] {
            if let Some(p) = plan(Format::Q4, m, 3072, 3072, 132, true, h100_per_sm(Format::Q4)) {
                assert_ne!(p.config, cfg(128, 2, 2, 4, 2));
            }
        }
    }

    /// The model's picks against what `probe_prefill.py` measured fastest on an H100 (and the
    /// ORT table's decode + cuBLAS): prefill sizes run the kernel, with split K where the grid
    /// is small; large M goes to cuBLAS.
    #[test]
    fn plans_follow_the_h100_measurements() {
        let p = |f, m, n, k| plan(f, m, n, k, 132, true, h100_per_sm(f));
        // 3072x3072 q4 at M = 32: 24 blocks of 128 channels, so split K four ways (9.5 us).
        assert_eq!(p(Format::Q4, 32, 3072, 3072), Some(Plan { config: cfg(32, 2, 4, 2, 3), splits: 4 }));
        // 8192x3072: the long K splits too.
        assert!(p(Format::Q4, 128, 3072, 8192).is_some_and(|p| p.splits >= 4));
        // gate_up (3072x16384) at M = 128 fills the GPU without splitting.
        assert!(p(Format::Q4, 128, 16384, 3072).is_some_and(|p| p.splits == 1));
        // Prefill 128 runs the kernel at every Phi-3.5 shape, q4 and q8.
        for f in [Format::Q4, Format::Q8] {
            for (k, n) in [(3072, 3072), (3072, 8192), (8192, 3072), (3072, 16384)] {
                assert!(p(f, 128, n, k).is_some(), "{f:?} {k}x{n}");
            }
        }
        // At M = 512 decode + cuBLAS wins at every Phi-3.5 shape since the runs decode kernel
        // (q4 gate/up: the kernel measured 87 us, decode 24 + fp16 GEMM 41).
        for (k, n) in [(3072, 3072), (3072, 8192), (8192, 3072)] {
            assert_eq!(p(Format::Q8, 512, n, k), None);
            assert_eq!(p(Format::Q4, 512, n, k), None);
        }
        // M = 2048 goes to decode + cuBLAS (the kernel measured 2-3x slower there).
        for (k, n) in [(3072, 3072), (3072, 8192), (8192, 3072)] {
            assert_eq!(p(Format::Q8, 2048, n, k), None);
            assert_eq!(p(Format::Q4, 2048, n, k), None);
        }
        assert_eq!(p(Format::F32, 128, 3072, 3072), None);
        // Without cuBLAS the kernel takes every M.
        assert!(plan(Format::Q8, 2048, 3072, 3072, 132, false, h100_per_sm(Format::Q8)).is_some());
    }

    /// CONFIGS, the kernel names and the kernel file's instantiations say the same: a name
    /// whose stage count disagreed with its entry here once launched a kernel with too little
    /// shared memory.
    #[test]
    fn configs_names_and_kernel_file_agree() {
        let src = include_str!("../../../../kernels/qins_matmul/qins_matmul_prefill.cu");
        let all = src.split("#define QINS_GEMM_TC_ALL(BITS)").nth(1).expect("QINS_GEMM_TC_ALL in the kernel file");
        let listed: Vec<Vec<usize>> = all
            .lines()
            .take_while(|l| l.trim_end().ends_with('\\') || l.contains("QINS_GEMM_TC(BITS"))
            .filter_map(|l| l.split("QINS_GEMM_TC(BITS,").nth(1))
            .map(|args| args.split(')').next().unwrap().split(',').map(|v| v.trim().parse().unwrap()).collect())
            .collect();
        let ours: Vec<Vec<usize>> = CONFIGS.iter().map(|c| vec![c.mb, c.t, c.wn, c.wk, c.stages]).collect();
        assert_eq!(listed.iter().map(|v| v[..5].to_vec()).collect::<Vec<_>>(), ours);
        for format in [Format::Q8, Format::Q6, Format::Q4] {
            for c in CONFIGS {
                let Some(name) = gemm_name(format, c) else {
                    // q4's table leaves no configuration that large a block's shared memory.
                    assert_eq!((format, c), (Format::Q4, CONFIGS[3]));
                    continue;
                };
                let want =
                    format!("qins_gemm_tc_q{}_m{}_t{}_n{}_k{}_s{}", format.bits(), c.mb, c.t, c.wn, c.wk, c.stages);
                assert_eq!(name.to_str().unwrap(), want);
            }
        }
    }

    /// Every entry point the launcher can ask for is in the embedded module.
    #[test]
    fn every_prefill_kernel_is_embedded() {
        use crate::cuda::module::{built_with_kernels, embeds, images};
        if !built_with_kernels() {
            eprintln!("built without CUDA kernels: nothing to check");
            return;
        }
        let has = |n: &CStr| embeds(images::QINS_MATMUL_PREFILL, n);
        for format in [Format::Q8, Format::Q6, Format::Q4] {
            for c in CONFIGS {
                if let Some(name) = gemm_name(format, c) {
                    assert!(has(name), "{name:?} missing");
                }
            }
        }
        assert!(has(c"qins_gemm_reduce"));
        // Not built: more shared memory than any GPU gives a block.
        assert!(!has(c"qins_gemm_tc_q4_m128_t2_n2_k4_s2"));
        assert_eq!(gemm_name(Format::F32, CONFIGS[0]), None);
    }

    #[test]
    fn shared_memory_matches_the_kernel_formula() {
        // Prefill<4, 32, 2, 4, 2, 3>: 32 KiB table + 3 x (32 x (2 x 256 + 16) + 8 x 4 x 512).
        assert_eq!(gemm_smem(Format::Q4, cfg(32, 2, 4, 2, 3)), 256 * 128 + 3 * (32 * 528 + 8 * 4 * 512));
        // q6's table is 64 entries.
        assert_eq!(gemm_smem(Format::Q6, cfg(64, 2, 4, 1, 2)), 64 * 128 + 2 * (64 * 144 + 4 * 4 * 512));
        // Partial sums larger than the stages never happen in CONFIGS, but count if they did.
        let c = cfg(128, 2, 2, 4, 2);
        assert!(gemm_smem(Format::Q8, c) as usize >= 256 * 128 + 3 * 2 * 2 * 128 * 64);
    }
}
