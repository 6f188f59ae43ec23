//! CUDA kernel of `com.qins.QinsMatMul` for ORT's CUDA execution provider: the ORT kernel
//! here, its launchers beside it ([`gemv`], [`prefill`], [`decode`], [`epilogue`], [`tc`]).
//!
//! Dispatch on the rows `M` of the activations (after flattening the leading dims):
//! - token generation: `kernels/qins_matmul/qins_matmul.cu`, which multiplies on the codes (table lookups
//!   in shared memory, weights read once, nothing decoded to memory). With f16 activations and
//!   a layout it takes (packed codes, K % 8 == 0, groups a power-of-two multiple of the chunk,
//!   or one group a row: [`tc`]) that is the tensor-core kernel `gemv_tc`, up to `TC_MAX_M` = 16 rows;
//!   otherwise the CUDA-core kernel, up to `GEMV_MAX_M` = 4 (on an H100 it beat decode +
//!   cuBLAS at M = 4 and lost at M = 16; docs/BENCHMARKS.md);
//! - prefill, on the same layouts: `kernels/qins_matmul/qins_matmul_prefill.cu` (`gemm_tc`: the weights
//!   decoded in registers once per block of up to 128 rows), up to `PREFILL_MAX_M` and where
//!   its launcher's time model ([`prefill::plan`]) expects it to beat
//!   decode + cuBLAS;
//! - otherwise: the weight is decoded into scratch from ORT's CUDA allocator by
//!   `kernels/qins_matmul/qins_decode.cu` and multiplied by cuBLAS (`cublasGemmEx`, f32 accumulation)
//!   on ORT's own handle. Where ORT provides no cuBLAS handle, the code-domain kernels run
//!   for every `M`.
//!
//! Everything is launched on the node's stream, with no host synchronisation and no
//! allocation outside ORT's allocator, so a session with `enable_cuda_graph` can capture it.

pub mod decode;
pub mod epilogue;
pub mod gemv;
pub mod prefill;
pub mod tc;

use std::ffi::c_void;

use qins::codec::Format;

use self::decode::decode;
use self::epilogue::{copy_cols, swiglu_combine};
use self::gemv::{gemv, gemv_max_m, gemv_tc, gemv_tc_mixed};
use self::prefill::prefill;
use self::tc::{tc_cpg_shift_for, Buffers};
use crate::cuda::cublas::{cublas, R_16F, R_32F};
use crate::cuda::module::{modules_for, Loaded};
use crate::cuda::tuning::tuning;
use crate::ops::qins_matmul::{registrations, Act, Node, Run};
use crate::ort_api::custom_op::{Kernel, OpSpec, CUDA_EP};
use crate::ort_api::{Error, KernelCtx, KernelInfo, Result};

/// Largest `M` for the prefill kernel where it applies, by default; above it the weight is
/// decoded for cuBLAS. `QINS_CUDA_PREFILL_MAX_M` overrides it ([`crate::cuda::tuning`]; 0
/// turns the kernel off, for comparisons).
pub const PREFILL_MAX_M: usize = 4096;

/// ORT's CUDA resource ids (`cuda_resource.h`, version 3).
const CUDA_RESOURCE_VERSION: i32 = 3;
const CUBLAS_HANDLE: i32 = 10002;

/// This op's registrations on the CUDA execution provider.
pub(crate) fn ops() -> Vec<OpSpec> {
    registrations(CUDA_EP, |info| create(info, Act::F32), |info| create(info, Act::F16))
}

/// The ORT kernel object: one per QinsMatMul node on the CUDA EP.
struct CudaQinsMatMul {
    node: Node,
    weights_constant: bool,
}

fn create(info: &KernelInfo, act: Act) -> Result<Box<dyn Kernel>> {
    let node = Node::from_info(info, act)?;
    // A bad tuning knob fails the session now, naming the variable, not the first run.
    tuning().map_err(|e| e.context(node.describe()))?;
    // The kernels take K, N, the row length in bytes and the group count as 32-bit ints (and
    // index with 64-bit products of them).
    let l = &node.layout;
    let fits = |v: usize| i32::try_from(v).is_ok();
    if !(fits(l.k) && fits(l.n) && fits(l.row_bytes()) && fits(4 * l.k) && fits(l.groups())) {
        return Err(Error::invalid(format!("{}: too large for the CUDA kernels", node.describe())));
    }
    // Inputs 1 and 2: codes and scales; 3, where given, the float weight.
    let weights_constant = info.input_is_constant(1)?
        && info.input_is_constant(2)?
        && (info.input_count()? < 4 || info.input_is_constant(3).unwrap_or(false));
    Ok(Box::new(CudaQinsMatMul { node, weights_constant }))
}

impl Kernel for CudaQinsMatMul {
    fn compute(&self, ctx: &KernelCtx) -> Result<()> {
        self.run(ctx).map_err(|e| e.context(self.node.describe()))
    }
}

impl CudaQinsMatMul {
    fn run(&self, ctx: &KernelCtx) -> Result<()> {
        let node = &self.node;
        let Some(Run { a, codes, scales, float_weight, y, shape }) = node.begin(ctx)? else {
            return Ok(());
        };
        let (a_ptr, y_ptr) = match node.act {
            Act::F32 => (a.raw::<f32>()?, y.raw::<f32>()?),
            Act::F16 => (a.raw::<half::f16>()?, y.raw::<half::f16>()?),
        };
        let (codes_ptr, scales_ptr) = match node.layout.format {
            Format::F32 => (codes.raw::<f32>()?, scales.raw::<f32>()?),
            _ => (codes.raw::<u8>()?, scales.raw::<half::f16>()?),
        };
        let stream = ctx.gpu_stream()?;
        let mods = modules_for(a_ptr)?;
        let b = Buffers {
            a: a_ptr,
            codes: codes_ptr,
            scales: scales_ptr,
            y: y_ptr,
            weights_constant: self.weights_constant,
        };
        if let Some(wf) = float_weight {
            let wf_ptr = match node.act {
                Act::F32 => wf.raw::<f32>()?,
                Act::F16 => wf.raw::<half::f16>()?,
            };
            return self.mixed(ctx, &mods, stream, shape.m, shape.nf, wf_ptr, &b);
        }
        if !node.swiglu {
            return self.product(ctx, &mods, stream, shape.m, &b);
        }
        let tc = tc_cpg_shift_for(node, a_ptr).is_some();
        // SAFETY: the buffers were checked against the layout by `node.check`, `y` as
        // [M, N / 2] for the fused epilogue.
        if shape.m <= gemv_max_m(tc)? && unsafe { gemv_tc(&mods, stream, node, shape.m, &b, true)? } {
            return Ok(());
        }
        // Elsewhere the product goes to scratch and a second kernel applies the epilogue.
        let elem = if node.act == Act::F16 { 2 } else { 4 };
        let y2 = ctx.scratch(c"Cuda", mods.device, shape.m * node.layout.n * elem)?;
        self.product(ctx, &mods, stream, shape.m, &Buffers { y: y2.ptr, ..b })?;
        // SAFETY: `y2` holds the [M, N] product, `y` is [M, N / 2].
        unsafe { swiglu_combine(&mods, stream, node.act, y2.ptr, y_ptr, shape.m, node.layout.n / 2) }
    }

    /// A mixed node: `Y[M, NF + N] = [A WF^T | A W]`. Up to 16 f16 rows, one launch of the
    /// tensor-core kernel does both parts (`qins_gemv_tc_mix_*`); elsewhere cuBLAS writes the
    /// float part straight into `Y`'s first columns and the QINS product goes through scratch
    /// into the rest.
    #[allow(clippy::too_many_arguments)]
    fn mixed(
        &self,
        ctx: &KernelCtx,
        mods: &Loaded,
        stream: *mut c_void,
        m: usize,
        nf: usize,
        wf: *const c_void,
        b: &Buffers,
    ) -> Result<()> {
        let node = &self.node;
        let l = &node.layout;
        let width = nf + l.n;
        // The kernels take NF and the row stride NF + N as 32-bit ints.
        if i32::try_from(width).is_err() {
            return Err(Error::invalid(format!("NF + N = {width} is too large for the CUDA kernels")));
        }
        if m <= gemv_max_m(true)? && (wf as usize).is_multiple_of(16) {
            // SAFETY: the buffers were checked against the layout and `wf` as [NF, K].
            if unsafe { gemv_tc_mixed(mods, stream, node, m, nf, wf, b)? } {
                return Ok(());
            }
        }
        let handle = ctx.resource(CUDA_RESOURCE_VERSION, CUBLAS_HANDLE)?;
        if handle.is_null() {
            return Err(Error::fail("a float_weight input needs ORT's cuBLAS handle, and the CUDA EP gave none"));
        }
        let (elem, dtype) = match node.act {
            Act::F16 => (2, R_16F),
            Act::F32 => (4, R_32F),
        };
        // SAFETY: `wf` is [NF, K] and `y` [M, NF + N], checked by `node.check`.
        unsafe { cublas()?.gemm_rowmajor_abt(handle, stream, dtype, m, nf, l.k, b.a, wf, b.y, width)? };
        let yq = ctx.scratch(c"Cuda", mods.device, m * l.n * elem)?;
        self.product(ctx, mods, stream, m, &Buffers { y: yq.ptr, ..*b })?;
        // SAFETY: `yq` holds the [M, N] product and `y` is [M, NF + N].
        unsafe { copy_cols(mods, stream, node.act, yq.ptr, b.y, m, l.n, width, nf) }
    }

    /// `Y = A W` into `b.y` (`[M, N]`) on the path `M` picks (the module docs).
    fn product(&self, ctx: &KernelCtx, mods: &Loaded, stream: *mut c_void, m: usize, b: &Buffers) -> Result<()> {
        let node = &self.node;
        let l = &node.layout;
        let tc = tc_cpg_shift_for(node, b.a).is_some();
        if m <= gemv_max_m(tc)? {
            // SAFETY: the buffers were checked against the layout by `node.check`.
            return unsafe { gemv(mods, stream, node, m, b) };
        }
        let handle = ctx.resource(CUDA_RESOURCE_VERSION, CUBLAS_HANDLE)?;
        // Without a cuBLAS handle the code-domain kernels take every M.
        if m <= tuning()?.prefill_max_m || handle.is_null() {
            // SAFETY: the buffers were checked against the layout by `node.check`.
            if unsafe { prefill(mods, ctx, node, m, !handle.is_null(), b)? } {
                return Ok(());
            }
        }
        if handle.is_null() {
            // SAFETY: as above.
            return unsafe { gemv(mods, stream, node, m, b) };
        }
        let blas = cublas()?;
        let (elem, dtype, f16) = match node.act {
            Act::F16 => (2, R_16F, true),
            Act::F32 => (4, R_32F, false),
        };
        let w = ctx.scratch(c"Cuda", mods.device, l.n * l.k * elem)?;
        // SAFETY: `w` holds N x K elements; the other buffers were checked against the layout.
        unsafe {
            decode(mods, stream, l, f16, b.codes, b.scales, w.ptr)?;
            blas.gemm_rowmajor_abt(handle, stream, dtype, m, l.n, l.k, b.a, w.ptr, b.y, l.n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default the tuning knob replaces is the documented one.
    #[test]
    fn prefill_default_matches_tuning() {
        assert_eq!(crate::cuda::tuning::Tuning::default().prefill_max_m, PREFILL_MAX_M);
    }
}
