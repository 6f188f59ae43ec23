"""The ``qins`` console script: runs the native ``qins`` CLI that this package carries.

``qins ARGS`` (or ``python -m qins ARGS``) replaces this Python process with
``qins/bin/qins ARGS``. Beside it lies ``libqins_provider.so``, which the CLI finds by itself
(it looks beside its own executable), so the CLI and the custom-op library always match.

The CLI loads ONNX Runtime at run time, from ``--ort-lib`` or ``$ORT_DYLIB_PATH``. A pip user
has ONNX Runtime as the ``onnxruntime`` (or ``onnxruntime-gpu``) package of this same
interpreter, so when neither is given, this sets ``ORT_DYLIB_PATH`` to that package's
``capi/libonnxruntime.so.*`` for the CLI. Commands that need no ONNX Runtime (import-gguf,
rewrite, report, ...) run without one.
"""

import glob
import importlib.util
import os
import sys

from . import get_cli_path


def onnxruntime_library():
    """``libonnxruntime.so*`` of the onnxruntime package importable by this interpreter, or None.

    The package is located without importing it (importing would load ONNX Runtime into this
    process only to replace the process a moment later)."""
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        capi = os.path.join(folder, "capi")
        # The wheels ship libonnxruntime.so.<version>; builds from source may add the
        # unversioned links. Any of them is the same library: take the most specific name.
        found = [p for p in glob.glob(os.path.join(glob.escape(capi), "libonnxruntime.so*")) if os.path.isfile(p)]
        if found:
            return max(found, key=lambda p: (len(os.path.basename(p)), p))
    return None


def _gives_ort_lib(args):
    for a in args:
        if a == "--":
            break
        if a == "--ort-lib" or a.startswith("--ort-lib="):
            return True
    return False


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli = get_cli_path()
    except FileNotFoundError as e:
        print(f"qins: {e}", file=sys.stderr)
        return 2
    if not os.environ.get("ORT_DYLIB_PATH") and not _gives_ort_lib(args):
        # Without one here, the CLI still looks for a python3 that can import onnxruntime, and
        # says how to get one if a command needs it.
        lib = onnxruntime_library()
        if lib is not None:
            os.environ["ORT_DYLIB_PATH"] = lib
    sys.stdout.flush()
    sys.stderr.flush()
    # argv[0] "qins", so that the CLI's usage lines name the command the user typed.
    os.execv(cli, ["qins", *args])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
