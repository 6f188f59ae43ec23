//! CUDA kernel of `com.qins.QinsGroupQueryAttention` for ORT's CUDA execution provider
//! (`kernels/qins_attention/qins_attention.cu`), checked against the CPU kernel
//! (`scripts/gpu/check_attention.py`).
//!
//! Per run, on the node's stream, no host synchronisation and no allocation outside ORT's
//! allocator (so a session with `enable_cuda_graph` can capture it):
//! 1. separate past and present: `qins_attn_copy_past` copies each sequence's cached rows
//!    (and zeroes the rest); one buffer bound as both: nothing;
//! 2. `qins_attn_store_*`: each new token's K row rotated and stored, its V row encoded;
//! 3. `qins_attn_attend_*`: flash-decoding, one warp per (query, head, split of the keys),
//!    V decoded in registers with each position's scale folded into its probability; with
//!    more than one split `qins_attn_combine_*` merges the splits' partial softmaxes.
//!
//! The split count depends only on shapes and the buffer length (never on the tokens' lengths,
//! which live on the device), so a replayed CUDA graph stays correct as the cache grows.

use std::ffi::{c_void, CStr};

use crate::cuda::module::{launch, modules_for, After, Args, Image, Loaded};
use crate::ops::qins_attention::{registrations, Act, Node, Run, Step};
use crate::ort_api::custom_op::{Kernel, OpSpec, CUDA_EP};
use crate::ort_api::{Error, KernelCtx, KernelInfo, Result};
use qins::codec::Format;

/// This op's registrations on the CUDA execution provider (not yet in `cuda::register`: see
/// there).
#[allow(dead_code)]
pub(crate) fn ops() -> Vec<OpSpec> {
    registrations(CUDA_EP, |info| create(info, Act::F32), |info| create(info, Act::F16))
}

struct CudaAttention {
    node: Node,
}

fn create(info: &KernelInfo, act: Act) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(CudaAttention { node: Node::from_info(info, act)? }))
}

impl Kernel for CudaAttention {
    fn compute(&self, ctx: &KernelCtx) -> Result<()> {
        self.run(ctx).map_err(|e| e.context(self.node.describe()))
    }
}

/// The entry points for a model type and V format.
fn names(act: Act, v: Format) -> (&'static CStr, &'static CStr, &'static CStr) {
    match (act, v) {
        (Act::F32, Format::Q8) => (c"qins_attn_store_f32_v8", c"qins_attn_attend_f32_v8", c"qins_attn_combine_f32"),
        (Act::F32, _) => (c"qins_attn_store_f32_v4", c"qins_attn_attend_f32_v4", c"qins_attn_combine_f32"),
        (Act::F16, Format::Q8) => (c"qins_attn_store_f16_v8", c"qins_attn_attend_f16_v8", c"qins_attn_combine_f16"),
        (Act::F16, _) => (c"qins_attn_store_f16_v4", c"qins_attn_attend_f16_v4", c"qins_attn_combine_f16"),
    }
}

/// Splits of the keys per (query, head): enough warps to fill the device several times over
/// at token generation (3 KV heads of one sequence included), none for a prompt, which has a
/// warp per query already; at least 64 keys a split.
pub fn splits(queries_x_heads: usize, keys: usize, multiprocessors: usize) -> usize {
    let want = (8 * multiprocessors).div_ceil(queries_x_heads.max(1));
    want.clamp(1, 64).min(keys.div_ceil(64).max(1))
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("{what} {v} is too large for the CUDA kernels")))
}

impl CudaAttention {
    fn run(&self, ctx: &KernelCtx) -> Result<()> {
        let node = &self.node;
        // total_sequence_length is a host input (OpSpec::host_inputs).
        let run = node.begin(ctx, |t| Ok(t.host()?.slice::<i32>()?[0]))?;
        let Run {
            query,
            key,
            value,
            past_key,
            past_value,
            seqlens_k,
            cos,
            sin,
            output,
            present_key,
            present_value,
            dims,
        } = run;
        if dims.batch == 0 || dims.seq == 0 {
            return Ok(());
        }
        let raw = |t: &crate::ort_api::Tensor| -> Result<*mut c_void> {
            match node.act {
                Act::F32 => t.raw::<f32>(),
                Act::F16 => t.raw::<half::f16>(),
            }
        };
        let q = raw(&query)?;
        let (k_in, v_in) = match (&key, &value) {
            (Some(k), Some(v)) => (raw(k)?, raw(v)?),
            _ => (std::ptr::null_mut(), std::ptr::null_mut()),
        };
        let (pk, pv) = (raw(&present_key)?, present_value.raw::<u8>()?);
        let out = raw(&output)?;
        let sk = seqlens_k.raw::<i32>()?;
        let (cos_p, sin_p) = match (&cos, &sin) {
            (Some(c), Some(s)) => (raw(c)?, raw(s)?),
            _ => (std::ptr::null_mut(), std::ptr::null_mut()),
        };
        let stream = ctx.gpu_stream()?;
        let mods: std::sync::Arc<Loaded> = modules_for(q)?;
        let (h, kvh, hd, s) = (node.heads, node.kv_heads, dims.head_dim, dims.seq);
        let first = i32::from(dims.step == Step::FirstPrompt);
        let (s32, h32, kvh32, d32, p32) =
            (i32_of(s, "S")?, i32_of(h, "H")?, i32_of(kvh, "KVH")?, i32_of(hd, "D")?, i32_of(dims.present, "P")?);
        // The most positions any sequence may hold after this run: the kernels skip a sequence
        // whose device-side seqlens_k says more (they cannot report it without a host sync), so
        // rows and rotary positions stay below it. A shared buffer's P is the static cache's
        // size and can be far larger.
        let limit = dims.total.min(dims.present);
        let l32 = i32_of(limit, "total_sequence_length")?;
        let bs = dims.batch.checked_mul(s).ok_or_else(|| Error::invalid("B x S overflows"))?;
        let grid_x = |n: usize| u32::try_from(n).map_err(|_| Error::invalid(format!("grid of {n} blocks")));

        // 1. The past, where present is a buffer of its own.
        if let (Some(pkt), Some(pvt)) = (&past_key, &past_value) {
            let shared = raw(pkt)? == pk && pvt.raw::<u8>()? == pv;
            if !shared {
                let elem = if node.act == Act::F32 { 4 } else { 2 };
                let f = mods.function(Image::Attention, c"qins_attn_copy_past")?;
                let args = Args::new()
                    .ptr(raw(pkt)?)
                    .ptr(pvt.raw::<u8>()?)
                    .ptr(sk)
                    .ptr(pk)
                    .ptr(pv)
                    .i32(s32)
                    .i32(kvh32)
                    .i32(i32_of(dims.past, "P")?)
                    .i32(p32)
                    .i32(l32)
                    .i32(first)
                    .i32(i32_of(hd * elem / 4, "K row")?)
                    .i32(i32_of(dims.row_bytes / 4, "V row")?);
                // SAFETY: the buffers were checked against `dims` by `begin`: past [B, KVH,
                // past, D] / [.., R] and present [B, KVH, P, ..], rows a whole number of 4-byte
                // words (D % 8 == 0, R % 4 == 0); the kernel reads seqlens_k [B].
                unsafe {
                    launch(
                        f,
                        (grid_x(dims.present)?, kvh as u32, dims.batch as u32),
                        (128, 1),
                        0,
                        stream,
                        &args,
                        After::Completion,
                    )?
                };
            }
        }

        let (store, attend, combine) = names(node.act, node.v_format);
        let rot = i32_of(dims.rotary_dim, "rotary dim")?;
        let inter = i32::from(node.rotary == Some(crate::ops::qins_attention::Rotary::Interleaved));
        // 2. The new rows.
        // Both kernels take the inputs and caches first and the run's sizes after them
        // (attend puts its outputs in between).
        let inputs = || Args::new().ptr(q).ptr(k_in).ptr(v_in).ptr(sk).ptr(cos_p).ptr(sin_p).ptr(pk).ptr(pv);
        let sizes = |a: Args| a.i32(s32).i32(h32).i32(kvh32).i32(d32).i32(p32).i32(l32).i32(first).i32(rot).i32(inter);
        let f = mods.function(Image::Attention, store)?;
        let args = sizes(inputs());
        if node.rotary.is_some() && limit > dims.rotary_positions {
            return Err(Error::invalid(format!(
                "the rotary caches hold {} positions, total_sequence_length {}",
                dims.rotary_positions, dims.total
            )));
        }
        // SAFETY: inputs and outputs as `begin` checked them; the kernel writes only present
        // rows inside [0, limit) of the sequence's own (batch, KV head) block, and reads the
        // rotary caches only at positions below limit, which the check above keeps within them.
        unsafe {
            launch(f, (s32 as u32, kvh as u32, dims.batch as u32), (32, 1), 0, stream, &args, After::Completion)?
        };

        // 3. Attention.
        let n_split = splits(bs * h, dims.present, mods.multiprocessors);
        let scratch = if n_split > 1 {
            let floats = bs * h * n_split * (hd + 2);
            Some(ctx.scratch(c"Cuda", mods.device, floats * 4)?)
        } else {
            None
        };
        let part = scratch.as_ref().map_or(std::ptr::null_mut(), |s| s.ptr);
        let alpha = node.softmax_scale(hd);
        let window = node.window.map_or(Ok(-1), |w| i32_of(w, "local_window_size"))?;
        let f = mods.function(Image::Attention, attend)?;
        let args = sizes(inputs().ptr(out).ptr(part)).f32(alpha).f32(node.softcap).i32(window).i32(n_split as i32);
        // SAFETY: as for the store; `part` holds B S H splits (D + 2) floats when splits > 1,
        // and the output [B, S, H D] is written once per (query, head).
        unsafe { launch(f, (grid_x(bs)?, h as u32, n_split as u32), (32, 1), 0, stream, &args, After::Completion)? };
        if n_split > 1 {
            let f = mods.function(Image::Attention, combine)?;
            let args = Args::new().ptr(part).ptr(out).i32(s32).i32(h32).i32(d32).i32(n_split as i32);
            // SAFETY: `part` was written by the launch before on the same stream.
            unsafe { launch(f, (grid_x(bs)?, h as u32, 1), (32, 1), 0, stream, &args, After::Completion)? };
        }
        drop(scratch);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::module::{built_with_kernels, embeds, images};

    #[test]
    fn every_entry_point_is_embedded() {
        if !built_with_kernels() {
            return;
        }
        for act in [Act::F32, Act::F16] {
            for v in [Format::Q8, Format::Q4] {
                let (a, b, c) = names(act, v);
                for n in [a, b, c, c"qins_attn_copy_past"] {
                    assert!(embeds(images::QINS_ATTENTION, n), "{n:?}");
                }
            }
        }
    }

    #[test]
    fn split_counts() {
        // Token generation, SmolLM2 (9 heads), batch 1, on 132 SMs: many splits.
        assert_eq!(splits(9, 4096, 132), 64);
        assert_eq!(splits(9, 100, 132), 2);
        // A prompt of 1000 tokens: one.
        assert_eq!(splits(9000, 1000, 132), 1);
        assert_eq!(splits(32, 1, 132), 1);
    }
}
