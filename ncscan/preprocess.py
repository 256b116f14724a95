"""Pixel-space preprocessing.

Triggers are optimised in [0, 1] pixel space, the space a real attacker stamps a patch
into. `Preprocess` describes how a [0,1] image becomes the model's input tensor:

    model_input = (lo + x * (hi - lo) - mean) / std      (per channel, after channel reordering)

and `PixelModel` puts that transform, the layout change and the output normalisation
(log-probabilities) in front of / behind the converted network, so every optimiser in
ncscan only ever sees images in [0, 1] NCHW RGB and log-probabilities out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .meta import (  # noqa: F401  (re-exported: ncscan.preprocess.META_* stay importable)
    META_CHANNEL_ORDER,
    META_CLASS_NAMES,
    META_LAYOUT,
    META_MEAN,
    META_ONNX_PIXEL_FORMAT,
    META_ONNX_PIXEL_RANGE,
    META_PIXEL_RANGE,
    META_RESIZE,
    META_STD,
)

LAYOUTS = ("NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR")

_NOMINAL_RANGES = {
    "NominalRange_0_255": (0.0, 255.0),
    "Normalized_0_1": (0.0, 1.0),
    "Normalized_1_1": (-1.0, 1.0),
    "NominalRange_16_235": (16.0, 235.0),
}


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    """Parse "a,b,c" or "[a, b, c]" into floats.

    Raises:
        ConfigError: the text is not a list of finite numbers.
    """
    s = text.strip()
    try:
        if s.startswith("["):
            vals = json.loads(s)
            if not isinstance(vals, list):
                raise ValueError
        else:
            vals = [v for v in s.replace(" ", ",").split(",") if v != ""]
        out = tuple(float(v) for v in vals)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ConfigError(
            f"{what} must be comma-separated numbers (e.g. 0.5,0.5,0.5), got {text!r}"
        ) from None
    if not out or not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{what} must be finite numbers, got {text!r}")
    return out


@dataclass(frozen=True)
class Preprocess:
    """How a [0,1] RGB image becomes the model's input.

    Attributes:
        pixel_range: (lo, hi) the model expects for black and white, e.g. (0, 255).
        mean: per-channel mean subtracted after scaling (None: no normalisation).
        std: per-channel std divided after subtracting mean (None: 1).
        channel_order: "RGB" or "BGR" (the order the model's channels are in).
        layout: "NCHW" or "NHWC", the model's input layout.
    """

    pixel_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channel_order: str = "RGB"
    layout: str = "NCHW"

    def validate(self, channels: int | None = None) -> Preprocess:
        """Check consistency; returns self.

        Raises:
            ConfigError: contradictory or malformed settings.
        """
        lo, hi = self.pixel_range
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
            raise ConfigError(
                f"--pixel-range must be lo,hi with lo < hi (e.g. 0,255), got {lo:g},{hi:g}"
            )
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be NCHW or NHWC, got {self.layout!r}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise ConfigError(f"channel order must be RGB or BGR, got {self.channel_order!r}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigError(f"--std values must be positive, got {list(self.std)}")
        if channels is not None:
            for name, vals in (("--mean", self.mean), ("--std", self.std)):
                if vals is not None and len(vals) not in (1, channels):
                    raise ConfigError(
                        f"{name} has {len(vals)} values but the model takes {channels} "
                        f"channel(s); pass " + ("1 value" if channels == 1 else f"1 or {channels} values")
                    )
            if self.channel_order == "BGR" and channels != 3:
                raise ConfigError(
                    f"--bgr only applies to 3-channel models; this model takes {channels}"
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pixel_range"] = list(self.pixel_range)
        d["mean"] = list(self.mean) if self.mean is not None else None
        d["std"] = list(self.std) if self.std is not None else None
        return d

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Preprocess:
        pr = d.get("pixel_range", (0.0, 1.0))
        return Preprocess(
            pixel_range=(float(pr[0]), float(pr[1])),
            mean=tuple(float(v) for v in d["mean"]) if d.get("mean") is not None else None,
            std=tuple(float(v) for v in d["std"]) if d.get("std") is not None else None,
            channel_order=str(d.get("channel_order", "RGB")),
            layout=str(d.get("layout", "NCHW")),
        )


def preprocess_from_metadata(meta: Mapping[str, str]) -> dict[str, Any]:
    """Read preprocessing fields from ONNX metadata_props; only the keys that are present.

    Raises:
        ConfigError: a metadata value is malformed (names the key).
    """
    out: dict[str, Any] = {}
    if META_ONNX_PIXEL_RANGE in meta:
        rng = _NOMINAL_RANGES.get(meta[META_ONNX_PIXEL_RANGE].strip())
        if rng is not None:
            out["pixel_range"] = rng
    if META_ONNX_PIXEL_FORMAT in meta:
        fmt = meta[META_ONNX_PIXEL_FORMAT].strip().lower()
        if fmt.startswith("bgr"):
            out["channel_order"] = "BGR"
        elif fmt.startswith("rgb"):
            out["channel_order"] = "RGB"
    if META_PIXEL_RANGE in meta:
        vals = parse_floats(meta[META_PIXEL_RANGE], f"model metadata {META_PIXEL_RANGE}")
        if len(vals) != 2:
            raise ConfigError(
                f"model metadata {META_PIXEL_RANGE} must be lo,hi, got {meta[META_PIXEL_RANGE]!r}"
                "; override it with --pixel-range"
            )
        out["pixel_range"] = (vals[0], vals[1])
    if META_MEAN in meta:
        out["mean"] = parse_floats(meta[META_MEAN], f"model metadata {META_MEAN}")
    if META_STD in meta:
        out["std"] = parse_floats(meta[META_STD], f"model metadata {META_STD}")
    if META_LAYOUT in meta:
        lay = meta[META_LAYOUT].strip().upper()
        if lay not in LAYOUTS:
            raise ConfigError(
                f"model metadata {META_LAYOUT} must be NCHW or NHWC, got {meta[META_LAYOUT]!r}"
                "; override it with --layout"
            )
        out["layout"] = lay
    if META_CHANNEL_ORDER in meta:
        order = meta[META_CHANNEL_ORDER].strip().upper()
        if order not in CHANNEL_ORDERS:
            raise ConfigError(
                f"model metadata {META_CHANNEL_ORDER} must be RGB or BGR, got "
                f"{meta[META_CHANNEL_ORDER]!r}; override it with --bgr/--rgb"
            )
        out["channel_order"] = order
    return out


def resize_from_metadata(meta: Mapping[str, str]) -> str | None:
    """The resize mode the model's metadata asks for (`ncscan.resize`), or None.

    Raises:
        ConfigError: a value that is not a resize mode (names the key).
    """
    if META_RESIZE not in meta:
        return None
    mode = meta[META_RESIZE].strip().lower()
    if mode not in ("squash", "shorter-crop"):
        raise ConfigError(
            f"model metadata {META_RESIZE} must be squash or shorter-crop, got "
            f"{meta[META_RESIZE]!r}; override it with --resize"
        )
    return mode


def resolve_preprocess(
    metadata: Mapping[str, str],
    detected_layout: str,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Preprocess, dict[str, str]]:
    """Combine defaults < model metadata < explicit overrides.

    Returns:
        The preprocessing and, per field, where its value came from
        ("default", "metadata", "flag", "detected").
    """
    fields: dict[str, Any] = {}
    source: dict[str, str] = {
        "pixel_range": "default",
        "mean": "default",
        "std": "default",
        "channel_order": "default",
        "layout": "detected",
    }
    fields["layout"] = detected_layout
    for k, v in preprocess_from_metadata(metadata).items():
        fields[k] = v
        source[k] = "metadata"
    for k, v in (overrides or {}).items():
        if v is not None:
            fields[k] = v
            source[k] = "flag"
    pp = replace(Preprocess(), **fields)
    return pp, source


class PixelModel(nn.Module):
    """net(preprocess(x)) with x in [0,1], NCHW, RGB; returns logits or log-probabilities.

    Args:
        net: the converted network (takes the model's own layout).
        preprocess: how pixels become model input.
        channels: number of input channels of the model.
        output_is_prob: the network outputs probabilities; return their log so a
            cross-entropy on the output is still the right loss.
        static_batch_one: the model's batch dimension is fixed at 1: larger batches go
            through torch.func.vmap over batch-1 slices, or a per-sample loop when the
            converted ops do not support vmap.
    """

    def __init__(
        self,
        net: nn.Module,
        preprocess: Preprocess,
        channels: int,
        output_is_prob: bool = False,
        static_batch_one: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.preprocess = preprocess
        self.output_is_prob = output_is_prob
        self.static_batch_one = static_batch_one
        self.use_vmap = True
        lo, hi = preprocess.pixel_range
        mean = torch.tensor(preprocess.mean or (0.0,), dtype=torch.float32)
        std = torch.tensor(preprocess.std or (1.0,), dtype=torch.float32)
        if mean.numel() == 1:
            mean = mean.repeat(channels)
        if std.numel() == 1:
            std = std.repeat(channels)
        # Fold everything into one affine map per channel: input = x*scale + shift.
        scale = (hi - lo) / std
        shift = (lo - mean) / std
        self.register_buffer("scale", scale.view(1, channels, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, channels, 1, 1), persistent=False)
        self.bgr = preprocess.channel_order == "BGR"

    def to_model_input(self, x: torch.Tensor) -> torch.Tensor:
        """[0,1] NCHW RGB -> the tensor the ONNX model takes."""
        if self.bgr:
            x = x.flip(1)
        x = x * self.scale + self.shift
        if self.preprocess.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        return x

    def raw(self, inp: torch.Tensor) -> torch.Tensor:
        """Run the network on model-space input (handles a static batch of 1)."""
        if not self.static_batch_one or inp.shape[0] == 1:
            return self.net(inp)
        if self.use_vmap:
            try:
                return torch.func.vmap(lambda s: self.net(s.unsqueeze(0)).squeeze(0))(inp)
            except Exception:  # noqa: BLE001 - some converted ops do not support vmap
                self.use_vmap = False
        return torch.cat([self.net(inp[i : i + 1]) for i in range(inp.shape[0])], 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.raw(self.to_model_input(x))
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = out.reshape(out.shape[0], -1)
        if self.output_is_prob:
            out = torch.log(out.clamp_min(1e-12))
        return out

