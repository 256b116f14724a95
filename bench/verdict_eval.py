"""Evaluate the scan's decision on the evaluation set (bench/evalset, built into bench/.evalset).

Two modes:

  collect  For each model of a split, prepare it once and reverse EVERY label in R independent
           runs (seeds 0..R-1, the default optimiser). Stores per-label L1, success, steps and
           masks in bench/.evalset/evidence/<model>.npz. This is the raw material for choosing
           the decision on the TUNING split offline (`replay`), without re-optimising.
  replay   Apply ncscan.decide to stored evidence, simulating the scan's restart policy
           (phase 1 = run j, restarts of suspects = the other runs) for every j.
  scan     Run the real default `ncscan.scan` with several seeds on a split and write
           bench/verdict_results.{md,json} (verdicts, margins, flips, passes, wall time).

  python bench/verdict_eval.py collect --split tuning --runs 3
  python bench/verdict_eval.py replay --split tuning
  python bench/verdict_eval.py scan --split heldout --seeds 0,1,2,3,4
  python bench/verdict_eval.py scan --split heldout4 --seeds 0,1 --schedule early_stop9
  python bench/verdict_eval.py schedules --split heldout4 --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
EVAL = HERE / ".evalset"
EVIDENCE = EVAL / "evidence"


def load_manifest(split: str | None, names: list[str] | None = None) -> list[dict[str, Any]]:
    models = json.loads((EVAL / "manifest.json").read_text())["models"]
    if split:
        models = [m for m in models if m["split"] in split.split(",")]
    if names:
        models = [m for m in models if m["name"] in names]
    return models


def scan_kwargs(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry's CLI preprocessing args as `ncscan.scan` keyword arguments."""
    args = list(entry.get("scan_args", []))
    kw: dict[str, Any] = {}
    it = iter(args)
    for a in it:
        if a == "--pixel-range":
            kw["pixel_range"] = [float(v) for v in next(it).split(",")]
        elif a == "--mean":
            kw["mean"] = [float(v) for v in next(it).split(",")]
        elif a == "--std":
            kw["std"] = [float(v) for v in next(it).split(",")]
        elif a == "--layout":
            kw["layout"] = next(it)
        elif a == "--bgr":
            kw["channel_order"] = "BGR"
        elif a == "--labels":
            kw["labels_file"] = str(EVAL / next(it))
        else:
            raise SystemExit(f"{entry['name']}: unsupported scan arg {a}")
    return kw


def collect(entry: dict[str, Any], runs: int) -> Path:
    """Reverse every label in `runs` independent runs; store the evidence."""
    from ncscan.inputs import InputOptions
    from ncscan.reverse import attack_success, preset, reverse_engineer
    from ncscan.scanner import prepare

    out = EVIDENCE / f"{entry['name']}.npz"
    if out.exists() and int(np.load(out)["l1"].shape[0]) >= runs:
        return out
    kw = scan_kwargs(entry)
    prep = prepare(str(EVAL / entry["model"]), str(EVAL / entry["scan_data"]), device="cpu", seed=0, inputs=InputOptions(**kw))
    cfg = preset("fast")
    k = prep.num_classes
    l1 = np.full((runs, k), np.nan)
    asr = np.full((runs, k), np.nan)
    steps = np.zeros((runs, k), dtype=np.int64)
    masks = np.zeros((runs, k) + tuple(prep.x.shape[2:]), dtype=np.float32)
    passes = np.zeros(runs, dtype=np.int64)
    wall = np.zeros(runs)
    for r in range(runs):
        t0 = time.perf_counter()
        traces, info = reverse_engineer(prep.pixel_model, prep.x, prep.y, list(range(k)), cfg, seed=r)
        wall[r] = time.perf_counter() - t0
        passes[r] = int(info["passes"])
        a = attack_success(prep.pixel_model, prep.x, prep.y, {t.label: t.trigger for t in traces})
        for t in traces:
            l1[r, t.label] = t.trigger.l1 if t.working else np.nan
            asr[r, t.label] = a[t.label]
            steps[r, t.label] = t.steps
            masks[r, t.label] = t.trigger.mask
        print(f"  {entry['name']} run {r}: {wall[r]:.1f}s {passes[r]} passes", file=sys.stderr, flush=True)
    EVIDENCE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, l1=l1, asr=asr, steps=steps, masks=masks, passes=passes, wall=wall,
                        clean_accuracy=np.float64(prep.clean_accuracy or np.nan))
    os.replace(tmp, out)
    return out


def probe_likeness(path: Path) -> dict[str, np.ndarray]:
    """Per model, each label's resemblance (`ncscan.resemblance.relative` of rep_cos * rep_nn)
    from `evidence_probe.py --rep --top 0` rows (one probe run per label; NaN where absent)."""
    from ncscan.resemblance import relative

    raw: dict[str, dict[int, float]] = {}
    for ln in path.read_text().splitlines():
        r = json.loads(ln)
        if r.get("rep_cos") is not None:
            raw.setdefault(r["model"], {})[r["label"]] = r["rep_cos"] * r["rep_nn"]
    out = {}
    for m, d in raw.items():
        rel = relative(d)
        out[m] = np.array([rel.get(i, np.nan) for i in range(max(d) + 1)])
    return out


def simulate(l1: np.ndarray, j: int, cfg: Any, masks: np.ndarray | None = None,
             likeness: np.ndarray | None = None) -> tuple[Any, int]:
    """The scan's restart policy replayed on stored runs: phase 1 is run j, each restart of a
    label takes its next stored run. `masks` (runs, labels, H, W) give the size run's
    compactness (None: size alone). Returns (Decision, extra label-runs spent)."""
    from ncscan.decide import compactness, decide, needs_restart

    r_all, k = l1.shape
    order = [(j + d) % r_all for d in range(r_all)]
    runs = [[float(l1[j, i])] for i in range(k)]

    def compact() -> list[float] | None:
        if masks is None:
            return None
        out = []
        for i, r in enumerate(runs):
            ok = [(v, order[n]) for n, v in enumerate(r) if np.isfinite(v)]
            out.append(compactness(masks[min(ok)[1], i], cfg.compact_window) if ok else float("nan"))
        return out

    extra = 0
    for rounds in (cfg.restarts, cfg.recheck_restarts):
        for i in needs_restart(runs, cfg, compact=compact()):
            for _ in range(rounds):
                if len(runs[i]) < r_all:
                    runs[i].append(float(l1[order[len(runs[i])], i]))
                    extra += 1
    like = None
    if likeness is not None:
        like = np.full(k, np.nan)
        like[: min(k, len(likeness))] = likeness[:k]
    return decide(runs, cfg, compact=compact(), likeness=like), extra


def replay(models: list[dict[str, Any]], cfg: Any, verbose: bool = True, use_shape: bool = True,
           likeness: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Decisions on stored evidence for every pseudo-seed; summary counts."""
    rows = []
    for e in models:
        f = EVIDENCE / f"{e['name']}.npz"
        if not f.exists():
            continue
        z = np.load(f)
        l1, masks = z["l1"], (z["masks"] if use_shape else None)
        truth = sorted(e["targets"]) if e["infected"] and e.get("in_scope", True) else []
        outs = []
        for j in range(l1.shape[0]):
            d, extra = simulate(l1, j, cfg, masks, None if likeness is None else likeness.get(e["name"]))
            outs.append((d.verdict, sorted(d.flagged), d, extra))
        ok = [o[1] == truth and (o[0] == "backdoor") == bool(truth) for o in outs]
        tgt_score = [float(np.nanmin(o[2].score[truth])) if truth else float("nan") for o in outs]
        others = [float(np.nanmax(np.delete(o[2].margin(), truth))) for o in outs]
        tgt_score = [float(np.nanmin(o[2].margin()[truth])) if truth else float("nan") for o in outs]
        rows.append(dict(name=e["name"], split=e["split"], family=e["family"], attack=e["attack"], truth=truth,
                         verdicts=[o[0] for o in outs], flagged=[o[1] for o in outs], ok=ok,
                         target_score=tgt_score, max_other=others, extra=[o[3] for o in outs]))
        if verbose:
            print(f"{e['name']:<34} {e['family']:<10} {str(truth):<8} "
                  + " ".join(f"{o[0][:4]}{o[1]}" for o in outs)
                  + f"  tgt {' '.join(f'{v:5.2f}' for v in tgt_score)}  other {' '.join(f'{v:5.2f}' for v in others)}"
                  + f"  +{[o[3] for o in outs]}")
    n_inf = sum(1 for r in rows if r["truth"])
    summary = dict(
        models=len(rows),
        infected_exact=sum(all(r["ok"]) for r in rows if r["truth"]), infected=n_inf,
        clean_flagged=sum(any(v == "backdoor" for v in r["verdicts"]) for r in rows if not r["truth"]),
        clean=len(rows) - n_inf,
        flips=sum(len(set(map(tuple, r["flagged"]))) > 1 or len(set(r["verdicts"])) > 1 for r in rows),
        wrong_runs=sum(not o for r in rows for o in r["ok"]), runs=sum(len(r["ok"]) for r in rows),
        extra_label_runs=sum(sum(r["extra"]) for r in rows),
    )
    return dict(rows=rows, summary=summary)


# Cheaper optimiser schedules for the speed study (issue #14: the cheapest that keeps every
# held-out verdict). Each is the default "fast" preset with the named changes.
SCHEDULES: dict[str, dict[str, Any]] = {
    "fast": {},
    "lambda_patience3": {"schedule": {"patience": 3}},
    "early_stop9": {"schedule": {"early_stop_patience": 9}},
    "minibatch3": {"mini_batches": 3},
    "max_steps150": {"max_steps": 150},
    "early_stop9_minibatch3": {"mini_batches": 3, "schedule": {"early_stop_patience": 9}},
}


def schedule_config(name: str) -> Any:
    """The ReverseConfig of a SCHEDULES entry."""
    from dataclasses import replace

    from ncscan.reverse import preset

    cfg = preset("fast")
    kw = dict(SCHEDULES[name])
    if "schedule" in kw:
        kw["schedule"] = replace(cfg.schedule, **kw["schedule"])
    return replace(cfg, **kw)


def scan_one(job: tuple[dict[str, Any], int, int, str]) -> dict[str, Any]:
    """One real default scan (ncscan.scan) of one model with one seed."""
    entry, seed, threads, schedule = job
    import torch

    torch.set_num_threads(threads)
    import ncscan

    t0 = time.perf_counter()
    rep = ncscan.scan(str(EVAL / entry["model"]), str(EVAL / entry["scan_data"]), seed=seed, device="cpu",
                      schedule=schedule_config(schedule),
                      **scan_kwargs(entry))
    wall = time.perf_counter() - t0
    truth = sorted(entry["targets"]) if entry["infected"] else []
    by = rep.by_label
    margin = {r.label: r.margin for r in rep.labels}
    others = [v for k, v in margin.items() if k not in truth and np.isfinite(v)]
    return dict(
        name=entry["name"], seed=seed, verdict=rep.verdict, flagged=sorted(rep.flagged),
        borderline=rep.borderline, margin=rep.margin, paper_flagged=sorted(rep.paper_flagged),
        size_only=size_only_call(rep), compact_only=size_only_call(rep, shape=True),
        target_margin=[by[t].margin for t in truth], target_evidence=[by[t].evidence for t in truth],
        target_score=[by[t].score for t in truth], target_paper_index=[by[t].anomaly_index for t in truth],
        target_compactness=[by[t].compactness for t in truth],
        target_likeness=[by[t].likeness for t in truth],
        max_other_margin=max(others) if others else None, passes=rep.passes, wall=round(wall, 1),
        runs=sum(len(r.run_l1) for r in rep.labels), reasons=rep.reasons,
        # per-label evidence, so a later decision can be replayed on these very runs
        evidence=[{"label": r.label, "run_l1": [round(float(v), 4) for v in r.run_l1],
                   "compactness": r.compactness, "likeness": r.likeness, "score": r.score,
                   "screened_out": r.screened_out} for r in rep.labels],
    )


def size_only_call(rep: Any, shape: bool = False) -> str:
    """An earlier default on the same runs: size alone (every label held to the threshold), or
    with `shape` size + the compact line (the default before resemblance)."""
    from ncscan.decide import decide

    eligible = np.array([not r.screened_out for r in rep.labels])
    compact = [r.compactness for r in rep.labels] if shape else None
    d = decide([list(r.run_l1) for r in rep.labels], rep.decide_config, eligible=eligible, compact=compact)
    labs = [rep.labels[i].label for i in d.flagged]
    return f"{d.verdict}{sorted(labs) if labs else ''}"


def scan_split(models: list[dict[str, Any]], seeds: list[int], jobs: int, tag: str, schedule: str = "fast") -> None:
    """Real scans, several seeds; results appended to bench/.evalset/scans_<tag>.jsonl as they
    come (a rerun skips what is there), then summarised into bench/verdict_<tag>.{md,json}."""
    import multiprocessing as mp

    tag = tag if schedule == "fast" else f"{tag}_{schedule}"
    log = EVAL / f"scans_{tag}.jsonl"
    done = set()
    if log.exists():
        done = {(d["name"], d["seed"]) for d in map(json.loads, log.read_text().splitlines())}
    # Seed-major: every model's first seed before any model's second, so a cut-short run still
    # covers the whole split.
    todo = [(e, s, max(1, 2 // jobs), schedule) for s in seeds for e in models if (e["name"], s) not in done]
    with mp.get_context("spawn").Pool(jobs) as pool, log.open("a") as f:
        for res in pool.imap_unordered(scan_one, todo):
            f.write(json.dumps(res) + "\n")
            f.flush()
            print(f"  {res['name']} seed {res['seed']}: {res['verdict']} {res['flagged']} "
                  f"margin {res['margin']} {res['wall']}s", file=sys.stderr, flush=True)
    rows = [json.loads(v) for v in log.read_text().splitlines()]
    summarise(models, [r for r in rows if r["seed"] in seeds], seeds, tag)


def _verdict_ok(entry: dict[str, Any], r: dict[str, Any]) -> bool:
    if entry["infected"] and entry.get("in_scope", True):
        return r["verdict"] == "backdoor" and r["flagged"] == sorted(entry["targets"])
    return r["verdict"] == "clean"


def _right_call(e: dict[str, Any]) -> str:
    """The right call in `size_only_call`'s format."""
    return f"backdoor{sorted(e['targets'])}" if e["infected"] and e.get("in_scope", True) else "clean"


def headline(per_model: list[dict[str, Any]]) -> list[str]:
    """The issue's acceptance counts for the default and for the earlier decisions on the same runs."""
    ms = [m for m in per_model if m["in_scope"]]
    inf, cl = [m for m in ms if m["infected"]], [m for m in ms if not m["infected"]]
    out = ["| decision (same runs) | infected flagged exactly, every seed | clean never flagged | "
           "clean called clean, every seed | models whose call changed with the seed |",
           "|---|---:|---:|---:|---:|"]
    for name, key in (("ncscan default (size + compact line + resemblance)", "calls"),
                      ("size + compact line (the previous default)", "compact_only"),
                      ("size alone (two defaults ago)", "size_only")):
        if any(None in m[key] for m in ms):
            continue  # an older log without this decision's call
        ok_inf = sum(all(c == m["right"] for c in m[key]) for m in inf)
        never = sum(not any(str(c).startswith("backdoor") for c in m[key]) for m in cl)
        ok_cl = sum(all(c == m["right"] for c in m[key]) for m in cl)
        flips = sum(len(set(m[key])) > 1 for m in ms)
        out.append(f"| {name} | {ok_inf}/{len(inf)} | {never}/{len(cl)} | {ok_cl}/{len(cl)} | {flips} |")
    return out


def _fmt_margin(v: float | None) -> str:
    return "" if v is None else f"{v:+.2f}"


def summarise(models: list[dict[str, Any]], rows: list[dict[str, Any]], seeds: list[int], tag: str) -> None:
    """Per model and per family: exact calls, clean flagged, flips, margins, cost."""
    by = {e["name"]: e for e in models}
    per_model = []
    for name in sorted({r["name"] for r in rows}):
        e, rs = by[name], sorted((r for r in rows if r["name"] == name), key=lambda r: r["seed"])
        calls = {(r["verdict"], tuple(r["flagged"])) for r in rs}
        per_model.append(dict(
            name=name, family=e["family"], attack=e["attack"], infected=e["infected"],
            in_scope=e.get("in_scope", True), targets=e["targets"], right=_right_call(e),
            calls=[f"{r['verdict']}{r['flagged'] if r['flagged'] else ''}" for r in rs],
            ok=sum(_verdict_ok(e, r) for r in rs), n=len(rs), flips=len(calls) > 1,
            paper_ok=sum((r["paper_flagged"] == sorted(e["targets"])) if e["infected"] else not r["paper_flagged"]
                         for r in rs),
            min_margin=min((r["margin"] for r in rs if r["margin"] is not None), default=None),
            target_margin=[round(min(r["target_margin"]), 2) for r in rs if r["target_margin"]],
            evidence=sorted({v for r in rs for v in r["target_evidence"]}),
            max_other=[round(r["max_other_margin"], 2) for r in rs if r["max_other_margin"] is not None],
            size_only=[r["size_only"] for r in rs],
            size_only_ok=sum(r["size_only"] == _right_call(e) for r in rs),
            compact_only=[r.get("compact_only") for r in rs],
            compact_only_ok=sum(r.get("compact_only") == _right_call(e) for r in rs),
            passes=int(np.mean([r["passes"] for r in rs])), wall=round(float(np.mean([r["wall"] for r in rs])), 1),
        ))
    (HERE / f"verdict_{tag}.json").write_text(json.dumps(dict(
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", seeds=seeds,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), models=per_model), indent=1) + "\n")
    lines = [
        f"# Verdicts on the {tag} split ({len(per_model)} models, seeds {','.join(map(str, seeds))})", "",
        f"`python bench/verdict_eval.py scan --split {tag} --seeds {','.join(map(str, seeds))}`; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPU cores, CPU only.", "",
        *headline(per_model), "",
        "| model | family | attack | targets | calls per seed | right | previous default right (same runs) "
        "| size-only rule right (same runs) "
        "| paper rule right | flips | verdict margin (min) | target margin per seed | target evidence "
        "| max other margin per seed | passes | wall s |",
        "|---|---|---|---|---|---:|---:|---:|---:|---|---:|---|---|---|---:|---:|",
    ]
    for m in per_model:
        lines.append(
            f"| {m['name']} | {m['family']} | {m['attack']}{'' if m['in_scope'] else ' (out of scope)'} "
            f"| {m['targets']} | {' '.join(m['calls'])} | {m['ok']}/{m['n']} | {m['compact_only_ok']}/{m['n']} "
            f"| {m['size_only_ok']}/{m['n']} "
            f"| {m['paper_ok']}/{m['n']} | {'YES' if m['flips'] else 'no'} | {_fmt_margin(m['min_margin'])} "
            f"| {' '.join(map(str, m['target_margin']))} | {' '.join(m['evidence'])} "
            f"| {' '.join(map(str, m['max_other']))} "
            f"| {m['passes']:,} | {m['wall']} |"
        )
    lines += ["", "Per family (in-scope models; a model counts only when every seed agrees):", "",
              "| family | infected flagged exactly | clean never flagged | clean called clean | models whose call "
              "changed with the seed |", "|---|---:|---:|---:|---:|"]
    for fam in sorted({m["family"] for m in per_model}):
        ms = [m for m in per_model if m["family"] == fam and m["in_scope"]]
        inf = [m for m in ms if m["infected"]]
        cl = [m for m in ms if not m["infected"]]
        never = sum(not any(c.startswith("backdoor") for c in m["calls"]) for m in cl)
        lines.append(f"| {fam} | {sum(m['ok'] == m['n'] for m in inf)}/{len(inf)} | {never}/{len(cl)} "
                     f"| {sum(m['ok'] == m['n'] for m in cl)}/{len(cl)} | {sum(m['flips'] for m in ms)} |")
    lines += ["", "Per seed (in-scope models):", "", "| seed | infected exact | clean flagged | inconclusive |",
              "|---:|---:|---:|---:|"]
    for s in seeds:
        rs = [r for r in rows if r["seed"] == s and by[r["name"]].get("in_scope", True)]
        inf = [r for r in rs if by[r["name"]]["infected"]]
        cl = [r for r in rs if not by[r["name"]]["infected"]]
        lines.append(f"| {s} | {sum(_verdict_ok(by[r['name']], r) for r in inf)}/{len(inf)} "
                     f"| {sum(r['verdict'] == 'backdoor' for r in cl)}/{len(cl)} "
                     f"| {sum(r['verdict'] == 'inconclusive' for r in rs)} |")
    (HERE / f"verdict_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def schedules_table(models: list[dict[str, Any]], split: str, seeds: list[int]) -> None:
    """The speed study: each schedule's calls against the truth and against the default's call
    on the same model and seed, with its image passes over the default's ->
    bench/verdict_schedules_<split>.md."""
    by = {e["name"]: e for e in models}

    def rows(name: str) -> dict[tuple[str, int], dict[str, Any]]:
        f = EVAL / (f"scans_{split}.jsonl" if name == "fast" else f"scans_{split}_{name}.jsonl")
        out = {}
        if f.exists():
            for ln in f.read_text().splitlines():
                r = json.loads(ln)
                if r["seed"] in seeds and r["name"] in by:
                    out[(r["name"], r["seed"])] = r
        return out

    base = rows("fast")
    lines = [f"# Cheaper schedules on the {split} split (seeds {','.join(map(str, seeds))})", "",
             f"`python bench/verdict_eval.py scan --split {split} --seeds {','.join(map(str, seeds))} "
             "--schedule NAME` for each NAME below (`SCHEDULES` in bench/verdict_eval.py); "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPU cores.", "",
             "| schedule | scans | right (truth) | same call as the default | image passes / default's | wall / default's |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in SCHEDULES:
        got = rows(name)
        keys = [k for k in got if k in base]
        if not keys:
            continue
        right = sum(_verdict_ok(by[k[0]], got[k]) for k in keys)
        same = sum((got[k]["verdict"], got[k]["flagged"]) == (base[k]["verdict"], base[k]["flagged"]) for k in keys)
        passes = sum(got[k]["passes"] for k in keys) / sum(base[k]["passes"] for k in keys)
        wall = sum(got[k]["wall"] for k in keys) / sum(base[k]["wall"] for k in keys)
        lines.append(f"| {name} {SCHEDULES[name] or '(default)'} | {len(keys)} | {right}/{len(keys)} | "
                     f"{same}/{len(keys)} | {passes:.2f} | {wall:.2f} |")
    (HERE / f"verdict_schedules_{split}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# Variants marked "+ resemblance" use the probe's likeness (bench/evidence_probe.py --rep --top 0
# > bench/.evalset/probe_all_<split>.jsonl); the others replay size and shape only.
NO_RESEMBLANCE = "size + compact line (the previous default, no resemblance)"
VARIANTS = {
    "default: + resemblance (likeness >= 0.75: compact -> 3.1, spread -> 4.1)": {},
    NO_RESEMBLANCE: {},
    "size alone (no compact line; two defaults ago)": {"compact_relief": 0.0},
    "+ resemblance, likeness >= 0.5": {"natural_likeness": 0.5},
    "+ resemblance, likeness >= 0.6": {"natural_likeness": 0.6},
    "+ resemblance, likeness >= 0.9": {"natural_likeness": 0.9},
    "+ resemblance, likeness >= 1.0": {"natural_likeness": 1.0},
    "+ resemblance, raise 0.5": {"natural_raise": 0.5},
    "+ resemblance, raise 1.5": {"natural_raise": 1.5},
    "+ resemblance, raise 2.0": {"natural_raise": 2.0},
    "compact line 2.1 (relief 1.0)": {"compact_relief": 1.0},
    "compact line 1.5 (relief 1.6)": {"compact_relief": 1.6},
    "compact share 0.45": {"compact_share": 0.45},
    "compact share 0.6": {"compact_share": 0.6},
    "compact window 1.0": {"compact_window": 1.0},
    "compact window 1.5": {"compact_window": 1.5},
    "compact window 2.0": {"compact_window": 2.0},
    "median of runs instead of min": {"size_of_runs": "median"},
    "floor 0.2": {"scale_floor": 0.2},
    "floor 0.3": {"scale_floor": 0.3},
    "floor 0.5": {"scale_floor": 0.5},
    "no restarts": {"restarts": 0, "recheck_restarts": 0},
    "no band (3.1 +- 0)": {"band": 0.0},
}


def paper_rule(models: list[dict[str, Any]]) -> dict[str, int]:
    """The paper's single-run MAD index > 2 on the same stored runs."""
    from ncscan.stats import anomaly_indices

    n = dict(infected_exact=0, infected=0, clean_flagged=0, clean=0, wrong_runs=0, runs=0)
    for e in models:
        f = EVIDENCE / f"{e['name']}.npz"
        if not f.exists():
            continue
        l1 = np.load(f)["l1"]
        truth = sorted(e["targets"]) if e["infected"] else []
        oks = [sorted(anomaly_indices(l1[j]).flagged) == truth for j in range(l1.shape[0])]
        n["runs"] += len(oks)
        n["wrong_runs"] += oks.count(False)
        if truth:
            n["infected"] += 1
            n["infected_exact"] += all(oks)
        else:
            n["clean"] += 1
            n["clean_flagged"] += not all(oks)
    return n


def write_replay(models: list[dict[str, Any]], tag: str) -> None:
    """The decision variants replayed on stored evidence -> bench/verdict_replay_<tag>.md."""
    from dataclasses import replace

    from ncscan.decide import DecideConfig

    lines = [f"# Decision variants replayed on stored runs ({tag} split)", "",
             f"`python bench/verdict_eval.py collect --split {tag} --runs 2 && "
             f"python bench/verdict_eval.py replay --split {tag}`", "",
             "Each model's labels were reversed in 2 independent full runs (seeds 0, 1; default optimiser). "
             "A replay takes run j as the scan's first run and the other run as the restart of every label "
             "the policy re-checks, for j = 0, 1 (so 2 pseudo-seeds per model; the real scan gives "
             "re-checked labels 2-4 restarts). Rows that name resemblance use each label's likeness from one "
             "probe run (`bench/evidence_probe.py --rep --top 0`, seed 0, every label, the scan's images); the "
             "other rows replay size and shape only.", "",
             "| variant | infected exact (all pseudo-seeds) | clean flagged | models whose call differs between "
             "pseudo-seeds | wrong calls / calls | lowest target margin | highest non-target margin |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    p = paper_rule(models)
    lines.append(f"| paper: MAD index > 2, one run | {p['infected_exact']}/{p['infected']} | "
                 f"{p['clean_flagged']}/{p['clean']} | | {p['wrong_runs']}/{p['runs']} | | |")
    base = None
    probe = EVAL / f"probe_all_{tag}.jsonl"
    like = probe_likeness(probe) if probe.exists() else None
    for name, kw in VARIANTS.items():
        cfg = replace(DecideConfig(), **kw)
        uses = "resemblance" in name and NO_RESEMBLANCE != name
        if uses and like is None:
            continue
        out = replay(models, cfg, verbose=False, likeness=like if uses else None)
        s = out["summary"]
        lo = min((v for r in out["rows"] for v in r["target_score"] if np.isfinite(v)), default=float("nan"))
        hi = max(v for r in out["rows"] for v in r["max_other"])
        lines.append(f"| {name} | {s['infected_exact']}/{s['infected']} | {s['clean_flagged']}/{s['clean']} | "
                     f"{s['flips']} | {s['wrong_runs']}/{s['runs']} | {lo:.2f} | {hi:.2f} |")
        base = base or out
    lines += ["", "Per model, default decision (margin = log-size score minus the label's line (3.1, or 1.8 for a compact mask); flagged above +0.2, borderline within 0.2):", "",
              "| model | family | attack | targets | calls | target margin | highest other margin | extra label-runs |",
              "|---|---|---|---|---|---|---|---|"]
    for r in base["rows"]:
        calls = " ".join(f"{v}{f if f else ''}" for v, f in zip(r["verdicts"], r["flagged"]))
        ts = " ".join(f"{v:.2f}" for v in r["target_score"] if np.isfinite(v))
        lines.append(f"| {r['name']} | {r['family']} | {r['attack']} | {r['truth']} | {calls} | {ts} | "
                     f"{' '.join(f'{v:.2f}' for v in r['max_other'])} | {' '.join(map(str, r['extra']))} |")
    (HERE / f"verdict_replay_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["collect", "replay", "scan", "schedules"])
    ap.add_argument("--split", default="tuning")
    ap.add_argument("--only", default="")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--schedule", default="fast", choices=sorted(SCHEDULES),
                    help="scan mode: the optimiser schedule (speed study; logs scans_<split>_<schedule>.jsonl)")
    a = ap.parse_args()
    names = [v for v in a.only.split(",") if v] or None
    models = load_manifest(a.split, names)
    if a.mode == "collect":
        import torch

        torch.set_num_threads(a.threads)
        for e in models:
            collect(e, a.runs)
    elif a.mode == "replay":
        write_replay(models, a.split)
    elif a.mode == "schedules":
        schedules_table(models, a.split, [int(v) for v in a.seeds.split(",")])
    else:
        scan_split(models, [int(v) for v in a.seeds.split(",")], a.jobs, a.split.replace(",", "+"), a.schedule)


if __name__ == "__main__":
    main()
