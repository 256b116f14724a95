"""Resemblance: does a label's reversed trigger make images look like that class's own images
inside the network, or like something new?

A class whose trigger is naturally small (Fashion-MNIST "Bag", a silhouette class) is reached by
adding what the class itself looks like: stamped images move, in the penultimate layer, the way
the class's clean images differ from the rest, and their nearest clean neighbours are of the
class. A backdoor trigger is a shortcut the network learned beside the class: stamped images go
to the label along a direction of their own. Per label t with a working trigger:

    cos_t  cosine between the stamped images' mean shift (stamped minus clean, over images not
           of class t) and the class offset (clean class-t mean minus the mean of the rest)
    nn_t   share of the flipped stamped images whose nearest clean image (cosine similarity of
           activations) is of class t
    likeness_t = cos_t * nn_t / median over labels (cos * nn)

so an ordinary label sits near 1 whatever the architecture. Measured on the TUNING split of
bench/evalset (bench/verdict.md; every label of 23 models): backdoor targets 0.08-1.02 (the two
with spread-out masks 0.31 and 0.39), labels at least 1.5x smaller than the median that are not
targets 0.43-1.43. `ncscan.decide` uses it only to take away the benefit of the doubt shape
gives (see there). Forward passes only: one over the clean images, two per label.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .errors import ModelError
from .mitigate.layers import activations, find_layer
from .trigger import Trigger


def _raw(a_clean: torch.Tensor, a_st: torch.Tensor, flipped: torch.Tensor, cls: torch.Tensor, t: int) -> float:
    """cos * nn for label t (NaN when class t or the other classes have no clean image)."""
    mine = cls == t
    if mine.sum() < 1 or (~mine).sum() < 1 or not flipped.any():
        return float("nan")
    offset = a_clean[mine].mean(0) - a_clean[~mine].mean(0)
    shift = a_st.mean(0) - a_clean[~mine].mean(0)
    cos = float(shift @ offset / (shift.norm() * offset.norm() + 1e-12))
    cn = torch.nn.functional.normalize(a_clean, dim=1)
    nearest = (torch.nn.functional.normalize(a_st[flipped], dim=1) @ cn.T).argmax(1)
    nn = float((cls[nearest] == t).double().mean())
    return cos * nn


@torch.no_grad()
def likeness(
    prep: object, triggers: Mapping[int, Trigger | None], scores: np.ndarray | None = None
) -> dict[int, float] | None:
    """Per label, its trigger's likeness (see the module docstring); NaN where a label has no
    working trigger or no clean image. None when the model has no linear last layer to read.

    Args:
        prep: a `ncscan.scanner.Prepared` (pixel model, converted graph, clean images, labels).
        triggers: label -> its reported trigger (None: no working trigger).
        scores: the model's scores on the clean images (computed when not given); used for the
            class of each clean image when the data has no labels.
    """
    from .scanner import _scores

    pm, x = prep.pixel_model, prep.x  # type: ignore[attr-defined]
    try:
        om = prep.onnx  # type: ignore[attr-defined]
        layer = find_layer(om.proto, pm.net, output=om.output_name)
    except ModelError:
        return None
    if prep.y is not None:  # type: ignore[attr-defined]
        cls = prep.y.long()  # type: ignore[attr-defined]
    else:
        sc = scores if scores is not None else _scores(pm, x, prep.device)  # type: ignore[attr-defined]
        cls = torch.from_numpy(sc.argmax(1))
    a_clean = activations(pm, pm.net, layer, x).double()
    raw: dict[int, float] = {}
    for t, trig in triggers.items():
        keep = cls != t
        if trig is None or not keep.any():
            raw[t] = float("nan")
            continue
        m = torch.from_numpy(trig.mask)[None, None]
        stamped = x[keep] * (1 - m) + m * torch.from_numpy(trig.pattern)[None]
        a_st = activations(pm, pm.net, layer, stamped).double()
        flipped = torch.from_numpy(_scores(pm, stamped, prep.device).argmax(1) == t)  # type: ignore[attr-defined]
        raw[t] = _raw(a_clean, a_st, flipped, cls, t)
    return relative(raw)


def relative(raw: Mapping[int, float]) -> dict[int, float]:
    """Each label's raw resemblance over the median of the labels' (positive) raw values."""
    v = np.array([r for r in raw.values() if np.isfinite(r) and r > 0])
    med = float(np.median(v)) if len(v) else float("nan")
    return {t: (r / med if np.isfinite(r) and np.isfinite(med) and med > 0 else float("nan")) for t, r in raw.items()}
