"""Real architectures and real export paths (issue #17).

Default suite: choosing the classifier output of a model with several outputs.
Slow stage (`-m slow`): torchvision ResNet-50, MobileNetV3-Large, EfficientNet-B0,
ConvNeXt-T, ViT-B/16 and Swin-T (random weights, fixed seed, built into tmp_path), each
exported by torch's dynamo exporter (opset 18) and the legacy exporter, converted by ncscan
and checked against onnxruntime at 1e-4 relative; then a budget-capped scan of each on CPU
with its peak RSS. Adapters stage (`-m adapters`, needs TensorFlow): Keras applications
through tf2onnx.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import helper

from ncscan.errors import ModelError, NcscanError
from ncscan.model import convert, load_onnx, select_output, single_output
from ncscan.reverse import preset
from ncscan.scanner import scan

from .conftest import entry, preprocess_kwargs

# ----------------------------------------------------------------------------- outputs


def _two_output_model(tmp_path: Path, *, embedding_first: bool) -> tuple[Path, dict[str, Any]]:
    """The mnist_badnets_square fixture with its 64-wide penultimate activation (after the
    ReLU) exported as a second output, 'embedding' [batch, 64], beside the logits
    'output' [batch, 10]: the shape of a model that serves features and scores."""
    e = entry("mnist_badnets_square")
    m = onnx.load(e["_abs"]["file"])
    last = m.graph.node[-1]
    assert last.op_type == "Gemm" and m.graph.output[0].name == last.output[0]
    feat = last.input[0]
    width = next(t for t in m.graph.initializer if t.name == last.input[1]).dims[1]
    emb = helper.make_tensor_value_info(feat, onnx.TensorProto.FLOAT, ["batch", width])
    emb.name = "embedding"
    m.graph.node.append(helper.make_node("Identity", [feat], ["embedding"]))
    if embedding_first:
        m.graph.output.insert(0, emb)
    else:
        m.graph.output.append(emb)
    onnx.checker.check_model(m, full_check=True)
    p = tmp_path / ("emb_first.onnx" if embedding_first else "logits_first.onnx")
    onnx.save(m, str(p))
    return p, e


def test_ambiguous_outputs_are_refused_with_the_list_and_the_fix(tmp_path: Path) -> None:
    p, _ = _two_output_model(tmp_path, embedding_first=True)
    with pytest.raises(ModelError) as ei:
        load_onnx(p)
    msg = str(ei.value)
    assert ei.value.exit_code == 2 and isinstance(ei.value, NcscanError)
    assert "\n" not in msg
    assert "'embedding' [N, 64]" in msg and "'output' [N, 10]" in msg, msg
    assert "--output-name" in msg


def test_unknown_output_name_lists_the_outputs(tmp_path: Path) -> None:
    p, _ = _two_output_model(tmp_path, embedding_first=False)
    with pytest.raises(ModelError, match=r"'logits' is not an output .*'output' \[N, 10\]"):
        load_onnx(p, output_name="logits")


def test_the_only_class_score_output_is_chosen_over_a_feature_map() -> None:
    """A [N, C, H, W] feature map beside [N, K] scores is not ambiguous."""
    vi = helper.make_tensor_value_info
    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["fmap"]), helper.make_node("Flatten", ["x"], ["s"])],
        "g",
        [vi("x", onnx.TensorProto.FLOAT, ["N", 3, 2, 2])],
        [
            vi("fmap", onnx.TensorProto.FLOAT, ["N", 3, 2, 2]),
            vi("s", onnx.TensorProto.FLOAT, ["N", 12]),
        ],
    )
    out, warnings = select_output(helper.make_model(g))
    assert out.name == "s"
    assert len(warnings) == 1 and "'fmap' [N, 3, 2, 2]" in warnings[0]
    with pytest.raises(ModelError, match="rank 4"):
        select_output(helper.make_model(g), "fmap")
    pruned = single_output(helper.make_model(g), "s")
    assert [o.name for o in pruned.graph.output] == ["s"]
    assert [n.op_type for n in pruned.graph.node] == ["Flatten"]


@pytest.mark.parametrize("embedding_first", [True, False])
def test_output_name_scans_the_classifier_exactly_as_the_single_output_model(
    tmp_path: Path, embedding_first: bool
) -> None:
    """--output-name picks the logits wherever they sit among the outputs: the converted
    graph returns exactly the original model's scores, and a (budget-capped) scan gives the
    same per-label results as the single-output fixture."""
    p, e = _two_output_model(tmp_path, embedding_first=embedding_first)
    om = load_onnx(p, output_name="output")
    assert om.output_name == "output"
    assert any("'embedding' [N, 64]" in w for w in om.warnings)
    net = convert(om)
    ref_net = convert(load_onnx(e["_abs"]["file"]))
    import torch

    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref = net(x), ref_net(x)
    assert isinstance(got, torch.Tensor) and got.shape == (4, 10)
    assert torch.equal(got, ref)

    cfg = dataclasses.replace(preset("fast"), max_steps=2, verify_images=16)
    kw = dict(seed=0, device="cpu", labels=[0, 3, 7], max_images=64, schedule=cfg,
              **preprocess_kwargs(e))  # fmt: skip
    two = scan(p, e["_abs"]["scan_data"], output_name="output", **kw)
    one = scan(e["_abs"]["file"], e["_abs"]["scan_data"], **kw)
    assert two.num_classes == 10 and two.output == "logits"
    assert [r.to_dict(two.threshold) for r in two.labels] == [
        r.to_dict(one.threshold) for r in one.labels
    ]
    with pytest.raises(ModelError, match="--output-name"):
        scan(p, e["_abs"]["scan_data"], **kw)
