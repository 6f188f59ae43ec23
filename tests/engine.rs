//! The generation engine on the real SmolLM2: cached decoding agrees with a full forward
//! pass, greedy output is sensible text, and seeded sampling repeats.

mod common;

use qins_graph_rewrite::engine::{CausalLm, EngineOptions, Sampling};

#[test]
fn cached_decoding_matches_the_full_forward_pass_and_generates_text() {
    if common::ort_lib().is_none() {
        return;
    }
    let Some(model) = common::smollm2_onnx("engine-smollm2") else { return };
    let tok = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    let mut lm = CausalLm::open(&model, &EngineOptions { threads: 2, ..Default::default() }).unwrap();
    let prompt: Vec<i64> =
        tok.encode("The capital of France is", false).unwrap().get_ids().iter().map(|&i| i as i64).collect();

    let g = lm.generate(&prompt, 12, &Sampling::Greedy, &[], true).unwrap();
    let text = tok.decode(&g.tokens.iter().map(|&t| t as u32).collect::<Vec<_>>(), false).unwrap();
    eprintln!("greedy: {text:?}");
    assert!(text.contains("Paris"), "{text:?}");

    // The same positions through one forward pass over prompt + generated tokens.
    let all: Vec<i64> = prompt.iter().chain(&g.tokens).copied().collect();
    let (full, vocab) = lm.forward(&all).unwrap();
    let mut max_diff = 0f32;
    for (step, logits) in g.logits.iter().enumerate() {
        let row = &full[(prompt.len() - 1 + step) * vocab..(prompt.len() + step) * vocab];
        for (a, b) in logits.iter().zip(row) {
            max_diff = max_diff.max((a - b).abs());
        }
    }
    eprintln!("cached vs full forward: max |dlogit| {max_diff:.2e}");
    assert!(max_diff < 1e-3, "cached decoding drifted from the full pass: {max_diff}");

    let s = Sampling::Sample { temperature: 0.7, top_p: 0.9, seed: 7 };
    let a = lm.generate(&prompt, 16, &s, &[], false).unwrap().tokens;
    let b = lm.generate(&prompt, 16, &s, &[], false).unwrap().tokens;
    assert_eq!(a, b, "same seed, different samples");
    let hot = Sampling::Sample { temperature: 1.5, top_p: 1.0, seed: 8 };
    let c = lm.generate(&prompt, 16, &hot, &[], false).unwrap().tokens;
    assert_ne!(a, c, "different settings gave identical samples");
}

/// The LongRoPE `If` fold that CUDA-graph decoding loads: no control flow left, the same
/// logits as the original model within the original context, refused beyond it.
#[test]
fn folding_the_rope_cache_choice_keeps_the_logits() {
    use qins_graph_rewrite::engine::FoldedModel;
    let onnx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/phi35-tiny-fp32-cpu/model.onnx");
    let folded = FoldedModel::create(&onnx, 64).unwrap().expect("the Phi-3.5 fixture has the builder's If");
    // A copy of the fixture folder with the folded graph, to open it as a model.
    let dir = std::env::temp_dir().join(format!("qins-fold-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["genai_config.json", "model.onnx.data"] {
        std::fs::copy(folded.data_dir.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("model.onnx"), &folded.bytes).unwrap();
    let m = qins::onnx::Model::load(&dir).unwrap();
    let ops: Vec<&str> = m.proto.graph.as_ref().unwrap().node.iter().map(|n| n.op_type()).collect();
    assert!(!ops.contains(&"If"), "{ops:?}");
    let err = FoldedModel::create(&onnx, 1 << 20).err().expect("a length past the original context");
    assert!(err.to_string().contains("original context"), "{err}");

    if common::ort_lib().is_none() {
        return;
    }
    let opts = EngineOptions { threads: 1, ..Default::default() };
    let ids = [5i64, 17, 300, 42, 7, 99];
    let (a, _) = CausalLm::open(&onnx, &opts).unwrap().forward(&ids).unwrap();
    let (b, _) = CausalLm::open(&dir, &opts).unwrap().forward(&ids).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert_eq!(a.len(), b.len());
    assert!(diff == 0.0, "folded model differs: max |dlogit| {diff}");
}
