"""What the CLI's commands share: exit codes, option types, flag parsing, config files,
progress, and the scan commands' output handling.

`cli.py` (scan, export, version, and the app), `cli_patch.py` and `cli_many.py` import from
here and never from each other, so each module imports on its own.
"""

from __future__ import annotations

import json
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer

from .decide import DecideConfig
from .errors import ConfigError, OutputError

if TYPE_CHECKING:
    from .inputs import InputOptions

_DECIDE = DecideConfig()

EXIT_CLEAN = 0
EXIT_BACKDOOR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INCONCLUSIVE = 4
EXIT_INTERRUPTED = 130


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


def stderr_console(quiet: bool = False) -> Any:
    from rich.console import Console

    c = Console(stderr=True, quiet=quiet, highlight=False, soft_wrap=False)
    # In a CI log or a file a message stays one line, however long (grep-able); tables
    # still fit the width.
    c.soft_wrap = not c.is_terminal
    return c


def floats(text: Optional[str], what: str, n: Optional[int] = None) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    from .preprocess import parse_floats

    vals = parse_floats(text, what)
    if n is not None and len(vals) != n:
        raise ConfigError(f"{what} takes {n} numbers, got {len(vals)} ({text!r}); e.g. 0,255")
    return vals


def input_flags(
    pixel_range: Optional[str],
    mean: Optional[str],
    std: Optional[str],
    bgr: Optional[bool],
    layout: Optional["Layout"],
    labels: Optional[Path],
    max_images: Optional[int],
    output_name: Optional[str] = None,
    resize: Optional[str] = None,
) -> "InputOptions":
    """The data/preprocessing flags shared by scan, scan-many and patch, as one InputOptions."""
    from .inputs import InputOptions

    return InputOptions(
        pixel_range=floats(pixel_range, "--pixel-range", 2),
        mean=floats(mean, "--mean"),
        std=floats(std, "--std"),
        channel_order=None if bgr is None else ("BGR" if bgr else "RGB"),
        layout=layout.value if layout else None,
        labels_file=labels,
        max_images=max_images,
        output_name=output_name,
        resize=resize,
    )


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
    """Type- and range-check --config values (unknown keys are reported by reverse_config)."""

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


def require_paths(model: Optional[Path] = None, data: Optional[Path] = None) -> None:
    """A missing model or data path fails in milliseconds, before torch is imported (the
    same messages as the loaders')."""
    from .errors import DataError, ModelError

    if model is not None and not model.exists():
        raise ModelError(f"model file {model} does not exist; check the path")
    if data is not None and not data.exists():
        raise DataError(f"data path {data} does not exist; pass --data DIR (images) or FILE.npz")


def load_config(path: Optional[Path]) -> dict[str, Any]:
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


def reverse_config(schedule: Schedule, cfg_file: dict[str, Any], **flags: Any) -> Any:
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


def install_sigterm() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        pass


def progress_bar(console: Any, enabled: bool, kind: str = "reverse") -> Any:
    """A rich progress bar on stderr (None when disabled or stderr is not a terminal):
    `kind` "reverse" counts labels and optimisation steps, "load" counts decoded images."""
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

    if kind == "load":
        head, tail = [TextColumn("loading images"), BarColumn(), MofNCompleteColumn()], []
    else:
        head = [TextColumn("reversing triggers"), BarColumn(), MofNCompleteColumn()]
        tail = [TextColumn("labels · step {task.fields[step]} · {task.fields[active]} active")]
    return Progress(*head, *tail, TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)


Pixel = Annotated[Optional[str], typer.Option("--pixel-range", help="Input range the model expects for black..white, e.g. 0,255 (default: model metadata, else 0,1).")]
Mean = Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean subtracted after scaling, e.g. 0.485,0.456,0.406.")]
Std = Annotated[Optional[str], typer.Option("--std", help="Per-channel std, e.g. 0.229,0.224,0.225.")]
Bgr = Annotated[Optional[bool], typer.Option("--bgr/--rgb", help="The model takes BGR (or RGB) channel order.")]


class Resize(str, Enum):
    squash = "squash"
    shorter_crop = "shorter-crop"


ResizeOpt = Annotated[Optional[Resize], typer.Option("--resize", help="How images of another size reach the input size: squash (resize directly) or shorter-crop (shorter side to the input size, then centre crop, like torchvision's eval transforms). Default: model metadata ncscan.resize, else squash.", case_sensitive=False)]
OutputNameOpt = Annotated[Optional[str], typer.Option("--output-name", help="The model output that holds the class scores (default: the only output shaped [N, classes]).", show_default=False)]
LayoutOpt = Annotated[Optional[Layout], typer.Option("--layout", help="Force the input layout (default: detected from the channel axis / metadata).", case_sensitive=False)]
DataOpt = Annotated[Path, typer.Option("--data", "-d", help="Clean images: folder with class subfolders, flat folder, or .npz with x (and y).")]
LabelsOpt = Annotated[Optional[Path], typer.Option("--labels-file", "--labels", help="Map class-folder names to indices: one name per line, or JSON {name: index} (--labels is the older name).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (results are deterministic on CPU).")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to optimise: auto (CUDA when present), cpu or cuda.", case_sensitive=False)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table (machine formats still print).")]
RayOpt = Annotated[Optional[str], typer.Option("--ray", help="Run the label chunks as Ray tasks on a cluster: auto (the one `ray start` runs here), local (start one for this run), HOST:PORT or ray://HOST:PORT. Needs ncscan[ray].", show_default=False)]
ThresholdOpt = Annotated[Optional[float], typer.Option("--threshold", help=f"Decision line on the log-size score (default {_DECIDE.threshold}): a label scoring above its line + band ({_DECIDE.band}) is flagged, one within the band is borderline; a label with a compact (patch-like) mask is held to threshold - {_DECIDE.compact_relief:g}.", show_default=False)]
ScheduleOpt = Annotated[Schedule, typer.Option("--schedule", help="fast (ncscan default, labels batched) or reference (the original algorithm's settings, one label at a time).", case_sensitive=False)]
MaxStepsOpt = Annotated[Optional[int], typer.Option("--max-steps", help="Cap on optimisation steps per label.", min=1)]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Images per label per mini-batch.", min=1)]
LabelChunkOpt = Annotated[Optional[int], typer.Option("--label-chunk", help="Labels optimised together (default: fit to memory; one Ray task each with --ray).", min=1)]
MaxImagesOpt = Annotated[int, typer.Option("--max-images", help="Use at most this many clean images (per model).", min=1)]
PrescreenOpt = Annotated[Optional[Prescreen], typer.Option("--prescreen", help="Many-label scheduling: auto (on above 64 labels), on or off.", case_sensitive=False)]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="JSON or TOML file of optimiser/schedule settings (lr, betas, batch_size, mini_batches, max_steps, init_cost, patience, ...).")]
ExitZeroOpt = Annotated[bool, typer.Option("--exit-zero", help="Exit 0 even when a backdoor is found or the scan is inconclusive.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Scan even when the clean accuracy is near chance or every image gets the same prediction (usually wrong preprocessing); such a scan is reported inconclusive, never clean.")]



# ---------------------------------------------------------------- scan and scan-many share these


def resolve_format(fmt: Optional[Format], output: Optional[Path]) -> Format:
    """--format, else from --output's extension (.sarif, .json), else table."""
    if fmt is not None:
        return fmt
    suffix = output.suffix.lower() if output is not None else ""
    return Format.sarif if suffix == ".sarif" else Format.json if suffix == ".json" else Format.table


def check_output_dir(path: Path, flag: str, inputs: list[Path], *, writes_images: bool) -> None:
    """A directory ncscan will fill (--triggers, --report-dir): never an input, never a file,
    and its parent must exist (we create only the last level)."""
    from .io import refuse_inputs

    refuse_inputs(path, inputs, writes_images=writes_images)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} exists and is not a directory; pick a new directory name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{flag} parent directory {parent} does not exist; create it first (mkdir -p {parent})")


def connect_ray(address: Optional[str]) -> Any:
    """The Ray backend for --ray (None without it); a bad address fails here, before any work."""
    if address is None:
        return None
    from .distributed import connect

    return connect(address)


def scan_kwargs(
    *,
    pixel_range: Optional[str], mean: Optional[str], std: Optional[str], bgr: Optional[bool],
    layout: Optional[Layout], labels: Optional[Path], threshold: Optional[float], seed: int,
    device: Device, schedule: Schedule, config: Optional[Path], max_steps: Optional[int],
    batch_size: Optional[int], label_chunk: Optional[int], max_images: int,
    prescreen: Optional[Prescreen], force: bool, output_name: Optional[str] = None,
    resize: Optional[str] = None,
) -> dict[str, Any]:
    """The flags scan and scan-many share, as `ncscan.scanner.scan` keyword arguments."""
    cfg = reverse_config(
        schedule, load_config(config), max_steps=max_steps, batch_size=batch_size, label_chunk=label_chunk
    )
    return {
        "inputs": input_flags(pixel_range, mean, std, bgr, layout, labels, max_images, output_name, resize),
        "threshold": threshold,
        "seed": seed,
        "device": device.value,
        "schedule": cfg,
        "prescreen": prescreen.value if prescreen is not None else "auto",
        "force": force,
    }


def write_rendered(path: Path, render: Callable[[Any], None], width: int) -> None:
    """Render a rich table into a plain-text file (atomically, no colour codes)."""
    import io

    from rich.console import Console

    from .io import atomic_write_text

    buf = io.StringIO()
    render(Console(file=buf, width=width, color_system=None, force_terminal=False))
    atomic_write_text(path, buf.getvalue())


def emit(text: str, output: Optional[Path]) -> None:
    """A machine-format document: to --output (atomically) or to stdout."""
    if output is not None:
        from .io import atomic_write_text

        atomic_write_text(output, text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def verdict_exit(verdict: str, exit_zero: bool) -> int:
    """The CI-gate exit code of one scan's verdict."""
    if exit_zero:
        return EXIT_CLEAN
    return {"clean": EXIT_CLEAN, "backdoor": EXIT_BACKDOOR}.get(verdict, EXIT_INCONCLUSIVE)
