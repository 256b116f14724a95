"""Mitigations and the patch guard on the evaluation set (bench/.evalset), measured with the
TRUE triggers in onnxruntime on >= 2,000 held-out images never used for patching.

Per infected model of the chosen split: the reversed triggers of its TRUE target labels
(one forced-label reversal per model, cached next to the set as JSON), then `patch` on the
model's fixed 300-image scan folder, one configuration at a time (written with --force so
each can be measured), then onnxruntime on test_data: clean accuracy, true-trigger attack
success, the filter's FPR / per-target FNR; and the guard's own cross-fitted estimate of the
accuracy drop, its interval and its decision, beside the true drop.

Unlearning configurations (what the guard is judged on):
    default       the shipped defaults
    nomix_3e-3    no mixup distillation, lr 3e-3 (a patch that costs a few points)
    plain_3e-4    plain fine-tuning (no distillation at all), lr 3e-4

    nice python bench/patch_evalset.py --split tuning [--models a,b] [--configs default,filter]
Appends one JSON line per (model, configuration) to bench/patch_results_<split>.jsonl and
rewrites bench/patch_results_<split>.md from all lines there (the newest per pair).
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
from bench.patch_eval import _ort
from bench.run import _pp

EVAL = ROOT / "bench" / ".evalset"
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {"unlearn": True},
    "nomix_3e-3": {"unlearn": True, "unlearn_config": {"lr": 3e-3, "mix": 0.0}},
    "plain_3e-4": {"unlearn": True, "unlearn_config": {"lr": 3e-4, "mix": 0.0, "distill": 0.0}},
    "filter": {"input_filter": True},
    "prune": {"prune": True},  # the default of the day (rows before issue #16's Fine-Pruning: the paper's)
    "prune_paper": {"prune": True, "prune_config": {"where": "penultimate", "budget": 2.0, "fine_tune_steps": 0}},
    "fp_gap_noft": {"prune": True, "prune_config": {"fine_tune_steps": 0}},
    "fp_gap": {"prune": True, "prune_config": {}},
    "fp_dormant": {"prune": True, "prune_config": {"rank": "dormant"}},
    "fp_gap_b10": {"prune": True, "prune_config": {"budget": 10.0}},
    "fp_gap_nomix": {"prune": True, "prune_config": {"mix": 0.0}},
    "fp_gap_b30": {"prune": True, "prune_config": {"budget": 30.0}},
    "fp_dormant_b30": {"prune": True, "prune_config": {"rank": "dormant", "budget": 30.0}},
}


def _reversed_report(e: dict[str, Any]) -> Path:
    """A scan report with the REVERSED triggers of the true targets (cached)."""
    from ncscan.scanner import encode_trigger, scan

    p = EVAL / "patch" / f"{e['name']}_reversed.json"
    if p.exists():
        return p
    rep = scan(
        str(EVAL / e["model"]),
        str(EVAL / e["scan_data"]),
        labels=list(e["targets"]),
        device="cpu",
        seed=0,
        **_pp(e),
    )
    d = rep.to_dict()
    d["flagged"] = list(e["targets"])
    d["labels"] = [
        {**lr.to_dict(), "flagged": True, "trigger": encode_trigger(lr.trigger)}
        for lr in rep.labels
    ]
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(d))
    return p


def run_one(e: dict[str, Any], cname: str, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    from ncscan.mitigate.prune import PruneConfig
    from ncscan.mitigate.unlearn import UnlearnConfig
    from ncscan.patch import patch
    from ncscan.trigger import Trigger

    kw = dict(CONFIGS[cname])
    if "unlearn_config" in kw:
        kw["unlearn_config"] = UnlearnConfig(**kw["unlearn_config"])
    if "prune_config" in kw:
        kw["prune_config"] = PruneConfig(**kw["prune_config"])
    model = EVAL / e["model"]
    rep = _reversed_report(e)
    row: dict[str, Any] = {
        "model": e["name"],
        "split": e["split"],
        "attack": e["attack"],
        "config": cname,
        "targets": e["targets"],
    }
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "p.onnx"
        t0 = time.perf_counter()
        res = patch(
            str(model),
            str(EVAL / e["scan_data"]),
            output=out,
            report=str(rep),
            device="cpu",
            seed=0,
            force=True,
            **kw,
            **_pp(e),
        )
        row["patch_s"] = round(time.perf_counter() - t0, 1)
        row.update(
            guard_passed=res.guard_passed,
            guard_reasons=res.guard_reasons,
            est_drop=res.clean_accuracy_drop,
            est_interval=res.clean_accuracy_drop_interval,
            n_checked=res.n_holdout,
            est_asr_after={
                str(k): v
                for k, v in (res.attack_success_after_filter or res.attack_success_after).items()
            },
            pruned=res.pruned_count,
            pruned_total=res.pruned_total,
            prune_stopped_by=res.prune_stopped_by,
            prune_layer=res.prune_layer,
            prune_curve=res.prune_curve,
            est_filter_fpr=res.filter_fpr,
            est_filter_fnr=res.filter_fnr,
        )
        o0, o1 = _ort(model, x, e), _ort(out, x, e)
        name = next(iter(o0))
        row["acc_before"] = float((o0[name].argmax(1) == y).mean())
        row["acc_after"] = float((o1[name].argmax(1) == y).mean())
        row["true_drop"] = (row["acc_before"] - row["acc_after"]) * 100.0
        if "ncscan_flag" in o1:
            row["fpr"] = float(o1["ncscan_flag"].astype(bool).mean())
        row["true_asr"] = {}
        for tt in e["triggers"]:
            t = tt["target"]
            trig = Trigger.load(str(EVAL / tt["file"]))
            keep = y != t
            xs = trig.apply(x[keep]).astype(np.float32)
            a0 = _ort(model, xs, e)[name].argmax(1) == t
            r1 = _ort(out, xs, e)
            a1 = r1[name].argmax(1) == t
            d: dict[str, float] = {"before": float(a0.mean()), "after": float(a1.mean())}
            if "ncscan_flag" in r1:
                f = r1["ncscan_flag"].astype(bool)
                d["fnr"] = float(1 - f.mean())
                d["unflagged"] = float((a1 & ~f).mean())
            row["true_asr"][str(t)] = d
    return row


def _load_test(e: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    z = np.load(EVAL / e["test_data"])
    x = z["x"].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return x, z["y"].astype(np.int64)


def render(rows: list[dict[str, Any]], split: str) -> str:
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        latest[(r["model"], r["config"])] = r
    lines = [
        f"# Mitigations and the guard on the evaluation set ({split} split)\n",
        (
            f"`nice python bench/patch_evalset.py --split {split}`; CPU (2 cores shared with other jobs: times are "
            "under contention). Patched with a fixed 300-image folder (the model's scan_data) and the REVERSED triggers "
            "of the TRUE target labels; judged in onnxruntime on the 2,000 held-out test_data images with the TRUE "
            "triggers. `est drop [90%]` is the guard's 5-fold cross-fitted estimate on the 300 images; `true drop` is "
            "on the 2,000. Guard: refuse when the estimate > 2.0 points or the cross-fitted reversed-trigger attack "
            "success > 5%.\n"
        ),
        "| model | attack | config | acc before -> after | true drop | est drop [90%] | guard | true ASR after (per target) | filter FPR / FNR per target | pruned | patch s |",
        "| --- | --- | --- | --- | ---: | --- | --- | --- | --- | --- | ---: |",
    ]
    for (_m, _c), r in sorted(latest.items()):
        asr = ", ".join(
            f"{t}: {v['before']:.1%} -> {v['after']:.1%}" for t, v in r["true_asr"].items()
        )
        fl = ""
        if "fpr" in r:
            fl = f"{r['fpr']:.1%} / " + ", ".join(
                f"{t}: {v['fnr']:.1%}" for t, v in r["true_asr"].items()
            )
            asr = ", ".join(
                f"{t}: {v['unflagged']:.1%} unflagged" for t, v in r["true_asr"].items()
            )
        lo, hi = r["est_interval"]
        g = "pass" if r["guard_passed"] else "REFUSE"
        if not r["guard_passed"]:
            g += " (acc)" if any("accuracy dropped" in s for s in r["guard_reasons"]) else " (asr)"
        pr = (
            ""
            if r.get("pruned") is None
            else f"{r['pruned']}/{r['pruned_total']} ({r['prune_stopped_by']})"
        )
        lines.append(
            f"| {r['model']} | {r['attack']} | {r['config']} | {r['acc_before']:.2%} -> {r['acc_after']:.2%} | "
            f"{r['true_drop']:.2f} | {r['est_drop']:.2f} [{lo:.1f}, {hi:.1f}] | {g} | {asr} | {fl} | {pr} | {r['patch_s']} |"
        )
    acc_cases = [
        r for r in latest.values() if r["config"] in ("default", "nomix_3e-3", "plain_3e-4")
    ]
    bad_refusals = [
        r
        for r in acc_cases
        if r["true_drop"] < 1.0 and any("accuracy dropped" in s for s in r["guard_reasons"])
    ]
    bad_accepts = [
        r
        for r in acc_cases
        if r["true_drop"] > 3.0 and not any("accuracy dropped" in s for s in r["guard_reasons"])
    ]
    lines += [
        "",
        (
            f"Guard, accuracy decision, over {len(acc_cases)} unlearning patches: "
            f"{sum(r['true_drop'] < 1 for r in acc_cases)} with a true drop < 1 point ({len(bad_refusals)} refused for accuracy), "
            f"{sum(1 <= r['true_drop'] <= 3 for r in acc_cases)} between 1 and 3 points, "
            f"{sum(r['true_drop'] > 3 for r in acc_cases)} > 3 points ({len(bad_accepts)} accepted on accuracy)."
        ),
    ]
    unl = [r for r in latest.values() if r["config"] == "default"]
    ok_u = [
        r
        for r in unl
        if r["true_drop"] <= 1.0 and max(v["after"] for v in r["true_asr"].values()) <= 0.02
    ]
    fil = [r for r in latest.values() if r["config"] == "filter"]
    ok_f = [
        r for r in fil if r["fpr"] <= 0.05 and max(v["fnr"] for v in r["true_asr"].values()) <= 0.02
    ]
    pru = [r for r in latest.values() if r["config"] == "prune"]
    ok_p = [
        r
        for r in pru
        if r["true_drop"] <= 3.0 and max(v["after"] for v in r["true_asr"].values()) <= 0.05
    ]
    lines += [
        "",
        (
            f"Issue #16 bars on this split: default unlearning true ASR <= 2% at <= 1 point: {len(ok_u)}/{len(unl)} models; "
            f"filter FNR <= 2% for every target at FPR <= 5%: {len(ok_f)}/{len(fil)}; "
            f"pruning true ASR <= 5% at <= 3 points: {len(ok_p)}/{len(pru)}."
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="tuning")
    ap.add_argument("--models", default="")
    ap.add_argument("--configs", default="default,filter,prune,nomix_3e-3,plain_3e-4")
    ap.add_argument("--render-only", action="store_true")
    a = ap.parse_args()
    jl = ROOT / "bench" / f"patch_results_{a.split}.jsonl"
    if not a.render_only:
        import torch

        torch.set_num_threads(1)
        man = json.loads((EVAL / "manifest.json").read_text())
        ents = [e for e in man["models"] if e["split"] == a.split and e["infected"]]
        if a.models:
            want = a.models.split(",")
            ents = [e for e in ents if e["name"] in want]
        for e in ents:
            x, y = _load_test(e)
            for c in a.configs.split(","):
                row = run_one(e, c, x, y)
                with jl.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    rows = [json.loads(s) for s in jl.read_text().splitlines() if s.strip()]
    (ROOT / "bench" / f"patch_results_{a.split}.md").write_text(render(rows, a.split))


if __name__ == "__main__":
    main()
