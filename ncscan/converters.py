"""Extra onnx2torch converters for op versions that torch's dynamo exporter emits.

onnx2torch 1.5.15 stops at roughly opset 17. Newer opsets bumped many operators only to
allow more tensor types (bfloat16, float8, int4): for those the older converter is exact,
and we register it under the new version. A few changed semantics (Reduce*-18 and Pad-18
take axes as an input, Split-18 has num_outputs, Gelu is new in 20): those get small
modules here. A converter whose node uses a feature we do not implement raises
NotImplementedError, which ncscan reports as an unsupported operator.

Importing this module registers everything once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from onnx2torch.node_converters.registry import (
    _CONVERTER_REGISTRY,
    OperationDescription,
    add_converter,
)
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import (
    OnnxMapping,
    OnnxToTorchModule,
    OperationConverterResult,
    get_const_value,
)
from torch import nn

_DONE = False


def _has(op: str, version: int) -> bool:
    return OperationDescription("", op, version) in _CONVERTER_REGISTRY


def _alias(op: str, new: int, old: int, check: Any = None) -> None:
    """Register the converter of (op, old) for (op, new) when the change is type-only."""
    if _has(op, new) or not _has(op, old):
        return
    base = _CONVERTER_REGISTRY[OperationDescription("", op, old)]

    def conv(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        if check is not None:
            check(node, graph)
        return base(node, graph)

    add_converter(operation_type=op, version=new)(conv)


def _inputs(node: OnnxNode) -> tuple[str, ...]:
    return tuple(v for v in node.input_values)


def _const_list(name: str, graph: OnnxGraph) -> list[int] | None:
    try:
        v = get_const_value(name, graph)
    except KeyError:
        return None
    if isinstance(v, torch.Tensor):
        return [int(a) for a in v.flatten().tolist()]
    if isinstance(v, (list, tuple)):
        return [int(a) for a in v]
    return [int(v)]


# ------------------------------------------------------------------ Reduce*-18


_REDUCERS = {
    "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceProd": None,  # handled one axis at a time
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
}


class Reduce18(nn.Module, OnnxToTorchModule):
    """Reduce* with axes as an (optional) input, opset 18 semantics."""

    def __init__(self, op: str, keepdims: bool, noop_with_empty_axes: bool, axes: list[int] | None):
        super().__init__()
        self.op = op
        self.keepdims = keepdims
        self.noop = noop_with_empty_axes
        self.axes = axes

    def forward(self, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        ax = self.axes if axes is None else [int(a) for a in axes.flatten().tolist()]
        if not ax:
            if self.noop:
                return x
            ax = list(range(x.dim()))
        ax = sorted(a % x.dim() for a in ax)
        if self.op == "ReduceProd":
            out = x
            for a in reversed(ax):
                out = torch.prod(out, dim=a, keepdim=self.keepdims)
            return out
        fn = _REDUCERS[self.op]
        return fn(x, ax, self.keepdims)  # type: ignore[misc]


def _reduce18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    keep = bool(node.attributes.get("keepdims", 1))
    noop = bool(node.attributes.get("noop_with_empty_axes", 0))
    ins = _inputs(node)
    axes: list[int] | None = None
    if len(ins) > 1 and ins[1]:
        axes = _const_list(ins[1], graph)
        if axes is not None:
            ins = ins[:1]
    else:
        ins = ins[:1]
    return OperationConverterResult(
        torch_module=Reduce18(node.operation_type, keep, noop, axes),
        onnx_mapping=OnnxMapping(inputs=ins, outputs=node.output_values),
    )


# ------------------------------------------------------------------ Pad-18+


class Pad18(nn.Module, OnnxToTorchModule):
    """Pad with optional constant_value and axes inputs (opset 18+)."""

    _MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}

    def __init__(self, mode: str, pads: list[int] | None, axes: list[int] | None, value: float | None):
        super().__init__()
        if mode not in self._MODES:
            raise NotImplementedError(f"Pad mode {mode}")
        self.mode = self._MODES[mode]
        self.pads = pads
        self.axes = axes
        self.value = value

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        it = iter(rest)
        pads = self.pads if self.pads is not None else [int(a) for a in next(it).tolist()]
        value = self.value
        if value is None:
            v = next(it, None)
            value = float(v.item()) if v is not None and v.numel() else 0.0
        axes = self.axes if self.axes is not None else list(range(x.dim()))
        axes = [a % x.dim() for a in axes]
        n = len(axes)
        begin = dict(zip(axes, pads[:n]))
        end = dict(zip(axes, pads[n:]))
        torch_pads: list[int] = []
        # torch pads from the last dim backwards: (last_begin, last_end, prev_begin, ...)
        last_used = min(axes) if axes else x.dim() - 1
        for d in range(x.dim() - 1, last_used - 1, -1):
            torch_pads += [begin.get(d, 0), end.get(d, 0)]
        if self.mode == "constant":
            return F.pad(x, torch_pads, mode="constant", value=value)
        return F.pad(x, torch_pads, mode=self.mode)


def _pad18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    mode = node.attributes.get("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    ins = list(_inputs(node))
    pads = _const_list(ins[1], graph) if len(ins) > 1 and ins[1] else None
    value: float | None = None
    keep = [ins[0]]
    if pads is None:
        keep.append(ins[1])
    if len(ins) > 2 and ins[2]:
        try:
            v = get_const_value(ins[2], graph)
            value = float(v.item()) if isinstance(v, torch.Tensor) else float(v)
        except KeyError:
            keep.append(ins[2])
    else:
        value = 0.0
    axes = None
    if len(ins) > 3 and ins[3]:
        axes = _const_list(ins[3], graph)
        if axes is None:
            raise NotImplementedError("Pad-18 with non-constant axes")
    return OperationConverterResult(
        torch_module=Pad18(mode, pads, axes, value),
        onnx_mapping=OnnxMapping(inputs=tuple(keep), outputs=node.output_values),
    )


# ------------------------------------------------------------------ Split-18


class Split18(nn.Module, OnnxToTorchModule):
    def __init__(self, axis: int, split: list[int] | None, num_outputs: int):
        super().__init__()
        self.axis = axis
        self.split = split
        self.num_outputs = num_outputs

    def forward(self, x: torch.Tensor, split: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        sizes = self.split if split is None else [int(a) for a in split.tolist()]
        if sizes is None:
            dim = x.shape[self.axis]
            chunk = -(-dim // self.num_outputs)  # ceil, as ONNX specifies
            sizes = [chunk] * (self.num_outputs - 1) + [dim - chunk * (self.num_outputs - 1)]
        return tuple(torch.split(x, sizes, dim=self.axis))


def _split18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    axis = int(node.attributes.get("axis", 0))
    ins = _inputs(node)
    split = None
    keep = [ins[0]]
    if len(ins) > 1 and ins[1]:
        split = _const_list(ins[1], graph)
        if split is None:
            keep.append(ins[1])
    return OperationConverterResult(
        torch_module=Split18(axis, split, len(node.output_values)),
        onnx_mapping=OnnxMapping(inputs=tuple(keep), outputs=node.output_values),
    )


# ------------------------------------------------------------------ Gelu-20


def _gelu20(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    approx = node.attributes.get("approximate", "none")
    if isinstance(approx, bytes):
        approx = approx.decode()
    return OperationConverterResult(
        torch_module=nn.GELU(approximate="tanh" if approx == "tanh" else "none"),
        onnx_mapping=OnnxMapping(inputs=_inputs(node)[:1], outputs=node.output_values),
    )


# ------------------------------------------------------------------ Reshape allowzero=1


class ReshapeAllowZero(nn.Module, OnnxToTorchModule):
    """Reshape with allowzero=1: a 0 in the shape is a literal 0, exactly torch's meaning."""

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return torch.reshape(x, [int(v) for v in shape.tolist()])


def _wrap_reshape(base: Any) -> Any:
    def conv(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        if int(node.attributes.get("allowzero", 0)) == 1:
            return OperationConverterResult(
                torch_module=ReshapeAllowZero(),
                onnx_mapping=OnnxMapping(inputs=_inputs(node)[:2], outputs=node.output_values),
            )
        return base(node, graph)

    return conv


# ------------------------------------------------------------------ checks for aliases


def _no_attr(*names_defaults: tuple[str, Any]) -> Any:
    def check(node: OnnxNode, graph: OnnxGraph) -> None:
        for name, default in names_defaults:
            v = node.attributes.get(name, default)
            if isinstance(v, bytes):
                v = v.decode()
            if v != default:
                raise NotImplementedError(f"{node.operation_type} with {name}={v!r}")

    return check


def _resize_check(node: OnnxNode, graph: OnnxGraph) -> None:
    _no_attr(("antialias", 0), ("keep_aspect_ratio_policy", "stretch"))(node, graph)
    if node.attributes.get("axes") is not None:
        raise NotImplementedError("Resize with axes")


def register() -> None:
    """Register all extra converters (idempotent)."""
    global _DONE
    if _DONE:
        return
    _DONE = True
    for op in _REDUCERS:
        if not _has(op, 18):
            add_converter(operation_type=op, version=18)(_reduce18)
    for v in (18, 19, 21, 23, 24):
        if not _has("Pad", v):
            add_converter(operation_type="Pad", version=v)(_pad18)
    if not _has("Split", 18):
        add_converter(operation_type="Split", version=18)(_split18)
    if not _has("Gelu", 20):
        add_converter(operation_type="Gelu", version=20)(_gelu20)
    # Type-only bumps: the older converter is exact.
    # torch's dynamo exporter writes Reshape(allowzero=1), which onnx2torch refuses; wrap the
    # registered Reshape converters (added to the registry, onnx2torch itself is untouched).
    for v in (5, 13, 14):
        d = OperationDescription("", "Reshape", v)
        if d in _CONVERTER_REGISTRY:
            _CONVERTER_REGISTRY[d] = _wrap_reshape(_CONVERTER_REGISTRY[d])
    for new in (19, 21, 23, 24):
        _alias("Reshape", new, 14)
        _alias("Shape", new, 15)
        _alias("Cast", new, 13, _no_attr(("saturate", 1)))
        _alias("Identity", new, 16)
        _alias("Constant", new, 13)
    for new in (21, 23, 24):
        _alias("Flatten", new, 13)
        _alias("Transpose", new, 13)
        _alias("Unsqueeze", new, 13)
        _alias("Squeeze", new, 21) if new != 21 else None
    for new in (20, 21, 23, 24):
        _alias("ConstantOfShape", new, 9)
    _alias("Equal", 19, 13)
    _alias("AveragePool", 19, 11, _no_attr(("dilations", None)))
    _alias("Resize", 18, 13, _resize_check)
    _alias("Resize", 19, 13, _resize_check)
    for op, old in (
        ("Conv", 11), ("ConvTranspose", 11), ("MaxPool", 12), ("GlobalAveragePool", 1),
        ("Dropout", 13), ("Elu", 6), ("Selu", 6), ("HardSigmoid", 6), ("HardSwish", 14),
        ("InstanceNormalization", 6), ("LRN", 13), ("Sin", 7), ("Cos", 7), ("Tan", 7),
        ("Softplus", 1), ("Softsign", 1), ("Atan", 7), ("Asin", 7), ("Acos", 7),
        ("Round", 11), ("EyeLike", 9),
    ):
        _alias(op, 22, old)
    _alias("AveragePool", 22, 11, _no_attr(("dilations", None)))


register()
