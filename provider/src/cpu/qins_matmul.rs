//! CPU kernel of `com.qins.QinsMatMul`: `Y[M, N] = A[M, K] W[K, N]`, `W` QINS-encoded.
//!
//! Weights are decoded with the codec's table ([`Format::lut`]) and scales into f32 exactly as
//! [`qins::codec::decode_row`] does (bit-identical; a unit test holds the two together), then:
//! - small `M` (token generation): a GEMV that decodes each weight row once, into an L1-resident
//!   buffer, and dots it with every activation row;
//! - larger `M`: blocks of output channels are decoded into an f32 tile `[NB, K]` once and
//!   multiplied with `matrixmultiply::sgemm`, each (tile, row block) task single-threaded under
//!   rayon.
//!
//! Accumulation is f32 for both activation types; f16 activations are widened once and the
//! output rounded once, as the spec says.

use std::cell::Cell;

use half::f16;
use half::slice::HalfFloatSliceExt;
use qins::codec::{decode_z, padded_k, Encoded, Format, Layout};
use rayon::prelude::*;

use crate::ops::qins_matmul::{Act, Node};
use crate::ops::Kernel;
use crate::ort_api::{Error, KernelCtx, KernelInfo, Result};

/// Rows of `A` up to which the GEMV path wins over decode-into-tile + sgemm. Measured with
/// `examples/bench.rs` (K = N = 2048, q8 and q4, 1 and 16 threads): at M = 4 the GEMM path is
/// already 10-30% faster, at M = 2 the GEMV path is 25-40% faster.
const GEMV_MAX_M: usize = 3;
/// Weight rows per GEMV task: enough work per task to amortise rayon's overhead.
const GEMV_ROWS: usize = 16;
/// How the GEMM path cuts the work.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocking {
    /// Output channels per decoded tile.
    pub nb: usize,
    /// Activation rows per sgemm call.
    pub mb: usize,
    /// K per sgemm call. matrixmultiply (with its `threading` feature, which the workspace
    /// turns on) starts its own pool of at most 4 threads for a call once
    /// `(m + n) * k >= 2^15`; staying below that keeps every call on the rayon thread that
    /// made it instead of funnelling them all through that pool.
    pub kc: usize,
    /// Instead: tiles one after another, each decoded by rayon and multiplied by one
    /// (matrixmultiply-threaded) sgemm over all of M and K. For comparison only.
    pub serial_tiles: bool,
}

/// `(MB + NB) * KC = 30720 < 2^15`.
pub const BLOCKING: Blocking = Blocking { nb: 64, mb: 64, kc: 240, serial_tiles: false };

/// Encoded weight data as the op receives it.
#[derive(Clone, Copy, Debug)]
pub enum WeightData<'a> {
    /// `bits` 4/6/8: packed codes `[N, row_bytes]` and f16 scales `[N, ceil(K/G)]`.
    Packed { codes: &'a [u8], scales: &'a [f16] },
    /// `bits` 32: `z` as f32 `[N, K]` and one f32 scale per output channel `[N, 1]`.
    F32 { z: &'a [f32], scales: &'a [f32] },
}

/// A checked view of one encoded weight.
#[derive(Clone, Copy, Debug)]
pub struct Weights<'a> {
    layout: Layout,
    data: WeightData<'a>,
}

impl<'a> Weights<'a> {
    /// Checks that the buffers match the layout; every later index relies on it.
    pub fn new(layout: Layout, data: WeightData<'a>) -> Result<Weights<'a>> {
        let Layout { format, k, n, group } = layout;
        let bad = |msg: String| Err(Error::invalid(format!("weights for {layout:?}: {msg}")));
        if k == 0 || n == 0 || group == 0 || group > k || (format == Format::F32 && group != k) {
            return bad("K, N >= 1 and 1 <= group <= K (== K for bits 32) are required".into());
        }
        let (codes_len, scales_len) = match data {
            WeightData::Packed { codes, scales } if format.is_integer() => (codes.len(), scales.len()),
            WeightData::F32 { z, scales } if format == Format::F32 => (z.len(), scales.len()),
            _ => return bad("packed codes go with bits 4/6/8, f32 z with bits 32".into()),
        };
        let row = if format == Format::F32 { k } else { format.row_bytes(k) };
        let (want_codes, want_scales) = (n.checked_mul(row), n.checked_mul(layout.groups()));
        if want_codes != Some(codes_len) || want_scales != Some(scales_len) {
            return bad(format!(
                "codes have {codes_len} elements and scales {scales_len}, expected {want_codes:?} and {want_scales:?}"
            ));
        }
        Ok(Weights { layout, data })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Length of the buffer [`Weights::decode_row`] needs: the padded K for packed formats
    /// (whole bytes are unpacked, padding included), K for f32.
    pub fn row_buf_len(&self) -> usize {
        match self.data {
            WeightData::Packed { .. } => padded_k(self.layout.k),
            WeightData::F32 { .. } => self.layout.k,
        }
    }

    /// Decodes output channel `n` (`W[0..K, n]`) into `out[..K]`, bit-identical to
    /// [`qins::codec::decode_row`]. `out` must hold [`Weights::row_buf_len`] values; the
    /// ones past K are scratch.
    #[inline(always)]
    pub fn decode_row(&self, n: usize, out: &mut [f32]) {
        let Layout { format, k, group, .. } = self.layout;
        match self.data {
            WeightData::F32 { z, scales } => {
                let s = scales[n];
                for (o, &z) in out[..k].iter_mut().zip(&z[n * k..(n + 1) * k]) {
                    *o = decode_z(z, s);
                }
            }
            WeightData::Packed { codes, scales } => {
                let rb = format.row_bytes(k);
                let kp = padded_k(k);
                unpack(format, &codes[n * rb..(n + 1) * rb], &mut out[..kp]);
                let g = self.layout.groups();
                // One multiply per weight, as in the codec: LUT[code] * s.
                for (chunk, s) in out[..k].chunks_mut(group).zip(&scales[n * g..(n + 1) * g]) {
                    let s = s.to_f32();
                    for v in chunk {
                        *v *= s;
                    }
                }
            }
        }
    }
}

/// `out[i] = LUT[code i]` for a whole packed row (`out.len()` = codes in the row).
#[inline(always)]
fn unpack(format: Format, row: &[u8], out: &mut [f32]) {
    // Fixed-size tables let the compiler drop the bounds checks on masked indices.
    const BAD_LUT: &str = "the codec's LUT has 2^bits entries";
    match format {
        Format::Q8 => {
            let lut: &[f32; 256] = format.lut().try_into().expect(BAD_LUT);
            for (o, &c) in out.iter_mut().zip(row) {
                *o = lut[c as usize];
            }
        }
        Format::Q6 => {
            let lut: &[f32; 64] = format.lut().try_into().expect(BAD_LUT);
            for (o, b) in out.chunks_exact_mut(4).zip(row.chunks_exact(3)) {
                let w = u32::from_le_bytes([b[0], b[1], b[2], 0]);
                o[0] = lut[(w & 63) as usize];
                o[1] = lut[((w >> 6) & 63) as usize];
                o[2] = lut[((w >> 12) & 63) as usize];
                o[3] = lut[((w >> 18) & 63) as usize];
            }
        }
        Format::Q4 => {
            let lut: &[f32; 16] = format.lut().try_into().expect(BAD_LUT);
            for (o, &b) in out.chunks_exact_mut(2).zip(row) {
                o[0] = lut[(b & 15) as usize];
                o[1] = lut[(b >> 4) as usize];
            }
        }
        Format::F32 => unreachable!("F32 rows hold floats, not codes"),
    }
}

/// An owned copy of an [`Encoded`] weight in the op's input types, for tests and benchmarks.
pub struct OwnedWeights {
    layout: Layout,
    codes: Vec<u8>,
    z: Vec<f32>,
    scales_f16: Vec<f16>,
    scales_f32: Vec<f32>,
}

impl OwnedWeights {
    pub fn from_encoded(e: &Encoded) -> OwnedWeights {
        let layout = e.layout;
        if layout.format == Format::F32 {
            let z = e.codes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            OwnedWeights { layout, codes: vec![], z, scales_f16: vec![], scales_f32: e.scales.clone() }
        } else {
            let scales_f16 = e.scales.iter().map(|&s| f16::from_f32(s)).collect();
            OwnedWeights { layout, codes: e.codes.clone(), z: vec![], scales_f16, scales_f32: vec![] }
        }
    }

    pub fn view(&self) -> Result<Weights<'_>> {
        let data = if self.layout.format == Format::F32 {
            WeightData::F32 { z: &self.z, scales: &self.scales_f32 }
        } else {
            WeightData::Packed { codes: &self.codes, scales: &self.scales_f16 }
        };
        Weights::new(self.layout, data)
    }
}

/// `y[M, N] = a[M, K] W`, f32 activations.
pub fn qins_matmul_f32(a: &[f32], m: usize, w: &Weights, y: &mut [f32]) -> Result<()> {
    check_lens(a.len(), y.len(), m, w)?;
    if m == 0 {
        return Ok(());
    }
    if m <= GEMV_MAX_M {
        gemv(a, m, w, y);
    } else {
        gemm(a, m, w, y, BLOCKING);
    }
    Ok(())
}

/// `y[M, N] = a[M, K] W`, f16 activations: widened once, accumulated in f32, rounded once.
pub fn qins_matmul_f16(a: &[f16], m: usize, w: &Weights, y: &mut [f16]) -> Result<()> {
    check_lens(a.len(), y.len(), m, w)?;
    if m == 0 {
        return Ok(());
    }
    let mut af = vec![0f32; a.len()];
    a.convert_to_f32_slice(&mut af);
    let mut yf = vec![0f32; y.len()];
    qins_matmul_f32(&af, m, w, &mut yf)?;
    y.convert_from_f32_slice(&yf);
    Ok(())
}

/// The two strategies, callable directly so benchmarks can find the crossover and blocking.
#[doc(hidden)]
pub fn qins_matmul_f32_path(
    a: &[f32],
    m: usize,
    w: &Weights,
    y: &mut [f32],
    gemm_blocking: Option<Blocking>,
) -> Result<()> {
    check_lens(a.len(), y.len(), m, w)?;
    match gemm_blocking {
        _ if m == 0 => {}
        None => gemv(a, m, w, y),
        Some(b) if b.serial_tiles => gemm_serial_tiles(a, m, w, y, b.nb),
        Some(b) => gemm(a, m, w, y, b),
    }
    Ok(())
}

fn check_lens(a: usize, y: usize, m: usize, w: &Weights) -> Result<()> {
    let Layout { k, n, .. } = w.layout;
    if m.checked_mul(k) != Some(a) || m.checked_mul(n) != Some(y) {
        return Err(Error::invalid(format!("A has {a} and Y {y} elements; M={m}, K={k}, N={n} needs M*K and M*N")));
    }
    Ok(())
}

/// Instruction sets the hot loops are compiled for; picked once at run time so one binary
/// runs everywhere and still uses AVX2/AVX-512 where present. Every variant gives the same
/// bits: the loops are lane-wise and never fuse a multiply into an add.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Generic,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The variants this CPU can run, best last.
    fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa::Generic];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            v.push(Isa::Avx2);
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
                v.push(Isa::Avx512);
            }
        }
        v
    }
}

#[cfg(test)]
static ISA_OVERRIDE: std::sync::Mutex<Option<Isa>> = std::sync::Mutex::new(None);

fn isa() -> Isa {
    #[cfg(test)]
    if let Some(forced) = *ISA_OVERRIDE.lock().unwrap_or_else(|p| p.into_inner()) {
        return forced;
    }
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| *Isa::available().last().unwrap_or(&Isa::Generic))
}

/// Defines `fn $name` that runs `$body` compiled once per [`Isa`], picking the variant the CPU
/// supports. The body must only call `#[inline(always)]` code (or code generic enough to be
/// inlined) for the wider instructions to reach the hot loops.
macro_rules! multiversioned {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($arg: $ty),*) $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) {
                imp($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($arg: $ty),*) {
                imp($($arg),*)
            }

            match isa() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: selected only when the CPU reports these features.
                Isa::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Isa::Avx2 => unsafe { avx2($($arg),*) },
                Isa::Generic => imp($($arg),*),
            }
        }
    };
}

multiversioned! {
    /// Decodes weight rows `n0..` into consecutive `stride`-long rows of `tile`.
    fn decode_rows(w: &Weights, n0: usize, tile: &mut [f32], stride: usize) {
        for (r, row) in tile.chunks_exact_mut(stride).enumerate() {
            w.decode_row(n0 + r, row);
        }
    }
}

multiversioned! {
    /// GEMV work of one task: output channels `n0..` into `out` (`[rows, m]`).
    fn gemv_task(a: &[f32], m: usize, k: usize, w: &Weights, n0: usize, out: &mut [f32], buf: &mut [f32]) {
        gemv_rows(a, m, k, w, n0, out, buf)
    }
}

/// Small M: each task decodes `GEMV_ROWS` weight rows, one at a time into an L1-sized buffer,
/// and dots each with all M activation rows.
fn gemv(a: &[f32], m: usize, w: &Weights, y: &mut [f32]) {
    let Layout { k, n, .. } = w.layout;
    // Tasks own contiguous output: Y^T [N, M], transposed at the end (M <= GEMV_MAX_M).
    let mut yt_buf = Vec::new();
    let yt: &mut [f32] = if m == 1 {
        y
    } else {
        yt_buf.resize(n * m, 0f32);
        &mut yt_buf
    };
    let buf_len = w.row_buf_len();
    yt.par_chunks_mut(GEMV_ROWS * m)
        .enumerate()
        .for_each_init(|| vec![0f32; buf_len], |buf, (t, out)| gemv_task(a, m, k, w, t * GEMV_ROWS, out, buf));
    if m > 1 {
        for (ni, col) in yt_buf.chunks_exact(m).enumerate() {
            for (mi, &v) in col.iter().enumerate() {
                y[mi * n + ni] = v;
            }
        }
    }
}

#[inline(always)]
fn gemv_rows(a: &[f32], m: usize, k: usize, w: &Weights, n0: usize, out: &mut [f32], buf: &mut [f32]) {
    for (r, o) in out.chunks_exact_mut(m).enumerate() {
        w.decode_row(n0 + r, buf);
        let row = &buf[..k];
        // The decoded row stays in L1, so re-reading it per activation row is cheap.
        for (o, ar) in o.iter_mut().zip(a.chunks_exact(k)) {
            *o = dot(ar, row);
        }
    }
}

/// `a . w` in f32. Lane-wise accumulators, then one fixed-order reduction, let the compiler
/// vectorise without reassociating (so every ISA variant gives the same bits); 32 lanes keep
/// enough independent adds in flight to hide their latency.
#[inline(always)]
fn dot(a: &[f32], w: &[f32]) -> f32 {
    const L: usize = 32;
    let (ac, wc) = (a.chunks_exact(L), w.chunks_exact(L));
    let tail: f32 = ac.remainder().iter().zip(wc.remainder()).map(|(x, y)| x * y).sum();
    let mut acc = [0f32; L];
    for (x, y) in ac.zip(wc) {
        for j in 0..L {
            acc[j] += x[j] * y[j];
        }
    }
    let mut width = L;
    while width > 1 {
        width /= 2;
        for j in 0..width {
            acc[j] += acc[j + width];
        }
    }
    acc[0] + tail
}

/// A raw output pointer shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: tasks holding copies only ever write disjoint elements (see `gemm`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    // A method (not field access) so closures capture the whole Send+Sync wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    /// Tile buffer reused across calls, so large tiles are not mmapped and faulted in again
    /// for every task. Taken out while in use: rayon may run another task on this thread
    /// while one waits inside a nested join, and that task then simply allocates its own.
    static TILE: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

fn with_tile<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut v = TILE.with(Cell::take);
    if v.len() < len {
        v.resize(len, 0f32);
    }
    let r = f(&mut v[..len]);
    TILE.with(|c| {
        let other = c.take();
        c.set(if other.len() > v.len() { other } else { v });
    });
    r
}

/// Larger M: per block of `nb` output channels, decode an f32 tile `[nb, K]` once, then
/// `Y[m-block, n-block] = A[m-block, :] tile^T` with sgemm, row blocks in parallel.
fn gemm(a: &[f32], m: usize, w: &Weights, y: &mut [f32], b: Blocking) {
    let Layout { k, n, .. } = w.layout;
    let Blocking { nb: tile_rows, mb: block_rows, kc: k_step, .. } = b;
    let stride = w.row_buf_len();
    let out = OutPtr(y.as_mut_ptr());
    (0..n.div_ceil(tile_rows)).into_par_iter().for_each(|t| {
        let n0 = t * tile_rows;
        let nb = tile_rows.min(n - n0);
        with_tile(nb * stride, |tile| {
            decode_rows(w, n0, tile, stride);
            let tile = &*tile;
            (0..m.div_ceil(block_rows)).into_par_iter().for_each(|mi| {
                let m0 = mi * block_rows;
                let mb = block_rows.min(m - m0);
                for k0 in (0..k).step_by(k_step) {
                    let kc = k_step.min(k - k0);
                    let beta = if k0 == 0 { 0.0 } else { 1.0 };
                    // SAFETY: A rows m0..m0+mb, cols k0..k0+kc lie in `a` (M*K, row stride K);
                    // the tile's rows 0..nb, cols k0..k0+kc lie in `tile` (nb rows of `stride`
                    // >= K); C is Y rows m0..m0+mb, cols n0..n0+nb (row stride N), inside `y`
                    // (M*N, checked by the caller). Each (t, mi) task writes only its own C
                    // block, so writes never overlap, and `y` is not otherwise touched until
                    // the parallel loop ends. beta = 0 never reads C, which starts
                    // uninitialised (ORT output).
                    unsafe {
                        sgemm_nt(
                            mb,
                            kc,
                            nb,
                            a.as_ptr().add(m0 * k + k0),
                            k,
                            tile.as_ptr().add(k0),
                            stride,
                            beta,
                            out.get().add(m0 * n + n0),
                            n,
                        )
                    };
                }
            });
        });
    });
}

/// Benchmark variant of [`gemm`]: tiles in sequence, each one threaded sgemm.
fn gemm_serial_tiles(a: &[f32], m: usize, w: &Weights, y: &mut [f32], tile_rows: usize) {
    let Layout { k, n, .. } = w.layout;
    let stride = w.row_buf_len();
    let mut tile = vec![0f32; tile_rows * stride];
    for n0 in (0..n).step_by(tile_rows) {
        let nb = tile_rows.min(n - n0);
        tile[..nb * stride].par_chunks_mut(stride).enumerate().for_each(|(r, row)| {
            decode_rows(w, n0 + r, row, stride);
        });
        // SAFETY: as in `gemm`, with the whole of M and K in one call.
        unsafe { sgemm_nt(m, k, nb, a.as_ptr(), k, tile.as_ptr(), stride, 0.0, y.as_mut_ptr().add(n0), n) };
    }
}

/// `C[m, n] = A[m, k] B[n, k]^T + beta C`, row-major with the given row strides.
///
/// # Safety
/// `a` must hold `m` rows of `lda`, `b` `n` rows of `ldb` and `c` `m` rows of `ldc` elements
/// (the last row only up to its `k` or `n` used ones), with `c` not aliased by anyone else
/// during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_nt(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY: forwarded from the caller; B[k, n] is read as element (n * ldb + k).
    unsafe { matrixmultiply::sgemm(m, k, n, 1.0, a, lda as isize, 1, b, 1, ldb as isize, beta, c, ldc as isize, 1) }
}

/// The ORT kernel object: one per QinsMatMul node on the CPU EP.
struct CpuQinsMatMul {
    node: Node,
}

pub(crate) fn create(info: &KernelInfo, act: Act) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(CpuQinsMatMul { node: Node::from_info(info, act)? }))
}

impl Kernel for CpuQinsMatMul {
    fn compute(&self, ctx: &KernelCtx) -> Result<()> {
        let node = &self.node;
        let inputs = ctx.input_count()?;
        if inputs != 3 {
            return Err(Error::invalid(format!(
                "{}: expected 3 inputs (A, codes, scales), got {inputs}",
                node.describe()
            )));
        }
        let (a, codes, scales) = (ctx.input(0)?, ctx.input(1)?, ctx.input(2)?);
        let shape = node.check(inputs, &a.info, &codes.info, &scales.info)?;
        let y = ctx.output(0, &shape.out_shape)?;
        if shape.m == 0 {
            return Ok(());
        }
        let data = match node.layout.format {
            Format::F32 => WeightData::F32 { z: codes.slice()?, scales: scales.slice()? },
            _ => WeightData::Packed { codes: codes.slice()?, scales: scales.slice()? },
        };
        let w = Weights::new(node.layout, data)?;
        match node.act {
            Act::F32 => qins_matmul_f32(a.slice()?, shape.m, &w, y.into_slice_mut()?),
            Act::F16 => qins_matmul_f16(a.slice()?, shape.m, &w, y.into_slice_mut()?),
        }
        .map_err(|e| e.context(node.describe()))
    }
}

#[cfg(test)]
mod tests;
