"""Pre-screening (K-Arm-style scheduling) on a tiny many-class model: bookkeeping only.

Detection quality with pre-screening is measured in bench/scaling.py on a real backbone.
"""

from __future__ import annotations

from pathlib import Path

from ncscan.prescreen import KEEP_MIN as PRESCREEN_KEEP_MIN
from ncscan.prescreen import SAMPLE as PRESCREEN_SAMPLE
from ncscan.prescreen import applies, unused_note
from ncscan.prescreen import keep_size as prescreen_keep_size
from ncscan.prescreen import sample_size as prescreen_sample_size
from ncscan.scanner import scan

from . import tiny


def test_prescreen_optimises_a_subset_and_reports_all(workdir: Path) -> None:
    m = tiny.linear_classifier(workdir / "wide.onnx", classes=80)
    d = tiny.write_images(workdir / "imgs", n=40, classes=4)
    r = scan(m, d, device="cpu", prescreen="on", schedule="fast", seed=0, force=True)  # random data
    assert len(r.labels) == 80
    full = [x for x in r.labels if not x.screened_out]
    assert prescreen_keep_size(80) <= len(full) <= prescreen_keep_size(80) + prescreen_sample_size(80)
    assert all(not x.flagged for x in r.labels if x.screened_out)
    assert all(0.0 <= x.attack_success <= 1.0 for x in r.labels)
    # Screened-out labels got only the short stage-1 budget.
    assert max(x.steps for x in r.labels if x.screened_out) <= 20


def test_prescreen_sample_grows_with_labels() -> None:
    assert prescreen_sample_size(80) == PRESCREEN_SAMPLE
    assert prescreen_sample_size(1000) == 100
    assert prescreen_sample_size(2622) == 256
    assert prescreen_sample_size(10) == 10


def test_prescreen_suspects_grow_like_sqrt() -> None:
    assert prescreen_keep_size(10) == 8
    assert prescreen_keep_size(5) == 5
    assert prescreen_keep_size(80) == 9
    assert prescreen_keep_size(1000) == 32
    assert prescreen_keep_size(10_000) == 100
    assert all(prescreen_keep_size(n) >= min(n, PRESCREEN_KEEP_MIN) for n in range(1, 200))


def test_prescreen_applies_only_with_enough_labels() -> None:
    assert not applies("auto", 64) and applies("auto", 65)
    assert not applies("on", PRESCREEN_SAMPLE + PRESCREEN_KEEP_MIN) and applies("on", PRESCREEN_SAMPLE + PRESCREEN_KEEP_MIN + 1)
    assert not applies("off", 10_000)
    assert "this scan has 10" in unused_note(10)
