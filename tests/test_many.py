"""`ncscan scan-many` run locally (no Ray), and `--ray` without Ray installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from ncscan.cli import run
from ncscan.errors import ConfigError
from ncscan.many import (
    ModelJob,
    combined_dict,
    combined_sarif,
    expand_patterns,
    read_models_file,
    scan_many,
)
from ncscan.reverse import preset

from .conftest import entry, sarif_schema_path

# A short budget: enough for the BadNets square (label 7's trigger is ~8x smaller than the
# others' after 20 steps), cheap enough for the default suite.
QUICK = ["--max-steps", "20", "--max-images", "500", "--device", "cpu"]


def _one_line_error(err: str, needle: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ncscan: error:") and needle in lines[0], err


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """The library run: infected, clean, and a file that is not ONNX."""
    bad = tmp_path_factory.mktemp("bad") / "broken.onnx"
    bad.write_bytes(b"not a model")
    import dataclasses

    cfg = dataclasses.replace(preset("fast"), max_steps=20)
    jobs = [ModelJob(entry("mnist_badnets_square")["_abs"]["file"]), ModelJob(entry("mnist_clean")["_abs"]["file"]),
            ModelJob(str(bad))]
    return scan_many(jobs, data=entry("mnist_clean")["_abs"]["scan_data"], schedule=cfg, device="cpu",
                     max_images=500, seed=0)


def test_library_outcomes_and_error_row(outcomes: list[Any]) -> None:
    inf, clean, bad = outcomes
    assert inf.status == "backdoor" and inf.report.flagged == [7]
    assert clean.status == "clean" and clean.report is not None and clean.report.flagged == []
    assert bad.status == "error" and bad.error_kind == "user" and "not a valid ONNX model" in bad.error
    d = combined_dict(outcomes)
    assert d["verdict"] == "backdoor"
    assert d["flagged_models"] == [inf.job.model]
    assert d["counts"]["error"] == 1
    assert [m["status"] for m in d["models"]][2] == "error"
    assert d["models"][0]["report"]["flagged"] == [7]


def test_combined_sarif_one_run_all_models(outcomes: list[Any]) -> None:
    doc = combined_sarif(outcomes)
    assert doc["version"] == "2.1.0" and len(doc["runs"]) == 1
    res = doc["runs"][0]["results"]
    assert [r["properties"]["label"] for r in res] == [7]
    assert res[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].endswith("mnist_badnets_square.onnx")
    inv = doc["runs"][0]["invocations"][0]
    assert inv["executionSuccessful"] is False
    assert "broken.onnx" in inv["toolExecutionNotifications"][0]["message"]["text"]
    schema = sarif_schema_path()
    if schema is not None:
        import jsonschema

        jsonschema.validate(json.loads(json.dumps(doc)), json.loads(schema.read_text()))


def test_cli_scan_many_exit_one_reports_and_error_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inf = entry("mnist_badnets_square")
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x00garbage")
    out, rd = tmp_path / "all.json", tmp_path / "reports"
    rc = run(["scan-many", inf["_abs"]["file"], str(bad), "--data", inf["_abs"]["scan_data"], *QUICK,
              "-o", str(out), "--report-dir", str(rd), "--quiet"])
    assert rc == 1
    doc = json.loads(out.read_text())
    assert [m["status"] for m in doc["models"]] == ["backdoor", "error"]
    assert doc["models"][0]["flagged"] == [7]
    assert sorted(p.name for p in rd.iterdir()) == ["mnist_badnets_square.json"]
    assert json.loads((rd / "mnist_badnets_square.json").read_text())["flagged"] == [7]
    assert capsys.readouterr().out == ""  # --output given: nothing on stdout


def test_cli_only_a_bad_model_exits_two(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"junk")
    assert run(["scan-many", str(bad), "--data", str(tmp_path), "--quiet", "-f", "json", "-o", str(tmp_path / "o.json")]) == 2
    assert json.loads((tmp_path / "o.json").read_text())["models"][0]["error_kind"] == "user"


def test_patterns_and_models_file(tmp_path: Path) -> None:
    (tmp_path / "a.onnx").write_bytes(b"")
    (tmp_path / "b.onnx").write_bytes(b"")
    jobs = expand_patterns([str(tmp_path / "*.onnx"), str(tmp_path / "a.onnx"), str(tmp_path / "missing.onnx")])
    assert [Path(j.model).name for j in jobs] == ["a.onnx", "b.onnx", "missing.onnx"]
    with pytest.raises(ConfigError, match="matches no file"):
        expand_patterns([str(tmp_path / "*.pt")])
    mf = tmp_path / "models.json"
    mf.write_text(json.dumps([{"model": "a.onnx", "data": "imgs", "pixel_range": "0,255", "mean": [0.5], "bgr": True},
                              "b.onnx"]))
    a, b = read_models_file(mf)
    assert a.model == str(tmp_path / "a.onnx") and a.data == str(tmp_path / "imgs")
    assert a.options == {"pixel_range": (0.0, 255.0), "mean": (0.5,), "channel_order": "BGR"}
    assert b.data is None and b.options == {}
    mf.write_text(json.dumps([{"model": "a.onnx", "colour": "red"}]))
    with pytest.raises(ConfigError, match="unknown key"):
        read_models_file(mf)


@pytest.mark.parametrize("cmd", ["scan", "scan-many"])
def test_ray_not_installed_is_a_one_line_exit_two(cmd: str, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    e = entry("mnist_clean")
    rc = run([cmd, e["_abs"]["file"], "--data", e["_abs"]["scan_data"], "--ray", "auto", "--device", "cpu"])
    assert rc == 2
    _one_line_error(capsys.readouterr().err, "install ncscan[ray]")


def test_resize_and_output_name_reach_every_model(tmp_path: Path) -> None:
    """--resize and --output-name are scan options, so scan-many takes them too (for the run,
    and per model in --models-file, which wins)."""
    import shutil

    from . import tiny

    m = tiny.linear_classifier(tmp_path / "m.onnx", classes=3)
    shutil.copy(m, tmp_path / "m2.onnx")
    d = tiny.write_images(tmp_path / "imgs", n=30, size=16)
    mf = tmp_path / "models.json"
    mf.write_text(json.dumps([{"model": "m2.onnx", "resize": "squash"}]))
    rd = tmp_path / "reports"
    rc = run(["scan-many", str(m), "--models-file", str(mf), "--data", str(d), "--resize", "shorter-crop",
              "--output-name", "logits", "--report-dir", str(rd), "--force", "-q", "--max-steps", "3", "--device", "cpu"])
    assert rc in (0, 1, 4)
    got = {p.stem: json.loads(p.read_text())["resize"] for p in rd.glob("*.json")}
    assert got == {"m": {"mode": "shorter-crop", "source": "flag"}, "m2": {"mode": "squash", "source": "flag"}}
    rc = run(["scan-many", str(m), "--data", str(d), "--output-name", "nope", "--force", "-q", "--max-steps", "3",
              "--device", "cpu"])
    assert rc == 2  # the output name reached the model: no output called "nope"
