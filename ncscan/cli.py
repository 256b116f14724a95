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

import json
import signal
import sys
import traceback
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import __version__
from .errors import ConfigError, NcscanError, OutputError

EXIT_CLEAN = 0
EXIT_BACKDOOR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INCONCLUSIVE = 4
EXIT_INTERRUPTED = 130

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


class Format(str, Enum):
    table = "table"
    json = "json"
    sarif = "sarif"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Layout(str, Enum):
    NCHW = "NCHW"
    NHWC = "NHWC"


class Prescreen(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class Schedule(str, Enum):
    fast = "fast"
    reference = "reference"


def _stderr_console(quiet: bool = False) -> Any:
    from rich.console import Console

    c = Console(stderr=True, quiet=quiet, highlight=False, soft_wrap=False)
    # In a CI log or a file a message stays one line, however long (grep-able); tables
    # still fit the width.
    c.soft_wrap = not c.is_terminal
    return c


def _floats(text: Optional[str], what: str, n: Optional[int] = None) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    from .preprocess import parse_floats

    vals = parse_floats(text, what)
    if n is not None and len(vals) != n:
        raise ConfigError(f"{what} takes {n} numbers, got {len(vals)} ({text!r}); e.g. 0,255")
    return vals


def _preprocess_kwargs(
    pixel_range: Optional[str],
    mean: Optional[str],
    std: Optional[str],
    bgr: Optional[bool],
    layout: Optional["Layout"],
    labels: Optional[Path],
) -> dict[str, Any]:
    """The data/preprocessing flags shared by scan and patch, as library keyword arguments."""
    return {
        "pixel_range": _floats(pixel_range, "--pixel-range", 2),
        "mean": _floats(mean, "--mean"),
        "std": _floats(std, "--std"),
        "channel_order": None if bgr is None else ("BGR" if bgr else "RGB"),
        "layout": layout.value if layout else None,
        "labels_file": labels,
    }


# --config keys: (kind, lower bound, lower bound inclusive?, upper bound) and what to write.
_CONFIG_RULES: dict[str, tuple[str, Optional[float], bool, Optional[float], str]] = {
    "lr": ("float", 0.0, False, None, "a number > 0"),
    "batch_size": ("int", 1, True, None, "an integer >= 1"),
    "mini_batches": ("int", 1, True, None, "an integer >= 1"),
    "max_steps": ("int", 1, True, None, "an integer >= 1"),
    "label_chunk": ("int?", 1, True, None, "an integer >= 1 (or omit it: fit to memory)"),
    "memory_budget_mb": ("float?", 0.0, False, None, "a number of MB > 0 (or omit it)"),
    "verify_images": ("int", 0, True, None, "an integer >= 0 (0 disables the check)"),
    "init_cost": ("float", 0.0, True, None, "a number >= 0"),
    "attack_succ_threshold": ("float", 0.0, False, 1.0, "a fraction in (0, 1]"),
    "patience": ("int", 1, True, None, "an integer >= 1"),
    "cost_multiplier_up": ("float", 1.0, False, None, "a number > 1"),
    "cost_multiplier_down": ("float", 1.0, False, None, "a number > 1"),
    "early_stop": ("bool", None, True, None, "true or false"),
    "early_stop_threshold": ("float", 0.0, False, 1.0, "a fraction in (0, 1]"),
    "early_stop_patience": ("int", 1, True, None, "an integer >= 1"),
}


def _check_config(path: Path, obj: dict[str, Any]) -> None:
    """Type- and range-check --config values (unknown keys are reported by _reverse_config)."""

    def bad(key: str, want: str, value: Any) -> ConfigError:
        return ConfigError(f"--config {path}: {key} must be {want}, got {value!r}; fix {key} in {path}")

    for key, value in obj.items():
        if key == "betas":
            ok = (
                isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value)
            )
            if not ok:
                raise bad(key, "two numbers in [0, 1), e.g. [0.5, 0.9]", value)
            continue
        if key == "name":
            if value not in ("fast", "reference"):
                raise bad(key, '"fast" or "reference"', value)
            continue
        rule = _CONFIG_RULES.get(key)
        if rule is None:
            continue
        kind, lo, lo_incl, hi, want = rule
        if kind.endswith("?"):
            if value is None:
                continue
            kind = kind[:-1]
        if kind == "bool":
            if not isinstance(value, bool):
                raise bad(key, want, value)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "int" and not isinstance(value, int)):
            raise bad(key, want, value)
        if value != value or (lo is not None and (value < lo or (value == lo and not lo_incl))) or (hi is not None and value > hi):
            raise bad(key, want, value)


def _require_paths(model: Optional[Path] = None, data: Optional[Path] = None) -> None:
    """A missing model or data path fails in milliseconds, before torch is imported (the
    same messages as the loaders')."""
    from .errors import DataError, ModelError

    if model is not None and not model.exists():
        raise ModelError(f"model file {model} does not exist; check the path")
    if data is not None and not data.exists():
        raise DataError(f"data path {data} does not exist; pass --data DIR (images) or FILE.npz")


def _load_config(path: Optional[Path]) -> dict[str, Any]:
    """Read hyperparameter overrides from a JSON or TOML file (values type- and range-checked)."""
    if path is None:
        return {}
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e.strerror}") from e
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            obj = tomllib.loads(text)
        else:
            obj = json.loads(text)
    except Exception as e:
        raise ConfigError(f"--config {path} is not valid {path.suffix[1:] or 'JSON'}: {e}") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"--config {path} must hold an object of settings")
    _check_config(path, obj)
    return obj


def _reverse_config(schedule: Schedule, cfg_file: dict[str, Any], **flags: Any) -> Any:
    from dataclasses import fields, replace

    from .reverse import ReverseConfig, preset
    from .schedule import ScheduleConfig

    cfg = preset(schedule.value)
    rk = {f.name for f in fields(ReverseConfig)} - {"schedule"}
    sk = {f.name for f in fields(ScheduleConfig)}
    over: dict[str, Any] = {}
    sover: dict[str, Any] = {}
    for k, v in {**cfg_file, **{k: v for k, v in flags.items() if v is not None}}.items():
        if k in rk:
            over[k] = tuple(v) if k == "betas" else v
        elif k in sk:
            sover[k] = v
        else:
            raise ConfigError(
                f"unknown setting {k!r} in --config; known: {', '.join(sorted(rk | sk))}"
            )
    try:
        return replace(cfg, **over, schedule=replace(cfg.schedule, **sover))
    except TypeError as e:
        raise ConfigError(f"bad setting in --config: {e}") from e


def _install_sigterm() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        pass


def _progress_bar(console: Any, enabled: bool) -> Any:
    """A rich progress bar on stderr (None when disabled or stderr is not a terminal)."""
    if not enabled or not console.is_terminal:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("reversing triggers"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("labels · step {task.fields[step]} · {task.fields[active]} active"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


Pixel = Annotated[Optional[str], typer.Option("--pixel-range", help="Input range the model expects for black..white, e.g. 0,255 (default: model metadata, else 0,1).")]
Mean = Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean subtracted after scaling, e.g. 0.485,0.456,0.406.")]
Std = Annotated[Optional[str], typer.Option("--std", help="Per-channel std, e.g. 0.229,0.224,0.225.")]
Bgr = Annotated[Optional[bool], typer.Option("--bgr/--rgb", help="The model takes BGR (or RGB) channel order.")]
LayoutOpt = Annotated[Optional[Layout], typer.Option("--layout", help="Force the input layout (default: detected from the channel axis / metadata).", case_sensitive=False)]
DataOpt = Annotated[Path, typer.Option("--data", "-d", help="Clean images: folder with class subfolders, flat folder, or .npz with x (and y).")]
LabelsOpt = Annotated[Optional[Path], typer.Option("--labels", help="Map class-folder names to indices: one name per line, or JSON {name: index}.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (results are deterministic on CPU).")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to optimise: auto (CUDA when present), cpu or cuda.", case_sensitive=False)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table (machine formats still print).")]
RayOpt = Annotated[Optional[str], typer.Option("--ray", help="Run the label chunks as Ray tasks on a cluster: auto (the one `ray start` runs here), local (start one for this run), HOST:PORT or ray://HOST:PORT. Needs ncscan[ray].", show_default=False)]
ThresholdOpt = Annotated[Optional[float], typer.Option("--threshold", help="Decision line on the log-size score (default 3.0): a label scoring above threshold + band (0.5) is flagged, one within the band is borderline.", show_default=False)]
ScheduleOpt = Annotated[Schedule, typer.Option("--schedule", help="fast (ncscan default, labels batched) or reference (the original algorithm's settings, one label at a time).", case_sensitive=False)]
MaxStepsOpt = Annotated[Optional[int], typer.Option("--max-steps", help="Cap on optimisation steps per label.", min=1)]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Images per label per mini-batch.", min=1)]
LabelChunkOpt = Annotated[Optional[int], typer.Option("--label-chunk", help="Labels optimised together (default: fit to memory; one Ray task each with --ray).", min=1)]
MaxImagesOpt = Annotated[int, typer.Option("--max-images", help="Use at most this many clean images (per model).", min=1)]
PrescreenOpt = Annotated[Optional[Prescreen], typer.Option("--prescreen", help="Many-label scheduling: auto (on above 64 labels), on or off.", case_sensitive=False)]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="JSON or TOML file of optimiser/schedule settings (lr, betas, batch_size, mini_batches, max_steps, init_cost, patience, ...).")]


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
    threshold: ThresholdOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
    fmt: Annotated[Optional[Format], typer.Option("--format", "-f", help="table (human, stderr), json or sarif (stdout unless --output). Default: from --output's extension, else table.", case_sensitive=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the report to this file (atomically).")] = None,
    triggers: Annotated[Optional[Path], typer.Option("--triggers", help="Write mask/pattern/trigger PNGs and .npz for every label into this directory.")] = None,
    schedule: ScheduleOpt = Schedule.fast,
    max_steps: MaxStepsOpt = None,
    batch_size: BatchSizeOpt = None,
    label_chunk: LabelChunkOpt = None,
    max_images: MaxImagesOpt = 2000,
    prescreen: PrescreenOpt = None,
    config: ConfigOpt = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Exit 0 even when a backdoor is found or the scan is inconclusive.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Scan even when the clean accuracy is near chance or every image gets the same prediction (usually wrong preprocessing; the verdict is then suspect).")] = False,
    ray: RayOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> int:
    """Scan MODEL for backdoors (the default command: `ncscan MODEL --data DIR`)."""
    _require_paths(model, data)  # before the imports below load torch
    from .io import atomic_write_text, check_output_path, refuse_inputs
    from .report import render_table, render_verdict, report_json, sarif_text, write_triggers
    from .scanner import scan

    err = _stderr_console(quiet)
    if fmt is None:
        suffix = output.suffix.lower() if output is not None else ""
        fmt = Format.sarif if suffix == ".sarif" else Format.json if suffix == ".json" else Format.table
    if output is not None:
        check_output_path(output, [model, data])
    if triggers is not None:
        refuse_inputs(triggers, [model, data], writes_images=True)
        if triggers.exists() and not triggers.is_dir():
            raise OutputError(f"--triggers {triggers} exists and is not a directory")
        parent = triggers.parent if str(triggers.parent) else Path(".")
        if not parent.is_dir():
            raise OutputError(f"--triggers parent directory {parent} does not exist; create it first")
    cfg = _reverse_config(
        schedule, _load_config(config), max_steps=max_steps, batch_size=batch_size, label_chunk=label_chunk
    )
    backend = None
    if ray is not None:
        from .distributed import connect

        backend = connect(ray)  # before any work: a bad address fails in seconds
    bar = _progress_bar(err, not quiet)
    task = None
    if bar is not None:
        bar.start()
        task = bar.add_task("scan", total=None, step=0, active=0)

    def on_progress(p: Any) -> None:
        if bar is not None:
            bar.update(task, total=p.labels_total, completed=p.labels_done, step=p.step, active=p.active)

    try:
        report = scan(
            model,
            data,
            **_preprocess_kwargs(pixel_range, mean, std, bgr, layout, labels),
            threshold=threshold,
            seed=seed,
            device=device.value,
            schedule=cfg,
            max_images=max_images,
            prescreen=(prescreen.value if prescreen is not None else "auto"),
            progress=on_progress,
            runner=backend.runner if backend is not None else None,
            force=force,
        )
    finally:
        if bar is not None:
            bar.stop()
        if backend is not None:
            backend.close()
    from .scanner import PRESCREEN_KEEP_MIN, PRESCREEN_SAMPLE

    if prescreen == Prescreen.on and len(report.labels) <= PRESCREEN_SAMPLE + PRESCREEN_KEEP_MIN:
        from dataclasses import replace

        report = replace(report, warnings=[*report.warnings, (
            f"--prescreen on was not used: pre-screening needs more than {PRESCREEN_SAMPLE + PRESCREEN_KEEP_MIN} "
            f"labels (a {PRESCREEN_SAMPLE}-label reference sample for the statistics plus {PRESCREEN_KEEP_MIN} "
            f"suspects) and this scan has {len(report.labels)}; every label was fully optimised instead"
        )])
    if triggers is not None:
        write_triggers(report, triggers)
    if fmt == Format.table:
        if output is not None:
            import io

            from rich.console import Console

            buf = io.StringIO()
            render_table(report, Console(file=buf, width=120, color_system=None, force_terminal=False))
            atomic_write_text(output, buf.getvalue())
        render_table(report, err)
    else:
        text = report_json(report) if fmt == Format.json else sarif_text(report)
        if output is not None:
            atomic_write_text(output, text)
            if not quiet:
                render_table(report, err)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
            if not quiet:
                if err.is_terminal:
                    render_table(report, err)
                else:  # a CI log: the warnings and the one-line verdict, not the whole table
                    for w in report.warnings:
                        err.print(f"warning: {w}")
                    render_verdict(report, err)
    if exit_zero:
        return EXIT_CLEAN
    return {"clean": EXIT_CLEAN, "backdoor": EXIT_BACKDOOR}.get(report.verdict, EXIT_INCONCLUSIVE)


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

    pr = _floats(pixel_range, "--pixel-range", 2)
    res = export_file(
        framework.value,
        source,
        output,
        pixel_range=(pr[0], pr[1]) if pr else (0.0, 1.0),
        mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"),
        channel_order="BGR" if bgr else "RGB",
        class_names=class_names,
        input_shape=input_shape,
        opset=opset,
    )
    if not quiet:
        err = _stderr_console()
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


from .cli_patch import patch_cmd  # noqa: E402  (uses the option aliases above)

app.command("patch", short_help="Mitigate a found backdoor; write ONNX.")(patch_cmd)

from .cli_many import scan_many_cmd  # noqa: E402

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
    _install_sigterm()
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
