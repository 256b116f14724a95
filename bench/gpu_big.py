"""Big models on a GPU (issue #17): 1,000-class ResNet-50 and ViT-B/16 scans on CUDA with
pre-screening, recording wall time, image passes, GPU memory and per-stage times.

Prepared to run in one call when a GPU machine is lent (it has torch, torchvision and
onnxruntime but no network and no onnx2torch; the onnx2torch wheel travels in the
git-ignored bench/.gpu/wheels, fetched here with `pip download --no-deps onnx2torch==1.5.15
-d bench/.gpu/wheels`):

    # device.run, carry ["bench/.gpu/wheels"], timeout_s 600:
    python3 -m pip install -q --no-deps bench/.gpu/wheels/onnx2torch-*.whl && \\
      PYTHONPATH=. python3 bench/gpu_big.py run --out $OUT --budget-s 540
    # back here, with the JSON that came back:
    python bench/gpu_big.py report DIR/gpu_big.json        # -> section in bench/gpu.md

Per architecture (torchvision, random weights, seed 0, 1,000-class head, BatchNorm
statistics set as in bench/arch.py, exported by the legacy exporter at opset 17 since the
exporter does not change the torch graph's cost; dynamo if legacy is gone):
1. throughput: ms per image pass (forward + backward to the input) at batch 64 on the device;
2. a pre-screened scan of all 1,000 labels on `--max-images` random images labelled with
   the model's own predictions, with the steps capped (`--max-steps`) so both fit the
   budget; wall time, image passes, per-stage times (prepare / reverse / restarts), peak
   CUDA memory, peak RSS;
3. the projected cost of a complete default scan: measured passes of complete scans
   (bench/arch.py MEASURED_PASSES) x the measured time per pass, and x the capped scan's
   own seconds per pass (which includes the batching the scan really does).
Results are written after every stage, so a run cut short keeps what it measured. Without
CUDA it runs the same path on the CPU (`--device cpu`), e.g. as a smoke test with
`--archs mobilenet_v3_large --classes 10 --max-images 10 --max-steps 1`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.arch import MEASURED_PASSES, build, peak_rss_mb, scan_data

BEGIN = "<!-- gpu_big: begin -->"
END = "<!-- gpu_big: end -->"


def _export(net: Any, path: Path) -> str:
    import warnings

    import torch

    x = torch.rand(2, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                net, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                output_names=["logits"], dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}},
            )  # fmt: skip
            return "legacy"
        except Exception:  # noqa: BLE001 - a torch without the TorchScript exporter
            torch.onnx.export(
                net, (x,), str(path), dynamo=True, opset_version=18,
                dynamic_shapes={"x": {0: torch.export.Dim("b", min=1, max=4096)}},
            )  # fmt: skip
            return "dynamo"


def _pass_ms(path: Path, device: str, batch: int) -> float:
    import torch

    from ncscan.model import convert, load_onnx
    from ncscan.preprocess import PixelModel, Preprocess

    om = load_onnx(path)
    pm = PixelModel(convert(om), Preprocess(layout=om.input.layout), 3).to(device)
    x = torch.rand(batch, 3, 224, 224, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    best = float("inf")
    for i in range(4):
        xi = x.clone().requires_grad_(True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(pm(xi), y).backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - t0)
    return 1000.0 * best / batch


def _one(
    arch: str, args: argparse.Namespace, device: str, work: Path, t_end: float
) -> dict[str, Any]:
    import torch

    from ncscan.reverse import preset
    from ncscan.scanner import scan

    row: dict[str, Any] = {"arch": arch, "classes": args.classes, "device": device}
    t0 = time.perf_counter()
    net = build(arch, num_classes=args.classes)
    path = work / f"{arch}.onnx"
    row["exporter"] = _export(net, path)
    del net
    data = scan_data(work / f"{arch}.npz", path, n=args.max_images)
    row["setup_s"] = round(time.perf_counter() - t0, 1)
    row["ms_per_pass"] = round(_pass_ms(path, device, args.pass_batch), 3)
    row["pass_batch"] = args.pass_batch
    row["projected_full_scan_s_from_ms_per_pass"] = {
        f"{k}_{m}": round(v * row["ms_per_pass"] / 1000.0, 1)
        for (k, m), v in MEASURED_PASSES.items()
    }
    # Fit the capped scan into what is left of the budget. Pre-screening's stage 1 runs
    # every label for ncscan.prescreen.STEPS (20) steps of mini_batches x batch/2 passes,
    # ~1.5k passes a label, 1.5M at 1,000 labels: more than a 10-minute device call holds
    # for ResNet-50, so this capped run lowers STEPS to the step cap too (recorded). One
    # step of every label costs mini_batches x batch/2 passes, x1.5 for stage 2 and checks.
    base = preset("fast")
    per_step = args.classes * base.mini_batches * max(8, base.batch_size // 2)
    step_s = per_step * row["ms_per_pass"] / 1000.0 * 1.5
    left = t_end - time.perf_counter()
    steps = min(args.max_steps, int(left // step_s)) if step_s > 0 else args.max_steps
    row["scan_step_estimate_s"] = round(step_s, 1)
    if steps < 1:
        row["scan"] = f"skipped: one step of every label (~{step_s:.0f} s) exceeds the budget left"
        return row
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    cfg = dataclasses.replace(base, max_steps=steps)
    import ncscan.prescreen

    stage1_default = ncscan.prescreen.STEPS
    ncscan.prescreen.STEPS = min(stage1_default, steps)
    row["prescreen_stage1_steps"] = ncscan.prescreen.STEPS
    t1 = time.perf_counter()
    rep = scan(path, data, device=device, prescreen=args.prescreen, schedule=cfg,
               max_images=args.max_images, seed=0, force=True)  # fmt: skip
    ncscan.prescreen.STEPS = stage1_default
    row["scan_wall_s"] = round(time.perf_counter() - t1, 1)
    row["scan_passes"] = rep.passes
    row["scan_timings_s"] = {k: round(v, 1) for k, v in rep.timings.items()}
    row["scan_memory"] = rep.memory
    row["scan_verdict"] = rep.verdict
    row["scan_flagged"] = len(rep.flagged)
    row["scan_max_steps"] = steps
    row["scan_images"] = rep.n_images
    row["prescreen"] = args.prescreen
    opt_s = rep.timings.get("reverse", 0.0) + rep.timings.get("restarts", 0.0)
    if rep.passes:
        s_per_pass = opt_s / rep.passes
        row["scan_ms_per_pass"] = round(1000.0 * s_per_pass, 3)
        row["projected_full_scan_s_from_scan"] = {
            f"{k}_{m}": round(v * s_per_pass, 1) for (k, m), v in MEASURED_PASSES.items()
        }
    if device.startswith("cuda"):
        row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    row["peak_rss_mb"] = round(peak_rss_mb())
    return row


def run(args: argparse.Namespace) -> None:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = args.device if (cuda or not args.device.startswith("cuda")) else "cpu"
    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": device,
        "command": " ".join(sys.argv),
        "note": None if cuda or not args.device.startswith("cuda") else "no CUDA: ran on CPU",
    }
    res: dict[str, Any] = {"env": env, "rows": []}
    t_end = time.perf_counter() + args.budget_s
    with tempfile.TemporaryDirectory(prefix="ncscan-gpu-big-") as td:
        archs = args.archs.split(",")
        for i, arch in enumerate(archs):
            # each model gets an equal share of what is left (its setup included)
            share_end = time.perf_counter() + (t_end - time.perf_counter()) / (len(archs) - i)
            try:
                row = _one(arch, args, device, Path(td), share_end)
            except Exception as e:  # noqa: BLE001 - recorded, the next model still runs
                row = {"arch": arch, "error": f"{type(e).__name__}: {e}"}
            res["rows"].append(row)
            (out / "gpu_big.json").write_text(json.dumps(res, indent=1) + "\n")
            print(json.dumps(row), flush=True)


def _h(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def report(args: argparse.Namespace) -> None:
    res = json.loads(Path(args.json).read_text())
    env = res["env"]
    lines = [
        BEGIN,
        "## Big models: 1,000-class ResNet-50 and ViT-B/16 (bench/gpu_big.py)",
        "",
        f"{env['date']}; {env.get('gpu') or 'no GPU'} ({env['machine']}), torch {env['torch']}"
        f" (CUDA {env['cuda']}), Python {env['python']}; device {env['device']}"
        + (f" ({env['note']})" if env.get("note") else "")
        + f". Command: `{env['command']}`.",
        "",
        (
            "Scans are capped to fit the device budget (steps per label and pre-screening's "
            "stage-1 steps both lowered to the cap recorded in gpu_big.json), so their verdicts mean "
            "nothing (random weights, random images); the figures are wall time, passes, memory "
            "and stage times. Projection: measured passes of complete default scans "
            "(bench/arch.py MEASURED_PASSES) x seconds per pass."
        ),
        "",
        (
            "| model | ms/pass (batch) | scan wall s | passes | prepare / reverse / restarts s "
            "| peak CUDA MB | full 1,000-class scan, pre-screening (from scan / from ms/pass) "
            "| without pre-screening |"
        ),
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['arch']} | failed: {r['error']} | | | | | | |")
            continue
        t = r.get("scan_timings_s", {})
        fs = r.get("projected_full_scan_s_from_scan", {})
        fp = r["projected_full_scan_s_from_ms_per_pass"]
        on = f"{_h(fs['1000_on'])} / {_h(fp['1000_on'])}" if fs else _h(fp["1000_on"])
        off = f"{_h(fs['1000_off'])} / {_h(fp['1000_off'])}" if fs else _h(fp["1000_off"])
        lines.append(
            f"| {r['arch']} ({r['classes']} classes) | {r['ms_per_pass']} ({r['pass_batch']}) | "
            f"{r.get('scan_wall_s', r.get('scan', ''))} | {r.get('scan_passes', '')} | "
            f"{t.get('prepare', '')} / {t.get('reverse', '')} / {t.get('restarts', '')} | "
            f"{r.get('peak_cuda_mb', '')} | {on} | {off} |"
        )
    lines += ["", END]
    section = "\n".join(lines)
    gpu_md = ROOT / "bench" / "gpu.md"
    text = gpu_md.read_text() if gpu_md.exists() else "# GPU benchmarks\n"
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END) + len(END)
        text = text[:a] + section + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    gpu_md.write_text(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default=os.environ.get("OUT", "bench/.gpu/out"))
    r.add_argument("--device", default="cuda")
    r.add_argument("--archs", default="resnet50,vit_b_16")
    r.add_argument("--classes", type=int, default=1000)
    r.add_argument("--max-images", type=int, default=256)
    r.add_argument("--max-steps", type=int, default=3, help="cap on steps per label (budget)")
    r.add_argument("--prescreen", default="on", choices=("on", "off", "auto"))
    r.add_argument("--pass-batch", type=int, default=64)
    r.add_argument("--budget-s", type=float, default=540, help="seconds for the whole run")
    q = sub.add_parser("report")
    q.add_argument("json")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
