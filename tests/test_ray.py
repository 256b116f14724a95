"""Scans through Ray on a local cluster the test starts (2 CPUs, no GPUs, no dashboard).

Excluded from the default suite (marker `ray`); CI runs them in their own stage after
installing `ncscan[ray]`. They skip where Ray is not installed.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import torch  # noqa: E402

from ncscan.cli import run  # noqa: E402
from ncscan.distributed import RayBackend, connect  # noqa: E402
from ncscan.reverse import preset  # noqa: E402
from ncscan.scanner import ScanReport, scan  # noqa: E402

from .conftest import KNOWN_MISSES, entry, fixture_entries, preprocess_kwargs  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def backend() -> Iterator[RayBackend]:
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        with connect("auto") as b:  # an initialised Ray is reused whatever the address
            assert b.device == "cpu" and b.slots == 2
            yield b
    finally:
        ray.shutdown()


def _local(model: str, data: str, cfg: Any) -> ScanReport:
    """The local scan with one torch thread, as the Ray workers run, so traces match bitwise."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return scan(model, data, device="cpu", seed=0, schedule=cfg)
    finally:
        torch.set_num_threads(n)


def _same(a: ScanReport, b: ScanReport) -> None:
    assert a.flagged == b.flagged
    assert a.verdict == b.verdict
    assert a.passes == b.passes
    for x, y in zip(a.labels, b.labels, strict=True):
        assert x.label == y.label
        assert np.array_equal(x.trigger.mask, y.trigger.mask), x.label
        assert np.array_equal(x.trigger.pattern, y.trigger.pattern), x.label
        assert x.steps == y.steps and x.anomaly_index == y.anomaly_index


def test_ray_scan_equals_local_scan(backend: RayBackend) -> None:
    e = entry("mnist_badnets_square")
    cfg = dataclasses.replace(preset("fast"), label_chunk=4)  # 3 chunks -> 3 Ray tasks
    local = _local(e["_abs"]["file"], e["_abs"]["scan_data"], cfg)
    remote = scan(e["_abs"]["file"], e["_abs"]["scan_data"], device="cpu", seed=0, schedule=cfg,
                  runner=backend.runner)
    assert local.flagged == e["targets"] == [7]
    assert remote.device == "ray:cpu"
    _same(local, remote)


def _dies_once(marker: str) -> Any:
    """A chunk task that kills its own worker process on its first attempt (a worker that dies
    mid-chunk), then runs the real task: cloudpickle ships it by value to the workers."""
    from ncscan.distributed import _chunk_task

    def task(*args: Any) -> Any:
        import os
        from pathlib import Path

        if not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)
        return _chunk_task(*args)

    return task


def test_killed_worker_is_retried(backend: RayBackend, tmp_path: Path) -> None:
    e = entry("mnist_badnets_square")
    cfg = dataclasses.replace(preset("fast"), label_chunk=4, max_steps=20)
    marker = tmp_path / "died-once"
    dying = dataclasses.replace(backend, chunk_task=_dies_once(str(marker)), _task=None, owns_ray=False)
    remote = scan(e["_abs"]["file"], e["_abs"]["scan_data"], device="cpu", seed=0, schedule=cfg,
                  runner=dying.runner)
    assert marker.exists()  # one task attempt killed its worker...
    local = _local(e["_abs"]["file"], e["_abs"]["scan_data"], cfg)
    _same(local, remote)  # ...and its retry gave the same result


def test_cli_scan_ray(backend: RayBackend, tmp_path: Path) -> None:
    e = entry("mnist_badnets_square")
    out = tmp_path / "r.json"
    rc = run([e["_abs"]["file"], "--data", e["_abs"]["scan_data"], "--ray", "auto", "--label-chunk", "5",
              "--device", "cpu", "-o", str(out), "--quiet"])
    rep = json.loads(out.read_text())
    assert rc == 1 and rep["flagged"] == [7] and rep["device"] == "ray:cpu"


def _models_file(tmp_path: Path, entries: list[dict[str, Any]], bad: Path) -> Path:
    items: list[dict[str, Any]] = []
    for e in entries:
        it: dict[str, Any] = {"model": e["_abs"]["file"], "data": e["_abs"]["scan_data"]}
        kw = preprocess_kwargs(e)
        for k in ("pixel_range", "mean", "std"):
            if k in kw:
                it[k] = list(kw[k])
        if kw.get("channel_order") == "BGR":
            it["bgr"] = True
        items.append(it)
    items.append({"model": str(bad), "data": entries[0]["_abs"]["scan_data"]})
    p = tmp_path / "models.json"
    p.write_text(json.dumps(items))
    return p


@pytest.mark.slow
def test_scan_many_all_fixtures_through_ray(backend: RayBackend, tmp_path: Path) -> None:
    entries = fixture_entries()
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not onnx")
    out = tmp_path / "all.json"
    rc = run(["scan-many", "--models-file", str(_models_file(tmp_path, entries, bad)), "--ray", "auto",
              "--device", "cpu", "-o", str(out), "--report-dir", str(tmp_path / "reports"), "--quiet"])
    doc = json.loads(out.read_text())
    assert rc == 1
    rows = doc["models"]
    assert len(rows) == len(entries) + 1
    for e, row in zip(entries, rows):
        assert row["model"] == e["_abs"]["file"]
        if e["name"] in KNOWN_MISSES:  # the decision's measured miss: Ray must still scan it
            assert row["status"] in ("clean", "backdoor", "inconclusive"), (e["name"], row["error"])
        elif e["infected"]:
            assert row["status"] == "backdoor", (e["name"], row["flagged"])
            assert set(e["targets"]) <= set(row["flagged"])
            assert set(row["flagged"][: len(e["targets"])]) == set(e["targets"]), (e["name"], row["flagged"])
        else:
            assert row["status"] == "clean", (e["name"], row["flagged"], row["error"])
    assert rows[-1]["status"] == "error" and "not a valid ONNX model" in rows[-1]["error"]
    assert len(list((tmp_path / "reports").iterdir())) == len(entries)


def test_unreachable_address_fails_fast_with_one_line(tmp_path: Path) -> None:
    """A fresh process (no Ray initialised): a blackholed address must not hang."""
    e = entry("mnist_clean")
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "-m", "ncscan", "scan", e["_abs"]["file"], "--data", e["_abs"]["scan_data"],
         "--ray", "10.255.255.1:6379", "--device", "cpu"],
        capture_output=True, text=True, timeout=90, cwd=tmp_path,
    )
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    # "cannot reach" when nothing answers on the port (the 5 s probe); "cannot connect" when
    # something does but is not Ray (Ray gives up after about 20 s).
    assert len(lines) == 1 and lines[0].startswith("ncscan: error: cannot "), p.stderr
    assert "Ray cluster at 10.255.255.1:6379" in lines[0]
    assert time.time() - t0 < 60
