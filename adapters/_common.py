"""Shared pieces of the framework adapters.

Nothing here imports a deep-learning framework. `onnx`, `numpy` and `onnxruntime` are core
dependencies of ncscan and are imported inside the functions that need them, so that
`import ncscan.adapters` stays cheap.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ncscan.errors import ConfigError, ConversionMismatchError, ModelError, OutputError
from ncscan.meta import (
    META_CHANNEL_ORDER,
    META_CLASS_NAMES,
    META_EXPORTER,
    META_LAYOUT,
    META_MEAN,
    META_PIXEL_RANGE,
    META_STD,
)

MAX_IR_VERSION = 13  # onnxruntime 1.31 refuses IR 14
DEFAULT_OPSET = 17  # onnx2torch 1.5.15 converts opset <= 17 well
PARITY_RTOL = 1e-4
PARITY_BATCHES = (1, 5)

_EXTRA = {
    "torch": "torch-export",
    "onnxscript": "torch-export",
    "tensorflow": "keras",
    "tf2onnx": "keras",
    "keras": "keras",
    "jax": "jax",
    "flax": "jax",
    "jax2onnx": "jax",
}


def require(module: str, extra: str | None = None) -> Any:
    """Import an optional framework module or raise a one-line ModelError with the fix."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        ext = extra or _EXTRA.get(top, top)
        raise ModelError(
            f"{top} is not installed (or failed to import: {e}); pip install 'ncscan[{ext}]'"
        ) from None


def _fmt(v: float) -> str:
    return format(float(v), "g")


@dataclass(frozen=True)
class Preprocessing:
    """What the framework model expects of its input, written into the ONNX metadata.

    A [0,1] RGB image becomes the model input as
    ``(lo + x*(hi-lo) - mean) / std`` per channel, channels in `channel_order`.

    Attributes:
        pixel_range: (lo, hi) the model expects for black and white, e.g. (0, 255).
        mean: per-channel mean (None: none).
        std: per-channel std (None: none).
        channel_order: "RGB" or "BGR".
        class_names: one name per output class, or None.
    """

    pixel_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channel_order: str = "RGB"
    class_names: tuple[str, ...] | None = None

    @staticmethod
    def coerce(value: Any = None, **overrides: Any) -> Preprocessing:
        """Build from a Preprocessing, a mapping, an object with the same attributes
        (e.g. ncscan.preprocess.Preprocess) or None, then apply non-None overrides."""
        fields_: dict[str, Any] = {}
        if value is None:
            pass
        elif isinstance(value, Mapping):
            fields_.update(value)
        else:
            for k in ("pixel_range", "mean", "std", "channel_order", "class_names"):
                if hasattr(value, k):
                    fields_[k] = getattr(value, k)
        fields_.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(fields_) - {
            "pixel_range",
            "mean",
            "std",
            "channel_order",
            "class_names",
            "layout",
        }
        if unknown:
            raise ConfigError(
                f"unknown preprocessing field(s) {sorted(unknown)}; use pixel_range, mean, "
                "std, channel_order, class_names"
            )
        fields_.pop("layout", None)  # the adapter decides the layout from the framework
        pr = fields_.get("pixel_range", (0.0, 1.0))
        try:
            if isinstance(pr, str):
                pr = [float(v) for v in pr.split(",")]
            pr = tuple(float(v) for v in pr)
        except (TypeError, ValueError):
            raise ConfigError(f"pixel_range must be lo,hi (e.g. 0,255), got {pr!r}") from None
        if len(pr) != 2:
            raise ConfigError(f"pixel_range must be two numbers lo,hi (e.g. 0,255), got {pr!r}")

        def floats(name: str) -> tuple[float, ...] | None:
            v = fields_.get(name)
            if v is None:
                return None
            if isinstance(v, str):
                v = [s for s in v.replace(" ", ",").split(",") if s]
            elif isinstance(v, (int, float)):
                v = [v]
            try:
                return tuple(float(x) for x in v)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{name} must be comma-separated numbers (e.g. 0.5,0.5,0.5), got {v!r}"
                ) from None

        names = fields_.get("class_names")
        if names is not None:
            if isinstance(names, str):
                raise ConfigError("class_names must be a list of strings, not one string")
            names = tuple(str(n) for n in names)
        p = Preprocessing(
            pixel_range=(pr[0], pr[1]),
            mean=floats("mean"),
            std=floats("std"),
            channel_order=str(fields_.get("channel_order", "RGB")).upper(),
            class_names=names,
        )
        return p.validate()

    def validate(
        self, channels: int | None = None, num_classes: int | None = None
    ) -> Preprocessing:
        lo, hi = self.pixel_range
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
            raise ConfigError(
                f"pixel range must be lo,hi with lo < hi (e.g. 0,255), got {_fmt(lo)},{_fmt(hi)}"
            )
        if self.channel_order not in ("RGB", "BGR"):
            raise ConfigError(f"channel order must be RGB or BGR, got {self.channel_order!r}")
        for name, vals in (("mean", self.mean), ("std", self.std)):
            if vals is None:
                continue
            if not vals or not all(math.isfinite(v) for v in vals):
                raise ConfigError(f"{name} must be finite numbers, got {list(vals)}")
            if channels is not None and len(vals) not in (1, channels):
                raise ConfigError(
                    f"{name} has {len(vals)} values but the model takes {channels} channel(s); "
                    f"pass 1 or {channels} values"
                )
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigError(f"std values must be positive, got {list(self.std)}")
        if channels is not None and self.channel_order == "BGR" and channels != 3:
            raise ConfigError(f"BGR only applies to 3-channel models; this model takes {channels}")
        if self.class_names is not None:
            if len(set(self.class_names)) != len(self.class_names):
                raise ConfigError("class names must be unique")
            if num_classes is not None and len(self.class_names) != num_classes:
                raise ConfigError(
                    f"{len(self.class_names)} class names given but the model has {num_classes} "
                    "outputs; give one name per class"
                )
        return self

    def metadata(self, layout: str) -> dict[str, str]:
        """The metadata_props entries (plain strings)."""
        lo, hi = self.pixel_range
        md = {
            META_PIXEL_RANGE: f"{_fmt(lo)},{_fmt(hi)}",
            META_LAYOUT: layout,
            META_CHANNEL_ORDER: self.channel_order,
        }
        if self.mean is not None:
            md[META_MEAN] = ",".join(_fmt(v) for v in self.mean)
        if self.std is not None:
            md[META_STD] = ",".join(_fmt(v) for v in self.std)
        if self.class_names is not None:
            md[META_CLASS_NAMES] = json.dumps(list(self.class_names))
        return md

    def random_inputs(self, batch: int, shape: Sequence[int], layout: str, seed: int) -> Any:
        """Random model inputs: uniform pixels in the pixel range, normalised by mean/std."""
        import numpy as np

        rng = np.random.default_rng(seed)
        lo, hi = self.pixel_range
        x = rng.uniform(lo, hi, size=(batch, *shape)).astype(np.float32)
        caxis = 1 if layout == "NCHW" else -1
        c = x.shape[caxis]
        bshape = [1] * x.ndim
        bshape[caxis] = c
        if self.mean is not None:
            x = x - np.broadcast_to(np.asarray(self.mean, np.float32), (c,)).reshape(bshape)
        if self.std is not None:
            x = x / np.broadcast_to(np.asarray(self.std, np.float32), (c,)).reshape(bshape)
        return x.astype(np.float32)


@dataclass
class ExportResult:
    """What an adapter wrote."""

    path: Path
    opset: int
    ir_version: int
    max_rel_diff: float
    max_abs_diff: float
    metadata: dict[str, str]
    exporter: str
    input_name: str
    input_shape: list[int | str]
    num_classes: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.path),
            "exporter": self.exporter,
            "opset": self.opset,
            "ir_version": self.ir_version,
            "max_parity_diff": self.max_rel_diff,
            "max_abs_diff": self.max_abs_diff,
            "input": self.input_name,
            "input_shape": self.input_shape,
            "num_classes": self.num_classes,
            "metadata": dict(self.metadata),
            "warnings": list(self.warnings),
        }


def check_output_path(path: str | os.PathLike[str], *sources: str | os.PathLike[str]) -> Path:
    """ncscan.io's output check (parent exists and is writable, never an input), plus what an
    export needs: a name ending in .onnx, outside a source folder (a SavedModel)."""
    from ncscan.io import check_output_path as check_writable

    out = check_writable(path, sources)
    if out.suffix.lower() != ".onnx":
        raise OutputError(f"output {out} must end in .onnx; pass e.g. -o model.onnx")
    for s in map(Path, sources):
        try:
            inside = s.is_dir() and out.resolve().is_relative_to(s.resolve())
        except OSError:
            inside = False
        if inside:
            raise OutputError(f"output {out} is inside the source model folder {s}; pick another -o")
    return out


def _dim_str(d: Any) -> int | str:
    if d.HasField("dim_value") and d.dim_value > 0:
        return int(d.dim_value)
    return d.dim_param or "?"


def finalize(
    proto: Any,
    output: Path,
    metadata: Mapping[str, str],
    *,
    opset: int | None,
    dynamic_batch: bool = True,
) -> tuple[Any, list[str]]:
    """Embed external data, make the batch axis dynamic (unless `dynamic_batch` is False: a
    graph traced at a fixed batch of 1 keeps it), cap the IR version, try to bring the
    opset down to `opset`, attach metadata, check; returns (model, warnings). Does not save.

    An opset the converter cannot lower is kept without a warning when ncscan converts
    every op of the result (its extra converters cover torch's opset-18+ output); only ops
    ncscan cannot scan are warned about."""
    import onnx

    warnings: list[str] = []
    # Embed weights that are still external (only possible under protobuf's 2 GB limit).
    from onnx.external_data_helper import uses_external_data

    if any(uses_external_data(t) for t in proto.graph.initializer):
        raise ModelError("internal: initializers still reference external data after loading")

    cur = _default_opset(proto)
    if opset is not None and cur > opset:
        from onnx import version_converter

        try:
            converted = version_converter.convert_version(proto, opset)
            onnx.checker.check_model(converted)
            proto = converted
        except Exception as e:  # noqa: BLE001 - the converter raises many types
            missing = _ops_ncscan_cannot_convert(proto)
            if missing:
                warnings.append(
                    f"could not lower opset {cur} to {opset} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); kept opset {cur}, where "
                    f"ncscan cannot convert {', '.join(missing)}"
                )
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)

    # Dynamic batch axis on the image input and every output.
    graph = proto.graph
    init_names = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise ModelError(
            f"exported graph has {len(inputs)} inputs ({[i.name for i in inputs]}); an image "
            "classifier must take exactly one image tensor"
        )
    for vi in [inputs[0], *graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 0 or not dynamic_batch:
            continue
        # A fixed batch is relabelled too: the parity check at batch 1 and 5 then tells
        # whether the graph bakes the batch size in. Exporters' own names (unk__36,
        # s0, ...) become "batch".
        d0 = dims[0]
        d0.Clear()
        d0.dim_param = "batch"
    _relax_reshape_allowzero(proto)
    _explicit_auto_pad(proto, warnings)

    del proto.metadata_props[:]
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = k
        entry.value = v
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ModelError(
            f"exported ONNX model fails onnx.checker: {str(e).splitlines()[0]}"
        ) from None
    return proto, warnings


def _ops_ncscan_cannot_convert(proto: Any) -> list[str]:
    """The graph's ops (as "Op-version") that ncscan's torch conversion lacks."""
    try:
        from ncscan.model import unsupported_ops
    except ImportError:  # pragma: no cover - torch/onnx2torch are core dependencies
        return ["(ncscan's converter is not importable)"]
    return sorted(unsupported_ops(proto))


def _relax_reshape_allowzero(proto: Any) -> None:
    """Set Reshape's allowzero=1 (the dynamo exporter's default) to 0.

    Identical unless the target shape holds a 0 (an empty dimension), which an image
    classifier never reshapes to; constant shapes containing 0 are left alone. onnx2torch
    1.5.15 refuses allowzero=1.
    """
    import numpy as np
    from onnx import numpy_helper

    consts: dict[str, Any] = {i.name: i for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    for n in proto.graph.node:
        if n.op_type != "Reshape" or len(n.input) < 2:
            continue
        for a in n.attribute:
            if a.name == "allowzero" and a.i == 1:
                shape = consts.get(n.input[1])
                if shape is not None and np.any(numpy_helper.to_array(shape) == 0):
                    continue
                a.i = 0


_POOL_CONV = ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool")


def _explicit_auto_pad(proto: Any, warnings: list[str]) -> None:
    """Rewrite auto_pad=SAME_UPPER/SAME_LOWER (jax2onnx's "SAME" convs) as explicit pads.

    onnx2torch 1.5.15 refuses auto_pad SAME_*; the explicit pads are computed from the
    (static) spatial input shape, so the graph is unchanged for every batch size.
    """
    import onnx

    nodes = [
        n
        for n in proto.graph.node
        if n.op_type in _POOL_CONV
        and n.op_type != "ConvTranspose"
        and any(a.name == "auto_pad" and a.s in (b"SAME_UPPER", b"SAME_LOWER") for a in n.attribute)
    ]
    if not nodes:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception as e:  # noqa: BLE001
        warnings.append(f"shape inference failed ({type(e).__name__}); kept auto_pad SAME")
        return
    shapes: dict[str, list[int | None]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for t in proto.graph.initializer:
        shapes[t.name] = list(t.dims)
    for n in nodes:
        attrs = {a.name: a for a in n.attribute}
        xs = shapes.get(n.input[0])
        if not xs or len(xs) < 3 or any(d is None for d in xs[2:]):
            xs = None
        nsp = (len(xs) - 2) if xs else 0
        if "kernel_shape" in attrs:
            k = list(attrs["kernel_shape"].ints)
        elif len(n.input) > 1 and shapes.get(n.input[1]):
            k = list(shapes[n.input[1]][2:])  # type: ignore[arg-type]
        else:
            k = []
        if xs is None or len(k) != nsp or any(v is None for v in k):
            warnings.append(f"{n.op_type} {n.name}: spatial shape unknown; kept auto_pad SAME")
            continue
        strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * nsp
        dil = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * nsp
        upper = attrs["auto_pad"].s == b"SAME_UPPER"
        begins, ends = [], []
        for size, kk, st, dl in zip(xs[2:], k, strides, dil):
            out = -(-int(size) // st)
            total = max((out - 1) * st + (kk - 1) * dl + 1 - int(size), 0)
            small, big = total // 2, total - total // 2
            begins.append(small if upper else big)
            ends.append(big if upper else small)
        keep = [a for a in n.attribute if a.name not in ("auto_pad", "pads")]
        del n.attribute[:]
        n.attribute.extend(keep)
        n.attribute.append(onnx.helper.make_attribute("pads", begins + ends))


def _default_opset(proto: Any) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def load_with_external(path: Path) -> Any:
    """Load an ONNX file and pull any side `.data` file into the proto (in memory)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=True)
    if proto.ByteSize() >= 2**31 - 1:
        raise ModelError(
            f"exported model {path} is over 2 GB; it cannot be stored in one ONNX file"
        )
    return proto


def _ort_session(model_bytes: bytes) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def verify_parity(
    model_bytes: bytes,
    reference: Callable[[Any], Any],
    make_inputs: Callable[[int, int], Any],
    *,
    rtol: float = PARITY_RTOL,
    batches: Sequence[int] = PARITY_BATCHES,
    what: str = "framework",
) -> tuple[float, float]:
    """Run onnxruntime and the framework on the same random inputs (each batch size).

    Returns:
        (max relative diff, max absolute diff); relative is to the max |framework output|.

    Raises:
        ConversionMismatchError: the outputs differ by more than `rtol`, or shapes differ.
    """
    import numpy as np

    try:
        sess = _ort_session(model_bytes)
    except Exception as e:  # noqa: BLE001
        raise ModelError(
            f"onnxruntime cannot load the exported model: {str(e).splitlines()[0]}"
        ) from None
    in_name = sess.get_inputs()[0].name
    worst_rel, worst_abs = 0.0, 0.0
    for i, b in enumerate(batches):
        x = make_inputs(b, i)
        ref = np.asarray(reference(x), dtype=np.float64)
        try:
            got = np.asarray(sess.run(None, {in_name: x})[0], dtype=np.float64)
        except Exception as e:  # noqa: BLE001
            raise ConversionMismatchError(
                f"onnxruntime fails on the exported model at batch {b}: "
                f"{str(e).splitlines()[0]}; the export probably fixed the batch size"
            ) from None
        if got.shape != ref.shape:
            raise ConversionMismatchError(
                f"exported model output shape {list(got.shape)} differs from the {what} "
                f"model's {list(ref.shape)} at batch {b}"
            )
        diff = np.abs(got - ref)
        scale = max(float(np.abs(ref).max()), 1e-12)
        abs_d = float(diff.max()) if diff.size else 0.0
        rel = abs_d / scale
        if not np.isfinite(rel):
            rel = math.inf
        worst_rel, worst_abs = max(worst_rel, rel), max(worst_abs, abs_d)
        if rel > rtol:
            idx = np.unravel_index(int(np.argmax(diff)), diff.shape)
            agree = float((got.argmax(-1) == ref.argmax(-1)).mean()) if got.ndim == 2 else 1.0
            raise ConversionMismatchError(
                f"exported model disagrees with the {what} model at batch {b}: max abs diff "
                f"{abs_d:.3g} at {list(map(int, idx))} ({rel:.3g} of max |output| {scale:.3g}, "
                f"tolerance {rtol:g}); top-1 agreement {agree:.0%}"
            )
    return worst_rel, worst_abs


def save_atomic(proto: Any, output: Path) -> None:
    """Write the proto as one file, atomically, with the user's file mode (ncscan.io's writer)."""
    from ncscan.io import atomic_write_bytes

    atomic_write_bytes(output, proto.SerializeToString())


def complete_export(
    proto: Any,
    output: Path,
    *,
    preprocessing: Preprocessing,
    layout: str,
    exporter: str,
    opset: int | None,
    reference: Callable[[Any], Any],
    sample_shape: Sequence[int],
    verify: bool = True,
    seed: int = 0,
    rtol: float = PARITY_RTOL,
    what: str = "framework",
    extra_warnings: Sequence[str] = (),
    dynamic_batch: bool = True,
) -> ExportResult:
    """finalize -> parity check at batch 1 and 5 (batch 1 only for a graph whose batch is
    fixed at 1: `dynamic_batch=False`) -> atomic save."""
    import numpy as np

    channels = sample_shape[0] if layout == "NCHW" else sample_shape[-1]
    md = preprocessing.metadata(layout)
    md[META_EXPORTER] = exporter
    proto, warns = finalize(proto, output, md, opset=opset, dynamic_batch=dynamic_batch)
    nout = proto.graph.output[0].type.tensor_type.shape.dim
    num_classes = int(nout[-1].dim_value) if len(nout) and nout[-1].dim_value > 0 else 0
    preprocessing.validate(channels=channels, num_classes=num_classes or None)
    data = proto.SerializeToString()

    def make_inputs(b: int, i: int) -> Any:
        return preprocessing.random_inputs(b, sample_shape, layout, seed + 1000 * i + b)

    if verify:
        rel, abs_d = verify_parity(
            data, reference, make_inputs, rtol=rtol, what=what,
            batches=PARITY_BATCHES if dynamic_batch else (1,),
        )
    else:
        rel, abs_d = float("nan"), float("nan")
    if num_classes == 0:
        ref = np.asarray(reference(make_inputs(1, 0)))
        num_classes = int(ref.shape[-1])
    save_atomic(proto, output)
    init_names = {t.name for t in proto.graph.initializer}
    inp = next(i for i in proto.graph.input if i.name not in init_names)
    return ExportResult(
        path=output,
        opset=_default_opset(proto),
        ir_version=int(proto.ir_version),
        max_rel_diff=rel,
        max_abs_diff=abs_d,
        metadata=md,
        exporter=exporter,
        input_name=inp.name,
        input_shape=[_dim_str(d) for d in inp.type.tensor_type.shape.dim],
        num_classes=num_classes,
        warnings=[*extra_warnings, *warns],
    )


def sample_shape_from(input_shape: Sequence[int] | str | None, what: str) -> tuple[int, ...] | None:
    """Parse "1,28,28" / (1, 28, 28) / (N, 1, 28, 28) into a per-sample shape (3 dims)."""
    if input_shape is None:
        return None
    if isinstance(input_shape, str):
        try:
            vals = [int(v) for v in input_shape.replace("x", ",").split(",") if v.strip()]
        except ValueError:
            raise ConfigError(
                f"--input-shape must be comma-separated integers like 3,224,224, got {input_shape!r}"
            ) from None
    else:
        try:
            vals = [int(v) if v is not None else -1 for v in input_shape]
        except (TypeError, ValueError):
            raise ConfigError(f"input_shape must be integers, got {input_shape!r}") from None
    if len(vals) == 4:
        vals = vals[1:]
    if len(vals) != 3 or any(v <= 0 for v in vals):
        raise ConfigError(
            f"input shape must be the per-image shape ({what}), e.g. "
            f"{'3,224,224' if what == 'C,H,W' else '224,224,3'}; got {input_shape!r}"
        )
    return tuple(vals)
