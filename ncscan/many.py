"""Scan many models: one `ScanReport` per model, errors kept per model, combined documents.

`ncscan scan-many` is the command-line front (ncscan/cli_many.py). Without a backend the
models are scanned here one after another; with a `ncscan.distributed.RayBackend` several
models are in flight at once (one driver thread each, as many as the cluster has slots),
and each model's label chunks run as Ray tasks.

A model that fails (missing file, not ONNX, bad data, even a bug) becomes an error row; the
other models are still scanned. Only an interrupt stops the run.
"""

from __future__ import annotations

import glob
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError, NcscanError
from .inputs import InputOptions, input_options
from .scanner import ScanReport, scan

# The per-model keys a --models-file entry may set (the rest come from the command's flags).
JOB_KEYS = ("model", "data", "labels", "pixel_range", "mean", "std", "bgr", "layout", "output_name", "resize")


@dataclass(frozen=True)
class ModelJob:
    """One model to scan and the settings that differ from the run's defaults.

    Attributes:
        model: the .onnx file.
        data: its clean images (None: the run's --data).
        options: the job's own input options (`ncscan.inputs.InputOptions` fields:
            preprocessing, labels_file); they win over the run's.
    """

    model: str
    data: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelOutcome:
    """What happened to one model: a report, or an error (`error_kind` "user" | "internal")."""

    job: ModelJob
    report: ScanReport | None = None
    error: str | None = None
    error_kind: str | None = None
    seconds: float = 0.0

    @property
    def status(self) -> str:
        """"clean" | "backdoor" | "inconclusive" | "error"."""
        return self.report.verdict if self.report is not None else "error"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.job.model,
            "status": self.status,
            "verdict": None if self.report is None else self.report.verdict,
            "flagged": [] if self.report is None else list(self.report.flagged),
            "error": self.error,
            "error_kind": self.error_kind,
            "seconds": round(self.seconds, 3),
            "report": None if self.report is None else self.report.to_dict(),
        }


def expand_patterns(patterns: Sequence[str]) -> list[ModelJob]:
    """Model paths from shell-style patterns (sorted per pattern, duplicates dropped).

    A pattern without wildcards is kept as it is even when the file is missing, so the
    missing model becomes an error row; a wildcard pattern that matches nothing is an error.

    Raises:
        ConfigError: a wildcard pattern matched no file.
    """
    seen: set[str] = set()
    jobs: list[ModelJob] = []
    for pat in patterns:
        if glob.has_magic(pat):
            hits = sorted(p for p in glob.glob(pat, recursive=True) if not os.path.isdir(p))
            if not hits:
                raise ConfigError(f"pattern {pat!r} matches no file; check the path (quote it so the shell leaves it alone)")
        else:
            hits = [pat]
        for h in hits:
            key = os.path.abspath(h)
            if key not in seen:
                seen.add(key)
                jobs.append(ModelJob(model=h))
    return jobs


def _floats(v: Any, what: str) -> tuple[float, ...]:
    from .preprocess import parse_floats

    if isinstance(v, str):
        return parse_floats(v, what)
    if isinstance(v, (int, float)):
        return (float(v),)
    if isinstance(v, list) and all(isinstance(a, (int, float)) for a in v):
        return tuple(float(a) for a in v)
    raise ConfigError(f"{what} must be a number, a list of numbers or a string like '0,255'")


def read_models_file(path: str | os.PathLike[str]) -> list[ModelJob]:
    """Jobs from a JSON file: a list (or {"models": [...]}) of objects with `model` and
    optionally `data`, `labels`, `pixel_range`, `mean`, `std`, `bgr`, `layout`, `output_name`,
    `resize`. Relative paths are relative to the file.

    Raises:
        ConfigError: unreadable or malformed file.
    """
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read --models-file {p}: {e.strerror}") from e
    except ValueError as e:
        raise ConfigError(f"--models-file {p} is not valid JSON: {e}") from e
    items = obj.get("models") if isinstance(obj, dict) else obj
    if not isinstance(items, list):
        raise ConfigError(f"--models-file {p} must hold a list of {{\"model\": ...}} objects")
    base = p.parent
    jobs = []
    for i, it in enumerate(items):
        if isinstance(it, str):
            it = {"model": it}
        if not isinstance(it, dict) or not isinstance(it.get("model"), str):
            raise ConfigError(f"--models-file {p}: entry {i} needs a \"model\" path")
        unknown = sorted(set(it) - set(JOB_KEYS))
        if unknown:
            raise ConfigError(f"--models-file {p}: entry {i} has unknown key(s) {', '.join(unknown)}; known: {', '.join(JOB_KEYS)}")

        def rel(v: str) -> str:
            return v if os.path.isabs(v) else str(base / v)

        opts: dict[str, Any] = {}
        what = f"--models-file entry {i}"
        if "pixel_range" in it:
            opts["pixel_range"] = _floats(it["pixel_range"], f"{what} pixel_range")
        if "mean" in it:
            opts["mean"] = _floats(it["mean"], f"{what} mean")
        if "std" in it:
            opts["std"] = _floats(it["std"], f"{what} std")
        if "bgr" in it:
            opts["channel_order"] = "BGR" if it["bgr"] else "RGB"
        if "layout" in it:
            opts["layout"] = str(it["layout"]).upper()
        if "labels" in it:
            opts["labels_file"] = rel(str(it["labels"]))
        for k in ("output_name", "resize"):
            if k in it:
                opts[k] = str(it[k])
        jobs.append(ModelJob(model=rel(it["model"]), data=rel(str(it["data"])) if "data" in it else None, options=opts))
    return jobs


def run_inputs(scan_kwargs: dict[str, Any]) -> InputOptions:
    """Take the input options out of `scan_kwargs` (in place): `inputs=` with the individual
    keyword arguments (pixel_range, ...) on top, as `scan` would fold them."""
    names = {f.name for f in fields(InputOptions)}
    given = {k: scan_kwargs.pop(k) for k in list(scan_kwargs) if k in names}
    return input_options(scan_kwargs.pop("inputs", None), **given)


def scan_many(
    jobs: Sequence[ModelJob],
    *,
    data: str | os.PathLike[str] | None = None,
    backend: Any = None,
    parallel: int | None = None,
    on_start: Callable[[ModelJob], None] | None = None,
    on_done: Callable[[ModelOutcome], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    **scan_kwargs: Any,
) -> list[ModelOutcome]:
    """Scan every job's model; failures become error outcomes.

    Args:
        jobs: the models (see `expand_patterns`, `read_models_file`).
        data: clean images for jobs that name none.
        backend: a `ncscan.distributed.RayBackend`, or None to scan here one at a time.
        parallel: models in flight at once with a backend (default: the cluster's slots).
        on_start, on_done: called (from worker threads with a backend) per model.
        should_stop: polled; when True the run raises KeyboardInterrupt.
        **scan_kwargs: passed to `ncscan.scanner.scan` for every model; its input options
            (`inputs=` and the individual ones such as pixel_range) are merged into one
            InputOptions per job, with the job's own options on top.

    Returns:
        One outcome per job, in the jobs' order.
    """
    stop = threading.Event()
    base = run_inputs(scan_kwargs)

    def stopped() -> bool:
        return stop.is_set() or (should_stop is not None and should_stop())

    def one(job: ModelJob) -> ModelOutcome:
        if on_start is not None:
            on_start(job)
        t0 = time.perf_counter()
        out = ModelOutcome(job=job)
        try:
            d = job.data if job.data is not None else data
            if d is None:
                raise ConfigError(f"no --data for model {job.model}; pass --data DIR or give \"data\" in --models-file")
            out.report = scan(
                job.model, d, runner=backend.runner if backend is not None else None,
                should_stop=stopped, inputs=base.overridden(**job.options), **scan_kwargs,
            )
        except NcscanError as e:
            if e.exit_code == 130:
                raise
            out.error, out.error_kind = (str(e).replace("\n", " ").strip() or type(e).__name__), "user"
        except Exception as e:  # noqa: BLE001 - a bug on one model must not end the run
            first = (str(e).strip().splitlines() or [""])[0]
            out.error, out.error_kind = f"{type(e).__name__}: {first}".rstrip(": "), "internal"
        out.seconds = time.perf_counter() - t0
        if on_done is not None:
            on_done(out)
        return out

    if backend is None or len(jobs) <= 1:
        results = []
        for j in jobs:
            if stopped():
                raise KeyboardInterrupt
            results.append(one(j))
        return results
    n = max(1, min(len(jobs), parallel or backend.slots))
    outcomes: dict[int, ModelOutcome] = {}
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="ncscan-model") as pool:
        futs = {pool.submit(one, j): i for i, j in enumerate(jobs)}
        try:
            pending = set(futs)
            while pending:
                if should_stop is not None and should_stop():
                    raise KeyboardInterrupt
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for f in done:
                    outcomes[futs[f]] = f.result()
        except BaseException:
            stop.set()
            for f in futs:
                f.cancel()
            raise
    return [outcomes[i] for i in range(len(jobs))]


def overall(outcomes: Sequence[ModelOutcome]) -> str:
    """"backdoor" if any model is flagged, else "error" if any failed, else
    "inconclusive" if any is, else "clean"."""
    st = {o.status for o in outcomes}
    for s in ("backdoor", "error", "inconclusive"):
        if s in st:
            return s
    return "clean"


def combined_dict(outcomes: Sequence[ModelOutcome], *, ray: str | None = None, elapsed: float = 0.0) -> dict[str, Any]:
    """The combined JSON document: a summary plus every model's full report."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    return {
        "ncscan_version": __version__,
        "verdict": overall(outcomes),
        "flagged_models": [o.job.model for o in outcomes if o.status == "backdoor"],
        "counts": counts,
        "ray": ray,
        "elapsed_seconds": round(elapsed, 3),
        "models": [o.to_dict() for o in outcomes],
    }


def combined_json(outcomes: Sequence[ModelOutcome], **kw: Any) -> str:
    from .report import json_safe

    return json.dumps(json_safe(combined_dict(outcomes, **kw)), indent=2) + "\n"


def combined_sarif(outcomes: Sequence[ModelOutcome]) -> dict[str, Any]:
    """One SARIF 2.1.0 run (GitHub code scanning merges runs of one tool badly) holding the
    results of every model, each located at its model file; failed models are listed as
    error notifications of the run's invocation."""
    from .report import to_sarif

    base: dict[str, Any] | None = None
    results: list[dict[str, Any]] = []
    verdicts: dict[str, str] = {}
    notes: list[dict[str, Any]] = []
    for o in outcomes:
        verdicts[o.job.model] = o.status
        if o.report is None:
            notes.append({
                "level": "error",
                "message": {"text": f"{o.job.model}: {o.error}"},
                "locations": [{"physicalLocation": {"artifactLocation": {"uri": _uri(o.job.model)}}}],
            })
            continue
        doc = to_sarif(o.report, model_uri=_uri(o.job.model))
        if base is None:
            base = doc
        results.extend(doc["runs"][0]["results"])
    if base is None:
        # Every model failed: an empty run with the tool description still validates.
        from .report import SARIF_SCHEMA

        base = {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [_empty_run()]}
    run = base["runs"][0]
    run["results"] = results
    run["properties"] = {"verdict": overall(outcomes), "models": verdicts}
    run["invocations"] = [{"executionSuccessful": not notes, "toolExecutionNotifications": notes}]
    return base


def _empty_run() -> dict[str, Any]:
    from .report import sarif_driver

    return {"tool": {"driver": sarif_driver()}, "results": []}


def _uri(path: str) -> str:
    uri = path.replace(os.sep, "/")
    return uri[2:] if uri.startswith("./") else uri


def combined_sarif_text(outcomes: Sequence[ModelOutcome]) -> str:
    from .report import json_safe

    return json.dumps(json_safe(combined_sarif(outcomes)), indent=2) + "\n"


def report_names(outcomes: Sequence[ModelOutcome]) -> list[str]:
    """File names for the per-model reports: the model's stem, made unique."""
    used: set[str] = set()
    names = []
    for o in outcomes:
        stem = Path(o.job.model).stem or "model"
        name, n = f"{stem}.json", 1
        while name in used:
            n += 1
            name = f"{stem}-{n}.json"
        used.add(name)
        names.append(name)
    return names
