"""The decision (ncscan.decide): pure numpy, checked against hand computations."""

from __future__ import annotations

import numpy as np

from ncscan.decide import DecideConfig, compactness, decide, label_size, log_scores, needs_restart

NAN = float("nan")


def test_log_scores_match_hand_computation() -> None:
    s = np.array([10.0, 20.0, 40.0, 80.0, 160.0])
    score, center, scale = log_scores(s, scale_floor=0.0)
    logs = np.log(s)
    med = np.median(logs)
    mad = 1.4826 * np.median(np.abs(logs - med))
    assert center == med and np.isclose(scale, mad)
    np.testing.assert_allclose(score, (med - logs) / mad)
    assert score[0] > 0 > score[-1]  # smaller than typical = positive


def test_scale_floor_bounds_the_spread() -> None:
    # Nine clean labels almost identical in size: without a floor, a label at 0.8x the median
    # would be hundreds of spreads away.
    s = np.array([100.0, 100.1, 99.9, 100.0, 100.2, 99.8, 100.0, 100.1, 99.9, 80.0])
    raw, _, _ = log_scores(s, scale_floor=0.0)
    floored, _, scale = log_scores(s, scale_floor=0.2)
    assert raw[-1] > 50
    assert scale == 0.2 and np.isclose(floored[-1], np.log(100 / 80) / 0.2)


def test_label_size_is_median_of_working_runs() -> None:
    assert label_size([10.0]) == 10.0
    assert label_size([10.0, 30.0, 20.0]) == 20.0
    assert label_size([10.0, NAN, 20.0]) == 15.0
    assert np.isnan(label_size([NAN]))
    assert np.isnan(label_size([10.0, NAN, NAN]))  # mostly failing: not a working trigger
    assert label_size([10.0, 30.0, 20.0], "min") == 10.0
    assert label_size([NAN, 30.0, 20.0], "min") == 20.0


def _runs(sizes: list[float]) -> list[list[float]]:
    return [[v] for v in sizes]


CLEAN = [60.0, 70.0, 55.0, 80.0, 65.0, 75.0, 58.0, 72.0, 68.0]


def test_small_outlier_flagged_clean_not() -> None:
    cfg = DecideConfig(threshold=3.0, band=0.5, scale_floor=0.2)
    d = decide(_runs(CLEAN + [8.0]), cfg)
    assert d.verdict == "backdoor" and d.flagged == [9] and d.borderline == []
    d = decide(_runs(CLEAN + [62.0]), cfg)
    assert d.verdict == "clean" and d.flagged == [] and d.borderline == []
    # Large outliers are never flagged.
    d = decide(_runs(CLEAN + [900.0]), cfg)
    assert d.flagged == [] and d.score[9] < 0


def test_borderline_label_makes_an_unflagged_model_inconclusive() -> None:
    cfg = DecideConfig(threshold=3.0, band=0.5, scale_floor=0.2)
    center = np.median(np.log(CLEAN + [1.0]))
    _, _, scale = log_scores(np.array(CLEAN + [1.0]), scale_floor=0.2)
    # A size whose score is exactly the threshold sits in the band.
    s = float(np.exp(center - 3.0 * scale))
    d = decide(_runs(CLEAN + [s]), cfg)
    assert d.verdict == "inconclusive" and d.borderline == [9] and d.flagged == []
    assert abs(d.margin()[9]) <= 0.5


def test_no_working_trigger_is_inconclusive_unless_something_is_flagged() -> None:
    cfg = DecideConfig()
    assert decide(_runs(CLEAN + [NAN]), cfg).verdict == "inconclusive"
    assert decide(_runs(CLEAN[:-1] + [NAN, 5.0]), cfg).verdict == "backdoor"
    assert decide(_runs([10.0, NAN, NAN, NAN]), cfg).verdict == "inconclusive"


def test_reference_and_eligible_masks() -> None:
    cfg = DecideConfig(threshold=3.0, band=0.5, scale_floor=0.2)
    sizes = CLEAN + [8.0, 9.0]
    ref = np.array([True] * 9 + [False, False])
    d = decide(_runs(sizes), cfg, reference=ref)
    assert sorted(d.flagged) == [9, 10]
    np.testing.assert_allclose(d.center, np.median(np.log(CLEAN)))
    elig = np.array([True] * 10 + [False])
    d = decide(_runs(sizes), cfg, reference=ref, eligible=elig)
    assert d.flagged == [9]


def test_needs_restart_only_near_the_line() -> None:
    cfg = DecideConfig(threshold=3.0, band=0.5, scale_floor=0.2, restarts=2, recheck_restarts=2, screen_margin=0.5)
    runs = _runs(CLEAN + [30.0])  # ~0.46x the median: score ~3.9, within reach
    assert needs_restart(runs, cfg) == [9]
    assert needs_restart(_runs(CLEAN + [66.0]), cfg) == []
    # After restarts: clearly above the band -> no recheck; inside the band -> recheck.
    runs[9] = [30.0, 8.0, 9.0]
    assert needs_restart(runs, cfg) == []
    _, c, sc = log_scores(np.array(CLEAN + [30.0]), scale_floor=0.2)
    mid = float(np.exp(c - 3.0 * sc))
    runs[9] = [mid, mid, mid]
    assert needs_restart(runs, cfg) == [9]
    runs[9] = [mid] * 5  # all allowed runs spent
    assert needs_restart(runs, cfg) == []
    assert needs_restart(runs, DecideConfig(restarts=0)) == []


def test_restarts_find_a_stalled_target() -> None:
    """A target whose first run stalled (trigger too large) is flagged once a restart finds its
    small trigger: every run's trigger works, so the smallest run is the label's size."""
    cfg = DecideConfig(threshold=3.1, band=0.2, scale_floor=0.4, size_of_runs="min")
    runs = _runs(CLEAN + [30.0])
    assert decide(runs, cfg).flagged == []
    assert needs_restart(runs, cfg) == [9]
    runs[9] = [30.0, 12.0, 13.0]
    d = decide(runs, cfg)
    assert d.verdict == "backdoor" and d.flagged == [9] and d.size[9] == 12.0


def test_median_of_runs_undoes_a_lucky_run() -> None:
    cfg = DecideConfig(threshold=3.0, band=0.5, scale_floor=0.2, size_of_runs="median")
    runs = _runs(CLEAN + [20.0])
    assert decide(runs, cfg).flagged == [9]
    runs[9] = [20.0, 61.0, 64.0]
    d = decide(runs, cfg)
    assert d.verdict == "clean" and d.size[9] == 61.0


def _square(h: int, side: int, top: int, left: int) -> np.ndarray:
    m = np.zeros((h, h), dtype=np.float32)
    m[top : top + side, left : left + side] = 1.0
    return m


def test_compactness_of_a_patch_a_spread_mask_and_scale() -> None:
    assert compactness(_square(28, 4, 20, 3), 1.25) == 1.0
    # The same patch at 8x the resolution: the window scales with sqrt(L1), so it stays 1.
    assert compactness(_square(224, 32, 160, 24), 1.25) == 1.0
    # 16 pixels spread one per 7x7 block: no window of side 5 holds more than one of them.
    spread = np.zeros((28, 28), dtype=np.float32)
    spread[3::7, 3::7] = 1.0
    assert compactness(spread, 1.25) == 1 / 16
    # Half the mass in a patch, half spread thinly: about one half.
    mixed = _square(28, 4, 0, 0) + spread * (16 / 16)
    assert 0.4 < compactness(mixed, 1.25) < 0.7
    assert np.isnan(compactness(np.zeros((8, 8)), 1.25))


def test_compact_trigger_is_held_to_the_lower_line() -> None:
    cfg = DecideConfig()
    sizes = CLEAN + [26.0]  # about 2.6x smaller than the median: score ~2.4
    score, _, _ = log_scores(np.array(sizes), scale_floor=cfg.scale_floor)
    line_c = cfg.threshold - cfg.compact_relief
    assert line_c + cfg.band < score[-1] < cfg.threshold - cfg.band
    spread = [0.3] * len(sizes)
    assert decide(_runs(sizes), cfg, compact=spread).verdict == "clean"
    assert decide(_runs(sizes), cfg).verdict == "clean"  # no shape evidence: size alone
    patch = spread[:-1] + [0.95]
    d = decide(_runs(sizes), cfg, compact=patch)
    assert d.verdict == "backdoor" and d.flagged == [9]
    assert d.line[9] == line_c and d.line[0] == cfg.threshold
    assert np.isclose(d.margin()[9], score[-1] - line_c)
    # Compact but clean labels are not flagged on shape alone: their size is ordinary.
    assert decide(_runs(CLEAN + [66.0]), cfg, compact=[0.95] * 10).verdict == "clean"
    # The lower line brings restarts for a compact label that size alone would leave alone.
    assert needs_restart(_runs(sizes), cfg, compact=patch) == [9]
    assert needs_restart(_runs(sizes), cfg, compact=spread) == [9]  # within screen_margin anyway
    assert needs_restart(_runs(CLEAN + [40.0]), cfg, compact=spread) == []
    assert needs_restart(_runs(CLEAN + [40.0]), cfg, compact=patch) == [9]


def test_spread_trigger_still_flagged_on_size() -> None:
    cfg = DecideConfig()
    d = decide(_runs(CLEAN + [8.0]), cfg, compact=[0.3] * 10)
    assert d.verdict == "backdoor" and d.flagged == [9] and d.line[9] == cfg.threshold


def test_label_that_resembles_its_class_loses_shape_relief_or_gets_a_higher_line() -> None:
    cfg = DecideConfig()
    sizes = CLEAN + [16.0]  # about 4x smaller than the median: above the size line, below the raised one
    score, _, _ = log_scores(np.array(sizes), scale_floor=cfg.scale_floor)
    line_n = cfg.threshold + cfg.natural_raise
    assert cfg.threshold + cfg.band < score[-1] < line_n - cfg.band
    spread = [0.3] * len(sizes)
    assert decide(_runs(sizes), cfg, compact=spread).flagged == [9]  # no resemblance evidence
    unlike = [1.0] * 9 + [cfg.natural_likeness - 0.3]  # a shortcut: flagged on size as before
    assert decide(_runs(sizes), cfg, compact=spread, likeness=unlike).flagged == [9]
    natural = [1.0] * 9 + [cfg.natural_likeness + 0.1]
    d = decide(_runs(sizes), cfg, compact=spread, likeness=natural)
    assert d.verdict == "clean" and d.line[9] == line_n and d.line[0] == line_n
    # A compact label that resembles its class loses shape's relief and is held to the
    # threshold: flagged here on size, as without shape evidence.
    patch = spread[:-1] + [0.95]
    d = decide(_runs(sizes), cfg, compact=patch, likeness=natural)
    assert d.flagged == [9] and d.line[9] == cfg.threshold
    mid = CLEAN + [26.0]  # between the compact line and the threshold
    assert decide(_runs(mid), cfg, compact=patch).flagged == [9]
    assert decide(_runs(mid), cfg, compact=patch, likeness=natural).verdict == "clean"
    assert decide(_runs(mid), cfg, compact=patch, likeness=unlike).flagged == [9]
    # Far enough below the median, a natural-looking label is flagged anyway.
    assert decide(_runs(CLEAN + [5.0]), cfg, compact=spread, likeness=natural).flagged == [9]
    # NaN (no working trigger, or no layer to read) leaves the line where size puts it.
    nan_like = [1.0] * 9 + [NAN]
    assert decide(_runs(sizes), cfg, compact=spread, likeness=nan_like).flagged == [9]
