//! Shared test support: fixtures, scratch folders, and the external pieces (ONNX Runtime,
//! SmolLM2, Wikipedia text) that `scripts/setup.sh` fetches.
//!
//! A test that needs a missing piece fails, naming what to run, so a CI run that lost its
//! data cannot pass quietly. `QINS_ALLOW_SKIP=1` turns those failures into skips for a quick
//! local run.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A reference fixture (derived from the onnxruntime-genai builder's; tests/fixtures/shrink.py).
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// An empty scratch folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = root().join("target/qins-test").join(name);
    if d.exists() {
        std::fs::remove_dir_all(&d).unwrap();
    }
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn from_env_or_deps(var: &str, rel: &str) -> Option<PathBuf> {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| root().join(".deps").join(rel));
    p.exists().then_some(p)
}

/// Returns the path, or fails (or, with QINS_ALLOW_SKIP=1, returns None) naming the fix.
fn require(what: &str, p: Option<PathBuf>) -> Option<PathBuf> {
    if p.is_some() {
        return p;
    }
    if std::env::var("QINS_ALLOW_SKIP").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: {what} not found (run scripts/setup.sh)");
        return None;
    }
    panic!("{what} not found: run scripts/setup.sh (or set QINS_ALLOW_SKIP=1 to skip)");
}

pub fn ort_lib() -> Option<PathBuf> {
    let p = from_env_or_deps("ORT_DYLIB_PATH", "ort/libonnxruntime.so.1.31.1");
    let p = require("ONNX Runtime (ORT_DYLIB_PATH)", p)?;
    std::env::set_var("ORT_DYLIB_PATH", &p);
    Some(p)
}

pub fn smollm2_gguf() -> Option<PathBuf> {
    require("SmolLM2 GGUF", from_env_or_deps("QINS_SMOLLM2_GGUF", "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

pub fn wiki_text() -> Option<PathBuf> {
    require("Wikipedia text", from_env_or_deps("QINS_WIKI_TEXT", "text/summaries_en-us.json"))
}

/// SmolLM2 imported into a fresh folder named `tag` (the import takes a few seconds).
pub fn smollm2_onnx(tag: &str) -> Option<PathBuf> {
    let gguf = smollm2_gguf()?;
    let dir = scratch(tag).join("smollm2-fp32");
    qins_models::import_gguf(&gguf, &dir, false, &mut |_| {}).expect("import SmolLM2");
    Some(dir)
}

/// Rewrites `model` into `out` with the default (phi3) policy.
pub fn rewrite(
    model: &Path,
    out: &Path,
    format: qins::codec::Format,
    group: usize,
) -> qins_graph_rewrite::report::RewriteReport {
    use qins_graph_rewrite::{plan, rewrite, Model, NoProgress, PlanOptions, RewriteOptions};
    let m = Model::load(model).unwrap();
    let p = plan::plan(&m, &PlanOptions::default()).unwrap();
    let opts = RewriteOptions { format, group, force: true, fsync: false, kv_v: None, library: None };
    rewrite::rewrite(&m, &p, &opts, out, &mut NoProgress).unwrap()
}

/// Rewrites `model` into `out` with weights untouched and a QINS V cache (`--preset none
/// --kv-v`).
pub fn rewrite_kv_v(model: &Path, out: &Path, v: qins::codec::Format) -> qins_graph_rewrite::report::RewriteReport {
    use qins_graph_rewrite::{plan, rewrite, Model, NoProgress, PlanOptions, Preset, RewriteOptions};
    let m = Model::load(model).unwrap();
    let p = plan::plan(&m, &PlanOptions { preset: Preset::None, allow_empty: true, ..Default::default() }).unwrap();
    let opts = RewriteOptions {
        format: qins::codec::Format::Q8,
        group: 0,
        force: true,
        fsync: false,
        kv_v: Some(v),
        library: None,
    };
    rewrite::rewrite(&m, &p, &opts, out, &mut NoProgress).unwrap()
}

/// Token ids spread over the fixtures' 512-token vocabulary.
pub fn fixture_ids(n: usize, seed: u64) -> Vec<i64> {
    let mut r = qins::rng::SplitMix64::new(seed);
    (0..n).map(|_| r.below(512) as i64).collect()
}

/// `test`'s logits against `reference`'s, teacher-forced on each window (2 threads each).
pub fn compare(reference: &Path, test: &Path, windows: &[Vec<i64>]) -> qins_graph_rewrite::parity::LogitParity {
    use qins_graph_rewrite::engine::{CausalLm, EngineOptions};
    use qins_graph_rewrite::parity;
    let open = |m: &Path| CausalLm::open(m, &EngineOptions { threads: 2, ..Default::default() }).unwrap();
    let (mut r, mut t) = (open(reference), open(test));
    let mut p = parity::LogitParity::default();
    for w in windows {
        let (a, vocab) = r.forward(w).unwrap();
        let (b, _) = t.forward(w).unwrap();
        p.add(&a, &b, vocab, &parity::next_tokens(w));
    }
    p
}
