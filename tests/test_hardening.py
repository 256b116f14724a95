"""Bad models, bad data, bad flags: one clear line, exit 2, nothing damaged (issue #7)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from ncscan.cli import run
from ncscan.data import load_data
from ncscan.errors import DataError, ModelError, NcscanError
from ncscan.model import convert, load_onnx

from . import tiny
from .conftest import entry


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("warning")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def images(workdir: Path) -> Path:
    return tiny.write_images(workdir / "imgs")


def _scan_rc(model: Path, data: Path, *extra: str) -> int:
    return run([str(model), "--data", str(data), "--device", "cpu", "-q", *extra])


# ------------------------------------------------------------------ models


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, b"not an onnx model at all", os.urandom(4096)])
def test_garbage_model(content: bytes, images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = workdir / "m.onnx"
    m.write_bytes(content)
    assert _scan_rc(m, images) == 2
    assert "m.onnx" in _err_line(capsys)


def test_truncated_model(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = Path(entry("mnist_clean")["_abs"]["file"]).read_bytes()
    m = workdir / "t.onnx"
    m.write_bytes(src[: len(src) // 2])
    assert _scan_rc(m, images) == 2
    _err_line(capsys)


def test_model_is_directory(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _scan_rc(workdir, images) == 2
    assert "directory" in _err_line(capsys)


def test_rank2_input(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.graph_with(workdir / "r2.onnx", [("x", TensorProto.FLOAT, ["N", 64])], [("y", TensorProto.FLOAT, ["N", 64])],
                        [helper.make_node("Relu", ["x"], ["y"])])
    assert _scan_rc(m, images) == 2
    assert "rank 2" in _err_line(capsys)


def test_two_inputs(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.graph_with(workdir / "two.onnx",
                        [("a", TensorProto.FLOAT, ["N", 1, 8, 8]), ("b", TensorProto.FLOAT, ["N", 1, 8, 8])],
                        [("y", TensorProto.FLOAT, ["N", 1, 8, 8])], [helper.make_node("Add", ["a", "b"], ["y"])])
    assert _scan_rc(m, images) == 2
    assert "2 inputs" in _err_line(capsys)


def test_integer_input(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.graph_with(workdir / "int.onnx", [("x", TensorProto.INT64, ["N", 1, 8, 8])],
                        [("y", TensorProto.INT64, ["N", 1, 8, 8])], [helper.make_node("Identity", ["x"], ["y"])])
    assert _scan_rc(m, images) == 2
    assert "not a float" in _err_line(capsys)


def test_output_not_class_scores(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.graph_with(workdir / "seg.onnx", [("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                        [("y", TensorProto.FLOAT, ["N", 1, 8, 8])], [helper.make_node("Relu", ["x"], ["y"])])
    assert _scan_rc(m, images) == 2
    assert "[N, classes]" in _err_line(capsys)


def test_all_unsupported_ops_listed_at_once(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nodes = [
        helper.make_node("Frobnicate", ["x"], ["a"], domain="com.example"),
        helper.make_node("Wobble", ["a"], ["b"], domain="com.example"),
        helper.make_node("Flatten", ["b"], ["f"]),
        helper.make_node("ReduceMean", ["f"], ["y"], axes=[1], keepdims=1),
    ]
    m = tiny.graph_with(workdir / "ops.onnx", [("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                        [("y", TensorProto.FLOAT, ["N", 1])], nodes, domain_ops=[("com.example", 1)])
    om = onnx.load(str(m))
    om.ir_version = 8
    onnx.save(om, str(m))
    assert _scan_rc(m, images) == 2
    line = _err_line(capsys)
    assert "Frobnicate" in line and "Wobble" in line


def test_missing_external_data(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.linear_classifier(workdir / "ext.onnx")
    model = onnx.load(str(m))
    onnx.save_model(model, str(m), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    os.remove(workdir / "ext.onnx.data")
    assert _scan_rc(m, images) == 2
    assert "ext.onnx.data" in _err_line(capsys)


def test_external_data_model_loads(workdir: Path) -> None:
    m = tiny.linear_classifier(workdir / "ext2.onnx")
    model = onnx.load(str(m))
    onnx.save_model(model, str(m), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext2.onnx.data", size_threshold=0)
    om = load_onnx(m)
    assert om.has_external_data and om.input.channels == 1


def test_nan_model(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.linear_classifier(workdir / "nan.onnx", nan=True)
    assert _scan_rc(m, images) == 2
    assert "NaN" in _err_line(capsys)


def test_one_class_model(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.linear_classifier(workdir / "one.onnx", classes=1)
    assert _scan_rc(m, images) == 2
    assert "at least 2" in _err_line(capsys)


def test_static_batch_and_softmax_model_scans(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.linear_classifier(workdir / "b1.onnx", batch=1, softmax=True, classes=4)
    out = workdir / "r.json"
    rc = _scan_rc(m, images, "--max-steps", "3", "-o", str(out), "--labels", str(_labels(workdir, 4)))
    assert rc in (0, 1, 4)
    rep = json.loads(out.read_text())
    assert rep["output"] == "probabilities" and len(rep["labels"]) == 4


def _labels(d: Path, n: int) -> Path:
    p = d / "labels.txt"
    p.write_text("\n".join(str(i) for i in range(n)) + "\n")
    return p


def test_same_seed_same_result(images: Path, workdir: Path) -> None:
    m = tiny.linear_classifier(workdir / "det.onnx")
    outs = []
    for k in range(2):
        o = workdir / f"r{k}.json"
        _scan_rc(m, images, "--max-steps", "8", "-o", str(o), "--seed", "3")
        outs.append([(lab["label"], lab["mask_l1"]) for lab in json.loads(o.read_text())["labels"]])
    assert outs[0] == outs[1]


# ------------------------------------------------------------------ data


def test_empty_folder(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.linear_classifier(workdir / "m.onnx")
    (workdir / "empty").mkdir()
    assert _scan_rc(m, workdir / "empty") == 2
    assert "no images" in _err_line(capsys)


def test_folder_of_non_images(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.linear_classifier(workdir / "m.onnx")
    d = workdir / "txt"
    d.mkdir()
    for i in range(5):
        (d / f"{i}.txt").write_text("hello")
    assert _scan_rc(m, d) == 2
    _err_line(capsys)


def test_corrupt_images_skipped_with_count(workdir: Path) -> None:
    d = tiny.write_images(workdir / "imgs", n=15)
    (d / "0" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(50))
    good = (d / "1" / "1.png").read_bytes()
    (d / "1" / "trunc.png").write_bytes(good[: len(good) // 2])
    ds = load_data(d, channels=1, size=(8, 8))
    assert len(ds) == 15 and ds.skipped == 2
    assert any("skipped 2" in w for w in ds.warnings)


def test_too_few_images_says_how_many(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.linear_classifier(workdir / "m.onnx")
    d = tiny.write_images(workdir / "few", n=3)
    assert _scan_rc(m, d) == 2
    assert "at least 10" in _err_line(capsys)


def test_class_folders_beyond_model_outputs(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.linear_classifier(workdir / "m.onnx", classes=3)
    d = tiny.write_images(workdir / "many", n=20, classes=5)
    assert _scan_rc(m, d) == 2
    line = _err_line(capsys)
    assert "3 outputs" in line and "--labels" in line


def test_mixed_sizes_modes_and_16bit(workdir: Path) -> None:
    from PIL import Image

    d = workdir / "mix"
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8), "L").save(d / "a.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(d / "b.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA").save(d / "c.png")
    Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16)).save(d / "d.png")
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8), "RGB").save(d / "e.jpg")
    for ch in (1, 3):
        ds = load_data(d, channels=ch, size=(8, 8), min_images=1)
        assert ds.x.shape == (5, 8, 8, ch) and ds.x.dtype == np.uint8
        assert ds.y is None
        assert any("resized" in w for w in ds.warnings)


@pytest.mark.parametrize(
    "arrays, needle",
    [
        ({"images": np.zeros((12, 8, 8), np.uint8)}, "'x'"),
        ({"x": np.zeros((12, 8, 8), np.int32)}, "dtype"),
        ({"x": np.full((12, 8, 8), 3.0, np.float32)}, "[0,1]"),
        ({"x": np.zeros((12, 8, 8), np.uint8), "y": np.zeros(5, np.int64)}, "labels"),
        ({"x": np.zeros((12, 8), np.uint8)}, "shape"),
    ],
)
def test_bad_npz(arrays: dict, needle: str, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.linear_classifier(workdir / "m.onnx")
    p = workdir / "d.npz"
    np.savez(p, **arrays)
    assert _scan_rc(m, p) == 2
    assert needle in _err_line(capsys)


def test_symlink_loop_does_not_hang(workdir: Path) -> None:
    d = tiny.write_images(workdir / "loop", n=12)
    os.symlink(d, d / "0" / "again")
    ds = load_data(d, channels=1, size=(8, 8))
    assert len(ds) == 12


def test_labels_file_maps_names(workdir: Path) -> None:
    from PIL import Image

    d = workdir / "named"
    for name in ("cat", "dog"):
        (d / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / name / f"{i}.png")
    lab = workdir / "labels.json"
    lab.write_text(json.dumps({"dog": 0, "cat": 2}))
    ds = load_data(d, channels=1, size=(8, 8), labels_file=lab)
    assert sorted(set(ds.y.tolist())) == [0, 2]


# ------------------------------------------------------------------ flags / outputs


def test_output_in_readonly_dir(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ro = workdir / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    m = tiny.linear_classifier(workdir / "m.onnx")
    assert _scan_rc(m, images, "-o", str(ro / "r.json")) == 2
    assert "not writable" in _err_line(capsys)


def test_contradictory_flags(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.linear_classifier(workdir / "m.onnx")
    assert _scan_rc(m, images, "--bgr") == 2
    assert "--bgr" in _err_line(capsys)
    assert _scan_rc(m, images, "--std", "0,1") == 2
    _err_line(capsys)


def test_bad_config_file(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.linear_classifier(workdir / "m.onnx")
    cfg = workdir / "c.json"
    cfg.write_text(json.dumps({"learning_rate": 1}))
    assert _scan_rc(m, images, "--config", str(cfg)) == 2
    assert "learning_rate" in _err_line(capsys)


# ------------------------------------------------------------------ fuzz (bounded)


_VALID: bytes | None = None


def _valid_bytes(tmp: Path) -> bytes:
    global _VALID
    if _VALID is None:
        _VALID = tiny.linear_classifier(tmp / "fuzz_base.onnx").read_bytes()
    return _VALID


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_model_loader(data: st.DataObject, tmp_path: Path) -> None:
    base = bytearray(_valid_bytes(tmp_path))
    n = data.draw(st.integers(0, 8))
    for _ in range(n):
        i = data.draw(st.integers(0, len(base) - 1))
        base[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(base)))
    p = tmp_path / "f.onnx"
    p.write_bytes(bytes(base[:cut]))
    try:
        om = load_onnx(p)
        convert(om)
    except NcscanError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(min_size=0, max_size=600), ext=st.sampled_from([".png", ".jpg", ".bmp", ".gif"]))
def test_fuzz_image_loader(blob: bytes, ext: str, tmp_path: Path) -> None:
    d = tmp_path / "fz"
    if not d.exists():
        tiny.write_images(d, n=12)
    (d / "0" / f"fuzz{ext}").write_bytes(blob)
    try:
        ds = load_data(d, channels=3, size=(8, 8))
        assert ds.x.shape[1:] == (8, 8, 3)
    except DataError:
        pass


_ = (ModelError,)
