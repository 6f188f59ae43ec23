#!/usr/bin/env bash
# Sets up and runs every test: Rust unit and integration tests (the parity tests run the
# real SmolLM2 through ONNX Runtime 1.31.1 with the custom-op library), the Python-host
# check of the library, formatting and lints.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source .deps/env.sh
export RUST_BACKTRACE=1
# CI must compile the CUDA kernels (nvcc comes from setup.sh); a build without them fails here.
export QINS_REQUIRE_CUDA=${QINS_REQUIRE_CUDA:-1}
cargo build --release --workspace --all-targets
cargo test --release --workspace
"$QINS_PYTHON" provider/tests/ort_smoke.py target/release/libqins_provider.so
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
echo "all tests passed"
