"""The same many-class scan locally and through Ray on this machine.

A 100-class model (bench/scaling.py's `wide_model`: the infected MNIST fixture's backbone,
head widened with random rows; target 7) is scanned with the default settings
(pre-screening on above 64 labels), once in this process and once with its label chunks as
Ray tasks on a local cluster of as many CPUs as the machine has; then both again with the
label chunk forced to `--chunk` labels so there are several tasks to run in parallel. Each
run records wall seconds, image passes, flagged labels and whether every label's reversed
trigger is bit-identical to the local run's.

    OMP_NUM_THREADS=1 python bench/ray_bench.py --classes 100 --chunk 25 --out bench

Writes bench/ray.json and bench/ray_runs.md (the measured table; bench/ray.md is the
written plan and reading). CPU timings here are distorted when other jobs share the
machine: the load average (`uptime`) is recorded before and after every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scaling import wide_model  # noqa: E402


def _load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        return f"loadavg {os.getloadavg()}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=25, help="forced label chunk for the second pair of runs (0: skip)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--max-steps", type=int, default=None, help="cap on steps per label (default: the preset's 300)")
    ap.add_argument("--skip-default", action="store_true", help="only the forced-chunk pair")
    ap.add_argument("--out", default=str(ROOT / "bench"))
    args = ap.parse_args()

    import ray

    from ncscan.distributed import connect
    from ncscan.reverse import preset
    from ncscan.scanner import scan

    data = str(ROOT / "fixtures/data/mnist/scan")
    rows: list[dict[str, Any]] = []
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
        "torch_threads_local": torch.get_num_threads(), "ray_cpus": args.cpus,
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python bench/ray_bench.py "
        + " ".join(sys.argv[1:]),
    }
    with tempfile.TemporaryDirectory() as td:
        path = Path(td) / f"wide{args.classes}.onnx"
        wide_model(args.classes, path)
        t = time.perf_counter()
        ray.init(num_cpus=args.cpus, num_gpus=0, include_dashboard=False, log_to_driver=False)
        meta["ray_init_s"] = round(time.perf_counter() - t, 2)
        backend = connect("auto")
        base = preset("fast")
        if args.max_steps:
            base = dataclasses.replace(base, max_steps=args.max_steps)
        configs = [] if args.skip_default else [("default chunking", base)]
        if args.chunk:
            configs.append((f"chunk {args.chunk}", dataclasses.replace(base, label_chunk=args.chunk)))
        for name, cfg in configs:
            local = None
            for mode in ("local", "ray"):
                before = _load()
                t0 = time.perf_counter()
                r = scan(str(path), data, device="cpu", seed=0, schedule=cfg,
                         runner=backend.runner if mode == "ray" else None)
                wall = time.perf_counter() - t0
                row: dict[str, Any] = {
                    "config": name, "mode": mode, "wall_s": round(wall, 1),
                    "reverse_s": round(r.timings["reverse"], 1), "prepare_s": round(r.timings["prepare"], 1),
                    "passes": r.passes, "flagged": r.flagged, "verdict": r.verdict,
                    "label7_index": round(r.by_label[7].anomaly_index, 2),
                    "fully_optimised": sum(1 for x in r.labels if not x.screened_out),
                    "load_before": before, "load_after": _load(),
                }
                if mode == "local":
                    local = r
                else:
                    assert local is not None
                    row["identical_to_local"] = all(
                        np.array_equal(a.trigger.mask, b.trigger.mask) and np.array_equal(a.trigger.pattern, b.trigger.pattern)
                        for a, b in zip(local.labels, r.labels)
                    )
                    row["same_flagged"] = local.flagged == r.flagged
                    row["overhead_ratio"] = round(wall / next(x["wall_s"] for x in rows if x["config"] == name and x["mode"] == "local"), 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
        backend.close()
        ray.shutdown()
    out = Path(args.out)
    (out / "ray.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    lines = [
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}; torch {meta['torch']}, ray {meta['ray']}; "
        f"local scan: {meta['torch_threads_local']} torch thread(s); Ray: local cluster of {args.cpus} CPUs, one "
        f"1-thread task per CPU; `ray.init` took {meta['ray_init_s']} s (not included below).",
        "",
        "| config | mode | wall s | reverse s | image passes | fully optimised | flagged | label 7 index | identical to local | overhead (Ray / local wall) | load before → after |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | --- |",
    ]
    for r in rows:
        ld = lambda s: s.split("load average:")[-1].strip() if "load average" in s else s  # noqa: E731
        lines.append(
            f"| {r['config']} | {r['mode']} | {r['wall_s']} | {r['reverse_s']} | {r['passes']:,} | {r['fully_optimised']} | "
            f"{r['flagged']} | {r['label7_index']} | {r.get('identical_to_local', '')} | {r.get('overhead_ratio', '')} | "
            f"{ld(r['load_before'])} → {ld(r['load_after'])} |"
        )
    (out / "ray_runs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
