"""Input filter (Neural Cleanse, section 6.1).

The neuron activation profile of an input is the mean activation of the top 1% (at least
one) neurons of the chosen layer ranked by how much more they fire on reversed-trigger
images than on clean ones. An input is flagged when its profile exceeds a threshold set on
clean images so that, with 90% confidence, at most `fpr` (default 5%) of new clean inputs
are flagged (a binomial bound on the order statistic, see `calibrate`).

The filter is exported as a WRAPPER of the original graph: every original node and output
is kept, and two outputs are added, computed inside the graph from the activation tensor:

    ncscan_score = ReduceMean((Gather(activation, neurons, axis=1) - center) / scale)  float [N]
    ncscan_flag  = Greater(ncscan_score, threshold)                   bool  [N]

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
class FilterProfile:
    """score = mean over the chosen neurons of (activation - center) / scale.

    `center`/`scale` are the neurons' clean mean and standard deviation: standardising puts
    every neuron on the scale of its own clean noise, so one loud but noisy neuron cannot
    drown quiet, reliable ones (measured on the fixtures: false negatives at the same FPR
    fell from 12-15% to <= 5% on mnist_badnets_pattern and mnist_trojan). None = raw mean
    (the paper's profile).
    """

    neurons: list[int]
    threshold: float
    rank_dims: int  # rank of the activation tensor in the graph (2 or 4)
    center: list[float] | None = None
    scale: list[float] | None = None

    def score(self, acts: torch.Tensor) -> torch.Tensor:
        """Scores from per-neuron activations [N, width]."""
        a = acts[:, self.neurons]
        if self.center is not None and self.scale is not None:
            a = (a - torch.tensor(self.center, dtype=a.dtype)) / torch.tensor(self.scale, dtype=a.dtype)
        return a.mean(1)


def standardise(a_clean: torch.Tensor, a_trig: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def choose_neurons(gap: torch.Tensor, top_fraction: float = 0.01, min_neurons: int = MIN_NEURONS) -> list[int]:
    """The top `top_fraction` of neurons by gap, at least `min_neurons` (capped at the width).

    The paper's 1% is a single neuron in a 64-wide layer; on the MNIST BadNets fixture that
    one neuron misses 58% of truly triggered inputs at 5% FPR, while 8 neurons miss none.
    """
    k = min(len(gap), max(1, min_neurons, math.ceil(top_fraction * len(gap))))
    return torch.argsort(gap, descending=True)[:k].tolist()


CONFIDENCE = 0.9


def calibrate(scores_clean: np.ndarray, fpr: float, confidence: float = CONFIDENCE) -> tuple[float, bool]:
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


def rates(scores_clean: np.ndarray, scores_trig: np.ndarray, threshold: float) -> tuple[float, float]:
    fpr = float(np.mean(scores_clean > threshold)) if len(scores_clean) else float("nan")
    fnr = float(np.mean(scores_trig <= threshold)) if len(scores_trig) else float("nan")
    return fpr, fnr


def _opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


BRANCH = "ncscan_orig/"


def add_original_branch(proto: onnx.ModelProto, original: onnx.ModelProto, tensor: str) -> tuple[onnx.ModelProto, str]:
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
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
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
    taken = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | {i.name for i in g.input}
    if SCORE in taken or FLAG in taken:
        raise ValueError("the model already has ncscan filter outputs")
    p = "ncscan_filter/"
    idx = numpy_helper.from_array(np.asarray(profile.neurons, dtype=np.int64), p + "neurons")
    thr = numpy_helper.from_array(np.asarray(profile.threshold, dtype=np.float32), p + "threshold")
    g.initializer.extend([idx, thr])
    axes = list(range(1, profile.rank_dims))
    nodes = [
        helper.make_node("Cast", [activation], [p + "act"], name=p + "Cast", to=TensorProto.FLOAT),
        helper.make_node("Gather", [p + "act", p + "neurons"], [p + "picked"], name=p + "Gather", axis=1),
    ]
    picked = p + "picked"
    if profile.center is not None and profile.scale is not None:
        # [1, k] for a [N, width] activation, [1, k, 1, 1] for a feature map (the profile's
        # per-neuron values are spatial means, and standardising commutes with the mean).
        shape = [1, len(profile.neurons)] + [1] * (profile.rank_dims - 2)
        g.initializer.extend([
            numpy_helper.from_array(np.asarray(profile.center, dtype=np.float32).reshape(shape), p + "center"),
            numpy_helper.from_array(np.asarray(profile.scale, dtype=np.float32).reshape(shape), p + "scale"),
        ])
        nodes += [
            helper.make_node("Sub", [picked, p + "center"], [p + "centered"], name=p + "Sub"),
            helper.make_node("Div", [p + "centered", p + "scale"], [p + "standardised"], name=p + "Div"),
        ]
        picked = p + "standardised"
    if _opset(m) >= 18:
        g.initializer.append(numpy_helper.from_array(np.asarray(axes, dtype=np.int64), p + "axes"))
        nodes.append(helper.make_node("ReduceMean", [picked, p + "axes"], [SCORE], name=p + "ReduceMean", keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceMean", [picked], [SCORE], name=p + "ReduceMean", axes=axes, keepdims=0))
    nodes.append(helper.make_node("Greater", [SCORE, p + "threshold"], [FLAG], name=p + "Greater"))
    g.node.extend(nodes)
    init_names = {t.name for t in g.initializer}
    data_in = [i for i in g.input if i.name not in init_names]
    batch = data_in[0].type.tensor_type.shape.dim[0] if data_in and data_in[0].type.tensor_type.shape.dim else None
    # The same batch axis as the model's input: its symbolic name, or its fixed size.
    dim: list[object] = ["N"]
    if batch is not None and batch.HasField("dim_value") and batch.dim_value > 0:
        dim = [int(batch.dim_value)]
    elif batch is not None and batch.HasField("dim_param") and batch.dim_param:
        dim = [batch.dim_param]
    g.output.extend([
        helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, dim),
        helper.make_tensor_value_info(FLAG, TensorProto.BOOL, dim),
    ])
    return m
