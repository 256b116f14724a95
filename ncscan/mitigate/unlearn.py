"""Unlearning (Neural Cleanse, section 6.2): fine-tune on clean data where a fraction of the
images of ALL classes carry a reversed trigger and keep their TRUE label.

Defaults (paper: 20% triggered, 1 epoch): Adam, lr 1e-3, batch 32, at least
`min_steps` optimizer steps per epoch (scan folders are small: one pass over 240
images is only 8 steps). The network stays in eval mode throughout, so BatchNorm running
statistics are frozen and dropout is off; BatchNorm affine parameters are frozen too. Only
tensors with a verified ONNX initializer are trained, so the result can be written back
into the original graph.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..trigger import Trigger
from .layers import Link, named_tensors


@dataclass(frozen=True)
class UnlearnConfig:
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    poison_fraction: float = 0.2
    min_steps: int = 150  # per epoch
    distill: float = 1.0  # weight of matching the original model's outputs on unstamped images
    # A reversed trigger is the SMALLEST patch that works, usually a subset of the real one
    # (the square fixture: 8 px reversed vs 16 px true). Stamping it grown by up to
    # `augment_grow` pixels and shifted by up to `augment_shift` teaches the model to ignore
    # the neighbourhood of the trigger too, not just its minimal core.
    augment_grow: int = 1
    augment_shift: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _augmented(
    mask: torch.Tensor, pattern: torch.Tensor, cfg: UnlearnConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A randomly grown (max-pool dilation) and shifted copy of a trigger."""
    m = mask
    grow = int(torch.randint(cfg.augment_grow + 1, (1,), generator=gen)) if cfg.augment_grow > 0 else 0
    if grow > 0:
        k = 2 * grow + 1
        m = F.max_pool2d(m[None, None], k, stride=1, padding=grow)[0, 0]
    p = pattern
    if cfg.augment_shift > 0:
        dy, dx = (int(v) for v in torch.randint(-cfg.augment_shift, cfg.augment_shift + 1, (2,), generator=gen))
        m = torch.roll(m, (dy, dx), (0, 1))
        p = torch.roll(p, (dy, dx), (1, 2))
    return m, p


def unlearn(
    pm: torch.nn.Module,
    net: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    triggers: list[Trigger],
    trainable: dict[str, Link],
    cfg: UnlearnConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Fine-tune `net` (through the PixelModel `pm`) in place. Returns training stats."""
    dev = torch.device(device)
    tensors = named_tensors(net)
    params = [tensors[k] for k in trainable]
    if not params:
        raise RuntimeError("no trainable tensors")
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    masks = [torch.from_numpy(t.mask).to(dev) for t in triggers]
    pats = [torch.from_numpy(t.pattern).to(dev) for t in triggers]
    n = len(x)
    bs = min(cfg.batch_size, n)
    per_epoch = max(math.ceil(n / bs), cfg.min_steps)
    steps = per_epoch * max(1, cfg.epochs)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    pm.eval()
    ref_logp = None
    if cfg.distill > 0:
        with torch.no_grad():
            ref_logp = torch.cat([F.log_softmax(pm(x[i : i + 256].to(dev)), 1).cpu() for i in range(0, n, 256)], 0)
    losses: list[float] = []
    order = torch.randperm(n, generator=gen)
    pos = 0
    try:
        for _ in range(steps):
            if pos + bs > n:
                order = torch.randperm(n, generator=gen)
                pos = 0
            idx = order[pos : pos + bs]
            pos += bs
            xb = x[idx].to(dev).clone()
            yb = y[idx].to(dev)
            # `poison_fraction` of the batch per trigger (at most half the batch in all), so
            # a second target is not unlearned with half the examples of a single one.
            k = int(round(min(0.5, cfg.poison_fraction * len(triggers)) * len(idx)))
            clean = torch.ones(len(idx), dtype=torch.bool)
            if k > 0:
                sel = torch.randperm(len(idx), generator=gen)[:k]
                clean[sel] = False
                which = torch.randint(len(triggers), (k,), generator=gen)
                for j in range(len(triggers)):
                    s = sel[which == j].to(dev)
                    if len(s):
                        m, p = _augmented(masks[j], pats[j], cfg, gen)
                        xb[s] = xb[s] * (1 - m) + m * p
            out = pm(xb)
            loss = F.cross_entropy(out, yb)
            if ref_logp is not None and bool(clean.any()):
                c = clean.to(dev)
                logp = F.log_softmax(out[c], 1)
                ref = ref_logp[idx][clean].to(dev)
                loss = loss + cfg.distill * F.kl_div(logp, ref, log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return {
        "steps": steps,
        "trained_tensors": len(params),
        "trained_values": int(sum(p.numel() for p in params)),
        "loss_first": float(np.mean(losses[:10])) if losses else None,
        "loss_last": float(np.mean(losses[-10:])) if losses else None,
    }
