"""Shared test helpers: the fixture manifests and a hermetic working directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
MANIFESTS = [FIXTURES / "manifest.json", FIXTURES / "keras" / "manifest.json"]

# Fixtures whose API scan runs in the default suite; the rest are marked slow. The default
# suite already scans mnist_badnets_square, mnist_clean and mnist_badnets_keras through the
# CLI (tests/test_cli.py asserts their verdicts), so the API end-to-end scans of every
# fixture run in CI's slow stage.
FAST_FIXTURES: set[str] = {"mnist_clean", "mnist_badnets_square"}  # the default suite's verdict pair

# Known misses of the current decision, kept visible: strict, so a fix turns them red until the
# entry is removed. The constants were chosen on bench/evalset's tuning split, never on these.
KNOWN_MISSES: dict[str, str] = {
    "fashion_resnet_badnets": "target 2 found at its true size (L1 14.1, 0.31x the median) but the "
    "labels' sizes spread widely: score 2.79, below the band (2.9); called clean (issue #14 note)",
}


def fixture_entries() -> list[dict[str, Any]]:
    """All manifest entries, each with absolute paths added under `_abs`."""
    out = []
    for m in MANIFESTS:
        assert m.exists(), f"{m} is missing; rebuild with python {m.parent / 'build.py'}"
        for e in json.loads(m.read_text())["fixtures"]:
            base = m.parent
            e = dict(e)
            e["_abs"] = {
                "file": str(base / e["file"]),
                "scan_data": str(base / e["scan_data"]),
                "test_data": str(base / e["test_data"]),
                "triggers": {int(t["target"]): str(base / t["file"]) for t in e.get("triggers", []) if "file" in t},
            }
            out.append(e)
    return out


def entry(name: str) -> dict[str, Any]:
    for e in fixture_entries():
        if e["name"] == name:
            return e
    raise AssertionError(f"fixture {name} is not in fixtures/manifest.json; rebuild with python fixtures/build.py")


def preprocess_kwargs(e: dict[str, Any]) -> dict[str, Any]:
    """Preprocessing flags for a fixture (none when the model's metadata carries them)."""
    if e.get("preprocess_in_metadata"):
        return {}
    pp = e["preprocess"]
    kw: dict[str, Any] = {"pixel_range": pp["pixel_range"]}
    if pp.get("mean") is not None:
        kw["mean"] = pp["mean"]
    if pp.get("std") is not None:
        kw["std"] = pp["std"]
    if pp.get("channel_order", "RGB") != "RGB":
        kw["channel_order"] = pp["channel_order"]
    return kw


def cli_preprocess_args(e: dict[str, Any]) -> list[str]:
    kw = preprocess_kwargs(e)
    args: list[str] = []
    if "pixel_range" in kw:
        args += ["--pixel-range", ",".join(str(v) for v in kw["pixel_range"])]
    if "mean" in kw:
        args += ["--mean", ",".join(str(v) for v in kw["mean"])]
    if "std" in kw:
        args += ["--std", ",".join(str(v) for v in kw["std"])]
    if kw.get("channel_order") == "BGR":
        args += ["--bgr"]
    return args


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a temp dir so nothing is written into the repo."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def sarif_schema_path() -> Path | None:
    p = os.environ.get("NCSCAN_SARIF_SCHEMA")
    if p and Path(p).is_file():
        return Path(p)
    return None
