"""Load, check and convert an ONNX image classifier.

The path is: read the file (and its external-data files) -> onnx.checker -> find the one
image input and its layout -> list every operator we cannot convert (all at once) ->
onnx2torch (with ncscan's extra converters for newer opset versions) -> a parity check
against onnxruntime on the user's own images.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, defs

from .errors import ConversionMismatchError, ModelError, UnsupportedOpsError

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_CHANNEL_SIZES = (1, 3, 4)
MAX_ORT_IR = 13


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class InputSpec:
    """The image input of a model."""

    name: str
    layout: str  # "NCHW" | "NHWC"
    channels: int
    height: int | None  # None: dynamic
    width: int | None
    batch: int | None  # None: dynamic; 1 for a static batch of 1
    elem_type: int


@dataclass
class OnnxModel:
    """A loaded and checked ONNX model (not yet converted)."""

    path: Path
    proto: onnx.ModelProto
    sha256: str
    input: InputSpec
    output_name: str
    opset: int
    metadata: dict[str, str]
    has_external_data: bool
    ends_in_softmax: bool
    layout_source: str = "detected"
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "input": self.input.name,
            "layout": self.input.layout,
            "channels": self.input.channels,
            "height": self.input.height,
            "width": self.input.width,
            "static_batch": self.input.batch,
            "opset": self.opset,
        }


def _dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    shape = vi.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.dim]


def _default_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _decide_layout(dims: list[int | None], forced: str | None) -> tuple[str, int]:
    """Pick NCHW or NHWC from where the channel axis is; returns (layout, channels)."""
    c1, c3 = dims[1], dims[3]
    if forced is not None:
        ch = c1 if forced == "NCHW" else c3
        if ch is None:
            raise ModelError(
                f"the model's channel axis for layout {forced} is dynamic; "
                "export the model with a fixed number of channels"
            )
        return forced, ch
    nchw = c1 in _CHANNEL_SIZES
    nhwc = c3 in _CHANNEL_SIZES
    if nchw and not nhwc:
        return "NCHW", int(c1)  # type: ignore[arg-type]
    if nhwc and not nchw:
        return "NHWC", int(c3)  # type: ignore[arg-type]
    if nchw and nhwc:
        # e.g. 3x3 images or [N,3,H,3]: prefer NCHW unless the last axis is smaller.
        return "NCHW", int(c1)  # type: ignore[arg-type]
    raise ModelError(
        f"cannot tell the channel axis of input shape {['?' if d is None else d for d in dims]}: "
        "expected 1, 3 or 4 channels on axis 1 (NCHW) or 3 (NHWC); pass --layout NCHW|NHWC"
    )


def load_onnx(path: str | os.PathLike[str], layout: str | None = None) -> OnnxModel:
    """Read and check an ONNX classifier.

    Args:
        path: the .onnx file; external-data files are resolved next to it.
        layout: force "NCHW" or "NHWC" (None: decide from the channel axis / metadata).

    Returns:
        The checked model.

    Raises:
        ModelError: missing, unreadable, invalid, or not an image classifier.
    """
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file {p} does not exist; check the path")
    if p.is_dir():
        raise ModelError(f"model path {p} is a directory; pass the .onnx file")
    size = p.stat().st_size
    if size == 0:
        raise ModelError(f"model file {p} is empty; re-export the model")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelError(
            f"{p} is not a valid ONNX model ({type(e).__name__}); "
            "pass an .onnx file exported from your framework"
        ) from e
    if len(proto.graph.node) == 0 or not proto.graph.output:
        raise ModelError(f"{p} is not a valid ONNX model (no graph); pass an exported .onnx file")
    has_ext = False
    missing: list[str] = []
    for t in _all_tensors(proto):
        if t.data_location == TensorProto.EXTERNAL:
            has_ext = True
            loc = next((kv.value for kv in t.external_data if kv.key == "location"), None)
            if loc is None or not (p.parent / loc).is_file():
                missing.append(str(loc))
    if missing:
        raise ModelError(
            f"model {p.name} keeps weights in external file(s) {', '.join(sorted(set(missing)))} "
            f"that are not next to it in {p.parent}; copy them beside the model"
        )
    if has_ext:
        try:
            onnx.load_external_data_for_model(proto, str(p.parent))
        except Exception as e:
            raise ModelError(f"cannot read the external data of {p.name}: {e}") from e
    try:
        # The path form handles models over 2 GB and external data.
        onnx.checker.check_model(str(p))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{p.name} fails onnx.checker: {first}; re-export the model") from e

    init_names = {t.name for t in proto.graph.initializer}
    inputs = [vi for vi in proto.graph.input if vi.name not in init_names]
    if len(inputs) != 1:
        raise ModelError(
            f"model has {len(inputs)} inputs ({', '.join(vi.name for vi in inputs)}); "
            "ncscan scans image classifiers with exactly one image input"
        )
    vi = inputs[0]
    if not vi.type.HasField("tensor_type") or vi.type.tensor_type.elem_type not in _FLOAT_TYPES:
        raise ModelError(
            f"model input '{vi.name}' is not a float tensor; ncscan needs a float image input"
        )
    dims = _dims(vi)
    if len(dims) != 4:
        raise ModelError(
            f"model input '{vi.name}' has rank {len(dims)}; ncscan needs a rank-4 image input "
            "(NCHW or NHWC)"
        )
    meta = {kv.key: kv.value for kv in proto.metadata_props}
    layout_source = "detected"
    if layout is None and meta.get("ncscan.layout", "").strip().upper() in ("NCHW", "NHWC"):
        layout = meta["ncscan.layout"].strip().upper()
        layout_source = "metadata"
    elif layout is not None:
        layout_source = "flag"
    lay, ch = _decide_layout(dims, layout)
    h, w = (dims[2], dims[3]) if lay == "NCHW" else (dims[1], dims[2])
    if ch not in _CHANNEL_SIZES:
        raise ModelError(f"model input has {ch} channels; ncscan supports 1, 3 or 4")
    spec = InputSpec(
        name=vi.name,
        layout=lay,
        channels=int(ch),
        height=h,
        width=w,
        batch=dims[0],
        elem_type=vi.type.tensor_type.elem_type,
    )
    outs = proto.graph.output
    out_dims = _dims(outs[0])
    if len(outs[0].type.tensor_type.shape.dim) not in (0, 2):
        raise ModelError(
            f"model output '{outs[0].name}' has rank {len(out_dims)}; ncscan needs class scores "
            "of shape [N, classes]"
        )
    producer = {o: n for n in proto.graph.node for o in n.output}
    last = producer.get(outs[0].name)
    ends_in_softmax = last is not None and last.op_type == "Softmax"
    warnings: list[str] = []
    if len(outs) > 1:
        warnings.append(
            f"model has {len(outs)} outputs; using the first, '{outs[0].name}', as class scores"
        )
    return OnnxModel(
        path=p,
        proto=proto,
        sha256=sha256_file(p),
        input=spec,
        output_name=outs[0].name,
        opset=_default_opset(proto),
        metadata=meta,
        has_external_data=has_ext,
        ends_in_softmax=ends_in_softmax,
        layout_source=layout_source,
        warnings=warnings,
    )


def _all_tensors(proto: onnx.ModelProto) -> list[TensorProto]:
    out = list(proto.graph.initializer)
    for n in proto.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                out.append(a.t)
    return out


# ---------------------------------------------------------------- onnxruntime side


def ort_session(model: OnnxModel, device: str = "cpu") -> Any:
    """An onnxruntime session for the model (CPU, or CUDA when asked and available)."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src: Any = str(model.path)
    if model.proto.ir_version > MAX_ORT_IR:
        # onnxruntime refuses newer IR versions; the graph itself is unchanged.
        m = onnx.ModelProto()
        m.CopyFrom(model.proto)
        m.ir_version = MAX_ORT_IR
        src = m.SerializeToString()
    try:
        return ort.InferenceSession(src, sess_options=so, providers=providers)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"onnxruntime cannot load {model.path.name}: {msg}") from e


def ort_run(sess: Any, model: OnnxModel, x_model: np.ndarray, batch: int = 256) -> np.ndarray:
    """Run the first output on model-space input, honouring a static batch size."""
    bs = 1 if model.input.batch == 1 else batch
    outs = []
    dtype = np.float16 if model.input.elem_type == TensorProto.FLOAT16 else np.float32
    if model.input.elem_type == TensorProto.DOUBLE:
        dtype = np.float64
    for i in range(0, len(x_model), bs):
        o = sess.run([model.output_name], {model.input.name: x_model[i : i + bs].astype(dtype)})[0]
        outs.append(np.asarray(o, dtype=np.float32).reshape(o.shape[0], -1))
    return np.concatenate(outs, 0)


# ---------------------------------------------------------------- conversion


def unsupported_ops(proto: onnx.ModelProto) -> list[str]:
    """Every (op, version) in the graph that no registered converter handles."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription

    from . import converters  # noqa: F401  (registers ncscan's extra converters)

    opsets = {imp.domain or "": imp.version for imp in proto.opset_import}
    missing: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for n in graph.node:
            dom = n.domain or ""
            if dom == "ai.onnx":
                dom = ""
            ver = opsets.get(dom, 0)
            try:
                since = defs.get_schema(n.op_type, max_inclusive_version=ver, domain=dom).since_version
            except Exception:
                since = ver
            desc = OperationDescription(domain=dom, operation_type=n.op_type, version=since)
            if desc not in _CONVERTER_REGISTRY:
                missing.add(f"{(dom + '.') if dom else ''}{n.op_type}-{since}")
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g)

    visit(proto.graph)
    return sorted(missing)


def convert(model: OnnxModel) -> torch.nn.Module:
    """Convert to a torch module with onnx2torch (plus ncscan's converters).

    Raises:
        UnsupportedOpsError: listing ALL unsupported operators at once.
        ModelError: onnx2torch failed for another reason.
    """
    from onnx2torch import convert as o2t_convert

    missing = unsupported_ops(model.proto)
    if missing:
        raise UnsupportedOpsError(
            missing,
            hint="re-export at opset 17 (torch: torch.onnx.export(..., opset_version=17, "
            "dynamo=False)) or open an issue with these names",
        )
    proto = model.proto
    if proto.ir_version > MAX_ORT_IR:
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        proto.ir_version = MAX_ORT_IR
    try:
        net = o2t_convert(proto)
    except NotImplementedError as e:
        raise UnsupportedOpsError([str(e)]) from e
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot convert {model.path.name} to torch: {msg}") from e
    net.eval()
    for prm in net.parameters():
        prm.requires_grad_(False)
    return net


@dataclass(frozen=True)
class Parity:
    """How closely the torch graph follows onnxruntime."""

    max_abs: float
    max_rel: float
    argmax_agree: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "argmax_agree": self.argmax_agree, "n": self.n}


def check_parity(
    torch_fn: Callable[[torch.Tensor], torch.Tensor],
    ort_fn: Callable[[np.ndarray], np.ndarray],
    x_model: np.ndarray,
    *,
    rtol: float = 1e-4,
    what: str = "the torch conversion",
) -> Parity:
    """Compare torch and onnxruntime on the same model-space inputs.

    The tolerance is relative to the largest output magnitude (so logits near zero don't
    blow up the ratio): |a - b| <= rtol * max(1, max|b|).

    Raises:
        ConversionMismatchError: outputs differ beyond the tolerance or are not finite.
    """
    ref = ort_fn(x_model)
    with torch.no_grad():
        got = torch_fn(torch.from_numpy(x_model.astype(np.float32))).float().cpu().numpy()
    got = got.reshape(ref.shape)
    if not np.all(np.isfinite(ref)):
        raise ModelError(
            "the model outputs NaN or Inf on the given images under onnxruntime; "
            "check the preprocessing flags (--pixel-range, --mean, --std) or the model"
        )
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    rel = diff / scale
    agree = float(np.mean(got.argmax(1) == ref.argmax(1))) if ref.size else 1.0
    if not np.all(np.isfinite(got)) or rel > rtol:
        raise ConversionMismatchError(
            f"{what} disagrees with onnxruntime on your images (max relative difference "
            f"{rel:.2e} > {rtol:.0e}, argmax agreement {agree:.1%}); refusing to scan a "
            "graph that is not the model; re-export at opset 17 or report the model"
        )
    return Parity(max_abs=diff, max_rel=rel, argmax_agree=agree, n=int(len(x_model)))
