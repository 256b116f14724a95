"""JAX / Flax -> ONNX via jax2onnx (channels-last input, NHWC, like Flax's convolutions).

`model` is anything jax2onnx traces: a Flax NNX module, a Linen module plus its
variables (`params=`), or a plain function `x -> scores`. The batch axis is exported as
the symbolic dimension "B" (dynamic).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ncscan.errors import ConfigError, ModelError

from ._common import (
    DEFAULT_OPSET,
    PARITY_RTOL,
    ExportResult,
    Preprocessing,
    check_output_path,
    complete_export,
    require,
    sample_shape_from,
)


def _as_function(model: Any, params: Any) -> Callable[[Any], Any]:
    if params is not None:
        apply = getattr(model, "apply", None)
        if apply is None:
            raise ConfigError(
                "params= is for Flax Linen modules (model.apply(params, x)); this model has no "
                ".apply: pass a function or an NNX module without params"
            )
        variables = (
            params if isinstance(params, dict) and "params" in params else {"params": params}
        )

        def fn(x: Any) -> Any:
            return apply(variables, x)

        return fn
    linen = sys.modules.get("flax.linen")
    if linen is not None and isinstance(model, linen.Module) and model.scope is None:
        raise ConfigError("a Flax Linen module needs its variables: pass params=variables")
    if not callable(model):
        raise ModelError(f"expected a JAX function or Flax module, got {type(model).__name__}")
    return model


def to_onnx(
    model: Any,
    path: str | os.PathLike[str],
    *,
    preprocess: Any = None,
    input_shape: Sequence[int] | str | None = None,
    params: Any = None,
    layout: str = "NHWC",
    opset: int | None = None,
    class_names: Sequence[str] | None = None,
    verify: bool = True,
    rtol: float = PARITY_RTOL,
    seed: int = 0,
) -> ExportResult:
    """Export a JAX/Flax image classifier to ONNX with ncscan's metadata.

    Args:
        model: a Flax NNX module, a function `x -> scores`, or a Linen module with `params`.
        path: output `.onnx` file (written atomically).
        preprocess: a `Preprocessing`, a dict or an `ncscan.preprocess.Preprocess`.
        input_shape: per-image shape, (H, W, C) for NHWC (Flax's default) or (C, H, W).
        params: Linen variables (`{"params": ...}` or the params tree) for `model.apply`.
        layout: "NHWC" (default) or "NCHW" if your function takes channels-first.
        opset: ONNX opset (default 17; if jax2onnx cannot emit it, its own is kept and
            lowered where onnx's version converter can).
        verify: compare JAX and onnxruntime on random inputs (batch 1 and 5).

    Returns:
        ExportResult.
    """
    jax = require("jax", "jax")
    jax2onnx = require("jax2onnx", "jax")
    out = check_output_path(path)
    layout = layout.upper()
    if layout not in ("NCHW", "NHWC"):
        raise ConfigError(f"layout must be NCHW or NHWC, got {layout!r}")
    pre = Preprocessing.coerce(preprocess, class_names=class_names)
    what = "H,W,C" if layout == "NHWC" else "C,H,W"
    shape = sample_shape_from(input_shape, what)
    if shape is None:
        raise ConfigError(f"pass input_shape ({what}) for a JAX model, e.g. 28,28,1 (CLI: --input-shape)")
    fn = _as_function(model, params)
    target_opset = opset if opset is not None else DEFAULT_OPSET

    warns: list[str] = []
    spec = [("B", *shape)]
    proto = None
    errors = []
    for op in dict.fromkeys((target_opset, 21, 23)):  # try the target first
        try:
            proto = jax2onnx.to_onnx(
                fn,
                spec,
                opset=op,
                model_name="ncscan_jax",
                input_names=["input"],
                output_names=["output"],
            )
            if op != target_opset:
                warns.append(f"jax2onnx could not emit opset {target_opset}; exported at {op}")
            break
        except Exception as e:  # noqa: BLE001 - jax2onnx raises many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            errors.append(f"opset {op}: {type(e).__name__}: {first[:200]}")
    if proto is None:
        raise ModelError(f"jax2onnx could not convert the model ({'; '.join(errors)})")
    if not hasattr(proto, "SerializeToString"):  # older jax2onnx returned onnx_ir models
        import onnx

        proto = onnx.load_from_string(proto.SerializeToString())

    def reference(x: Any) -> Any:
        import numpy as np

        y = fn(jax.numpy.asarray(x))
        if isinstance(y, (tuple, list)):
            y = y[0]
        return np.asarray(y)

    return complete_export(
        proto,
        out,
        preprocessing=pre,
        layout=layout,
        exporter="jax2onnx",
        opset=target_opset,
        reference=reference,
        sample_shape=shape,
        verify=verify,
        seed=seed,
        rtol=rtol,
        what="JAX",
        extra_warnings=warns,
    )
