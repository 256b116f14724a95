"""Same seed, same report: scan every fixture with the code of two git revisions and compare
the JSON reports (issue #18's refactoring must not change a verdict, a norm or a bit).

    python bench/same_reports.py --base 57aaad7            # base revision vs the working tree
    python bench/same_reports.py --base 57aaad7 --head HEAD
    python bench/same_reports.py --base 57aaad7 --only mnist_clean,cmnist_badnets

Each revision's package is checked out into a temporary git worktree and run as
`python -m ncscan scan FIXTURE --data ... --seed 0 --device cpu -f json` with that tree
first on PYTHONPATH; reports are kept in bench/.same_reports/<rev>/ (git-ignored), so a
revision is scanned once. Fields that measure the run rather than the model (elapsed time,
per-stage timings, memory, the version string) are left out of the comparison. The result
goes to stdout and bench/same_reports.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".same_reports"
MANIFESTS = [ROOT / "fixtures" / "manifest.json", ROOT / "fixtures" / "keras" / "manifest.json"]
VOLATILE = {"elapsed_seconds", "timings", "memory", "ncscan_version"}


ONLY: set[str] = set()  # --only: these fixtures (empty: all)


def fixtures() -> list[dict[str, Any]]:
    out = []
    for m in MANIFESTS:
        for e in json.loads(m.read_text())["fixtures"]:
            if not ONLY or e["name"] in ONLY:
                out.append({**e, "_dir": m.parent})
    return out


def preprocess_args(e: dict[str, Any]) -> list[str]:
    if e.get("preprocess_in_metadata"):
        return []
    pp = e["preprocess"]
    args = ["--pixel-range", ",".join(str(v) for v in pp["pixel_range"])]
    for k in ("mean", "std"):
        if pp.get(k) is not None:
            args += [f"--{k}", ",".join(str(v) for v in pp[k])]
    return args + (["--bgr"] if pp.get("channel_order") == "BGR" else [])


def scan_all(rev: str | None, out: Path) -> None:
    """Scan every fixture with the code at `rev` (None: the working tree) into out/<name>.json."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = ROOT
        if rev is not None:
            src = Path(tmp) / "tree"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(src), rev],
                           check=True, capture_output=True)
        try:
            env = {**os.environ, "PYTHONPATH": str(src)}
            for e in fixtures():
                dst = out / f"{e['name']}.json"
                if dst.exists():
                    continue
                d = e["_dir"]
                cmd = [sys.executable, "-m", "ncscan", "scan", str(d / e["file"]), "--data", str(d / e["scan_data"]),
                       *preprocess_args(e), "--seed", "0", "--device", "cpu", "-f", "json", "-o", str(dst), "-q"]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
                print(f"{rev or 'worktree'} {e['name']}: exit {p.returncode}", flush=True)
                if p.returncode not in (0, 1, 4):
                    raise SystemExit(f"scan failed: {' '.join(cmd)}\n{p.stderr}")
        finally:
            if rev is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(src)], check=False)


def strip(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: strip(v) for k, v in doc.items() if k not in VOLATILE}
    if isinstance(doc, list):
        return [strip(v) for v in doc]
    return doc


def diff_paths(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two JSON documents differ (key paths), at most a few per document."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += diff_paths(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff_paths(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("--head", default=None, help="git revision (default: the working tree)")
    ap.add_argument("--only", default="", help="comma-separated fixture names (default: every fixture)")
    args = ap.parse_args()
    ONLY.update(v for v in args.only.split(",") if v)
    base_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base], check=True,
                              capture_output=True, text=True).stdout.strip()
    head_name = "worktree" if args.head is None else subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", args.head], check=True, capture_output=True, text=True).stdout.strip()
    a_dir, b_dir = CACHE / base_rev, CACHE / head_name
    if args.head is None and b_dir.exists():  # the working tree changes: never reuse its reports
        for f in b_dir.glob("*.json"):
            f.unlink()
    scan_all(base_rev, a_dir)
    scan_all(args.head, b_dir)
    rows, same = [], 0
    for e in fixtures():
        a = strip(json.loads((a_dir / f"{e['name']}.json").read_text()))
        b = strip(json.loads((b_dir / f"{e['name']}.json").read_text()))
        d = diff_paths(a, b)
        same += not d
        rows.append(f"| {e['name']} | {'identical' if not d else 'DIFFERS: ' + ', '.join(d[:4])} |")
    text = "\n".join([
        f"# Same seed, same report: {base_rev} vs {head_name}", "",
        f"`python bench/same_reports.py --base {args.base}" + (f" --head {args.head}" if args.head else "")
        + (f" --only {args.only}" if args.only else "") + "`; "
        f"every fixture scanned with `--seed 0 --device cpu -f json`; compared without {sorted(VOLATILE)}.", "",
        f"**{same}/{len(rows)} reports identical.**", "", "| fixture | result |", "| --- | --- |", *rows, "",
    ])
    (ROOT / "bench" / "same_reports.md").write_text(text)
    print(text)
    sys.exit(0 if same == len(rows) else 1)


if __name__ == "__main__":
    main()
