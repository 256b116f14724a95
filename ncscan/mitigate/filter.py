"""Input filter (Neural Cleanse, section 6.1).

Each flagged target gets its own activation profile: the mean standardised activation of
the neurons of the chosen layer that its reversed trigger excites most (the paper's top 1%,
at least 8; the count chosen among 0.5-4x that by measured separation, `fit_part`). An
input is flagged when ANY target's profile fires, i.e. when the largest of the targets'
(normalised) scores exceeds one threshold, set on clean images so that, with 90%
confidence, at most `fpr` (default 5%) of new clean inputs are flagged (a binomial bound on
the order statistic, see `calibrate`).

The filter is exported as a WRAPPER of the original graph: every original node and output
is kept, and two outputs are added, computed inside the graph from the activation tensor:

    score_t      = ReduceMean((Gather(activation, neurons_t, axis=1) - center_t) / scale_t) / norm_t
    ncscan_score = Max(score_t over the targets)                       float [N]
    ncscan_flag  = Greater(ncscan_score, threshold)                    bool  [N]

When the network itself was changed too (unlearning, pruning), the filter profiles the
ORIGINAL network: after unlearning, the reversed trigger no longer moves the patched
network's neurons, so a profile calibrated there misses most triggered inputs. The wrapper
then carries a copy of the original nodes that compute the activation (`add_original_branch`).
The score/flag outputs name their batch axis as the model's input does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

SCORE = "ncscan_score"
FLAG = "ncscan_flag"


@dataclass(frozen=True)
class FilterPart:
    """One flagged target's profile: the mean over its neurons of (activation - center) /
    scale, divided by `norm`.

    `center`/`scale` are the neurons' clean mean and standard deviation: standardising puts
    every neuron on the scale of its own clean noise, so one loud but noisy neuron cannot
    drown quiet, reliable ones (measured on the fixtures: false negatives at the same FPR
    fell from 12-15% to <= 5% on mnist_badnets_pattern and mnist_trojan). `norm` is the
    clean standard deviation of that mean, so every target's score is on one scale and the
    profile's score can be their maximum.
    """

    target: int
    neurons: list[int]
    center: list[float]
    scale: list[float]
    norm: float = 1.0

    def score(self, acts: torch.Tensor) -> torch.Tensor:
        """Scores from per-neuron activations [N, width]."""
        a = acts[:, self.neurons]
        a = (a - torch.tensor(self.center, dtype=a.dtype)) / torch.tensor(self.scale, dtype=a.dtype)
        return a.mean(1) / self.norm


@dataclass(frozen=True)
class FilterProfile:
    """score = the largest of the flagged targets' part scores; flagged when above
    `threshold`. A profile per target: on a model with two backdoors one averaged neuron
    set follows the louder one and lets the other's triggered inputs through (issue #16:
    22% of one target's inputs missed)."""

    parts: list[FilterPart]
    threshold: float
    rank_dims: int  # rank of the activation tensor in the graph (2 or 4)

    @property
    def neurons(self) -> list[int]:
        """Every neuron any part reads, sorted."""
        return sorted({j for p in self.parts for j in p.neurons})

    def part_scores(self, acts: torch.Tensor) -> torch.Tensor:
        """[N, number of parts]."""
        return torch.stack([p.score(acts) for p in self.parts], 1)

    def score(self, acts: torch.Tensor) -> torch.Tensor:
        """Scores from per-neuron activations [N, width]."""
        return self.part_scores(acts).max(1).values


def standardise(
    a_clean: torch.Tensor, a_trig: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(standardised gap per neuron, clean mean, clean scale) from activations [N, width].

    The scale is the clean standard deviation, floored at 1% of the layer's median
    non-zero deviation so that neurons silent on clean images (ideal detectors) get a large
    but finite weight.
    """
    mu = a_clean.mean(0)
    sd = a_clean.std(0) if len(a_clean) > 1 else torch.zeros_like(mu)
    nz = sd[sd > 0]
    floor = float(nz.median()) * 0.01 if len(nz) else 1.0
    sd = sd.clamp_min(max(floor, 1e-12))
    return (a_trig.mean(0) - mu) / sd, mu, sd


MIN_NEURONS = 8


def choose_neurons(
    gap: torch.Tensor, top_fraction: float = 0.01, min_neurons: int = MIN_NEURONS
) -> list[int]:
    """The top `top_fraction` of neurons by gap, at least `min_neurons` (capped at the width).

    The paper's 1% is a single neuron in a 64-wide layer; on the MNIST BadNets fixture that
    one neuron misses 58% of truly triggered inputs at 5% FPR, while 8 neurons miss none.
    """
    k = min(len(gap), max(1, min_neurons, math.ceil(top_fraction * len(gap))))
    return torch.argsort(gap, descending=True)[:k].tolist()


def fit_part(
    a_clean: torch.Tensor,
    a_trig: torch.Tensor,
    target: int,
    *,
    fpr: float,
    top_fraction: float = 0.01,
    min_neurons: int = MIN_NEURONS,
) -> FilterPart:
    """One target's profile from clean and triggered activations [N, width].

    The neuron count is chosen by measured separation among half, 1x, 2x and 4x the
    default count (`choose_neurons`): the one whose score flags the most triggered images
    above the clean (1 - fpr) quantile, ties broken by the larger standardised mean gap
    (d'), then by the smaller count.
    """
    gap, mu, sd = standardise(a_clean, a_trig)
    order = torch.argsort(gap, descending=True)
    width = len(gap)
    base = len(choose_neurons(gap, top_fraction, min_neurons))
    best: tuple[tuple[float, float, int], FilterPart] | None = None
    for k in sorted({max(1, base // 2), base, min(width, 2 * base), min(width, 4 * base)}):
        nz = order[:k].tolist()
        part = FilterPart(
            target=target,
            neurons=nz,
            center=[float(mu[j]) for j in nz],
            scale=[float(sd[j]) for j in nz],
        )
        sc, st = part.score(a_clean), part.score(a_trig)
        q = float(torch.quantile(sc.double(), 1.0 - fpr)) if len(sc) else 0.0
        detect = float((st > q).double().mean()) if len(st) else 0.0
        spread = float(sc.std()) if len(sc) > 1 else 1.0
        dprime = (float(st.mean()) - float(sc.mean())) / max(spread, 1e-12) if len(st) else 0.0
        key = (round(detect, 3), dprime, -k)
        if best is None or key > best[0]:
            best = (
                key,
                FilterPart(
                    target=target,
                    neurons=nz,
                    center=part.center,
                    scale=part.scale,
                    norm=max(spread, 1e-6),
                ),
            )
    assert best is not None
    return best[1]


CONFIDENCE = 0.9


def calibrate(
    scores_clean: np.ndarray, fpr: float, confidence: float = CONFIDENCE
) -> tuple[float, bool]:
    """A threshold whose false-positive rate on NEW clean inputs is at most `fpr` with
    probability `confidence`.

    The plain empirical quantile misses that target about half the time (its FPR on new
    data scatters around `fpr` by sqrt(fpr(1-fpr)/n)). If k of n calibration scores lie
    above the threshold, the chance that the true FPR exceeds `fpr` is P(Binomial(n, fpr)
    <= k); we take the largest k that keeps this below 1 - confidence.

    Returns:
        (threshold, guaranteed): `guaranteed` is False when there are too few scores for the
        bound even at k = 0 (n < log(1 - confidence) / log(1 - fpr), 45 images at 5%/90%); the
        threshold is then the largest clean score.
    """
    s = np.sort(np.asarray(scores_clean, dtype=np.float64))
    n = len(s)
    if n == 0:
        return float("inf"), False
    k = _max_exceedances(n, fpr, 1.0 - confidence)
    if k < 0:
        return float(s[-1]), False
    return float(s[n - 1 - k]), True


def _max_exceedances(n: int, p: float, delta: float) -> int:
    """Largest k with P(Binomial(n, p) <= k) <= delta (-1 if none)."""
    if p <= 0:
        return -1
    if p >= 1:
        return n - 1
    log_pmf = n * math.log1p(-p)  # k = 0
    cdf = math.exp(log_pmf)
    k = -1
    for j in range(n):
        if cdf > delta:
            break
        k = j
        log_pmf += math.log((n - j) / (j + 1)) + math.log(p) - math.log1p(-p)
        cdf += math.exp(log_pmf)
    return min(k, n - 1)


def rates(
    scores_clean: np.ndarray, scores_trig: np.ndarray, threshold: float
) -> tuple[float, float]:
    fpr = float(np.mean(scores_clean > threshold)) if len(scores_clean) else float("nan")
    fnr = float(np.mean(scores_trig <= threshold)) if len(scores_trig) else float("nan")
    return fpr, fnr


def _opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


BRANCH = "ncscan_orig/"


def add_original_branch(
    proto: onnx.ModelProto, original: onnx.ModelProto, tensor: str
) -> tuple[onnx.ModelProto, str]:
    """Copy into `proto` the nodes of `original` that compute `tensor` from the graph input,
    with the original initializers, every name prefixed with BRANCH.

    Returns:
        (a new proto, the name of the copied tensor).

    Raises:
        ValueError: the activation depends on something other than the image input and
            initializers, or on a node with subgraphs.
    """
    og = original.graph
    inits = {t.name: t for t in og.initializer}
    inputs = {i.name for i in og.input} - set(inits)
    producer = {o: n for n in og.node for o in n.output if o}
    picked: set[int] = set()
    used: set[str] = set()
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if not t or t in seen:
            continue
        seen.add(t)
        if t in inits:
            used.add(t)
        elif t not in inputs:
            n = producer.get(t)
            if n is None:
                raise ValueError(f"tensor {t!r} has no producer in the original graph")
            if any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in n.attribute
            ):
                raise ValueError(f"node {n.name or n.op_type} has subgraphs")
            picked.add(id(n))
            stack.extend(n.input)

    def ren(name: str) -> str:
        return name if not name or name in inputs else BRANCH + name

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for n in og.node:  # original (topological) order
        if id(n) in picked:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = BRANCH + (n.name or n.output[0])
            c.ClearField("input")
            c.ClearField("output")
            c.input.extend(ren(i) for i in n.input)
            c.output.extend(ren(o) for o in n.output)
            m.graph.node.append(c)
    for name in sorted(used):
        t = onnx.TensorProto()
        t.CopyFrom(inits[name])
        t.name = BRANCH + name
        m.graph.initializer.append(t)
    return m, ren(tensor)


def add_filter(proto: onnx.ModelProto, activation: str, profile: FilterProfile) -> onnx.ModelProto:
    """Append the score/flag outputs to a copy of `proto` (nothing else changes)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    taken = (
        {o for n in g.node for o in n.output}
        | {t.name for t in g.initializer}
        | {i.name for i in g.input}
    )
    if SCORE in taken or FLAG in taken:
        raise ValueError("the model already has ncscan filter outputs")
    p = "ncscan_filter/"
    if not profile.parts:
        raise ValueError("a filter profile needs at least one part")
    thr = numpy_helper.from_array(np.asarray(profile.threshold, dtype=np.float32), p + "threshold")
    g.initializer.append(thr)
    axes = list(range(1, profile.rank_dims))
    if _opset(m) >= 18:
        g.initializer.append(numpy_helper.from_array(np.asarray(axes, dtype=np.int64), p + "axes"))
    nodes = [
        helper.make_node("Cast", [activation], [p + "act"], name=p + "Cast", to=TensorProto.FLOAT)
    ]
    part_scores: list[str] = []
    for i, part in enumerate(profile.parts):
        q = f"{p}t{i}/"
        # [1, k] for a [N, width] activation, [1, k, 1, 1] for a feature map (the profile's
        # per-neuron values are spatial means, and standardising commutes with the mean).
        shape = [1, len(part.neurons)] + [1] * (profile.rank_dims - 2)
        g.initializer.extend(
            [
                numpy_helper.from_array(np.asarray(part.neurons, dtype=np.int64), q + "neurons"),
                numpy_helper.from_array(
                    np.asarray(part.center, dtype=np.float32).reshape(shape), q + "center"
                ),
                numpy_helper.from_array(
                    np.asarray(part.scale, dtype=np.float32).reshape(shape), q + "scale"
                ),
                numpy_helper.from_array(np.asarray(part.norm, dtype=np.float32), q + "norm"),
            ]
        )
        nodes += [
            helper.make_node(
                "Gather", [p + "act", q + "neurons"], [q + "picked"], name=q + "Gather", axis=1
            ),
            helper.make_node("Sub", [q + "picked", q + "center"], [q + "centered"], name=q + "Sub"),
            helper.make_node(
                "Div", [q + "centered", q + "scale"], [q + "standardised"], name=q + "Div"
            ),
        ]
        if _opset(m) >= 18:
            nodes.append(
                helper.make_node(
                    "ReduceMean",
                    [q + "standardised", p + "axes"],
                    [q + "mean"],
                    name=q + "ReduceMean",
                    keepdims=0,
                )
            )
        else:
            nodes.append(
                helper.make_node(
                    "ReduceMean",
                    [q + "standardised"],
                    [q + "mean"],
                    name=q + "ReduceMean",
                    axes=axes,
                    keepdims=0,
                )
            )
        out = SCORE if len(profile.parts) == 1 else q + "score"
        nodes.append(helper.make_node("Div", [q + "mean", q + "norm"], [out], name=q + "Norm"))
        part_scores.append(out)
    if len(part_scores) > 1:  # flagged when any target's profile fires
        nodes.append(helper.make_node("Max", part_scores, [SCORE], name=p + "Max"))
    nodes.append(helper.make_node("Greater", [SCORE, p + "threshold"], [FLAG], name=p + "Greater"))
    g.node.extend(nodes)
    init_names = {t.name for t in g.initializer}
    data_in = [i for i in g.input if i.name not in init_names]
    batch = (
        data_in[0].type.tensor_type.shape.dim[0]
        if data_in and data_in[0].type.tensor_type.shape.dim
        else None
    )
    # The same batch axis as the model's input: its symbolic name, or its fixed size.
    dim: list[object] = ["N"]
    if batch is not None and batch.HasField("dim_value") and batch.dim_value > 0:
        dim = [int(batch.dim_value)]
    elif batch is not None and batch.HasField("dim_param") and batch.dim_param:
        dim = [batch.dim_param]
    g.output.extend(
        [
            helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, dim),
            helper.make_tensor_value_info(FLAG, TensorProto.BOOL, dim),
        ]
    )
    return m
