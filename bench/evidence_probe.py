"""Issue #14 research: evidence beyond trigger size, measured on the TUNING split only.

For each model, reverse its smallest-trigger labels (ranked by the stored `collect` evidence)
plus two typical labels, then measure what each reversed trigger does to clean images:

  retain   fraction of stamped images whose best NON-target class is still their own class
           (a minimal natural trigger nudges an image across a border and leaves its class
           visible; a backdoor overrides the image)
  spread   how unevenly the source classes need the trigger: per source class, the smallest
           mask scale alpha that flips half its images; spread = max/min of those alphas
  margin   median target margin of stamped images over the median clean margin

Representation evidence (penultimate layer, `--rep`): does the trigger make images look like the
target class's own clean images inside the network, or like something new?
  rep_cos  cosine between the stamped images' mean shift and the target class's clean offset
  rep_in   median distance of flipped stamped images to the target's clean centroid over the
           clean target images' own median distance
  rep_nn   share of flipped stamped images whose nearest clean image (cosine) is of the target
  rep_top  share of the standardised shift carried by the top 5% of neurons
Reversed triggers are cached in bench/.evalset/probe_triggers/ so features can be added
without re-reversing.

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


TRIG = EVAL / "probe_triggers"


def rep_features(prep, trig, t: int) -> dict:
    """Penultimate-layer evidence: stamped images vs the target's clean images."""
    from ncscan.mitigate.layers import activations, find_layer

    x, y = prep.x, prep.y.numpy()
    lay = find_layer(prep.onnx.proto, prep.pixel_model.net)
    m = torch.from_numpy(trig.mask)[None, None]
    p = torch.from_numpy(trig.pattern)[None]
    a_clean = activations(prep.pixel_model, prep.pixel_model.net, lay, x).double()
    keep = torch.from_numpy(y != t)
    xs = x[keep]
    stamped = xs * (1 - m) + m * p
    a_st = activations(prep.pixel_model, prep.pixel_model.net, lay, stamped).double()
    from ncscan.scanner import _scores

    flipped = torch.from_numpy(_scores(prep.pixel_model, stamped, prep.device).argmax(1) == t)
    tmask = torch.from_numpy(y == t)
    mu_t, mu_o = a_clean[tmask].mean(0), a_clean[~tmask].mean(0)
    shift = a_st.mean(0) - a_clean[keep].mean(0)
    off = mu_t - mu_o
    cos = float(shift @ off / (shift.norm() * off.norm() + 1e-12))
    af = a_st[flipped] if flipped.any() else a_st
    d_st = (af - mu_t).norm(dim=1).median()
    d_cl = (a_clean[tmask] - mu_t).norm(dim=1).median()
    cn = torch.nn.functional.normalize(a_clean, dim=1)
    nn_idx = (torch.nn.functional.normalize(af, dim=1) @ cn.T).argmax(1)
    sd = a_clean.std(0) + 1e-6
    z = (shift / sd).abs()
    k = max(1, int(round(0.05 * len(z))))
    return {"rep_cos": cos, "rep_in": float(d_st / (d_cl + 1e-12)),
            "rep_nn": float((torch.from_numpy(y)[nn_idx] == t).double().mean()),
            "rep_top": float(z.topk(k).values.sum() / (z.sum() + 1e-12)), "rep_units": int(len(z))}


def cached_traces(prep, entry: dict, labels: list[int], seed: int) -> dict:
    """{label: Trigger or None}: reversed once per (model, label, seed), then read back."""
    from ncscan.reverse import preset, reverse_engineer
    from ncscan.trigger import Trigger

    TRIG.mkdir(exist_ok=True)
    out, todo = {}, []
    for lab in labels:
        f = TRIG / f"{entry['name']}_L{lab}_s{seed}.npz"
        if f.exists():
            z = np.load(f)
            out[lab] = Trigger(mask=z["mask"], pattern=z["pattern"]) if z["ok"] else None
        else:
            todo.append(lab)
    if todo:
        traces, _ = reverse_engineer(prep.pixel_model, prep.x, prep.y, todo, preset("fast"), seed=seed)
        for tr in traces:
            out[tr.label] = tr.trigger if tr.working else None
            t = tr.trigger
            np.savez(TRIG / f"{entry['name']}_L{tr.label}_s{seed}.npz", ok=tr.working,
                     mask=t.mask, pattern=t.pattern)
    return out


def probe(entry: dict, top: int, seed: int, rep: bool = False) -> list[dict]:
    from ncscan.scanner import prepare

    ev = np.load(EVIDENCE / f"{entry['name']}.npz")
    l1 = np.nanmin(ev["l1"], 0)
    order = list(np.argsort(l1))
    mid = len(order) // 2
    labels = sorted(order) if top <= 0 else sorted(set(order[:top] + order[mid : mid + 2]))
    prep = prepare(str(EVAL / entry["model"]), str(EVAL / entry["scan_data"]), device="cpu", seed=seed,
                   inputs=InputOptions(**scan_kwargs(entry)))
    trigs = cached_traces(prep, entry, [int(v) for v in labels], seed)
    med = float(np.median(l1))
    rows = []
    for lab, trig in sorted(trigs.items()):
        f = features(prep, trig, lab) if trig is not None else {"l1": None}
        if rep and trig is not None:
            f.update(rep_features(prep, trig, lab))
        rows.append({"model": entry["name"], "family": entry["family"], "label": lab,
                     "target": lab in entry.get("targets", []), "ratio": med / l1[lab],
                     "rank": order.index(lab), "seed": seed, **f})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="tuning")
    ap.add_argument("--top", type=int, default=3, help="smallest labels to probe (0: every label)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--names", default="")
    ap.add_argument("--rep", action="store_true", help="add the penultimate-layer features")
    a = ap.parse_args()
    torch.set_num_threads(1)
    for e in load_manifest(a.split, a.names.split(",") if a.names else None):
        if not e.get("in_scope", True):
            continue
        t0 = time.perf_counter()
        for r in probe(e, a.top, a.seed, a.rep):
            print(json.dumps(r), flush=True)
        print(f"{e['name']}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
