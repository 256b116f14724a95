"""The verdict: per-label trigger sizes (one or more runs each) in; verdict, margins, reasons out.

Pure numpy, so the bench can replay stored evidence without re-optimising.

The statistic. Trigger sizes are scale quantities: a clean label twice the median and one half
of it are equally unusual, and a few large clean labels must not widen the yardstick the small
ones are measured with. So each label's size is taken in log space and compared with the
others':

    score_t = (median_j log s_j - log s_t) / max(1.4826 * MAD_j(log s_j), scale_floor)

positive when label t's trigger is smaller than typical. The median and MAD are over all
labels that reached a working trigger (or the reference sample, with pre-screening), as in
the paper; only the log and the floor differ. The floor keeps a tight group of clean labels
from turning an ordinary difference (say 0.7x the median) into a large score.

A label's size is the SMALLEST of its runs. Every run's trigger is a verified working trigger
(>= 99% attack success on fixed images), so each run's L1 is an upper bound on the label's
true smallest trigger, and the optimisation's error is one-sided: a run that stalls reports a
trigger too large, never one too small. A backdoor target whose first run stalled (measured:
up to 2x its true size) is found small again from another start. Restarts (other random starts
and image orders) go only to labels near the line, so a model whose labels are all far from it
costs no more than one run.

Shape, the second piece of evidence. Some clean classes naturally have small triggers (a
silhouette class, a "Bag"): their reversed masks are spread thinly over the image. A patch
backdoor's reversed mask is concentrated: most of its mass sits in one small square. A label's
`compactness` is the largest share of its mask's mass inside one square window of side
`compact_window * sqrt(L1)` (so it scales with the trigger, not with the image). A compact
label (compactness >= compact_share) is held to a lower line, threshold - compact_relief; any
other label to the threshold itself. Shape only ever lowers the line: a spread-out trigger that
is small enough (a watermark, a blended pattern) is flagged on size alone, as before.

Resemblance, the third piece (`ncscan.resemblance`). A label whose stamped images look, inside
the network, like the class's own clean images (likeness >= natural_likeness) reaches its class
the natural way, and shape's benefit of the doubt no longer applies: a compact one is held to
the threshold (no relief), a spread-out one to a higher line, threshold + natural_raise. A
label that does not resemble its class keeps the line shape gives it.

Decision bands (all in score units): flagged when score > line + band; borderline when within
`band` of the line after the allowed re-checks; otherwise not flagged. A verdict never rests
on a borderline label: a model with one and no flagged label is inconclusive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of a normal's std


@dataclass(frozen=True)
class DecideConfig:
    """The decision's constants (chosen on the TUNING split of bench/evalset; see bench/verdict.md).

    Attributes:
        threshold: score above which a label is a backdoor target (the centre of the band).
        band: half-width of the borderline band around the threshold, in score units.
        scale_floor: lower bound of the log-size spread (natural log units).
        restarts: extra runs given to each label whose single-run score is within reach of
            the threshold (score > threshold - band - screen_margin).
        recheck_restarts: further runs for labels still borderline after the restarts.
        screen_margin: how far below the band a single run's score still earns restarts (a
            single run is noisier than the median of several).
        size_of_runs: how a label's runs make its size: "min" (default) or "median".
        compact_window: side of the compactness window, in units of sqrt(mask L1).
        compact_share: compactness at or above which a label is held to the lower line.
        compact_relief: how much lower (in score units) the line is for a compact label.
        natural_likeness: resemblance (`ncscan.resemblance.likeness`) at or above which a
            label counts as reached the natural way.
        natural_raise: how much higher (in score units) the line is for such a label when its
            trigger is spread out (a compact one is held to the threshold).
    """

    threshold: float = 3.1
    band: float = 0.2
    scale_floor: float = 0.4
    restarts: int = 2
    recheck_restarts: int = 2
    screen_margin: float = 1.0
    size_of_runs: str = "min"
    compact_window: float = 1.25
    compact_share: float = 0.52
    compact_relief: float = 1.3
    natural_likeness: float = 0.75
    natural_raise: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    """What the evidence says."""

    verdict: str  # "backdoor" | "clean" | "inconclusive"
    flagged: list[int]  # positions, largest score first
    borderline: list[int]  # positions within the band (not flagged)
    score: np.ndarray  # per position; NaN where no working trigger
    size: np.ndarray  # per position: median L1 over its runs (NaN when none worked)
    center: float  # median log size
    scale: float  # the spread used (after the floor)
    line: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per position: its line
    reasons: list[str] = field(default_factory=list)

    def margin(self) -> np.ndarray:
        """Score minus the label's line: how far each label sits from it."""
        return self.score - self.line


def label_size(runs: Sequence[float], how: str = "median") -> float:
    """A label's size from its runs: the median (or min) of the runs that found a working
    trigger. NaN when none did; a label whose runs mostly failed counts as not found."""
    v = np.asarray(runs, dtype=np.float64)
    ok = v[np.isfinite(v)]
    if len(ok) == 0 or len(ok) * 2 < len(v):
        return float("nan")
    return float(np.min(ok) if how == "min" else np.median(ok))


def log_scores(
    size: np.ndarray, *, scale_floor: float, reference: np.ndarray | None = None
) -> tuple[np.ndarray, float, float]:
    """(score per label, centre, scale) of log sizes; NaN sizes get NaN scores.

    Args:
        size: per-label trigger L1 (NaN = no working trigger).
        scale_floor: lower bound of the spread.
        reference: boolean mask of the labels that define centre and spread (default: all).
    """
    s = np.asarray(size, dtype=np.float64)
    ok = np.isfinite(s) & (s > 0)
    score = np.full(s.shape, np.nan)
    ref = ok if reference is None else ok & np.asarray(reference, dtype=bool)
    if ref.sum() == 0:
        ref = ok
    if ref.sum() == 0:
        return score, float("nan"), float("nan")
    logs = np.log(s[ref])
    center = float(np.median(logs))
    scale = max(CONSISTENCY * float(np.median(np.abs(logs - center))), scale_floor)
    score[ok] = (center - np.log(s[ok])) / scale
    return score, center, scale


def compactness(mask: np.ndarray, window: float) -> float:
    """The largest share of the mask's mass inside one square of side ceil(window * sqrt(L1))
    pixels (at least 2, at most the image): near 1 for a patch, small for a spread-out mask.
    NaN for an empty mask."""
    m = np.clip(np.asarray(mask, dtype=np.float64), 0.0, None)
    total = float(m.sum())
    if not np.isfinite(total) or total <= 0:
        return float("nan")
    h, w = m.shape
    side = min(max(2, int(np.ceil(window * np.sqrt(total)))), h, w)
    c = np.pad(m.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # integral image: O(h*w) for any side
    sums = c[side:, side:] - c[:-side, side:] - c[side:, :-side] + c[:-side, :-side]
    return float(min(sums.max() / total, 1.0))


def lines(
    compact: Sequence[float] | None, n: int, cfg: DecideConfig, likeness: Sequence[float] | None = None
) -> np.ndarray:
    """Each position's decision line. A label that resembles its class (likeness >=
    natural_likeness): threshold + natural_raise when its trigger is spread out, the threshold
    when it is compact. Any other label: threshold - compact_relief when compact (compactness
    >= compact_share), else the threshold. NaN evidence counts as absent."""
    line = np.full(n, cfg.threshold, dtype=np.float64)
    is_compact = np.zeros(n, dtype=bool)
    natural = np.zeros(n, dtype=bool)
    if compact is not None:
        is_compact = np.nan_to_num(np.asarray(compact, dtype=np.float64), nan=-1.0) >= cfg.compact_share
    if likeness is not None:
        natural = np.nan_to_num(np.asarray(likeness, dtype=np.float64), nan=-np.inf) >= cfg.natural_likeness
    line[is_compact & ~natural] -= cfg.compact_relief
    line[natural & ~is_compact] += cfg.natural_raise
    return line


def needs_restart(
    runs: list[list[float]],
    cfg: DecideConfig,
    reference: np.ndarray | None = None,
    compact: Sequence[float] | None = None,
) -> list[int]:
    """Positions whose evidence is near enough their line that more runs could change the call.

    A label with one run is re-run when its score is above line - band - screen_margin; a
    label with more runs (up to 1 + restarts + recheck_restarts) when it is still within the
    band. `compact`: per position, the compactness of the run that gives its size.
    """
    size = np.array([label_size(r, cfg.size_of_runs) for r in runs])
    score, _, _ = log_scores(size, scale_floor=cfg.scale_floor, reference=reference)
    line = lines(compact, len(runs), cfg)
    out = []
    for i, r in enumerate(runs):
        if not np.isfinite(score[i]):
            continue
        if len(r) == 1 and score[i] > line[i] - cfg.band - cfg.screen_margin and cfg.restarts > 0:
            out.append(i)
        elif 1 < len(r) < 1 + cfg.restarts + cfg.recheck_restarts and abs(score[i] - line[i]) <= cfg.band:
            out.append(i)
    return out


def decide(
    runs: list[list[float]],
    cfg: DecideConfig,
    *,
    reference: np.ndarray | None = None,
    eligible: np.ndarray | None = None,
    compact: Sequence[float] | None = None,
    likeness: Sequence[float] | None = None,
) -> Decision:
    """The verdict from per-label runs.

    Args:
        runs: per label (position), the L1 of each run's best working trigger (NaN = none).
        cfg: the decision constants.
        reference: labels that define the centre and spread (pre-screening's sample).
        eligible: labels that may be flagged (pre-screening: not screened out); default all.
        compact: per position, the compactness of the run that gives its size (None: size
            alone, every label held to the threshold).
        likeness: per position, that run's resemblance to its class (None: not used).

    Returns:
        The Decision. Verdict "inconclusive" when fewer than 3 labels have a working trigger,
        when a label that may be flagged never reached one, or when a label stays borderline
        and nothing is flagged.
    """
    size = np.array([label_size(r, cfg.size_of_runs) for r in runs])
    score, center, scale = log_scores(size, scale_floor=cfg.scale_floor, reference=reference)
    elig = np.ones(len(runs), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    fin = np.isfinite(score)
    line = lines(compact, len(runs), cfg, likeness)
    margin = np.where(fin, score - line, np.nan)
    flag_pos = np.flatnonzero(elig & fin & (np.nan_to_num(margin, nan=-np.inf) > cfg.band))
    flagged = [int(i) for i in flag_pos[np.argsort(-margin[flag_pos], kind="stable")]]
    bl = np.flatnonzero(elig & fin & (np.abs(np.nan_to_num(margin, nan=np.inf)) <= cfg.band))
    borderline = [int(i) for i in bl[np.argsort(-margin[bl], kind="stable")]]
    n_found = int((elig & fin).sum())
    reasons: list[str] = []
    if flagged:
        verdict = "backdoor"
    elif n_found < 3:
        verdict = "inconclusive"
        reasons.append(f"only {n_found} label(s) reached a working trigger; the statistics need at least 3")
    elif n_found < int(elig.sum()):
        verdict = "inconclusive"
        reasons.append("not_found")
    elif borderline:
        verdict = "inconclusive"
        reasons.append("borderline")
    else:
        verdict = "clean"
    return Decision(verdict=verdict, flagged=flagged, borderline=borderline, score=score, size=size,
                    center=center, scale=scale, line=line, reasons=reasons)
