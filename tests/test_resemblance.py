"""ncscan.resemblance: the relative likeness of a trigger to its class's own clean images."""

from __future__ import annotations

import numpy as np
import torch

from ncscan.resemblance import _raw, relative


def test_relative_is_over_the_median_and_keeps_nan() -> None:
    rel = relative({0: 0.2, 1: 0.4, 2: 0.8, 3: float("nan"), 4: -0.1})
    assert rel[1] == 1.0 and rel[0] == 0.5 and rel[2] == 2.0
    assert np.isnan(rel[3]) and rel[4] < 0
    assert all(np.isnan(v) for v in relative({0: float("nan")}).values())


def test_raw_separates_moving_toward_the_class_from_a_new_direction() -> None:
    g = torch.Generator().manual_seed(0)
    # Three classes in a 6-d activation space, each around its own centre.
    centres = torch.eye(6, dtype=torch.float64)[:3] * 4
    cls = torch.arange(3).repeat_interleave(20)
    a = centres[cls] + 0.3 * torch.randn(60, 6, generator=g, dtype=torch.float64)
    others = a[cls != 0]
    flipped = torch.ones(len(others), dtype=torch.bool)
    # Natural: stamped images of classes 1, 2 land among class 0's images.
    natural = centres[0] + 0.3 * torch.randn(len(others), 6, generator=g, dtype=torch.float64)
    # Shortcut: they keep their own features and gain a new one (unit 5) the class never uses.
    shortcut = others + torch.tensor([0, 0, 0, 0, 0, 6.0], dtype=torch.float64)
    r_nat = _raw(a, natural, flipped, cls, 0)
    r_cut = _raw(a, shortcut, flipped, cls, 0)
    assert r_nat > 0.8 and r_cut < 0.2
    assert np.isnan(_raw(a, natural, torch.zeros(len(others), dtype=torch.bool), cls, 0))
