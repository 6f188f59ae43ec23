#!/usr/bin/env bash
# Coverage-guided fuzzing of the targets in fuzz/harness (libFuzzer through cargo-fuzz, on
# stable Rust with --sanitizer none; debug assertions, so overflow checks, are on).
#   scripts/fuzz.sh SECONDS [TARGET...]     each target (default: all) for SECONDS
#   scripts/fuzz.sh 0 TARGET=N...           each named target for N executions
#   FUZZ_RUNS=N scripts/fuzz.sh 0 TARGET    each target for N executions instead
#   FUZZ_SEED=S                             libFuzzer's random seed (with FUZZ_RUNS and the
#                                           generated seed corpus: a repeatable run, as CI's)
# Starts from the seeds (fuzz/harness/src/seeds.rs) plus whatever earlier runs added to
# fuzz/corpus/<target>/; a crash or a leak of memory past 4 GB stops the run, writes the input
# to fuzz/libfuzzer/artifacts/<target>/ and fails the script. Prints libFuzzer's final statistics and
# writes them to fuzz/runs/<target>.txt.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:?usage: scripts/fuzz.sh SECONDS [TARGET...]}
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(onnx_model gguf rewrite_plan op_inputs attention_inputs)
[ -f .deps/env.sh ] && source .deps/env.sh
fuzz_root=$root/.deps/cargo-fuzz
if ! "$fuzz_root/bin/cargo-fuzz" --version >/dev/null 2>&1; then
  cargo install -q cargo-fuzz --version 0.13.2 --locked --root "$fuzz_root"
fi
export PATH=$fuzz_root/bin:$PATH
cargo run -q --release -p qins-fuzz --example write_seeds -- fuzz/corpus
# The libFuzzer crate is its own workspace: pin it to the main lock file's versions.
[ -f fuzz/libfuzzer/Cargo.lock ] || cp Cargo.lock fuzz/libfuzzer/Cargo.lock
# The targets reach CPU code only: build the library without its CUDA kernels (no nvcc run).
export QINS_REQUIRE_CUDA=0 QINS_NVCC=/nonexistent/nvcc
cargo fuzz build --fuzz-dir fuzz/libfuzzer --sanitizer none >/dev/null
mkdir -p fuzz/runs
for spec in "${targets[@]}"; do
  t=${spec%%=*}
  limit=(-max_total_time="$secs")
  [ -n "${FUZZ_RUNS:-}" ] && limit=(-runs="$FUZZ_RUNS")
  [ "$spec" != "$t" ] && limit=(-runs="${spec#*=}")
  [ -n "${FUZZ_SEED:-}" ] && limit+=(-seed="$FUZZ_SEED")
  echo "== $t"
  cargo fuzz run --fuzz-dir fuzz/libfuzzer --sanitizer none "$t" "fuzz/corpus/$t" -- "${limit[@]}" \
    -rss_limit_mb=4096 -timeout=30 -max_len=65536 -print_final_stats=1 2>&1 | tee "fuzz/runs/$t.log" |
    grep -E "^(stat::|#[0-9]+.*DONE|==|SUMMARY|Done)" || true
  if grep -qE "^==[0-9]+== ERROR|deadly signal|panicked|out-of-memory|Test unit written" "fuzz/runs/$t.log"; then
    echo "fuzz target $t failed: see fuzz/runs/$t.log and fuzz/libfuzzer/artifacts/$t/" >&2
    exit 1
  fi
  grep -E "^stat::" "fuzz/runs/$t.log" > "fuzz/runs/$t.txt" || true
done
