"""The trigger: a mask m (H x W, shared over channels) and a pattern p (C x H x W).

Both live in [0,1] pixel space and are parameterised through tanh so the optimiser works
on unconstrained variables. The single blend formula used everywhere in ncscan:

    x' = (1 - m) * x + m * p
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_EPS = 1e-6


def blend(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Stamp triggers on images.

    Args:
        x: images, [B, C, H, W] in [0,1] (or [L, B, C, H, W] for L labels at once).
        mask: [H, W], [1, H, W] or [L, 1, 1, H, W] for L labels.
        pattern: [C, H, W] or [L, 1, C, H, W].

    Returns:
        The stamped images, same shape as the broadcast of the inputs.
    """
    return x * (1.0 - mask) + mask * pattern


def to_raw(v: torch.Tensor) -> torch.Tensor:
    """Inverse of `from_raw`: [0,1] -> unconstrained."""
    return torch.atanh((2.0 * v - 1.0).clamp(-1.0 + _EPS, 1.0 - _EPS))


def from_raw(r: torch.Tensor) -> torch.Tensor:
    """Unconstrained -> (0,1) through tanh, as in the paper's implementation."""
    return (torch.tanh(r) + 1.0) * 0.5


@dataclass(frozen=True)
class Trigger:
    """A reverse-engineered (or true) trigger in pixel space."""

    mask: np.ndarray  # float32 [H, W] in [0,1]
    pattern: np.ndarray  # float32 [C, H, W] in [0,1]

    @property
    def l1(self) -> float:
        """The mask's L1 norm (its area in pixels, fractional)."""
        return float(np.abs(self.mask).sum())

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Stamp on float [N, C, H, W] images in [0,1]."""
        return x * (1.0 - self.mask) + self.mask * self.pattern

    def to_dict(self) -> dict[str, Any]:
        return {"mask_l1": self.l1, "shape": list(self.pattern.shape)}

    def save(self, path: str) -> None:
        """Write mask and pattern as a float32 .npz (atomically, with the user's file mode)."""
        import io

        from .io import atomic_write_bytes

        buf = io.BytesIO()
        np.savez_compressed(buf, mask=self.mask.astype(np.float32), pattern=self.pattern.astype(np.float32))
        atomic_write_bytes(path if str(path).endswith(".npz") else f"{path}.npz", buf.getvalue())

    @staticmethod
    def load(path: str) -> Trigger:
        with np.load(path, allow_pickle=False) as z:
            return Trigger(mask=z["mask"].astype(np.float32), pattern=z["pattern"].astype(np.float32))
