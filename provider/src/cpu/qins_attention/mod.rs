//! CPU kernel of `com.qins.QinsGroupQueryAttention`: GroupQueryAttention over a float K cache
//! and a QINS-coded V cache (`qins::codec::kv`). The reference the CUDA kernels are checked
//! against, multithreaded on ONNX Runtime's intra-op pool.
//!
//! A run has two phases:
//! 1. per (sequence, KV head): past rows copied into present (unless past and present are one
//!    buffer), then each new token's K row rotated and stored in the model's type and its V
//!    row encoded ([`encode_v_row`]);
//! 2. per (sequence, KV head, block of [`Q_BLOCK`] queries): the group's K rows widened and V
//!    rows decoded once into f32, then for every query head of the group and every query of
//!    the block: scores, softcap, mask, softmax and the weighted sum of the decoded V rows.
//!
//! Every query, the prompt's own included, attends to V as stored, so a prompt's outputs are
//! those of the same tokens run one at a time (up to f32 summation order), and perplexity
//! measured by teacher forcing measures the cache's effect. Scores, softmax and sums are f32
//! for both model types; f16 models round Q and K after rotary, as GroupQueryAttention does.

#[cfg(test)]
mod tests;

use std::sync::Mutex;

use half::f16;
use qins::codec::kv::{decode_v_row, encode_v_row};
use qins::isa::Isa;

use crate::cpu::parallel::ParallelFor;
use crate::cpu::ActElem;
use crate::ops::qins_attention::{registrations, Act, Dims, Node, Rotary, Run};
use crate::ort_api::custom_op::{Kernel, OpSpec, CPU_EP};
use crate::ort_api::{Elem, Error, KernelInfo, Result};

/// Queries per attention task: their scores over the whole cache stay in L2 (32 x 8k x 4
/// bytes = 1 MiB) and each K and V row read serves all of them.
pub const Q_BLOCK: usize = 32;

/// The model's float type, as the kernel reads and writes it: element by element here, whole
/// slices through [`ActElem`].
pub trait Float: Elem + ActElem {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// `v` as this type would hold it.
    fn round(v: f32) -> f32 {
        Self::from_f32(v).to_f32()
    }
}

impl Float for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> f32 {
        v
    }
}

impl Float for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> f16 {
        f16::from_f32(v)
    }
}

/// One run's buffers as host slices. `past_*` are `None` without a past or when past and
/// present are one buffer (then the past rows are already in place).
pub struct Buffers<'a, E: Float> {
    pub query: &'a [E],
    /// Unpacked K and V inputs (`None` when packed in `query`).
    pub key: Option<&'a [E]>,
    pub value: Option<&'a [E]>,
    pub past_key: Option<&'a [E]>,
    pub past_value: Option<&'a [u8]>,
    pub seqlens_k: &'a [i32],
    pub cos: &'a [E],
    pub sin: &'a [E],
    pub output: &'a mut [E],
    pub present_key: &'a mut [E],
    pub present_value: &'a mut [u8],
}

/// The attention of one run: `node`'s attributes, `dims` from [`Node::check`], the buffers
/// sized as `dims` says (checked here again, so this is safe to call from Rust directly).
pub fn attention<E: Float>(node: &Node, dims: &Dims, buf: Buffers<E>, pool: &dyn ParallelFor) -> Result<()> {
    let Dims { batch, seq, head_dim: hd, packed, past, present, row_bytes: rb, .. } = *dims;
    let (h, kvh) = (node.heads, node.kv_heads);
    let groups = batch * kvh;
    let want = |what: &str, got: usize, n: usize| -> Result<()> {
        if got != n {
            return Err(Error::invalid(format!("{what} has {got} elements, expected {n}")));
        }
        Ok(())
    };
    let q_width = if packed { (h + 2 * kvh) * hd } else { h * hd };
    want("query", buf.query.len(), batch * seq * q_width)?;
    if !packed {
        want("key", buf.key.map_or(0, <[E]>::len), batch * seq * kvh * hd)?;
        want("value", buf.value.map_or(0, <[E]>::len), batch * seq * kvh * hd)?;
    }
    want("output", buf.output.len(), batch * seq * h * hd)?;
    want("present_key", buf.present_key.len(), groups * present * hd)?;
    want("present_value", buf.present_value.len(), groups * present * rb)?;
    if let (Some(k), Some(v)) = (buf.past_key, buf.past_value) {
        want("past_key", k.len(), groups * past * hd)?;
        want("past_value", v.len(), groups * past * rb)?;
    }
    want("seqlens_k", buf.seqlens_k.len(), batch)?;
    want("cos_cache", buf.cos.len(), dims.rotary_positions * dims.rotary_dim / 2)?;
    want("sin_cache", buf.sin.len(), dims.rotary_positions * dims.rotary_dim / 2)?;

    if batch == 0 || seq == 0 || present == 0 {
        // No new token: a separate present holds no rows of its own (a first prompt of no
        // tokens starts from an empty cache), a shared one stays as it is.
        if buf.past_key.is_some() {
            buf.present_key.fill(E::from_f32(0.0));
            buf.present_value.fill(0);
        }
        return Ok(());
    }
    let lens: Vec<(usize, usize)> =
        buf.seqlens_k.iter().enumerate().map(|(b, &s)| dims.lengths(b, s)).collect::<Result<_>>()?;
    if node.rotary.is_some() {
        let last = lens.iter().map(|&(p, _)| p + seq).max().unwrap_or(0);
        if last > dims.rotary_positions {
            return Err(Error::invalid(format!(
                "position {} is past the rotary caches' {} positions",
                last - 1,
                dims.rotary_positions
            )));
        }
    }
    let rope = Rope { kind: node.rotary, dim: dims.rotary_dim, cos: buf.cos, sin: buf.sin };
    let ctx = Ctx { node, dims, lens: &lens, query: buf.query, key: buf.key, value: buf.value, rope };

    // Phase 1: the new rows, and the past where it must be copied.
    {
        let keys: Vec<Mutex<&mut [E]>> = buf.present_key.chunks_mut(present * hd).map(Mutex::new).collect();
        let values: Vec<Mutex<&mut [u8]>> = buf.present_value.chunks_mut(present * rb).map(Mutex::new).collect();
        let past = buf.past_key.zip(buf.past_value);
        pool.for_each(groups, &|g| {
            let (mut k, mut v) = (lock(&keys[g]), lock(&values[g]));
            ctx.store(g, past.map(|(pk, pv)| (&pk[g * dims.past * hd..], &pv[g * dims.past * rb..])), &mut k, &mut v);
        })?;
    }

    // Phase 2: attention, into one tile per task, then scattered into the output.
    let blocks = seq.div_ceil(Q_BLOCK);
    let present_key: &[E] = buf.present_key;
    let present_value: &[u8] = buf.present_value;
    let tiles: Vec<Mutex<Vec<f32>>> = (0..groups * blocks).map(|_| Mutex::new(Vec::new())).collect();
    let isa = Isa::best();
    pool.for_each(groups * blocks, &|t| {
        let (g, blk) = (t / blocks, t % blocks);
        let tile = ctx.attend(
            isa,
            g,
            blk * Q_BLOCK..((blk + 1) * Q_BLOCK).min(seq),
            &present_key[g * present * hd..(g + 1) * present * hd],
            &present_value[g * present * rb..(g + 1) * present * rb],
        );
        *lock(&tiles[t]) = tile;
    })?;
    let per_group = h / kvh;
    for (t, tile) in tiles.into_iter().enumerate() {
        let tile = tile.into_inner().unwrap_or_else(|p| p.into_inner());
        let (g, blk) = (t / blocks, t % blocks);
        let (b, kv) = (g / kvh, g % kvh);
        let rows = blk * Q_BLOCK..((blk + 1) * Q_BLOCK).min(seq);
        // The tile is [head of the group][query][head_dim].
        for (qi, s) in rows.clone().enumerate() {
            for j in 0..per_group {
                let head = kv * per_group + j;
                let src = &tile[(j * rows.len() + qi) * hd..][..hd];
                let dst = &mut buf.output[((b * seq + s) * h + head) * hd..][..hd];
                dst.iter_mut().zip(src).for_each(|(d, &v)| *d = E::from_f32(v));
            }
        }
    }
    Ok(())
}

/// A lock whose poisoning (a panic in another task, already reported) does not matter here.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Rope<'a, E> {
    kind: Option<Rotary>,
    dim: usize,
    cos: &'a [E],
    sin: &'a [E],
}

impl<E: Float> Rope<'_, E> {
    /// `x` (one head's row) rotated to position `pos`, rounded to the model's type.
    fn apply(&self, x: &mut [f32], pos: usize) {
        if let Some(kind) = self.kind {
            let half = self.dim / 2;
            let (c, s) = (&self.cos[pos * half..][..half], &self.sin[pos * half..][..half]);
            for i in 0..half {
                let (a, b) = match kind {
                    Rotary::Halves => (i, i + half),
                    Rotary::Interleaved => (2 * i, 2 * i + 1),
                };
                let (cv, sv) = (c[i].to_f32(), s[i].to_f32());
                let (xa, xb) = (x[a], x[b]);
                x[a] = xa * cv - xb * sv;
                x[b] = xb * cv + xa * sv;
            }
        }
        x.iter_mut().for_each(|v| *v = E::round(*v));
    }
}

/// What both phases read.
struct Ctx<'a, E: Float> {
    node: &'a Node,
    dims: &'a Dims,
    /// (cached before, total after) per sequence.
    lens: &'a [(usize, usize)],
    query: &'a [E],
    key: Option<&'a [E]>,
    value: Option<&'a [E]>,
    rope: Rope<'a, E>,
}

impl<E: Float> Ctx<'_, E> {
    /// Row `s` of head `head` of sequence `b` in the Q (`part` 0, head < H), K (1) or V (2)
    /// input.
    fn input_row(&self, part: usize, b: usize, s: usize, head: usize) -> &[E] {
        let (h, kvh, hd, seq) = (self.node.heads, self.node.kv_heads, self.dims.head_dim, self.dims.seq);
        if self.dims.packed {
            let first = [0, h, h + kvh][part];
            &self.query[((b * seq + s) * (h + 2 * kvh) + first + head) * hd..][..hd]
        } else {
            let (src, width) = match part {
                0 => (self.query, h),
                1 => (self.key.expect("unpacked (checked)"), kvh),
                _ => (self.value.expect("unpacked (checked)"), kvh),
            };
            &src[((b * seq + s) * width + head) * hd..][..hd]
        }
    }

    /// The position of new token `s` of sequence `b`.
    fn position(&self, b: usize, s: usize) -> usize {
        self.lens[b].0 + s
    }

    /// Phase 1 for group `g` = (sequence, KV head): `keys` and `values` are its present rows.
    fn store(&self, g: usize, past: Option<(&[E], &[u8])>, keys: &mut [E], values: &mut [u8]) {
        let (hd, rb, kvh) = (self.dims.head_dim, self.dims.row_bytes, self.node.kv_heads);
        let (b, kv) = (g / kvh, g % kvh);
        let (past_b, _) = self.lens[b];
        if let Some((pk, pv)) = past {
            keys[..past_b * hd].copy_from_slice(&pk[..past_b * hd]);
            values[..past_b * rb].copy_from_slice(&pv[..past_b * rb]);
            // Rows past the new ones hold nothing; zero them rather than leave them undefined.
            let end = past_b + self.dims.seq;
            keys[end * hd..].fill(E::from_f32(0.0));
            values[end * rb..].fill(0);
        }
        let mut row = vec![0f32; hd];
        for s in 0..self.dims.seq {
            let pos = past_b + s;
            row.iter_mut().zip(self.input_row(1, b, s, kv)).for_each(|(r, &x)| *r = x.to_f32());
            self.rope.apply(&mut row, self.position(b, s));
            keys[pos * hd..][..hd].iter_mut().zip(&row).for_each(|(k, &x)| *k = E::from_f32(x));
            row.iter_mut().zip(self.input_row(2, b, s, kv)).for_each(|(r, &x)| *r = x.to_f32());
            encode_v_row(self.node.v_format, &row, &mut values[pos * rb..][..rb]);
        }
    }

    /// Keys query `s` of sequence `b` sees: causal, clipped to the sequence's length (a
    /// padded first-prompt row sees the real tokens only) and to the local window.
    fn key_range(&self, b: usize, s: usize) -> std::ops::Range<usize> {
        let (past_b, total_b) = self.lens[b];
        let end = (past_b + s + 1).min(total_b.max(1));
        let start = match self.node.window {
            Some(w) if end > w + 1 => end - w - 1,
            _ => 0,
        };
        start..end
    }

    /// Phase 2 for group `g` and the queries `rows`: the outputs of the group's heads, as
    /// `[head of the group][query][head_dim]` f32.
    fn attend(&self, isa: Isa, g: usize, rows: std::ops::Range<usize>, keys: &[E], values: &[u8]) -> Vec<f32> {
        let (hd, rb, kvh, h) = (self.dims.head_dim, self.dims.row_bytes, self.node.kv_heads, self.node.heads);
        let (b, kv) = (g / kvh, g % kvh);
        let per_group = h / kvh;
        let keys_needed = rows.clone().map(|s| self.key_range(b, s).end).max().unwrap_or(0);
        // The group's K rows in f32 and its V rows decoded, once for all its heads.
        let k32 = E::widen(&keys[..keys_needed * hd]);
        let mut v32 = vec![0f32; keys_needed * hd];
        for (j, out) in v32.chunks_exact_mut(hd).enumerate() {
            decode_v_row(self.node.v_format, &values[j * rb..][..rb], out);
        }
        let alpha = self.node.softmax_scale(hd);
        let mut tile = vec![0f32; per_group * rows.len() * hd];
        let mut q = vec![0f32; hd];
        let mut p = vec![0f32; keys_needed];
        for j in 0..per_group {
            let head = kv * per_group + j;
            for (qi, s) in rows.clone().enumerate() {
                q.iter_mut().zip(self.input_row(0, b, s, head)).for_each(|(d, &x)| *d = x.to_f32());
                self.rope.apply(&mut q, self.position(b, s));
                let range = self.key_range(b, s);
                let p = &mut p[range.clone()];
                scores(isa, &q, &k32[range.start * hd..range.end * hd], alpha, p);
                if self.node.softcap > 0.0 {
                    let c = self.node.softcap;
                    p.iter_mut().for_each(|x| *x = c * (*x / c).tanh());
                }
                let m = p.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut sum = 0f32;
                p.iter_mut().for_each(|x| {
                    *x = (*x - m).exp();
                    sum += *x;
                });
                let inv = 1.0 / sum;
                let out = &mut tile[(j * rows.len() + qi) * hd..][..hd];
                weighted_sum(isa, p, &v32[range.start * hd..range.end * hd], inv, out);
            }
        }
        tile
    }
}

/// `p[j] = alpha * (q . k_j)` for the rows `k_j` of `k`.
fn scores(isa: Isa, q: &[f32], k: &[f32], alpha: f32, p: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            // SAFETY: `isa` came from `Isa::best`, so the CPU has AVX2 and FMA.
            unsafe { scores_avx2(q, k, alpha, p) }
        }
        _ => scores_impl(q, k, alpha, p),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(q: &[f32], k: &[f32], alpha: f32, p: &mut [f32]) {
    scores_impl(q, k, alpha, p)
}

#[inline(always)]
fn scores_impl(q: &[f32], k: &[f32], alpha: f32, p: &mut [f32]) {
    let hd = q.len();
    for (pj, kj) in p.iter_mut().zip(k.chunks_exact(hd)) {
        // Eight independent sums: the compiler keeps them in one vector register.
        let mut acc = [0f32; 8];
        for (a, b) in q.chunks_exact(8).zip(kj.chunks_exact(8)) {
            for l in 0..8 {
                acc[l] += a[l] * b[l];
            }
        }
        *pj = alpha * acc.iter().sum::<f32>();
    }
}

/// `out = inv * sum_j p[j] v_j` over the rows `v_j` of `v`.
fn weighted_sum(isa: Isa, p: &[f32], v: &[f32], inv: f32, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            // SAFETY: as in `scores`.
            unsafe { weighted_sum_avx2(p, v, inv, out) }
        }
        _ => weighted_sum_impl(p, v, inv, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum_avx2(p: &[f32], v: &[f32], inv: f32, out: &mut [f32]) {
    weighted_sum_impl(p, v, inv, out)
}

#[inline(always)]
fn weighted_sum_impl(p: &[f32], v: &[f32], inv: f32, out: &mut [f32]) {
    let hd = out.len();
    out.fill(0.0);
    for (&pj, vj) in p.iter().zip(v.chunks_exact(hd)) {
        out.iter_mut().zip(vj).for_each(|(o, &x)| *o += pj * x);
    }
    out.iter_mut().for_each(|o| *o *= inv);
}

struct CpuAttention {
    node: Node,
}

pub(crate) fn ops() -> Vec<OpSpec> {
    registrations(CPU_EP, |info| create(info, Act::F32), |info| create(info, Act::F16))
}

fn create(info: &KernelInfo, act: Act) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(CpuAttention { node: Node::from_info(info, act)? }))
}

impl Kernel for CpuAttention {
    fn compute(&self, ctx: &crate::ort_api::KernelCtx) -> Result<()> {
        let node = &self.node;
        // total_sequence_length: one int32 (checked by `begin`), in host memory on this EP.
        let run = node.begin(ctx, |t| Ok(t.host()?.slice::<i32>()?[0]))?;
        let r = match node.act {
            Act::F32 => run_typed::<f32>(node, run, ctx),
            Act::F16 => run_typed::<f16>(node, run, ctx),
        };
        r.map_err(|e| e.context(node.describe()))
    }
}

fn run_typed<E: Float>(node: &Node, run: Run, ctx: &crate::ort_api::KernelCtx) -> Result<()> {
    let Run { query, key, value, past_key, past_value, seqlens_k, cos, sin, output, present_key, present_value, dims } =
        run;
    // One buffer bound as past and present (onnxruntime-genai's past_present_share_buffer):
    // the past rows are in place, and no slice of the input may be made beside the output's.
    let shared = match (&past_key, &past_value) {
        (Some(pk), Some(pv)) => {
            let same_k = pk.raw::<E>()? == present_key.raw::<E>()? && !pk.raw::<E>()?.is_null();
            let same_v = pv.raw::<u8>()? == present_value.raw::<u8>()? && !pv.raw::<u8>()?.is_null();
            if same_k != same_v {
                return Err(Error::invalid(
                    "past_key and present_key share a buffer but the values do not (or the other way round)",
                ));
            }
            same_k
        }
        _ => false,
    };
    let (past_key, past_value) = if shared { (None, None) } else { (past_key, past_value) };
    let pk = past_key.map(|t| t.host()).transpose()?;
    let pv = past_value.map(|t| t.host()).transpose()?;
    let (k, v) = (key.map(|t| t.host()).transpose()?, value.map(|t| t.host()).transpose()?);
    let (c, s) = (cos.map(|t| t.host()).transpose()?, sin.map(|t| t.host()).transpose()?);
    let (q, sk) = (query.host()?, seqlens_k.host()?);
    let buf: Buffers<E> = Buffers {
        query: q.slice()?,
        key: k.as_ref().map(|t| t.slice()).transpose()?,
        value: v.as_ref().map(|t| t.slice()).transpose()?,
        past_key: pk.as_ref().map(|t| t.slice()).transpose()?,
        past_value: pv.as_ref().map(|t| t.slice()).transpose()?,
        seqlens_k: sk.slice()?,
        cos: c.as_ref().map(|t| t.slice()).transpose()?.unwrap_or(&[]),
        sin: s.as_ref().map(|t| t.slice()).transpose()?.unwrap_or(&[]),
        output: output.host()?.into_slice_mut()?,
        present_key: present_key.host()?.into_slice_mut()?,
        present_value: present_value.host()?.into_slice_mut()?,
    };
    attention(node, &dims, buf, ctx)
}
