"""Outlier statistics over per-label trigger sizes (pure numpy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of a normal's std
INDEX_CAP = 1e6  # a finite stand-in for "infinitely anomalous" (JSON has no inf)


@dataclass(frozen=True)
class Outliers:
    """Anomaly indices and the flagged labels."""

    median: float
    mad: float
    anomaly_index: np.ndarray  # per label, >= 0
    flagged: list[int]  # positions into the input, most anomalous first


def anomaly_indices(
    l1: np.ndarray, threshold: float = 2.0, reference: np.ndarray | None = None
) -> Outliers:
    """MAD anomaly index of each label's trigger L1 norm.

    anomaly_index = |l1 - median| / (1.4826 * median(|l1 - median|)); a label is flagged
    when its index exceeds `threshold` AND its norm is below the median (only abnormally
    SMALL triggers indicate a backdoor).

    MAD = 0 happens when more than half the norms are identical: then any other value is
    infinitely far out. We fall back to the mean absolute deviation (scaled to match the
    MAD's consistency for a normal), and cap the index when even that is 0.

    Args:
        l1: float norms, one per label (NaN entries are ignored and never flagged).
        threshold: flag above this index (the paper's 2.0).
        reference: boolean mask of the labels whose norms define the median and MAD
            (default: all). Pre-screening passes its unbiased random sample here.

    Returns:
        The statistics; `flagged` indexes into `l1`.
    """
    v = np.asarray(l1, dtype=np.float64)
    ok = np.isfinite(v)
    idx = np.zeros_like(v)
    if ok.sum() == 0:
        return Outliers(median=float("nan"), mad=float("nan"), anomaly_index=idx, flagged=[])
    ref = ok if reference is None else (ok & np.asarray(reference, dtype=bool))
    if ref.sum() == 0:
        ref = ok
    vv = v[ref]
    med = float(np.median(vv))
    ref_dev = np.abs(vv - med)
    mad = CONSISTENCY * float(np.median(ref_dev))
    scale = mad
    if scale <= 0:
        scale = float(np.mean(ref_dev)) * 1.2533  # sqrt(pi/2): mean-abs-dev -> std for a normal
    dev = np.abs(v[ok] - med)
    if scale > 0:
        idx[ok] = np.minimum(dev / scale, INDEX_CAP)
    else:
        idx[ok] = np.where(dev > 0, INDEX_CAP, 0.0)
    flag_mask = ok & (idx > threshold) & (v < med)
    order = np.argsort(-idx[flag_mask], kind="stable")
    flagged = [int(i) for i in np.flatnonzero(flag_mask)[order]]
    return Outliers(median=med, mad=mad, anomaly_index=idx, flagged=flagged)
