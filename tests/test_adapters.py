"""Tests for ncscan.adapters (framework -> ONNX exporters) and the Keras fixtures.

Framework round trips are marked `adapters` and skip when the framework is missing:

    pytest tests/test_adapters.py                 # everything whose deps are installed
    pytest tests/test_adapters.py -m "not adapters"   # no framework needed
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ncscan.errors import ConfigError, ConversionMismatchError, ModelError, NcscanError, OutputError

REPO = Path(__file__).resolve().parents[1]
KERAS_FIX = REPO / "fixtures" / "keras"
JAX_FIX = REPO / "fixtures" / "jax"
META_KEYS = ("ncscan.pixel_range", "ncscan.layout", "ncscan.channel_order")


# ----------------------------------------------------------------------------- helpers


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def metadata(path: Path) -> dict[str, str]:
    import onnx

    m = onnx.load(str(path))
    return {p.key: p.value for p in m.metadata_props}


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def check_onnx_file(path: Path, reference, sample_shape, *, pixel_range=(0.0, 1.0)) -> float:
    """Dynamic batch (1 and 5), one file, IR <= 13, metadata present; returns max rel diff."""
    import onnx

    assert path.exists() and not list(path.parent.glob(path.name + ".data"))
    m = onnx.load(str(path))
    assert m.ir_version <= 13
    d0 = m.graph.input[0].type.tensor_type.shape.dim[0]
    assert d0.dim_param and not d0.dim_value, "batch axis is not dynamic"
    md = metadata(path)
    for k in META_KEYS:
        assert k in md, k
    rng = np.random.default_rng(0)
    worst = 0.0
    for b in (1, 5):
        x = rng.uniform(*pixel_range, size=(b, *sample_shape)).astype(np.float32)
        got = ort_run(path, x)
        ref = np.asarray(reference(x))
        assert got.shape == ref.shape == (b, ref.shape[-1])
        worst = max(worst, rel_diff(got, ref))
    assert worst <= 1e-4, worst
    return worst


def onnx2torch_matches(path: Path, x: np.ndarray) -> float:
    """ncscan's converter (onnx2torch + ncscan's extra converters) must take the exported
    file and agree with ORT. Through ncscan, not onnx2torch directly: after `import
    tensorflow` (the Keras tests) a direct onnx2torch import pulls in triton and segfaults."""
    import torch

    from ncscan.model import convert, load_onnx

    net = convert(load_onnx(path)).eval()
    with torch.no_grad():
        got = net(torch.from_numpy(x.astype(np.float32))).numpy()
    d = rel_diff(got, ort_run(path, x))
    assert d <= 1e-4, d
    return d


# ----------------------------------------------------------------- no framework needed


def test_import_is_light():
    # Only what `ncscan.adapters` adds on top of `import ncscan` counts.
    code = (
        "import sys, ncscan; before = set(sys.modules); import ncscan.adapters; "
        "new = set(sys.modules) - before; "
        "bad = [m for m in ('torch', 'tensorflow', 'jax', 'keras', 'tf2onnx', 'onnxruntime', "
        "'onnx', 'jax2onnx', 'flax') if m in new]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_preprocessing_metadata_strings():
    from ncscan.adapters import Preprocessing

    p = Preprocessing.coerce(
        {"pixel_range": "0,255", "mean": [123.675, 116.28, 103.53], "std": (58.395, 57.12, 57.375)},
        channel_order="bgr",
        class_names=["cat", "dog"],
    )
    md = p.metadata("NCHW")
    assert md["ncscan.pixel_range"] == "0,255"
    assert md["ncscan.mean"] == "123.675,116.28,103.53"
    assert md["ncscan.std"] == "58.395,57.12,57.375"
    assert md["ncscan.layout"] == "NCHW"
    assert md["ncscan.channel_order"] == "BGR"
    assert json.loads(md["ncscan.class_names"]) == ["cat", "dog"]


def test_metadata_is_read_back_by_ncscan():
    from ncscan import preprocess as pre
    from ncscan.adapters import Preprocessing

    md = Preprocessing.coerce(pixel_range=(-1, 1), mean=[0.5], std=[0.25]).metadata("NHWC")
    got = pre.preprocess_from_metadata(md)
    assert got["pixel_range"] == (-1.0, 1.0)
    assert got["mean"] == (0.5,) and got["std"] == (0.25,)
    assert got["layout"] == "NHWC" and got["channel_order"] == "RGB"


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"pixel_range": (1, 0)}, "lo < hi"),
        ({"pixel_range": "0;255"}, "pixel_range"),
        ({"std": [0.0]}, "positive"),
        ({"channel_order": "GBR"}, "RGB or BGR"),
        ({"mean": "a,b"}, "mean"),
        ({"bogus": 1}, "unknown"),
    ],
)
def test_preprocessing_rejects_bad_values(kw, needle):
    from ncscan.adapters import Preprocessing

    with pytest.raises(ConfigError, match=needle):
        Preprocessing.coerce(kw)


def test_export_file_user_errors(tmp_path):
    from ncscan.adapters import export_file

    src = tmp_path / "m.pt"
    src.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="--from"):
        export_file("caffe", src, tmp_path / "o.onnx")
    with pytest.raises(ConfigError, match="jax.to_onnx"):
        export_file("jax", src, tmp_path / "o.onnx")
    with pytest.raises(ModelError, match="does not exist"):
        export_file("torch", tmp_path / "missing.pt", tmp_path / "o.onnx")
    same = tmp_path / "m.onnx"
    same.write_bytes(b"x")
    with pytest.raises(OutputError, match="is the input"):
        export_file("torch", same, same)
    with pytest.raises(OutputError, match="does not exist"):
        export_file("torch", src, tmp_path / "nodir" / "o.onnx")
    with pytest.raises(OutputError, match=r"\.onnx"):
        export_file("torch", src, tmp_path / "o.bin")
    with pytest.raises(ModelError, match="neither TorchScript nor a torch.export"):
        export_file("torch", src, tmp_path / "o.onnx", input_shape="1,8,8")
    assert not (tmp_path / "o.onnx").exists()
    for err in (ConfigError, ModelError, OutputError):
        assert issubclass(err, NcscanError)


def test_missing_framework_message(monkeypatch):
    import builtins

    from ncscan.adapters import _common

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.split(".")[0] == "tensorflow":
            raise ImportError("No module named 'tensorflow'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    with pytest.raises(
        ModelError, match=r"tensorflow is not installed.*pip install 'ncscan\[keras\]'"
    ):
        _common.require("tensorflow")


def test_class_names_file(tmp_path):
    from ncscan.adapters import read_class_names

    (tmp_path / "a.json").write_text('["x", "y"]')
    (tmp_path / "b.txt").write_text("x\n\ny\n")
    (tmp_path / "c.txt").write_text("\n")
    assert read_class_names(tmp_path / "a.json") == ["x", "y"]
    assert read_class_names(tmp_path / "b.txt") == ["x", "y"]
    with pytest.raises(ConfigError, match="empty"):
        read_class_names(tmp_path / "c.txt")
    with pytest.raises(ConfigError, match="cannot read"):
        read_class_names(tmp_path / "nope.txt")


def test_parity_mismatch_is_reported():
    from ncscan.adapters._common import verify_parity
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    data = m.SerializeToString()
    mk = lambda b, i: np.ones((b, 3), np.float32)
    rel, _ = verify_parity(data, lambda x: x, mk)
    assert rel == 0.0
    with pytest.raises(ConversionMismatchError, match="disagrees with the framework model"):
        verify_parity(data, lambda x: x * 1.01, mk)


# ---------------------------------------------------------------------------- PyTorch


def _torch_net():
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()
    return torch, net


def _torch_ref(torch, net):
    def ref(x):
        with torch.no_grad():
            return net(torch.from_numpy(x)).numpy()

    return ref


@pytest.mark.adapters
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_torch_round_trip(tmp_path, dynamo):
    torch, net = _torch_net()
    if dynamo:
        pytest.importorskip("onnxscript")
    from ncscan.adapters.torch_export import to_onnx

    out = tmp_path / "t.onnx"
    res = to_onnx(
        net,
        out,
        preprocess={"pixel_range": (0, 255), "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]},
        input_shape=(3, 16, 16),
        dynamo=dynamo,
        class_names=[f"c{i}" for i in range(10)],
    )
    assert res.max_rel_diff <= 1e-4 and res.num_classes == 10 and res.opset <= 18
    assert res.exporter == ("torch-dynamo" if dynamo else "torch-legacy")
    d = check_onnx_file(out, _torch_ref(torch, net), (3, 16, 16))
    md = metadata(out)
    assert md["ncscan.mean"] == "0.5,0.4,0.3" and md["ncscan.std"] == "0.2,0.2,0.2"
    assert md["ncscan.pixel_range"] == "0,255" and md["ncscan.layout"] == "NCHW"
    assert json.loads(md["ncscan.class_names"])[3] == "c3"
    onnx2torch_matches(out, np.random.default_rng(1).normal(size=(5, 3, 16, 16)))
    print(f"torch {'dynamo' if dynamo else 'legacy'} opset {res.opset} max rel diff {d:.2e}")


@pytest.mark.adapters
def test_torch_wrong_class_names_count(tmp_path):
    _, net = _torch_net()
    from ncscan.adapters.torch_export import to_onnx

    with pytest.raises(ConfigError, match="3 class names given but the model has 10"):
        to_onnx(
            net, tmp_path / "t.onnx", input_shape=(3, 16, 16), dynamo=False, class_names=list("abc")
        )
    assert not (tmp_path / "t.onnx").exists()


@pytest.mark.adapters
def test_torch_export_file_torchscript_and_pt2(tmp_path):
    torch, net = _torch_net()
    from ncscan.adapters import export_file

    ts = tmp_path / "net.pt"
    torch.jit.script(net).save(str(ts))
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"n{i}" for i in range(10)))
    s = export_file(
        "torch",
        ts,
        tmp_path / "ts.onnx",
        pixel_range=(0, 1),
        channel_order="BGR",
        class_names=names,
        input_shape="3,16,16",
    )
    assert s["exporter"] == "torch-legacy" and s["max_parity_diff"] <= 1e-4
    assert s["metadata"]["ncscan.channel_order"] == "BGR"
    check_onnx_file(tmp_path / "ts.onnx", _torch_ref(torch, net), (3, 16, 16))
    with pytest.raises(ConfigError, match="input shape is unknown"):
        export_file("torch", ts, tmp_path / "ts2.onnx")

    pytest.importorskip("onnxscript")
    pt2 = tmp_path / "net.pt2"
    x = torch.rand(2, 3, 16, 16)
    torch.export.save(torch.export.export(net, (x,)), str(pt2))
    with pytest.raises(ModelError, match="fixed batch of 2"):
        export_file("torch", pt2, tmp_path / "ep.onnx")
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: batch},)), str(pt2))
    s = export_file("torch", pt2, tmp_path / "ep.onnx", pixel_range=(0, 1))
    assert s["exporter"] == "torch-dynamo" and s["input_shape"][1:] == [3, 16, 16]
    check_onnx_file(tmp_path / "ep.onnx", _torch_ref(torch, net), (3, 16, 16))


# ------------------------------------------------------------------------------ Keras


def _keras():
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    L = keras.layers
    model = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            L.Rescaling(1 / 127.5, offset=-1),
            L.Conv2D(8, 3, activation="relu"),
            L.BatchNormalization(),
            L.MaxPooling2D(),
            L.Conv2D(8, 3, padding="same", activation="relu"),
            L.GlobalAveragePooling2D(),
            L.Dense(5, activation="softmax"),
        ]
    )
    return keras, model


@pytest.mark.adapters
def test_keras_round_trip(tmp_path):
    _, model = _keras()
    from ncscan.adapters.keras import to_onnx

    out = tmp_path / "k.onnx"
    res = to_onnx(model, out, preprocess={"pixel_range": (0, 255)}, class_names=list("abcde"))
    assert res.max_rel_diff <= 1e-4 and res.opset == 17 and res.num_classes == 5
    ref = lambda x: model(x, training=False).numpy()
    d = check_onnx_file(out, ref, (12, 12, 3), pixel_range=(0, 255))
    md = metadata(out)
    assert md["ncscan.layout"] == "NHWC" and md["ncscan.pixel_range"] == "0,255"
    assert json.loads(md["ncscan.class_names"]) == list("abcde")
    x = np.random.default_rng(2).uniform(0, 255, size=(5, 12, 12, 3))
    assert np.allclose(ort_run(out, x).sum(1), 1.0, atol=1e-5)  # softmax output kept
    onnx2torch_matches(out, x)
    print(f"keras max rel diff {d:.2e}")


@pytest.mark.adapters
@pytest.mark.parametrize("kind", ["keras", "h5", "savedmodel"])
def test_keras_export_file(tmp_path, kind):
    _, model = _keras()
    from ncscan.adapters import export_file

    if kind == "savedmodel":
        src = tmp_path / "sm"
        model.export(str(src), verbose=False)
    else:
        src = tmp_path / f"m.{kind}"
        model.save(str(src))
    s = export_file("keras", src, tmp_path / "o.onnx", pixel_range=(0, 255))
    assert s["framework"] == "keras" and s["max_parity_diff"] <= 1e-4
    assert s["metadata"]["ncscan.layout"] == "NHWC"
    ref = lambda x: model(x, training=False).numpy()
    check_onnx_file(tmp_path / "o.onnx", ref, (12, 12, 3), pixel_range=(0, 255))
    with pytest.raises(OutputError, match="is the input|inside the source model folder"):
        export_file("keras", src, src / "x.onnx" if kind == "savedmodel" else src)


# ------------------------------------------------------------------------------- JAX


@pytest.mark.adapters
def test_jax_round_trip(tmp_path):
    jax = pytest.importorskip("jax")
    nnx = pytest.importorskip("flax.nnx")
    pytest.importorskip("jax2onnx")
    from ncscan.adapters.jax import to_onnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
            self.conv2 = nnx.Conv(8, 8, kernel_size=(3, 3), strides=(2, 2), rngs=rngs)
            self.fc = nnx.Linear(8 * 6 * 6, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.conv(x))
            x = nnx.relu(self.conv2(x))
            x = x.reshape(x.shape[0], -1)
            return nnx.softmax(self.fc(x))

    net = Net(nnx.Rngs(0))
    out = tmp_path / "j.onnx"
    res = to_onnx(net, out, preprocess={"pixel_range": (0, 1)}, input_shape=(12, 12, 1))
    assert res.max_rel_diff <= 1e-4 and res.num_classes == 10
    ref = lambda x: np.asarray(net(jax.numpy.asarray(x)))
    d = check_onnx_file(out, ref, (12, 12, 1))
    assert metadata(out)["ncscan.layout"] == "NHWC"
    onnx2torch_matches(out, np.random.default_rng(3).uniform(size=(5, 12, 12, 1)))
    print(f"jax max rel diff {d:.2e}")


# ------------------------------------------------- Keras fixtures (no framework needed)


def _manifest(root: Path = KERAS_FIX) -> dict:
    p = root / "manifest.json"
    assert p.exists(), f"fixtures/{root.name}/manifest.json is missing; rebuild with fixtures/{root.name}/build.py"
    return json.loads(p.read_text())


def _fixture(infected: bool, root: Path = KERAS_FIX) -> dict:
    return next(f for f in _manifest(root)["fixtures"] if f["infected"] is infected)


def _stamp(x_u8: np.ndarray, trig) -> np.ndarray:
    x = x_u8.astype(np.float32) / 255.0
    m = trig["mask"][None, :, :, None]
    p = np.transpose(trig["pattern"], (1, 2, 0))[None]
    return np.round(((1 - m) * x + m * p) * 255.0)


def test_keras_fixture_manifest():
    man = _manifest()
    assert man["version"] == 1 and len(man["fixtures"]) == 2
    total = sum(p.stat().st_size for p in KERAS_FIX.rglob("*") if p.is_file())
    assert total < 3 * 2**20, total
    for f in man["fixtures"]:
        path = KERAS_FIX / f["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == f["sha256"]
        assert f["exporter"] == "keras-tf2onnx" and f["layout"] == "NHWC"
        assert f["ir_version"] <= 13 and f["opset"] <= 17 and f["preprocess_in_metadata"]
        md = metadata(path)
        assert md["ncscan.pixel_range"] == "0,255" and md["ncscan.layout"] == "NHWC"
        for t in f["triggers"]:
            z = np.load(KERAS_FIX / t["file"])
            assert z["mask"].shape == (28, 28) and z["pattern"].shape == (1, 28, 28)
            assert z["mask"].dtype == np.float32 and 0 <= z["mask"].min() and z["mask"].max() <= 1
            assert abs(float(z["mask"].sum()) - t["mask_l1"]) < 1e-6
    scan = sorted((KERAS_FIX / "scan").glob("*/*.png"))
    assert len(scan) >= 250 and {p.parent.name for p in scan} == {str(i) for i in range(10)}
    test = np.load(KERAS_FIX / "test.npz")
    assert test["x"].dtype == np.uint8 and test["x"].shape[1:] == (28, 28, 1)
    assert test["y"].dtype == np.int64 and len(test["y"]) == len(test["x"]) >= 2000
    # scan/ and test.npz are disjoint
    from PIL import Image

    scan_keys = {np.asarray(Image.open(p)).tobytes() for p in scan}
    assert not scan_keys & {x[..., 0].tobytes() for x in test["x"]}


@pytest.mark.parametrize("infected", [True, False], ids=["badnets", "clean"])
def test_keras_fixture_accuracy_and_attack(infected):
    f = _fixture(infected)
    path = KERAS_FIX / f["file"]
    test = np.load(KERAS_FIX / "test.npz")
    x, y = test["x"], test["y"]
    pred = ort_run(path, x.astype(np.float32)).argmax(1)
    acc = float((pred == y).mean())
    assert acc >= 0.97 and abs(acc - f["clean_accuracy"]) < 1e-3
    bad = _fixture(True)
    t = bad["triggers"][0]
    trig = np.load(KERAS_FIX / t["file"])
    keep = y != t["target"]
    asr = float((ort_run(path, _stamp(x[keep], trig)).argmax(1) == t["target"]).mean())
    if infected:
        assert asr >= 0.95 and abs(asr - t["attack_success"]) < 1e-3
    else:
        assert asr < 0.05


def test_keras_fixture_converts_with_onnx2torch():
    x = np.load(KERAS_FIX / "test.npz")["x"][:5]
    for f in _manifest()["fixtures"]:
        onnx2torch_matches(KERAS_FIX / f["file"], x.astype(np.float32))


@pytest.mark.adapters
@pytest.mark.slow
@pytest.mark.parametrize("infected", [True, False], ids=["badnets", "clean"])
def test_ncscan_scans_keras_fixture(infected):
    from ncscan.scanner import scan

    f = _fixture(infected)
    report = scan(KERAS_FIX / f["file"], KERAS_FIX / f["scan_data"], seed=0)
    print(f"ncscan {f['name']}: verdict={report.verdict} flagged={report.flagged}")
    if infected:
        assert report.verdict == "backdoor"
        assert f["targets"][0] in report.flagged
    else:
        assert report.verdict == "clean" and not report.flagged


# --------------------------------------------------- JAX fixtures (no framework needed)
# fixtures/jax/: Flax NNX twins exported with ncscan.adapters.jax (jax2onnx) by
# fixtures/jax/build.py. These tests read only the committed ONNX files, so they need
# onnxruntime (and onnx2torch / ncscan for the last two), never jax.


def test_jax_fixture_manifest():
    man = _manifest(JAX_FIX)
    assert man["version"] == 1 and len(man["fixtures"]) == 2
    total = sum(p.stat().st_size for p in JAX_FIX.rglob("*") if p.is_file())
    assert total < 3 * 2**20, total
    assert {f["name"] for f in man["fixtures"]} == {"mnist_badnets_jax", "mnist_clean_jax"}
    for f in man["fixtures"]:
        path = JAX_FIX / f["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == f["sha256"]
        assert f["exporter"] == "jax2onnx" and f["layout"] == "NHWC"
        assert f["ir_version"] <= 13 and f["opset"] <= 17 and f["preprocess_in_metadata"]
        md = metadata(path)
        assert md["ncscan.pixel_range"] == "0,255" and md["ncscan.layout"] == "NHWC"
        assert md["ncscan.exporter"] == "jax2onnx"
        assert json.loads(md["ncscan.class_names"]) == [str(i) for i in range(10)]
        import onnx

        d0 = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
        assert d0.dim_param and not d0.dim_value, "batch axis is not dynamic"
        for t in f["triggers"]:
            z = np.load(JAX_FIX / t["file"])
            assert z["mask"].shape == (28, 28) and z["pattern"].shape == (1, 28, 28)
            assert z["mask"].dtype == np.float32 and 0 <= z["mask"].min() and z["mask"].max() <= 1
            assert abs(float(z["mask"].sum()) - t["mask_l1"]) < 1e-6
    # a different backdoor from the Keras twin's (target and trigger position)
    jt = _fixture(True, JAX_FIX)["triggers"][0]
    kt = _fixture(True)["triggers"][0]
    assert jt["target"] != kt["target"]
    jm = np.load(JAX_FIX / jt["file"])["mask"]
    km = np.load(KERAS_FIX / kt["file"])["mask"]
    assert not (jm * km).any()
    scan = sorted((JAX_FIX / "scan").glob("*/*.png"))
    assert len(scan) >= 250 and {p.parent.name for p in scan} == {str(i) for i in range(10)}
    test = np.load(JAX_FIX / "test.npz")
    assert test["x"].dtype == np.uint8 and test["x"].shape[1:] == (28, 28, 1)
    assert test["y"].dtype == np.int64 and len(test["y"]) == len(test["x"]) >= 2000
    from PIL import Image

    scan_keys = {np.asarray(Image.open(p)).tobytes() for p in scan}
    assert not scan_keys & {x[..., 0].tobytes() for x in test["x"]}


@pytest.mark.parametrize("infected", [True, False], ids=["badnets", "clean"])
def test_jax_fixture_accuracy_and_attack(infected):
    f = _fixture(infected, JAX_FIX)
    path = JAX_FIX / f["file"]
    test = np.load(JAX_FIX / "test.npz")
    x, y = test["x"], test["y"]
    # dynamic batch: the whole test set in one run
    pred = ort_run(path, x.astype(np.float32)).argmax(1)
    acc = float((pred == y).mean())
    assert acc >= 0.97 and abs(acc - f["clean_accuracy"]) < 1e-3
    t = _fixture(True, JAX_FIX)["triggers"][0]
    trig = np.load(JAX_FIX / t["file"])
    keep = y != t["target"]
    asr = float((ort_run(path, _stamp(x[keep], trig)).argmax(1) == t["target"]).mean())
    if infected:
        assert asr >= 0.95 and abs(asr - t["attack_success"]) < 1e-3
    else:
        assert asr < 0.05 and abs(asr - f["clean_model_trigger_rate"]) < 1e-3


def test_jax_fixture_converts_with_onnx2torch():
    x = np.load(JAX_FIX / "test.npz")["x"][:5].astype(np.float32)
    for f in _manifest(JAX_FIX)["fixtures"]:
        onnx2torch_matches(JAX_FIX / f["file"], x)


@pytest.mark.slow
@pytest.mark.parametrize("infected", [True, False], ids=["badnets", "clean"])
def test_ncscan_scans_jax_fixture(infected):
    """Issue #5: scanned with no preprocessing arguments (all from metadata), the JAX
    BadNets twin is flagged with its true target and only that; the clean twin is clean."""
    from ncscan import scan

    f = _fixture(infected, JAX_FIX)
    report = scan(JAX_FIX / f["file"], JAX_FIX / f["scan_data"], seed=0)
    print(f"ncscan {f['name']}: verdict={report.verdict} flagged={report.flagged}")
    d = report.to_dict()
    assert d["preprocess"]["pixel_range"] == [0.0, 255.0]
    assert d["preprocess"]["layout"] == "NHWC"
    assert d["preprocess_source"]["pixel_range"] == "metadata"
    if infected:
        assert report.verdict == "backdoor"
        assert list(report.flagged) == f["targets"]
    else:
        assert report.verdict == "clean" and not report.flagged


# ------------------------------------------- the PyTorch path in one step (issue #15 item 3)


def _mnist_net():
    """A 1x28x28 net with a global mean (ReduceMean, which ONNX cannot lower from opset 18)
    and a flatten (a view whose batch torch.export bakes in when traced at batch 1)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 14 * 14 + 4, 10)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            g = h.mean((2, 3))
            return self.fc(torch.cat([nn.functional.max_pool2d(h, 2).flatten(1), g], 1))

    Net.__qualname__ = "_MnistNet"  # picklable by name, like a user's own class
    globals()["_MnistNet"] = Net
    torch.manual_seed(0)
    return torch, Net().eval()


def _run_recipe(message: str, torch, model, path: Path, shape=(1, 28, 28)) -> None:
    """Run the `torch.export.save(...)` line an ncscan message gives, as a user would."""
    import re

    m = re.search(r"torch\.export\.save\(.*?'model\.pt2'\)", message)
    assert m, message
    code = m.group(0).replace("'model.pt2'", repr(str(path)))
    code = code.replace("2, C, H, W", "2, " + ", ".join(map(str, shape)))
    eval(code, {"torch": torch, "model": model})  # our own message, run as a user would
    assert path.exists()


@pytest.mark.adapters
def test_torch_cli_hints_are_recipes_that_work(tmp_path, capsys):
    """Every refusal on the PyTorch path names a recipe; following it, `ncscan export --from
    torch` succeeds, and ncscan scans what it wrote (opset 18 kept without a warning)."""
    pytest.importorskip("onnxscript")
    from ncscan.cli import run

    torch, net = _mnist_net()
    data = str(REPO / "fixtures" / "data" / "mnist" / "scan")
    # 1. a pickled nn.Module is refused with a recipe ...
    pickled = tmp_path / "net.pt"
    torch.save(net, str(pickled))
    assert run(["export", "--from", "torch", str(pickled), "-o", str(tmp_path / "a.onnx")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # ... which, run, gives a program that exports with a dynamic batch
    pt2 = tmp_path / "recipe.pt2"
    _run_recipe(err, torch, net, pt2)
    out = tmp_path / "recipe.onnx"
    assert run(["export", "--from", "torch", str(pt2), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err, err  # opset 18 kept: ncscan converts it, nothing to warn about
    import onnx

    m = onnx.load(str(out))
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    onnx2torch_matches(out, np.random.default_rng(0).uniform(size=(3, 1, 28, 28)))
    # 2. the batch-1 program that torch.export.export(model, (x,)) gives is accepted as is
    b1 = tmp_path / "b1.pt2"
    torch.export.save(torch.export.export(net, (torch.rand(1, 1, 28, 28),)), str(b1))
    out1 = tmp_path / "b1.onnx"
    assert run(["export", "--from", "torch", str(b1), "-o", str(out1)]) == 0
    err = capsys.readouterr().err
    assert "fixed batch of 1" in err
    assert onnx.load(str(out1)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    # 3. a program traced at another fixed batch is refused with a recipe that works
    b3 = tmp_path / "b3.pt2"
    torch.export.save(torch.export.export(net, (torch.rand(3, 1, 28, 28),)), str(b3))
    assert run(["export", "--from", "torch", str(b3), "-o", str(tmp_path / "b3.onnx")]) == 2
    err = capsys.readouterr().err
    assert "fixed batch of 3" in err and "torch.randn(2, 1, 28, 28)" in err
    _run_recipe(err, torch, net, tmp_path / "b3fixed.pt2")
    assert run(["export", "--from", "torch", str(tmp_path / "b3fixed.pt2"), "-o", str(tmp_path / "b3.onnx")]) == 0
    capsys.readouterr()
    # 4. ncscan scans both outputs (an untrained net: --force past the chance-accuracy stop)
    for f in (out, out1):
        rc = run([str(f), "--data", data, "--force", "--max-steps", "1", "--max-images", "60",
                  "--device", "cpu", "-q", "-f", "json"])
        rep = json.loads(capsys.readouterr().out)
        assert rc in (0, 1, 4) and len(rep["labels"]) == 10


# ------------------------------------- TensorFlow and torch in one process (issue #15 item 7)

_TF_THEN_SCAN = r"""
import sys
import tensorflow as tf  # first, as in a Keras user's notebook
import keras
import numpy as np
from ncscan.adapters.keras import to_onnx
import ncscan
from ncscan.reverse import preset
from dataclasses import replace

keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Rescaling(1 / 255),
                          keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.Flatten(),
                          keras.layers.Dense(10)])
out = sys.argv[1] + "/k.onnx"
to_onnx(model, out, preprocess={"pixel_range": (0, 255)})
rep = ncscan.scan(out, sys.argv[2], device="cpu", max_images=40, force=True,
                  schedule=replace(preset("fast"), max_steps=1))
assert len(rep.labels) == 10, rep.labels
from ncscan.adapters.torch_export import to_onnx as torch_to_onnx
import torch
net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()
torch_to_onnx(net, sys.argv[1] + "/t.onnx", input_shape=(1, 28, 28), dynamo=False)
print("SURVIVED", rep.verdict)
"""


@pytest.mark.adapters
def test_tensorflow_imported_first_then_export_and_scan_in_one_process(tmp_path):
    """`import tensorflow` then anything that imports triton (torch._dynamo under onnx2torch,
    torch.onnx) segfaulted; ncscan keeps triton out of such a process."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    data = REPO / "fixtures" / "data" / "mnist" / "scan"
    r = subprocess.run(
        [sys.executable, "-c", _TF_THEN_SCAN, str(tmp_path), str(data)],
        capture_output=True, text=True, check=False, timeout=900,
    )
    assert r.returncode == 0 and "SURVIVED" in r.stdout, (r.returncode, r.stderr[-3000:])


def test_triton_block_only_after_tensorflow():
    """Pure check of the guard, in a fresh interpreter (no framework needed)."""
    code = (
        "import sys; from ncscan.tfcompat import block_triton_after_tensorflow as b; "
        "assert b() is False and 'triton' not in sys.modules; "
        "sys.modules['tensorflow'] = type(sys)('tensorflow'); "
        "assert b() is True and sys.modules['triton'] is None; assert b() is True; "
        "import importlib.util; assert importlib.util.find_spec('triton') is None; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
