//! `--kv-v`: the rewrite of GroupQueryAttention into QinsGroupQueryAttention over a QINS V
//! cache, run through ONNX Runtime with the library on the builder's fixtures (Phi-3.5's plain
//! heads with LongRoPE, Llama's grouped heads, an fp16 graph): the graph's I/O says what the
//! cache holds, the engine allocates it from that, a prompt's logits equal those of its tokens
//! fed one at a time, and the logits stay near the original model's.

mod common;

use qins::codec::Format;
use qins_graph_rewrite::engine::{CausalLm, EngineOptions};
use qins_graph_rewrite::{plan, rewrite, Model, NoProgress, PlanOptions, Preset, RewriteOptions};
use std::path::Path;

fn kv_rewrite(
    model: &Path,
    out: &Path,
    v: Format,
    weights: Option<Format>,
) -> qins_graph_rewrite::report::RewriteReport {
    let m = Model::load(model).unwrap();
    let popts = match weights {
        Some(_) => PlanOptions::default(),
        None => PlanOptions { preset: Preset::None, allow_empty: true, ..Default::default() },
    };
    let p = plan::plan(&m, &popts).unwrap();
    let opts = RewriteOptions {
        format: weights.unwrap_or(Format::Q8),
        group: 0,
        force: true,
        fsync: false,
        kv_v: Some(v),
        library: None,
    };
    rewrite::rewrite(&m, &p, &opts, out, &mut NoProgress).unwrap()
}

fn ids(n: usize, vocab: i64) -> Vec<i64> {
    let mut r = qins::rng::SplitMix64::seeded(17);
    (0..n).map(|_| r.below(vocab as u64) as i64).collect()
}

/// Largest |a - b| over the rows, and the relative Frobenius difference.
fn diff(a: &[f32], b: &[f32]) -> (f32, f64) {
    let m = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let e: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let s: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (m, (e / s).sqrt())
}

#[test]
fn kv_v_models_run_in_onnx_runtime_and_stay_near_the_original() {
    if common::ort_lib().is_none() {
        return;
    }
    let opts = EngineOptions { threads: 2, ..Default::default() };
    for (fixture, heads) in
        [("phi35-tiny-fp32-cpu", "plain"), ("llama-gqa-tiny-fp32-cpu", "grouped"), ("phi35-tiny-fp16-cuda", "fp16")]
    {
        let src = common::fixture(fixture);
        let mut orig = CausalLm::open(&src, &opts).unwrap();
        let prompt = ids(40, 512);
        let (want, vocab) = orig.forward(&prompt).unwrap();
        let mut errs = vec![];
        for v in [Format::Q8, Format::Q4] {
            let out = common::scratch(&format!("kv-v-{fixture}-{v}"));
            let report = kv_rewrite(&src, &out, v, None);
            let kv = report.kv_v.as_ref().expect("the V cache pass ran");
            assert_eq!(kv.row_bytes, kv.head_dim * v.bits() as usize / 8 + 4, "{fixture}");
            assert!(kv.kv_bytes_per_token_after < kv.kv_bytes_per_token_before);

            // The graph's I/O says what the cache holds: uint8 rows of row_bytes.
            let m = Model::load(&out).unwrap();
            let g = m.proto.graph.as_ref().unwrap();
            let input = g.input.iter().find(|i| i.name() == "past_key_values.0.value").unwrap();
            let t = match input.r#type.as_ref().unwrap().value.as_ref().unwrap() {
                qins::onnx::proto::type_proto::Value::TensorType(t) => t.clone(),
                _ => unreachable!(),
            };
            assert_eq!(t.elem_type, Some(qins::onnx::dtype::UINT8), "{fixture}");
            assert!(!g.node.iter().any(|n| n.op_type() == "GroupQueryAttention"), "{fixture}");

            let mut lm = CausalLm::open(&out, &opts).unwrap();
            assert_eq!(lm.kv_bytes_per_token(), kv.kv_bytes_per_token_after, "{fixture}: the engine's cache");
            let (whole, vocab2) = lm.forward(&prompt).unwrap();
            assert_eq!(vocab, vocab2);
            // The same tokens one at a time through the cache: V as stored either way.
            let mut cache = lm.empty_cache().unwrap();
            let mut steps = vec![];
            for &t in &prompt {
                steps.extend(lm.extend(&mut cache, &[t], true).unwrap().0);
            }
            let (max, _) = diff(&steps, &whole);
            assert!(max < 2e-3, "{fixture} {v}: prompt vs one at a time: {max}");
            let (max, rel) = diff(&whole, &want);
            eprintln!("{fixture} ({heads}) KV-V {v}: vs the original max |dlogit| {max:.2e}, rel {rel:.2e}");
            errs.push(rel);
        }
        // q8 stays close to the original, and q4 is measurably coarser than q8.
        assert!(errs[0] < 2e-2, "{fixture}: KV-V q8 moved the logits by {}", errs[0]);
        assert!(errs[1] > errs[0], "{fixture}: q4 ({}) no worse than q8 ({})", errs[1], errs[0]);
    }
}

#[test]
fn kv_v_with_weight_coding_and_bad_requests() {
    if common::ort_lib().is_none() {
        return;
    }
    let src = common::fixture("llama-gqa-tiny-fp32-cpu");
    let out = common::scratch("kv-v-weights");
    let r = kv_rewrite(&src, &out, Format::Q8, Some(Format::Q8));
    assert!(!r.layers.is_empty() && r.kv_v.is_some());
    let mut lm = CausalLm::open(&out, &EngineOptions { threads: 1, ..Default::default() }).unwrap();
    let (logits, _) = lm.forward(&ids(12, 512)).unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));

    // A model without GroupQueryAttention: a clear error, nothing written.
    let plain = common::scratch("kv-v-nogqa");
    let m = Model::load(&out).unwrap();
    let p = plan::plan(&m, &PlanOptions { preset: Preset::None, allow_empty: true, ..Default::default() }).unwrap();
    let opts = RewriteOptions {
        format: Format::Q8,
        group: 0,
        force: true,
        fsync: false,
        kv_v: Some(Format::Q8),
        library: None,
    };
    let e = rewrite::rewrite(&m, &p, &opts, &plain.join("o"), &mut NoProgress).unwrap_err();
    assert!(format!("{e:#}").contains("no GroupQueryAttention"), "{e:#}");
    assert!(!plain.join("o").exists());
}
