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

import warnings
from typing import Any, ClassVar

import onnx
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

    _MODES: ClassVar[dict[str, str]] = {
        "constant": "constant",
        "reflect": "reflect",
        "edge": "replicate",
        "wrap": "circular",
    }

    def __init__(
        self, mode: str, pads: list[int] | None, axes: list[int] | None, value: float | None
    ):
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

    def forward(
        self, x: torch.Tensor, split: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
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


# ------------------------------------------------------------------ ScatterND-18


class ScatterND18(nn.Module, OnnxToTorchModule):
    """ScatterND with every opset-18 reduction (none, add, mul, max, min).

    The leading `k = indices.shape[-1]` axes of `data` are flattened into one, so each
    index row becomes one position along axis 0: a plain index_put for `none` (the last
    write wins for duplicates, which ONNX leaves undefined anyway) and index_add /
    index_reduce for the reductions, which combine duplicates as ONNX specifies.
    """

    _REDUCE: ClassVar[dict[str, str]] = {"mul": "prod", "max": "amax", "min": "amin"}

    def __init__(self, reduction: str):
        super().__init__()
        if reduction not in ("none", "add", *self._REDUCE):
            raise NotImplementedError(f"ScatterND with reduction={reduction!r}")
        self.reduction = reduction

    def forward(
        self, data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor
    ) -> torch.Tensor:
        k = indices.shape[-1]
        lead = data.shape[:k]
        rest = data.shape[k:]
        idx = indices.reshape(-1, k).long()
        size = torch.tensor(lead, dtype=torch.long, device=idx.device)
        idx = torch.where(idx < 0, idx + size, idx)  # ONNX allows negative indices
        strides = [1] * k
        for i in range(k - 2, -1, -1):
            strides[i] = strides[i + 1] * int(lead[i + 1])
        lin = (idx * torch.tensor(strides, dtype=torch.long, device=idx.device)).sum(1)
        flat = data.reshape(-1, *rest).clone()
        upd = updates.reshape(-1, *rest).to(flat.dtype)
        if self.reduction == "none":
            flat = flat.index_put((lin,), upd)
        elif self.reduction == "add":
            flat = flat.index_add(0, lin, upd)
        else:
            with warnings.catch_warnings():  # "index_reduce() is in beta", on every call
                warnings.simplefilter("ignore", UserWarning)
                flat = flat.index_reduce(
                    0, lin, upd, self._REDUCE[self.reduction], include_self=True
                )
        return flat.reshape(data.shape)


def _scatter_nd18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    reduction = node.attributes.get("reduction", "none")
    if isinstance(reduction, bytes):
        reduction = reduction.decode()
    return OperationConverterResult(
        torch_module=ScatterND18(str(reduction)),
        onnx_mapping=OnnxMapping(inputs=_inputs(node)[:3], outputs=node.output_values),
    )


# ------------------------------------------------------------------ auto_pad SAME_*


def same_pads(
    size: list[int], kernel: list[int], strides: list[int], dilations: list[int], upper: bool
) -> list[int]:
    """ONNX auto_pad SAME_UPPER/SAME_LOWER as torch F.pad's list (last axis first).

    Output size is ceil(in / stride); the total padding of an axis is whatever that needs,
    split evenly with the odd pixel at the end (SAME_UPPER) or the beginning (SAME_LOWER).
    """
    out: list[int] = []
    for n, k, st, d in zip(size, kernel, strides, dilations):
        total = max((-(-n // st) - 1) * st + (k - 1) * d + 1 - n, 0)
        small, big = total // 2, total - total // 2
        out.append(small if upper else big)
        out.append(big if upper else small)
    torch_pads: list[int] = []
    for i in range(len(size) - 1, -1, -1):  # F.pad wants the last axis first
        torch_pads += [out[2 * i], out[2 * i + 1]]
    return torch_pads


class SamePad(nn.Module, OnnxToTorchModule):
    """Pads like auto_pad=SAME_* from the input's actual spatial size, then runs `inner`
    (a conv/pool built without padding). The size is read at run time, so a model with a
    dynamic height/width (what tf2onnx writes SAME for) works at any size."""

    def __init__(
        self,
        inner: nn.Module,
        kernel: list[int],
        strides: list[int],
        dilations: list[int],
        upper: bool,
        value: float = 0.0,
    ):
        super().__init__()
        self.inner = inner
        self.kernel = kernel
        self.strides = strides
        self.dilations = dilations
        self.upper = upper
        self.value = value

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        size = [int(v) for v in x.shape[2:]]
        pads = same_pads(size, self.kernel, self.strides, self.dilations, self.upper)
        return self.inner(F.pad(x, pads, value=self.value), *rest)  # type: ignore[no-any-return]


class SameAvgPool(nn.Module, OnnxToTorchModule):
    """AveragePool with auto_pad=SAME_*. With count_include_pad=0 (the default) the padded
    zeros must not count: the mean is sum(window) / (valid pixels in window), computed as
    the pooled padded input over the pooled padded ones."""

    def __init__(self, kernel: list[int], strides: list[int], upper: bool, count_include_pad: bool):
        super().__init__()
        self.kernel = kernel
        self.strides = strides
        self.upper = upper
        self.count_include_pad = count_include_pad

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(self.kernel)]
        return fn(x, self.kernel, self.strides)  # type: ignore[operator, no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [int(v) for v in x.shape[2:]]
        pads = same_pads(size, self.kernel, self.strides, [1] * len(size), self.upper)
        avg = self._pool(F.pad(x, pads))
        if self.count_include_pad:
            return avg
        ones = torch.ones((1, 1, *size), dtype=x.dtype, device=x.device)
        return avg / self._pool(F.pad(ones, pads))


class _MaxPoolN(nn.Module, OnnxToTorchModule):
    def __init__(self, kernel: list[int], strides: list[int], dilations: list[int]):
        super().__init__()
        self.kernel = kernel
        self.strides = strides
        self.dilations = dilations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(self.kernel)]
        return fn(x, self.kernel, self.strides, 0, self.dilations)  # type: ignore[operator, no-any-return]


def _auto_pad(node: OnnxNode) -> str:
    v = node.attributes.get("auto_pad", "NOTSET")
    return v.decode() if isinstance(v, bytes) else str(v)


def _without_auto_pad(node: OnnxNode) -> OnnxNode:
    """The same node with auto_pad and pads removed (padding then comes from SamePad)."""
    proto = onnx.NodeProto()
    proto.CopyFrom(node.proto)
    keep = [a for a in proto.attribute if a.name not in ("auto_pad", "pads")]
    del proto.attribute[:]
    proto.attribute.extend(keep)
    return OnnxNode(proto, unique_name=node.unique_name)


def _same_geometry(node: OnnxNode, graph: OnnxGraph) -> tuple[list[int], list[int], list[int]]:
    kernel = node.attributes.get("kernel_shape")
    if kernel is None and len(node.input_values) > 1:
        w = graph.initializers.get(node.input_values[1])
        if w is not None:
            kernel = list(w.to_torch().shape[2:])
    if kernel is None:
        raise NotImplementedError(f"{node.operation_type} auto_pad=SAME without a kernel shape")
    kernel = [int(k) for k in kernel]
    strides = [int(v) for v in node.attributes.get("strides", [1] * len(kernel))]
    dilations = [int(v) for v in node.attributes.get("dilations", [1] * len(kernel))]
    return kernel, strides, dilations


def _same_wrap(base: Any) -> Any:
    """A Conv/MaxPool/AveragePool converter that also takes auto_pad=SAME_UPPER/SAME_LOWER
    (which onnx2torch refuses); any other node goes to the registered converter as is."""

    def conv(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        mode = _auto_pad(node)
        if mode not in ("SAME_UPPER", "SAME_LOWER"):
            return base(node, graph)
        upper = mode == "SAME_UPPER"
        op = node.operation_type
        kernel, strides, dilations = _same_geometry(node, graph)
        if op == "Conv":
            res = base(_without_auto_pad(node), graph)
            module: nn.Module = SamePad(res.torch_module, kernel, strides, dilations, upper)
            return OperationConverterResult(torch_module=module, onnx_mapping=res.onnx_mapping)
        if int(node.attributes.get("ceil_mode", 0)):
            raise NotImplementedError(f"{op} with auto_pad={mode} and ceil_mode=1")
        if op == "MaxPool":
            if len(node.output_values) > 1 and node.output_values[1]:
                raise NotImplementedError("MaxPool with an Indices output")
            if int(node.attributes.get("storage_order", 0)):
                raise NotImplementedError("MaxPool with storage_order=1")
            # ONNX ignores padded positions in a max: pad with -inf.
            module = SamePad(
                _MaxPoolN(kernel, strides, dilations),
                kernel,
                strides,
                dilations,
                upper,
                value=float("-inf"),
            )
        else:  # AveragePool
            if any(d != 1 for d in dilations):
                raise NotImplementedError(f"AveragePool with auto_pad={mode} and dilations")
            include = bool(int(node.attributes.get("count_include_pad", 0)))
            module = SameAvgPool(kernel, strides, upper, include)
        return OperationConverterResult(
            torch_module=module,
            onnx_mapping=OnnxMapping(inputs=_inputs(node)[:1], outputs=node.output_values[:1]),
        )

    return conv


# ------------------------------------------------------------------ GlobalMaxPool


class GlobalMaxPool(nn.Module, OnnxToTorchModule):
    """Max over every spatial axis, keeping them as size-1 axes (ONNX GlobalMaxPool)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


def _global_max_pool(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return OperationConverterResult(
        torch_module=GlobalMaxPool(),
        onnx_mapping=OnnxMapping(inputs=_inputs(node)[:1], outputs=node.output_values),
    )


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
    for v in (18,):
        if not _has("ScatterND", v):
            add_converter(operation_type="ScatterND", version=v)(_scatter_nd18)
    for v in (1, 22):
        if not _has("GlobalMaxPool", v):
            add_converter(operation_type="GlobalMaxPool", version=v)(_global_max_pool)
    # auto_pad=SAME_*: wrap the registered converters before the aliases below copy them.
    for op, versions in (
        ("Conv", (1, 11)),
        ("MaxPool", (8, 10, 11, 12)),
        ("AveragePool", (7, 10, 11)),
    ):
        for v in versions:
            d = OperationDescription("", op, v)
            if d in _CONVERTER_REGISTRY:
                _CONVERTER_REGISTRY[d] = _same_wrap(_CONVERTER_REGISTRY[d])
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
        ("Conv", 11),
        ("ConvTranspose", 11),
        ("MaxPool", 12),
        ("GlobalAveragePool", 1),
        ("Dropout", 13),
        ("Elu", 6),
        ("Selu", 6),
        ("HardSigmoid", 6),
        ("HardSwish", 14),
        ("InstanceNormalization", 6),
        ("LRN", 13),
        ("Sin", 7),
        ("Cos", 7),
        ("Tan", 7),
        ("Softplus", 1),
        ("Softsign", 1),
        ("Atan", 7),
        ("Asin", 7),
        ("Acos", 7),
        ("Round", 11),
        ("EyeLike", 9),
    ):
        _alias(op, 22, old)
    _alias("AveragePool", 22, 11, _no_attr(("dilations", None)))


register()
