"""Pruning on the evaluation set: the variants side by side, and the pruning curves.

Reads the rows `bench/patch_evalset.py` appended for the pruning configurations
(prune_paper, fp_*) to bench/patch_results_<split>.jsonl and writes
bench/prune_results_<split>.md:

* per model and variant: clean accuracy and TRUE-trigger attack success on the 2,000
  held-out images (onnxruntime), the guard's call, neurons pruned and why pruning stopped;
* per model, the pruning curve of the widest-budget variants: clean accuracy and the
  REVERSED trigger's attack success on the patching images after each neuron, before the
  fine-tune (what pruning alone does as it goes deeper).

    python bench/prune_report.py [--split tuning]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["prune_paper", "fp_gap_noft", "fp_gap", "fp_gap_nomix", "fp_dormant", "fp_gap_b10", "fp_gap_b30",
           "fp_dormant_b30"]
CURVES = ["fp_gap_b30", "fp_dormant_b30"]


def _asr(r: dict[str, Any]) -> str:
    return ", ".join(f"{t}: {v['before']:.1%} -> {v['after']:.1%}" for t, v in r["true_asr"].items())


def _curve(r: dict[str, Any], points: int = 8) -> str:
    c = r.get("prune_curve") or []
    if not c:
        return ""
    pick = sorted({round(i * (len(c) - 1) / max(1, points - 1)) for i in range(points)})
    return " ".join(f"{c[i][0]}:{c[i][1]:.0%}/{c[i][2]:.0%}" for i in pick)


def summary(rows: dict[tuple[str, str], dict[str, Any]], models: list[str]) -> list[str]:
    out = ["| variant | models | guard passed | true ASR <= 5% (worst target) | true drop <= 3 points | both | median true drop | median worst true ASR after |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in CONFIGS:
        rs = [rows[(m, c)] for m in models if (m, c) in rows]
        if not rs:
            continue
        worst = [max(v["after"] for v in r["true_asr"].values()) for r in rs]
        drops = [r["true_drop"] for r in rs]
        both = sum(w <= 0.05 and d <= 3.0 for w, d in zip(worst, drops))
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        out.append(f"| {c} | {len(rs)} | {sum(r['guard_passed'] for r in rs)} | {sum(w <= 0.05 for w in worst)} | "
                   f"{sum(d <= 3.0 for d in drops)} | {both} | {med(drops):.2f} | {med(worst):.1%} |")
    return out


def render(rows: dict[tuple[str, str], dict[str, Any]], split: str) -> str:
    models = sorted({m for m, c in rows if c in CONFIGS})
    ran = [c for c in CONFIGS if any(k == c for _, k in rows)]
    out = [f"# Pruning variants on the {split} split", "",
           f"`python bench/patch_evalset.py --split {split} --configs {','.join(ran)}` then "
           f"`python bench/prune_report.py --split {split}`; CPU, 2 cores. Patched with the 300-image scan folder and the "
           "REVERSED triggers of the true targets; judged in onnxruntime on the 2,000 held-out images with the TRUE "
           "triggers. Variants: `prune_paper` = the paper's (penultimate layer, trigger-gap order, stop at a 2-point "
           "drop, no fine-tune); `fp_*` = Fine-Pruning at the last conv layer's channels (`gap` = trigger-gap order, "
           "`dormant` = least active on clean images first), budget 5 points unless `_b10`/`_b30`, then 150 "
           "fine-tune steps with the pruned channels held at zero (`_noft`: none; `_nomix`: no mixup distillation).",
           "", "## Summary", ""]
    out += summary(rows, models)
    out += ["", "## Per model", "",
            "| model | variant | acc before -> after | true drop | guard | true ASR before -> after | pruned (stopped by) | patch s |",
            "| --- | --- | --- | ---: | --- | --- | --- | ---: |"]
    for m in models:
        for c in CONFIGS:
            r = rows.get((m, c))
            if r is None:
                continue
            g = "pass" if r["guard_passed"] else "REFUSE"
            out.append(f"| {m} | {c} | {r['acc_before']:.2%} -> {r['acc_after']:.2%} | {r['true_drop']:.2f} | {g} | "
                       f"{_asr(r)} | {r['pruned']}/{r['pruned_total']} ({r['prune_stopped_by']}) | {r['patch_s']} |")
    out += ["", "## Pruning curves (before the fine-tune)", "",
            "`pruned:accuracy/reversed-trigger attack success` on the patching images, as pruning goes deeper.", "",
            "| model | variant | curve |", "| --- | --- | --- |"]
    for m in models:
        for c in CURVES:
            if (m, c) in rows:
                out.append(f"| {m} | {c} | {_curve(rows[(m, c)])} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="tuning")
    a = ap.parse_args()
    jl = ROOT / "bench" / f"patch_results_{a.split}.jsonl"
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for line in jl.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[(r["model"], r["config"])] = r  # the newest per pair
    (ROOT / "bench" / f"prune_results_{a.split}.md").write_text(render(rows, a.split))


if __name__ == "__main__":
    main()
