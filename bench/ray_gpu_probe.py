"""Measure ncscan's optimisation loop on one GPU for a VGG-Face-sized model (for bench/ray.md).

VGG-16 at 3x224x224 with a 2,622-way head (the VGG-Face shape; random weights: only the
cost is measured, not detection) runs `ncscan.reverse.reverse_chunk` for a few steps at
several label-chunk sizes; the result is image passes per second and peak memory, the
numbers the 2,622-class plan in bench/ray.md scales by. Needs only torch, torchvision and
ncscan's own reverse.py (no ONNX conversion).

    python bench/ray_gpu_probe.py --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", default="8,16,32")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    import torchvision

    from ncscan.reverse import preset, reverse_chunk

    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    net = torchvision.models.vgg16(num_classes=2622).eval().to(dev)
    for p in net.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((512, 3, 224, 224), generator=g)
    y = torch.randint(0, 2622, (512,), generator=g)
    rows = []
    info = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32, "matmul_tf32": torch.backends.cuda.matmul.allow_tf32}
    # Warm-up (cudnn autotuning, allocator).
    reverse_chunk(net, x, y, [0, 1], dataclasses.replace(preset("fast"), label_chunk=2, max_steps=1), seed=0, device=dev)
    for L in [int(v) for v in args.chunks.split(",")]:
        cfg = dataclasses.replace(preset("fast"), label_chunk=L, max_steps=args.steps)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            _traces, passes = reverse_chunk(net, x, y, list(range(L)), cfg, seed=0, device=dev)
        except torch.cuda.OutOfMemoryError:
            rows.append({"label_chunk": L, "oom": True})
            torch.cuda.empty_cache()
            continue
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row = {"label_chunk": L, "images_per_forward": L * cfg.batch_size, "steps": args.steps,
               "passes": passes, "seconds": round(dt, 2), "passes_per_s": round(passes / dt, 1),
               "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"info": info, "model": "vgg16, 3x224x224, 2622 classes, random weights", "runs": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ray_gpu_probe.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
