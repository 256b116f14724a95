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
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import helper

from bench.arch import ARCHS
from ncscan.errors import ModelError, NcscanError
from ncscan.model import convert, load_onnx, select_output, single_output
from ncscan.reverse import preset
from ncscan.scanner import scan

from .conftest import ROOT, entry, preprocess_kwargs

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
    assert [r.to_dict() for r in two.labels] == [
        r.to_dict() for r in one.labels
    ]
    with pytest.raises(ModelError, match="--output-name"):
        scan(p, e["_abs"]["scan_data"], **kw)


# ----------------------------------------------------------------------------- architectures

ARCH_TIMEOUT_S = 900  # one architecture, both steps, on CI's 2 cores (ViT-B/16 is the slowest)
RSS_LIMIT_MB = 8 * 1024  # issue #17: a 224x224 scan within 8 GB on a 24 GB, 2-core machine


def _one(arch: str, exporter: str, workdir: Path, *, scan_it: bool) -> dict[str, Any]:
    """bench/arch.py's `one` in a fresh process, so the peak RSS is this model's own."""
    cmd = [sys.executable, str(ROOT / "bench" / "arch.py"), "one", "--arch", arch,
           "--exporter", exporter, "--workdir", str(workdir), "--no-timing"]  # fmt: skip
    if not scan_it:
        cmd.append("--no-scan")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=ARCH_TIMEOUT_S, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.arch
@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_converts_matches_onnxruntime_and_scans(
    arch: str, exporter: str, tmp_path: Path, record_property: Any
) -> None:
    """torchvision `arch` (random weights, seed 0) exported by `exporter` converts, agrees
    with onnxruntime to 1e-4 of its largest logit, and (dynamo export) a budget-capped scan
    of 3 labels finishes on CPU within the RSS limit."""
    scan_it = exporter == "dynamo"  # one scan per architecture: the same torch ops either way
    row = _one(arch, exporter, tmp_path, scan_it=scan_it)
    for key in ("peak_rss_mb", "export_s", "convert_s", "scan_s", "scan_passes"):
        if key in row:
            record_property(key, row[key])
    assert row["converts"], row.get("error")
    assert row["parity_rel_strict"] <= 1e-4, row
    assert row["argmax_agree"] == 1.0
    # Logits that do not depend on the input would make the parity check prove nothing.
    assert row["logit_spread"] > 0.01, row
    if scan_it:
        assert row["scan_passes"] > 0 and row["scan_verdict"] in (
            "clean",
            "backdoor",
            "inconclusive",
        )
        assert row["peak_rss_mb"] < RSS_LIMIT_MB, row


# ----------------------------------------------------------------------------- Keras (adapters)

# Keras applications with random weights, exported with tf2onnx as a user would (a
# tf.function with a None batch axis). MobileNetV2 is built with a dynamic height/width,
# which makes tf2onnx write Conv auto_pad=SAME_UPPER, and a max-pooled head.
KERAS_APPS = {
    "ResNet50": "m = keras.applications.ResNet50(weights=None, classes=10)",
    "EfficientNetB0": "m = keras.applications.EfficientNetB0(weights=None, classes=10)",
    "MobileNetV2_dynamic_hw": (
        "b = keras.applications.MobileNetV2(weights=None, include_top=False, pooling='max', "
        "alpha=0.35, input_shape=(None, None, 3))\n"
        "m = keras.Model(b.input, keras.layers.Dense(10)(b.output))"
    ),
}
_KERAS_EXPORT = """
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras, tensorflow as tf, tf2onnx
keras.utils.set_random_seed(0)
{build}
hwc = (None, None, 3) if "dynamic_hw" in {name!r} else (224, 224, 3)
spec = (tf.TensorSpec((None, *hwc), tf.float32, name="input"),)
tf2onnx.convert.from_keras(m, input_signature=spec, opset=18, output_path=sys.argv[1])
"""


def _tf_python() -> str:
    """A Python with TensorFlow + tf2onnx: this one (CI's adapters stage installs
    ncscan[keras]), else $NCSCAN_TF_PYTHON (a separate TensorFlow environment); skip if none."""
    import importlib.util
    import os

    if importlib.util.find_spec("tensorflow") and importlib.util.find_spec("tf2onnx"):
        return sys.executable
    other = os.environ.get("NCSCAN_TF_PYTHON")
    if other:
        return other
    pytest.skip("needs tensorflow + tf2onnx (pip install 'ncscan[keras]') or $NCSCAN_TF_PYTHON")


def _scan_and_check(path: Path, tmp_path: Path) -> dict[str, Any]:
    from bench.arch import convert_and_check, scan_data, small_scan

    row = convert_and_check(path)
    assert row["parity_rel_strict"] <= 1e-4 and row["argmax_agree"] == 1.0, row
    assert row["logit_spread"] > 0, row
    rep = small_scan(path, scan_data(tmp_path / "scan.npz", path))
    assert rep.passes > 0 and len(rep.labels) == 3
    return row


@pytest.mark.adapters
@pytest.mark.arch
@pytest.mark.parametrize("app", sorted(KERAS_APPS))
def test_keras_application_via_tf2onnx_converts_and_scans(app: str, tmp_path: Path) -> None:
    py = _tf_python()
    path = tmp_path / f"{app}.onnx"
    script = _KERAS_EXPORT.format(build=KERAS_APPS[app], name=app)
    res = subprocess.run(
        [py, "-c", script, str(path)], capture_output=True, text=True, timeout=900, check=False,
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    m = onnx.load(str(path), load_external_data=False)
    if app.endswith("dynamic_hw"):
        pads = {a.s for n in m.graph.node for a in n.attribute if a.name == "auto_pad"}
        assert b"SAME_UPPER" in pads  # the converter this model exists to exercise
    _scan_and_check(path, tmp_path)


# A third-party Keras model shipped inside a registry package: PyPI cifar-10-model 7.4.0
# carries a trained Keras CIFAR-10 CNN (cifar_10_model/trained_models/cnn_model.h5).
CIFAR_PKG = "cifar-10-model==7.4.0"
CIFAR_H5 = "cifar_10_model/trained_models/cnn_model.h5"


@pytest.mark.adapters
@pytest.mark.arch
def test_third_party_keras_h5_from_pypi_through_ncscan_export(tmp_path: Path) -> None:
    import os
    import zipfile

    py = _tf_python()
    dl = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp_path), CIFAR_PKG],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    wheels = list(tmp_path.glob("cifar_10_model-*.whl"))
    if dl.returncode != 0 or not wheels:
        pytest.skip(f"cannot download {CIFAR_PKG} from PyPI: {dl.stderr.strip()[-200:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(CIFAR_H5, tmp_path)
    out = tmp_path / "cifar10.onnx"
    env = dict(os.environ)
    res = subprocess.run(
        [py, "-m", "ncscan", "export", str(tmp_path / CIFAR_H5), "--from", "keras", "-o", str(out)],
        capture_output=True, text=True, timeout=900, check=False, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.exists() and "parity" in res.stderr + res.stdout
    om = load_onnx(out)
    assert (om.input.layout, om.input.height, om.input.width) == ("NHWC", 32, 32)
    _scan_and_check(out, tmp_path)


def test_cli_output_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the entry point: an ambiguous model exits 2 with one line naming the outputs
    and the flag; with --output-name the scan runs and says which output it scanned."""
    from ncscan.cli import run

    from .conftest import cli_preprocess_args

    p, e = _two_output_model(tmp_path, embedding_first=True)
    base = [str(p), "--data", e["_abs"]["scan_data"], *cli_preprocess_args(e), "--quiet",
            "--device", "cpu", "--max-steps", "1", "--max-images", "20"]  # fmt: skip
    assert run(base) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ncscan: error:"), err
    assert "'embedding' [N, 64]" in err and "'output' [N, 10]" in err and "--output-name" in err
    out = tmp_path / "r.json"
    rc = run([*base, "--output-name", "output", "-o", str(out)])
    assert rc in (0, 1, 4), capsys.readouterr().err
    rep = json.loads(out.read_text())
    assert rep["num_classes"] == 10 and len(rep["labels"]) == 10
    assert any("scanning 'output'" in w for w in rep["warnings"])
