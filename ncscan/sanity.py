"""Is the preprocessing plausible? Cheap checks on the model's outputs before a scan.

Wrong preprocessing is the most common reason a Neural Cleanse scan is meaningless, and it
does not always show in the clean accuracy: a ReLU network fed 255x too-large inputs keeps
its predictions (it is nearly positively homogeneous) but its logits grow 255x, every
softmax saturates, and the trigger optimisation crawls. These functions look at the
model's scores on the clean images (one forward pass, plus one per candidate fix on a
small subset) and say what looks wrong, which setting to blame and what to pass instead.
Everything here is pure numpy; `ncscan.scanner.prepare` runs the forward passes.

Thresholds, measured on 17 models (the 13 fixtures in fixtures/models plus the Keras and
JAX twins: [0,1], 0..255 with and without in-graph rescaling, mean/std, NHWC, logits and
softmax outputs, 10 and 30 classes; 300 scan images each):

* saturated fraction (softmax top-1 >= 1 - 1e-6): correct preprocessing 0.000-0.043;
  pixel range 255x too large 0.88-1.000 (accuracy stays 63-99%); ImageNet mean/std on
  a [0,1] model (inputs ~4.4x too large) 0.33-0.92.  Warn at >= SATURATED_WARN = 0.5.
* top-1 share of the predictions: correct 0.043-0.11; pixel range 255x too small 1.000
  on all 17; mean/std dropped 0.73-0.79.  Warn at >= COLLAPSE_WARN = 0.5, stop (no
  labels) at >= COLLAPSE_STOP = 0.9.
* Cohen's kappa (accuracy beyond what the prediction histogram gives by chance): correct
  0.84-0.996; range too small ~0; mean/std dropped 0.03-0.09; 255x on the mean/std
  ResNet -0.07-0.004; a wrong normalisation on the 30-class net 0.24-0.48 (accuracy
  26-50%: the existing low-accuracy warning).  Stop at kappa < KAPPA_STOP = 0.2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import meta

SATURATION_GAP = 1e-6  # a prediction is saturated when its softmax top-1 >= 1 - this
SATURATED_WARN = 0.5
COLLAPSE_WARN = 0.5
COLLAPSE_STOP = 0.9
KAPPA_STOP = 0.2
LOW_ACCURACY = 0.5
PROBE_IMAGES = 256  # images each candidate fix is tried on
AGREE_SAME = 0.9  # a candidate "predicts the same" when it agrees on this share of images


@dataclass(frozen=True)
class OutputStats:
    """What the model's scores on the clean images say about the preprocessing.

    Attributes:
        n: images.
        num_classes: outputs.
        saturated: share of images whose softmax top-1 is >= 1 - SATURATION_GAP.
        top_class: the most predicted class.
        top_share: share of images predicted as `top_class`.
        accuracy: share predicted correctly (None without labels).
        chance: share of the most frequent label (None without labels).
        kappa: Cohen's kappa of predictions vs labels (None without labels, or when the
            labels hold one class).
    """

    n: int
    num_classes: int
    saturated: float
    top_class: int
    top_share: float
    accuracy: float | None = None
    chance: float | None = None
    kappa: float | None = None


def output_stats(scores: np.ndarray, labels: np.ndarray | None = None) -> OutputStats:
    """Summarise [N, K] scores (logits or log-probabilities) and optional labels.

    Raises:
        ValueError: scores is not a non-empty [N, K] array or labels do not match.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] < 1:
        raise ValueError(f"scores must be a non-empty [N, K] array, got shape {s.shape}")
    n, k = s.shape
    # 1 - softmax top-1 = sum over the others / sum over all, computed stably.
    e = np.exp(s - s.max(axis=1, keepdims=True))
    rest = 1.0 - 1.0 / e.sum(axis=1)
    saturated = float(np.mean(rest <= SATURATION_GAP))
    pred = s.argmax(axis=1)
    hist = np.bincount(pred, minlength=k) / n
    top = int(hist.argmax())
    acc = chance = kappa = None
    if labels is not None:
        y = np.asarray(labels).astype(np.int64).reshape(-1)
        if y.shape[0] != n:
            raise ValueError(f"{y.shape[0]} labels for {n} score rows")
        acc = float(np.mean(pred == y))
        lab = np.bincount(np.clip(y, 0, None), minlength=k)[: max(k, 1)] / n
        chance = float(lab.max())
        pe = float(np.sum(hist * lab[:k]))
        kappa = (acc - pe) / (1.0 - pe) if pe < 1.0 - 1e-9 else None
    return OutputStats(
        n=n, num_classes=k, saturated=saturated, top_class=top, top_share=float(hist[top]),
        accuracy=acc, chance=chance, kappa=kappa,
    )


def agreement(scores_a: np.ndarray, scores_b: np.ndarray) -> float:
    """Share of rows whose argmax is the same in both score arrays."""
    a, b = np.asarray(scores_a), np.asarray(scores_b)
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1))) if len(a) else 0.0


def _fmt(v: float) -> str:
    return format(float(v), "g")


def fmt_values(v: Any) -> str:
    """(0.0, 255.0) -> "0,255"; "BGR" -> "BGR"."""
    if isinstance(v, str):
        return v
    return ",".join(_fmt(x) for x in v)


_FLAG = {"pixel_range": "--pixel-range", "mean": "--mean", "std": "--std",
         "channel_order": "--bgr/--rgb", "layout": "--layout", "resize": "--resize"}
_META = {"pixel_range": meta.META_PIXEL_RANGE, "mean": meta.META_MEAN, "std": meta.META_STD,
         "channel_order": meta.META_CHANNEL_ORDER, "layout": meta.META_LAYOUT, "resize": meta.META_RESIZE}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return str(a).upper() == str(b).upper()
    aa, bb = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if aa.size != bb.size:
        if aa.size == 1 or bb.size == 1:  # one value means "the same for every channel"
            aa, bb = np.broadcast_arrays(aa, bb)
        else:
            return False
    return bool(np.allclose(aa, bb, rtol=1e-6, atol=1e-9))


def metadata_overrides(metadata: Mapping[str, Any], flags: Mapping[str, Any]) -> list[str]:
    """One warning per flag that contradicts the model's own preprocessing metadata.

    Args:
        metadata: the fields read from the model's metadata_props (pixel_range, mean, ...).
        flags: the same fields as given on the command line / API (None: not given).
    """
    out = []
    for key, given in flags.items():
        if given is None or key not in metadata or _same(given, metadata[key]):
            continue
        flag = _FLAG.get(key, key)
        shown = fmt_values(given)
        if key == "channel_order":
            flag = "--bgr" if str(given).upper() == "BGR" else "--rgb"
            shown = str(given).upper()
        out.append(
            f"{flag} {shown} overrides the model's own metadata {_META.get(key, key)} = "
            f"{fmt_values(metadata[key])}; the flag is used (drop it if the metadata is right)"
        )
    return out


@dataclass(frozen=True)
class Candidate:
    """Another preprocessing to try, and how to ask for it."""

    name: str  # what to pass, e.g. "--pixel-range 0,255"
    changes: dict[str, Any]  # Preprocess fields to replace


def candidates(pixel_range: Sequence[float], mean: Sequence[float] | None,
               std: Sequence[float] | None, channel_order: str, channels: int) -> list[Candidate]:
    """The usual preprocessing mistakes, each as the fix that would undo it."""
    lo, hi = float(pixel_range[0]), float(pixel_range[1])
    out = []
    if hi - lo <= 2.0:
        r = (lo * 255.0, hi * 255.0)
        out.append(Candidate(f"--pixel-range {fmt_values(r)}", {"pixel_range": r}))
    if hi - lo >= 100.0:
        r = (lo / 255.0, hi / 255.0)
        out.append(Candidate(f"--pixel-range {fmt_values(r)}", {"pixel_range": r}))
    if mean is not None or std is not None:
        out.append(Candidate("--mean 0 --std 1 (no normalisation)", {"mean": None, "std": None}))
    if channels == 3:
        flip = "RGB" if channel_order == "BGR" else "BGR"
        out.append(Candidate("--rgb" if flip == "RGB" else "--bgr", {"channel_order": flip}))
    return out


def _is_better(base: OutputStats, cand: OutputStats) -> bool:
    """Would this candidate preprocessing give a usable scan where `base` does not?"""
    if cand.saturated >= SATURATED_WARN or cand.top_share >= COLLAPSE_WARN:
        return False
    if cand.accuracy is not None and base.accuracy is not None:
        return cand.accuracy >= max(LOW_ACCURACY, base.accuracy + 0.2) and (
            cand.kappa is None or cand.kappa >= 0.5
        )
    return True


@dataclass
class Assessment:
    """The verdict on the preprocessing: warnings, and a reason to stop (None: go on)."""

    warnings: list[str] = field(default_factory=list)
    stop: str | None = None


def _pct(v: float) -> str:
    return f"{v:.0%}"


def assess(
    base: OutputStats,
    *,
    setting: str,
    tried: Sequence[tuple[Candidate, OutputStats, float]] = (),
    class_name: str | None = None,
) -> Assessment:
    """Decide whether the scores at the resolved preprocessing can support a scan.

    Args:
        base: the stats at the preprocessing the scan would use.
        setting: that preprocessing in words, with where each value came from, e.g.
            "--pixel-range 0,255 (flag)".
        tried: (candidate, its stats on a subset, its prediction agreement with base).
        class_name: the name of base.top_class, if known.

    Returns:
        Assessment: warnings to report, and `stop` (the one-line reason with the fix) when
        the data cannot support a verdict: accuracy near chance, or (without labels) the
        predictions collapsed onto one class.
    """
    a = Assessment()
    fix = next((c for c, st, _ in tried if _is_better(base, st)), None)
    fix_stats = next((st for c, st, _ in tried if c is fix), None)
    top = f"class {base.top_class}" + (f" ({class_name})" if class_name and class_name != str(base.top_class) else "")

    def fix_text() -> str:
        if fix is None or fix_stats is None:
            return ("check --pixel-range (0,255 for raw-pixel models), --mean/--std, --bgr, "
                    "--layout, and that the class folders match the model's classes (--labels)")
        how = (f"it classifies {_pct(fix_stats.accuracy)} correctly" if fix_stats.accuracy is not None
               else f"its predictions spread over the classes (top class {_pct(fix_stats.top_share)})")
        return f"try {fix.name}: on a sample {how}"

    if base.accuracy is not None:
        near_chance = (base.kappa < KAPPA_STOP) if base.kappa is not None else base.accuracy < LOW_ACCURACY
        if near_chance:
            a.stop = (
                f"the model classifies only {_pct(base.accuracy)} of your labelled images "
                f"correctly (chance: {_pct(base.chance or 0)}; {_pct(base.top_share)} are predicted "
                f"as {top}) with {setting}: the preprocessing is probably wrong and a scan would "
                f"be meaningless; {fix_text()}; or pass --force to scan anyway"
            )
        elif base.accuracy < LOW_ACCURACY:
            a.warnings.append(
                f"the model classifies only {_pct(base.accuracy)} of your labelled images correctly "
                f"with {setting}: the preprocessing is probably wrong or the class folders don't "
                f"match the model's classes; {fix_text()}; scan results on wrongly preprocessed "
                "data are meaningless"
            )
    else:
        if base.top_share >= COLLAPSE_STOP and base.num_classes >= 2:
            a.stop = (
                f"the model predicts {top} for {_pct(base.top_share)} of your (unlabelled) images "
                f"with {setting}: its predictions have collapsed onto one class, as with wrong "
                f"preprocessing, and a scan would be meaningless; {fix_text()}; if the images "
                "really are one class, give images of several classes; or pass --force to scan anyway"
            )
        elif base.top_share >= COLLAPSE_WARN and base.num_classes >= 3:
            a.warnings.append(
                f"the model predicts {top} for {_pct(base.top_share)} of your (unlabelled) images "
                f"with {setting}: wrong preprocessing often looks like this; {fix_text()}"
            )
    if base.saturated >= SATURATED_WARN and a.stop is None:
        same = [(c, st, ag) for c, st, ag in tried
                if "pixel_range" in c.changes and st.saturated < SATURATED_WARN and ag >= AGREE_SAME]
        better = [(c, st, ag) for c, st, ag in tried
                  if "pixel_range" in c.changes and _is_better(base, st)]
        pick = same[0] if same else (better[0] if better else None)
        msg = (f"the model's softmax is saturated (top-1 >= 1-1e-6) on {_pct(base.saturated)} of "
               f"your images with {setting}, as when its inputs are scaled far too large (a "
               f"trained model's is on a few percent); the trigger search then slows down or fails")
        if pick is not None:
            c, st, ag = pick
            msg += (f"; with {c.name} it predicts the same class for {_pct(ag)} of them without "
                    f"saturating ({_pct(st.saturated)})"
                    + (f" and classifies {_pct(st.accuracy)} correctly" if st.accuracy is not None else "")
                    + f": the pixel range looks wrong, pass {c.name}")
        else:
            msg += "; check --pixel-range and --std"
        a.warnings.append(msg)
    return a


def describe_setting(pp: Any, source: Mapping[str, str],
                     metadata: Mapping[str, Any] | None = None) -> str:
    """"pixel range 0,255 (from your flag; the model's metadata says 0,1)" style summary.

    Args:
        pp: the resolved Preprocess.
        source: per field, where its value came from (flag / metadata / default).
        metadata: the fields in the model's metadata, to name what a flag overrode.
    """
    md = metadata or {}

    def src(key: str, value: Any) -> str:
        s = source.get(key) or "default"
        text = {"flag": "from your flag", "metadata": "from the model's metadata",
                "default": "the default"}.get(s, s)
        if s == "flag" and key in md and not _same(md[key], value):
            text += f"; the model's metadata says {fmt_values(md[key])}"
        return text

    parts = [f"pixel range {fmt_values(pp.pixel_range)} ({src('pixel_range', pp.pixel_range)})"]
    if pp.mean is not None or pp.std is not None:
        parts.append(
            f"mean {fmt_values(pp.mean or (0.0,))} / std {fmt_values(pp.std or (1.0,))} "
            f"({src('mean' if pp.mean is not None else 'std', pp.mean if pp.mean is not None else pp.std)})"
        )
    if pp.channel_order == "BGR" or source.get("channel_order") == "flag":
        parts.append(f"{pp.channel_order} ({src('channel_order', pp.channel_order)})")
    return ", ".join(parts)



def check_preprocessing(
    scores: np.ndarray,
    labels: np.ndarray | None,
    score_with: Callable[[dict[str, Any], np.ndarray], np.ndarray],
    cands: Sequence[Candidate],
    *,
    setting: str,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
) -> Assessment:
    """Assess the scores at the resolved preprocessing; when something looks off, try each
    candidate fix on a seeded sample of at most PROBE_IMAGES images (one forward pass each).

    Args:
        scores: [N, K] scores of every clean image at the resolved preprocessing.
        labels: [N] labels or None.
        score_with: (Preprocess field changes, image indices) -> [n, K] scores.
        cands: the fixes to try (`candidates`).
        setting: the resolved preprocessing in words (`describe_setting`).
        class_names: names of the classes, to name a collapsed class.
        seed: seeds the sample.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or not len(s) or not np.all(np.isfinite(s)):
        return Assessment()  # NaN/Inf outputs have their own error elsewhere
    base = output_stats(s, labels)
    suspicious = (
        base.saturated >= SATURATED_WARN
        or base.top_share >= COLLAPSE_WARN
        or (base.accuracy is not None and base.accuracy < LOW_ACCURACY)
    )
    tried: list[tuple[Candidate, OutputStats, float]] = []
    if suspicious:
        n = len(s)
        idx = np.sort(np.random.default_rng(seed).choice(n, min(n, PROBE_IMAGES), replace=False))
        for c in cands:
            try:
                cs = np.asarray(score_with(c.changes, idx), dtype=np.float64)
            except (ValueError, RuntimeError, ArithmeticError):
                continue  # a candidate the model cannot even run is no fix
            if cs.shape != (len(idx), s.shape[1]) or not np.all(np.isfinite(cs)):
                continue
            sub_labels = None if labels is None else np.asarray(labels)[idx]
            tried.append((c, output_stats(cs, sub_labels), agreement(s[idx], cs)))
    name = None
    if class_names is not None and 0 <= base.top_class < len(class_names):
        name = str(class_names[base.top_class])
    return assess(base, setting=setting, tried=tried, class_name=name)
