"""Load, check and convert an ONNX image classifier.

The path is: read the file (and its external-data files) -> onnx.checker -> find the one
image input and its layout -> list every operator we cannot convert (all at once) ->
onnx2torch (with ncscan's extra converters for newer opset versions) -> a parity check
against onnxruntime on the user's own images.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import warnings as _pywarnings
from collections.abc import Callable, Iterator
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
# protobuf cannot serialize a message of 2 GiB or more; models whose weights would make the
# in-memory proto that big keep their external data on disk (see `OnnxModel.weights_on_disk`).
PROTO_LIMIT = 2**31 - 2**20


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
    # True when the proto holds only the graph and its external-data tensors stay in their
    # files beside the model (models over 2 GB: a proto that size cannot be serialized).
    weights_on_disk: bool = False
    # what onnx2torch warned about while converting (e.g. a Resize mode it maps inexactly)
    conversion_notes: list[str] = field(default_factory=list)

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


def _read_proto(p: Path) -> tuple[onnx.ModelProto, int]:
    """The graph of model file `p` (external data not read yet) and the file's size."""
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
    return proto, size


def _external_data(p: Path, proto: onnx.ModelProto, size: int) -> tuple[bool, bool]:
    """Check that every external-data file is next to the model and long enough, and read
    them into `proto` unless that would make it 2 GB or more. Returns (has external data,
    weights left on disk)."""
    has_ext = False
    missing: list[str] = []
    short: list[str] = []
    ext_bytes = 0
    for t in all_tensors(proto):
        if t.data_location == TensorProto.EXTERNAL:
            has_ext = True
            info = {kv.key: kv.value for kv in t.external_data}
            loc = info.get("location")
            if loc is None or not (p.parent / loc).is_file():
                missing.append(str(loc))
                continue
            need = _external_nbytes(t, info)
            ext_bytes += need
            off = info.get("offset", "0")
            if not off.isdigit() or int(off) + need > (p.parent / loc).stat().st_size:
                short.append(loc)
    if missing:
        raise ModelError(
            f"model {p.name} keeps weights in external file(s) {', '.join(sorted(set(missing)))} "
            f"that are not next to it in {p.parent}; copy them beside the model"
        )
    if short:
        raise ModelError(
            f"external data file(s) {', '.join(sorted(set(short)))} of {p.name} are shorter than "
            "the weights they should hold (truncated copy?); copy them again from the source"
        )
    on_disk = has_ext and ext_bytes + size >= PROTO_LIMIT
    if has_ext and not on_disk:
        try:
            onnx.load_external_data_for_model(proto, str(p.parent))
        except Exception as e:
            raise ModelError(f"cannot read the external data of {p.name}: {e}") from e
    return has_ext, on_disk


def _image_input(proto: onnx.ModelProto) -> tuple[onnx.ValueInfoProto, list[int | None]]:
    """The model's one graph input, checked to be a float32 rank-4 tensor, and its dims."""
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
    if vi.type.tensor_type.elem_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
        raise ModelError(
            f"model input '{vi.name}' is {TensorProto.DataType.Name(vi.type.tensor_type.elem_type).lower()}; "
            "ncscan needs a float32 input: re-export the model in float32 (torch: model.float() "
            "before torch.onnx.export)"
        )
    dims = _dims(vi)
    if len(dims) != 4:
        raise ModelError(
            f"model input '{vi.name}' has rank {len(dims)}; ncscan needs a rank-4 image input "
            "(NCHW or NHWC)"
        )
    return vi, dims


def _input_spec(
    vi: onnx.ValueInfoProto, dims: list[int | None], layout: str | None, meta: dict[str, str]
) -> tuple[InputSpec, str]:
    """The image input's layout (the flag, else the `ncscan.layout` metadata, else detected)
    and sizes. Returns (the spec, where the layout came from)."""
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
    return spec, layout_source


def load_onnx(
    path: str | os.PathLike[str], layout: str | None = None, output_name: str | None = None
) -> OnnxModel:
    """Read and check an ONNX classifier.

    Args:
        path: the .onnx file; external-data files are resolved next to it. When they
            would make the in-memory proto 2 GB or more, they are checked but not read
            (`weights_on_disk`); conversion and onnxruntime read them from the files.
        layout: force "NCHW" or "NHWC" (None: decide from the channel axis / metadata).
        output_name: the graph output that holds the class scores (None: the model's only
            output, else the only one shaped [N, classes]; see `select_output`).

    Returns:
        The checked model.

    Raises:
        ModelError: missing, unreadable, invalid, or not an image classifier.
    """
    p = Path(path)
    proto, size = _read_proto(p)
    has_ext, on_disk = _external_data(p, proto, size)
    try:
        # The path form handles models over 2 GB and external data.
        onnx.checker.check_model(str(p))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{p.name} fails onnx.checker: {first}; re-export the model") from e
    vi, dims = _image_input(proto)
    meta = {kv.key: kv.value for kv in proto.metadata_props}
    spec, layout_source = _input_spec(vi, dims, layout, meta)
    out, warnings = select_output(proto, output_name)
    producer = {o: n for n in proto.graph.node for o in n.output}
    last = producer.get(out.name)
    ends_in_softmax = last is not None and last.op_type == "Softmax"
    return OnnxModel(
        path=p,
        proto=proto,
        sha256=sha256_file(p),
        input=spec,
        output_name=out.name,
        opset=_default_opset(proto),
        metadata=meta,
        has_external_data=has_ext,
        ends_in_softmax=ends_in_softmax,
        layout_source=layout_source,
        warnings=warnings,
        weights_on_disk=on_disk,
    )


def _rank(vi: onnx.ValueInfoProto) -> int | None:
    """The rank of a graph value, None when the exporter left its shape out."""
    tt = vi.type.tensor_type
    return len(tt.shape.dim) if tt.HasField("shape") else None


def _shape_str(vi: onnx.ValueInfoProto) -> str:
    if _rank(vi) is None:
        return "[?]"
    dims = _dims(vi)
    return (
        "["
        + ", ".join(
            "N" if i == 0 and d is None else "?" if d is None else str(d)
            for i, d in enumerate(dims)
        )
        + "]"
    )


def select_output(
    proto: onnx.ModelProto, output_name: str | None = None
) -> tuple[onnx.ValueInfoProto, list[str]]:
    """Pick the graph output that holds the class scores.

    A model with one output uses it. A model with several (logits plus an embedding or a
    feature map) uses `output_name` when given, else the only output that can be class
    scores, i.e. shaped [N, K] (or of unknown shape). Two such outputs are ambiguous: an
    embedding [N, 512] looks exactly like 512 class scores, and scanning it would give a
    confident verdict about a classifier that does not exist, so that is refused.

    Args:
        proto: the model.
        output_name: the user's choice (`--output-name`), or None.

    Returns:
        (the chosen output, warnings to show the user).

    Raises:
        ModelError: the name is not an output, the chosen output is not [N, classes], no
            output is, or several are and no name was given (the message lists them all
            and the flag to pass).
    """
    outs = list(proto.graph.output)
    listing = ", ".join(f"'{o.name}' {_shape_str(o)}" for o in outs)
    if output_name is not None:
        chosen = [o for o in outs if o.name == output_name]
        if not chosen:
            raise ModelError(
                f"--output-name '{output_name}' is not an output of the model (outputs: "
                f"{listing}); pass one of these names"
            )
        out = chosen[0]
    elif len(outs) == 1:
        out = outs[0]
    else:
        cands = [o for o in outs if _rank(o) in (None, 2)]
        if len(cands) == 1:
            out = cands[0]
        elif not cands:
            raise ModelError(
                f"none of the model's {len(outs)} outputs is shaped [N, classes] ({listing}); "
                "ncscan scans the class scores of an image classifier: export them as an output"
            )
        else:
            raise ModelError(
                f"model has {len(cands)} outputs that could be class scores ({listing}); "
                "pass --output-name with the one that holds the class scores"
            )
    rank = _rank(out)
    if rank not in (None, 0, 2):
        raise ModelError(
            f"model output '{out.name}' has rank {rank} {_shape_str(out)}; ncscan needs class "
            f"scores of shape [N, classes]"
            + (f" (outputs: {listing}; pass --output-name)" if len(outs) > 1 else "")
        )
    warnings: list[str] = []
    if len(outs) > 1:
        how = "as asked" if output_name is not None else "the only one shaped [N, classes]"
        warnings.append(
            f"model has {len(outs)} outputs ({listing}); scanning '{out.name}' ({how}); "
            "--output-name picks another"
        )
    return out, warnings


def single_output(proto: onnx.ModelProto, output_name: str) -> onnx.ModelProto:
    """The graph cut down to the one output `output_name` (the nodes and initializers it
    needs). Returns `proto` itself when that is already its only output."""
    g = proto.graph
    if [o.name for o in g.output] == [output_name]:
        return proto
    need = {output_name}
    keep: list[int] = []
    for i in range(len(g.node) - 1, -1, -1):
        n = g.node[i]
        if any(o in need for o in n.output):
            keep.append(i)
            need.update(x for x in n.input if x)
            need.update(_subgraph_inputs(n))
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    og = out.graph
    nodes = [og.node[i] for i in sorted(keep)]
    inits = [t for t in og.initializer if t.name in need]
    vinfo = [v for v in og.value_info if v.name in need]
    outputs = [o for o in og.output if o.name == output_name]
    for field_name, items in (
        ("node", nodes),
        ("initializer", inits),
        ("value_info", vinfo),
        ("output", outputs),
    ):
        kept = [type(x)() for x in items]
        for k, x in zip(kept, items):
            k.CopyFrom(x)
        og.ClearField(field_name)
        getattr(og, field_name).extend(kept)
    return out


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing graph."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sg in graphs:
            for n in sg.node:
                names.update(x for x in n.input if x)
                names.update(_subgraph_inputs(n))
    return names


def _external_nbytes(t: TensorProto, info: dict[str, str]) -> int:
    """Bytes an external tensor takes in its file (its `length`, else dims x item size)."""
    if info.get("length", "").isdigit():
        return int(info["length"])
    try:
        item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):  # unknown/undefined type: onnx.checker reports it
        return 0
    return int(np.prod([int(d) for d in t.dims], dtype=np.int64)) * item


@contextlib.contextmanager
def _staged(
    model: OnnxModel, ir_version: int | None = None, proto: onnx.ModelProto | None = None
) -> Iterator[Path]:
    """A private temp copy of a weights-on-disk model: the graph file (IR clamped if asked)
    plus copies of its external-data files (onnx refuses symlinked and hard-linked data
    files, and data outside the model's folder). Needs that much free space in the temp
    directory; the user's files are only read."""
    with tempfile.TemporaryDirectory(prefix="ncscan-model-") as td:
        hdr = onnx.ModelProto()
        hdr.CopyFrom(model.proto if proto is None else proto)  # small: data stayed in files
        if ir_version is not None:
            hdr.ir_version = ir_version
        dst = Path(td) / "model.onnx"
        onnx.save_model(hdr, str(dst))
        for loc in sorted(external_locations(model.proto)):
            src, tgt = model.path.parent / loc, Path(td) / loc
            tgt.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(src, tgt)
            except OSError as e:
                raise ModelError(
                    f"cannot copy the external data {loc} of {model.path.name} to {td} "
                    f"({e.strerror}); free that much space there or point TMPDIR elsewhere"
                ) from e
        yield dst


def external_locations(proto: onnx.ModelProto) -> set[str]:
    """The side files (relative to the model) that hold its external-data tensors."""
    return {
        kv.value
        for t in all_tensors(proto)
        if t.data_location == TensorProto.EXTERNAL
        for kv in t.external_data
        if kv.key == "location"
    }


def all_tensors(proto: onnx.ModelProto) -> list[TensorProto]:
    """Every tensor stored in the graph: the initializers and the Constant nodes' values."""
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
    try:
        if model.proto.ir_version <= MAX_ORT_IR:
            # From the path: onnxruntime reads external data itself, whatever its size.
            return ort.InferenceSession(str(model.path), sess_options=so, providers=providers)
        # onnxruntime refuses newer IR versions; the graph itself is unchanged.
        if model.weights_on_disk:
            with _staged(model, ir_version=MAX_ORT_IR) as staged:
                return ort.InferenceSession(str(staged), sess_options=so, providers=providers)
        m = onnx.ModelProto()
        m.CopyFrom(model.proto)
        m.ir_version = MAX_ORT_IR
        return ort.InferenceSession(m.SerializeToString(), sess_options=so, providers=providers)
    except ModelError:
        raise
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
    from .tfcompat import block_triton_after_tensorflow

    block_triton_after_tensorflow()  # onnx2torch imports torch._dynamo -> triton
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
                since = defs.get_schema(
                    n.op_type, max_inclusive_version=ver, domain=dom
                ).since_version
            except Exception:  # noqa: BLE001 - an op onnx does not know: no schema
                since = ver
            desc = OperationDescription(domain=dom, operation_type=n.op_type, version=since)
            if desc not in _CONVERTER_REGISTRY:
                missing.add(f"{(dom + '.') if dom else ''}{n.op_type}-{since}")
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g)

    visit(proto.graph)
    return sorted(missing)


def node_refusals(proto: onnx.ModelProto) -> list[str]:
    """Every distinct refusal (NotImplementedError) of a registered converter on this graph.

    `unsupported_ops` finds operators with no converter at all; this finds those whose
    converter exists but refuses the node's attributes (a Resize mode, auto_pad on a
    ConvTranspose). onnx2torch stops at the first; this asks each node's converter in turn,
    so the user learns every one at once. Only run after a refusal: it builds the modules.
    """
    from onnx2torch.node_converters import get_converter
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.utils.safe_shape_inference import safe_shape_inference

    try:
        inferred = safe_shape_inference(proto)
    except Exception:  # noqa: BLE001 - shape inference is a help here, not a requirement
        inferred = proto
    opsets = {imp.domain: imp.version for imp in inferred.opset_import}
    graph = OnnxGraph(inferred.graph)
    found: list[str] = []
    for node in graph.nodes.values():
        try:
            conv = get_converter(
                operation_type=node.operation_type,
                version=opsets.get(node.domain, 0),
                domain=node.domain,
            )
            conv(node, graph)
        except NotImplementedError as e:
            text = " ".join(str(e).split())
            if text and text not in found:
                found.append(text)
        except Exception:  # noqa: BLE001, S112 - other failures are not what this lists
            continue
    return found


def fold_initializer_identities(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of `proto` where every `Identity` of an initializer is replaced by an
    initializer of its own (None when there is none). torch's TorchScript exporter shares
    identical weights (e.g. all-zero biases, default BatchNorm statistics) through such
    Identity nodes, and onnx2torch then cannot find the weight of the second layer."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    fold = [
        i
        for i, n in enumerate(g.node)
        if n.op_type == "Identity"
        and len(n.input) == 1
        and n.input[0] in inits
        and n.output[0] not in outputs
    ]
    if not fold:
        return None
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for i in fold:
        t = out.graph.initializer.add()
        t.CopyFrom(inits[g.node[i].input[0]])
        t.name = g.node[i].output[0]
    for i in reversed(fold):
        del out.graph.node[i]
    return out


def convert(model: OnnxModel) -> torch.nn.Module:
    """Convert to a torch module with onnx2torch (plus ncscan's converters); the module
    computes only the chosen output (`model.output_name`) and returns it as one tensor.

    onnx2torch's warnings go to `model.conversion_notes`, not stderr. A weights-on-disk
    model is converted from a private temp copy (graph + weights); it needs about three
    times its weight size in RAM while converting.

    Raises:
        UnsupportedOpsError: listing ALL unsupported operators at once.
        ModelError: onnx2torch failed for another reason.
    """
    missing = unsupported_ops(model.proto)  # first: it also guards the onnx2torch import
    from onnx2torch import convert as o2t_convert

    if missing:
        raise UnsupportedOpsError(
            missing,
            hint="re-export at opset 17 (torch: torch.onnx.export(..., opset_version=17, "
            "dynamo=False)) or open an issue with these names",
        )
    ir = MAX_ORT_IR if model.proto.ir_version > MAX_ORT_IR else None
    # Only the class scores: the torch module then returns one tensor, not a tuple in the
    # graph's output order, and needs none of the other outputs' nodes.
    scores_only = single_output(model.proto, model.output_name)
    try:
        # onnx2torch warns (to stderr) where its converter may not match the ONNX
        # semantics; whether it does is decided by the parity check on the user's images,
        # so the warnings are kept as notes instead of breaking the one-line CLI output.
        with _pywarnings.catch_warnings(record=True) as caught:
            _pywarnings.simplefilter("always")
            if model.weights_on_disk:
                # A proto over 2 GB cannot be serialized for onnx2torch's shape inference:
                # convert from a staged path so onnx reads the weights from their files.
                with _staged(model, ir_version=ir, proto=scores_only) as staged:
                    net = o2t_convert(str(staged))
            else:
                proto = scores_only
                if ir is not None:
                    proto = onnx.ModelProto()
                    proto.CopyFrom(scores_only)
                    proto.ir_version = ir
                try:
                    net = o2t_convert(proto)
                except KeyError:
                    # Weights shared through Identity nodes (see fold_initializer_identities):
                    # only then convert a folded copy, so models that convert as they are
                    # keep their initializer names for writing patched weights back.
                    folded = fold_initializer_identities(proto)
                    if folded is None:
                        raise
                    net = o2t_convert(folded)
    except NotImplementedError as e:
        # onnx2torch stops at the first node it refuses; name every such node at once.
        found = [] if model.weights_on_disk else node_refusals(scores_only)
        text = "; ".join(found) if found else " ".join(str(e).split())
        if "BatchNorm" in text and "mean/var" in text:
            hint = "the model was exported in training mode: export it after model.eval()"
        elif "auto_pad" in text:
            hint = "re-export with explicit padding (a fixed input size lets exporters compute it)"
        else:
            hint = "re-export at opset 17 or open an issue with this message"
        raise UnsupportedOpsError(found or [text], hint=hint) from e
    except ModelError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot convert {model.path.name} to torch: {msg}") from e
    for w in caught:
        note = " ".join(str(w.message).split())
        if note not in model.conversion_notes:
            model.conversion_notes.append(note)
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
        return {
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "argmax_agree": self.argmax_agree,
            "n": self.n,
        }


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
    return Parity(max_abs=diff, max_rel=rel, argmax_agree=agree, n=len(x_model))
