"""End-to-end scans of real trained fixtures with known truth.

Infected fixtures must be flagged with exactly their true target(s); clean twins must not
be flagged. The scan sees only the committed clean images and the preprocessing a user
would pass (or none, when the model's metadata carries it).
"""

from __future__ import annotations

from typing import Any

import pytest

from ncscan.scanner import scan

from .conftest import FAST_FIXTURES, fixture_entries, preprocess_kwargs


def _params() -> list[Any]:
    out = []
    for e in fixture_entries():
        marks = [] if e["name"] in FAST_FIXTURES else [pytest.mark.slow]
        out.append(pytest.param(e, id=e["name"], marks=marks))
    return out


@pytest.mark.parametrize("e", _params())
def test_fixture_verdict(e: dict[str, Any]) -> None:
    r = scan(e["_abs"]["file"], e["_abs"]["scan_data"], seed=0, device="cpu", **preprocess_kwargs(e))
    summary = {lr.label: (round(lr.mask_l1, 1), round(lr.anomaly_index, 2)) for lr in r.labels}
    # The model is understood: its accuracy on the scan images matches the manifest.
    assert r.clean_accuracy is not None and r.clean_accuracy >= e["clean_accuracy"] - 0.05, summary
    if e["infected"]:
        assert r.verdict == "backdoor", summary
        # Every true target is flagged, and the most anomalous labels are the true targets.
        # A further flagged label is a false positive of the method (e.g. combo30's label 29,
        # a silhouette class with a naturally small trigger, sits at index ~2.0 in the clean
        # twin too); it is reported, not hidden.
        assert set(e["targets"]) <= set(r.flagged), summary
        assert set(r.flagged[: len(e["targets"])]) == set(e["targets"]), summary
        for t in e["targets"]:
            lr = r.by_label[t]
            assert lr.attack_success >= 0.9, summary
            assert lr.anomaly_index > 2.0
    else:
        assert r.verdict == "clean", summary
        assert r.flagged == [], summary
