//! `qins rewrite --calibrate` on the builder's tiny reference models: the calibrated encoder
//! must lower the output error on its calibration inputs, write the same bytes twice, and
//! refuse what it cannot do. (The real-model check, on a de-gridded SmolLM2, is
//! scripts/test-calibrated.sh.)

mod common;

use common::{compare, fixture, fixture_ids, scratch};
use qins::codec::Format;
use qins_graph_rewrite::calibrate::{calibrate, CalibOptions, Calibration};
use qins_graph_rewrite::engine::EngineOptions;
use qins_graph_rewrite::plan::Plan;
use qins_graph_rewrite::{plan, rewrite, Model, NoProgress, PlanOptions, RewriteOptions};
use std::path::Path;

fn engine() -> EngineOptions {
    EngineOptions { threads: 2, ..Default::default() }
}

fn write(m: &Model, p: &Plan, format: Format, calib: Option<&Calibration>, out: &Path) {
    let opts = RewriteOptions { format, group: 32, force: true, fsync: false, kv_v: None, library: None };
    rewrite::rewrite_calibrated(m, p, &opts, calib, out, &mut NoProgress).unwrap();
}

#[test]
fn calibrated_q4_is_closer_on_its_inputs_and_deterministic() {
    if common::ort_lib().is_none() {
        return;
    }
    for name in ["phi35-tiny-fp32-cpu", "llama-gqa-tiny-fp32-cpu", "phi35-tiny-fp16-cuda"] {
        let src = fixture(name);
        let base = scratch(&format!("calibrate-{name}"));
        let m = Model::load(&src).unwrap();
        let p = plan::plan(&m, &PlanOptions::default()).unwrap();
        let windows: Vec<Vec<i64>> = (0..4).map(|i| fixture_ids(64, 100 + i)).collect();
        let flat: Vec<i64> = windows.concat();
        let opts = CalibOptions { window: 64, engine: engine(), spill_dir: base.clone(), ..Default::default() };
        let mut seen = 0;
        let c = calibrate(&m, &p, &flat, &opts, &mut |done, total| {
            assert!(done <= total);
            seen = done;
        })
        .unwrap();
        assert_eq!((c.tokens, c.windows, seen), (256, 4, 4));
        // Every Hessian sums every calibration token.
        for i in 0..p.targets.len() {
            assert_eq!(c.hessian(i).unwrap().tokens, 256);
        }
        // The captured inputs live in an unnamed file: nothing in the folder, even now.
        let names: Vec<String> =
            std::fs::read_dir(&base).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(names.is_empty(), "{names:?}");

        let plain = base.join("plain");
        write(&m, &p, Format::Q4, None, &plain);
        let (a, b) = (base.join("cal-a"), base.join("cal-b"));
        write(&m, &p, Format::Q4, Some(&c), &a);
        // The report says how the codes were chosen; the uncalibrated one says nothing of it.
        let report = |d: &Path| std::fs::read_to_string(d.join("qins_report.json")).unwrap();
        assert!(report(&a).contains("\"method\": \"gptq\"") && report(&a).contains("\"tokens\": 256"));
        assert!(!report(&plain).contains("\"calibration\""));
        // Determinism: a second calibration and rewrite of the same inputs, byte for byte.
        let c2 = calibrate(&m, &p, &flat, &opts, &mut |_, _| {}).unwrap();
        write(&m, &p, Format::Q4, Some(&c2), &b);
        drop((c, c2));
        assert!(
            !std::fs::read_dir(&base).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with('.')),
            "a temporary file was left in the folder"
        );
        for f in ["model.onnx", "model.onnx.data"] {
            assert!(
                std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
                "{name}: {f} differs between runs"
            );
        }
        assert!(
            std::fs::read(a.join("model.onnx.data")).unwrap() != std::fs::read(plain.join("model.onnx.data")).unwrap()
        );

        let (p0, p1) = (compare(&src, &plain, &windows), compare(&src, &a, &windows));
        let held_out: Vec<Vec<i64>> = (0..3).map(|i| fixture_ids(64, 900 + i)).collect();
        let (h0, h1) = (compare(&src, &plain, &held_out), compare(&src, &a, &held_out));
        eprintln!(
            "{name} q4 g32: KL on the calibration windows {:.3e} -> {:.3e}, held out {:.3e} -> {:.3e}",
            p0.mean_kl(),
            p1.mean_kl(),
            h0.mean_kl(),
            h1.mean_kl()
        );
        assert!(p1.mean_kl() < 0.8 * p0.mean_kl(), "{name}: calibration did not lower the KL on its own inputs");
    }
}

#[test]
fn calibration_refuses_what_it_cannot_do() {
    if common::ort_lib().is_none() {
        return;
    }
    let src = fixture("llama-gqa-tiny-fp32-cpu");
    let m = Model::load(&src).unwrap();
    let p = plan::plan(&m, &PlanOptions::default()).unwrap();
    let opts =
        CalibOptions { window: 64, engine: engine(), spill_dir: scratch("calibrate-refuse"), ..Default::default() };
    let Err(err) = calibrate(&m, &p, &[1], &opts, &mut |_, _| {}) else { panic!("one token must be refused") };
    assert!(err.to_string().contains("not one window"), "{err}");
    let bad = CalibOptions { window: 1, ..opts.clone() };
    assert!(calibrate(&m, &p, &fixture_ids(64, 1), &bad, &mut |_, _| {}).is_err());
    // Out-of-vocabulary ids fail in ONNX Runtime (Gather), as an error.
    assert!(calibrate(&m, &p, &[1, 2, 1 << 40], &opts, &mut |_, _| {}).is_err());

    // The f32 format has no grid to calibrate on.
    let c = calibrate(&m, &p, &fixture_ids(128, 2), &opts, &mut |_, _| {}).unwrap();
    let out = scratch("calibrate-f32").join("out");
    let ro = RewriteOptions { format: Format::F32, group: 0, force: true, fsync: false, kv_v: None, library: None };
    let Err(err) = rewrite::rewrite_calibrated(&m, &p, &ro, Some(&c), &out, &mut NoProgress) else {
        panic!("f32 must be refused")
    };
    assert!(format!("{err:#}").contains("integer formats"), "{err:#}");
    assert!(!out.exists(), "a failed rewrite left its output");
}
