"""Image passes of the default scan before and after the verdict change (issue #14), side by side.

Runs the CLI of a given older commit (checked out into a temporary git worktree, same Python)
and of this tree on the same 10-class MNIST fixtures and seeds, one process per scan, and
writes bench/verdict_cost.{md,json} with the passes ratio.

  python bench/verdict_cost.py [--old a545734] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = [("mnist_badnets_square", "fixtures/models/mnist_badnets_square.onnx"),
            ("mnist_clean", "fixtures/models/mnist_clean.onnx")]
DATA = "fixtures/data/mnist/scan"


def one(src: Path, model: str, seed: int) -> dict:
    """One CLI scan with the ncscan package from `src`; its JSON report's key figures."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        env = {**os.environ, "PYTHONPATH": str(src)}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ncscan", str(ROOT / model), "--data", str(ROOT / DATA),
                        "--seed", str(seed), "--device", "cpu", "-q", "-o", str(out)], env=env, cwd=d, check=False)
        wall = time.perf_counter() - t0
        r = json.loads(out.read_text())
    return {"verdict": r["verdict"], "flagged": r["flagged"], "passes": r["image_passes"], "wall": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="a545734")
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args()
    seeds = [int(v) for v in a.seeds.split(",")]
    with tempfile.TemporaryDirectory() as wt:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", wt, a.old], check=True,
                       capture_output=True)
        try:
            rows = []
            for name, model in FIXTURES:
                for s in seeds:
                    rows.append({"fixture": name, "seed": s, "old": one(Path(wt), model, s), "new": one(ROOT, model, s)})
                    print(rows[-1], file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", wt], check=False)
    old = sum(r["old"]["passes"] for r in rows)
    new = sum(r["new"]["passes"] for r in rows)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only", "old": a.old,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "passes_ratio": round(new / old, 3),
            "command": f"python bench/verdict_cost.py --old {a.old} --seeds {a.seeds}"}
    (ROOT / "bench" / "verdict_cost.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Cost of the new verdict: image passes, old ({a.old}) vs new, same seeds", "",
             f"`{meta['command']}`; {meta['date']}; {meta['machine']} (other jobs were running: wall "
             "times are indicative only, passes are exact).", "",
             "| fixture | seed | old call | old passes | new call | new passes | ratio |", "|---|---:|---|---:|---|---:|---:|"]
    for r in rows:
        o, n = r["old"], r["new"]
        lines.append(f"| {r['fixture']} | {r['seed']} | {o['verdict']}{o['flagged']} | {o['passes']:,} | "
                     f"{n['verdict']}{n['flagged']} | {n['passes']:,} | {n['passes'] / o['passes']:.2f} |")
    lines += ["", f"Total: {new:,} / {old:,} passes = **{new / old:.2f}x** the old default."]
    (ROOT / "bench" / "verdict_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
