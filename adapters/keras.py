"""Keras 3 / tf.keras -> ONNX via tf2onnx (channels-last input, NHWC).

The model is traced as a `tf.function` with a `None` batch dimension, so the ONNX graph
has a dynamic batch axis. Softmax heads stay in the graph (ncscan reads probabilities).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
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

INPUT_NAME = "input"


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return require("tensorflow", "keras")


def _model_input_shape(model: Any) -> tuple[int, ...] | None:
    shape = None
    for attr in ("input_shape",):
        try:
            shape = getattr(model, attr)
        except Exception:  # noqa: BLE001 - Keras raises for unbuilt/multi-input models
            shape = None
        if shape is not None:
            break
    if shape is None:
        try:
            ins = model.inputs
            shape = tuple(ins[0].shape) if ins and len(ins) == 1 else None
        except Exception:  # noqa: BLE001
            shape = None
    if isinstance(shape, list):
        if len(shape) != 1:
            raise ModelError(
                f"the Keras model has {len(shape)} inputs; an image classifier must take one image"
            )
        shape = shape[0]
    if shape is None or len(shape) != 4 or any(s is None for s in shape[1:]):
        return None
    return tuple(int(s) for s in shape[1:])


def to_onnx(
    model: Any,
    path: str | os.PathLike[str],
    *,
    preprocess: Any = None,
    input_shape: Sequence[int] | str | None = None,
    opset: int | None = None,
    class_names: Sequence[str] | None = None,
    verify: bool = True,
    rtol: float = PARITY_RTOL,
    seed: int = 0,
) -> ExportResult:
    """Export a Keras image classifier (NHWC input) to ONNX with ncscan's metadata.

    Args:
        model: a built `keras.Model` (Keras 3 or tf.keras) taking one NHWC image batch.
        path: output `.onnx` file (written atomically).
        preprocess: a `Preprocessing`, a dict (pixel_range, mean, std, channel_order,
            class_names) or an `ncscan.preprocess.Preprocess`: what the model expects,
            e.g. pixel_range=(0, 255) for a model with a Rescaling(1/255) layer inside.
        input_shape: per-image (H, W, C); default: the model's own input shape.
        opset: ONNX opset (default 17).
        class_names: overrides preprocess.class_names.
        verify: compare Keras and onnxruntime outputs on random inputs (batch 1 and 5).

    Returns:
        ExportResult.
    """
    tf = _tf()
    tf2onnx = require("tf2onnx", "keras")
    out = check_output_path(path)
    pre = Preprocessing.coerce(preprocess, class_names=class_names)
    if not callable(model) or not hasattr(model, "layers"):
        raise ModelError(f"expected a Keras model, got {type(model).__name__}")
    shape = sample_shape_from(input_shape, "H,W,C") or _model_input_shape(model)
    if shape is None:
        raise ConfigError(
            "the Keras model's input shape is unknown (not built, or dynamic H/W); "
            "pass --input-shape H,W,C (Python: input_shape=), e.g. 28,28,1"
        )
    target_opset = opset if opset is not None else DEFAULT_OPSET

    spec = (tf.TensorSpec((None, *shape), tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=spec)
    def serve(x: Any) -> Any:
        y = model(x, training=False)
        if isinstance(y, (list, tuple)):
            if len(y) != 1:
                raise ModelError(f"the Keras model has {len(y)} outputs; expected one")
            y = y[0]
        if isinstance(y, dict):
            raise ModelError("the Keras model returns a dict; expected one tensor of class scores")
        return tf.identity(y, name="output")

    try:
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=target_opset)
    except ModelError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"tf2onnx could not convert the Keras model: {first[:300]}") from e

    def reference(x: Any) -> Any:
        return serve(tf.constant(x)).numpy()

    return complete_export(
        proto,
        out,
        preprocessing=pre,
        layout="NHWC",
        exporter="keras-tf2onnx",
        opset=target_opset,
        reference=reference,
        sample_shape=shape,
        verify=verify,
        seed=seed,
        rtol=rtol,
        what="Keras",
    )


def load_file(source: Path) -> Any:
    """Load a `.keras` / `.h5` file or a SavedModel directory (no custom objects)."""
    tf = _tf()
    keras = require("keras", "keras")
    if not source.exists():
        raise ModelError(
            f"{source} does not exist; pass a .keras/.h5 file or a SavedModel directory"
        )
    if source.is_dir():
        if not (source / "saved_model.pb").exists():
            raise ModelError(f"{source} is a directory without saved_model.pb; not a SavedModel")
        return _load_saved_model(tf, keras, source)
    suffix = source.suffix.lower()
    if suffix not in (".keras", ".h5", ".hdf5"):
        raise ModelError(
            f"{source}: unknown Keras file type {suffix or '(none)'}; pass a .keras or .h5 file "
            "or a SavedModel directory"
        )
    try:
        return keras.models.load_model(str(source), compile=False)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"cannot load Keras model {source}: {first[:300]} (custom layers need Python: call "
            "ncscan.adapters.keras.to_onnx(model, ...) after loading it yourself)"
        ) from None


class _SavedModelWrapper:
    """Makes a SavedModel's serving signature look like a one-input Keras model."""

    def __init__(self, fn: Any, in_name: str, out_name: str, shape: tuple[int, ...] | None):
        self.layers: list[Any] = []
        self._fn, self._in, self._out = fn, in_name, out_name
        self.input_shape = (None, *shape) if shape else None

    def __call__(self, x: Any, training: bool = False) -> Any:
        return self._fn(**{self._in: x})[self._out]


def _load_saved_model(tf: Any, keras: Any, source: Path) -> Any:
    try:
        return keras.models.load_model(str(source), compile=False)
    except Exception:  # noqa: BLE001, S110 - Keras 3 refuses SavedModels; use the signature
        pass
    try:
        loaded = tf.saved_model.load(str(source))
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load SavedModel {source}: {first[:300]}") from None
    sigs = getattr(loaded, "signatures", {})
    fn = sigs.get("serving_default") if sigs else None
    if fn is None:
        raise ModelError(
            f"SavedModel {source} has no serving_default signature; re-export it with one"
        )
    args = fn.structured_input_signature[1]
    outs = fn.structured_outputs
    if len(args) != 1 or len(outs) != 1:
        raise ModelError(
            f"SavedModel {source} serving_default has {len(args)} inputs and {len(outs)} outputs; "
            "expected one image input and one score output"
        )
    ((in_name, spec),) = args.items()
    out_name = next(iter(outs))
    dims = spec.shape.as_list()
    shape = tuple(dims[1:]) if len(dims) == 4 and None not in dims[1:] else None
    wrapper = _SavedModelWrapper(fn, in_name, out_name, shape)  # type: ignore[arg-type]
    wrapper._keep = loaded  # type: ignore[attr-defined]  # keep the variables alive
    return wrapper
