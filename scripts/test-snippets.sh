#!/usr/bin/env bash
# The README's examples compile and run as written. Each code block that follows a
# `<!-- snippet: LANG -->` line in README.md is taken out and run in a folder holding
# smollm2-qins/ (MODEL: a `qins rewrite` output, the custom-op library beside the model):
#   c       compiled with -Wall -Wextra -Werror against ONNX Runtime's C header
#           (.deps/ort/include, from setup.sh), linked to libonnxruntime 1.31.1, run;
#   rust    must be graph-rewrite/examples/load_library.rs between its snippet markers (CI
#           compiles that file with the workspace), which is run;
#   python  run in a fresh venv with the wheel (target/wheel/dist, scripts/build-wheel.sh) and
#           onnxruntime 1.31.1 installed.
# Usage: scripts/test-snippets.sh MODEL
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
source .deps/env.sh
model=$(cd "$1" && pwd)
work=$root/target/qins-test/snippets
rm -rf "$work" && mkdir -p "$work/lib"
# Hard links: the folder is read, never written, and the copy costs nothing.
cp -al "$model" "$work/smollm2-qins"
python3 - "$root/README.md" "$work" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
blocks = re.findall(r"<!-- snippet: (\w+) -->\s*```\w*\n(.*?)```", text, re.S)
langs = [b[0] for b in blocks]
for want in ("c", "rust", "python"):
    if langs.count(want) != 1:
        sys.exit(f"README.md: {langs.count(want)} '{want}' snippets, expected 1")
ext = {"c": "c", "rust": "rs", "python": "py"}
for lang, code in blocks:
    open(f"{sys.argv[2]}/snippet.{ext[lang]}", "w").write(code)
PY
# Rust: the README shows the compiled example.
sed -n '/^\/\/ snippet: rust$/,/^\/\/ snippet end$/p' graph-rewrite/examples/load_library.rs | sed '1d;$d' > "$work/example.rs"
if ! diff -u "$work/example.rs" "$work/snippet.rs"; then
  echo "README.md's Rust snippet is not graph-rewrite/examples/load_library.rs (above: the difference)" >&2
  exit 1
fi
ln -s "$ORT_DYLIB_PATH" "$work/lib/libonnxruntime.so"
ln -s "$ORT_DYLIB_PATH" "$work/lib/libonnxruntime.so.1"
cc -Wall -Wextra -Werror -I.deps/ort/include "$work/snippet.c" -o "$work/snippet-c" -L"$work/lib" -lonnxruntime \
  -Wl,-rpath,"$work/lib"
cargo build --release -q -p qins-graph-rewrite --example load_library
cd "$work"
echo "c:      $(./snippet-c)"
echo "rust:   $("$root/target/release/examples/load_library")"
whl=$(ls "$root"/target/wheel/dist/onnxruntime_qins-*.whl | head -1)
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$whl" onnxruntime==1.31.1
echo "python: $(env -u ORT_DYLIB_PATH "$work/venv/bin/python" snippet.py)"
