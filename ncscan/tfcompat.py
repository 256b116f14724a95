"""Keep a process that has already imported TensorFlow alive when ncscan uses torch.

With TensorFlow 2.21 and triton 3.8 (the one torch 2.14 pulls in) installed together,
`import tensorflow` followed by `import triton` dies with a segmentation fault inside
triton's native library (`python -c "import tensorflow; import triton"` reproduces it;
the opposite order works). torch imports triton lazily whenever torch._dynamo loads, and
that happens under onnx2torch, torch.onnx/torch.export and torch.func, i.e. in every scan,
patch and PyTorch export. That is exactly the flow of exporting a Keras model with
`ncscan.adapters.keras` and scanning it in the same script or notebook.

ncscan never needs triton: it compiles nothing. So when TensorFlow is loaded and triton is
not yet, `block_triton_after_tensorflow` marks triton as not importable in this process
(`sys.modules["triton"] = None`, the import system's documented "not importable" marker:
`import triton` raises ImportError and `importlib.util.find_spec("triton")` is None). torch
treats triton as an optional package and simply does without it, exactly as on a machine
where it is not installed. No third-party code is changed. The marker stays for the life
of the process, because any later `import triton` there would crash it; `torch.compile`
with the inductor GPU backend is then unavailable in that process (it would crash anyway).
Nothing happens when triton was imported before TensorFlow, or TensorFlow is not loaded.
"""

from __future__ import annotations

import sys


def block_triton_after_tensorflow() -> bool:
    """Mark triton unimportable if TensorFlow is loaded and triton is not; idempotent.

    Called before every ncscan code path that may import torch._dynamo (and so triton).

    Returns:
        True when triton is blocked in this process (now or earlier).
    """
    if "triton" in sys.modules:
        return sys.modules["triton"] is None
    if "tensorflow" not in sys.modules:
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True
