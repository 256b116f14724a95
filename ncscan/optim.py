"""Adam for many labels at once: each row of a parameter tensor (one label's mask or
pattern) has its own moments and its own step count, and only the rows still being
optimised take a step. torch.optim.Adam steps a whole tensor with one step count, so it
cannot freeze a finished label's row without corrupting its bias correction."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class RowAdam:
    """Adam (Kingma & Ba) applied row-wise to tensors shaped [L, ...].

    The update is Adam's: m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2;
    p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps), with t the row's own
    step count. It matches torch.optim.Adam to float rounding (torch folds the bias
    corrections into the step size and the denominator; tests/test_units.py measures it).
    """

    def __init__(self, params: Sequence[torch.Tensor], *, lr: float, betas: tuple[float, float], eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lr = lr
        self.b1, self.b2 = betas
        self.eps = eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = torch.zeros(self.params[0].shape[0], device=self.params[0].device)

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], rows: torch.Tensor) -> None:
        """One step for `rows` (indices into dim 0) with full-size gradients `grads`."""
        self.t[rows] += 1
        tt = self.t[rows]
        bc1 = 1 - self.b1**tt
        bc2 = 1 - self.b2**tt
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            shp = (len(rows),) + (1,) * (p.dim() - 1)
            ga = g[rows]
            mm = m[rows].mul_(self.b1).add_(ga, alpha=1 - self.b1)
            vv = v[rows].mul_(self.b2).addcmul_(ga, ga, value=1 - self.b2)
            m[rows] = mm
            v[rows] = vv
            upd = (mm / bc1.view(shp)) / ((vv / bc2.view(shp)).sqrt() + self.eps)
            p[rows] = p[rows] - self.lr * upd
