"""The CLI through its real entry point: exit codes, stdout/stderr discipline, JSON, SARIF."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ncscan import __version__
from ncscan.cli import run
from ncscan.decide import DecideConfig

from .conftest import ROOT, cli_preprocess_args, entry, sarif_schema_path

JSON_FIELDS = {
    "ncscan_version", "model", "model_sha256", "verdict", "flagged", "threshold", "labels",
    "clean_accuracy", "preprocess", "seed", "elapsed_seconds",
}
LABEL_FIELDS = {
    "label", "mask_l1", "attack_success", "anomaly_index", "steps", "score", "margin", "decision", "runs",
    "run_mask_l1", "consistency", "line", "compactness", "evidence",
}


def _one_line_error(err: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ncscan: error:"), err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def infected_json(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One CLI scan of the infected MNIST fixture: JSON + SARIF-free run, exit code kept."""
    e = entry("mnist_badnets_square")
    d = tmp_path_factory.mktemp("scan")
    out = d / "report.json"
    trig = d / "triggers"
    rc = run([e["_abs"]["file"], "--data", e["_abs"]["scan_data"], *cli_preprocess_args(e),
              "-o", str(out), "--triggers", str(trig), "--quiet", "--device", "cpu"])
    return {"rc": rc, "report": json.loads(out.read_text()), "triggers": trig, "entry": e}


def test_infected_exit_code_and_json(infected_json: dict[str, Any]) -> None:
    assert infected_json["rc"] == 1
    rep = infected_json["report"]
    assert JSON_FIELDS <= set(rep)
    assert rep["ncscan_version"] == __version__
    assert rep["verdict"] == "backdoor"
    assert rep["flagged"] == infected_json["entry"]["targets"]
    assert rep["threshold"] == DecideConfig().threshold
    assert rep["margin"] > 0 and rep["borderline"] == []
    target = rep["labels"][infected_json["entry"]["targets"][0]]
    # The flagged label was confirmed by restarts, and the verdict's margin is its margin.
    assert target["decision"] == "flagged" and target["runs"] >= 2
    assert target["margin"] == pytest.approx(rep["margin"], abs=1e-3)
    # A BadNets square: a compact mask, held to the lower line; its margin is score - line.
    assert target["evidence"] == "size+compact" and target["compactness"] > 0.8
    assert target["line"] == pytest.approx(rep["threshold"] - DecideConfig().compact_relief)
    assert target["margin"] == pytest.approx(target["score"] - target["line"], abs=1e-3)
    assert target["score"] > target["line"] + rep["band"]
    assert rep["model_sha256"] == infected_json["entry"]["sha256"]
    assert len(rep["labels"]) == 10
    for lab in rep["labels"]:
        assert LABEL_FIELDS <= set(lab)
    flagged = [lab for lab in rep["labels"] if lab["flagged"]]
    assert all("trigger" in lab for lab in flagged)  # patch --report needs them
    assert 0.9 <= rep["clean_accuracy"] <= 1.0


def test_triggers_dir_has_pngs_for_every_label(infected_json: dict[str, Any]) -> None:
    from PIL import Image

    d: Path = infected_json["triggers"]
    for k in range(10):
        for kind in ("mask", "pattern", "trigger"):
            with Image.open(d / f"label_{k}_{kind}.png") as im:
                assert im.size[0] >= 28
        assert (d / f"label_{k}.npz").is_file()


def test_json_to_stdout_only_and_exit_zero(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    e = entry("mnist_clean")
    rc = run([e["_abs"]["file"], "--data", e["_abs"]["scan_data"], *cli_preprocess_args(e),
              "--format", "json", "--exit-zero", "--device", "cpu"])
    cap = capsys.readouterr()
    rep = json.loads(cap.out)  # stdout is exactly one JSON document
    assert rc == 0
    assert rep["verdict"] == "clean" and rep["flagged"] == []
    assert list(workdir.iterdir()) == []  # nothing written without --output


def test_exit_zero_turns_every_verdict_into_zero(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    """--exit-zero keeps the report but never fails the job: inconclusive (4) and backdoor
    (1) both become 0 (a clean scan exits 0 anyway, so it proves nothing)."""
    from ncscan.cli_common import verdict_exit

    e = entry("mnist_badnets_square")
    args = [e["_abs"]["file"], "--data", e["_abs"]["scan_data"], *cli_preprocess_args(e),
            "--max-steps", "2", "--format", "json", "--device", "cpu"]
    assert run(args) == 4  # two steps: no label reaches a working trigger
    capsys.readouterr()
    assert run([*args, "--exit-zero"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "inconclusive"
    assert [verdict_exit(v, False) for v in ("clean", "backdoor", "inconclusive")] == [0, 1, 4]
    assert {verdict_exit(v, True) for v in ("clean", "backdoor", "inconclusive")} == {0}


def test_sarif_valid_and_exit_one(workdir: Path) -> None:
    e = entry("mnist_badnets_keras")
    out = workdir / "scan.sarif"
    rc = run(["scan", e["_abs"]["file"], "--data", e["_abs"]["scan_data"], "-o", str(out), "-q"])
    assert rc == 1
    log = json.loads(out.read_text())
    assert log["version"] == "2.1.0"
    res = log["runs"][0]["results"]
    assert [r["properties"]["label"] for r in res] == e["targets"]
    loc = res[0]["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"]["uri"] == e["_abs"]["file"]
    assert loc["region"]["startLine"] == 1
    assert res[0]["partialFingerprints"]
    rule = log["runs"][0]["tool"]["driver"]["rules"][0]
    assert float(rule["properties"]["security-severity"]) > 0
    schema = sarif_schema_path()
    if schema is None:
        pytest.skip("set NCSCAN_SARIF_SCHEMA to the SARIF 2.1.0 schema to validate (.ci/run does)")
    import jsonschema

    jsonschema.validate(log, json.loads(schema.read_text()))


def test_unconverged_labels_are_inconclusive_exit_4(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    """Too small a budget (3 steps at a lower learning rate, from a TOML --config): some labels
    never reach a working trigger, and the scan says inconclusive (exit 4) instead of
    computing outlier statistics over the labels that happened to finish."""
    e = entry("mnist_badnets_square")
    cfg = workdir / "short.toml"
    cfg.write_text("max_steps = 3\nlr = 0.07\n")
    out = workdir / "r.json"
    rc = run([e["_abs"]["file"], "--data", e["_abs"]["scan_data"], *cli_preprocess_args(e),
              "--config", str(cfg), "-o", str(out), "--device", "cpu"])
    err = " ".join(capsys.readouterr().err.split())  # the table wraps at 80 columns
    rep = json.loads(out.read_text())
    assert rc == 4
    assert rep["verdict"] == "inconclusive" and rep["flagged"] == []
    missed = [lab["label"] for lab in rep["labels"] if not lab["converged"]]
    assert 0 < len(missed) <= len(rep["labels"]) - 3  # enough finished for statistics, yet not all
    assert all(lab["steps"] <= 3 for lab in rep["labels"])
    reason = f"no trigger reached 99% attack success for label(s) {', '.join(map(str, missed))} within 3 steps"
    assert rep["reasons"] == [reason]
    assert f"INCONCLUSIVE: {reason}" in err
    assert err.count("no trigger") == len(missed) + 1  # one marked table row per label, + the reason


# ------------------------------------------------------------------ user errors: exit 2, one line


def test_missing_model(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    assert run(["nope.onnx", "--data", "."]) == 2
    _one_line_error(capsys.readouterr().err)


def test_not_onnx(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    (workdir / "m.onnx").write_bytes(os.urandom(2000))
    assert run(["m.onnx", "--data", "."]) == 2
    err = capsys.readouterr().err
    _one_line_error(err)
    assert "not a valid ONNX model" in err


def test_debug_shows_traceback(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    (workdir / "m.onnx").write_bytes(b"")
    assert run(["m.onnx", "--data", ".", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--device", "cuda"], "cuda"),
        (["--device", "tpu"], "--device"),
        (["--mean", "0.1,0.2,0.3"], "--mean"),
        (["--pixel-range", "255,0"], "--pixel-range"),
        (["--pixel-range", "abc"], "--pixel-range"),
        (["--threshold", "-1"], "--threshold"),
        (["--bogus"], "--bogus"),
        (["-o", "/nonexistent/dir/out.json"], "does not exist"),
    ],
)
def test_bad_flags(extra: list[str], needle: str, capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    e = entry("mnist_clean")
    if extra == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    rc = run([e["_abs"]["file"], "--data", e["_abs"]["scan_data"], *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    _one_line_error(err)
    assert needle in err


def test_output_equal_to_input_refused(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    e = entry("mnist_clean")
    before = Path(e["_abs"]["file"]).read_bytes()
    rc = run([e["_abs"]["file"], "--data", e["_abs"]["scan_data"], "-o", e["_abs"]["file"], "--format", "json"])
    assert rc == 2
    _one_line_error(capsys.readouterr().err)
    assert Path(e["_abs"]["file"]).read_bytes() == before


def test_missing_data_option(capsys: pytest.CaptureFixture[str]) -> None:
    e = entry("mnist_clean")
    assert run([e["_abs"]["file"]]) == 2
    _one_line_error(capsys.readouterr().err)


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    from ncscan.cli import COMMANDS

    assert run(["--version"]) == 0
    assert capsys.readouterr().out == f"ncscan {__version__}\n"
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    # Each command is a row of the help's command list: its name, then its one-line help.
    rows = {ln.split()[0] for ln in out.split("Commands", 1)[1].splitlines() if ln.strip() and ln.startswith("  ")}
    assert rows == set(COMMANDS), out


# Each command's options are documented in that command's README section (scan-many's own
# section names the options scan-many adds; the ones it shares with scan live under Scanning).
README_SECTIONS = {
    "scan": ("## Scanning", "## Patching"),
    "scan-many": ("### Many models / Ray", "## Patching"),
    "patch": ("## Patching", "## From your framework"),
    "export": ("### From the command line", "### Why"),
}


def _readme_section(start: str, stop: str) -> str:
    text = (ROOT / "README.md").read_text()
    a = text.index(start)
    return text[a:text.index(stop, a + len(start))]


def _long_options(command: str) -> list[str]:
    from typer.main import get_command

    from ncscan.cli import app

    cmd = get_command(app).commands[command]  # type: ignore[attr-defined]
    return [o for p in cmd.params for o in p.opts if o.startswith("--")]


@pytest.mark.parametrize("command", sorted(README_SECTIONS))
def test_every_option_is_documented_in_its_readme_section(command: str) -> None:
    section = _readme_section(*README_SECTIONS[command])
    shared = set(_long_options("scan")) if command == "scan-many" else set()
    missing = [o for o in _long_options(command) if o not in section and o not in shared]
    assert missing == [], f"document {missing} in README section {README_SECTIONS[command][0]!r}"


def test_readme_quick_start_has_exactly_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert text.split("## ")[1].startswith("Quick start")
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmds = [ln for ln in block.strip().splitlines() if ln.strip()]
    assert len(cmds) == 2
    assert "ncscan fixtures/models/" in cmds[0] and "pytest" in cmds[1]


def test_sigterm_exits_promptly_and_writes_nothing(tmp_path: Path) -> None:
    e = entry("mnist_badnets_square")
    out = tmp_path / "r.json"
    p = subprocess.Popen(
        [sys.executable, "-m", "ncscan", e["_abs"]["file"], "--data", e["_abs"]["scan_data"],
         "-o", str(out), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(12)
    p.send_signal(signal.SIGTERM)
    t0 = time.time()
    _, err = p.communicate(timeout=30)
    assert time.time() - t0 < 10
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists()
    assert [f for f in tmp_path.iterdir()] == []
