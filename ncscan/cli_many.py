"""`ncscan scan-many`: scan many models, one report each, a summary table, combined JSON/SARIF.

Registered in cli.py with `app.command("scan-many")(scan_many_cmd)`; options and output helpers come from cli_common.py.
Exit codes: 1 if any model is flagged; else 3 if a model hit an internal error, 2 if a
model failed on bad input, 4 if any scan is inconclusive, 0 when all are clean (0 always
with --exit-zero); 2 for bad flags; 130 interrupted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .cli_common import (
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
    ForceOpt,
    Format,
    LabelChunkOpt,
    LabelsOpt,
    LayoutOpt,
    MaxImagesOpt,
    MaxStepsOpt,
    Mean,
    OutputNameOpt,
    Pixel,
    PrescreenOpt,
    QuietOpt,
    RayOpt,
    ResizeOpt,
    Schedule,
    ScheduleOpt,
    SeedOpt,
    Std,
    ThresholdOpt,
    check_output_dir,
    connect_ray,
    emit,
    resolve_format,
    scan_kwargs,
    stderr_console,
    write_rendered,
)
from .errors import ConfigError


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
    models_file: Annotated[Optional[Path], typer.Option("--models-file", help="JSON list of {model, data, labels, pixel_range, mean, std, bgr, layout, output_name, resize} entries, scanned after the PATTERNs; paths relative to the file.")] = None,
    labels: LabelsOpt = None,
    pixel_range: Pixel = None,
    mean: Mean = None,
    std: Std = None,
    bgr: Bgr = None,
    layout: LayoutOpt = None,
    output_name: OutputNameOpt = None,
    resize: ResizeOpt = None,
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
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> int:
    """Scan many models (locally one after another, or on a Ray cluster with --ray)."""
    from .io import check_output_path
    from .many import expand_patterns, read_models_file, scan_many

    err = stderr_console(quiet)
    jobs = expand_patterns(patterns or [])
    if models_file is not None:
        jobs += read_models_file(models_file)
    if not jobs:
        raise ConfigError("no models given; pass ONNX files or patterns, or --models-file FILE")
    if data is None and any(j.data is None for j in jobs):
        raise ConfigError("--data is required for models that a --models-file entry gives no data for")
    fmt = resolve_format(fmt, output)
    inputs = [Path(j.model) for j in jobs] + ([data] if data is not None else [])
    if output is not None:
        check_output_path(output, inputs)
    if report_dir is not None:
        check_output_dir(report_dir, "--report-dir", inputs, writes_images=False)
    kwargs = scan_kwargs(
        pixel_range=pixel_range, mean=mean, std=std, bgr=bgr, layout=layout, labels=labels,
        threshold=threshold, seed=seed, device=device, schedule=schedule, config=config,
        max_steps=max_steps, batch_size=batch_size, label_chunk=label_chunk, max_images=max_images,
        prescreen=prescreen, force=force, output_name=output_name,
        resize=resize.value if resize is not None else None,
    )
    backend = connect_ray(ray)
    t0 = time.perf_counter()
    try:
        outcomes = scan_many(jobs, data=data, backend=backend, on_done=_progress_line(err, fmt, quiet), **kwargs)
    finally:
        if backend is not None:
            backend.close()
    _write_many_outputs(outcomes, fmt, output, report_dir, err, quiet, ray=ray, elapsed=time.perf_counter() - t0)
    return 0 if exit_zero else many_exit(outcomes)


def _progress_line(err: Any, fmt: Format, quiet: bool) -> Any:
    """on_done: each model's table (table format) or one line as it finishes."""
    from .report import render_table

    def on_done(o: Any) -> None:
        if quiet:
            return
        if o.report is not None and fmt == Format.table:
            render_table(o.report, err)
        else:
            err.print(f"{o.job.model}: {o.status}" + (f" ({o.error})" if o.error else "") + f" · {o.seconds:.1f}s")

    return on_done


def _write_many_outputs(
    outcomes: list[Any], fmt: Format, output: Optional[Path], report_dir: Optional[Path], err: Any,
    quiet: bool, *, ray: Optional[str], elapsed: float,
) -> None:
    """Per-model JSON reports, the combined document (or summary table file), the summary."""
    from .io import atomic_write_bytes
    from .many import combined_json, combined_sarif_text, report_names
    from .report import report_json

    if report_dir is not None:
        report_dir.mkdir(exist_ok=True)
        for o, name in zip(outcomes, report_names(outcomes)):
            if o.report is not None:
                atomic_write_bytes(report_dir / name, report_json(o.report).encode())
    if fmt == Format.table:
        if output is not None:
            write_rendered(output, lambda c: render_summary(outcomes, c), width=160)
    else:
        emit(combined_json(outcomes, ray=ray, elapsed=elapsed) if fmt == Format.json else combined_sarif_text(outcomes), output)
    if not quiet:
        render_summary(outcomes, err)


def many_exit(outcomes: list[Any]) -> int:
    """1 if any model is flagged; else 3 internal error, 2 bad input, 4 inconclusive, 0 clean."""
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
