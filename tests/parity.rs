//! Rewritten models against their originals, run through ONNX Runtime 1.31 (the `ort`
//! crate, load-dynamic) with the QINS custom-op library: the builder's tiny reference
//! models, and the real SmolLM2-135M-Instruct on Wikipedia text.
//!
//! The bounds below were set from measurements (docs/BENCHMARKS.md has the numbers and the
//! command) with room for run-to-run noise, not picked to pass: a codec or kernel that got
//! measurably worse fails them.

mod common;

use common::{compare, fixture, fixture_ids, rewrite, scratch};
use qins::codec::Format;
use qins_graph_rewrite::engine::{CausalLm, EngineOptions};
use qins_graph_rewrite::parity::{self, ModelParity};
use std::path::Path;

fn open(model: &Path) -> CausalLm {
    CausalLm::open(model, &EngineOptions { threads: 2, ..Default::default() }).unwrap()
}

#[test]
fn tiny_fixtures_f32_mode_matches_and_integer_modes_stay_close() {
    if common::ort_lib().is_none() {
        return;
    }
    let windows: Vec<Vec<i64>> = (0..3).map(|i| fixture_ids(48, i)).collect();
    for name in ["phi35-tiny-fp32-cpu", "llama-gqa-tiny-fp32-cpu"] {
        let src = fixture(name);
        let base = scratch(&format!("parity-{name}"));
        // f32 mode: the split qkv, the fused SwiGLU and the decoded weights must leave the logits
        // as they were.
        let f32_dir = base.join("f32");
        rewrite(&src, &f32_dir, Format::F32, 0);
        let p = compare(&src, &f32_dir, &windows);
        eprintln!("{name} f32: max|dlogit| {:.2e} (max|logit| {:.2})", p.max_abs_logit_diff, p.max_abs_logit);
        assert!(p.max_abs_logit_diff <= 1e-5, "{name}: f32 mode moved a logit by {}", p.max_abs_logit_diff);
        assert_eq!(p.argmax_agree, p.positions);

        // Integer modes on random-weight models: the logits are noise-like, so only the size
        // of the perturbation is meaningful. Bounds: relative to the logit range, measured
        // values (see docs) times ~3.
        for (format, group, max_rel) in [(Format::Q8, 32, 0.01), (Format::Q6, 32, 0.04), (Format::Q4, 32, 0.2)] {
            let dir = base.join(format.name());
            rewrite(&src, &dir, format, group);
            let p = compare(&src, &dir, &windows);
            let rel = p.max_abs_logit_diff / p.max_abs_logit;
            eprintln!(
                "{name} {format}: max|dlogit|/max|logit| {rel:.2e}, argmax {:.1}%, KL {:.2e}",
                100.0 * p.argmax_agreement(),
                p.mean_kl()
            );
            assert!(rel <= max_rel, "{name} {format}: logits moved {rel} of their range (bound {max_rel})");
        }
    }
}

fn wiki_ids(model: &Path, tokens: usize) -> Option<Vec<i64>> {
    let text = parity::read_text(&common::wiki_text()?).unwrap();
    let tok = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    let cut = text.char_indices().nth(tokens * 8).map_or(text.len(), |(i, _)| i);
    let ids = tok.encode(&text[..cut], false).unwrap().get_ids().iter().map(|&i| i as i64).collect::<Vec<_>>();
    assert!(ids.len() >= tokens, "not enough text");
    Some(ids[..tokens].to_vec())
}

#[test]
fn smollm2_parity_on_wikipedia_text() {
    if common::ort_lib().is_none() {
        return;
    }
    let Some(orig) = common::smollm2_onnx("parity-smollm2") else { return };
    let Some(ids) = wiki_ids(&orig, 512) else { return };
    let base = orig.parent().unwrap().to_path_buf();
    // (format, group, min argmax agreement, max |mean dNLL| nats/token, max mean KL)
    let cases = [
        (Format::F32, 0, 1.0, 1e-5, 1e-8),
        (Format::Q8, 128, 0.96, 0.02, 5e-3),
        (Format::Q6, 128, 0.88, 0.03, 0.04),
        (Format::Q4, 32, 0.65, 0.4, 0.4),
    ];
    let mut tests = Vec::new();
    for (format, group, ..) in cases {
        let dir = base.join(format!("{format}-g{group}"));
        rewrite(&orig, &dir, format, group);
        tests.push((dir.display().to_string(), open(&dir)));
    }
    let mut reference = open(&orig);
    let res: Vec<ModelParity> =
        parity::teacher_forced(&mut reference, &mut tests, &ids, 256, 2, &mut |_, _| {}).unwrap();
    eprint!("{}", parity::table(&res));
    for ((format, _, min_agree, max_dnll, max_kl), r) in cases.iter().zip(&res) {
        let dnll = r.nll_test() - r.nll_ref();
        assert!(
            r.parity.argmax_agreement() >= *min_agree,
            "{format}: argmax agreement {}",
            r.parity.argmax_agreement()
        );
        assert!(dnll.abs() <= *max_dnll, "{format}: NLL moved {dnll} nats/token");
        assert!(r.parity.mean_kl() <= *max_kl, "{format}: mean KL {}", r.parity.mean_kl());
    }
    // f32 mode: within 1e-5 of the logit range (the measured ~7e-5 absolute on logits up
    // to ~40 comes from f32 summation order, not the codec: docs/BENCHMARKS.md).
    let f32 = &res[0].parity;
    assert!(
        f32.max_abs_logit_diff <= 1e-5 * f32.max_abs_logit,
        "f32 mode: max|dlogit| {} for logits up to {}",
        f32.max_abs_logit_diff,
        f32.max_abs_logit
    );
}
