"""Serve a filtered model: onnxruntime + the preprocessing recorded in its metadata.

    from ncscan.serve import FilteredModel
    fm = FilteredModel("filtered.onnx")
    pred = fm.predict(images)          # uint8 [N,H,W,C] / [H,W,C], or float [0,1] [N,C,H,W]
    pred.labels, pred.flags, pred.scores

`ncscan patch --filter` writes the preprocessing it used into the model's metadata
(`ncscan.pixel_range`, `ncscan.mean`, `ncscan.std`, `ncscan.layout`,
`ncscan.channel_order`), so the images given here are plain pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DataError, ModelError
from .mitigate.filter import FLAG, SCORE
from .preprocess import Preprocess, preprocess_from_metadata


@dataclass(frozen=True)
class Prediction:
    labels: np.ndarray  # int [N]
    outputs: np.ndarray  # the model's first output [N, classes]
    flags: np.ndarray | None  # bool [N]: the input looks triggered (None: no filter outputs)
    scores: np.ndarray | None  # float [N]


class FilteredModel:
    """An onnxruntime session over a (filtered) ncscan-patched model."""

    def __init__(self, path: str | os.PathLike[str], providers: list[str] | None = None) -> None:
        import onnx
        import onnxruntime as ort

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot read {path}: {type(e).__name__}") from e
        meta = {kv.key: kv.value for kv in proto.metadata_props}
        fields = preprocess_from_metadata(meta)
        self.preprocess = Preprocess(**fields)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers or ["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        shape = self.input.shape
        self.static_batch_one = isinstance(shape[0], int) and shape[0] == 1
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.has_filter = SCORE in self.output_names and FLAG in self.output_names
        self.metadata = meta
        dims = list(shape)
        ax = -1 if self.preprocess.layout == "NHWC" else 1
        self.channels: int | None = dims[ax] if len(dims) == 4 and isinstance(dims[ax], int) else None

    def to_model_input(self, images: Any) -> np.ndarray:
        """uint8 HWC / NHWC (NHW for a 1-channel model), or float [0,1] NCHW -> the model's input tensor."""
        x = np.asarray(images)
        if x.dtype == np.uint8:
            if x.ndim == 2:
                x = x[None, :, :, None]
            elif x.ndim == 3:
                # HxWxC (one image), or NxHxW (a batch of greyscale images for a 1-channel
                # model): a last axis that is not a channel count the model takes is N,H,W.
                c = self.channels
                x = x[:, :, :, None] if c == 1 and x.shape[-1] not in (1, 3, 4) else x[None]
            if x.ndim != 4:
                raise DataError(f"uint8 images must be HxWxC or NxHxWxC, got shape {x.shape}")
            x = x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        else:
            x = x.astype(np.float32)
            if x.ndim == 3:
                x = x[None]
            if x.ndim != 4:
                raise DataError(f"float images must be NxCxHxW in [0,1], got shape {x.shape}")
        pp = self.preprocess
        c = x.shape[1]
        lo, hi = pp.pixel_range
        mean = np.asarray(pp.mean or (0.0,), np.float32)
        std = np.asarray(pp.std or (1.0,), np.float32)
        mean = np.broadcast_to(mean, (c,)).reshape(1, c, 1, 1) if mean.size in (1, c) else mean
        std = np.broadcast_to(std, (c,)).reshape(1, c, 1, 1) if std.size in (1, c) else std
        if pp.channel_order == "BGR":
            x = x[:, ::-1]
        x = (lo + x * (hi - lo) - mean) / std
        if pp.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x, dtype=np.float32)

    def predict(self, images: Any, batch: int = 256) -> Prediction:
        x = self.to_model_input(images)
        names = [self.output_names[0]] + ([SCORE, FLAG] if self.has_filter else [])
        bs = 1 if self.static_batch_one else batch
        acc: list[list[np.ndarray]] = [[] for _ in names]
        for i in range(0, len(x), bs):
            for j, o in enumerate(self.session.run(names, {self.input.name: x[i : i + bs]})):
                acc[j].append(np.asarray(o))
        outs = [np.concatenate(a, 0) for a in acc]
        logits = outs[0].reshape(len(x), -1)
        return Prediction(
            labels=logits.argmax(1),
            outputs=logits,
            flags=outs[2].astype(bool).reshape(-1) if self.has_filter else None,
            scores=outs[1].astype(np.float32).reshape(-1) if self.has_filter else None,
        )
