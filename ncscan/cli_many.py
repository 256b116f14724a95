"""`ncscan scan-many`: scan many models, one report each, a summary table, combined JSON/SARIF.

Registered in cli.py with `app.command("scan-many")(scan_many_cmd)`.
Exit codes: 1 if any model is flagged; else 3 if a model hit an internal error, 2 if a
model failed on bad input, 4 if any scan is inconclusive, 0 when all are clean (0 always
with --exit-zero); 2 for bad flags; 130 interrupted.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .cli import (
    EXIT_BACKDOOR,
    EXIT_CLEAN,
    EXIT_INCONCLUSIVE,
    EXIT_INTERNAL,
    EXIT_USAGE,
    BatchSizeOpt,
    Bgr,
    ConfigOpt,
    DebugOpt,
    Device,
    DeviceOpt,
    Format,
    LabelChunkOpt,
    LabelsOpt,
    LayoutOpt,
    MaxImagesOpt,
    MaxStepsOpt,
    Mean,
    Pixel,
    PrescreenOpt,
    QuietOpt,
    RayOpt,
    Schedule,
    ScheduleOpt,
    SeedOpt,
    Std,
    ThresholdOpt,
    _load_config,
    _preprocess_kwargs,
    _reverse_config,
    _stderr_console,
)
from .errors import ConfigError, OutputError


def render_summary(outcomes: list[Any], console: Any) -> None:
    """The summary table on a rich console: one row per model."""
    from rich.table import Table

    t = Table(title=f"ncscan scan-many · {len(outcomes)} model(s)", title_justify="left")
    t.add_column("model", overflow="fold", min_width=20)
    t.add_column("verdict", no_wrap=True)
    t.add_column("flagged")
    t.add_column("classes", justify="right")
    t.add_column("seconds", justify="right")
    t.add_column("error", overflow="fold")
    for o in outcomes:
        r = o.report
        style = {"backdoor": "bold red", "error": "magenta", "inconclusive": "yellow"}.get(o.status, "")
        t.add_row(
            o.job.model,
            o.status.upper() if o.status != "clean" else "clean",
            "" if r is None else ", ".join(map(str, r.flagged)),
            "" if r is None else str(r.num_classes),
            f"{o.seconds:.1f}",
            o.error or "",
            style=style,
        )
    console.print(t)


def scan_many_cmd(
    patterns: Annotated[Optional[list[str]], typer.Argument(help="ONNX files or glob patterns (quote them), e.g. 'models/*.onnx'.", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Clean images for every model (a --models-file entry may name its own).")] = None,
    models_file: Annotated[Optional[Path], typer.Option("--models-file", help="JSON list of {model, data, labels, pixel_range, mean, std, bgr, layout} entries, scanned after the PATTERNs; paths relative to the file.")] = None,
    labels: LabelsOpt = None,
    pixel_range: Pixel = None,
    mean: Mean = None,
    std: Std = None,
    bgr: Bgr = None,
    layout: LayoutOpt = None,
    threshold: ThresholdOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
    fmt: Annotated[Optional[Format], typer.Option("--format", "-f", help="table (summary on stderr), json or sarif: the combined document (stdout unless --output). Default: from --output's extension, else table.", case_sensitive=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the combined JSON/SARIF (or the summary table) to this file.")] = None,
    report_dir: Annotated[Optional[Path], typer.Option("--report-dir", help="Write one JSON report per model into this directory (<model stem>.json).")] = None,
    schedule: ScheduleOpt = Schedule.fast,
    max_steps: MaxStepsOpt = None,
    batch_size: BatchSizeOpt = None,
    label_chunk: LabelChunkOpt = None,
    max_images: MaxImagesOpt = 2000,
    prescreen: PrescreenOpt = None,
    config: ConfigOpt = None,
    ray: RayOpt = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Exit 0 whatever the verdicts.")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> int:
    """Scan many models (locally one after another, or on a Ray cluster with --ray)."""
    from .io import atomic_write_bytes, atomic_write_text, check_output_path
    from .many import (
        combined_json,
        combined_sarif_text,
        expand_patterns,
        read_models_file,
        report_names,
        scan_many,
    )
    from .report import render_table, report_json

    err = _stderr_console(quiet)
    jobs = expand_patterns(patterns or [])
    if models_file is not None:
        jobs += read_models_file(models_file)
    if not jobs:
        raise ConfigError("no models given; pass ONNX files or patterns, or --models-file FILE")
    if data is None and any(j.data is None for j in jobs):
        raise ConfigError("--data is required for models that a --models-file entry gives no data for")
    if fmt is None:
        suffix = output.suffix.lower() if output is not None else ""
        fmt = Format.sarif if suffix == ".sarif" else Format.json if suffix == ".json" else Format.table
    if output is not None:
        check_output_path(output, [j.model for j in jobs] + ([data] if data is not None else []))
    if report_dir is not None:
        if report_dir.exists() and not report_dir.is_dir():
            raise OutputError(f"--report-dir {report_dir} exists and is not a directory")
        parent = report_dir.parent if str(report_dir.parent) else Path(".")
        if not parent.is_dir():
            raise OutputError(f"--report-dir parent directory {parent} does not exist; create it first")
    cfg = _reverse_config(
        schedule, _load_config(config), max_steps=max_steps, batch_size=batch_size, label_chunk=label_chunk
    )
    backend = None
    if ray is not None:
        from .distributed import connect

        backend = connect(ray)

    def on_done(o: Any) -> None:
        if quiet:
            return
        if o.report is not None and fmt == Format.table:
            render_table(o.report, err)
        else:
            err.print(f"{o.job.model}: {o.status}" + (f" ({o.error})" if o.error else "") + f" · {o.seconds:.1f}s")

    t0 = time.perf_counter()
    try:
        outcomes = scan_many(
            jobs,
            data=data,
            backend=backend,
            on_done=on_done,
            **_preprocess_kwargs(pixel_range, mean, std, bgr, layout, labels),
            threshold=threshold,
            seed=seed,
            device=device.value,
            schedule=cfg,
            max_images=max_images,
            prescreen=(prescreen.value if prescreen is not None else "auto"),
        )
    finally:
        if backend is not None:
            backend.close()
    elapsed = time.perf_counter() - t0
    if report_dir is not None:
        report_dir.mkdir(exist_ok=True)
        for o, name in zip(outcomes, report_names(outcomes)):
            if o.report is not None:
                atomic_write_bytes(report_dir / name, report_json(o.report).encode())
    if fmt == Format.table:
        if output is not None:
            import io

            from rich.console import Console

            buf = io.StringIO()
            render_summary(outcomes, Console(file=buf, width=160, color_system=None, force_terminal=False))
            atomic_write_text(output, buf.getvalue())
        if not quiet:
            render_summary(outcomes, err)
    else:
        text = combined_json(outcomes, ray=ray, elapsed=elapsed) if fmt == Format.json else combined_sarif_text(outcomes)
        if output is not None:
            atomic_write_text(output, text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
        if not quiet:
            render_summary(outcomes, err)
    if exit_zero:
        return EXIT_CLEAN
    status = {o.status for o in outcomes}
    if "backdoor" in status:
        return EXIT_BACKDOOR
    if any(o.error_kind == "internal" for o in outcomes):
        return EXIT_INTERNAL
    if "error" in status:
        return EXIT_USAGE
    if "inconclusive" in status:
        return EXIT_INCONCLUSIVE
    return EXIT_CLEAN
