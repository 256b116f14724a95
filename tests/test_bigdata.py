"""Real-size inputs (issue 17): ImageNet-style resizing, the --max-images cut before decoding,
load progress, readable output for many labels, trigger PNGs sized for the input, and the
activation-memory plan (probe, split passes, forward batches, peaks in the report)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.tiny import linear_classifier, save, write_images

# ------------------------------------------------------------------ data: resize


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image with a bright square at its centre (so a crop that is not centred,
    or a squash, is visible)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), rng.integers(0, 60, (h, w))], 2)
    cy, cx, r = h // 2, w // 2, min(h, w) // 8
    img[cy - r : cy + r, cx - r : cx + r] = 255
    return img.astype(np.uint8)


@pytest.mark.parametrize(("h", "w", "side"), [(300, 200, 224), (200, 300, 224), (50, 80, 28), (28, 28, 28), (20, 30, 28)])
def test_shorter_crop_matches_torchvision_eval_transform(h: int, w: int, side: int) -> None:
    from PIL import Image
    from torchvision.transforms import functional as TF

    from ncscan.data import fit_image

    img = _photo(h, w)
    ref = np.asarray(TF.center_crop(TF.resize(Image.fromarray(img), side, interpolation=TF.InterpolationMode.BILINEAR), [side, side]))
    got = fit_image(img, side, side, "shorter-crop")
    assert got.shape == (side, side, 3)
    # PIL resizes per channel here and per image in torchvision: the same filter
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    if h != w:
        squash = fit_image(img, side, side, "squash")
        assert np.abs(squash.astype(int) - ref.astype(int)).max() > 20  # the modes differ


def test_resize_mode_is_checked() -> None:
    from ncscan.data import load_data
    from ncscan.errors import ConfigError

    with pytest.raises(ConfigError, match="--resize must be squash or shorter-crop"):
        load_data(".", channels=1, size=(8, 8), resize="crop")


def test_resize_from_metadata() -> None:
    from ncscan.errors import ConfigError
    from ncscan.preprocess import META_RESIZE, resize_from_metadata

    assert META_RESIZE == "ncscan.resize"
    assert resize_from_metadata({}) is None
    assert resize_from_metadata({META_RESIZE: " Shorter-Crop "}) == "shorter-crop"
    with pytest.raises(ConfigError, match="ncscan.resize.*--resize"):
        resize_from_metadata({META_RESIZE: "stretch"})


def _rgb_folder(d: Path, n: int, classes: int, h: int, w: int) -> Path:
    from PIL import Image

    for i in range(n):
        cd = d / str(i % classes)
        cd.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(h, w, seed=i)).save(cd / f"{i:04d}.png")
    return d


def test_folder_shorter_crop_and_squash(tmp_path: Path) -> None:
    from ncscan.data import fit_image, load_data

    d = _rgb_folder(tmp_path / "imgs", 10, 2, 40, 60)
    crop = load_data(d, channels=3, size=(28, 28), resize="shorter-crop")
    squash = load_data(d, channels=3, size=(28, 28))
    assert crop.x.shape == squash.x.shape == (10, 28, 28, 3)
    from PIL import Image

    first = np.asarray(Image.open(d / "0" / "0000.png"))
    assert np.array_equal(crop.x[0], fit_image(first, 28, 28, "shorter-crop"))
    assert np.array_equal(squash.x[0], fit_image(first, 28, 28, "squash"))
    assert not np.array_equal(crop.x, squash.x)
    assert any("centre crop" in w for w in crop.warnings)
    assert not any("centre crop" in w for w in squash.warnings)


def test_npz_shorter_crop(tmp_path: Path) -> None:
    from ncscan.data import fit_image, load_data

    x = np.stack([_photo(40, 60, seed=i) for i in range(12)])
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(12) % 3)
    ds = load_data(tmp_path / "d.npz", channels=3, size=(28, 28), resize="shorter-crop")
    assert np.array_equal(ds.x[5], fit_image(x[5], 28, 28, "shorter-crop"))


# ------------------------------------------------------------------ data: cut before decoding


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from ncscan import data

    seen: list[str] = []
    real = data._read_image

    def counting(path: Path, channels: int) -> np.ndarray:
        seen.append(path.name)
        return real(path, channels)

    monkeypatch.setattr(data, "_read_image", counting)
    return seen


def test_max_images_cut_before_decoding_same_subset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ncscan.data import load_data, subset_indices

    d = write_images(tmp_path / "imgs", n=60, size=8, classes=3)
    full = load_data(d, channels=1, size=(8, 8))  # every image, as before the cut moved
    seen = _count_decodes(monkeypatch)
    calls: list[tuple[int, int]] = []
    ds = load_data(d, channels=1, size=(8, 8), max_images=12, seed=5, progress=lambda a, b: calls.append((a, b)))
    assert len(seen) == 12  # only the images used were decoded
    assert full.y is not None and ds.y is not None
    idx = subset_indices(full.y, len(full), 12, 5)  # the subset the old order (decode, then cut) gave
    assert np.array_equal(ds.x, full.x[idx]) and np.array_equal(ds.y, full.y[idx])
    assert np.bincount(ds.y).tolist() == [4, 4, 4]
    assert calls == [(i, 12) for i in range(1, 13)]
    again = load_data(d, channels=1, size=(8, 8), max_images=12, seed=5)
    assert np.array_equal(again.x, ds.x)  # deterministic under the seed


def test_unreadable_pick_is_replaced_from_its_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ncscan.data import load_data, subset_indices

    d = write_images(tmp_path / "imgs", n=60, size=8, classes=3)
    files = sorted((p for p in d.rglob("*.png")), key=lambda p: (p.parent.name, p.name))
    y = np.array([int(p.parent.name) for p in files])
    picked = subset_indices(y, len(files), 12, 0)
    broken = [files[i] for i in picked[:3]]
    for p in broken:
        p.write_bytes(b"not a png")
    seen = _count_decodes(monkeypatch)
    ds = load_data(d, channels=1, size=(8, 8), max_images=12, seed=0)
    assert len(ds) == 12 and len(seen) == 15
    assert ds.y is not None and np.bincount(ds.y).tolist() == [4, 4, 4]
    assert ds.skipped == 3 and any("unreadable" in w for w in ds.warnings)


def test_cut_of_a_large_folder_decodes_only_the_subset(tmp_path: Path) -> None:
    """2,000 files, 50 used: loading the 50 takes less time than loading all."""
    import time

    from ncscan.data import load_data

    d = write_images(tmp_path / "imgs", n=2000, size=8, classes=10)
    t = time.perf_counter()
    few = load_data(d, channels=1, size=(8, 8), max_images=50)
    t_few = time.perf_counter() - t
    t = time.perf_counter()
    load_data(d, channels=1, size=(8, 8))
    t_all = time.perf_counter() - t
    assert len(few) == 50
    assert t_few < t_all


# ------------------------------------------------------------------ metadata through prepare


def _with_meta(path: Path, **meta: str) -> Path:
    import onnx

    m = onnx.load(str(path))
    for k, v in meta.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    return save(m, path)


def test_prepare_reads_resize_from_metadata_and_flag_overrides(tmp_path: Path) -> None:
    from ncscan.data import fit_image
    from ncscan.inputs import InputOptions
    from ncscan.scanner import prepare

    model = _with_meta(linear_classifier(tmp_path / "m.onnx", c=3, h=28, w=28, classes=2),
                       **{"ncscan.resize": "shorter-crop"})
    d = _rgb_folder(tmp_path / "imgs", 12, 2, 40, 60)
    loads: list[tuple[int, int]] = []
    prep = prepare(model, d, device="cpu", force=True, load_progress=lambda a, b: loads.append((a, b)))
    assert prep.resize == {"mode": "shorter-crop", "source": "metadata"}
    from PIL import Image

    first = np.asarray(Image.open(d / "0" / "0000.png"))
    assert np.array_equal(prep.data.x[0], fit_image(first, 28, 28, "shorter-crop"))
    assert loads[-1] == (12, 12)
    flagged = prepare(model, d, device="cpu", force=True, inputs=InputOptions(resize="squash"))
    assert flagged.resize == {"mode": "squash", "source": "flag"}
    assert any("--resize squash overrides the model's own metadata ncscan.resize" in w for w in flagged.warnings)
    plain = prepare(linear_classifier(tmp_path / "p.onnx", c=3, h=28, w=28, classes=2), d, device="cpu", force=True)
    assert plain.resize == {"mode": "squash", "source": "default"}


# ------------------------------------------------------------------ output for many labels


@pytest.fixture(scope="module")
def small_report(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real (tiny, forced) scan of a 5-class linear model: the template for bigger reports."""
    from ncscan.reverse import preset
    from ncscan.scanner import scan

    tmp = tmp_path_factory.mktemp("rep")
    model = linear_classifier(tmp / "m.onnx", c=1, h=8, w=8, classes=5)
    d = write_images(tmp / "imgs", n=20, size=8, classes=5)
    cfg = dataclasses.replace(preset("fast"), max_steps=2)
    return scan(model, d, device="cpu", schedule=cfg, force=True, decision=None)


def _many(report: Any, k: int, side: int = 8) -> Any:
    """`report` grown to k labels with sizes spread out; label 3 flagged, 7 borderline,
    11 without a working trigger, the rest clear."""
    from ncscan.trigger import Trigger

    base = report.labels[0]
    rng = np.random.default_rng(0)
    labels = []
    for i in range(k):
        dec = {3: "flagged", 7: "borderline", 11: "no_trigger"}.get(i, "clear")
        l1 = {3: 1.0, 7: 2.0}.get(i, float(10 + rng.random() * 50))
        trig = Trigger(mask=np.full((side, side), 0.1, np.float32), pattern=np.full((3, side, side), 0.5, np.float32))
        labels.append(dataclasses.replace(
            base, label=i, name=None, mask_l1=l1, decision=dec, flagged=dec == "flagged",
            working=dec != "no_trigger", score=float(4.0 if i == 3 else 3.1 if i == 7 else -np.log(l1 / 30)),
            screened_out=False, trigger=trig,
        ))
    return dataclasses.replace(report, labels=labels, num_classes=k, flagged=[3], borderline=[7],
                               verdict="backdoor", margin=0.7, reasons=[])


def test_few_labels_show_every_row(small_report: Any) -> None:
    from ncscan.report import ALL_LABELS_MAX, select_labels

    rep = _many(small_report, ALL_LABELS_MAX)
    assert len(select_labels(rep)) == ALL_LABELS_MAX


def test_thousand_labels_table_is_short(small_report: Any) -> None:
    from rich.console import Console

    from ncscan.report import TOP_SUSPECTS, render_table, select_labels

    rep = _many(small_report, 1000)
    shown = select_labels(rep)
    labs = [r.label for r in shown]
    assert 3 in labs and 7 in labs and 11 in labs
    smallest_clear = sorted((r for r in rep.labels if r.decision == "clear"), key=lambda r: r.mask_l1)[:TOP_SUSPECTS]
    assert {r.label for r in smallest_clear} <= set(labs)
    assert len(shown) == 3 + TOP_SUSPECTS
    assert [r.mask_l1 for r in shown] == sorted(r.mask_l1 for r in shown)

    import io

    buf = io.StringIO()
    render_table(rep, Console(file=buf, width=120, color_system=None))
    text = buf.getvalue()
    assert "987 more label(s) not shown (987 clear" in text and "--all-labels" in text
    assert text.count("\n") < 80  # not 1,000 rows
    buf = io.StringIO()
    render_table(rep, Console(file=buf, width=120, color_system=None), all_labels=True)
    assert buf.getvalue().count("\n") > 1000


def test_json_keeps_every_label(small_report: Any) -> None:
    from ncscan.report import report_json

    rep = _many(small_report, 1000)
    assert len(json.loads(report_json(rep))["labels"]) == 1000


@pytest.mark.parametrize(("side", "scale"), [(8, 28), (28, 8), (32, 7), (64, 3), (112, 2), (224, 1), (384, 1)])
def test_png_scale(side: int, scale: int) -> None:
    from ncscan.report import png_scale

    assert png_scale(side, side) == scale


@pytest.mark.parametrize(("side", "png"), [(28, 224), (224, 224)])
def test_trigger_pngs_sized_for_the_input_and_only_suspects(small_report: Any, tmp_path: Path, side: int, png: int) -> None:
    from PIL import Image

    from ncscan.report import TOP_SUSPECTS, write_triggers

    rep = _many(small_report, 1000, side=side)
    write_triggers(rep, tmp_path / "t")
    pngs = sorted((tmp_path / "t").glob("label_*_trigger.png"))
    assert len(pngs) == 3 + TOP_SUSPECTS
    with Image.open(tmp_path / "t" / "label_3_trigger.png") as im:
        assert im.size == (png, png)
    idx = json.loads((tmp_path / "t" / "index.json").read_text())
    assert idx["omitted_labels"] == 1000 - 3 - TOP_SUSPECTS and "3" in idx["labels"]
    write_triggers(rep, tmp_path / "all", all_labels=True)
    assert len(list((tmp_path / "all").glob("label_*.npz"))) == 1000


def test_preview_of_a_small_trigger_at_224_px_is_not_lost(small_report: Any) -> None:
    """The terminal preview at 224 px averages blocks: a 4x4 trigger between the old
    every-7th-pixel samples still shows."""
    from ncscan.report import _half_block_preview
    from ncscan.trigger import Trigger

    m = np.zeros((224, 224), np.float32)
    m[1:5, 1:5] = 1.0
    r = dataclasses.replace(small_report.labels[0], trigger=Trigger(mask=m, pattern=np.ones((3, 224, 224), np.float32)))
    text = _half_block_preview(r)
    styles = {str(s.style) for s in text.spans}
    assert styles - {"rgb(0,0,0) on rgb(0,0,0)"}  # some cell is not black
    assert len(text.plain.splitlines()[0]) == 32


# ------------------------------------------------------------------ memory


class _Net(torch.nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.LazyLinear(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(1))


def _net(side: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = _Net()
    net(torch.zeros(1, 1, side, side))
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def test_probe_memory_scales_with_the_image() -> None:
    from ncscan.reverse import probe_memory

    t28, f28 = probe_memory(_net(28), torch.rand(2, 1, 28, 28))
    t56, f56 = probe_memory(_net(56), torch.rand(2, 1, 56, 56))
    assert t28 > f28 > 0
    # 4x the pixels: 4x the activations (ReLU output 4x28x28 floats saved, and so on)
    assert 3.5 < t56 / t28 < 4.5 and 3.5 < f56 / f28 < 4.5
    assert t28 >= 4 * 28 * 28 * 4  # at least the ReLU's saved output
    # the probe's images are a slice of the data: the whole data set must not be counted
    assert probe_memory(_net(28), torch.rand(2000, 1, 28, 28)) == (t28, f28)


def test_split_passes_give_the_same_triggers() -> None:
    """A mini-batch over the memory plan runs as several passes with summed gradients: the
    same optimisation as one pass (to float rounding)."""
    from ncscan.reverse import MemoryPlan, preset, reverse_chunk

    net = _net(8)
    torch.manual_seed(1)
    x = torch.rand(30, 1, 8, 8)
    y = torch.arange(30) % 5
    cfg = dataclasses.replace(preset("fast"), max_steps=3, batch_size=8)
    sizes: list[int] = []
    h = net.register_forward_hook(lambda _m, i, _o: sizes.append(int(i[0].shape[0])))
    one, p1 = reverse_chunk(net, x, y, [0, 1, 2], cfg, seed=0)
    n_one = list(sizes)
    sizes.clear()
    tiny = MemoryPlan(train_bytes_per_image=1, forward_bytes_per_image=1, budget_bytes=5, train_images=5, forward_images=7)
    split, p2 = reverse_chunk(net, x, y, [0, 1, 2], cfg, seed=0, plan=tiny)
    h.remove()
    assert max(sizes) <= 7 and max(n_one) >= 24  # it did split (training 5 a pass, checks 7)
    assert p1 == p2
    for a, b in zip(one, split):
        assert a.steps == b.steps and a.working == b.working
        np.testing.assert_allclose(a.trigger.mask, b.trigger.mask, atol=1e-4)
        np.testing.assert_allclose(a.trigger.pattern, b.trigger.pattern, atol=1e-4)


def test_forward_batch_fits_the_budget() -> None:
    from ncscan.reverse import ReverseConfig, forward_batch, memory_plan, probe_memory

    net = _net(28)
    x = torch.rand(4, 1, 28, 28)
    _t, fwd = probe_memory(net, x)
    assert forward_batch(net, x) == 512  # small images: the cap
    plan = memory_plan(net, x, ReverseConfig(memory_budget_mb=fwd * 10 / 2**20))
    assert plan.forward_images == 10


def test_scan_report_has_memory_and_resize(small_report: Any) -> None:
    d = small_report.to_dict()
    mem = d["memory"]
    assert mem["peak_rss_mb"] is None or mem["peak_rss_mb"] > 50
    assert mem["cuda_max_allocated_mb"] is None  # a CPU scan
    assert mem["plan"]["train_images_per_pass"] >= 1 and mem["plan"]["budget_mb"] == 1024.0
    assert d["resize"] == {"mode": "squash", "source": "default"}


@pytest.mark.slow
def test_resnet50_224_scan_within_8gb(tmp_path: Path) -> None:
    """A 224x224 ResNet-50 (random weights, 10 classes, legacy export) through a budget-capped
    scan in a fresh process: peak RSS under 8 GB, recorded in the JSON."""
    import subprocess
    import sys

    import torchvision  # a hard dependency (onnx2torch imports it): never a skip
    torch.manual_seed(0)
    m = torchvision.models.resnet50(weights=None, num_classes=10).eval()
    onnx_path = tmp_path / "r50.onnx"
    torch.onnx.export(m, torch.rand(1, 3, 224, 224), str(onnx_path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    _rgb_folder(tmp_path / "imgs", 12, 3, 256, 320)
    code = (
        "import dataclasses, json, sys, torch; torch.set_num_threads(1)\n"
        "from ncscan.reverse import preset; from ncscan.scanner import scan\n"
        "cfg = dataclasses.replace(preset('fast'), max_steps=1, mini_batches=1)\n"
        "r = scan(sys.argv[1], sys.argv[2], device='cpu', schedule=cfg, labels=[0, 1, 2], force=True,"
        " resize='shorter-crop', max_images=12)\n"
        "print(json.dumps(r.to_dict()['memory']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(onnx_path), str(tmp_path / "imgs")],
                         capture_output=True, text=True, timeout=1800, check=True)
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    assert mem["peak_rss_mb"] < 8 * 1024
    assert mem["plan"]["train_images_per_pass"] < 32  # a label's 32 images were split


# ------------------------------------------------------------------ CLI


def test_cli_resize_all_labels_and_trigger_selection(tmp_path: Path) -> None:
    """Through the entry point: a 40-label model's table is cut to the suspects with a summary
    line unless --all-labels; --triggers writes the same selection; --resize reaches the data."""
    from ncscan.cli import run

    model = linear_classifier(tmp_path / "m.onnx", c=3, h=28, w=28, classes=40)
    d = tmp_path / "imgs"
    from PIL import Image

    d.mkdir()
    for i in range(12):
        Image.fromarray(_photo(40, 60, seed=i)).save(d / f"{i}.png")
    common = [str(model), "--data", str(d), "--max-steps", "1", "--device", "cpu", "--force",
              "--exit-zero", "--quiet", "--resize", "shorter-crop"]
    assert run([*common, "-o", str(tmp_path / "short.txt"), "--triggers", str(tmp_path / "t")]) == 0
    short = (tmp_path / "short.txt").read_text()
    assert "more label(s) not shown" in short and "--all-labels" in short
    written = len(list((tmp_path / "t").glob("label_*.npz")))
    assert 1 <= written < 40
    assert json.loads((tmp_path / "t" / "index.json").read_text())["omitted_labels"] == 40 - written
    assert run([*common, "--all-labels", "-o", str(tmp_path / "all.txt"), "--triggers", str(tmp_path / "ta")]) == 0
    assert "not shown" not in (tmp_path / "all.txt").read_text()
    assert len(list((tmp_path / "ta").glob("label_*.npz"))) == 40
    assert run([*common, "-o", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["resize"] == {"mode": "shorter-crop", "source": "flag"} and len(rep["labels"]) == 40
    assert any("centre crop" in w for w in rep["warnings"])
