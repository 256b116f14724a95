"""ncscan's extra onnx2torch converters (ncscan/converters.py), each checked against
onnxruntime on the same inputs with an explicit tolerance, as onnx2torch's own tests do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ncscan import converters
from ncscan.errors import UnsupportedOpsError
from ncscan.model import convert, load_onnx

ATOL = 1e-5  # float32 on both sides; the ops below are exact up to summation order


def _model(nodes, inputs, outputs, inits=(), opset=18) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    onnx.checker.check_model(m, full_check=True)
    return m


def _ort(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _torch(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    from onnx2torch import convert as o2t

    converters.register()
    net = o2t(m)
    with torch.no_grad():
        out = net(*[torch.from_numpy(v) for v in feeds.values()])
    return out.numpy()


def _check(m: onnx.ModelProto, feeds: dict[str, np.ndarray], atol: float = ATOL) -> float:
    ref = _ort(m, feeds)[0]
    got = _torch(m, feeds)
    assert got.shape == ref.shape
    diff = float(np.abs(got - ref).max())
    assert diff <= atol, diff
    return diff


# ----------------------------------------------------------------------------- ScatterND-18


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter_nd_18_matches_onnxruntime(reduction: str) -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(4, 5, 6)).astype(np.float32)
    # Index rows into the first two axes, one negative; duplicates only where ONNX defines
    # how they combine (any reduction but none).
    rows = [[0, 1], [3, -1], [2, 2]] + ([[0, 1]] if reduction != "none" else [])
    idx = np.array(rows, np.int64).reshape(len(rows), 2)
    upd = rng.normal(size=(len(rows), 6)).astype(np.float32)
    m = _model(
        [helper.make_node("ScatterND", ["data", "idx", "upd"], ["y"], reduction=reduction)],
        [
            helper.make_tensor_value_info("data", TensorProto.FLOAT, [4, 5, 6]),
            helper.make_tensor_value_info("upd", TensorProto.FLOAT, [len(rows), 6]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5, 6])],
        [numpy_helper.from_array(idx, "idx")],
    )
    _check(m, {"data": data, "upd": upd})


def test_scatter_nd_18_gradient_flows_to_data_and_updates() -> None:
    """The scan differentiates through the graph: ScatterND must pass gradients on."""
    mod = converters.ScatterND18("none")
    data = torch.randn(3, 4, requires_grad=True)
    upd = torch.randn(1, 4, requires_grad=True)
    mod(data, torch.tensor([[1]]), upd).sum().backward()
    assert data.grad is not None and upd.grad is not None
    assert torch.equal(data.grad[1], torch.zeros(4)) and torch.equal(data.grad[0], torch.ones(4))
    assert torch.equal(upd.grad, torch.ones(1, 4))


def test_scatter_nd_unknown_reduction_is_refused() -> None:
    with pytest.raises(NotImplementedError, match="reduction"):
        converters.ScatterND18("avg")


# ----------------------------------------------------------------------------- auto_pad SAME


def _image_model(node: onnx.NodeProto, c: int, out_c: int, inits=(), hw=(None, None)):
    h, w = hw
    return _model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, h or "H", w or "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_c, "h", "w"])],
        inits,
    )


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "group"),
    [(3, 1, 1, 1), (3, 2, 1, 1), (4, 2, 1, 1), (5, 3, 1, 1), (3, 2, 1, 4), (2, 1, 1, 1)],
)
def test_conv_same_padding_matches_onnxruntime(auto_pad, kernel, stride, dilation, group) -> None:
    rng = np.random.default_rng(1)
    c, out_c = 4, 8
    w = rng.normal(size=(out_c, c // group, kernel, kernel)).astype(np.float32)
    b = rng.normal(size=(out_c,)).astype(np.float32)
    node = helper.make_node(
        "Conv", ["x", "w", "b"], ["y"], auto_pad=auto_pad, strides=[stride, stride],
        dilations=[dilation, dilation], group=group,
    )  # fmt: skip
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    m = _image_model(node, c, out_c, inits)
    # The graph has a dynamic height/width (why tf2onnx writes SAME): odd and even sizes.
    for size in ((11, 11), (12, 9)):
        _check(m, {"x": rng.normal(size=(2, c, *size)).astype(np.float32)})


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "AveragePool_include_pad"])
@pytest.mark.parametrize(("kernel", "stride"), [(3, 2), (2, 2), (4, 3)])
def test_pool_same_padding_matches_onnxruntime(auto_pad, op, kernel, stride) -> None:
    rng = np.random.default_rng(2)
    extra = {"count_include_pad": 1} if op.endswith("include_pad") else {}
    node = helper.make_node(
        op.split("_")[0], ["x"], ["y"], auto_pad=auto_pad, kernel_shape=[kernel, kernel],
        strides=[stride, stride], **extra,
    )  # fmt: skip
    m = _image_model(node, 3, 3)
    # Negative inputs: a max pool that padded with zeros instead of -inf would show.
    for size in ((9, 9), (10, 7)):
        x = rng.normal(size=(2, 3, *size)).astype(np.float32) - 3.0
        _check(m, {"x": x})


def test_conv_notset_padding_still_uses_onnx2torch() -> None:
    """The SAME wrapper hands every other node to the registered converter unchanged."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(2, 3, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 0, 2, 1])
    m = _image_model(node, 3, 2, [numpy_helper.from_array(w, "w")], hw=(8, 8))
    _check(m, {"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)})


def test_same_pads_formula() -> None:
    # in 5, k 3, s 2: out 3, total pad (3-1)*2+3-5 = 2 -> 1/1; in 6: out 3, total 1.
    assert converters.same_pads([5], [3], [2], [1], upper=True) == [1, 1]
    assert converters.same_pads([6], [3], [2], [1], upper=True) == [0, 1]
    assert converters.same_pads([6], [3], [2], [1], upper=False) == [1, 0]
    # F.pad order: last axis first
    assert converters.same_pads([6, 5], [3, 3], [2, 2], [1, 1], upper=True) == [1, 1, 0, 1]


# ----------------------------------------------------------------------------- GlobalMaxPool


@pytest.mark.parametrize("opset", [18, 22])
def test_global_max_pool_matches_onnxruntime(opset: int) -> None:
    node = helper.make_node("GlobalMaxPool", ["x"], ["y"])
    m = _model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 7, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 1, 1])],
        opset=opset,
    )
    x = np.random.default_rng(4).normal(size=(3, 5, 7, 6)).astype(np.float32) - 5.0
    _check(m, {"x": x}, atol=0.0)


# ----------------------------------------------------------------------------- refusals


def test_every_refused_node_is_listed_in_one_line(tmp_path: Path) -> None:
    """A ConvTranspose with auto_pad=SAME and a Resize with antialias are both refused by
    their converters; the error names both, not just the first one onnx2torch hits."""
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.normal(size=(3, 3, 2, 2)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 0.5, 0.5], np.float32), "scales")
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["t"], auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("Resize", ["t", "", "scales"], ["r"], mode="linear", antialias=1),
        helper.make_node("Flatten", ["r"], ["y"]),
    ]
    m = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 192])],
        [w, scales],
    )
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    with pytest.raises(UnsupportedOpsError) as ei:
        convert(load_onnx(p))
    msg = str(ei.value)
    assert "\n" not in msg
    assert "auto_pad" in msg and "antialias" in msg, msg


# ----------------------------------------------------------------------------- dynamo fixtures


def _dynamo_entries() -> list[object]:
    from .conftest import fixture_entries

    return [
        pytest.param(e, id=e["name"]) for e in fixture_entries() if e["exporter"] == "torch-dynamo"
    ]


@pytest.mark.parametrize("e", _dynamo_entries())
def test_dynamo_fixture_converts_with_parity(e: dict) -> None:
    """The fixtures exported by torch's dynamo exporter (opset 18+: Reshape-19 with
    allowzero, Gelu-20, LayerNormalization, ... for the ViT) need ncscan's converters; with
    them the torch module matches onnxruntime on real test images, and gradients reach the
    input (the trigger search needs them)."""
    m = load_onnx(e["_abs"]["file"])
    net = convert(m).eval()
    z = np.load(e["_abs"]["test_data"])
    x = np.ascontiguousarray(z["x"][:64].transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
    assert e["layout"] == "NCHW" and e["preprocess"]["pixel_range"] == [0.0, 1.0]
    ref = _ort(m.proto, {m.proto.graph.input[0].name: x})[0]
    xt = torch.from_numpy(x).requires_grad_(True)
    got = net(xt)
    diff = float(np.abs(got.detach().numpy() - ref).max() / max(1.0, np.abs(ref).max()))
    assert diff <= 1e-4, diff
    assert (got.detach().numpy().argmax(1) == ref.argmax(1)).all()
    got[:, 0].sum().backward()
    assert xt.grad is not None and torch.isfinite(xt.grad).all() and xt.grad.abs().sum() > 0
