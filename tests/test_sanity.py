"""Wrong-preprocessing detection (issue #15 item 2): the pure checks in ncscan.sanity, and
the CLI on real fixtures with the preprocessing mistakes users make."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from ncscan import sanity
from ncscan.cli import run

from .conftest import entry


def _err_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("warning")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------ pure functions


def test_output_stats_saturation_and_kappa() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 10)
    logits = rng.normal(size=(100, 10))
    logits[np.arange(100), y] += 6.0  # a confident, correct, unsaturated model
    s = sanity.output_stats(logits, y)
    assert s.accuracy == 1.0 and s.kappa == pytest.approx(1.0) and s.chance == pytest.approx(0.1)
    assert s.saturated == 0.0 and s.top_share == pytest.approx(0.1)
    big = sanity.output_stats(logits * 255, y)  # the 255x pixel-range error on a ReLU net
    assert big.accuracy == 1.0 and big.saturated == 1.0
    collapsed = np.zeros((100, 10))
    collapsed[:, 3] = 1.0
    c = sanity.output_stats(collapsed, y)
    assert c.top_class == 3 and c.top_share == 1.0 and c.kappa == pytest.approx(0.0)


def test_metadata_overrides_name_both_values() -> None:
    meta = {"pixel_range": (0.0, 255.0), "channel_order": "RGB", "mean": (0.5,)}
    w = sanity.metadata_overrides(
        meta, {"pixel_range": (0.0, 1.0), "channel_order": "BGR", "mean": (0.5, 0.5, 0.5), "std": (0.2,)}
    )
    assert len(w) == 2  # same mean for every channel and no std in the metadata: no warning
    assert "--pixel-range 0,1 overrides the model's own metadata ncscan.pixel_range = 0,255" in w[0]
    assert "--bgr BGR" in w[1] and "ncscan.channel_order = RGB" in w[1]
    assert sanity.metadata_overrides(meta, {"pixel_range": (0, 255), "channel_order": None}) == []


def test_candidates_undo_the_usual_mistakes() -> None:
    names = [c.name for c in sanity.candidates((0, 1), None, None, "RGB", 1)]
    assert names == ["--pixel-range 0,255"]
    names = [c.name for c in sanity.candidates((0, 255), (0.5,), (0.2,), "RGB", 3)]
    assert names[0] == "--pixel-range 0,1" and "--bgr" in names and any("--mean 0" in n for n in names)


def _stats(**kw: float) -> sanity.OutputStats:
    base: dict[str, float] = {"n": 100, "num_classes": 10, "saturated": 0.0, "top_class": 0, "top_share": 0.1}
    base.update(kw)
    return sanity.OutputStats(**base)  # type: ignore[arg-type]


def test_assess_thresholds() -> None:
    ok = sanity.assess(_stats(accuracy=0.98, chance=0.1, kappa=0.97), setting="s")
    assert ok.stop is None and ok.warnings == []
    # near chance with labels: stop, and name the candidate that fixes it
    fix = sanity.Candidate("--pixel-range 0,255", {"pixel_range": (0, 255)})
    a = sanity.assess(
        _stats(accuracy=0.1, chance=0.1, kappa=0.0, top_share=1.0, top_class=1), setting="s",
        tried=[(fix, _stats(accuracy=0.99, chance=0.1, kappa=0.98), 0.1)],
    )
    assert a.stop is not None and "try --pixel-range 0,255" in a.stop and "99%" in a.stop
    # low but not chance: a warning only (e.g. a wrong normalisation on a 30-class net)
    w = sanity.assess(_stats(num_classes=30, accuracy=0.4, chance=0.04, kappa=0.38, top_share=0.2), setting="s")
    assert w.stop is None and "only 40%" in w.warnings[0]
    # unlabelled: collapse stops at 90%, warns at 50%
    assert sanity.assess(_stats(top_share=0.95), setting="s").stop is not None
    half = sanity.assess(_stats(top_share=0.75), setting="s")
    assert half.stop is None and "75%" in half.warnings[0]
    # saturated but accurate: warn and name the flag
    down = sanity.Candidate("--pixel-range 0,1", {"pixel_range": (0, 1)})
    s = sanity.assess(
        _stats(accuracy=0.99, chance=0.1, kappa=0.99, saturated=1.0), setting="pixel range 0,255",
        tried=[(down, _stats(accuracy=0.99, chance=0.1, kappa=0.99, saturated=0.03), 0.995)],
    )
    assert s.stop is None and "saturated" in s.warnings[0] and "pass --pixel-range 0,1" in s.warnings[0]
    assert sanity.SATURATED_WARN > 0.043 * 5  # the measured maximum on correct preprocessing


# ------------------------------------------------------------------ CLI on real fixtures


def test_255x_pixel_range_warns_and_names_the_flag(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    """99% accuracy at --pixel-range 0,255 on a [0,1] ReLU net: nothing warned before."""
    e = entry("mnist_clean")
    rc = run([e["_abs"]["file"], "--data", e["_abs"]["scan_data"], "--pixel-range", "0,255",
              "--max-steps", "1", "-f", "json", "-q", "--device", "cpu"])
    rep = json.loads(capsys.readouterr().out)
    assert rc in (0, 4)
    assert rep["clean_accuracy"] > 0.95
    sat = [w for w in rep["warnings"] if "saturated" in w]
    assert sat and "pixel range 0,255 (from your flag)" in sat[0] and "pass --pixel-range 0,1" in sat[0]


def test_correct_preprocessing_gives_no_preprocessing_warning(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    e = entry("cmnist_clean")  # 0..255 from the metadata, softmax output
    rc = run([e["_abs"]["file"], "--data", e["_abs"]["scan_data"], "--pixel-range", "0,255",
              "--max-steps", "1", "-f", "json", "-q", "--device", "cpu"])
    rep = json.loads(capsys.readouterr().out)
    assert rc in (0, 4)
    assert not [w for w in rep["warnings"] if "saturated" in w or "overrides" in w or "classifies only" in w]


def test_flag_overriding_metadata_warns_with_both_values(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    e = entry("cmnist_clean")  # metadata ncscan.channel_order = RGB
    rc = run([e["_abs"]["file"], "--data", e["_abs"]["scan_data"], "--bgr",
              "--max-steps", "1", "-f", "json", "-q", "--device", "cpu"])
    rep = json.loads(capsys.readouterr().out)
    assert rc in (0, 4)
    assert any("--bgr BGR overrides the model's own metadata ncscan.channel_order = RGB" in w
               for w in rep["warnings"])


def test_near_chance_stops_before_optimising_unless_force(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    """--pixel-range 0,1 on a model whose metadata says 0,255: 10% accuracy, one class."""
    e = entry("cmnist_clean")
    args = [e["_abs"]["file"], "--data", e["_abs"]["scan_data"], "--pixel-range", "0,1", "--device", "cpu"]
    t0 = time.perf_counter()
    rc = run(args)
    took = time.perf_counter() - t0
    line = _err_line(capsys.readouterr().err)
    assert rc == 2
    assert "classifies only 10%" in line and "the model's metadata says 0,255" in line
    assert "try --pixel-range 0,255" in line and "--force" in line
    assert took < 30  # stopped before the (minutes-long) optimisation
    rc = run([*args, "--force", "--max-steps", "1", "-f", "json", "-q"])
    rep = json.loads(capsys.readouterr().out)
    # Forced through, the scan reports its evidence but never a verdict.
    assert rc == 4 and rep["verdict"] == "inconclusive" and rep["margin"] is None
    assert rep["reasons"][0].startswith("the data cannot support a verdict (scanned with --force)")
    assert any("--force: scanned anyway" in w for w in rep["warnings"])


def test_flat_folder_collapse_stops(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    """No labels: a pixel range 255x too small puts every image in one class."""
    e = entry("mnist_clean")
    flat = workdir / "flat"
    flat.mkdir()
    for p in sorted(Path(e["_abs"]["scan_data"]).glob("*/*.png"))[::3]:
        shutil.copy(p, flat / f"{p.parent.name}_{p.name}")
    rc = run([e["_abs"]["file"], "--data", str(flat), "--pixel-range", "0,0.003921568", "--device", "cpu"])
    line = _err_line(capsys.readouterr().err)
    assert rc == 2
    assert "of your (unlabelled) images" in line and "collapsed onto one class" in line
    assert "try --pixel-range 0,1" in line


def test_api_near_chance_is_a_data_error(workdir: Path) -> None:
    import ncscan
    from ncscan.errors import DataError

    e = entry("cmnist_clean")
    with pytest.raises(DataError, match="classifies only"):
        ncscan.scan(e["_abs"]["file"], e["_abs"]["scan_data"], pixel_range=(0, 1), device="cpu")


def test_patch_on_near_chance_data_stops_without_a_force_hint(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    """patch has no scan --force escape: its message must not offer one."""
    e = entry("cmnist_clean")
    out = workdir / "patched.onnx"
    rc = run(["patch", e["_abs"]["file"], "--data", e["_abs"]["scan_data"], "--pixel-range", "0,1",
              "--unlearn", "--label", "0", "-o", str(out), "--device", "cpu"])
    line = _err_line(capsys.readouterr().err)
    assert rc == 2 and not out.exists()
    assert "try --pixel-range 0,255" in line and "patch needs data the model classifies" in line
    assert "--force" not in line
