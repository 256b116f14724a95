"""`ncscan patch`: mitigate a found backdoor and export the result as ONNX.

triggers (from a scan report, or a scan run here) ->
split the clean images (80% to patch with, 20% held out, seeded) ->
unlearning / pruning / filter (any combination, applied in that order) ->
before/after figures on the held-out images ->
guard (clean-accuracy drop <= max_accuracy_drop points, reversed-trigger attack success <= 5%) ->
write back into the ORIGINAL graph, onnxruntime parity check, atomic write.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import ConfigError, ConversionMismatchError, DataError, ModelError
from .io import check_output_path
from .mitigate.filter import (
    FLAG,
    SCORE,
    FilterProfile,
    add_filter,
    add_original_branch,
    calibrate,
    choose_neurons,
    rates,
    standardise,
)
from .mitigate.layers import Layer, activations, capture, find_layer, tensor_links, trainable_links
from .mitigate.prune import prune as prune_neurons
from .mitigate.unlearn import UnlearnConfig
from .mitigate.unlearn import unlearn as unlearn_model
from .reverse import attack_success, predict, preset, reverse_engineer
from .scanner import Prepared, ScanReport, decode_trigger, prepare, scan
from .trigger import Trigger

TARGET_ASR = 0.05
HOLDOUT = 0.2
# Images the mitigations keep after the hold-out split, at least. With the default 20%
# hold-out this makes patch's minimum the data loader's (ncscan.data.MIN_IMAGES = 10), so
# scan and patch refuse the same folders with the same message.
MIN_TRAIN = 8
# Unlearning rounds: a trigger re-reversed on the patched model counts as residual
# backdoor when it is at most this many times the original reversed trigger's L1.
RESIDUAL_FACTOR = 2.0
RESIDUAL_STEPS = 150


@dataclass(frozen=True)
class PatchResult:
    """What `patch` did and measured (figures on the held-out images)."""

    methods: list[str]
    labels: list[int]
    model: str
    model_sha256: str
    output: str | None
    written: bool
    guard_passed: bool
    guard_reasons: list[str]
    n_train: int
    n_holdout: int
    clean_accuracy_before: float | None
    clean_accuracy_after: float | None
    attack_success_before: dict[int, float]
    attack_success_after: dict[int, float]
    pruned_count: int | None = None
    pruned_total: int | None = None
    pruned_fraction: float | None = None
    prune_success: bool | None = None
    prune_stopped_by: str | None = None
    layer: str | None = None
    filter_threshold: float | None = None
    filter_neurons: list[int] | None = None
    filter_fpr: float | None = None
    filter_fnr: float | None = None
    attack_success_after_filter: dict[int, float] | None = None
    export: str | None = None  # "initializers" | "reexport"
    changed_initializers: list[str] = field(default_factory=list)
    parity_max_rel: float | None = None
    parity_filter_max_rel: float | None = None
    trigger_source: str = "report"
    unlearn: dict[str, Any] | None = None
    labels_from_predictions: bool = False
    elapsed_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    scan_verdict: str | None = (
        None  # the verdict of the scan the triggers came from (None: not known)
    )
    scan_reasons: list[str] = field(default_factory=list)  # why that scan was inconclusive
    filter_calibrated_on: str | None = (
        None  # "original" | "patched": the network the filter profiles
    )

    @property
    def inconclusive(self) -> bool:
        """Nothing was patched because the scan could not call the model clean or infected."""
        return not self.labels and self.scan_verdict == "inconclusive"

    @property
    def nothing_flagged(self) -> bool:
        return not self.labels

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("attack_success_before", "attack_success_after", "attack_success_after_filter"):
            if d[k] is not None:
                d[k] = {str(a): _r(b) for a, b in d[k].items()}
        for k in (
            "clean_accuracy_before",
            "clean_accuracy_after",
            "pruned_fraction",
            "filter_fpr",
            "filter_fnr",
            "elapsed_seconds",
        ):
            d[k] = _r(d[k])
        d["timings"] = {k: _r(v) for k, v in self.timings.items()}
        accb, acca = self.clean_accuracy_before, self.clean_accuracy_after
        d["clean_accuracy_drop_points"] = (
            None if accb is None or acca is None else _r((accb - acca) * 100.0)
        )
        d["ncscan_version"] = __version__
        return d


def _r(v: Any, nd: int = 6) -> Any:
    if isinstance(v, float):
        return None if not math.isfinite(v) else round(v, nd)
    return v


# ---------------------------------------------------------------- triggers


def _load_report(report: str | os.PathLike[str] | Mapping[str, Any] | ScanReport) -> dict[str, Any]:
    if isinstance(report, ScanReport):
        return report.to_dict()
    if isinstance(report, Mapping):
        return dict(report)
    p = Path(report)
    try:
        obj = json.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read --report {p}: {e.strerror}") from e
    except ValueError as e:
        raise ConfigError(f"--report {p} is not a JSON scan report: {e}") from e
    if not isinstance(obj, dict) or "labels" not in obj:
        raise ConfigError(
            f"--report {p} is not an ncscan scan report (JSON with 'labels'); run `ncscan scan -f json -o scan.json`"
        )
    return obj


def _triggers_from_report(rep: dict[str, Any], sha: str) -> dict[int, Trigger]:
    if rep.get("model_sha256") and rep["model_sha256"] != sha:
        raise ConfigError(
            "the scan report is for another model (its model_sha256 differs from this model's); "
            "re-run the scan on this model or pass the matching --report"
        )
    out: dict[int, Trigger] = {}
    for lr in rep.get("labels", []):
        if isinstance(lr, dict) and "trigger" in lr:
            out[int(lr["label"])] = decode_trigger(lr["trigger"])
    return out


# ---------------------------------------------------------------- helpers


@torch.no_grad()
def _accuracy(pm: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dev: torch.device) -> float:
    if len(x) == 0:
        return float("nan")
    return float((predict(pm, x, device=dev) == y).float().mean())


def _stamp_all(
    x: torch.Tensor, y: torch.Tensor, trigs: dict[int, Trigger]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image not of a trigger's target, stamped with that trigger; (images, target)."""
    xs, ts = [], []
    for t, trig in trigs.items():
        keep = y != t
        xs.append(torch.from_numpy(trig.apply(x[keep].numpy())).float())
        ts.append(torch.full((int(keep.sum()),), t, dtype=torch.long))
    return torch.cat(xs, 0), torch.cat(ts, 0)


def min_images(holdout: float = HOLDOUT) -> int:
    """The fewest clean images `patch` accepts: MIN_TRAIN left after holding out `holdout`
    (the same rounding as the split)."""
    n = MIN_TRAIN
    while n - max(1, round(holdout * n)) < MIN_TRAIN:
        n += 1
    return n


def _no_working_trigger(label: int, l1: float, asr: float | None, steps: int | None) -> ConfigError:
    got = (
        f" (best attack success {asr:.1%}" + (f" after {steps} steps)" if steps else ")")
        if asr is not None
        else ""
    )
    return ConfigError(
        f"--label {label}: no reversed trigger for it reached 99% attack success{got}, so there is "
        "no working trigger to patch against; drop that --label (it is probably not a backdoor "
        "target), or raise --max-steps / give more clean images"
    )


def _method_name(unlearn: bool, prune: bool, filt: bool) -> list[str]:
    return [m for m, on in (("unlearn", unlearn), ("prune", prune), ("filter", filt)) if on]


def _residual_limit(l1: float) -> float:
    """Largest L1 at which a trigger re-reversed after unlearning still counts as part of the
    backdoor: RESIDUAL_FACTOR times the original reversed trigger's L1. (Comparing with the
    scan's median - 2 MAD instead was measured to re-unlearn a natural-size trigger on the
    square fixture and cost 1.6 more accuracy points for nothing.)"""
    return RESIDUAL_FACTOR * l1


# ---------------------------------------------------------------- the stages
#
# patch() runs these in order; each takes the PatchContext (and what earlier stages
# returned) and can be called alone, e.g. from a test with a prepared fixture.


@dataclass
class PatchContext:
    """What the stages share: the prepared model and images, the triggers being patched,
    and the warnings and timings gathered so far."""

    prep: Prepared
    seed: int
    say: Callable[[str], None]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    triggers: dict[int, Trigger] = field(default_factory=dict)
    trigger_source: str = "report"
    scan_verdict: str | None = None  # of the scan the triggers came from (None: not known)
    scan_reasons: list[str] = field(default_factory=list)

    @property
    def pm(self) -> Any:
        """The pixel-space model (changed in place by unlearning and pruning)."""
        return self.prep.pixel_model

    @property
    def net(self) -> torch.nn.Module:
        return self.prep.pixel_model.net

    @property
    def om(self) -> Any:
        return self.prep.onnx

    @property
    def dev(self) -> torch.device:
        return self.prep.device

    @property
    def labels(self) -> list[int]:
        """The labels being patched, sorted."""
        return sorted(self.triggers)


@dataclass(frozen=True)
class Split:
    """The clean images: the part the mitigations learn from and the part held out to
    measure them (labels are the original model's predictions when the data has none)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_hold: torch.Tensor
    y_hold: torch.Tensor
    labels_from_predictions: bool = False

    @property
    def n_hold(self) -> int:
        return len(self.x_hold)


@dataclass(frozen=True)
class FilterOutcome:
    """The calibrated filter and its rates on the held-out images."""

    profile: FilterProfile
    fpr: float
    fnr: float
    attack_success_unflagged: dict[int, float]
    calibrated_on: str  # "original" | "patched"


@dataclass(frozen=True)
class ExportOutcome:
    """The serialised patched model and its parity figures."""

    model_bytes: bytes
    data_bytes: bytes | None
    mode: str  # "initializers" | "reexport"
    changed: list[str]
    parity_max_rel: float
    parity_filter_max_rel: float | None


def check_options(
    *,
    methods: list[str],
    epochs: int,
    unlearn_rounds: int,
    adversarial_steps: int,
    lr: float,
    fpr: float,
    holdout: float,
    max_accuracy_drop: float,
    max_steps: int | None,
) -> None:
    """Stage 0: refuse settings that make no sense, before anything is loaded.

    Raises:
        ConfigError: naming the setting and its allowed range.
    """
    if not methods:
        raise ConfigError("choose at least one mitigation: --unlearn, --prune and/or --filter")
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}")
    if unlearn_rounds < 1:
        raise ConfigError(f"--unlearn-rounds must be at least 1, got {unlearn_rounds}")
    if adversarial_steps < 0:
        raise ConfigError(f"adversarial_steps must be >= 0, got {adversarial_steps}")
    if not (lr > 0):
        raise ConfigError(f"--lr must be positive, got {lr}")
    if not (0 < fpr < 1):
        raise ConfigError(f"--fpr must be between 0 and 1, got {fpr}")
    if not (0 < holdout < 1):
        raise ConfigError(f"holdout must be between 0 and 1, got {holdout}")
    if not (max_accuracy_drop >= 0):
        raise ConfigError(f"--max-accuracy-drop must be >= 0 points, got {max_accuracy_drop}")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps must be at least 1, got {max_steps}")


def prepare_context(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str] | Any,
    *,
    seed: int,
    device: str,
    holdout: float,
    pre_kw: dict[str, Any],
    say: Callable[[str], None],
) -> PatchContext:
    """Stage 1: load and check the model and the clean images.

    Raises:
        DataError: the data does not suit the model (no --force here: patching a model on
            data it does not understand would "repair" it against noise).
        ConfigError: too few images for the split.
        ModelError: the model keeps its weights outside the file (> 2 GB).
    """
    t0 = time.perf_counter()
    try:
        prep: Prepared = prepare(model, data, device=device, seed=seed, **pre_kw)
    except DataError as e:
        raise DataError(
            str(e).split("; or pass --force")[0] + "; patch needs data the model classifies"
        ) from e
    if len(prep.x) < min_images(holdout):  # before any optimisation: the split needs them
        raise ConfigError(
            f"only {len(prep.x)} clean images: patch needs at least {min_images(holdout)} ({MIN_TRAIN} to patch with "
            f"after holding out {holdout:.0%}); give more clean images (a few hundred for reliable figures)"
        )
    om = prep.onnx
    if om.weights_on_disk:
        raise ModelError(
            f"{om.path} keeps over 2 GB of weights in external data: ncscan can scan it but cannot "
            "yet write a patched copy of a model that size; patch a smaller export, or use the "
            "scan's reversed triggers with your own fine-tuning"
        )
    return PatchContext(
        prep=prep,
        seed=seed,
        say=say,
        warnings=list(prep.warnings),
        timings={"prepare": time.perf_counter() - t0},
    )


def source_triggers(
    ctx: PatchContext,
    model: str | os.PathLike[str],
    *,
    report: str | os.PathLike[str] | Mapping[str, Any] | ScanReport | None,
    labels: Sequence[int] | None,
    rcfg: Any,
    device: str,
    pre_kw: dict[str, Any],
) -> None:
    """Stage 2: the reversed trigger of every label to patch, into `ctx.triggers`.

    From the report's flagged labels (or the forced `labels`); a forced label missing from
    the report, or every label when there is no report, is reversed here.

    Raises:
        ConfigError: a label out of range, a report for another model, a forced label
            with no working trigger, a trigger whose shape does not fit the images.
    """
    t1 = time.perf_counter()
    prep = ctx.prep
    wanted: list[int] | None = sorted({int(v) for v in labels}) if labels else None
    if wanted is not None:
        bad = [v for v in wanted if v < 0 or v >= prep.num_classes]
        if bad:
            raise ConfigError(
                f"--label {bad[0]} is out of range; the model has {prep.num_classes} classes (0..{prep.num_classes - 1})"
            )

    def working(rep2: ScanReport) -> dict[int, Trigger]:
        # A forced label whose reversal never reached a working trigger has nothing to
        # unlearn, prune or filter against: its "trigger" is the last, failing mask.
        for res in rep2.labels:
            if not res.converged:
                raise _no_working_trigger(res.label, res.mask_l1, res.attack_success, res.steps)
        return {res.label: res.trigger for res in rep2.labels}

    def reverse(which: list[int] | None) -> ScanReport:
        extra = {} if which is None else {"labels": which}
        return scan(
            model, prep.data, seed=ctx.seed, device=device, schedule=rcfg, **extra, **pre_kw
        )

    if report is not None:
        rep = _load_report(report)
        have = _triggers_from_report(rep, ctx.om.sha256)
        ctx.scan_verdict = rep.get("verdict") if isinstance(rep.get("verdict"), str) else None
        ctx.scan_reasons = [str(v) for v in rep.get("reasons") or []]
        flagged = [int(v) for v in rep.get("flagged", [])]
        chosen = wanted if wanted is not None else flagged
        ctx.triggers = {t: have[t] for t in chosen if t in have}
        ctx.trigger_source = "report"
        missing = [t for t in chosen if t not in have]
        if missing:
            ctx.say(
                f"reversing the trigger of label(s) {', '.join(map(str, missing))} (not in the report)"
            )
            ctx.triggers.update(working(reverse(missing)))
            ctx.trigger_source = "report+scan"
    else:
        ctx.trigger_source = "scan"
        if wanted is not None:
            ctx.say(f"reversing the trigger of label(s) {', '.join(map(str, wanted))}")
            ctx.triggers = working(reverse(wanted))
        else:
            ctx.say("scanning for backdoors (pass --report scan.json to reuse a scan)")
            rep2 = reverse(None)
            ctx.triggers = {res.label: res.trigger for res in rep2.labels if res.flagged}
            ctx.scan_verdict, ctx.scan_reasons = rep2.verdict, list(rep2.reasons)
            ctx.warnings.extend(w for w in rep2.warnings if w not in ctx.warnings)
    ctx.timings["triggers"] = time.perf_counter() - t1
    h, w = int(prep.x.shape[2]), int(prep.x.shape[3])
    for t, trig in ctx.triggers.items():
        if tuple(trig.mask.shape) != (h, w) or trig.pattern.shape[0] not in (1, prep.x.shape[1]):
            raise ConfigError(
                f"the trigger for label {t} has shape {list(trig.pattern.shape)}, but the images are {list(prep.x.shape[1:])}"
            )


def split_images(ctx: PatchContext, holdout: float) -> Split:
    """Stage 3: the seeded split of the clean images into patching and held-out parts.

    Raises:
        ConfigError: fewer than MIN_TRAIN images would be left to patch with.
    """
    x, y = ctx.prep.x, ctx.prep.y
    from_pred = False
    if y is None:
        y = predict(ctx.pm, x, device=ctx.dev)
        from_pred = True
        ctx.warnings.append(
            "the data has no labels (flat folder / npz without y): using the original model's "
            "predictions as labels, so accuracies are agreement with the original model"
        )
    n = len(x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed))
    n_hold = max(1, round(holdout * n))
    if n - n_hold < MIN_TRAIN:
        raise ConfigError(
            f"only {n} clean images: patch needs at least {min_images(holdout)} ({MIN_TRAIN} to patch with after "
            f"holding out {holdout:.0%}); give more clean images (a few hundred for reliable figures)"
        )
    hold, train = perm[:n_hold].sort().values, perm[n_hold:].sort().values
    if n_hold < 100:
        ctx.warnings.append(f"only {n_hold} held-out images: the before/after figures are coarse")
    return Split(
        x_train=x[train],
        y_train=y[train],
        x_hold=x[hold],
        y_hold=y[hold],
        labels_from_predictions=from_pred,
    )


def unlearn_stage(
    ctx: PatchContext,
    split: Split,
    links: dict[str, Any],
    cfg: UnlearnConfig,
    *,
    rounds: int,
    rcfg: Any,
) -> dict[str, Any]:
    """Stage 4a: unlearn the triggers (in place); with `rounds` > 1, re-reverse the labels
    on the patched model and unlearn what is still small (see _residual_limit).

    Returns:
        The unlearning record: its config, training stats and the rounds' log.

    Raises:
        ModelError: no weight of the model can be trained and written back.
    """
    t2 = time.perf_counter()
    pm, net, dev, seed = ctx.pm, ctx.net, ctx.dev, ctx.seed
    tr = trainable_links(links)
    if not tr:
        raise ModelError(
            "no weight of this model can be fine-tuned and written back (no Conv/Gemm/MatMul initializers found)"
        )
    ctx.say(
        f"unlearning: {cfg.epochs} epoch(s), >= {cfg.min_steps} steps each, Adam lr {cfg.lr:g}, {cfg.poison_fraction:.0%} stamped"
        + (
            f" (half with an adversarial copy of the trigger, {cfg.adv_steps} steps each)"
            if cfg.adv_steps
            else ""
        )
    )
    chosen = ctx.labels
    xt, yt = split.x_train, split.y_train
    unlearn_set = [ctx.triggers[t] for t in chosen]
    unlearn_targets = list(chosen)
    stats = unlearn_model(
        pm, net, xt, yt, unlearn_set, tr, cfg, targets=unlearn_targets, seed=seed, device=dev
    )
    rounds_log: list[dict[str, Any]] = []
    # A reversed trigger is the smallest one that works, often only part of the real
    # trigger; after unlearning it, the rest can still work. Each extra round reverses
    # the labels again on the PATCHED model and, where a working trigger is still
    # small (see _residual_limit), unlearns that one too (with the earlier ones).
    limit = {t: _residual_limit(ctx.triggers[t].l1) for t in chosen}
    for r in range(1, rounds):
        traces, _ = reverse_engineer(
            pm,
            xt,
            yt,
            chosen,
            replace(rcfg, max_steps=RESIDUAL_STEPS),
            seed=seed + 100 + r,
            device=dev,
        )
        pm.to(memory_format=torch.contiguous_format)
        residual = [tr_ for tr_ in traces if tr_.found and tr_.trigger.l1 <= limit[tr_.label]]
        rounds_log.append(
            {
                "round": r + 1,
                "residual_l1": {
                    str(tr_.label): (_r(tr_.trigger.l1) if tr_.found else None) for tr_ in traces
                },
                "limit_l1": {str(t): _r(v) for t, v in limit.items()},
                "unlearned": [tr_.label for tr_ in residual],
            }
        )
        if not residual:
            break
        ctx.say(
            f"unlearning round {r + 1}: label(s) {[tr_.label for tr_ in residual]} still have a small trigger "
            f"(L1 {', '.join(f'{tr_.trigger.l1:.1f}' for tr_ in residual)}); unlearning it too"
        )
        unlearn_set += [tr_.trigger for tr_ in residual]
        unlearn_targets += [tr_.label for tr_ in residual]
        unlearn_model(
            pm,
            net,
            xt,
            yt,
            unlearn_set,
            tr,
            cfg,
            targets=unlearn_targets,
            seed=seed + r,
            device=dev,
        )
    ctx.timings["unlearn"] = time.perf_counter() - t2
    return {**cfg.to_dict(), **stats, "rounds": rounds_log}


def prune_stage(
    ctx: PatchContext, split: Split, lay: Layer, links: dict[str, Any], *, max_accuracy_drop: float
) -> dict[str, Any]:
    """Stage 4b: prune the layer's neurons the triggers excite (in place), judged on the
    patching images.

    Returns:
        pruned_count, pruned_total, pruned_fraction, prune_success, prune_stopped_by.
    """
    t3 = time.perf_counter()
    pm, net, dev, trigs = ctx.pm, ctx.net, ctx.dev, ctx.triggers
    xt, yt = split.x_train, split.y_train
    acc_t0 = _accuracy(pm, xt, yt, dev)
    gap = activations(pm, net, lay, _stamp_all(xt, yt, trigs)[0]).mean(0) - activations(
        pm, net, lay, xt
    ).mean(0)

    def evaluate() -> tuple[float, float]:
        a = attack_success(pm, xt, yt, trigs, device=dev)
        return _accuracy(pm, xt, yt, dev), max(a.values())

    po = prune_neurons(
        net,
        lay,
        links,
        gap,
        evaluate,
        accuracy_before=acc_t0,
        max_accuracy_drop=max_accuracy_drop,
        target_asr=TARGET_ASR,
    )
    if not po.success:
        ctx.warnings.append(
            f"pruning did not bring the reversed trigger's attack success below {TARGET_ASR:.0%} "
            f"(stopped by {po.stopped_by.replace('_', ' ')} after {po.count}/{po.total} neurons); "
            "the paper reports pruning works poorly on Trojan-style backdoors: try --unlearn"
        )
    ctx.timings["prune"] = time.perf_counter() - t3
    return {
        "pruned_count": po.count,
        "pruned_total": po.total,
        "pruned_fraction": po.count / max(1, po.total),
        "prune_success": po.success,
        "prune_stopped_by": po.stopped_by,
    }


def filter_stage(
    ctx: PatchContext,
    split: Split,
    lay: Layer,
    fpm: Any,
    *,
    fpr: float,
    top_fraction: float,
    min_neurons: int,
    calibrated_on: str,
) -> FilterOutcome:
    """Stage 5: rank the neurons of `lay` on the network `fpm` (the original when
    unlearning/pruning changed `ctx.pm`) and calibrate the threshold on the patching
    images; rates come from the held-out images, which the filter never saw."""
    t4 = time.perf_counter()
    fnet, trigs, dev = fpm.net, ctx.triggers, ctx.dev
    xt, yt, xh, yh = split.x_train, split.y_train, split.x_hold, split.y_hold
    a_clean = activations(fpm, fnet, lay, xt)
    gap_std, mu, sd = standardise(
        a_clean, activations(fpm, fnet, lay, _stamp_all(xt, yt, trigs)[0])
    )
    neurons = choose_neurons(gap_std, top_fraction, min_neurons)
    center, scale = [float(mu[j]) for j in neurons], [float(sd[j]) for j in neurons]
    xs_h, ts_h = _stamp_all(xh, yh, trigs)
    prof0 = FilterProfile(neurons=neurons, threshold=0.0, rank_dims=2, center=center, scale=scale)
    thr, guaranteed = calibrate(prof0.score(a_clean).numpy(), fpr)
    if not guaranteed:
        ctx.warnings.append(
            f"only {len(xt)} images to calibrate the filter: too few to bound its false-positive "
            f"rate at {fpr:.0%} with 90% confidence; the threshold is the largest clean score "
            "(give more clean images)"
        )
    s_clean = prof0.score(activations(fpm, fnet, lay, xh)).numpy()
    s_trig = prof0.score(activations(fpm, fnet, lay, xs_h)).numpy()
    f_fpr, f_fnr = rates(s_clean, s_trig, thr)
    with torch.no_grad(), capture(fnet, lay) as st:
        fpm(xh[:1].to(dev))
        rank = st[0].dim()
    profile = FilterProfile(
        neurons=neurons, threshold=thr, rank_dims=rank, center=center, scale=scale
    )
    pred = predict(ctx.pm, xs_h, device=dev)
    flagged = torch.from_numpy(s_trig > thr)
    unflagged: dict[int, float] = {}
    for t in ctx.labels:
        sel = ts_h == t
        unflagged[t] = (
            float(((pred[sel] == t) & ~flagged[sel]).float().mean()) if sel.any() else float("nan")
        )
    ctx.timings["filter"] = time.perf_counter() - t4
    return FilterOutcome(
        profile=profile,
        fpr=f_fpr,
        fnr=f_fnr,
        attack_success_unflagged=unflagged,
        calibrated_on=calibrated_on,
    )


def guard(
    *,
    accuracy_before: float,
    accuracy_after: float,
    n_hold: int,
    attack_success: Mapping[int, float],
    max_accuracy_drop: float,
) -> list[str]:
    """Stage 6: why the patched model should not be written (empty: it passes).

    Args:
        accuracy_before, accuracy_after: clean accuracy on the held-out images (fractions).
        n_hold: how many held-out images.
        attack_success: the reversed triggers' attack success that remains (unflagged,
            with a filter), per label.
        max_accuracy_drop: in points.
    """
    reasons: list[str] = []
    drop = (accuracy_before - accuracy_after) * 100.0
    if drop > max_accuracy_drop:
        reasons.append(
            f"clean accuracy dropped {drop:.1f} points (> --max-accuracy-drop {max_accuracy_drop:g}) on {n_hold} "
            f"held-out images, where one image is {100.0 / n_hold:.1f} points: give more images for a finer "
            "check, or --force to write it anyway"
        )
    worst = max((v for v in attack_success.values() if math.isfinite(v)), default=0.0)
    if worst > TARGET_ASR:
        reasons.append(
            f"the reversed trigger still succeeds on {worst:.1%} of held-out images (> {TARGET_ASR:.0%})"
        )
    return reasons


def export_stage(
    ctx: PatchContext,
    split: Split,
    *,
    links: dict[str, Any],
    before: Any,
    methods: list[str],
    figures: dict[str, Any],
    lay: Layer | None,
    filt: FilterOutcome | None,
    fpm: Any,
    out_path: Path | None,
) -> ExportOutcome:
    """Stage 7: write the changed weights back into the ORIGINAL graph (or re-export),
    add the filter outputs, and check the result in onnxruntime against torch.

    Raises:
        ModelError: the filter cannot be built into this graph.
        ConversionMismatchError: onnxruntime disagrees with torch on the patched model.
    """
    from .export import (
        ExportFallback,
        finalize,
        parity_bytes,
        provenance,
        reexport,
        run_outputs,
        serialize,
        set_metadata,
        write_back,
    )

    t5 = time.perf_counter()
    om, net, pm, dev, xh = ctx.om, ctx.net, ctx.pm, ctx.dev, split.x_hold
    mode = "initializers"
    try:
        proto, changed = write_back(om, net, links, before)
    except ExportFallback as e:
        ctx.warnings.append(
            f"cannot write the patch into the original graph ({e}); re-exported with torch.onnx.export (opset 17)"
        )
        mode = "reexport"
        proto = reexport(net, om, pm.to_model_input(xh[:2].to(dev)).cpu())
        changed = []
    if filt is not None:
        assert lay is not None
        if mode == "reexport":
            raise ModelError(
                "the filter needs the original graph's activation tensor, but the model had to be re-exported; patch with --filter alone"
            )
        act = lay.value
        if filt.calibrated_on == "original":
            try:
                proto, act = add_original_branch(proto, om.proto, lay.value)
            except ValueError as e:
                raise ModelError(
                    f"cannot copy the original network's path to {lay.value} into the filter ({e}); "
                    "patch with --filter alone, then --unlearn/--prune separately"
                ) from None
        proto = add_filter(proto, act, filt.profile)
    set_metadata(proto, provenance("+".join(methods), om, ctx.labels, figures, ctx.prep.preprocess))
    proto = finalize(proto)
    model_bytes, data_bytes = serialize(proto, out_path or Path(om.path.name + ".patched.onnx"))
    xh_model = pm.to_model_input(xh.to(dev)).cpu().numpy()
    sess, par = parity_bytes(
        model_bytes,
        om,
        lambda t: pm.raw(t.to(dev)).reshape(t.shape[0], -1).cpu(),
        xh_model,
        "the patched model written to ONNX",
    )
    par_filter = None
    if filt is not None:
        assert lay is not None
        got_s, got_f = run_outputs(sess, om, xh_model, [SCORE, FLAG])
        ref_s = filt.profile.score(activations(fpm, fpm.net, lay, xh)).numpy()
        scale = max(1.0, float(np.max(np.abs(ref_s))))
        par_filter = float(np.max(np.abs(got_s.astype(np.float32) - ref_s))) / scale
        if par_filter > 1e-4:
            raise ConversionMismatchError(
                f"the exported filter's score disagrees with torch (max relative difference {par_filter:.2e}): "
                "its neurons are nearly silent on clean images, where onnxruntime's and torch's rounding "
                "is amplified; profile another layer with --layer NODE, or use --unlearn"
            )
        if not np.array_equal(got_f.astype(bool), got_s > np.float32(filt.profile.threshold)):
            raise ConversionMismatchError("the exported filter's flag disagrees with its score")
    ctx.timings["export"] = time.perf_counter() - t5
    return ExportOutcome(
        model_bytes=model_bytes,
        data_bytes=data_bytes,
        mode=mode,
        changed=changed,
        parity_max_rel=par.max_rel,
        parity_filter_max_rel=par_filter,
    )


# ---------------------------------------------------------------- the API


def patch(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str] | Any,
    *,
    output: str | os.PathLike[str] | None,
    unlearn: bool = False,
    prune: bool = False,
    filter: bool = False,
    report: str | os.PathLike[str] | Mapping[str, Any] | ScanReport | None = None,
    labels: Sequence[int] | None = None,
    epochs: int = 1,
    lr: float = 5e-4,
    batch_size: int = 32,
    min_steps: int = 150,
    poison_fraction: float = 0.2,
    distill: float = 1.0,
    adversarial_steps: int = 3,
    unlearn_rounds: int = 1,
    fpr: float = 0.05,
    top_fraction: float = 0.01,
    min_neurons: int = 8,
    layer: str | None = None,
    max_accuracy_drop: float = 2.0,
    holdout: float = HOLDOUT,
    force: bool = False,
    seed: int = 0,
    device: str = "auto",
    schedule: str = "fast",
    max_steps: int | None = None,
    pixel_range: Sequence[float] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    channel_order: str | None = None,
    layout: str | None = None,
    labels_file: str | os.PathLike[str] | None = None,
    max_images: int | None = 2000,
    log: Callable[[str], None] | None = None,
) -> PatchResult:
    """Mitigate the backdoor(s) of an ONNX classifier and write the patched ONNX model.

    Args:
        model: the .onnx file.
        data: clean images (class folders, flat folder, or .npz with x and y).
        output: where to write the patched model (None: measure only, write nothing).
        unlearn, prune, filter: the mitigations (any combination; applied in that order).
        report: a scan report (path, dict or ScanReport) whose flagged labels carry their
            reversed triggers; None: run the scan here.
        labels: force these labels (their triggers come from the report, else are reversed).
        epochs, lr, batch_size, min_steps, poison_fraction: unlearning (Adam; at least
            `min_steps` steps per epoch; `poison_fraction` of each batch stamped).
        distill: weight of the distillation towards the original model's outputs on the
            unstamped images (the mixup-image term and the rest: UnlearnConfig defaults).
        adversarial_steps: per training step, the Adam steps that re-optimise an
            adversarial copy of each reversed trigger against the model being unlearned
            (half the stamped images carry it); 0: only the reversed triggers.
        unlearn_rounds: after the first unlearning, re-reverse the labels on the patched
            model and unlearn any trigger still within RESIDUAL_FACTOR of the original's
            size, up to this many rounds in all (default 1: the paper's single round).
        fpr: the filter's false-positive rate on new clean images (90% confidence bound).
        top_fraction, min_neurons: the filter's activation profile averages the top
            `top_fraction` of neurons (paper: 1%), at least `min_neurons`.
        layer: ONNX node (or output tensor) whose output pruning/filter use
            (default: the input of the last Gemm/MatMul).
        max_accuracy_drop: guard, in accuracy points.
        holdout: fraction of the images held out to measure before/after.
        force: write even when the guard fails.
        seed: seeds the split, the training and the scan.
        device: "auto", "cpu" or "cuda".
        schedule, max_steps: the optimiser preset and its per-label step cap for the triggers
            reversed here (own scan, forced labels, unlearning rounds).
        pixel_range, mean, std, channel_order, layout, labels_file, max_images: as for scan.
        log: called with progress messages.

    Returns:
        The PatchResult (`written` says whether the file was written; `inconclusive` when
        nothing was patched because the scan could not call the model clean).

    Raises:
        NcscanError subclasses for user errors (bad input, parity failure, output == input,
        a forced label with no working trigger).
    """
    t0 = time.perf_counter()
    say = log or (lambda s: None)
    methods = _method_name(unlearn, prune, filter)
    check_options(
        methods=methods,
        epochs=epochs,
        unlearn_rounds=unlearn_rounds,
        adversarial_steps=adversarial_steps,
        lr=lr,
        fpr=fpr,
        holdout=holdout,
        max_accuracy_drop=max_accuracy_drop,
        max_steps=max_steps,
    )
    rcfg = preset(schedule)
    if max_steps is not None:
        rcfg = replace(rcfg, max_steps=max_steps)
    out_path: Path | None = None
    if output is not None:
        ins: list[Any] = [model] + ([data] if isinstance(data, (str, os.PathLike)) else [])
        out_path = check_output_path(output, ins)  # never the model, its weights file or the data
    pre_kw: dict[str, Any] = {
        "pixel_range": pixel_range,
        "mean": mean,
        "std": std,
        "channel_order": channel_order,
        "layout": layout,
        "labels_file": labels_file,
        "max_images": max_images,
    }
    ctx = prepare_context(
        model, data, seed=seed, device=device, holdout=holdout, pre_kw=pre_kw, say=say
    )
    ctx.timings["prepare"] = time.perf_counter() - t0
    source_triggers(
        ctx, model, report=report, labels=labels, rcfg=rcfg, device=device, pre_kw=pre_kw
    )
    om = ctx.om
    if not ctx.labels:
        return PatchResult(
            methods=methods,
            labels=[],
            model=str(om.path),
            model_sha256=om.sha256,
            output=str(out_path) if out_path else None,
            written=False,
            guard_passed=True,
            guard_reasons=[],
            n_train=0,
            n_holdout=0,
            clean_accuracy_before=ctx.prep.clean_accuracy,
            clean_accuracy_after=None,
            attack_success_before={},
            attack_success_after={},
            trigger_source=ctx.trigger_source,
            elapsed_seconds=time.perf_counter() - t0,
            timings=ctx.timings,
            warnings=ctx.warnings,
            scan_verdict=ctx.scan_verdict,
            scan_reasons=ctx.scan_reasons,
        )
    split = split_images(ctx, holdout)
    pm, dev = ctx.pm, ctx.dev
    xh, yh = split.x_hold, split.y_hold
    acc_before = _accuracy(pm, xh, yh, dev)
    asr_before = attack_success(pm, xh, yh, ctx.triggers, device=dev)
    say(
        f"held out {split.n_hold} of {len(ctx.prep.x)} images; clean accuracy {acc_before:.1%}, attack success "
        + ", ".join(f"{t}: {a:.0%}" for t, a in asr_before.items())
    )

    from .export import snapshot

    before = snapshot(ctx.net)
    # The filter profiles the ORIGINAL network whenever unlearning or pruning changes it:
    # after unlearning the reversed trigger no longer moves the patched network's neurons
    # (measured: 55.8% of triggered images missed when calibrated on the unlearned model).
    orig_pm = copy.deepcopy(pm).eval() if filter and (unlearn or prune) else None
    links = tensor_links(ctx.net, om.proto)
    unlearned = None
    if unlearn:
        cfg = UnlearnConfig(
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            poison_fraction=poison_fraction,
            min_steps=min_steps,
            distill=distill,
            adv_steps=adversarial_steps,
        )
        unlearned = unlearn_stage(ctx, split, links, cfg, rounds=unlearn_rounds, rcfg=rcfg)
    lay = find_layer(om.proto, ctx.net, layer) if prune or filter else None
    pruned: dict[str, Any] = {}
    if prune:
        assert lay is not None
        pruned = prune_stage(ctx, split, lay, links, max_accuracy_drop=max_accuracy_drop)
    acc_after = _accuracy(pm, xh, yh, dev)
    asr_after = attack_success(pm, xh, yh, ctx.triggers, device=dev)
    filt: FilterOutcome | None = None
    fpm = orig_pm if orig_pm is not None else pm
    if filter:
        assert lay is not None
        filt = filter_stage(
            ctx,
            split,
            lay,
            fpm,
            fpr=fpr,
            top_fraction=top_fraction,
            min_neurons=min_neurons,
            calibrated_on="original" if orig_pm is not None else "patched",
        )
    remaining = filt.attack_success_unflagged if filt is not None else asr_after
    reasons = guard(
        accuracy_before=acc_before,
        accuracy_after=acc_after,
        n_hold=split.n_hold,
        attack_success=remaining,
        max_accuracy_drop=max_accuracy_drop,
    )
    passed = not reasons

    figures: dict[str, Any] = {
        "clean_accuracy_before": _r(acc_before),
        "clean_accuracy_after": _r(acc_after),
        "attack_success_before": {str(k): _r(v) for k, v in asr_before.items()},
        "attack_success_after": {str(k): _r(v) for k, v in asr_after.items()},
        "n_holdout": split.n_hold,
    }
    if prune:
        figures["pruned_count"] = pruned["pruned_count"]
        figures["pruned_fraction"] = _r(pruned["pruned_fraction"])
    if filt is not None:
        figures.update(
            filter_threshold=_r(filt.profile.threshold),
            filter_neurons=filt.profile.neurons,
            filter_fpr=_r(filt.fpr),
            filter_fnr=_r(filt.fnr),
        )
    ex = export_stage(
        ctx,
        split,
        links=links,
        before=before,
        methods=methods,
        figures=figures,
        lay=lay,
        filt=filt,
        fpm=fpm,
        out_path=out_path,
    )
    written = False
    if out_path is not None and (passed or force):
        from .export import write

        write(out_path, ex.model_bytes, ex.data_bytes, [Path(model)])
        written = True
        if not passed:
            ctx.warnings.append("written despite the failed guard (--force)")
    return PatchResult(
        methods=methods,
        labels=ctx.labels,
        model=str(om.path),
        model_sha256=om.sha256,
        output=str(out_path) if out_path else None,
        written=written,
        guard_passed=passed,
        guard_reasons=reasons,
        n_train=len(split.x_train),
        n_holdout=split.n_hold,
        clean_accuracy_before=acc_before,
        clean_accuracy_after=acc_after,
        attack_success_before=asr_before,
        attack_success_after=asr_after,
        pruned_count=pruned.get("pruned_count"),
        pruned_total=pruned.get("pruned_total"),
        pruned_fraction=pruned.get("pruned_fraction"),
        prune_success=pruned.get("prune_success"),
        prune_stopped_by=pruned.get("prune_stopped_by"),
        layer=lay.description if lay is not None else None,
        filter_threshold=filt.profile.threshold if filt else None,
        filter_neurons=filt.profile.neurons if filt else None,
        filter_fpr=filt.fpr if filt else None,
        filter_fnr=filt.fnr if filt else None,
        attack_success_after_filter=filt.attack_success_unflagged if filt else None,
        export=ex.mode,
        changed_initializers=ex.changed,
        parity_max_rel=ex.parity_max_rel,
        parity_filter_max_rel=ex.parity_filter_max_rel,
        trigger_source=ctx.trigger_source,
        unlearn=unlearned,
        labels_from_predictions=split.labels_from_predictions,
        elapsed_seconds=time.perf_counter() - t0,
        timings=ctx.timings,
        warnings=ctx.warnings,
        scan_verdict=ctx.scan_verdict,
        scan_reasons=ctx.scan_reasons,
        filter_calibrated_on=filt.calibrated_on if filt else None,
    )
