#!/usr/bin/env bash
# Builds the Python wheel onnxruntime-qins (import name `qins`): the custom-op library
# libqins_provider.so and the `qins` CLI, side by side in qins/bin/, with a console script
# `qins` and qins.get_library_path(). See python/README.md.
#
#   scripts/build-wheel.sh [OUT_DIR]     (default target/wheel/dist)
#
# Prints the wheel's path as its only line on stdout (the build's chatter goes to stderr):
#   target/wheel/dist/onnxruntime_qins-<version>-py3-none-manylinux_2_28_x86_64.whl
#
# How, and why:
# - The binaries are built for glibc 2.28 (ONNX Runtime's own wheels are manylinux_2_28) with
#   cargo-zigbuild, which links against zig's glibc 2.28 stubs instead of this machine's glibc
#   (2.36 here; a plain build needs 2.34 for dlopen & co). zig and cargo-zigbuild come from
#   PyPI (pinned below) into a tool venv in target/wheel/tools. nvcc still compiles the CUDA
#   kernels (provider/build.rs; QINS_REQUIRE_CUDA=1 by default so that a wheel never silently
#   lacks them; scripts/setup.sh installs nvcc into .deps/cuda).
# - Its own cargo target dir (target/wheel/cargo), so it never waits for, or invalidates, the
#   target/release build of scripts/test.sh.
# - The platform tag is not assumed: it is computed from what the stripped binaries need
#   (objdump: the highest GLIBC_ symbol version; their NEEDED libraries must be glibc's and
#   libgcc_s, with GCC_ versions at most 7.0.0, as the manylinux policies allow), and the
#   script fails if they need a newer glibc than the build targeted. auditwheel then checks
#   the finished wheel independently.
# - QINS_WHEEL_ZIG=0 builds with the system toolchain instead (no zig); the tag is then what
#   objdump finds, manylinux_2_34 with today's Rust std and this machine's glibc.
# - python/build_wheel.py writes the zip (fixed timestamps, sorted entries; see its comment
#   for why not maturin). SOURCE_DATE_EPOCH sets the entries' time if given.
set -euo pipefail
exec 3>&1 1>&2 # stdout is for the wheel's path alone
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

work=$root/target/wheel
out=${1:-$work/dist}
py=${PYTHON:-python3}
use_zig=${QINS_WHEEL_ZIG:-1}
glibc_target=2.28                 # the glibc the zig build links against
triple=x86_64-unknown-linux-gnu
zig_pins="ziglang==0.17.1 cargo-zigbuild==0.24.1 auditwheel==6.8.2"

die() { echo "build-wheel: $*" >&2; exit 1; }
command -v objdump >/dev/null || die "objdump is needed to check the binaries' glibc needs (apt-get install binutils)"
command -v strip >/dev/null || die "strip is needed (apt-get install binutils)"

version=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml)
[ -n "$version" ] || die "no version in [workspace.package] of Cargo.toml"

# The tool venv: rebuilt when the pins change (its marker records them).
tools=$work/tools
if [ "$(cat "$tools/.complete" 2>/dev/null)" != "$zig_pins" ]; then
  rm -rf "$tools"
  "$py" -m venv "$tools"
  # shellcheck disable=SC2086 # the pins are words
  "$tools/bin/python" -m pip install -q $zig_pins
  echo "$zig_pins" >"$tools/.complete"
fi

export CARGO_TARGET_DIR=$work/cargo
export QINS_REQUIRE_CUDA=${QINS_REQUIRE_CUDA:-1}
# No debug info to strip later (the release profile keeps line tables), and no build paths in
# the panic messages of a shipped binary.
export CARGO_PROFILE_RELEASE_DEBUG=false
export RUSTFLAGS="${RUSTFLAGS:-} --remap-path-prefix=$root=/qins --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}/registry/src=/cargo"
# The qins CLI and the cdylib only (not qins-bench, tests or examples).
build_args=(build --release --locked -p qins-provider -p qins-graph-rewrite --lib --bin qins)
if [ "$use_zig" = 1 ]; then
  export CARGO_ZIGBUILD_PYTHON_PATH=$tools/bin/python # zig is the ziglang package's
  "$tools/bin/cargo-zigbuild" "${build_args[@]}" --target "$triple.$glibc_target"
else
  cargo "${build_args[@]}" --target "$triple"
fi
built=$CARGO_TARGET_DIR/$triple/release

stage=$work/stage
rm -rf "$stage"
mkdir -p "$stage"
cp "$built/qins" "$built/libqins_provider.so" "$stage/"
strip --strip-all "$stage/qins"
strip --strip-unneeded "$stage/libqins_provider.so"

# --- What the binaries need from the system, and the tag that follows from it. ---
bins=("$stage/qins" "$stage/libqins_provider.so")
# Every GLIBC_x.y in the dynamic symbol table and in the version references.
needs=$({ objdump -T "${bins[@]}"; objdump -p "${bins[@]}"; } | { grep -o 'GLIBC_2\.[0-9][0-9.]*' || true; } | sort -Vu)
[ -n "$needs" ] || die "objdump found no GLIBC symbol versions in ${bins[*]}: cannot compute the tag"
highest=$(tail -1 <<<"$needs")
highest=${highest#GLIBC_}
echo "glibc symbol versions needed: $(tr '\n' ' ' <<<"$needs")" >&2
newer() { [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | tail -1)" = "$1" ]; }
if [ "$use_zig" = 1 ] && newer "$highest" "$glibc_target"; then
  echo "symbols that need a glibc above $glibc_target:" >&2
  objdump -T "${bins[@]}" | grep -E 'GLIBC_2\.[0-9]' | awk -v t="$glibc_target" '{
      v = $0; sub(/.*GLIBC_/, "", v); sub(/[) ].*/, "", v); split(v, a, "."); split(t, b, ".")
      if (a[1] > b[1] || (a[1] == b[1] && a[2] + 0 > b[2] + 0)) print }' >&2
  die "the binaries need glibc $highest, above the $glibc_target the build targeted"
fi
# Only libraries that every manylinux system has (glibc's and libgcc_s).
for b in "${bins[@]}"; do
  while read -r lib; do
    case $lib in
      libc.so.6 | libm.so.6 | libdl.so.2 | libpthread.so.0 | librt.so.1 | libgcc_s.so.1 | ld-linux-x86-64.so.2) ;;
      *) die "$(basename "$b") needs $lib, which a manylinux wheel may not assume" ;;
    esac
  done < <(objdump -p "$b" | awk '$1 == "NEEDED" { print $2 }')
done
gcc_high=$({ objdump -T "${bins[@]}"; objdump -p "${bins[@]}"; } | { grep -o 'GCC_[0-9][0-9.]*' || true; } | sed 's/^GCC_//' | sort -Vu | tail -1)
if [ -n "$gcc_high" ] && newer "$gcc_high" 7.0.0; then
  die "the binaries need libgcc_s GCC_$gcc_high, above the GCC_7.0.0 that manylinux allows"
fi
minor=${highest#2.}
minor=${minor%%.*}
tag=manylinux_2_${minor}_x86_64
[ "$minor" -ge 17 ] || tag=manylinux_2_17_x86_64 # the oldest manylinux tag pip knows by this name
echo "platform tag: $tag (highest glibc symbol version: $highest)" >&2

rm -f "$out/onnxruntime_qins-$version-"*.whl
whl=$("$tools/bin/python" python/build_wheel.py --version "$version" --tag "$tag" \
  --cli "$stage/qins" --lib "$stage/libqins_provider.so" --out "$out")

# An independent check of the finished wheel against the manylinux policies.
report=$("$tools/bin/auditwheel" show "$whl" 2>&1) || die "auditwheel show failed: $report"
echo "$report" >&2
grep -q "\"$tag\"" <<<"$report" || die "auditwheel does not agree with the tag $tag"
echo "wheel: $whl ($(du -h "$whl" | cut -f1))" >&2
echo "$whl" >&3
