"""Mitigation figures per infected fixture, measured with the TRUE trigger.

For each infected fixture: scan (default settings) -> patch with --unlearn, --prune and
--filter separately, using the REVERSED triggers of the flagged labels -> measure on the
fixture's held-out test.npz in onnxruntime: clean accuracy, true-trigger attack success
(unlearn/prune), filter FPR on clean and FNR on truly triggered images.

    python bench/patch_eval.py [--fixtures a,b] [--methods unlearn,prune,filter]
Writes bench/patch_results.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import _entries, _pp  # noqa: E402


def _ort(path: Path, x: np.ndarray, e: dict[str, Any]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    from ncscan.preprocess import PixelModel, Preprocess  # noqa: F401

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pp = e["preprocess"]
    lo, hi = pp["pixel_range"]
    xin = lo + x * (hi - lo)
    c = x.shape[1]
    if pp.get("mean") is not None:
        xin = xin - np.array(pp["mean"], np.float32).reshape(1, -1, 1, 1)
    if pp.get("std") is not None:
        xin = xin / np.array(pp["std"], np.float32).reshape(1, -1, 1, 1)
    if e["layout"] == "NHWC":
        xin = xin.transpose(0, 2, 3, 1)
    names = [o.name for o in s.get_outputs()]
    inp = s.get_inputs()[0]
    static1 = inp.shape[0] == 1
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    bs = 1 if static1 else 500
    for i in range(0, len(xin), bs):
        for n, v in zip(names, s.run(names, {inp.name: xin[i : i + bs].astype(np.float32)})):
            outs[n].append(v)
    _ = c
    return {n: np.concatenate(v) for n, v in outs.items()}


def evaluate(e: dict[str, Any], methods: list[str]) -> list[dict[str, Any]]:
    from ncscan.patch import patch
    from ncscan.scanner import scan
    from ncscan.trigger import Trigger

    base = Path(e["_base"])
    model = base / e["file"]
    z = np.load(base / e["test_data"])
    x = z["x"].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    y = z["y"].astype(np.int64)
    if "static_batch" in e and e["static_batch"]:
        x, y = x[:500], y[:500]  # batch-1 models run one image at a time
    t0 = time.perf_counter()
    rep = scan(str(model), str(base / e["scan_data"]), device="cpu", seed=0, **_pp(e))
    scan_s = time.perf_counter() - t0
    out_name = None
    rows = []
    for m in methods:
        with tempfile.TemporaryDirectory() as td:
            out = Path(td) / "p.onnx"
            t1 = time.perf_counter()
            res = patch(str(model), str(base / e["scan_data"]), output=out, report=rep, device="cpu", seed=0,
                        force=True, **{m: True}, **_pp(e))
            secs = time.perf_counter() - t1
            row: dict[str, Any] = {"fixture": e["name"], "method": m, "flagged": rep.flagged, "targets": e["targets"],
                                   "scan_s": round(scan_s, 1), "patch_s": round(secs, 1), "guard_passed": res.guard_passed,
                                   "pruned_fraction": res.pruned_fraction,
                                   "prune_layer": res.prune_layer}
            if not res.written:
                row["error"] = "; ".join(res.guard_reasons) or "not written"
                rows.append(row)
                continue
            o0 = _ort(model, x, e)
            o1 = _ort(out, x, e)
            out_name = list(o0)[0]
            row["acc_before"] = float((o0[out_name].argmax(1) == y).mean())
            row["acc_after"] = float((o1[out_name].argmax(1) == y).mean())
            asr = {}
            for t in e["targets"]:
                trig = Trigger.load(str(base / next(tt["file"] for tt in e["triggers"] if tt["target"] == t)))
                keep = y != t
                xt = trig.apply(x[keep]).astype(np.float32)
                a0 = _ort(model, xt, e)[out_name].argmax(1)
                r1 = _ort(out, xt, e)
                a1 = r1[out_name].argmax(1)
                asr[t] = {"before": float((a0 == t).mean()), "after": float((a1 == t).mean())}
                if m == "filter":
                    flags = r1["ncscan_flag"].astype(bool)
                    asr[t]["fnr"] = float(1 - flags.mean())
            if m == "filter":
                row["fpr_clean"] = float(o1["ncscan_flag"].astype(bool).mean())
            row["true_asr"] = asr
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _header() -> str:
    import datetime
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    return (
        "# Mitigations measured with the TRUE triggers\n\n"
        f"`OMP_NUM_THREADS={threads} python bench/patch_eval.py` on {cpu} (CPU), {datetime.date.today().isoformat()}. "
        "Each infected fixture: a default scan, then `patch` with the REVERSED triggers of the flagged labels, one method "
        "at a time (force-written so every method can be measured), then onnxruntime on the fixture's held-out test.npz "
        "(2,000 images; cmnist: 500): clean accuracy, TRUE-trigger attack success, and for the filter its flag rate on clean "
        "images (FPR) and the share of truly triggered images it does not flag (FNR). \"guard\" is the patch's own verdict "
        "(5-fold cross-fitted on the scan folder, reversed triggers). Acceptance for unlearning (issue #4): true-trigger attack success "
        "<= 5% and a clean-accuracy drop <= 2 points on every fixture.\n\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default="")
    ap.add_argument("--methods", default="unlearn,prune,filter")
    ap.add_argument("--out", default=str(ROOT / "bench"))
    a = ap.parse_args()
    ents = _entries()
    names = [n for n in a.fixtures.split(",") if n] or [n for n, e in ents.items() if e["infected"]]
    rows = []
    for n in names:
        rows += evaluate(ents[n], a.methods.split(","))
    out = Path(a.out)
    (out / "patch_results.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| fixture | method | flagged / true | clean acc before -> after | true-trigger ASR before -> after | filter FPR / FNR | pruned | guard | patch s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['fixture']} | {r['method']} | {r['flagged']} / {r['targets']} | not written: {r['error']} | | | | | {r['patch_s']} |")
            continue
        asr = ", ".join(f"{t}: {v['before']:.1%} -> {v['after']:.1%}" for t, v in r["true_asr"].items())
        fl = ""
        if r["method"] == "filter":
            fl = f"{r['fpr_clean']:.1%} / " + ", ".join(f"{v['fnr']:.1%}" for v in r["true_asr"].values())
        pr = "" if r.get("pruned_fraction") is None else f"{r['pruned_fraction']:.1%}"
        if pr and r.get("prune_layer"):
            pr += f" of {r['prune_layer']}"
        lines.append(f"| {r['fixture']} | {r['method']} | {r['flagged']} / {r['targets']} | {r['acc_before']:.2%} -> {r['acc_after']:.2%} | "
                     f"{asr if r['method'] != 'filter' else ''} | {fl} | {pr} | {'pass' if r['guard_passed'] else 'FAIL'} | {r['patch_s']} |")
    (out / "patch_results.md").write_text(_header() + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
