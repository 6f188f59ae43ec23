//! CPU kernel of `com.qins.QinsMatMul`: `Y[M, N] = A[M, K] W[K, N]`, `W` QINS-encoded.
//!
//! Weights are decoded 32 at a time (a *chunk*) with in-register SIMD table lookups and
//! multiplied by their group's scale, bit-identical to [`qins::codec::decode_row`] (a unit
//! test holds the two together). Two strategies use that decode:
//! - small `M` (token generation, [`Path::Dot`]): decode and multiply in one pass. Each chunk
//!   is decoded in registers and multiplied straight into up to 4 activation rows, so the
//!   weights are read once (prefetched: rows are too short for the hardware prefetchers) and
//!   never stored as floats;
//! - larger `M` ([`Path::Gemm`]): blocks of strips of 12 output channels are decoded once into
//!   an L1-sized f32 buffer and multiplied with every 16-row panel of the activations by a
//!   register-tiled micro-kernel (12 x 32 fused multiply-adds per k, the weights broadcast).
//!
//! Both run their loops through a [`ParallelFor`]: inside ONNX Runtime the session's
//! intra-op pool, from Rust whatever the caller passes ([`qins_matmul_f32`] uses rayon).
//! The loops are compiled once per instruction set ([`Isa`]: AVX-512, AVX2, portable) and
//! picked at run time; all three give the same bits.
//!
//! Accumulation is f32 for both activation types; f16 activations are widened once and the
//! output rounded once, as the spec says.

mod kernels;
mod simd;

use std::cell::Cell;
use std::thread::LocalKey;

use half::f16;
use qins::codec::{Encoded, Format, Layout};

use self::kernels::{Args, PANEL};
pub use self::simd::Isa;
use self::simd::{chunk_lane_k, CHUNK};
use crate::cpu::parallel::{ParallelFor, Rayon};
pub use crate::cpu::ActElem;
use crate::ops::qins_matmul::{registrations, Act, Node, Run, RunShape};
use crate::ort_api::custom_op::{Kernel, OpSpec, CPU_EP};
use crate::ort_api::{Elem, Error, HostTensor, KernelCtx, KernelInfo, Result};

/// Rows of `A` up to which [`Path::Dot`] is used: past 4 it decodes every row again for each
/// 4 activation rows, which only pays while decoding is cheap. Measured with
/// `examples/bench.rs` (K = 576, N = 1536, one thread): at M = 8 the dot path is 15-30%
/// faster for q4 and q6, at M = 5 10% slower for q8 and f32.
fn dot_max_m(format: Format) -> usize {
    match format {
        Format::Q4 | Format::Q6 => 8,
        Format::Q8 | Format::F32 => 4,
    }
}
/// The loops are cut into about this many tasks (more when M is small and rows are cheap
/// would only add scheduling overhead), enough to balance a pool of 8-16 threads.
const TASKS: usize = 32;
/// Weight rows between the one being decoded and the one being prefetched.
const PREFETCH_ROWS: usize = 8;
/// Fewest weights (times activation rows) per dot task.
const MIN_TASK_WORK: usize = 1 << 14;

/// Largest K and N, as in the op's attribute checks.
const MAX_DIM: usize = 1 << 31;

/// Encoded weight data as the op receives it.
#[derive(Clone, Copy, Debug)]
pub enum WeightData<'a> {
    /// `bits` 4/6/8: packed codes `[N, row_bytes]` and f16 scales `[N, ceil(K/G)]`.
    Packed { codes: &'a [u8], scales: &'a [f16] },
    /// `bits` 32: `z` as f32 `[N, K]` and one f32 scale per output channel `[N, 1]`.
    F32 { z: &'a [f32], scales: &'a [f32] },
    /// Not an encoding: plain f32 weights `[N, K]` (a mixed node's `float_weight`), with the
    /// layout of bits 32 and no scale. The kernels read them as bits 32 rows without the
    /// decode, so the float part runs through the same loops.
    Plain { w: &'a [f32] },
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
        // The op's own bound (`layout_from_attrs`); the kernels index groups with u32.
        if k > MAX_DIM || n > MAX_DIM {
            return bad(format!("K and N must be at most {MAX_DIM}"));
        }
        let (codes_len, scales_len) = match data {
            WeightData::Packed { codes, scales } if format.is_integer() => (codes.len(), scales.len()),
            WeightData::F32 { z, scales } if format == Format::F32 => (z.len(), scales.len()),
            WeightData::Plain { w } if format == Format::F32 => (w.len(), n),
            _ => return bad("packed codes go with bits 4/6/8, f32 z and plain weights with bits 32".into()),
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

    /// Decodes output channel `n` (`W[0..K, n]`) into `out[..K]`, bit-identical to
    /// [`qins::codec::decode_row`], with the kernels' decode for `isa` (the best one if
    /// `None`).
    pub fn decode_row(&self, isa: Option<Isa>, n: usize, out: &mut [f32]) -> Result<()> {
        let Layout { format, k, n: rows, .. } = self.layout;
        let isa = isa.unwrap_or_else(Isa::best);
        if n >= rows || out.len() < k || !isa.is_available() {
            return Err(Error::invalid(format!("decode_row({isa:?}, {n}) of {rows} rows into {} floats", out.len())));
        }
        let plan = Plan::new(*self);
        let mut lanes = vec![0f32; plan.k32];
        let mut scratch = vec![0f32; plan.scale_scratch()];
        let args = Args { a: std::ptr::null(), m: 0, y: lanes.as_mut_ptr(), scratch: scratch.as_mut_ptr() };
        // SAFETY: row `n` exists, `lanes` holds one row of K32 and `scratch` its scales.
        unsafe { kernels::run_decode(isa, &plan, args, n..n + 1) };
        for (i, v) in lanes.iter().enumerate() {
            let kk = i / CHUNK * CHUNK + chunk_lane_k(format, i % CHUNK);
            if kk < k {
                out[kk] = *v;
            }
        }
        Ok(())
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

/// How to run a product; the default picks everything. For tests and benchmarks.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub isa: Option<Isa>,
    pub path: Option<Path>,
}

/// The two strategies (see the module docs).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Dot,
    Gemm,
}

/// `y[M, N] = a[M, K] W`, f32 activations, on rayon's pool.
pub fn qins_matmul_f32(a: &[f32], m: usize, w: &Weights, y: &mut [f32]) -> Result<()> {
    qins_matmul_f32_with(&Options::default(), &Rayon, a, m, w, y)
}

/// `y[M, N] = a[M, K] W`, f16 activations, on rayon's pool: widened once, accumulated in f32,
/// rounded once.
pub fn qins_matmul_f16(a: &[f16], m: usize, w: &Weights, y: &mut [f16]) -> Result<()> {
    qins_matmul_f16_with(&Options::default(), &Rayon, a, m, w, y)
}

/// [`qins_matmul_f32`] with the loops run by `par`.
pub fn qins_matmul_f32_with(
    opts: &Options,
    par: &dyn ParallelFor,
    a: &[f32],
    m: usize,
    w: &Weights,
    y: &mut [f32],
) -> Result<()> {
    check_lens(a.len(), y.len(), m, w)?;
    if m == 0 {
        return Ok(());
    }
    let isa = opts.isa.unwrap_or_else(Isa::best);
    if !isa.is_available() {
        return Err(Error::invalid(format!("{isa:?} is not supported by this CPU")));
    }
    let plan = Plan::new(*w);
    let path = opts.path.unwrap_or(if m <= dot_max_m(w.layout.format) { Path::Dot } else { Path::Gemm });
    let Layout { k, n, .. } = w.layout;
    let k32 = plan.k32;
    let out = SyncPtr(y.as_mut_ptr());
    match path {
        Path::Dot => with_scratch(&CALL_SCRATCH, m * k32, |ap| {
            for (dst, src) in ap.chunks_exact_mut(k32).zip(a.chunks_exact(k)) {
                permute_row(plan.w.layout.format, src, dst, 1);
            }
            // Whole blocks of the rows the kernel takes at a time.
            let rows = n.div_ceil(TASKS).max(MIN_TASK_WORK.div_ceil(k * m)).next_multiple_of(kernels::DOT_WEIGHT_ROWS);
            let rows = rows.min(n);
            let ap = SyncPtr(ap.as_mut_ptr());
            let scratch = kernels::DOT_WEIGHT_ROWS * plan.scale_scratch();
            par.for_each(n.div_ceil(rows), &|t| {
                let range = t * rows..n.min((t + 1) * rows);
                with_scratch(&TASK_SCRATCH, scratch, |s| {
                    let args = Args { a: ap.get(), m, y: out.get(), scratch: s.as_mut_ptr() };
                    // SAFETY: `plan` was checked against the buffers (Weights::new), `ap` holds
                    // M rows of K32 and `y` M rows of N (check_lens); this task writes only
                    // columns `range` of `y`, and `s` is its own.
                    unsafe { kernels::run_dot(isa, &plan, args, range) }
                })
            })
        }),
        Path::Gemm => {
            let panels = m.div_ceil(PANEL);
            with_scratch(&CALL_SCRATCH, panels * k32 * PANEL, |at| {
                let at_ptr = SyncPtr(at.as_mut_ptr());
                let a_ptr = SyncPtr(a.as_ptr().cast_mut());
                par.for_each(panels, &|p| {
                    // SAFETY: panel `p` of `at` (K32 x 16 floats) belongs to this task alone;
                    // `a` is M x K.
                    let (dst, src) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(at_ptr.get().add(p * k32 * PANEL), k32 * PANEL),
                            std::slice::from_raw_parts(a_ptr.get(), m * k),
                        )
                    };
                    pack_panel(plan.w.layout.format, src, k, m, p, dst);
                })?;
                let nr = kernels::gemm_rows(isa);
                let strips = n.div_ceil(nr);
                // Whole groups of strips per task, unless that leaves too few tasks.
                let per_task = match strips.div_ceil(TASKS) {
                    1 => 1,
                    t => t.next_multiple_of(kernels::STRIPS),
                };
                let scratch = kernels::gemm_scratch(&plan, nr, panels);
                par.for_each(strips.div_ceil(per_task), &|t| {
                    let range = t * per_task..strips.min((t + 1) * per_task);
                    with_scratch(&TASK_SCRATCH, scratch, |s| {
                        let args = Args { a: at_ptr.get(), m, y: out.get(), scratch: s.as_mut_ptr() };
                        // SAFETY: as for the dot path; `at` holds ceil(M/16) panels of K32 x 16,
                        // the task writes only the columns of its strips, and `s` is the size
                        // the kernel asks for.
                        unsafe { kernels::run_gemm(isa, &plan, args, range) }
                    })
                })
            })
        }
    }
}

/// [`qins_matmul_f16`] with the loops run by `par`.
pub fn qins_matmul_f16_with(
    opts: &Options,
    par: &dyn ParallelFor,
    a: &[f16],
    m: usize,
    w: &Weights,
    y: &mut [f16],
) -> Result<()> {
    check_lens(a.len(), y.len(), m, w)?;
    if m == 0 {
        return Ok(());
    }
    let mut yf = vec![0f32; y.len()];
    qins_matmul_f32_with(opts, par, &f16::widen(a), m, w, &mut yf)?;
    f16::narrow(&yf, y);
    Ok(())
}

/// The fused SwiGLU (`swiglu = 1`): `y[M, N/2] = silu(a Wg) * (a Wu)`, the product taken in
/// f32 over the whole `[K, N]` weight and combined by [`qins::codec::swiglu_combine`]. f16
/// activations are widened once and the output rounded once, as for the plain product.
pub fn qins_swiglu_with<T: ActElem>(
    opts: &Options,
    par: &dyn ParallelFor,
    a: &[T],
    m: usize,
    w: &Weights,
    y: &mut [T],
) -> Result<()> {
    let n = w.layout.n;
    if m.checked_mul(n / 2) != Some(y.len()) {
        return Err(Error::invalid(format!("Y has {} elements; M={m}, N/2={} needs M*N/2", y.len(), n / 2)));
    }
    let af = T::widen(a);
    let mut y2 = vec![0f32; m * n];
    qins_matmul_f32_with(opts, par, &af, m, w, &mut y2)?;
    let mut yf = vec![0f32; y.len()];
    qins::codec::swiglu_combine(&y2, m, &mut yf);
    T::narrow(&yf, y);
    Ok(())
}

/// A mixed node (`float_weight` given): `y[M, NF + N] = [a WF^T | a W]`, `wf` the plain
/// `[NF, K]` weight in the activations' type. Both products are taken in f32 by the same
/// loops ([`WeightData::Plain`] for the float part); f16 is widened once and rounded once.
/// f16 `wf` is widened on every call: an f16 model on the CPU pays that copy for its Q/K.
#[allow(clippy::too_many_arguments)]
pub fn qins_matmul_mixed_with<T: ActElem>(
    opts: &Options,
    par: &dyn ParallelFor,
    a: &[T],
    m: usize,
    wf: &[T],
    nf: usize,
    w: &Weights,
    y: &mut [T],
) -> Result<()> {
    let Layout { k, n, .. } = w.layout;
    let width = nf + n;
    if m.checked_mul(width) != Some(y.len()) {
        return Err(Error::invalid(format!("Y has {} elements; M={m}, NF + N={width} needs M*(NF+N)", y.len())));
    }
    let wf = T::widen(wf);
    let plain = Weights::new(Layout { format: Format::F32, k, n: nf, group: k }, WeightData::Plain { w: &wf })?;
    let af = T::widen(a);
    let (mut yf, mut yq) = (vec![0f32; m * nf], vec![0f32; m * n]);
    qins_matmul_f32_with(opts, par, &af, m, &plain, &mut yf)?;
    qins_matmul_f32_with(opts, par, &af, m, w, &mut yq)?;
    // Each output row is its float part then its QINS part, each rounded (f16) once.
    for ((row, f), q) in y.chunks_exact_mut(width).zip(yf.chunks_exact(nf)).zip(yq.chunks_exact(n)) {
        T::narrow(f, &mut row[..nf]);
        T::narrow(q, &mut row[nf..]);
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

/// [`Plan::chunk_group`] of a chunk whose weights span several groups.
const MIXED: u32 = u32::MAX;

/// What the kernels need to know about a weight beyond its buffers, worked out once per call.
struct Plan<'a> {
    w: Weights<'a>,
    /// K rounded up to whole chunks: the activations' row length once permuted.
    k32: usize,
    chunks: usize,
    /// Valid lanes of each vector of the last chunk (16 each when K is a multiple of 32).
    tail_lanes: (usize, usize),
    /// Per chunk, the group all its weights belong to, or [`MIXED`].
    chunk_group: Vec<u32>,
    /// Per lane of every chunk (lane order), its group; only filled when some chunk is mixed.
    lane_group: Vec<u32>,
    groups: usize,
    row_bytes: usize,
}

impl<'a> Plan<'a> {
    fn new(w: Weights<'a>) -> Plan<'a> {
        let Layout { format, k, group, .. } = w.layout;
        let k32 = k.div_ceil(CHUNK) * CHUNK;
        let chunks = k32 / CHUNK;
        let t = k - (chunks - 1) * CHUNK;
        let tail_lanes = match format {
            Format::Q4 => (t.div_ceil(2), t / 2),
            _ => (t.min(16), t - t.min(16)),
        };
        // Groups are below 2^31 (K is, checked by Weights::new), so they fit u32 next to MIXED.
        let chunk_group: Vec<u32> = (0..chunks)
            .map(|c| {
                let (first, last) = (c * CHUNK, k.min((c + 1) * CHUNK) - 1);
                if first / group == last / group {
                    (first / group) as u32
                } else {
                    MIXED
                }
            })
            .collect();
        let lane_group = if chunk_group.contains(&MIXED) {
            (0..k32)
                .map(|i| ((i / CHUNK * CHUNK + chunk_lane_k(format, i % CHUNK)).min(k - 1) / group) as u32)
                .collect()
        } else {
            Vec::new()
        };
        let row_bytes = if format == Format::F32 { 4 * k } else { format.row_bytes(k) };
        Plan { w, k32, chunks, tail_lanes, chunk_group, lane_group, groups: w.layout.groups(), row_bytes }
    }

    /// Chunks without lanes past K.
    fn full_chunks(&self) -> usize {
        if self.tail_lanes.0 + self.tail_lanes.1 == CHUNK {
            self.chunks
        } else {
            self.chunks - 1
        }
    }

    /// Bytes of codes (or `z`) per chunk.
    #[inline(always)]
    fn chunk_bytes(&self) -> usize {
        CHUNK * self.w.layout.format.bits() as usize / 8
    }

    /// How far ahead of a row the kernels prefetch, when they take `rows` rows at a time:
    /// [`PREFETCH_ROWS`] rows, rounded up to whole steps. A row of M = 1 work takes well under
    /// the time a line takes to come from DRAM, and rows of a few hundred bytes are too short
    /// for the hardware prefetchers to pick up.
    #[inline(always)]
    fn prefetch_ahead(&self, rows: usize) -> usize {
        PREFETCH_ROWS.next_multiple_of(rows) * self.row_bytes
    }

    /// Floats of task scratch the row scales take (whole vectors).
    fn scale_scratch(&self) -> usize {
        self.groups.div_ceil(16) * 16
    }
}

/// Writes activation row `src` (K floats) in the kernels' lane order, zero past K: element
/// `i` goes to `dst[i * step]` for `i < K32`.
#[inline(always)]
fn permute_row(format: Format, src: &[f32], dst: &mut [f32], step: usize) {
    let k = src.len();
    let full = k / CHUNK;
    if format == Format::Q4 {
        // Even k in the first 16 lanes of a chunk, odd k in the last 16 (`chunk_lane_k`).
        for (c, s) in src.chunks_exact(CHUNK).enumerate() {
            let d = &mut dst[c * CHUNK * step..];
            for j in 0..16 {
                d[j * step] = s[2 * j];
                d[(16 + j) * step] = s[2 * j + 1];
            }
        }
    } else {
        for (i, &v) in src[..full * CHUNK].iter().enumerate() {
            dst[i * step] = v;
        }
    }
    let rows = dst.len().div_ceil(step);
    for l in full * CHUNK..rows {
        let kk = l / CHUNK * CHUNK + chunk_lane_k(format, l % CHUNK);
        dst[l * step] = if kk < k { src[kk] } else { 0.0 };
    }
}

/// Panel `p` of the GEMM path: rows `16 p ..` of `a` (`[M, K]`), transposed to `[K32, 16]` in
/// lane order, zero past M and K.
fn pack_panel(format: Format, a: &[f32], k: usize, m: usize, p: usize, dst: &mut [f32]) {
    let rows = p * PANEL..m.min((p + 1) * PANEL);
    let used = rows.len();
    for (l, r) in rows.enumerate() {
        permute_row(format, &a[r * k..(r + 1) * k], &mut dst[l..], PANEL);
    }
    if used < PANEL {
        for v in dst.chunks_exact_mut(PANEL) {
            v[used..].fill(0.0);
        }
    }
}

/// A pointer shared by tasks that write disjoint parts of what it points at (or only read).
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);

// SAFETY: every use documents why the tasks' accesses do not overlap.
unsafe impl Send for SyncPtr {}
// SAFETY: as for Send.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    // A method (not field access) so closures capture the whole Send+Sync wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// 16 floats on a cache line: scratch is made of these so that every vector the kernels load
/// or store there is aligned (a 64-byte access across two lines costs about twice as much).
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([f32; 16]);

thread_local! {
    /// Per-call buffers (the permuted activations) of the calling thread.
    static CALL_SCRATCH: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
    /// Per-task buffers (scales, decoded strips) of whichever thread runs the task.
    static TASK_SCRATCH: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on `len` floats (64-byte aligned) of the thread's buffer in `slot`, kept across
/// calls so that it is not allocated and faulted in again every time. Taken out while in
/// use: a nested use (a task run by the thread that is waiting in a parallel loop) simply
/// allocates its own. Sub-buffers that start at multiples of 16 floats stay aligned.
fn with_scratch<R>(slot: &'static LocalKey<Cell<Vec<Line>>>, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut v = slot.with(Cell::take);
    let lines = len.div_ceil(16);
    if v.len() < lines {
        v.resize(lines, Line::default());
    }
    // SAFETY: `Line` is 16 f32 with no padding (repr C, size 64), so `lines` of them are
    // `16 lines >= len` initialised floats.
    let floats = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<f32>(), len) };
    let r = f(floats);
    if v.len() <= MAX_KEPT_LINES {
        slot.with(|c| {
            let other = c.take();
            c.set(if other.len() > v.len() { other } else { v });
        });
    }
    r
}

/// Larger scratch (a long prompt's activations) is freed after use rather than kept for the
/// life of the thread; allocating it again costs little next to the work that needs it.
const MAX_KEPT_LINES: usize = (4 << 20) / std::mem::size_of::<Line>();

/// The ORT kernel object: one per QinsMatMul node on the CPU EP.
struct CpuQinsMatMul {
    node: Node,
}

/// This op's registrations on the CPU execution provider.
pub(crate) fn ops() -> Vec<OpSpec> {
    registrations(CPU_EP, |info| create(info, Act::F32), |info| create(info, Act::F16))
}

fn create(info: &KernelInfo, act: Act) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(CpuQinsMatMul { node: Node::from_info(info, act)? }))
}

impl Kernel for CpuQinsMatMul {
    fn compute(&self, ctx: &KernelCtx) -> Result<()> {
        let node = &self.node;
        let Some(Run { a, codes, scales, float_weight, y, shape }) = node.begin(ctx)? else {
            return Ok(());
        };
        let (a, codes, scales, y) = (a.host()?, codes.host()?, scales.host()?, y.host()?);
        let data = match node.layout.format {
            Format::F32 => WeightData::F32 { z: codes.slice()?, scales: scales.slice()? },
            _ => WeightData::Packed { codes: codes.slice()?, scales: scales.slice()? },
        };
        let w = Weights::new(node.layout, data)?;
        // The session's intra-op pool: its size is the user's choice, and its threads are the
        // ones that will otherwise sit spinning for the next op.
        let opts = Options::default();
        if let Some(wf) = float_weight {
            let wf = wf.host()?;
            // Both activation types through one generic call: the tensors' element type is
            // the node's (checked by `node.check`).
            fn mixed<T: ActElem + Elem>(
                opts: &Options,
                ctx: &KernelCtx,
                a: &HostTensor,
                wf: &HostTensor,
                y: HostTensor,
                shape: &RunShape,
                w: &Weights,
            ) -> Result<()> {
                let (a, wf, y) = (a.slice()?, wf.slice()?, y.into_slice_mut()?);
                qins_matmul_mixed_with::<T>(opts, ctx, a, shape.m, wf, shape.nf, w, y)
            }
            return match node.act {
                Act::F32 => mixed::<f32>(&opts, ctx, &a, &wf, y, &shape, &w),
                Act::F16 => mixed::<f16>(&opts, ctx, &a, &wf, y, &shape, &w),
            }
            .map_err(|e| e.context(node.describe()));
        }
        match (node.act, node.swiglu) {
            (Act::F32, true) => qins_swiglu_with::<f32>(&opts, ctx, a.slice()?, shape.m, &w, y.into_slice_mut()?),
            (Act::F16, true) => qins_swiglu_with::<f16>(&opts, ctx, a.slice()?, shape.m, &w, y.into_slice_mut()?),
            (Act::F32, false) => qins_matmul_f32_with(&opts, ctx, a.slice()?, shape.m, &w, y.into_slice_mut()?),
            (Act::F16, false) => qins_matmul_f16_with(&opts, ctx, a.slice()?, shape.m, &w, y.into_slice_mut()?),
        }
        .map_err(|e| e.context(node.describe()))
    }
}

#[cfg(test)]
mod tests;
