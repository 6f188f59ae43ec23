//! CONTRIBUTING.md's "How to add an op", followed step by step with a trivial op, so that the
//! steps stay true: `Y = A * factor` (`test.howto.Scale`, f32, an integer attribute
//! `factor` in 1..=16), on the CPU execution provider, registered with the library's own
//! plumbing into a real ONNX Runtime session and run there.

use std::ffi::CStr;
use std::sync::OnceLock;

use ort_sys::ONNXTensorElementDataType as T;

use crate::ort_api::custom_op::{CustomOp, Kernel, OpSpec, CPU_EP};
use crate::ort_api::{elem, Api, Error, KernelCtx, KernelInfo, Result};

// Step 1, the contract (`ops/<op>.rs`): name, attributes and their ranges, input and output
// types and shapes, and the registrations a kernel's factory fills in. It imports no kernel.
mod contract {
    use super::*;

    pub const DOMAIN: &CStr = c"test.howto";
    pub const NAME: &CStr = c"Scale";
    const IO: &[T] = &[T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT];

    /// The node's attributes, checked once, when ORT creates the kernel.
    pub struct Node {
        pub factor: f32,
    }

    impl Node {
        pub fn from_info(info: &KernelInfo) -> Result<Node> {
            let factor = info.attr_i64(c"factor")?;
            if !(1..=16).contains(&factor) {
                return Err(Error::invalid(format!("attribute factor={factor} must be in [1, 16]")));
            }
            Ok(Node { factor: factor as f32 })
        }
    }

    /// The output shape for an input of `shape` and type `elem` (every run).
    pub fn check(elem: i32, shape: &[i64]) -> Result<Vec<i64>> {
        if elem != elem::FLOAT {
            return Err(Error::invalid(format!("A must be float, got {}", elem::name(elem))));
        }
        Ok(shape.to_vec())
    }

    pub fn registrations(ep: &'static CStr, create: fn(&KernelInfo) -> Result<Box<dyn Kernel>>) -> Vec<OpSpec> {
        vec![OpSpec {
            name: NAME,
            ep,
            inputs: IO,
            required_inputs: 1,
            outputs: IO,
            host_inputs: &[],
            since_version: 1,
            end_version: 1,
            create,
        }]
    }
}

// Step 2, the CPU kernel (`cpu/<op>/mod.rs`): a `Kernel` that runs the contract's checks and
// reads host tensors only through `Tensor::host`; its `ops()` goes into `cpu::register`.
mod cpu {
    use super::contract::{check, registrations, Node};
    use super::*;

    struct CpuScale {
        node: Node,
    }

    impl Kernel for CpuScale {
        fn compute(&self, ctx: &KernelCtx) -> Result<()> {
            let a = ctx.input(0)?;
            let shape = check(a.info.elem, &a.info.shape)?;
            let y = ctx.output(0, &shape)?.host()?;
            let a = a.host()?;
            for (y, a) in y.into_slice_mut::<f32>()?.iter_mut().zip(a.slice::<f32>()?) {
                *y = a * self.node.factor;
            }
            Ok(())
        }
    }

    pub fn ops() -> Vec<OpSpec> {
        registrations(CPU_EP, |info| Ok(Box::new(CpuScale { node: Node::from_info(info)? })))
    }
}

// Step 3 (an op with CUDA kernels): `kernels/<op>/*.cu`, a line in build.rs's KERNELS, an
// `Image` in `cuda/module.rs`, `cuda/<op>/mod.rs` with its `ops()` in `cuda::register`. This
// op has none; a CUDA build registers nothing more for it.

/// What `cpu::register` + `cuda::register` would hand `RegisterCustomOps` for this op.
fn ops() -> &'static [CustomOp] {
    static OPS: OnceLock<Vec<CustomOp>> = OnceLock::new();
    OPS.get_or_init(|| cpu::ops().into_iter().map(CustomOp::new).collect())
}

fn model(factor: i64) -> Vec<u8> {
    use prost::Message;
    use qins::onnx::build::{attr_int, node, value_info, Dim};
    use qins::onnx::dtype;
    use qins::onnx::proto::{GraphProto, ModelProto, OperatorSetIdProto};
    let io = |n: &str| value_info(n, dtype::FLOAT, &[Dim::Sym("n"), Dim::Fixed(3)]);
    let domain = contract::DOMAIN.to_str().unwrap();
    let graph = GraphProto {
        node: vec![node("Scale", domain, "scale", &["A"], &["Y"], vec![attr_int("factor", factor)])],
        input: vec![io("A")],
        output: vec![io("Y")],
        name: Some("howto".into()),
        ..Default::default()
    };
    let opset = |d: &str, v| OperatorSetIdProto { domain: Some(d.into()), version: Some(v) };
    ModelProto {
        ir_version: Some(9),
        opset_import: vec![opset("", 17), opset(domain, 1)],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

// Step 4, tests: the contract's unit tests, the kernel against a reference, and the op in a
// real session, as here.
#[test]
fn a_new_op_runs_in_onnx_runtime() {
    use ort::AsPointer;
    let dylib = std::env::var_os("ORT_DYLIB_PATH").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/ort/libonnxruntime.so.1.31.1")
    });
    if !dylib.is_file() {
        assert!(
            std::env::var("QINS_ALLOW_SKIP").is_ok_and(|v| v == "1"),
            "ONNX Runtime not found: run scripts/setup.sh"
        );
        return;
    }
    let env = ort::init_from(&dylib).unwrap().build().unwrap();
    // SAFETY: ORT's own API table, as the `ort` crate loaded it.
    let api = unsafe { Api::from_raw(ort::api()) }.expect("the ORT API");
    let run = |factor: i64| -> std::result::Result<Vec<f32>, String> {
        let mut b = ort::session::Session::builder(&env).map_err(|e| e.to_string())?;
        // SAFETY: the builder's options are live and belong to the ORT whose API `api` is.
        unsafe { crate::register_domain(api, b.ptr_mut(), contract::DOMAIN, ops()) }.map_err(|e| e.to_string())?;
        let mut s = b.commit_from_memory(&model(factor)).map_err(|e| e.to_string())?;
        let a = ort::value::Tensor::from_array(([2usize, 3], vec![1.0f32, -2.0, 3.0, 0.5, 0.0, -1.5])).unwrap();
        let out = s.run(ort::inputs!["A" => a]).map_err(|e| e.to_string())?;
        Ok(out["Y"].try_extract_tensor::<f32>().map_err(|e| e.to_string())?.1.to_vec())
    };
    assert_eq!(run(4).unwrap(), vec![4.0, -8.0, 12.0, 2.0, 0.0, -6.0]);
    let e = run(17).unwrap_err();
    assert!(e.contains("factor=17 must be in [1, 16]"), "{e}");
}
