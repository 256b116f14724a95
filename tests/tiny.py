"""Tiny hand-built ONNX models for fast error-path tests (not trained; no claims rest on them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def linear_classifier(
    path: Path,
    *,
    c: int = 1,
    h: int = 8,
    w: int = 8,
    classes: int = 3,
    batch: int | str = "N",
    softmax: bool = False,
    seed: int = 0,
    nan: bool = False,
) -> Path:
    """Flatten -> Gemm (a random linear classifier) over C x H x W images."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(classes, c * h * w)).astype(np.float32)
    if nan:
        W[0, 0] = np.nan
    b = np.zeros(classes, np.float32)
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "W", "b"], ["logits"], transB=1),
    ]
    out = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        out = "probs"
    g = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, h, w])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, classes])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")],
    )
    return save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def graph_with(path: Path, inputs: list[tuple[str, int, list]], outputs: list[tuple[str, int, list]], nodes: list, inits: list | None = None, opset: int = 17, domain_ops: list[tuple[str, int]] | None = None) -> Path:
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        inits or [],
    )
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (domain_ops or [])]
    return save(helper.make_model(g, opset_imports=ops), path)


def write_images(d: Path, n: int = 12, size: int = 8, classes: int = 3, mode: str = "L") -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        cd = d / str(i % classes)
        cd.mkdir(parents=True, exist_ok=True)
        shape = (size, size) if mode == "L" else (size, size, len(mode))
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(cd / f"{i}.png")
    return d
