"""QINS: weight and KV-cache compression for ONNX Runtime.

This package carries two native files, built from the QINS Rust workspace:

* ``libqins_provider.so``, the ONNX Runtime custom-op library with the QINS ops
  (``com.qins`` domain). Register it with a session::

      import onnxruntime as ort
      import qins

      so = ort.SessionOptions()
      so.register_custom_ops_library(qins.get_library_path())
      sess = ort.InferenceSession("model.onnx", so, providers=["CPUExecutionProvider"])

* the ``qins`` command-line tool (import, rewrite, parity, generate, ...), which the
  ``qins`` console script of this package runs (see ``qins.__main__``).

The library links no ONNX Runtime: it uses the one the host process has loaded, so it works
with the ``onnxruntime`` or ``onnxruntime-gpu`` you already have installed. This package does
not depend on either; install one yourself.
"""

import os

__all__ = ["get_library_path", "get_cli_path", "__version__"]

# Written by python/build_wheel.py from the workspace Cargo.toml; "0+unknown" in a source tree.
try:
    from ._version import __version__
except ImportError:  # pragma: no cover - a source checkout, not an installed wheel
    __version__ = "0+unknown"

# The CLI and the library live in the same folder: the CLI looks for libqins_provider.so beside
# its own executable when neither --provider-lib nor $QINS_PROVIDER_LIB says otherwise.
_BIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin")
_LIBRARY = "libqins_provider.so"
_CLI = "qins"


def _packaged(name: str) -> str:
    path = os.path.join(_BIN_DIR, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: this qins package is incomplete. Install the onnxruntime-qins "
            "wheel (pip install onnxruntime_qins-*.whl; scripts/build-wheel.sh builds it) rather "
            "than importing the python/ folder of a source checkout."
        )
    return path


def get_library_path() -> str:
    """The absolute path of the QINS custom-op library, for
    ``onnxruntime.SessionOptions.register_custom_ops_library``."""
    return _packaged(_LIBRARY)


def get_cli_path() -> str:
    """The absolute path of the native ``qins`` executable (the console script runs it)."""
    return _packaged(_CLI)
