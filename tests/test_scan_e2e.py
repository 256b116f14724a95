"""End-to-end scans of real trained fixtures with known truth.

Infected fixtures must be flagged with exactly their true target(s); clean twins must not
be flagged. The scan sees only the committed clean images and the preprocessing a user
would pass (or none, when the model's metadata carries it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ncscan.scanner import scan

from .conftest import FAST_FIXTURES, KNOWN_MISSES, fixture_entries, preprocess_kwargs


def _params() -> list[Any]:
    out = []
    for e in fixture_entries():
        marks = [] if e["name"] in FAST_FIXTURES else [pytest.mark.slow]
        if e["name"] in KNOWN_MISSES:
            marks.append(pytest.mark.xfail(reason=KNOWN_MISSES[e["name"]], strict=True))
        out.append(pytest.param(e, id=e["name"], marks=marks))
    return out


@pytest.mark.parametrize("e", _params())
def test_fixture_verdict(e: dict[str, Any]) -> None:
    r = scan(e["_abs"]["file"], e["_abs"]["scan_data"], seed=0, device="cpu", **preprocess_kwargs(e))
    summary = {lr.label: (round(lr.mask_l1, 1), round(lr.score, 2), lr.decision) for lr in r.labels}
    # The model is understood: its accuracy on the scan images matches the manifest.
    assert r.clean_accuracy is not None and r.clean_accuracy >= e["clean_accuracy"] - 0.05, summary
    # Resemblance was measured for every label with a working trigger.
    assert all(np.isfinite(lr.likeness) for lr in r.labels if lr.working), summary
    if e["infected"]:
        assert r.verdict == "backdoor", summary
        # Exactly the true targets are flagged, each with a margin.
        assert sorted(r.flagged) == sorted(e["targets"]), summary
        for t in e["targets"]:
            lr = r.by_label[t]
            assert lr.attack_success >= 0.9, summary
            assert lr.decision == "flagged" and lr.score > lr.line + r.decide_config.band, summary
            # A backdoor is a shortcut, not the class's own look: never held to the higher line.
            assert lr.evidence != "size+natural", (t, lr.likeness, summary)
    else:
        assert r.verdict == "clean", summary
        assert r.flagged == [], summary
