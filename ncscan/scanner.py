"""The scan: model + clean images -> per-label reversed triggers -> outliers -> ScanReport."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from . import __version__, sanity
from .data import Dataset, LoadProgress, check_labels, check_resize, load_data
from .decide import (
    DecideConfig,
    Decision,
    compactness,
    decide,
    label_size,
    log_scores,
    needs_restart,
)
from .errors import ConfigError, DataError, DeviceError, ModelError
from .inputs import MAX_IMAGES, InputOptions, input_options
from .model import OnnxModel, Parity, check_parity, convert, load_onnx, ort_run, ort_session
from .preprocess import (
    PixelModel,
    Preprocess,
    preprocess_from_metadata,
    resize_from_metadata,
    resolve_preprocess,
)
from .prescreen import ASR_IMAGES as PRESCREEN_ASR_IMAGES
from .prescreen import applies as prescreen_applies
from .prescreen import prescreened
from .prescreen import unused_note as prescreen_unused_note
from .resemblance import likeness
from .reverse import (
    ChunkRunner,
    LabelTrace,
    Progress,
    ReverseConfig,
    attack_success,
    forward_batch,
    memory_peak,
    memory_plan,
    memory_start,
    preset,
    reverse_engineer,
)
from .stats import anomaly_indices
from .trigger import Trigger

PARITY_IMAGES = 64


def resolve_device(device: str) -> torch.device:
    """"auto" | "cpu" | "cuda[:N]" -> a torch device.

    Raises:
        DeviceError: unknown name, or CUDA asked for but absent.
    """
    d = (device or "auto").strip().lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d == "cpu":
        return torch.device("cpu")
    if d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {device}: no CUDA GPU is visible to torch; use --device cpu or auto"
            )
        if ":" in d and int(d[5:]) >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible; pick another"
            )
        return torch.device(d)
    raise DeviceError(f"unknown --device {device!r}; use auto, cpu or cuda")


@dataclass(frozen=True)
class LabelResult:
    """One label's reversed trigger, how it did, and what the decision made of it."""

    label: int
    name: str | None
    trigger: Trigger  # the run whose mask L1 is the label's size (median run)
    mask_l1: float  # the label's size: median L1 over its runs' working triggers
    attack_success: float
    anomaly_index: float  # the paper's MAD index of mask_l1, kept for comparison
    steps: int
    working: bool  # a working trigger (reaching the attack-success threshold) was found; JSON "converged"
    early_stopped: bool
    flagged: bool
    screened_out: bool = False  # pre-screening judged it clearly large; not fully optimised
    score: float = float("nan")  # ncscan.decide's log-size score (positive = smaller than typical)
    run_l1: tuple[float, ...] = ()  # each run's L1 (NaN where a run found no working trigger)
    consistency: float | None = None  # mean pairwise cosine of the runs' masks (>= 2 runs)
    decision: str = "clear"  # flagged | borderline | clear | no_trigger | screened_out
    compactness: float = float("nan")  # ncscan.decide.compactness of the reported mask
    line: float = float("nan")  # the score this label is held to (lower when its mask is compact)
    evidence: str = "size"  # what set the line: "size", "size+compact" or "size+natural"
    likeness: float = float("nan")  # ncscan.resemblance.likeness of the reported trigger

    @property
    def margin(self) -> float:
        """Score minus the label's own line: how far it sits from being flagged."""
        return self.score - self.line

    def to_dict(self, with_trigger: bool = False) -> dict[str, Any]:
        """The label's JSON."""
        d: dict[str, Any] = {
            "label": self.label,
            "name": self.name,
            "mask_l1": round(self.mask_l1, 4),
            "attack_success": _finite(self.attack_success),
            "score": _finite(self.score) if self.working else None,
            "margin": _finite(self.margin) if self.working else None,
            "line": _finite(self.line),
            "compactness": _finite(self.compactness),
            "evidence": self.evidence,
            "likeness": _finite(self.likeness),
            "decision": self.decision,
            "runs": len(self.run_l1),
            "run_mask_l1": [_finite(v) for v in self.run_l1],
            "consistency": None if self.consistency is None else _finite(self.consistency),
            # No working trigger was found: its L1 is not a minimal trigger's, so no index.
            "anomaly_index": _finite(self.anomaly_index) if self.working else None,
            "steps": self.steps,
            "converged": self.working,
            "early_stopped": self.early_stopped,
            "flagged": self.flagged,
            "screened_out": self.screened_out,
        }
        if with_trigger:
            d["trigger"] = encode_trigger(self.trigger)
        return d


def _finite(v: float, ndigits: int = 4) -> float | None:
    """JSON has no NaN/inf: such values are written as null."""
    return round(v, ndigits) if np.isfinite(v) else None


def encode_trigger(t: Trigger) -> dict[str, Any]:
    """A trigger as JSON: float32 little-endian arrays, base64."""
    return {
        "mask_shape": list(t.mask.shape),
        "pattern_shape": list(t.pattern.shape),
        "mask_b64": base64.b64encode(t.mask.astype("<f4").tobytes()).decode(),
        "pattern_b64": base64.b64encode(t.pattern.astype("<f4").tobytes()).decode(),
    }


def decode_trigger(d: dict[str, Any]) -> Trigger:
    """Inverse of `encode_trigger`.

    Raises:
        ConfigError: malformed trigger data.
    """
    try:
        m = np.frombuffer(base64.b64decode(d["mask_b64"]), "<f4").reshape(d["mask_shape"])
        p = np.frombuffer(base64.b64decode(d["pattern_b64"]), "<f4").reshape(d["pattern_shape"])
    except Exception as e:
        raise ConfigError(f"report has a malformed trigger ({type(e).__name__}); re-run the scan") from e
    return Trigger(mask=m.astype(np.float32), pattern=p.astype(np.float32))


@dataclass
class ScanReport:
    """Everything a scan found."""

    model: str
    model_sha256: str
    verdict: str  # "clean" | "backdoor" | "inconclusive"
    flagged: list[int]
    threshold: float
    labels: list[LabelResult]
    median_l1: float
    mad: float
    clean_accuracy: float | None
    preprocess: Preprocess
    preprocess_source: dict[str, str]
    output: str  # "logits" | "probabilities"
    num_classes: int
    input_shape: list[int]
    seed: int
    device: str
    config: ReverseConfig
    parity: Parity
    n_images: int
    elapsed_seconds: float
    timings: dict[str, float]
    passes: int
    warnings: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    decide_config: DecideConfig = field(default_factory=DecideConfig)
    borderline: list[int] = field(default_factory=list)
    margin: float | None = None  # how far the verdict sits from the line (see `verdict_margin`)
    paper_flagged: list[int] = field(default_factory=list)  # what the paper's index > 2 would flag
    score_center: float = float("nan")  # median log mask L1
    score_scale: float = float("nan")  # spread of log mask L1 used (after the floor)
    resize: dict[str, str] = field(default_factory=lambda: {"mode": "squash", "source": "default"})
    memory: dict[str, Any] = field(default_factory=dict)  # peaks and the activation plan

    @property
    def by_label(self) -> dict[int, LabelResult]:
        return {r.label: r for r in self.labels}

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (flagged labels carry their reversed trigger)."""
        return {
            "ncscan_version": __version__,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "verdict": self.verdict,
            "flagged": self.flagged,
            "borderline": self.borderline,
            "margin": None if self.margin is None else _finite(self.margin),
            "threshold": self.threshold,
            "band": self.decide_config.band,
            "decision": self.decide_config.to_dict(),
            "paper_flagged": self.paper_flagged,
            "num_classes": self.num_classes,
            "median_mask_l1": _finite(self.median_l1),
            "mad": _finite(self.mad),
            "score_scale": _finite(self.score_scale),
            "labels": [r.to_dict(with_trigger=r.flagged) for r in self.labels],
            # What each per-label figure is measured on, so 98.9% beside a 99% rule is no riddle.
            "measured_on": {
                "attack_success": "every clean image whose label is not the target "
                f"({self.n_images} images given); screened-out labels: the first {PRESCREEN_ASR_IMAGES} of them",
                "working_trigger": f"attack success >= {self.config.schedule.attack_succ_threshold:.0%} on a "
                f"fixed sample of up to {self.config.verify_images} clean images per label, checked during "
                "optimisation (the reference schedule: on each step's own mini-batches)",
            },
            "clean_accuracy": None if self.clean_accuracy is None else round(self.clean_accuracy, 4),
            "preprocess": self.preprocess.to_dict(),
            "preprocess_source": self.preprocess_source,
            "output": self.output,
            "input_shape": self.input_shape,
            "n_images": self.n_images,
            "resize": self.resize,
            "seed": self.seed,
            "device": self.device,
            "config": self.config.to_dict(),
            "conversion_parity": self.parity.to_dict(),
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "image_passes": self.passes,
            "memory": self.memory,
            "warnings": self.warnings,
            "reasons": self.reasons,
        }


@dataclass
class Prepared:
    """A model converted and checked against onnxruntime, with the data to use."""

    onnx: OnnxModel
    preprocess: Preprocess
    preprocess_source: dict[str, str]
    pixel_model: PixelModel
    data: Dataset
    x: torch.Tensor
    y: torch.Tensor | None
    num_classes: int
    output: str
    parity: Parity
    device: torch.device
    warnings: list[str]
    clean_accuracy: float | None
    # Why the data cannot support a verdict (near-chance accuracy, collapsed predictions),
    # set only when `force` let the scan go on anyway.
    doubt: str | None = None
    resize: dict[str, str] = field(default_factory=lambda: {"mode": "squash", "source": "default"})


def _scores(pm: PixelModel, x: torch.Tensor, dev: torch.device, batch: int | None = None) -> np.ndarray:
    """The model's scores (logits or log-probabilities) for [0,1] images, as float64
    (`batch` images per forward; default: what the memory budget holds, at most 512)."""
    batch = batch or forward_batch(pm, x, dev)
    with torch.no_grad():
        out = [pm(x[i : i + batch].to(dev)).double().cpu() for i in range(0, len(x), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def prepare(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str] | Dataset,
    *,
    inputs: InputOptions | None = None,
    device: str = "auto",
    seed: int = 0,
    rtol: float = 1e-4,
    force: bool = False,
    load_progress: LoadProgress | None = None,
) -> Prepared:
    """Load + check the model, load the data, convert, verify the conversion, and check
    that the preprocessing is plausible (`ncscan.sanity`).

    Args:
        inputs: the preprocessing and data-reading choices (default: all from the model's
            metadata, else the defaults; see `ncscan.inputs.InputOptions`).
        force: go on (with a warning) when the clean accuracy is near chance or the
            predictions collapse onto one class; otherwise that is a DataError.
        load_progress: called as (decoded, to decode) while image files are decoded.

    Raises:
        NcscanError subclasses for anything the user can fix.
    """
    opts = inputs or InputOptions()
    layout, resize = opts.layout, opts.resize
    dev = resolve_device(device)
    om = load_onnx(model, layout=layout.upper() if layout else None, output_name=opts.output_name)
    ch = om.input.channels
    overrides = _overrides(om, opts.pixel_range, opts.mean, opts.std, opts.channel_order, layout)
    pp, src = resolve_preprocess(om.metadata, om.input.layout, overrides)
    if om.layout_source == "metadata":
        src["layout"] = "metadata"
    pp = replace(pp, layout=om.input.layout).validate(ch)
    meta_resize = resize_from_metadata(om.metadata)
    fit = check_resize(resize) if resize is not None else meta_resize or "squash"
    fit_src = "flag" if resize is not None else "metadata" if meta_resize is not None else "default"
    if isinstance(data, Dataset):
        ds = data
    else:
        ds = load_data(
            data, channels=ch, size=(om.input.height, om.input.width), labels_file=opts.labels_file,
            max_images=opts.max_images, seed=seed, resize=fit, progress=load_progress,
        )
    warnings = list(om.warnings) + list(ds.warnings)
    x = ds.tensor()
    torch.manual_seed(seed)
    net = convert(om)
    pm, k, parity = _checked_pixel_model(om, net, pp, x, rtol)
    if k == 2:
        warnings.append("the model has only 2 classes: the outlier test has almost no power")
    y = torch.from_numpy(ds.y) if ds.y is not None else None
    check_labels(ds.y, k, str(ds.source))
    pm = pm.to(dev)
    # Wrong preprocessing makes any verdict meaningless: check it before optimising.
    meta_pp = preprocess_from_metadata(om.metadata)
    warnings += sanity.metadata_overrides(
        {**meta_pp, **({"resize": meta_resize} if meta_resize else {})}, {**overrides, "resize": resize}
    )
    scores = _scores(pm, x, dev)
    acc = None if y is None else float((scores.argmax(1) == ds.y).mean())
    check = _check_preprocessing(om, net, pp, src, meta_pp, pm, x, ds, scores, seed, dev)
    warnings += check.warnings
    doubt: str | None = None
    if check.stop is not None:
        if not force:
            raise DataError(check.stop)
        warnings.append(check.stop.replace("; or pass --force to scan anyway", "") + " (--force: scanned anyway)")
        doubt = check.stop
    return Prepared(
        onnx=om, preprocess=pp, preprocess_source=src, pixel_model=pm, data=ds, x=x, y=y, num_classes=k,
        output="probabilities" if pm.output_is_prob else "logits", parity=parity, device=dev,
        warnings=warnings, clean_accuracy=acc, doubt=doubt, resize={"mode": fit, "source": fit_src},
    )


def _overrides(
    om: OnnxModel, pixel_range: Sequence[float] | None, mean: Sequence[float] | None,
    std: Sequence[float] | None, channel_order: str | None, layout: str | None,
) -> dict[str, Any]:
    """The user's preprocessing flags, normalised (None: not given)."""
    overrides: dict[str, Any] = {
        "pixel_range": tuple(float(v) for v in pixel_range) if pixel_range is not None else None,
        "mean": tuple(float(v) for v in mean) if mean is not None else None,
        "std": tuple(float(v) for v in std) if std is not None else None,
        "channel_order": channel_order.upper() if channel_order else None,
        "layout": om.input.layout if layout else None,
    }
    if overrides["pixel_range"] is not None and len(overrides["pixel_range"]) != 2:
        raise ConfigError("--pixel-range takes two numbers lo,hi (e.g. 0,255)")
    return overrides


def _checked_pixel_model(
    om: OnnxModel, net: torch.nn.Module, pp: Preprocess, x: torch.Tensor, rtol: float
) -> tuple[PixelModel, int, Parity]:
    """The pixel-space model, its class count, and its parity with onnxruntime. onnxruntime's
    outputs on a few images tell the class count and whether the output is probabilities."""
    ch = om.input.channels
    sess = ort_session(om)
    xin = PixelModel(net, pp, ch).to_model_input(x[:PARITY_IMAGES]).numpy()
    ref = ort_run(sess, om, xin)
    k = int(ref.shape[1])
    if k < 2:
        raise ModelError(
            f"model output has {k} class(es); ncscan needs a classifier with at least 2 outputs"
        )
    rows_sum_one = bool(np.all(ref >= -1e-6) and np.all(ref <= 1 + 1e-6) and np.allclose(ref.sum(1), 1.0, atol=1e-3))
    is_prob = om.ends_in_softmax or rows_sum_one
    pm = PixelModel(net, pp, ch, output_is_prob=is_prob, static_batch_one=om.input.batch == 1)
    parity = check_parity(
        lambda t: pm.raw(t).reshape(t.shape[0], -1),
        lambda a: ort_run(sess, om, a),
        xin,
        rtol=rtol,
    )
    return pm, k, parity


def _check_preprocessing(
    om: OnnxModel, net: torch.nn.Module, pp: Preprocess, src: dict[str, str], meta_pp: dict[str, Any],
    pm: PixelModel, x: torch.Tensor, ds: Dataset, scores: np.ndarray, seed: int, dev: torch.device,
) -> Any:
    """ncscan.sanity's check of the preprocessing: the model's scores under the setting in use
    against plausible alternatives (scored on a few images each)."""
    ch = om.input.channels

    def score_with(changes: dict[str, Any], idx: np.ndarray) -> np.ndarray:
        alt = PixelModel(net, replace(pp, **changes), ch, output_is_prob=pm.output_is_prob,
                         static_batch_one=om.input.batch == 1).to(dev)
        return _scores(alt, x[torch.from_numpy(idx)], dev)

    return sanity.check_preprocessing(
        scores, ds.y, score_with,
        sanity.candidates(pp.pixel_range, pp.mean, pp.std, pp.channel_order, ch),
        setting=sanity.describe_setting(pp, src, meta_pp), class_names=ds.class_names, seed=seed,
    )


def scan(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str] | Dataset,
    *,
    inputs: InputOptions | None = None,
    pixel_range: Sequence[float] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    channel_order: str | None = None,
    layout: str | None = None,
    labels_file: str | os.PathLike[str] | None = None,
    threshold: float | None = None,
    seed: int = 0,
    device: str = "auto",
    schedule: str | ReverseConfig = "fast",
    decision: DecideConfig | None = None,
    labels: Sequence[int] | None = None,
    max_images: int | None = MAX_IMAGES,
    prescreen: str = "auto",
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    runner: Callable[[Prepared], ChunkRunner] | None = None,
    force: bool = False,
    output_name: str | None = None,
    resize: str | None = None,
    load_progress: LoadProgress | None = None,
) -> ScanReport:
    """Scan an ONNX image classifier for backdoors with Neural Cleanse.

    Args:
        model: path to the .onnx file.
        data: clean images (folder, class folders, or .npz), or a loaded `Dataset`.
        inputs: the preprocessing and data-reading choices in one object
            (`ncscan.inputs.InputOptions`); the keyword arguments below that are given
            (not None; max_images: not its default) override its fields.
        pixel_range, mean, std, channel_order, layout: preprocessing overrides (default:
            the model's metadata, else [0,1] RGB with no normalisation).
        labels_file: maps class-folder names to class indices.
        threshold: the decision line on `ncscan.decide`'s log-size score (default
            DecideConfig.threshold); labels within DecideConfig.band of it are borderline.
        decision: the decision's constants (restarts, band, floor); default DecideConfig().
        seed: seeds initialisation and sampling (deterministic on CPU).
        device: "auto", "cpu" or "cuda".
        schedule: "fast" (default), "reference" (the original algorithm) or a ReverseConfig.
        labels: only reverse these labels (default: all). Statistics need >= 3.
        max_images: use at most this many clean images.
        prescreen: "auto" (on for more than 64 labels), "on" or "off". Pre-screening runs
            every label briefly, then fully optimises only the smallest-trigger labels plus
            an unbiased random sample that sets the median and MAD (K-Arm-style scheduling).
        progress: called after each optimisation step.
        should_stop: polled; when True the scan raises KeyboardInterrupt.
        runner: given the prepared model, returns a `ChunkRunner` that optimises the label
            chunks elsewhere (`ncscan.distributed.RayBackend.runner`); the statistics are
            still computed here once every chunk is back. None: optimise locally.
        force: scan even when the clean accuracy is near chance or the predictions
            collapse onto one class (otherwise a DataError before any optimisation).
        output_name: the graph output holding the class scores (default: the only
            output shaped [N, classes]; a model with several such outputs is refused).
        resize: how images of another size are fitted: "squash" or "shorter-crop"
            (default: the model's `ncscan.resize` metadata, else squash).
        load_progress: called as (decoded, to decode) while image files are decoded.

    Returns:
        The ScanReport.

    Raises:
        NcscanError subclasses for user mistakes.
    """
    dcfg = _decision_config(decision, threshold)
    t0 = time.perf_counter()
    mem0 = memory_start(resolve_device(device))
    opts = input_options(
        inputs, pixel_range=pixel_range, mean=mean, std=std, channel_order=channel_order, layout=layout,
        labels_file=labels_file, max_images=max_images, output_name=output_name, resize=resize,
    )
    prep = prepare(model, data, inputs=opts, device=device, seed=seed, force=force, load_progress=load_progress)
    t_prep = time.perf_counter() - t0
    cfg = preset(schedule) if isinstance(schedule, str) else schedule
    todo = _labels_to_reverse(prep.num_classes, labels)
    torch.manual_seed(seed)
    chunk_runner = runner(prep) if runner is not None else None
    run = dict(progress=progress, should_stop=should_stop, runner=chunk_runner)
    t1 = time.perf_counter()
    first = _first_runs(prep, todo, cfg, seed, prescreen, **run)
    t_rev = time.perf_counter() - t1
    runs, extra = _restarts(
        prep, todo, first.traces, cfg, dcfg, seed, **run,
        reference=first.reference, screened=first.screened_out,
    )
    t_confirm = time.perf_counter() - t1 - t_rev
    asr = _attack_success(prep, [_size_run(runs[t], dcfg.size_of_runs) for t in todo], first.screened_out)
    report = build_report(
        prep, [runs[t] for t in todo], asr, dcfg=dcfg, seed=seed, cfg=cfg,
        reference=first.reference, screened=first.screened_out,
    )
    report.passes = first.passes + extra
    if prescreen == "on" and first.reference is None:
        report.warnings.append(prescreen_unused_note(len(todo)))
    if chunk_runner is not None:
        report.device = str(getattr(chunk_runner, "device_name", report.device))
    report.timings = {"prepare": t_prep, "reverse": t_rev, "restarts": t_confirm, "total": time.perf_counter() - t0}
    report.memory = {
        **memory_peak(prep.device, mem0),
        "plan": memory_plan(prep.pixel_model, prep.x, cfg, prep.device).to_dict(),
    }
    report.elapsed_seconds = time.perf_counter() - t0
    return report


def _decision_config(decision: DecideConfig | None, threshold: float | None) -> DecideConfig:
    """The decision's constants, with --threshold (when given) as the decision line."""
    dcfg = decision or DecideConfig()
    if threshold is None:
        return dcfg
    if not (threshold > 0):
        raise ConfigError(f"--threshold must be positive, got {threshold}")
    return replace(dcfg, threshold=float(threshold))


def _labels_to_reverse(k: int, labels: Sequence[int] | None) -> list[int]:
    todo = list(range(k)) if labels is None else sorted(set(int(v) for v in labels))
    bad = [v for v in todo if v < 0 or v >= k]
    if bad:
        raise ConfigError(f"--label {bad[0]} is out of range; the model has {k} classes (0..{k - 1})")
    return todo


@dataclass
class _FirstRuns:
    traces: list[LabelTrace]
    passes: int
    reference: set[int] | None = None  # the pre-screening sample that sets the statistics
    screened_out: set[int] = field(default_factory=set)


def _first_runs(
    prep: Prepared, todo: list[int], cfg: ReverseConfig, seed: int, prescreen: str, **run: Any
) -> _FirstRuns:
    """One run per label: pre-screened (many labels) or every label fully optimised."""
    if prescreen_applies(prescreen, len(todo)):
        sc = prescreened(prep.pixel_model, prep.x, prep.y, todo, cfg, seed=seed, device=prep.device, **run)
        return _FirstRuns(sc.traces, sc.passes, sc.reference, sc.screened_out)
    traces, info = reverse_engineer(prep.pixel_model, prep.x, prep.y, todo, cfg, seed=seed, device=prep.device, **run)
    return _FirstRuns(traces, int(info["passes"]))


def _attack_success(prep: Prepared, traces: list[LabelTrace], screened: set[int]) -> dict[int, float]:
    """Each label's trigger's attack success on the scan images. Screened-out labels only have
    a provisional trigger; measuring it on every image would cost as much as their whole
    stage-1 run, so a fixed subset is used."""
    full = {tr.label: tr.trigger for tr in traces if tr.label not in screened}
    asr = attack_success(prep.pixel_model, prep.x, prep.y, full, device=prep.device)
    part = {tr.label: tr.trigger for tr in traces if tr.label in screened}
    asr.update(attack_success(prep.pixel_model, prep.x, prep.y, part, device=prep.device,
                              max_images=PRESCREEN_ASR_IMAGES))
    return asr


def restart_seed(seed: int, round_: int, k: int) -> int:
    """Seed of restart k in round `round_` (distinct from every chunk seed of the scan)."""
    return seed * 7_919 + 100_000 * (round_ + 1) + k + 1


def _l1(tr: LabelTrace) -> float:
    return float(tr.trigger.l1) if tr.working else float("nan")


def _restarts(
    prep: Prepared,
    todo: list[int],
    traces: list[LabelTrace],
    cfg: ReverseConfig,
    dcfg: DecideConfig,
    seed: int,
    progress: Callable[[Progress], None] | None,
    should_stop: Callable[[], bool] | None,
    *,
    runner: ChunkRunner | None,
    reference: set[int] | None,
    screened: set[int],
) -> tuple[dict[int, list[LabelTrace]], int]:
    """Re-optimise, from other random starts and image orders, the labels whose evidence is
    near the line (`ncscan.decide.needs_restart`): first `dcfg.restarts` runs for every label
    within reach of it, then `dcfg.recheck_restarts` more for those still borderline. Labels
    far from the line keep their single run, so a clean model with no near label costs nothing.

    Returns:
        (every label's runs, first run first; image passes spent)
    """
    runs = {tr.label: [tr] for tr in traces}
    ref_mask = None if reference is None else np.array([t in reference for t in todo])
    passes = 0
    for rnd, n in enumerate((dcfg.restarts, dcfg.recheck_restarts)):
        near = needs_restart(
            [[_l1(tr) for tr in runs[t]] for t in todo], dcfg, reference=ref_mask,
            compact=[_compactness(runs[t], dcfg) for t in todo],
        )
        labs = [todo[i] for i in near if todo[i] not in screened and (rnd == 0) == (len(runs[todo[i]]) == 1)]
        for k in range(n if labs else 0):
            got, info = reverse_engineer(
                prep.pixel_model, prep.x, prep.y, labs, cfg, seed=restart_seed(seed, rnd, k),
                device=prep.device, progress=progress, should_stop=should_stop, runner=runner,
            )
            passes += int(info["passes"])
            for tr in got:
                runs[tr.label].append(tr)
    return runs, passes


def _size_run(runs: list[LabelTrace], how: str = "median") -> LabelTrace:
    """The run that stands for the label (its trigger is the one reported and patched with):
    the working run whose L1 is the label's size, the (lower) median or the minimum."""
    ok = sorted((tr for tr in runs if tr.working), key=lambda tr: tr.trigger.l1)
    if not ok:
        return runs[0]
    return ok[0] if how == "min" else ok[(len(ok) - 1) // 2]


def _compactness(runs: list[LabelTrace], dcfg: DecideConfig) -> float:
    """`ncscan.decide.compactness` of the run that gives the label its size (NaN: none worked)."""
    tr = _size_run(runs, dcfg.size_of_runs)
    return compactness(tr.trigger.mask, dcfg.compact_window) if tr.working else float("nan")


def _consistency(runs: list[LabelTrace]) -> float | None:
    """Mean pairwise cosine similarity of the working runs' masks (None with < 2)."""
    ms = [tr.trigger.mask.ravel().astype(np.float64) for tr in runs if tr.working]
    if len(ms) < 2:
        return None
    sims = [
        float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
        for i, a in enumerate(ms) for b in ms[i + 1:]
    ]
    return float(np.mean(sims))


def build_report(
    prep: Prepared,
    runs: list[list[LabelTrace]],
    asr: dict[int, float],
    *,
    dcfg: DecideConfig,
    seed: int,
    cfg: ReverseConfig,
    reference: set[int] | None = None,
    screened: set[int] | None = None,
) -> ScanReport:
    """Decision, statistics and the report from every label's runs (first run first)."""
    screened = screened or set()
    traces = [_size_run(r, dcfg.size_of_runs) for r in runs]
    labs = [tr.label for tr in traces]
    ref_mask = None if reference is None else np.array([t in reference for t in labs])
    eligible = np.array([t not in screened for t in labs])
    compact = [_compactness(r, dcfg) for r in runs]
    sizes = [[_l1(tr) for tr in r] for r in runs]
    liken = _likeness(prep, traces, sizes, dcfg, ref_mask)
    d = decide(sizes, dcfg, reference=ref_mask, eligible=eligible, compact=compact, likeness=liken)
    paper = anomaly_indices(d.size, threshold=2.0, reference=ref_mask)
    names = _class_names(prep)
    results = [
        LabelResult(
            label=tr.label,
            name=names[tr.label] if names is not None and tr.label < len(names) else None,
            trigger=tr.trigger,
            mask_l1=float(d.size[i]) if np.isfinite(d.size[i]) else float(tr.trigger.l1),
            attack_success=float(asr.get(tr.label, float("nan"))),
            anomaly_index=float(paper.anomaly_index[i]),
            steps=sum(r.steps for r in runs[i]),
            working=bool(np.isfinite(d.size[i])),
            early_stopped=tr.early_stopped,
            flagged=i in d.flagged,
            screened_out=tr.label in screened,
            score=float(d.score[i]),
            run_l1=tuple(_l1(r) for r in runs[i]),
            consistency=_consistency(runs[i]),
            decision=_label_decision(i, d, screened, tr.label),
            compactness=compact[i],
            line=float(d.line[i]),
            evidence=_evidence(float(d.line[i]), dcfg),
            likeness=float("nan") if liken is None else liken[i],
        )
        for i, tr in enumerate(traces)
    ]
    reasons = [_reason(v, d, labs, cfg, dcfg) for v in d.reasons]
    verdict = d.verdict
    if prep.doubt is not None:
        # --force scanned data the model does not understand: the evidence is reported, but it
        # cannot support a verdict either way.
        verdict = "inconclusive"
        reasons.insert(0, "the data cannot support a verdict (scanned with --force): " + prep.doubt.split("; or pass")[0])
    return ScanReport(
        model=str(prep.onnx.path),
        model_sha256=prep.onnx.sha256,
        verdict=verdict,
        flagged=[labs[i] for i in d.flagged],
        threshold=dcfg.threshold,
        labels=results,
        median_l1=paper.median,
        mad=paper.mad,
        clean_accuracy=prep.clean_accuracy,
        preprocess=prep.preprocess,
        preprocess_source=prep.preprocess_source,
        output=prep.output,
        num_classes=prep.num_classes,
        input_shape=[prep.onnx.input.channels, int(prep.x.shape[2]), int(prep.x.shape[3])],
        seed=seed,
        device=str(prep.device),
        config=cfg,
        parity=prep.parity,
        n_images=len(prep.data),
        elapsed_seconds=0.0,
        timings={},
        passes=0,
        warnings=list(prep.warnings),
        reasons=reasons,
        decide_config=dcfg,
        borderline=[labs[i] for i in d.borderline],
        margin=None if verdict == "inconclusive" else verdict_margin(d, dcfg, eligible),
        paper_flagged=[labs[i] for i in paper.flagged if labs[i] not in screened],
        score_center=d.center,
        score_scale=d.scale,
        resize=dict(prep.resize),
    )


def verdict_margin(d: Decision, dcfg: DecideConfig, eligible: np.ndarray) -> float | None:
    """How far the verdict sits from the line, in score units: for a backdoor, the weakest
    flagged label's margin (score minus its line); for a clean model, minus the largest
    eligible margin (how far the nearest label stays below its line). None when inconclusive."""
    m = d.margin()
    if d.verdict == "backdoor":
        return float(min(m[i] for i in d.flagged))
    sc = m[eligible & np.isfinite(m)]
    if d.verdict == "clean" and len(sc):
        return float(-sc.max())
    return None


LIKENESS_SAMPLE = 64  # at most this many labels set resemblance's median (plus every near one)


def _likeness(
    prep: Prepared, traces: list[LabelTrace], sizes: list[list[float]], dcfg: DecideConfig,
    reference: np.ndarray | None,
) -> list[float] | None:
    """`ncscan.resemblance.likeness` per position (NaN where not measured), None when the model
    has no layer to read. Measured for every label that could be flagged on size (score above
    threshold - band) and for up to LIKENESS_SAMPLE others spread over the ranking, which set
    the median (all of them on models with at most that many labels)."""
    size = np.array([label_size(r, dcfg.size_of_runs) for r in sizes])
    score, _, _ = log_scores(size, scale_floor=dcfg.scale_floor, reference=reference)
    ok = [i for i in np.argsort(score) if np.isfinite(score[i]) and traces[i].working]
    pick = set(ok[:: max(1, -(-len(ok) // LIKENESS_SAMPLE))])
    pick |= {i for i in ok if score[i] > dcfg.threshold - dcfg.band}
    like = likeness(prep, {traces[i].label: traces[i].trigger for i in sorted(pick)})
    if like is None:
        return None
    return [like.get(tr.label, float("nan")) for tr in traces]


def _evidence(line: float, dcfg: DecideConfig) -> str:
    """What set a label's line: size alone, or shape (lower) or resemblance (higher) beside it."""
    if line < dcfg.threshold:
        return "size+compact"
    return "size+natural" if line > dcfg.threshold else "size"


def _label_decision(i: int, d: Decision, screened: set[int], label: int) -> str:
    if label in screened:
        return "screened_out"
    if i in d.flagged:
        return "flagged"
    if i in d.borderline:
        return "borderline"
    return "clear" if np.isfinite(d.score[i]) else "no_trigger"


def _reason(code: str, d: Decision, labs: list[int], cfg: ReverseConfig, dcfg: DecideConfig) -> str:
    """Decision reason codes as sentences for the user."""
    if code == "not_found":
        miss = [labs[i] for i in range(len(labs)) if not np.isfinite(d.size[i])]
        return (
            f"no trigger reached {cfg.schedule.attack_succ_threshold:.0%} attack success for "
            f"label(s) {', '.join(map(str, miss[:10]))} within {cfg.max_steps} steps"
        )
    if code == "borderline":
        parts = [f"{labs[i]} (score {d.score[i]:.2f})" for i in d.borderline[:5]]
        return (
            f"label(s) {', '.join(parts)} stayed within {dcfg.band:g} of the threshold "
            f"{dcfg.threshold:g} after {1 + dcfg.restarts + dcfg.recheck_restarts} runs: their "
            "triggers are small but not clearly abnormal, so the model can't be called clean or "
            "infected; inspect them with --triggers, or scan with more clean images"
        )
    return code


def _class_names(prep: Prepared) -> list[str] | None:
    """Class names from the model's metadata, else from the data's folders."""
    meta_names = prep.onnx.metadata.get("ncscan.class_names")
    if meta_names:
        try:
            parsed = json.loads(meta_names)
            if isinstance(parsed, list) and len(parsed) == prep.num_classes:
                return [str(v) for v in parsed]
        except ValueError:
            pass
    return prep.data.class_names
