"""How to read a model's input and the clean images: the user's choices, in one object.

`InputOptions` travels from the CLI (or the Python caller) through `scanner.scan`,
`scanner.prepare`, `patch.patch` and `many.scan_many` unchanged. A field left None means
"from the model's metadata, else the default" (resolved in `ncscan.preprocess` and
`ncscan.data`); nothing here is resolved or validated beyond its type. Torch-free, so the
CLI builds it before anything heavy is imported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

MAX_IMAGES = 2000  # the default cap on clean images read


@dataclass(frozen=True)
class InputOptions:
    """The preprocessing and data-reading choices of one scan or patch.

    Attributes:
        pixel_range: (lo, hi) the model expects for black and white, e.g. (0, 255).
        mean, std: per-channel normalisation applied after scaling to pixel_range.
        channel_order: "RGB" or "BGR".
        layout: "NCHW" or "NHWC".
        labels_file: maps class-folder names to class indices.
        max_images: use at most this many clean images.
        output_name: the graph output holding the class scores.
        resize: how images of another size are fitted ("squash" | "shorter-crop").
    """

    pixel_range: Sequence[float] | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    channel_order: str | None = None
    layout: str | None = None
    labels_file: str | os.PathLike[str] | None = None
    max_images: int | None = MAX_IMAGES
    output_name: str | None = None
    resize: str | None = None

    def overridden(self, **changes: Any) -> InputOptions:
        """A copy where every change that is not None replaces the field (None keeps it)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown input option(s): {', '.join(unknown)}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def input_options(
    inputs: InputOptions | None = None, *, max_images: int | None = MAX_IMAGES, **changes: Any
) -> InputOptions:
    """How `scan` and `patch` fold their individual keyword arguments into one object:
    `inputs` (default: all defaults) with each keyword argument that is not None on top, and
    `max_images` when it differs from its default (None there means "no cap")."""
    out = (inputs or InputOptions()).overridden(**changes)
    return out if max_images == MAX_IMAGES else replace(out, max_images=max_images)
