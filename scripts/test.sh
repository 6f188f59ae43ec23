#!/usr/bin/env bash
# Sets up and runs every test: Rust unit and integration tests (the parity tests run the
# real SmolLM2 through ONNX Runtime 1.31.1 with the custom-op library; the CLI tests run the
# qins binary as a careless or hostile user would), the Python-host check of the library,
# the wheel in fresh venvs, onnxruntime-genai on a rewritten model, the README's examples,
# formatting, lints and a short fuzzing run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source .deps/env.sh
export RUST_BACKTRACE=1
# CI must compile the CUDA kernels (nvcc comes from setup.sh); a build without them fails here.
export QINS_REQUIRE_CUDA=${QINS_REQUIRE_CUDA:-1}
cargo build --release --workspace --all-targets
cargo test --release --workspace
# A calibrated q4 rewrite of the de-gridded SmolLM2 must beat the uncalibrated one (about 2 min).
scripts/test-calibrated.sh
"$QINS_PYTHON" provider/tests/ort_smoke.py target/release/libqins_provider.so
# The Python wheel (onnxruntime-qins, manylinux_2_28 via zig): fresh venvs with onnxruntime
# 1.31.1 and 1.23.0 (the oldest supported), a q8 SmolLM2 through Python ORT and the installed CLI.
scripts/test-wheel.sh 1.31.1 1.23.0
# onnxruntime-genai from PyPI runs a rewrite's output folder unchanged, with the engine's tokens.
scripts/test-genai.sh
# The README's Python, C and Rust examples, as written, on that folder.
scripts/test-snippets.sh target/qins-test/genai/smollm2-qins
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
# A short, repeatable coverage-guided run of every fuzz target (libFuzzer, fixed seed and
# counts, about 15 s each); `cargo test` above already replayed their seeds and a seeded
# mutation of them. The long runs are in docs/RELIABILITY.md.
FUZZ_SEED=1 scripts/fuzz.sh 0 op_inputs=300000 gguf=40000 onnx_model=80000 rewrite_plan=15000 attention_inputs=200000
echo "all tests passed"
