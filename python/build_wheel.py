#!/usr/bin/env python3
"""Writes the onnxruntime-qins wheel from already-built native files (scripts/build-wheel.sh
builds them, checks their glibc needs and calls this).

Usage: build_wheel.py --version V --tag PLATFORM --cli PATH --lib PATH --out DIR

Why a hand-written wheel rather than maturin: maturin's `bindings = "bin"` packs executables
as scripts (.data/scripts/), not beside a cdylib inside the package, and it would rebuild the
Rust code itself under its own idea of the target; the CLI must sit in the same folder as
libqins_provider.so (it looks for the library beside its own executable). A wheel is a zip with
three small metadata files (PEP 427, PEP 376 RECORD), so writing it here keeps every byte under
our control: the layout, the platform tag (computed by the shell script from what the binaries
need, not assumed), file modes, and fixed timestamps and order, so the same inputs give the
same wheel.

Layout of the wheel:
    qins/__init__.py, qins/__main__.py   python/qins/ (get_library_path, the console script)
    qins/_version.py                     written here
    qins/bin/qins                        the CLI (mode 755)
    qins/bin/libqins_provider.so         the custom-op library
    onnxruntime_qins-V.dist-info/        METADATA (README as description), WHEEL,
                                         entry_points.txt (console script `qins`), top_level.txt,
                                         RECORD
"""

import argparse
import base64
import hashlib
import os
import sys
import time
import zipfile

NAME = "onnxruntime-qins"
DIST = NAME.replace("-", "_")
HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_SRC = os.path.join(HERE, "qins")


def metadata(version, readme):
    head = [
        "Metadata-Version: 2.1",
        f"Name: {NAME}",
        f"Version: {version}",
        "Summary: QINS weight and KV-cache compression for ONNX Runtime: the custom-op library "
        "(get_library_path) and the qins CLI",
        "License: Apache-2.0",
        "Keywords: onnxruntime,quantization,custom-op,llm",
        "Classifier: License :: OSI Approved :: Apache Software License",
        "Classifier: Operating System :: POSIX :: Linux",
        "Classifier: Programming Language :: Python :: 3",
        "Classifier: Programming Language :: Rust",
        "Requires-Python: >=3.8",
        # No hard dependency on ONNX Runtime: a user with onnxruntime-gpu would otherwise get
        # the CPU package installed on top of it (both provide the `onnxruntime` module). The
        # extras let a user ask for one: pip install onnxruntime-qins[cpu] or [gpu].
        "Provides-Extra: cpu",
        'Requires-Dist: onnxruntime>=1.23; extra == "cpu"',
        "Provides-Extra: gpu",
        'Requires-Dist: onnxruntime-gpu>=1.23; extra == "gpu"',
        "Description-Content-Type: text/markdown",
    ]
    return ("\n".join(head) + "\n\n" + readme).encode()


def wheel_file(tag):
    return (
        "Wheel-Version: 1.0\n"
        "Generator: qins python/build_wheel.py\n"
        "Root-Is-Purelib: false\n"
        f"Tag: {tag}\n"
    ).encode()


def record_hash(data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", required=True)
    ap.add_argument("--tag", required=True, help="platform tag, e.g. manylinux_2_28_x86_64")
    ap.add_argument("--cli", required=True, help="the stripped qins executable")
    ap.add_argument("--lib", required=True, help="the stripped libqins_provider.so")
    ap.add_argument("--out", required=True, help="folder for the .whl")
    ap.add_argument("--readme", default=os.path.join(HERE, "README.md"))
    a = ap.parse_args()

    tag = f"py3-none-{a.tag}"
    with open(a.readme, encoding="utf-8") as f:
        readme = f.read()

    # (archive name, bytes, mode)
    files = []
    for name in sorted(os.listdir(PACKAGE_SRC)):
        path = os.path.join(PACKAGE_SRC, name)
        if name.endswith(".py") and os.path.isfile(path) and name != "_version.py":
            with open(path, "rb") as f:
                files.append((f"qins/{name}", f.read(), 0o644))
    if not any(n == "qins/__init__.py" for n, _, _ in files):
        sys.exit(f"no {PACKAGE_SRC}/__init__.py")
    files.append(("qins/_version.py", f'__version__ = "{a.version}"\n'.encode(), 0o644))
    for src, dest in ((a.cli, "qins/bin/qins"), (a.lib, "qins/bin/libqins_provider.so")):
        with open(src, "rb") as f:
            files.append((dest, f.read(), 0o755))
    files.sort(key=lambda t: t[0])

    info = f"{DIST}-{a.version}.dist-info"
    files += [
        (f"{info}/METADATA", metadata(a.version, readme), 0o644),
        (f"{info}/WHEEL", wheel_file(tag), 0o644),
        (f"{info}/entry_points.txt", b"[console_scripts]\nqins = qins.__main__:main\n", 0o644),
        (f"{info}/top_level.txt", b"qins\n", 0o644),
    ]
    record = "".join(f"{n},{record_hash(d)},{len(d)}\n" for n, d, _ in files) + f"{info}/RECORD,,\n"
    files.append((f"{info}/RECORD", record.encode(), 0o644))

    # Fixed timestamps: SOURCE_DATE_EPOCH if set (zip cannot go before 1980), else 1980-01-01.
    epoch = max(int(os.environ.get("SOURCE_DATE_EPOCH", "315532800")), 315532800)
    stamp = time.gmtime(epoch)[:6]
    os.makedirs(a.out, exist_ok=True)
    whl = os.path.join(a.out, f"{DIST}-{a.version}-{tag}.whl")
    tmp = whl + ".tmp"
    with zipfile.ZipFile(tmp, "w") as z:
        for name, data, mode in files:
            zi = zipfile.ZipInfo(name, date_time=stamp)
            zi.external_attr = (0o100000 | mode) << 16  # a regular file with this mode
            zi.create_system = 3  # Unix, so that installers read the mode
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, data, compresslevel=9)
    os.replace(tmp, whl)
    print(whl)


if __name__ == "__main__":
    main()
