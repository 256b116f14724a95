"""ncscan: find and patch backdoors in ONNX image classifiers (Neural Cleanse).

Public API::

    import ncscan
    report = ncscan.scan("model.onnx", "images/")          # -> ncscan.ScanReport
    result = ncscan.patch("model.onnx", "images/", output="patched.onnx", unlearn=True)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .tfcompat import block_triton_after_tensorflow as _block_triton

_block_triton()  # TensorFlow already loaded: torch's lazy `import triton` would segfault

__all__ = [
    "__version__",
    "scan",
    "patch",
    "ScanReport",
    "LabelResult",
    "PatchResult",
    "Preprocess",
    "Trigger",
    "NcscanError",
]


def __getattr__(name: str) -> Any:
    # Lazy: `import ncscan` stays cheap (torch/onnx load on first use).
    _block_triton()  # TensorFlow may have been imported after ncscan
    if name == "scan":
        from .scanner import scan

        return scan
    if name in ("ScanReport", "LabelResult"):
        from . import scanner as _scan_mod

        return getattr(_scan_mod, name)
    if name in ("patch", "PatchResult"):
        from . import patch as _patch_mod

        return getattr(_patch_mod, name)
    if name == "Preprocess":
        from .preprocess import Preprocess

        return Preprocess
    if name == "Trigger":
        from .trigger import Trigger

        return Trigger
    if name == "NcscanError":
        from .errors import NcscanError

        return NcscanError
    raise AttributeError(f"module 'ncscan' has no attribute {name!r}")
