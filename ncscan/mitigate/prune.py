"""Neuron pruning (Neural Cleanse, section 6.2).

Neurons of the chosen layer (default: the penultimate, i.e. the input of the last
Gemm/MatMul) are ranked by how much more they fire on reversed-trigger images than on
clean ones; they are switched off in that order (their outgoing weights in the last layer
are zeroed, or the producing layer's weights and bias for `--layer`) until the reversed
trigger's attack success drops below 5% or the clean accuracy falls more than the guard
allows (then the last step is undone). The paper reports that this works on BadNets and
poorly on Trojan models; ncscan reports failure instead of hiding it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .layers import Layer, Link, named_tensors


@dataclass
class PruneOutcome:
    count: int
    total: int
    order: list[int]
    success: bool
    asr: float
    accuracy: float
    stopped_by: str  # "attack_success" | "accuracy_guard" | "exhausted"
    zeroed: list[str]


def _targets(net: torch.nn.Module, layer: Layer, links: dict[str, Link]) -> list[tuple[str, int]]:
    """(tensor name, axis) pairs to zero for one neuron."""
    if layer.prune_module is None:
        raise ConfigError(
            f"cannot prune {layer.description}: no Conv/Gemm layer produces it directly; "
            "choose another --layer (a Conv, Gemm or the Relu right after one)"
        )
    mods = dict(net.named_modules())
    mod = mods[layer.prune_module]
    tensors = named_tensors(net)
    out: list[tuple[str, int]] = []
    if layer.prune_axis == "in":
        if isinstance(mod, torch.nn.Linear):
            out.append((f"{layer.prune_module}.weight", 1))
        else:  # MatMul (x @ W): W is [in, out]
            ws = [k for k, ln in links.items() if ln.node == layer.prune_module and tensors[k].dim() == 2]
            if len(ws) != 1:
                raise ConfigError(f"cannot find the weight matrix of {layer.last_node} to prune")
            out.append((ws[0], 0))
    else:
        out.append((f"{layer.prune_module}.weight", 0))
        if getattr(mod, "bias", None) is not None:
            out.append((f"{layer.prune_module}.bias", 0))
    return out


def zero_neurons(net: torch.nn.Module, targets: list[tuple[str, int]], idx: list[int]) -> None:
    tensors = named_tensors(net)
    with torch.no_grad():
        for name, axis in targets:
            t = tensors[name]
            ii = torch.tensor(idx, dtype=torch.long, device=t.device)
            t.index_fill_(axis, ii, 0.0)


def prune(
    net: torch.nn.Module,
    layer: Layer,
    links: dict[str, Link],
    gap: torch.Tensor,
    evaluate: Callable[[], tuple[float, float]],
    *,
    accuracy_before: float,
    max_accuracy_drop: float,
    target_asr: float = 0.05,
    max_fraction: float = 0.9,
) -> PruneOutcome:
    """Prune neurons in order of `gap` (triggered minus clean mean activation).

    `evaluate()` returns (clean accuracy, max reversed attack success) on the data used to
    decide; accuracies are fractions, `max_accuracy_drop` is in points.
    """
    targets = _targets(net, layer, links)
    order = torch.argsort(gap, descending=True).tolist()
    total = len(order)
    step = max(1, math.ceil(total / 100))
    tensors = named_tensors(net)
    pruned: list[int] = []
    acc, asr = evaluate()
    stopped = "exhausted"
    limit = int(total * max_fraction)
    while asr >= target_asr and len(pruned) < limit:
        nxt = order[len(pruned) : len(pruned) + step]
        saved = {n: tensors[n].detach().clone() for n, _ in targets}
        zero_neurons(net, targets, nxt)
        acc_new, asr_new = evaluate()
        if (accuracy_before - acc_new) * 100.0 > max_accuracy_drop:
            with torch.no_grad():
                for n, _ in targets:
                    tensors[n].copy_(saved[n])
            stopped = "accuracy_guard"
            break
        pruned.extend(nxt)
        acc, asr = acc_new, asr_new
    if asr < target_asr:
        stopped = "attack_success"
    return PruneOutcome(
        count=len(pruned), total=total, order=pruned, success=asr < target_asr, asr=asr,
        accuracy=acc, stopped_by=stopped, zeroed=[n for n, _ in targets],
    )
