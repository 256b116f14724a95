"""Write a patched model back into the ORIGINAL ONNX graph.

Changed torch tensors go back into the initializers they came from (see
`ncscan.mitigate.layers.tensor_links`): same nodes, same input/output names, same opset,
same metadata (plus ncscan's provenance keys). Only when a changed tensor has no verified
initializer does ncscan fall back to re-exporting the torch graph with
`torch.onnx.export(..., dynamo=False, opset_version=17)`, and it says so.

Nothing is written before onnxruntime, running the bytes about to be written, agrees with
the patched torch model within 1e-4 (relative to the largest output).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from . import __version__
from .errors import ModelError
from .io import atomic_write_bytes, refuse_inputs
from .mitigate.layers import Link, named_tensors
from .model import MAX_ORT_IR, OnnxModel, Parity, check_parity

TWO_GB = 2**31 - 1
_NP_OF = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
}


class ExportFallback(Exception):
    """A changed tensor cannot be written into the original graph (the reason)."""


def snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every tensor of the converted graph (to see later what changed)."""
    return {k: v.detach().clone() for k, v in named_tensors(net).items()}


def changed_tensors(net: torch.nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    now = named_tensors(net)
    return [k for k, v in now.items() if k in before and not torch.equal(v.detach(), before[k])]


def write_back(om: OnnxModel, net: torch.nn.Module, links: dict[str, Link], before: dict[str, torch.Tensor]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of the original proto with the changed tensors written into their initializers.

    Returns:
        (proto, names of the initializers that changed).

    Raises:
        ExportFallback: a changed tensor has no verified initializer.
    """
    changed = changed_tensors(net, before)
    proto = onnx.ModelProto()
    proto.CopyFrom(om.proto)
    inits = {t.name: t for t in proto.graph.initializer}
    now = named_tensors(net)
    done: list[str] = []
    for k in changed:
        ln = links.get(k)
        if ln is None or ln.init_name not in inits:
            raise ExportFallback(f"tensor {k} changed but has no verified ONNX initializer")
        old = inits[ln.init_name]
        dt = _NP_OF.get(old.data_type)
        if dt is None:
            raise ExportFallback(f"initializer {ln.init_name} has data type {old.data_type}")
        arr = ln.to_onnx(now[k]).astype(dt)
        if list(arr.shape) != list(old.dims):
            raise ExportFallback(f"initializer {ln.init_name} shape {list(old.dims)} != {list(arr.shape)}")
        new = numpy_helper.from_array(arr, ln.init_name)
        old.CopyFrom(new)
        done.append(ln.init_name)
    return proto, sorted(set(done))


def reexport(net: torch.nn.Module, om: OnnxModel, example: torch.Tensor) -> onnx.ModelProto:
    """Fallback: torch.onnx.export of the patched graph (opset 17, legacy exporter)."""
    buf = io.BytesIO()
    try:
        torch.onnx.export(
            net, (example,), buf, dynamo=False, opset_version=17,
            input_names=[om.input.name], output_names=[om.output_name],
            dynamic_axes=None if om.input.batch == 1 else {om.input.name: {0: "batch"}, om.output_name: {0: "batch"}},
        )
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot re-export the patched model with torch.onnx.export: {type(e).__name__}: {e}") from e
    proto = onnx.load_from_string(buf.getvalue())
    del proto.metadata_props[:]
    for kv in om.proto.metadata_props:
        proto.metadata_props.add(key=kv.key, value=kv.value)
    return proto


def set_metadata(proto: onnx.ModelProto, items: dict[str, str]) -> None:
    """Set (add or replace) metadata_props, keeping every other key."""
    existing = {kv.key: kv for kv in proto.metadata_props}
    for k, v in items.items():
        if k in existing:
            existing[k].value = v
        else:
            proto.metadata_props.add(key=k, value=v)


def provenance(method: str, om: OnnxModel, labels: list[int], figures: dict[str, Any], preprocess: Any) -> dict[str, str]:
    """ncscan's metadata keys for a patched model."""
    pp = preprocess
    meta = {
        "ncscan.version": __version__,
        "ncscan.patch.method": method,
        "ncscan.patch.source_sha256": om.sha256,
        "ncscan.patch.labels": json.dumps(labels),
        "ncscan.patch.figures": json.dumps(figures, sort_keys=True),
        # the preprocessing used, so later scans and ncscan.serve read it back
        "ncscan.pixel_range": f"{pp.pixel_range[0]:g},{pp.pixel_range[1]:g}",
        "ncscan.layout": pp.layout,
        "ncscan.channel_order": pp.channel_order,
    }
    if pp.mean is not None:
        meta["ncscan.mean"] = ",".join(f"{v:g}" for v in pp.mean)
    if pp.std is not None:
        meta["ncscan.std"] = ",".join(f"{v:g}" for v in pp.std)
    return meta


def finalize(proto: onnx.ModelProto) -> onnx.ModelProto:
    """IR version capped for onnxruntime; checked."""
    if proto.ir_version > MAX_ORT_IR:
        proto.ir_version = MAX_ORT_IR
    try:
        if proto.ByteSize() < TWO_GB:
            onnx.checker.check_model(proto)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"the patched model fails onnx.checker: {first}") from e
    return proto


def ort_session_bytes(data: bytes) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])


def run_outputs(sess: Any, om: OnnxModel, x_model: np.ndarray, names: list[str], batch: int = 256) -> list[np.ndarray]:
    """Run the session on model-space input, honouring a static batch of 1."""
    bs = 1 if om.input.batch == 1 else batch
    dtype = np.float16 if om.input.elem_type == onnx.TensorProto.FLOAT16 else np.float64 if om.input.elem_type == onnx.TensorProto.DOUBLE else np.float32
    acc: list[list[np.ndarray]] = [[] for _ in names]
    for i in range(0, len(x_model), bs):
        outs = sess.run(names, {om.input.name: x_model[i : i + bs].astype(dtype)})
        for j, o in enumerate(outs):
            acc[j].append(np.asarray(o))
    return [np.concatenate(a, 0) for a in acc]


def parity_bytes(data: bytes, om: OnnxModel, torch_fn: Callable[[torch.Tensor], torch.Tensor], x_model: np.ndarray, what: str) -> tuple[Any, Parity]:
    """onnxruntime on the bytes to be written vs the patched torch model."""
    try:
        sess = ort_session_bytes(data)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"onnxruntime cannot load the patched model: {msg}") from e

    def ort_fn(a: np.ndarray) -> np.ndarray:
        o = run_outputs(sess, om, a, [om.output_name])[0]
        return o.astype(np.float32).reshape(o.shape[0], -1)

    par = check_parity(torch_fn, ort_fn, x_model, rtol=1e-4, what=what)
    return sess, par


def serialize(proto: onnx.ModelProto, path: Path) -> tuple[bytes, bytes | None]:
    """The model bytes (and, for models over 2 GB, the external-data bytes)."""
    if proto.ByteSize() < TWO_GB:
        return proto.SerializeToString(), None
    # Large model: weights go to <output>.data beside the model.
    from onnx.external_data_helper import convert_model_to_external_data

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    convert_model_to_external_data(m, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)
    # onnx writes the data file itself on save; do it into a temp dir, then move.
    import tempfile

    with tempfile.TemporaryDirectory(dir=str(path.parent)) as td:
        tmp = Path(td) / path.name
        onnx.save_model(m, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
        return tmp.read_bytes(), (Path(td) / (path.name + ".data")).read_bytes()


def write(path: Path, model_bytes: bytes, data_bytes: bytes | None, inputs: list[Path]) -> None:
    """Atomic write; never onto an input."""
    refuse_inputs(path, inputs)
    if data_bytes is not None:
        refuse_inputs(path.parent / (path.name + ".data"), inputs)
        atomic_write_bytes(path.parent / (path.name + ".data"), data_bytes)
    atomic_write_bytes(path, model_bytes)


def initializer_diff(a: onnx.ModelProto, b: onnx.ModelProto) -> dict[str, Any]:
    """What differs between two graphs: node structure and the initializers whose values changed."""
    na = [(n.name, n.op_type, list(n.input), list(n.output)) for n in a.graph.node]
    nb = [(n.name, n.op_type, list(n.input), list(n.output)) for n in b.graph.node]
    ia = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    changed = sorted(k for k in ia if k in ib and (ia[k].shape != ib[k].shape or not np.array_equal(ia[k], ib[k])))
    return {
        "same_nodes": na == nb[: len(na)],
        "extra_nodes": len(nb) - len(na),
        "same_initializer_names": set(ia) <= set(ib),
        "changed_initializers": changed,
    }
