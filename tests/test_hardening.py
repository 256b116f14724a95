"""Bad models, bad data, bad flags: one clear line, exit 2, nothing damaged (issue #7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from ncscan import model as ncmodel
from ncscan.cli import run
from ncscan.data import load_data
from ncscan.errors import ConversionMismatchError, DataError, ModelError, NcscanError
from ncscan.model import check_parity, convert, load_onnx, ort_run, ort_session

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
    # --force: a random tiny model on random images classifies at chance, which ncscan
    # otherwise refuses to scan (exit 2); these tests check the plumbing, not verdicts.
    return run([str(model), "--data", str(data), "--device", "cpu", "-q", "--force", *extra])


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


def test_float16_input_refused_with_fix(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.graph_with(workdir / "half.onnx", [("x", TensorProto.FLOAT16, ["N", 1, 8, 8])],
                        [("y", TensorProto.FLOAT16, ["N", 64])],
                        [helper.make_node("Flatten", ["x"], ["y"])])
    assert _scan_rc(m, images) == 2
    line = _err_line(capsys)
    assert "float16" in line and "float32" in line


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


def _resize_classifier(path: Path, ctm: str) -> Path:
    """Resize(linear, x2, coordinate_transformation_mode=ctm) -> Flatten -> Gemm over 1x8x8.

    onnx2torch maps linear Resize to F.interpolate(align_corners=ctm == "align_corners"),
    i.e. half-pixel sampling, for every mode but align_corners: "asymmetric" is genuinely
    computed differently from onnxruntime (it only warns that results "might differ").
    """
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="linear", coordinate_transformation_mode=ctm),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "W", "b"], ["y"], transB=1),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array(rng.normal(size=(3, 256)).astype(np.float32), "W"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b"),
    ]
    return tiny.graph_with(path, [("x", TensorProto.FLOAT, ["N", 1, 8, 8])], [("y", TensorProto.FLOAT, ["N", 3])], nodes, inits)


def test_resize_converters_parity_is_measured(workdir: Path) -> None:
    """The premise of the next test, measured: asymmetric differs, align_corners agrees."""
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    for ctm, agrees in (("asymmetric", False), ("align_corners", True)):
        om = load_onnx(_resize_classifier(workdir / f"{ctm}.onnx", ctm))
        net = convert(om)
        sess = ort_session(om)

        def ort_fn(a: np.ndarray, sess: object = sess, om: ncmodel.OnnxModel = om) -> np.ndarray:
            return ort_run(sess, om, a)

        if agrees:
            assert check_parity(net, ort_fn, x).max_rel < 1e-5
        else:
            with pytest.raises(ConversionMismatchError):
                check_parity(net, ort_fn, x)
            assert any("asymmetric" in n for n in om.conversion_notes)


def test_conversion_mismatch_refused(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = _resize_classifier(workdir / "resize.onnx", "asymmetric")
    before = m.read_bytes()
    out = workdir / "r.json"
    assert _scan_rc(m, images, "-o", str(out)) == 2
    line = _err_line(capsys)  # onnx2torch's own UserWarning must not leak onto stderr
    assert line.startswith("ncscan: error: the torch conversion disagrees with onnxruntime")
    assert "max relative difference" in line and "re-export" in line
    assert not out.exists() and m.read_bytes() == before
    assert _scan_rc(m, images, "--debug") == 2
    assert "ConversionMismatchError" in capsys.readouterr().err


def _external_classifier(d: Path, rows: int, ir_version: int = 8) -> Path:
    """Flatten -> Gemm classifier plus a [rows, 3] float table in an external file whose
    row 0 is added to the logits (Gather), so every byte is reachable from the output.
    The table file is written sparse: only row 0 holds data, the rest are zero holes."""
    rng = np.random.default_rng(0)
    table = TensorProto(name="T", data_type=TensorProto.FLOAT, dims=[rows, 3])
    table.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "big.onnx.data"), ("offset", "0"), ("length", str(rows * 12))):
        table.external_data.add(key=k, value=v)
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "W", "b"], ["l"], transB=1),
        helper.make_node("Gather", ["T", "i"], ["g"], axis=0),
        helper.make_node("Add", ["l", "g"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(rng.normal(size=(3, 64)).astype(np.float32), "W"),
         numpy_helper.from_array(np.zeros(3, np.float32), "b"), table,
         numpy_helper.from_array(np.array([0], np.int64), "i")],
    )
    p = d / "big.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=ir_version), str(p))
    with open(d / "big.onnx.data", "wb") as f:
        f.write(np.array([3.0, -3.0, 1.0], np.float32).tobytes())
        f.truncate(rows * 12)
    return p


def _stage_dirs() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("ncscan-model-")}


@pytest.mark.parametrize("ir_version", [8, 14])
def test_weights_on_disk_path_scans(ir_version: int, images: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The >2 GB code path on a small model: the proto keeps only the graph, conversion and
    onnxruntime read the weights from the files (IR 14 is also clamped for onnxruntime)."""
    monkeypatch.setattr(ncmodel, "PROTO_LIMIT", 0)
    d = workdir / "m"
    d.mkdir()
    m = _external_classifier(d, rows=1000, ir_version=ir_version)
    om = load_onnx(m)
    assert om.weights_on_disk and om.has_external_data
    t = next(t for t in om.proto.graph.initializer if t.name == "T")
    assert t.data_location == TensorProto.EXTERNAL and not t.raw_data  # not read into the proto
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    stages = _stage_dirs()
    out = workdir / "r.json"
    assert _scan_rc(m, images, "--max-steps", "3", "-o", str(out)) in (0, 1, 4)
    rep = json.loads(out.read_text())
    assert rep["conversion_parity"]["max_rel"] < 1e-4 and len(rep["labels"]) == 3
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before
    assert _stage_dirs() == stages  # the staged copy is gone


def test_truncated_external_data(images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = _external_classifier(workdir, rows=1000)
    with open(workdir / "big.onnx.data", "r+b") as f:
        f.truncate(500)
    assert _scan_rc(m, images) == 2
    line = _err_line(capsys)
    assert "big.onnx.data" in line and "shorter" in line


@pytest.mark.slow
def test_model_over_2gb_external_data_scans(workdir: Path) -> None:
    """A real >2 GiB model (sparse data file: cheap on disk until staged). Measured on 2 cores:
    about 50 s and 7.2 GB peak RSS (onnx2torch holds the weights ~3x while converting)."""
    import subprocess
    import sys

    d = workdir / "big"
    d.mkdir()
    rows = (2**31 + 2**24) // 12  # 2.16 GB of float32
    m = _external_classifier(d, rows=rows)
    imgs = tiny.write_images(workdir / "imgs")
    out = workdir / "r.json"
    try:
        stages = _stage_dirs()
        r = subprocess.run(
            [sys.executable, "-m", "ncscan", str(m), "--data", str(imgs), "--device", "cpu", "-q",
             "--max-steps", "3", "--force", "-o", str(out)],  # random weights on random images
            check=False, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert r.returncode in (0, 1, 4), r.stderr
        assert "Traceback" not in r.stderr
        rep = json.loads(out.read_text())
        assert rep["conversion_parity"]["max_rel"] < 1e-4 and len(rep["labels"]) == 3
        assert _stage_dirs() == stages
        assert (d / "big.onnx.data").stat().st_size == rows * 12
    finally:
        for f in d.iterdir():
            f.unlink()


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
    rc = _scan_rc(m, images, "--max-steps", "3", "-o", str(out), "--labels-file", str(_labels(workdir, 4)))
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


def _bilevel_png(path: Path, w: int, h: int) -> Path:
    """A valid 1-bit greyscale PNG of w x h, written row by row: a few KB on disk however
    many pixels it claims (the shape of a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (w + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_decompression_bombs_skipped_with_count(workdir: Path) -> None:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    d = tiny.write_images(workdir / "imgs", n=12)
    _bilevel_png(d / "0" / "bomb.png", 20000, 20000)  # 400 Mpx: above PIL's own hard limit
    _bilevel_png(d / "1" / "big.png", 9000, 8000)  # 72 Mpx: above ncscan's 64 Mpx, below PIL's
    assert (d / "0" / "bomb.png").stat().st_size < 100_000
    # The high-water mark of a FRESH process (this one's may already be higher than any load):
    # decoding the 72 Mpx image alone would add >= 72 MB; the 12 small images add ~nothing.
    code = (
        "import resource, sys\nfrom ncscan.data import load_data\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"load_data({str(d)!r}, channels=3, size=(8, 8))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    assert int(p.stdout.split()[-1]) < 40_000, p.stdout  # KB: nothing big was decoded
    ds = load_data(d, channels=3, size=(8, 8))
    assert len(ds) == 12 and ds.skipped == 2
    assert any("skipped 2 image(s) over 64 megapixels" in w for w in ds.warnings)
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's global is left alone


def test_bombs_among_good_images_scan_with_warning(workdir: Path) -> None:
    m = tiny.linear_classifier(workdir / "m.onnx")
    d = tiny.write_images(workdir / "imgs", n=12)
    _bilevel_png(d / "2" / "bomb.png", 20000, 20000)
    out = workdir / "r.json"
    assert _scan_rc(m, d, "--max-steps", "3", "-o", str(out)) in (0, 1, 4)
    assert any("megapixels" in w and "bomb.png" in w for w in json.loads(out.read_text())["warnings"])


def test_only_huge_images(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny.linear_classifier(workdir / "m.onnx")
    d = workdir / "huge"
    d.mkdir()
    for i in range(3):
        _bilevel_png(d / f"{i}.png", 20000, 20000)
    assert _scan_rc(m, d) == 2
    line = _err_line(capsys)
    assert "all 3 images" in line and "megapixels" in line and "downscale" in line


def test_large_legal_image_resized_with_warning(workdir: Path) -> None:
    from PIL import Image

    d = tiny.write_images(workdir / "imgs", n=12)
    ramp = np.tile(np.linspace(0, 255, 4000).astype(np.uint8), (3000, 1))
    Image.fromarray(np.stack([ramp] * 3, 2), "RGB").save(d / "0" / "photo.jpg", quality=90)
    Image.fromarray(ramp, "L").save(d / "1" / "scan.png")
    ds = load_data(d, channels=1, size=(8, 8))
    assert len(ds) == 14 and ds.x.shape == (14, 8, 8, 1) and ds.skipped == 0
    assert any("resized 2 image(s)" in w for w in ds.warnings)
    # a horizontal ramp stays a ramp after the downscale
    k = int(np.nonzero(ds.y == 1)[0][-1])
    assert ds.x[k, 4, 0, 0] < 40 and ds.x[k, 4, 7, 0] > 215


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
    assert "0..2" in line and "--labels" in line


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
        ({"x": np.zeros((12, 8, 8), np.uint8), "y": np.full(12, -1, np.int64)}, "-1..-1"),
        ({"x": np.zeros((12, 8, 8), np.uint8), "y": np.arange(12, dtype=np.int64)}, "fix its 'y'"),
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


def test_device_cuda_without_gpu_subprocess(images: Path, workdir: Path) -> None:
    """--device cuda where torch sees no GPU, hidden with CUDA_VISIBLE_DEVICES so this also
    runs on GPU machines (tests/test_cli.py covers an unknown --device): exit 2, one line."""
    import subprocess
    import sys

    m = tiny.linear_classifier(workdir / "m.onnx")
    out = workdir / "r.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "ncscan", str(m), "--data", str(images), "--device", "cuda",
                        "-o", str(out)], check=False, capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == "ncscan: error: --device cuda: no CUDA GPU is visible to torch; use --device cpu or auto"
    assert not out.exists()


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


def test_internal_error_is_exit_3_one_line(
    images: Path, workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug must never exit 1 (which means "backdoor") or print a traceback without --debug."""
    import ncscan.scanner

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(ncscan.scanner, "scan", boom)
    m = tiny.linear_classifier(workdir / "m.onnx")
    assert _scan_rc(m, images) == 3
    line = _err_line(capsys)
    assert "internal error" in line and "simulated bug" in line and "--debug" in line


def test_five_dim_weight_scans(images: Path, workdir: Path) -> None:
    """A parameter that is not 4-D cannot be channels_last; the scan falls back to NCHW."""
    import torch

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.g = torch.nn.Parameter(torch.rand(1, 2, 2, 1, 1) + 0.5)
            self.fc = torch.nn.Linear(4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = torch.relu(self.conv(x))
            n, c, h, w = z.shape
            z = (z.reshape(n, 2, 2, h, w) * self.g).reshape(n, c, h, w)
            return self.fc(z.mean((2, 3)))

    path = workdir / "five_d.onnx"
    torch.onnx.export(
        M().eval(), torch.rand(2, 1, 8, 8), str(path), dynamo=False, opset_version=17,
        input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
    )
    assert _scan_rc(path, images, "--max-steps", "2", "--exit-zero") == 0


@pytest.mark.parametrize("target", ["weights", "image", "folder", "triggers-in-data"])
def test_outputs_never_land_on_inputs(
    target: str, images: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """-o / --triggers must not overwrite a model's weights file or an input image, nor write
    into the data folder (the next scan would read it)."""
    m = tiny.linear_classifier(workdir / "ext.onnx")
    onnx.save_model(onnx.load(str(m)), str(m), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    first_image = sorted(p for p in images.rglob("*.png"))[0]
    before = {p: p.read_bytes() for p in [workdir / "weights.bin", first_image]}
    extra = {
        "weights": ["-o", str(workdir / "weights.bin")],
        "image": ["-o", str(first_image)],
        "folder": ["-o", str(images / "report.png")],
        "triggers-in-data": ["--triggers", str(images / "trig")],
    }[target]
    assert _scan_rc(m, images, *extra) == 2
    line = _err_line(capsys)
    assert ("weights file" in line) if target == "weights" else ("data folder" in line)
    assert all(p.read_bytes() == b for p, b in before.items())
    assert not (images / "report.png").exists() and not (images / "trig").exists()


def test_shared_weights_from_torchscript_export_scan(images: Path, workdir: Path) -> None:
    """torch's TorchScript exporter shares identical initializers (here two all-zero biases)
    through Identity nodes, which onnx2torch alone cannot convert."""
    import torch

    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10),
    ).eval()
    with torch.no_grad():
        net[0].bias.zero_()
        net[2].bias.zero_()
    path = workdir / "shared.onnx"
    torch.onnx.export(net, torch.rand(2, 1, 8, 8), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    assert any(n.op_type == "Identity" for n in onnx.load(str(path)).graph.node)
    assert _scan_rc(path, images, "--max-steps", "2", "--exit-zero") == 0


def test_images_beside_class_folders_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    d = tiny.write_images(workdir / "mixed", n=12, classes=2)
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(d / f"top{i}.png")
    m = tiny.linear_classifier(workdir / "m.onnx")
    assert _scan_rc(m, d) == 2
    line = _err_line(capsys)
    assert "top level" in line and "class folder" in line


def test_class_folder_without_direct_images_warns(workdir: Path) -> None:
    d = tiny.write_images(workdir / "nested", n=12, classes=3)
    (d / "0").rename(d / "zero_tmp")
    (d / "0").mkdir()
    (d / "zero_tmp").rename(d / "0" / "sub")
    ds = load_data(d, channels=1, size=(8, 8), min_images=1)
    assert 0 not in set(ds.y.tolist())
    assert any("nested folders are not read" in w for w in ds.warnings)
