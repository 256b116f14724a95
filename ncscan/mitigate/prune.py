"""Neuron pruning: Neural Cleanse's (section 6.2) and Fine-Pruning (Liu et al. 2018).

Neurons of the chosen layer are ranked (by default by how much more they fire on
reversed-trigger images than on clean ones, the paper's order; or least active on clean
images first, Fine-Pruning's) and switched off in that order (the producing Conv/Gemm's
weights and bias are zeroed; for the penultimate layer, the last layer's incoming weights)
until the reversed trigger's attack success drops below 5% or the clean accuracy has
fallen by the budget (then the last step is undone). By default the layer is the last
convolution's channels and a short fine-tune on the clean images follows, with the pruned
channels held at zero (`ncscan.patch.prune_stage`), as Fine-Pruning does.

Measured on the tuning split (13 infected models, bench/prune_results_tuning.md): the
defaults remove the backdoor of the one larger network (a third-party MNIST CNN with 128
channels in its last conv: TRUE-trigger attack success 99.0% -> 4.4% at 0.15 accuracy points,
guard passed); on the 12 small CNNs (24-64 channels) no variant (either layer, either order,
budgets 5-30 points, with or without the fine-tune) brings it under 5%: the fine-tune keeps
the accuracy (median drop 0.2 points), the backdoor stays (median 97.6%). ncscan reports that
(warning, guard refusal) instead of hiding it; unlearning is the mitigation that works there.
Held out (13 other models, bench/prune_results_heldout.md): the same picture.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from .layers import Layer, Link, named_tensors, zero_slices


@dataclass(frozen=True)
class PruneConfig:
    """Fine-Pruning's settings (defaults chosen on the tuning split: bench/prune_results_tuning.md).

    Attributes:
        where: "last_conv" (the last convolution's channels, Fine-Pruning's choice; the
            penultimate layer when the model has none) or "penultimate" (the paper's layer).
        rank: the order channels are switched off in: "gap" (most excited by the reversed
            triggers relative to clean images first, the paper's order) or "dormant" (least
            active on clean images first, Fine-Pruning's order).
        budget: clean-accuracy points (on the patching images) pruning may cost before it
            stops; the fine-tune then wins accuracy back, and the guard judges the result.
        fine_tune_steps: Adam steps of fine-tuning on the clean images after pruning, the
            pruned channels held at zero (0: prune only, as in the paper).
        lr: the fine-tune's learning rate.
        mix: weight of the fine-tune's distillation on mixup images (see UnlearnConfig.mix;
            the teacher is the model before pruning, backdoor included).
    """

    where: str = "last_conv"
    rank: str = "gap"
    budget: float = 5.0
    fine_tune_steps: int = 150
    lr: float = 5e-4
    mix: float = 1.0

    def __post_init__(self) -> None:
        if self.where not in ("last_conv", "penultimate"):
            raise ConfigError(f"unknown pruning layer {self.where!r}: use 'last_conv' or 'penultimate'")
        if self.rank not in ("gap", "dormant"):
            raise ConfigError(f"unknown pruning rank {self.rank!r}: use 'gap' or 'dormant'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ranking(gap: torch.Tensor, clean_mean: torch.Tensor, rank: str) -> torch.Tensor:
    """A score per neuron, highest pruned first (see PruneConfig.rank: "gap" or "dormant")."""
    return gap if rank == "gap" else -clean_mean


@dataclass
class PruneOutcome:
    count: int
    total: int
    order: list[int]
    success: bool
    asr: float
    accuracy: float
    stopped_by: str  # "attack_success" | "accuracy_guard" | "exhausted"
    slices: list[tuple[str, int, list[int]]] = field(default_factory=list)  # (tensor, axis, pruned): held at zero
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (pruned, accuracy, asr)


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
    zero_slices(named_tensors(net), [(name, axis, idx) for name, axis in targets])


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
    curve = [(0, acc, asr)]
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
        curve.append((len(pruned), acc, asr))
    if asr < target_asr:
        stopped = "attack_success"
    return PruneOutcome(
        count=len(pruned), total=total, order=pruned, success=asr < target_asr, asr=asr,
        accuracy=acc, stopped_by=stopped, slices=[(n, axis, list(pruned)) for n, axis in targets], curve=curve,
    )
