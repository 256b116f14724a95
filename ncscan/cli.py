"""The ncscan command line. The ONLY module that prints or chooses exit codes.

Exit codes (the CI-gate contract):
  0  clean (scan) / written (patch, export)
  1  backdoor found (scan) / the patched model failed its guard (patch)
  2  usage or input error: one line on stderr, no traceback (--debug shows it)
  3  internal error (a bug in ncscan)
  4  inconclusive scan: some labels never reached a working trigger
  130 interrupted (Ctrl-C / SIGTERM); nothing partial is written
"""

from __future__ import annotations

import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import __version__
from .cli_common import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    BatchSizeOpt,
    Bgr,
    ConfigOpt,
    DataOpt,
    DebugOpt,
    Device,
    DeviceOpt,
    ExitZeroOpt,
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
    floats,
    install_sigterm,
    progress_bar,
    require_paths,
    resolve_format,
    scan_kwargs,
    stderr_console,
    verdict_exit,
    write_rendered,
)
from .cli_many import scan_many_cmd
from .cli_patch import patch_cmd
from .errors import NcscanError

COMMANDS = ("scan", "scan-many", "patch", "export", "version")


app = typer.Typer(
    name="ncscan",
    help="Find and patch backdoors in ONNX image classifiers (Neural Cleanse).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command("scan", short_help="Scan a model for backdoors (the default command).")
def scan_cmd(
    model: Annotated[Path, typer.Argument(help="The ONNX model to scan.", show_default=False)],
    data: DataOpt,
    labels: LabelsOpt = None,
    pixel_range: Pixel = None,
    mean: Mean = None,
    std: Std = None,
    bgr: Bgr = None,
    layout: LayoutOpt = None,
    output_name: OutputNameOpt = None,
    threshold: ThresholdOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
    fmt: Annotated[Optional[Format], typer.Option("--format", "-f", help="table (human, stderr), json or sarif (stdout unless --output). Default: from --output's extension, else table.", case_sensitive=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the report to this file (atomically).")] = None,
    triggers: Annotated[Optional[Path], typer.Option("--triggers", help="Write mask/pattern/trigger PNGs (enlarged to about 224 px) and .npz into this directory: every label up to 30 labels, else the flagged/borderline labels and the top suspects (--all-labels: every label).")] = None,
    all_labels: Annotated[bool, typer.Option("--all-labels", help="Every label in the table and in --triggers (default above 30 labels: flagged/borderline labels, the 10 smallest triggers and a summary line; JSON always has every label).")] = False,
    resize: ResizeOpt = None,
    schedule: ScheduleOpt = Schedule.fast,
    max_steps: MaxStepsOpt = None,
    batch_size: BatchSizeOpt = None,
    label_chunk: LabelChunkOpt = None,
    max_images: MaxImagesOpt = 2000,
    prescreen: PrescreenOpt = None,
    config: ConfigOpt = None,
    exit_zero: ExitZeroOpt = False,
    force: ForceOpt = False,
    ray: RayOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> int:
    """Scan MODEL for backdoors (the default command: `ncscan MODEL --data DIR`)."""
    require_paths(model, data)  # before the imports below load torch
    from .io import check_output_path
    from .scanner import scan

    err = stderr_console(quiet)
    fmt = resolve_format(fmt, output)
    if output is not None:
        check_output_path(output, [model, data])
    if triggers is not None:
        check_output_dir(triggers, "--triggers", [model, data], writes_images=True)
    kwargs = scan_kwargs(
        pixel_range=pixel_range, mean=mean, std=std, bgr=bgr, layout=layout, labels=labels,
        threshold=threshold, seed=seed, device=device, schedule=schedule, config=config,
        max_steps=max_steps, batch_size=batch_size, label_chunk=label_chunk, max_images=max_images,
        prescreen=prescreen, force=force, output_name=output_name,
        resize=resize.value if resize is not None else None,
    )
    backend = connect_ray(ray)  # before any work: a bad address fails in seconds
    with _scan_progress(err, not quiet) as (on_progress, on_load):
        try:
            report = scan(model, data, **kwargs, progress=on_progress,
                          runner=backend.runner if backend is not None else None, load_progress=on_load)
        finally:
            if backend is not None:
                backend.close()
    _write_scan_outputs(report, fmt, output, triggers, err, quiet, all_labels)
    return verdict_exit(report.verdict, exit_zero)


@contextmanager
def _scan_progress(
    err: Any, enabled: bool
) -> Iterator[tuple[Callable[[Any], None], Callable[[int, int], None]]]:
    """Progress callbacks for `scan` (reversal steps; images decoded) that drive rich bars
    on a terminal (no-ops elsewhere): a loading bar while images are decoded, then the
    reversal bar from the first optimisation step."""
    if progress_bar(err, enabled) is None:
        yield (lambda p: None), (lambda done, total: None)
        return
    bars: dict[str, tuple[Any, Any]] = {}

    def on_load(done: int, total: int) -> None:
        if "load" not in bars:
            bar = progress_bar(err, enabled, kind="load")
            bar.start()
            bars["load"] = (bar, bar.add_task("load", total=total))
        bar, task = bars["load"]
        bar.update(task, completed=done, total=total)
        if done >= total:
            bar.stop()

    def on_scan(p: Any) -> None:
        if "load" in bars:
            bars.pop("load")[0].stop()
        if "scan" not in bars:
            bar = progress_bar(err, enabled)
            bar.start()
            bars["scan"] = (bar, bar.add_task("scan", total=None, step=0, active=0))
        bar, task = bars["scan"]
        bar.update(task, total=p.labels_total, completed=p.labels_done, step=p.step, active=p.active)

    try:
        yield on_scan, on_load
    finally:
        for bar, _task in bars.values():
            bar.stop()


def _write_scan_outputs(
    report: Any, fmt: Format, output: Optional[Path], triggers: Optional[Path], err: Any, quiet: bool,
    all_labels: bool = False,
) -> None:
    """Trigger images, the report file or stdout document, and the human view on stderr."""
    from .report import render_table, render_verdict, report_json, sarif_text, write_triggers

    if triggers is not None:
        write_triggers(report, triggers, all_labels=all_labels)
    if fmt == Format.table:
        if output is not None:
            write_rendered(output, lambda c: render_table(report, c, all_labels=all_labels), width=120)
        render_table(report, err, all_labels=all_labels)
        return
    emit(report_json(report) if fmt == Format.json else sarif_text(report), output)
    if quiet:
        return
    if output is not None or err.is_terminal:
        render_table(report, err, all_labels=all_labels)
    else:  # a CI log: the warnings and the one-line verdict, not the whole table
        for w in report.warnings:
            err.print(f"warning: {w}")
        render_verdict(report, err)


class Framework(str, Enum):
    keras = "keras"
    torch = "torch"


@app.command("export", short_help="Export a Keras/PyTorch model file to ONNX.")
def export_cmd(
    source: Annotated[Path, typer.Argument(help="Keras .keras/.h5 or SavedModel dir; TorchScript file or torch.export .pt2.", show_default=False)],
    framework: Annotated[Framework, typer.Option("--from", help="The framework the model comes from.", case_sensitive=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .onnx file to write (atomically; never the source).")],
    pixel_range: Pixel = None,
    mean: Mean = None,
    std: Std = None,
    bgr: Bgr = None,
    class_names: Annotated[Optional[Path], typer.Option("--class-names", help="File of class names: JSON list or one per line.")] = None,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="Per-image input shape, e.g. 1,28,28 (C,H,W for torch; H,W,C for Keras). Needed for TorchScript.")] = None,
    opset: Annotated[Optional[int], typer.Option("--opset", help="Target ONNX opset (default 17).")] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> int:
    """Export a framework model file to ONNX with its preprocessing in the metadata."""
    from .adapters import export_file

    pr = floats(pixel_range, "--pixel-range", 2)
    res = export_file(
        framework.value,
        source,
        output,
        pixel_range=(pr[0], pr[1]) if pr else (0.0, 1.0),
        mean=floats(mean, "--mean"),
        std=floats(std, "--std"),
        channel_order="BGR" if bgr else "RGB",
        class_names=class_names,
        input_shape=input_shape,
        opset=opset,
    )
    if not quiet:
        err = stderr_console()
        err.print(
            f"wrote {res.get('output')} (opset {res.get('opset')}, parity max diff "
            f"{res.get('max_parity_diff', float('nan')):.2e})"
        )
        for w in res.get("warnings", []) or []:
            err.print(f"[yellow]warning:[/] {w}")
    return 0


@app.command("version")
def version_cmd() -> int:
    """Print the ncscan version."""
    sys.stdout.write(f"ncscan {__version__}\n")
    return 0


app.command("patch", short_help="Mitigate a found backdoor; write ONNX.")(patch_cmd)

app.command("scan-many", short_help="Scan many models (locally or on Ray).")(scan_many_cmd)


# Frameworks that log or warn on stderr on their own (deprecations, oneDNN/absl notices,
# torch.export's failed-load tracebacks): outside --debug their lines must not precede or
# bury ncscan's own one-line messages.
_NOISY = r"(torch|torchvision|tensorflow|tf_keras|keras|tf2onnx|onnxscript|onnx2torch|jax|jaxlib|flax|absl|triton)(\.|$)"


def _quiet_frameworks() -> None:
    """Silence framework log noise before anything imports them (env) or, when one is
    already imported, through its logger. Values the user set are kept."""
    import logging
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ INFO/WARNING (oneDNN, cuda) lines
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if "torch" not in sys.modules:
        os.environ.setdefault("TORCH_LOGS", "-torch")  # torch's own loggers at ERROR
    for name in ("torch", "tensorflow", "absl", "tf2onnx", "onnxscript", "jax", "keras"):
        lg = logging.getLogger(name)
        if lg.level < logging.ERROR:
            lg.setLevel(logging.ERROR)


def _route(argv: list[str]) -> list[str]:
    """`ncscan MODEL ...` means `ncscan scan MODEL ...`."""
    if not argv:
        return argv
    first = argv[0]
    if first in COMMANDS or first in ("--help", "-h", "--version"):
        return argv
    return ["scan", *argv]


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: runs the app and maps outcomes to exit codes."""
    sys.exit(run(argv))


def run(argv: Optional[list[str]] = None) -> int:
    """Run the CLI and return the exit code (never raises)."""
    try:  # typer >= 0.29 vendors click as typer._click (without Abort); older typers use click
        from typer import _click as click
    except ImportError:  # pragma: no cover - depends on the installed typer
        import click  # type: ignore[no-redef]
    abort = getattr(click.exceptions, "Abort", KeyboardInterrupt)

    args = _route(list(sys.argv[1:] if argv is None else argv)) or ["--help"]
    if args[:1] == ["--version"]:
        sys.stdout.write(f"ncscan {__version__}\n")
        return 0
    debug = "--debug" in args
    # onnx2torch's Slice converter warns on every forward pass under torch >= 2.9; the
    # parity check already decides whether the converted graph is the model.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"onnx2torch\.")
    install_sigterm()
    if not debug:
        _quiet_frameworks()
    command = typer.main.get_command(app)
    try:
        with warnings.catch_warnings():
            if not debug:
                for cat in (FutureWarning, DeprecationWarning, UserWarning):
                    warnings.filterwarnings("ignore", category=cat, module=_NOISY)
            rv = command.main(args=args, prog_name="ncscan", standalone_mode=False)
    except NcscanError as e:
        if debug:
            traceback.print_exc()
        msg = str(e).replace("\n", " ").strip() or type(e).__name__
        sys.stderr.write(f"ncscan: error: {msg}\n")
        return e.exit_code
    except click.exceptions.UsageError as e:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"ncscan: error: {e.format_message()}")
        hint = f" (see 'ncscan {e.ctx.info_name} --help')" if e.ctx is not None and e.ctx.info_name and e.ctx.info_name != "ncscan" else " (see 'ncscan --help')"
        sys.stderr.write(hint + "\n")
        return EXIT_USAGE
    except click.exceptions.ClickException as e:
        sys.stderr.write(f"ncscan: error: {e.format_message()}\n")
        return EXIT_USAGE
    except (KeyboardInterrupt, abort):
        sys.stderr.write("ncscan: interrupted; no output was written\n")
        return EXIT_INTERRUPTED
    except MemoryError:
        if debug:
            traceback.print_exc()
        sys.stderr.write(
            "ncscan: error: out of memory; lower --label-chunk, --batch-size or --max-images\n"
        )
        return EXIT_USAGE
    except Exception as e:  # a bug: never exit 1, which means "backdoor"
        if debug:
            traceback.print_exc()
        sys.stderr.write(
            f"ncscan: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(run with --debug for the traceback and report it)\n"
        )
        return EXIT_INTERNAL
    if rv == EXIT_INTERRUPTED:
        sys.stderr.write("ncscan: interrupted; no output was written\n")
    if isinstance(rv, int):
        return rv
    return 0


if __name__ == "__main__":  # pragma: no cover
    main()
