"""Side-by-side scan benchmark: ncscan's default vs the reference (original) algorithm.

Each measurement runs in its own child process so peak memory (ru_maxrss) is per run.
Writes bench/results.json and bench/results.md (table + machine + date + command).

    python bench/run.py                       # default fixtures, default + reference
    python bench/run.py --quick               # default mode only
    python bench/run.py --fixtures mnist_badnets_square,mnist_clean --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_FIXTURES = ["mnist_badnets_square", "mnist_clean", "mnist_badnets_keras", "combo30_badnets"]


def _entries() -> dict[str, dict[str, Any]]:
    out = {}
    for m in (ROOT / "fixtures" / "manifest.json", ROOT / "fixtures" / "keras" / "manifest.json"):
        if m.exists():
            for e in json.loads(m.read_text())["fixtures"]:
                e = dict(e)
                e["_base"] = str(m.parent)
                out[e["name"]] = e
    return out


def _pp(e: dict[str, Any]) -> dict[str, Any]:
    if e.get("preprocess_in_metadata"):
        return {}
    pp = e["preprocess"]
    kw: dict[str, Any] = {"pixel_range": pp["pixel_range"]}
    for k in ("mean", "std"):
        if pp.get(k) is not None:
            kw[k] = pp[k]
    if pp.get("channel_order", "RGB") != "RGB":
        kw["channel_order"] = pp["channel_order"]
    return kw


def worker(args: argparse.Namespace) -> None:
    """Run one scan and print one JSON line (in a child process)."""
    import torch

    from ncscan.scanner import scan

    torch.set_num_threads(args.threads)
    e = _entries()[args.fixture]
    base = Path(e["_base"])
    t0 = time.perf_counter()
    r = scan(str(base / e["file"]), str(base / e["scan_data"]), seed=args.seed, device="cpu", schedule=args.mode, **_pp(e))
    wall = time.perf_counter() - t0
    tgt = e["targets"][0] if e["targets"] else None
    truth = set(e["targets"])
    print(json.dumps({
        "fixture": args.fixture, "mode": args.mode, "wall_s": wall,
        "reverse_s": r.timings.get("reverse"), "passes": r.passes,
        "flagged": r.flagged, "verdict": r.verdict,
        "target_anomaly_index": None if tgt is None else r.by_label[tgt].anomaly_index,
        "correct": set(r.flagged) == truth and (r.verdict == "backdoor") == bool(truth),
        "num_classes": r.num_classes,
    }))


def run_child(fixture: str, mode: str, threads: int, seed: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--fixture", fixture, "--mode", mode,
           "--threads", str(threads), "--seed", str(seed)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    _, status, ru = os.wait4(p.pid, 0)
    out = p.stdout.read() if p.stdout else ""
    err = p.stderr.read() if p.stderr else ""
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        return {"fixture": fixture, "mode": mode, "error": err.strip().splitlines()[-1:] or [f"exit {rc}"]}
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = ru.ru_maxrss / 1024.0
    return res


def run_art(fixture: str, python: str, steps: int, threads: int) -> dict[str, Any]:
    """ART 1.20's NeuralCleanse via bench/art_nc.py in a TensorFlow environment."""
    cmd = [python, str(ROOT / "bench" / "art_nc.py"), fixture, "--steps", str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    row: dict[str, Any] = {"fixture": fixture, "mode": f"ART (steps {steps})"}
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    except OSError as e:
        return {**row, "error": [f"cannot start {python}: {e}"]}
    out, err = p.communicate()
    if p.returncode != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        return {**row, "error": lines[-1:] or [f"exit {p.returncode}"]}
    res = json.loads(out.strip().splitlines()[-1])
    e = _entries()[fixture]
    tgt = e["targets"][0] if e["targets"] else None
    truth = set(e["targets"])
    flagged = res["flagged"]
    row.update(
        tool=res["tool"], config=res["config"], wall_s=res["wall_s"], passes=res["passes"], peak_rss_mb=res["peak_rss_mb"],
        flagged=flagged, verdict="backdoor" if flagged else "clean",
        target_anomaly_index=None if tgt is None else res["anomaly_index"][tgt],
        correct=set(flagged) == truth, mask_l1=res["mask_l1"],
    )
    return row


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(),
        "torch": torch.__version__, "platform": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fixture")
    ap.add_argument("--mode", default="fast")
    ap.add_argument("--fixtures", default=",".join(DEFAULT_FIXTURES))
    ap.add_argument("--repeats", type=int, default=1, help="repeat the default mode this many times (median)")
    ap.add_argument("--quick", action="store_true", help="skip the reference mode")
    ap.add_argument("--reference-fixtures", default="mnist_badnets_square,mnist_clean",
                    help="fixtures also run in reference mode (it is slow); 'all' for every one")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench"))
    ap.add_argument("--art-python", default=os.environ.get("NCSCAN_ART_PYTHON"),
                    help="a Python with tensorflow + adversarial-robustness-toolbox 1.20: runs ART's NeuralCleanse on the Keras fixtures")
    ap.add_argument("--art-steps", type=int, default=1000, help="ART's steps per label (its default 1000)")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    ents = _entries()
    names = [n for n in args.fixtures.split(",") if n]
    rows: list[dict[str, Any]] = []
    for n in names:
        if n not in ents:
            print(f"skip {n}: not in the manifests", file=sys.stderr)
            continue
        runs = [run_child(n, "fast", args.threads, args.seed) for _ in range(args.repeats)]
        ok = [r for r in runs if "error" not in r]
        fast = dict(ok[0]) if ok else runs[0]
        if ok:
            fast["wall_s"] = statistics.median(r["wall_s"] for r in ok)
            fast["repeats"] = len(ok)
        rows.append(fast)
        print(json.dumps(fast), file=sys.stderr)
        ref_set = set(args.reference_fixtures.split(","))
        if not args.quick and ("all" in ref_set or n in ref_set):
            ref = run_child(n, "reference", args.threads, args.seed)
            rows.append(ref)
            print(json.dumps(ref), file=sys.stderr)
        if args.art_python and "keras" in ents[n]["_base"]:
            art = run_art(n, args.art_python, args.art_steps, args.threads)
            rows.append(art)
            print(json.dumps(art), file=sys.stderr)
    mach = machine()
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps({"machine": mach, "command": cmd, "rows": rows}, indent=2) + "\n")
    (out / "results.md").write_text(render(rows, mach, cmd))
    print((out / "results.md").read_text())


def render(rows: list[dict[str, Any]], mach: dict[str, Any], cmd: str) -> str:
    lines = [
        "# ncscan benchmark", "",
        f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory']}; {mach['platform']}",
        f"- python {mach['python']}, torch {mach['torch']}; CPU only",
        f"- date: {mach['date']}",
        f"- command: `{cmd}`", "",
        "| fixture | mode | wall s | image passes | peak RSS MB | flagged | verdict | target index | right? | fast's speed-up (wall / passes) |",
        "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | --- | ---: |",
    ]
    others = [r for r in rows if r.get("mode") != "fast" and "wall_s" in r]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['fixture']} | {r['mode']} | error: {' '.join(r['error'])} | | | | | | | |")
            continue
        sp = ""
        if r["mode"] == "fast":
            sp = "; ".join(
                f"vs {o['mode']}: {o['wall_s'] / r['wall_s']:.1f}x / {o['passes'] / r['passes']:.1f}x"
                for o in others if o["fixture"] == r["fixture"]
            )
        ti = "" if r["target_anomaly_index"] is None else f"{r['target_anomaly_index']:.2f}"
        lines.append(
            f"| {r['fixture']} | {r['mode']} | {r['wall_s']:.1f} | {r['passes']:,} | {r['peak_rss_mb']:.0f} | "
            f"{r['flagged']} | {r['verdict']} | {ti} | {'yes' if r['correct'] else 'NO'} | {sp} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
