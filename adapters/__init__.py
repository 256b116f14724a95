"""Framework adapters: export a PyTorch, Keras or JAX/Flax classifier to ONNX for ncscan.

Installed as `ncscan.adapters` (the repo folder `adapters/` is mapped onto it), so no
top-level `adapters` package lands in users' environments. Importing this package imports
no framework; each adapter module imports its framework when called:

- `ncscan.adapters.torch_export.to_onnx(module, path, preprocess=..., input_shape=(C,H,W))`
- `ncscan.adapters.keras.to_onnx(model, path, preprocess=...)`
- `ncscan.adapters.jax.to_onnx(fn_or_module, path, preprocess=..., input_shape=(H,W,C))`

Every export writes one .onnx file (weights embedded, dynamic batch axis, IR <= 13, opset
17 where the exporter allows), stores the preprocessing in `metadata_props`
(`ncscan.pixel_range`, `ncscan.mean`, `ncscan.std`, `ncscan.layout`,
`ncscan.channel_order`, `ncscan.class_names`) and checks the framework against
onnxruntime on random inputs (batch 1 and 5, 1e-4 of max |output|).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ncscan.errors import ConfigError, ModelError

from ._common import ExportResult, Preprocessing

__all__ = ["FRAMEWORKS", "ExportResult", "Preprocessing", "export_file", "read_class_names"]

FRAMEWORKS = ("keras", "torch")


def read_class_names(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a file: a JSON list, or one name per line (blank lines ignored)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read class names file {p}: {e.strerror or e}") from None
    s = text.strip()
    if s.startswith("["):
        try:
            names = json.loads(s)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"class names file {p} is not valid JSON: {e.msg} (line {e.lineno})"
            ) from None
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
            raise ConfigError(f"class names file {p} must hold a JSON list of strings")
        names = [str(n) for n in names]
    else:
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not names:
        raise ConfigError(f"class names file {p} is empty; one name per line or a JSON list")
    return names


def export_file(
    framework: str,
    source: Path,
    output: Path,
    *,
    pixel_range: tuple[float, float] = (0.0, 1.0),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    channel_order: str = "RGB",
    class_names: Sequence[str] | str | os.PathLike[str] | None = None,
    input_shape: Sequence[int] | str | None = None,
    opset: int | None = None,
    dynamo: bool | None = None,
) -> dict[str, Any]:
    """Export a model file to ONNX (`ncscan export --from keras|torch MODEL -o OUT.onnx`).

    Args:
        framework: "keras" (.keras/.h5 file or SavedModel dir) or "torch" (TorchScript
            file from `torch.jit.save`, or a `torch.export` program `.pt2`).
        source: the model file / directory (loaded without user code).
        output: the .onnx file to write (atomically; never the source).
        pixel_range, mean, std, channel_order: what the model expects (see Preprocessing).
        class_names: a list of names, or a path to a file (JSON list or one per line).
        input_shape: per-image shape: C,H,W for torch, H,W,C for Keras. Needed for
            TorchScript; Keras models and .pt2 programs carry their own.
        opset: target opset (default 17).
        dynamo: torch only: force the dynamo (True) or legacy (False) exporter; default
            dynamo for .pt2 programs, legacy for TorchScript.

    Returns:
        {"output", "framework", "exporter", "opset", "ir_version", "max_parity_diff",
         "max_abs_diff", "input", "input_shape", "num_classes", "metadata", "warnings"}

    Raises:
        NcscanError subclasses (ModelError, ConfigError, OutputError,
        ConversionMismatchError) with a one-line message naming the fix.
    """
    from ._common import check_output_path

    fw = str(framework).strip().lower()
    aliases = {"pytorch": "torch", "tf": "keras", "tensorflow": "keras", "tf.keras": "keras"}
    fw = aliases.get(fw, fw)
    if fw not in FRAMEWORKS:
        if fw in ("jax", "flax"):
            raise ConfigError(
                "JAX/Flax models are Python functions, not files; call "
                "ncscan.adapters.jax.to_onnx(apply_fn, params, 'out.onnx', ...) from Python"
            )
        raise ConfigError(f"--from must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    source, output = Path(source), Path(output)
    if not source.exists():
        raise ModelError(f"model {source} does not exist")
    check_output_path(output, source)
    names: list[str] | None
    if class_names is None:
        names = None
    elif isinstance(class_names, (str, os.PathLike)):
        names = read_class_names(class_names)
    else:
        names = [str(n) for n in class_names]
    pre = Preprocessing.coerce(
        {
            "pixel_range": pixel_range,
            "mean": mean,
            "std": std,
            "channel_order": channel_order,
            "class_names": names,
        }
    )
    if fw == "keras":
        from . import keras as kad

        model = kad.load_file(source)
        res = kad.to_onnx(model, output, preprocess=pre, input_shape=input_shape, opset=opset)
    else:
        from . import torch_export as tad

        model, is_program = tad.load_file(source)
        use_dynamo = is_program if dynamo is None else bool(dynamo)
        if is_program and not use_dynamo:
            raise ConfigError(f"{source} is a torch.export program; it needs the dynamo exporter")
        res = tad.to_onnx(
            model, output, preprocess=pre, input_shape=input_shape, opset=opset, dynamo=use_dynamo
        )
    d = res.to_dict()
    d["framework"] = fw
    d["source"] = str(source)
    return d
