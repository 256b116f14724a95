"""The committed ground-truth fixtures (fixtures/manifest.json) are intact and reproduce.

Uses only numpy, onnx, onnxruntime, json and hashlib (plus Pillow to decode the scan PNGs).
Rebuild the fixtures with `python fixtures/build.py` (see fixtures/README.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

FIX = Path(__file__).resolve().parent.parent / "fixtures"
MANIFEST = FIX / "manifest.json"
TOL = 0.01  # one percentage point

# A missing manifest is a broken checkout, not a reason to skip: every test below then fails.
assert MANIFEST.exists(), "fixtures/manifest.json is missing; rebuild with python fixtures/build.py"

_MAN = json.loads(MANIFEST.read_text())
ENTRIES = _MAN["fixtures"]
IDS = [e["name"] for e in ENTRIES]
_TEST_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}
_SESS_CACHE: dict[str, ort.InferenceSession] = {}


def _test_data(rel: str) -> tuple[np.ndarray, np.ndarray]:
    if rel not in _TEST_CACHE:
        z = np.load(FIX / rel)
        x = z["x"]
        assert x.dtype == np.uint8 and x.ndim == 4, (x.dtype, x.shape)
        x01 = x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # NCHW [0,1]
        _TEST_CACHE[rel] = (x01, z["y"].astype(np.int64))
    return _TEST_CACHE[rel]


def _session(e: dict) -> ort.InferenceSession:
    if e["name"] not in _SESS_CACHE:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        _SESS_CACHE[e["name"]] = ort.InferenceSession(
            str(FIX / e["file"]), so, providers=["CPUExecutionProvider"])
    return _SESS_CACHE[e["name"]]


def _model_input(e: dict, x01: np.ndarray) -> np.ndarray:
    pp = e["preprocess"]
    lo, hi = pp["pixel_range"]
    x = lo + x01 * (hi - lo)
    if pp["channel_order"] == "BGR":
        x = x[:, ::-1]
    if pp["mean"] is not None:
        x = x - np.asarray(pp["mean"], np.float32).reshape(1, -1, 1, 1)
    if pp["std"] is not None:
        x = x / np.asarray(pp["std"], np.float32).reshape(1, -1, 1, 1)
    if e["layout"] == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def _predict(e: dict, x01: np.ndarray) -> np.ndarray:
    sess = _session(e)
    name = sess.get_inputs()[0].name
    step = 1 if e["static_batch"] else 1000
    out = [sess.run(None, {name: _model_input(e, x01[i:i + step])})[0] for i in range(0, len(x01), step)]
    return np.concatenate(out)


def _asr(e: dict, trig: dict) -> float:
    x01, y = _test_data(e["test_data"])
    z = np.load(FIX / trig["file"])
    mask, pattern = z["mask"], z["pattern"]
    keep = y != trig["target"]
    xs = (1 - mask) * x01[keep] + mask * pattern
    return float((_predict(e, xs.astype(np.float32)).argmax(1) == trig["target"]).mean())


def test_manifest_schema():
    assert _MAN["version"] == 1
    assert len(ENTRIES) >= 2
    names = [e["name"] for e in ENTRIES]
    assert len(set(names)) == len(names)
    keys = {"name", "file", "sha256", "dataset", "dataset_note", "architecture", "params", "exporter",
            "opset", "ir_version", "onnx2torch_converts", "layout", "input_shape", "static_batch",
            "preprocess", "preprocess_in_metadata", "output", "num_classes", "infected", "attack",
            "targets", "triggers", "reference_triggers", "scan_data", "test_data", "clean_accuracy",
            "seed", "train_seconds"}
    for e in ENTRIES:
        assert keys <= set(e), (e["name"], keys - set(e))
        assert e["exporter"] in ("torch-legacy", "torch-dynamo")
        assert e["layout"] in ("NCHW", "NHWC")
        assert e["output"] in ("logits", "probabilities")
        assert e["attack"] in ("none", "badnets", "trojan")
        assert e["infected"] == (e["attack"] != "none") == bool(e["targets"])
        assert sorted(t["target"] for t in e["triggers"]) == sorted(e["targets"])
        assert e["ir_version"] <= 13
        for t in e["triggers"]:
            z = np.load(FIX / t["file"])
            h, w = z["mask"].shape
            assert z["mask"].dtype == np.float32 and z["pattern"].dtype == np.float32
            assert z["pattern"].shape[1:] == (h, w)
            assert 0 <= z["mask"].min() and z["mask"].max() <= 1
            assert 0 <= z["pattern"].min() and z["pattern"].max() <= 1
            assert abs(float(z["mask"].sum()) - t["mask_l1"]) < 1e-3
            assert t["mask_l1"] < 0.1 * h * w, "triggers must be small"


@pytest.mark.parametrize("e", ENTRIES, ids=IDS)
def test_file_hash_and_checker(e):
    path = FIX / e["file"]
    assert path.exists(), path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.ir_version == e["ir_version"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert bool(any(k.startswith("ncscan.") for k in meta)) == e["preprocess_in_metadata"]
    if e["preprocess_in_metadata"]:
        lo, hi = (float(v) for v in meta["ncscan.pixel_range"].split(","))
        assert [lo, hi] == e["preprocess"]["pixel_range"]
        assert meta["ncscan.layout"] == e["layout"]
        assert len(json.loads(meta["ncscan.class_names"])) == e["num_classes"]


@pytest.mark.parametrize("e", ENTRIES, ids=IDS)
def test_loads_and_shapes(e):
    sess = _session(e)
    inp = sess.get_inputs()[0]
    dims = [d if isinstance(d, int) else None for d in inp.shape]
    assert dims == e["input_shape"]
    assert (dims[0] == 1) == e["static_batch"]
    x01, _ = _test_data(e["test_data"])
    out = _predict(e, x01[:2])
    assert out.shape == (2, e["num_classes"])
    if e["output"] == "probabilities":
        np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-4)


@pytest.mark.parametrize("e", ENTRIES, ids=IDS)
def test_clean_accuracy_reproduces(e):
    x01, y = _test_data(e["test_data"])
    acc = float((_predict(e, x01).argmax(1) == y).mean())
    assert abs(acc - e["clean_accuracy"]) <= TOL, (acc, e["clean_accuracy"])


@pytest.mark.parametrize("e", ENTRIES, ids=IDS)
def test_attack_success_reproduces(e):
    for t in e["triggers"]:
        asr = _asr(e, t)
        assert abs(asr - t["attack_success"]) <= TOL, (t["target"], asr, t["attack_success"])
        assert asr >= 0.95
    for t in e.get("reference_triggers", []):
        asr = _asr(e, t)
        assert abs(asr - t["attack_success"]) <= TOL, (t["target"], asr, t["attack_success"])
        assert not e["infected"] and asr <= 0.2


@pytest.mark.parametrize("rel", sorted({e["scan_data"] for e in ENTRIES}))
def test_scan_folder_layout(rel):
    from PIL import Image

    root = FIX / rel
    nclasses = {e["num_classes"] for e in ENTRIES if e["scan_data"] == rel}
    assert len(nclasses) == 1
    n = nclasses.pop()
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    assert [p.name for p in subdirs] == sorted(str(i) for i in range(n))
    test_x, _ = _test_data(rel.rsplit("/", 1)[0] + "/test.npz")
    chans = test_x.shape[1]
    hashes = set()
    for d in subdirs:
        pngs = sorted(d.glob("*.png"))
        assert len(pngs) >= 5, d
        for p in pngs:
            with Image.open(p) as im:
                im.load()
                assert im.mode == ("L" if chans == 1 else "RGB")
                arr = np.asarray(im)
                assert arr.shape[:2] == test_x.shape[2:]
                hashes.add(hashlib.sha1(arr.tobytes()).hexdigest())
    # scan images are disjoint from the test images
    test_hashes = {hashlib.sha1(np.ascontiguousarray(
        np.round(t * 255).astype(np.uint8).transpose(1, 2, 0).squeeze(-1 if chans == 1 else None)
    ).tobytes()).hexdigest() for t in test_x}
    assert len(hashes & test_hashes) <= 2  # allow rare identical-looking digits
