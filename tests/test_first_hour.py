"""Issue #15, what a new user hit in the first hour: file modes, CI-log output, patch edge
cases, API/CLI papercuts. Everything goes through the real CLI entry point (`run`) or the
public API, on the shipped fixtures."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ncscan.cli import run

from .conftest import ROOT, entry

FIX = ROOT / "fixtures"
SQUARE = FIX / "models" / "mnist_badnets_square.onnx"
CLEAN = FIX / "models" / "mnist_clean.onnx"
SCAN = FIX / "data" / "mnist" / "scan"
TEST = FIX / "data" / "mnist" / "test.npz"
UMASK = 0o002  # neither the usual 022 nor what mkstemp gives (0600)


def _run(args: list[str]) -> tuple[int, str, str]:
    """The CLI with stdout/stderr captured (neither is a terminal, as in CI)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run(args)
    return rc, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def _umask(mask: int) -> Any:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _one_line_error(err: str, needle: str = "") -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ncscan: error:"), err
    assert "Traceback" not in err
    assert needle in err, err


@pytest.fixture(scope="module")
def short_scan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-step scan (inconclusive, exit 4) with JSON to stdout and --triggers, under umask 002."""
    d = tmp_path_factory.mktemp("short")
    trig = d / "triggers"
    with _umask(UMASK):
        rc, out, err = _run([str(CLEAN), "--data", str(SCAN), "--max-steps", "2", "--format", "json",
                             "--triggers", str(trig), "--prescreen", "on", "--device", "cpu"])
    return {"rc": rc, "out": out, "err": err, "triggers": trig}


@pytest.fixture(scope="module")
def report7(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scan report of mnist_badnets_square whose flagged label 7 carries its reversed trigger."""
    from ncscan.scanner import encode_trigger, scan

    rep = scan(SQUARE, SCAN, labels=[7], device="cpu", seed=0)
    d = rep.to_dict()
    lab = next(v for v in d["labels"] if v["label"] == 7)
    d["flagged"] = [7]
    d["verdict"] = "backdoor"
    d["labels"] = [{**lab, "flagged": True, "trigger": encode_trigger(rep.by_label[7].trigger)}]
    p = tmp_path_factory.mktemp("rep") / "scan.json"
    p.write_text(json.dumps(d))
    return p


# ------------------------------------------------------------------ 1. file modes


def test_scan_outputs_respect_umask(short_scan: dict[str, Any]) -> None:
    files = sorted(short_scan["triggers"].iterdir())
    assert any(f.suffix == ".png" for f in files) and any(f.suffix == ".npz" for f in files)
    assert {f.name: oct(_mode(f)) for f in files} == {f.name: oct(0o666 & ~UMASK) for f in files}


def test_patch_output_and_report_respect_umask(report7: Path, tmp_path: Path) -> None:
    out, rep = tmp_path / "filtered.onnx", tmp_path / "patch.json"
    with _umask(UMASK):
        rc, _, err = _run(["patch", str(SQUARE), "--data", str(SCAN), "--filter", "--report", str(report7),
                           "-o", str(out), "--output-report", str(rep), "--device", "cpu", "-q"])
    assert rc == 0, err
    assert oct(_mode(out)) == oct(0o664) and oct(_mode(rep)) == oct(0o664)


def test_adapters_use_the_package_writer() -> None:
    src = (ROOT / "adapters" / "_common.py").read_text()
    assert "mkstemp" not in src and "os.umask" not in src
