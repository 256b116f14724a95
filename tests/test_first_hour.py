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

from .conftest import ROOT

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


@pytest.fixture(scope="module")
def filtered(report7: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`ncscan patch --filter` of mnist_badnets_square under umask 002: (model, JSON result)."""
    d = tmp_path_factory.mktemp("filtered")
    out, rep = d / "filtered.onnx", d / "patch.json"
    with _umask(UMASK):
        rc, _, err = _run(["patch", str(SQUARE), "--data", str(SCAN), "--filter", "--report", str(report7),
                           "-o", str(out), "--output-report", str(rep), "--device", "cpu", "-q"])
    assert rc == 0, err
    return out, rep


def test_patch_output_and_report_respect_umask(filtered: tuple[Path, Path]) -> None:
    out, rep = filtered
    assert oct(_mode(out)) == oct(0o664) and oct(_mode(rep)) == oct(0o664)


def test_adapters_use_the_package_writer() -> None:
    src = (ROOT / "adapters" / "_common.py").read_text()
    assert "mkstemp" not in src and "os.umask" not in src


# ------------------------------------------------------------------ 4. output meant for CI logs


def test_json_to_a_pipe_keeps_the_verdict_on_stderr(short_scan: dict[str, Any]) -> None:
    assert short_scan["rc"] == 4
    rep = json.loads(short_scan["out"])  # stdout: exactly the JSON document
    lines = [ln for ln in short_scan["err"].splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("INCONCLUSIVE: ") and rep["reasons"][0] in " ".join(lines[-3:])
    assert "┃" not in short_scan["err"]  # the verdict, not the whole table


def test_table_outside_a_terminal_is_ascii(tmp_path: Path) -> None:
    """In a CI log and in `-o report.txt` the trigger preview is ASCII greyscale: the 4x4
    white square of mnist_badnets_square shows as bright characters on blank ones."""
    out = tmp_path / "report.txt"
    with _umask(UMASK):
        rc, _, err = _run([str(SQUARE), "--data", str(SCAN), "-o", str(out), "--device", "cpu"])
    assert rc == 1, err
    assert oct(_mode(out)) == oct(0o666 & ~UMASK)
    for text in (out.read_text(), err):
        assert "▀" not in text and "\x1b[" not in text
        panel = text.split("reversed trigger", 1)[1]
        rows = [ln for ln in panel.splitlines() if ln.startswith("│")]
        assert any(ch in "".join(rows) for ch in "#%@"), text


def test_framework_log_noise_is_silenced(tmp_path: Path) -> None:
    """torch's deprecation warnings and exporter notices do not reach the user's stderr."""
    import torch

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10)).eval()
    ts = tmp_path / "m_ts.pt"
    torch.jit.script(net).save(str(ts))
    p = subprocess.run(
        [sys.executable, "-m", "ncscan", "export", "--from", "torch", str(ts), "-o", str(tmp_path / "m.onnx"),
         "--input-shape", "1,28,28"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith(("wrote ", "warning:")) for ln in lines), p.stderr


# ------------------------------------------------------------------ 5. patch edge cases


def test_patch_on_an_inconclusive_report_exits_4(report7: Path, tmp_path: Path) -> None:
    d = json.loads(report7.read_text())
    reason = "no trigger reached 99% attack success for label(s) 3 within 2 steps"
    d.update(verdict="inconclusive", flagged=[], reasons=[reason])
    d["labels"][0]["flagged"] = False
    inc = tmp_path / "inconclusive.json"
    inc.write_text(json.dumps(d))
    out = tmp_path / "x.onnx"
    rc, stdout, err = _run(["patch", str(SQUARE), "--data", str(SCAN), "--unlearn", "--report", str(inc),
                            "-o", str(out), "-f", "json", "--device", "cpu"])
    assert rc == 4 and not out.exists()
    res = json.loads(stdout)
    assert res["labels"] == [] and res["scan_verdict"] == "inconclusive" and res["scan_reasons"] == [reason]
    assert "INCONCLUSIVE" in err and reason in err and "needs no patch" not in err


def test_patch_forced_label_without_a_working_trigger_is_refused(tmp_path: Path) -> None:
    """--label 4 on the clean model with one optimisation step: its reversal never reaches a
    working trigger, so there is nothing to unlearn against."""
    out = tmp_path / "x.onnx"
    rc, _, err = _run(["patch", str(CLEAN), "--data", str(SCAN), "--unlearn", "--label", "4", "--max-steps", "1",
                       "-o", str(out), "--device", "cpu"])
    assert rc == 2 and not out.exists()
    errors = [ln for ln in err.splitlines() if ln.startswith("ncscan: error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err
    assert "--label 4: no reversed trigger for it reached 99% attack success" in errors[0]


def test_patch_minimum_images_check_and_message_agree(report7: Path, tmp_path: Path) -> None:
    from ncscan.data import MIN_IMAGES
    from ncscan.patch import min_images

    assert min_images() == MIN_IMAGES
    z = np.load(TEST)
    for n in (MIN_IMAGES - 1, MIN_IMAGES):
        data = tmp_path / f"n{n}.npz"
        np.savez(data, x=z["x"][:n], y=z["y"][:n])
        rc, _, err = _run(["patch", str(SQUARE), "--data", str(data), "--filter", "--report", str(report7),
                           "-o", str(tmp_path / f"p{n}.onnx"), "--device", "cpu", "-q"])
        if n < MIN_IMAGES:
            assert rc == 2
            _one_line_error(err, f"needs at least {MIN_IMAGES} ")
        else:
            assert rc in (0, 1), err  # patched (its cross-fitted accuracy guard may refuse), not refused
            assert "at least" not in err


def test_unlearn_and_filter_calibrate_on_the_original_network(report7: Path, tmp_path: Path) -> None:
    """--unlearn --filter: the filter profiles the ORIGINAL network (a copy of its path to the
    activation rides in the wrapper), so it still flags triggered inputs after unlearning."""
    import onnx
    import onnxruntime as ort

    from ncscan.trigger import Trigger

    out = tmp_path / "both.onnx"
    rc, stdout, err = _run(["patch", str(SQUARE), "--data", str(SCAN), "--unlearn", "--filter", "--report", str(report7),
                            "-o", str(out), "-f", "json", "--device", "cpu"])
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["filter_calibrated_on"] == "original" and res["filter_fnr"] <= 0.15  # measured on images the filter was not calibrated on
    assert res["parity_filter_max_rel"] < 1e-4
    z = np.load(TEST)
    x = z["x"].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    keep = z["y"] != 7
    xt = Trigger.load(str(FIX / "triggers" / "mnist_badnets_square_t7.npz")).apply(x[keep]).astype(np.float32)
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    flag_clean = s.run(["ncscan_flag"], {name: x})[0]
    out_trig, flag_trig = s.run(["output", "ncscan_flag"], {name: xt})
    assert float((~flag_trig).mean()) <= 0.05  # true-trigger images flagged (was 55.8% missed)
    assert float(flag_clean.mean()) <= 0.10
    assert float((out_trig.argmax(1) == 7).mean()) <= 0.05  # and the network itself is unlearned
    g = onnx.load(str(out)).graph
    assert any(n.name.startswith("ncscan_orig/") for n in g.node)


# ------------------------------------------------------------------ 6. API and CLI papercuts


def test_dash_h_and_untruncated_command_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["-h"]) == 0
    top = capsys.readouterr().out
    assert "Commands:" in top and "..." not in top.split("Commands:", 1)[1]
    for cmd in ("scan", "patch", "export", "scan-many"):
        assert cmd in top
        assert run([cmd, "-h"]) == 0
        assert "--help" in capsys.readouterr().out


def test_prescreen_on_at_few_labels_says_why(short_scan: dict[str, Any]) -> None:
    rep = json.loads(short_scan["out"])
    msg = [w for w in rep["warnings"] if w.startswith("--prescreen on was not used")]
    assert msg and "needs more than 32 labels" in msg[0] and "this scan has 10" in msg[0]
    assert msg[0] in short_scan["err"]  # also on stderr


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"lr": "x"}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_steps": 2.5}, "max_steps"),
        ({"betas": [0.5]}, "betas"),
        ({"early_stop": "yes"}, "early_stop"),
        ({"attack_succ_threshold": 1.5}, "attack_succ_threshold"),
        ({"label_chunk": True}, "label_chunk"),
    ],
)
def test_config_values_are_checked(cfg: dict[str, Any], key: str, tmp_path: Path) -> None:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(cfg))
    rc, _, err = _run([str(CLEAN), "--data", str(SCAN), "--config", str(p), "--device", "cpu"])
    assert rc == 2, err
    _one_line_error(err, f"--config {p}: {key} must be ")
    assert f"fix {key} in {p}" in err


def test_filtered_model_serves_greyscale_batches_and_keeps_the_batch_axis(filtered: tuple[Path, Path]) -> None:
    import onnx

    from ncscan.serve import FilteredModel

    out, _ = filtered
    g = onnx.load(str(out)).graph
    batch = g.input[0].type.tensor_type.shape.dim[0].dim_param
    assert batch == "batch"
    for o in g.output:
        if o.name.startswith("ncscan_"):
            assert o.type.tensor_type.shape.dim[0].dim_param == batch
    x = np.load(TEST)["x"][:20]  # uint8 N,H,W,1
    fm = FilteredModel(out)
    ref = fm.predict(x)
    got = fm.predict(x[..., 0])  # N,H,W
    assert got.labels.shape == (20,)
    np.testing.assert_array_equal(got.labels, ref.labels)
    np.testing.assert_array_equal(got.flags, ref.flags)
    one = fm.predict(x[0])  # one H,W,1 image is still one image
    assert one.labels.shape == (1,)


@pytest.mark.parametrize("which", ["model", "data"])
def test_missing_paths_fail_before_torch_is_imported(which: str, tmp_path: Path) -> None:
    args = ["nope.onnx", "--data", str(SCAN)] if which == "model" else [str(CLEAN), "--data", "nope_dir"]
    for cmd in (["scan"], ["patch", "--unlearn", "-o", "x.onnx"]):
        code = (
            "import sys\nfrom ncscan.cli import run\n"
            f"rc = run({[cmd[0], *args, *cmd[1:]]!r})\n"
            "print(rc, 'torch' in sys.modules)"
        )
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert p.stdout.split() == ["2", "False"], p.stdout + p.stderr
        _one_line_error(p.stderr, "nope")


def test_max_images_subset_is_class_stratified() -> None:
    from ncscan.data import load_data

    for k in (50, 37):
        ds = load_data(SCAN, channels=1, size=(28, 28), num_classes=10, max_images=k, seed=3)
        assert ds.y is not None and len(ds.y) == k
        counts = np.bincount(ds.y, minlength=10)
        assert counts.max() - counts.min() <= 1, counts  # 30 images per class in the folder
