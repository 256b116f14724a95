"""Issue #14 research: evidence beyond trigger size, measured on the TUNING split only.

For each model, reverse its smallest-trigger labels (ranked by the stored `collect` evidence)
plus two typical labels, then measure what each reversed trigger does to clean images:

  retain   fraction of stamped images whose best NON-target class is still their own class
           (a minimal natural trigger nudges an image across a border and leaves its class
           visible; a backdoor overrides the image)
  spread   how unevenly the source classes need the trigger: per source class, the smallest
           mask scale alpha that flips half its images; spread = max/min of those alphas
  margin   median target margin of stamped images over the median clean margin

  python bench/evidence_probe.py --split tuning [--top 3] > bench/.evalset/probe_tuning.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verdict_eval import EVAL, EVIDENCE, load_manifest, scan_kwargs  # noqa: E402

from ncscan.inputs import InputOptions  # noqa: E402

ALPHAS = np.array([0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])


def margins(z: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """z[i, cls[i]] minus the best other score."""
    other = z.copy()
    other[np.arange(len(z)), cls] = -np.inf
    return z[np.arange(len(z)), cls] - other.max(1)


def features(prep, trig, t: int) -> dict:
    from ncscan.scanner import _scores

    x, y = prep.x, prep.y.numpy()
    keep = y != t
    xs, ys = x[torch.from_numpy(keep)], y[keep]
    m = torch.from_numpy(trig.mask)[None, None]
    p = torch.from_numpy(trig.pattern)[None]
    clean = _scores(prep.pixel_model, xs, prep.device)
    full = _scores(prep.pixel_model, xs * (1 - m) + m * p, prep.device)
    flipped = full.argmax(1) == t
    masked = full.copy()
    masked[:, t] = -np.inf
    retain = float((masked.argmax(1) == ys)[flipped].mean()) if flipped.any() else float("nan")
    alpha50 = {}
    for c in np.unique(ys):
        sel = torch.from_numpy(ys == c)
        a50 = np.inf
        for a in ALPHAS:
            ma = m * float(a)
            z = _scores(prep.pixel_model, xs[sel] * (1 - ma) + ma * p, prep.device)
            if (z.argmax(1) == t).mean() >= 0.5:
                a50 = float(a)
                break
        alpha50[int(c)] = a50
    vals = np.array(list(alpha50.values()))
    fin = vals[np.isfinite(vals)]
    clean_ok = clean.argmax(1) == ys
    cm = np.median(margins(clean[clean_ok], ys[clean_ok])) if clean_ok.any() else np.nan
    return {
        "l1": trig.l1,
        "asr": float(flipped.mean()),
        "retain": retain,
        "alpha50_min": float(fin.min()) if len(fin) else None,
        "alpha50_max": float(vals.max()) if np.isfinite(vals.max()) else None,
        "spread": float(vals.max() / fin.min()) if len(fin) and np.isfinite(vals.max()) else None,
        "n_unflippable": int((~np.isfinite(vals)).sum()),
        "margin": float(np.median(margins(full[flipped], np.full(flipped.sum(), t))) / cm) if flipped.any() else None,
        "per_class_flip": {int(c): float(flipped[ys == c].mean()) for c in np.unique(ys)},
    }


def probe(entry: dict, top: int, seed: int) -> list[dict]:
    from ncscan.reverse import preset, reverse_engineer
    from ncscan.scanner import prepare

    ev = np.load(EVIDENCE / f"{entry['name']}.npz")
    l1 = np.nanmin(ev["l1"], 0)
    order = list(np.argsort(l1))
    mid = len(order) // 2
    labels = sorted(set(order[:top] + order[mid : mid + 2]))
    prep = prepare(str(EVAL / entry["model"]), str(EVAL / entry["scan_data"]), device="cpu", seed=seed,
                   inputs=InputOptions(**scan_kwargs(entry)))
    traces, _ = reverse_engineer(prep.pixel_model, prep.x, prep.y, [int(v) for v in labels], preset("fast"), seed=seed)
    med = float(np.median(l1))
    rows = []
    for tr in traces:
        f = features(prep, tr.trigger, tr.label) if tr.working else {"l1": None}
        rows.append({"model": entry["name"], "family": entry["family"], "label": tr.label,
                     "target": tr.label in entry.get("targets", []), "ratio": med / l1[tr.label],
                     "rank": order.index(tr.label), "seed": seed, **f})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="tuning")
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--names", default="")
    a = ap.parse_args()
    torch.set_num_threads(1)
    for e in load_manifest(a.split, a.names.split(",") if a.names else None):
        if not e.get("in_scope", True):
            continue
        t0 = time.perf_counter()
        for r in probe(e, a.top, a.seed):
            print(json.dumps(r), flush=True)
        print(f"{e['name']}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
