"""Scaling study: scan time and image passes vs number of classes, with and without
pre-screening, on a real backbone with a synthetic wide head.

The backbone and the first 10 head rows come from the infected fixture
mnist_badnets_square (target 7); the extra classes are random rows of the same norm with a
lower bias, so clean digits still go to their real class. The question is whether label 7
stays flagged (and nothing else) as the head widens, and what each stage costs.

    python bench/scaling.py --classes 10,30,100 --out bench
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def wide_model(k: int, path: Path, seed: int = 0, bias_offset: float = 2.0) -> None:
    from ncscan.model import convert, load_onnx

    om = load_onnx(ROOT / "fixtures/models/mnist_badnets_square.onnx")
    net = convert(om)
    last_name, last = [(n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    w, b = last.weight.detach(), last.bias.detach()
    g = torch.Generator().manual_seed(seed)
    extra = k - w.shape[0]
    if extra > 0:
        rows = torch.randn((extra, w.shape[1]), generator=g)
        rows = rows / rows.norm(dim=1, keepdim=True) * w.norm(dim=1).mean()
        w = torch.cat([w, rows])
        b = torch.cat([b, torch.full((extra,), float(b.min()) - bias_offset)])
    new = torch.nn.Linear(w.shape[1], k)
    with torch.no_grad():
        new.weight.copy_(w)
        new.bias.copy_(b)
    setattr(net, last_name, new) if "." not in last_name else None
    net._modules[last_name] = new  # GraphModule submodule names may contain '/'
    for p in net.parameters():
        p.requires_grad_(False)
    torch.onnx.export(net, torch.zeros(1, 1, 28, 28), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", default="10,30,100")
    ap.add_argument("--modes", default="off,on", help="pre-screening modes to run")
    ap.add_argument("--skip", default="", help="k:mode pairs to skip, e.g. 1000:off")
    ap.add_argument("--out", default=str(ROOT / "bench"))
    args = ap.parse_args()
    from ncscan.scanner import scan

    skip = set(args.skip.split(",")) if args.skip else set()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as td:
        for k in [int(v) for v in args.classes.split(",")]:
            p = Path(td) / f"wide{k}.onnx"
            wide_model(k, p)
            for mode in args.modes.split(","):
                if f"{k}:{mode}" in skip:
                    continue
                t0 = time.perf_counter()
                r = scan(str(p), str(ROOT / "fixtures/data/mnist/scan"), device="cpu", seed=0, prescreen=mode)
                row = {
                    "classes": k, "prescreen": mode, "wall_s": time.perf_counter() - t0,
                    "passes": r.passes, "flagged": r.flagged, "verdict": r.verdict,
                    "label7_index": r.by_label[7].anomaly_index,
                    "fully_optimised": sum(1 for x in r.labels if not x.screened_out),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    (out / "scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| classes | pre-screen | wall s | image passes | passes / class | fully optimised labels | flagged | label 7 index |",
             "| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        lines.append(f"| {r['classes']} | {r['prescreen']} | {r['wall_s']:.1f} | {r['passes']:,} | {r['passes'] // r['classes']:,} | "
                     f"{r['fully_optimised']} | {r['flagged']} | {r['label7_index']:.2f} |")
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
