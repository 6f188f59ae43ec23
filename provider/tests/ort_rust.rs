//! Loads the built cdylib into ONNX Runtime from a Rust process through the `ort` crate (the
//! way the project's Rust hosts do), runs float32 and float16 QinsMatMul models and compares
//! with the codec's decoded weight; bad inputs must come back as errors.
//!
//! Needs an ONNX Runtime shared library: `ORT_DYLIB_PATH`, or the copy scripts/setup.sh puts
//! in `.deps/`.

use std::path::{Path, PathBuf};

use half::f16;
use ort::session::Session;
use ort::value::Tensor;
use prost::Message;
use qins::codec::{encode_rows, Encoded, Format, Layout};
use qins::onnx::build::{attr_int, node, tensor_raw, value_info, Dim};
use qins::onnx::dtype;
use qins::onnx::proto::{GraphProto, ModelProto, OperatorSetIdProto};
use qins_provider::cpu::qins_matmul::{qins_matmul_f32, OwnedWeights};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// ONNX Runtime from `ORT_DYLIB_PATH` or where scripts/setup.sh puts it. Missing, the test
/// fails unless `QINS_ALLOW_SKIP=1`.
fn ort_dylib() -> Option<PathBuf> {
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/ort/libonnxruntime.so.1.31.1");
    let p = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from).unwrap_or(default);
    if p.is_file() {
        return Some(p);
    }
    assert!(
        std::env::var("QINS_ALLOW_SKIP").is_ok_and(|v| v == "1"),
        "ONNX Runtime not found at {}: run scripts/setup.sh or set ORT_DYLIB_PATH (QINS_ALLOW_SKIP=1 skips)",
        p.display()
    );
    None
}

/// The cdylib cargo built with this test: `target/<profile>/deps/`, beside the test binary.
/// (`target/<profile>/` may hold an older copy: cargo only refreshes it when the library
/// itself is a build target, not when it is built as a test's dependency.)
fn provider_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe path");
    let name = format!("{}qins_provider{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    exe.parent().expect("deps dir").join(name)
}

fn model_bytes(e: &Encoded, act: i32) -> Vec<u8> {
    let l = e.layout;
    let (codes_type, codes_dims) = match l.format {
        Format::F32 => (dtype::FLOAT, [l.n as i64, l.k as i64]),
        f => (dtype::UINT8, [l.n as i64, f.row_bytes(l.k) as i64]),
    };
    let scale_type = if l.format == Format::F32 { dtype::FLOAT } else { dtype::FLOAT16 };
    let attrs = vec![
        attr_int("K", l.k as i64),
        attr_int("N", l.n as i64),
        attr_int("bits", l.format.bits() as i64),
        attr_int("group_size", l.group as i64),
    ];
    let graph = GraphProto {
        name: Some("g".into()),
        node: vec![node("QinsMatMul", "com.qins", "q", &["A", "codes", "scales"], &["Y"], attrs)],
        initializer: vec![
            tensor_raw("codes", codes_type, &codes_dims, e.codes.clone()),
            tensor_raw("scales", scale_type, &[l.n as i64, l.groups() as i64], e.scale_bytes()),
        ],
        // K left symbolic so that a wrong K reaches the kernel's own check.
        input: vec![value_info("A", act, &[Dim::Sym("m"), Dim::Sym("k")])],
        output: vec![value_info("Y", act, &[Dim::Sym("m"), Dim::Fixed(l.n as i64)])],
        ..Default::default()
    };
    let opset = |domain: &str, version| OperatorSetIdProto { domain: Some(domain.into()), version: Some(version) };
    ModelProto {
        ir_version: Some(9),
        opset_import: vec![opset("", 17), opset("com.qins", 1)],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

fn reference(a: &[f32], m: usize, e: &Encoded) -> Vec<f64> {
    let Layout { k, n, .. } = e.layout;
    let w = e.decode_kn();
    (0..m * n).map(|i| (0..k).map(|p| a[i / n * k + p] as f64 * w[p * n + i % n] as f64).sum()).collect()
}

fn rel_err(y: &[f64], r: &[f64]) -> f64 {
    let num: f64 = y.iter().zip(r).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = r.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

#[test]
fn runs_in_ort_from_rust() -> Res<()> {
    let Some(dylib) = ort_dylib() else {
        eprintln!("SKIPPED: no ONNX Runtime library");
        return Ok(());
    };
    let lib = provider_lib();
    assert!(lib.exists(), "{} missing", lib.display());
    let env = ort::init_from(&dylib)?.build()?;

    let (k, n, m) = (200, 37, 5);
    let mut rng = qins::rng::SplitMix64::new(1);
    let mut rnd = move || rng.unit() as f32 - 0.5;
    let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
    for (format, group) in [(Format::Q8, 64), (Format::Q6, 30), (Format::Q4, 32), (Format::F32, k)] {
        let rows: Vec<f32> = (0..k * n).map(|_| rnd() * 0.2).collect();
        let e = encode_rows(&rows, Layout { format, k, n, group })?.0;
        let want = reference(&a, m, &e);

        let mut s =
            Session::builder(&env)?.with_operator_library(&lib)?.commit_from_memory(&model_bytes(&e, dtype::FLOAT))?;
        let out = s.run(ort::inputs!["A" => Tensor::from_array(([m, k], a.clone()))?])?;
        let (shape, y) = out["Y"].try_extract_tensor::<f32>()?;
        assert_eq!(&shape[..], &[m as i64, n as i64]);
        let y: Vec<f64> = y.iter().map(|&v| v as f64).collect();
        let err = rel_err(&y, &want);
        assert!(err < 1e-5, "{format} f32: rel err {err:e}");
        drop(out);

        // Last dim != K: an error from the kernel, and the session stays usable.
        let bad = s.run(ort::inputs!["A" => Tensor::from_array(([m, k - 1], vec![0f32; m * (k - 1)]))?]);
        let msg = bad.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("QinsMatMul node 'q'") && msg.contains(&format!("K={k}")), "unexpected: {msg}");

        let ah: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
        let want16 = reference(&ah.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), m, &e);
        let mut s = Session::builder(&env)?
            .with_operator_library(&lib)?
            .commit_from_memory(&model_bytes(&e, dtype::FLOAT16))?;
        let out = s.run(ort::inputs!["A" => Tensor::from_array(([m, k], ah))?])?;
        let (_, y) = out["Y"].try_extract_tensor::<f16>()?;
        let y: Vec<f64> = y.iter().map(|v| v.to_f64()).collect();
        let err = rel_err(&y, &want16);
        assert!(err < 2e-3, "{format} f16: rel err {err:e}");
    }

    // The kernels split their work over the session's intra-op pool (KernelContext_ParallelFor):
    // every pool size must give the same bits as the library called directly from Rust, for
    // both strategies (small and large M).
    let (k, n) = (300, 200);
    for (format, group) in [(Format::Q8, 64), (Format::Q4, 32), (Format::F32, k)] {
        let rows: Vec<f32> = (0..k * n).map(|_| rnd() * 0.2).collect();
        let e = encode_rows(&rows, Layout { format, k, n, group })?.0;
        let owned = OwnedWeights::from_encoded(&e);
        let w = owned.view()?;
        for m in [1, 3, 40] {
            let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let mut direct = vec![0f32; m * n];
            qins_matmul_f32(&a, m, &w, &mut direct)?;
            for threads in [1, 3] {
                let mut s = Session::builder(&env)?
                    .with_intra_threads(threads)?
                    .with_operator_library(&lib)?
                    .commit_from_memory(&model_bytes(&e, dtype::FLOAT))?;
                let out = s.run(ort::inputs!["A" => Tensor::from_array(([m, k], a.clone()))?])?;
                let (_, y) = out["Y"].try_extract_tensor::<f32>()?;
                assert!(y == &direct[..], "{format} M={m}, {threads} intra-op threads: differs from the direct call");
            }
        }
    }
    Ok(())
}
