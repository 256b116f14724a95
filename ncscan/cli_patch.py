"""`ncscan patch`: the command-line front of `ncscan.patch.patch`.

Registered in cli.py with `app.command("patch")(patch_cmd)`.
Exit codes: 0 written (or a clean scan: nothing to do), 1 the patched model failed its
guard and was not written (unless --force), 2 bad input, 3 internal error, 4 the scan was
inconclusive and nothing was flagged (patching nothing is not a clean bill).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .cli_common import (
    Bgr,
    DataOpt,
    DebugOpt,
    Device,
    DeviceOpt,
    LabelsOpt,
    LayoutOpt,
    Mean,
    Pixel,
    QuietOpt,
    SeedOpt,
    Std,
    input_flags,
    require_paths,
    stderr_console,
)
from .errors import ConfigError


def _pct(v: Optional[float]) -> str:
    return "-" if v is None or v != v else f"{v:.1%}"


def render_patch(res: Any, console: Any) -> None:
    """The before/after table on stderr."""
    from rich.table import Table

    if res.inconclusive:
        console.print(
            "INCONCLUSIVE: nothing patched and nothing written: the scan can call this model neither "
            f"clean nor infected ({'; '.join(res.scan_reasons) or 'no reason recorded'}); re-scan with a "
            "larger budget (`ncscan scan MODEL --data DIR --max-steps 600 -f json -o scan.json`) and pass "
            "--report scan.json, or name the label(s) to patch with --label N"
        )
        return
    if not res.labels:
        console.print("nothing flagged and no --label given: the model needs no patch; nothing written")
        return
    t = Table(title=f"ncscan patch ({'+'.join(res.methods)}) · labels {', '.join(map(str, res.labels))} · {res.n_holdout} images, cross-fitted")
    t.add_column("measure")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_row("clean accuracy", _pct(res.clean_accuracy_before), _pct(res.clean_accuracy_after))
    if res.clean_accuracy_drop is not None and res.clean_accuracy_drop_interval is not None:
        lo, hi = res.clean_accuracy_drop_interval
        t.add_row("accuracy drop (points, 90% interval)", "", f"{res.clean_accuracy_drop:.1f} [{lo:.1f}, {hi:.1f}]")
    for lab in res.labels:
        after = _pct(res.attack_success_after.get(lab))
        if res.attack_success_after_filter is not None:
            after += f" ({_pct(res.attack_success_after_filter.get(lab))} unflagged)"
        t.add_row(f"reversed-trigger attack success → {lab}", _pct(res.attack_success_before.get(lab)), after)
    if res.pruned_count is not None:
        ok = "reached" if res.prune_success else "NOT reached"
        where = f" of {res.prune_layer}" if res.prune_layer else ""
        t.add_row("pruned neurons", "", f"{res.pruned_count}/{res.pruned_total}{where} ({_pct(res.pruned_fraction)}; target {ok})")
    if res.filter_threshold is not None:
        t.add_row("filter threshold", "", f"{res.filter_threshold:.4g} ({len(res.filter_neurons or [])} neuron(s))")
        t.add_row("filter FPR / FNR", "", f"{_pct(res.filter_fpr)} / {_pct(res.filter_fnr)}")
    if res.parity_max_rel is not None:
        t.add_row("onnxruntime parity (max rel diff)", "", f"{res.parity_max_rel:.1e}")
    console.print(t)
    for w in res.warnings:
        console.print(f"warning: {w}")
    if res.guard_reasons:
        console.print("guard failed: " + "; ".join(res.guard_reasons))
    if res.written:
        console.print(f"wrote {res.output}")
    elif res.output:
        console.print(f"not written: {res.output} (use --force to write anyway)")


def patch_cmd(
    model: Annotated[Path, typer.Argument(help="The ONNX model to patch.", show_default=False)],
    data: DataOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the patched ONNX model (atomically; never the input).")],
    unlearn: Annotated[bool, typer.Option("--unlearn", help="Fine-tune with reversed-trigger images that keep their true labels.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Fine-Pruning: switch off the last conv layer's channels the trigger excites (until its attack success < 5% or --prune-budget), then fine-tune on the clean images.")] = False,
    filt: Annotated[bool, typer.Option("--filter", help="Add ncscan_score/ncscan_flag outputs that flag triggered inputs.")] = False,
    report: Annotated[Optional[Path], typer.Option("--report", help="A scan's JSON report (ncscan scan -f json); default: scan here.")] = None,
    label: Annotated[Optional[list[int]], typer.Option("--label", help="Patch this label (repeatable); default: the flagged labels.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Unlearning epochs (each at least --min-steps optimizer steps).", min=1)] = 1,
    lr: Annotated[float, typer.Option("--lr", help="Unlearning learning rate (Adam).")] = 5e-4,
    min_steps: Annotated[int, typer.Option("--min-steps", help="Minimum optimizer steps per unlearning epoch.", min=1)] = 150,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Cap on optimisation steps per label for the triggers reversed here (own scan, --label not in the report).", min=1)] = None,
    unlearn_rounds: Annotated[int, typer.Option("--unlearn-rounds", help="Unlearning rounds: after each, re-reverse the labels on the patched model and unlearn any working trigger still within 2x the original's L1 (1 = the paper's single round).", min=1)] = 1,
    fpr: Annotated[float, typer.Option("--fpr", help="Filter false-positive rate on new clean images (bounded with 90% confidence).")] = 0.05,
    layer: Annotated[Optional[str], typer.Option("--layer", help="ONNX node (or tensor) whose output pruning and the filter use (default: pruning the last conv's channels, the filter the input of the last Gemm/MatMul).")] = None,
    prune_budget: Annotated[float, typer.Option("--prune-budget", help="Clean-accuracy points pruning may cost before it stops (the fine-tune then wins accuracy back; the guard judges the result).", min=0.0)] = 5.0,
    fine_tune_steps: Annotated[int, typer.Option("--fine-tune-steps", help="Fine-tuning steps after pruning, the pruned channels held at zero (0: prune only, as in the paper).", min=0)] = 150,
    max_accuracy_drop: Annotated[float, typer.Option("--max-accuracy-drop", help="Guard: largest clean-accuracy drop allowed, in points (the cross-fitted estimate).")] = 2.0,
    guard_folds: Annotated[int, typer.Option("--guard-folds", help="The guard's k-fold cross-fitting: k patches, each measured on the fold it never saw, then the patch on all images.", min=2)] = 5,
    force: Annotated[bool, typer.Option("--force", help="Write even when the guard fails.")] = False,
    labels: LabelsOpt = None,
    pixel_range: Pixel = None,
    mean: Mean = None,
    std: Std = None,
    bgr: Bgr = None,
    layout: LayoutOpt = None,
    max_images: Annotated[int, typer.Option("--max-images", help="Use at most this many clean images.", min=1)] = 2000,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", help="table (stderr) or json (stdout).")] = None,
    output_report: Annotated[Optional[Path], typer.Option("--output-report", help="Also write the JSON result to this file.")] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> int:
    """Mitigate a found backdoor (unlearning, pruning, input filter) and write ONNX."""
    require_paths(model, data)  # before ncscan.patch loads torch
    from .io import atomic_write_text, check_output_path
    from .mitigate.prune import PruneConfig
    from .patch import patch

    err = stderr_console(quiet)
    f = (fmt or "table").lower()
    if f not in ("table", "json"):
        raise ConfigError(f"--format must be table or json, got {fmt!r}")
    if output_report is not None:
        check_output_path(output_report, [model, data, output])
        try:
            if output_report.resolve() == output.resolve():
                raise ConfigError("--output-report and -o are the same file")
        except OSError:
            pass

    def log(msg: str) -> None:
        if not quiet:
            err.print(msg)

    res = patch(
        model,
        data,
        output=output,
        unlearn=unlearn,
        prune=prune,
        input_filter=filt,
        report=report,
        labels=label or None,
        epochs=epochs,
        lr=lr,
        min_steps=min_steps,
        max_steps=max_steps,
        unlearn_rounds=unlearn_rounds,
        fpr=fpr,
        layer=layer,
        prune_config=PruneConfig(budget=prune_budget, fine_tune_steps=fine_tune_steps),
        max_accuracy_drop=max_accuracy_drop,
        guard_folds=guard_folds,
        force=force,
        seed=seed,
        device=device.value,
        inputs=input_flags(pixel_range, mean, std, bgr, layout, labels, max_images),
        log=log,
    )
    text = json.dumps(res.to_dict(), indent=2, sort_keys=False) + "\n"
    if output_report is not None:
        atomic_write_text(output_report, text)
    if f == "json":
        sys.stdout.write(text)
        sys.stdout.flush()
    if not quiet:
        render_patch(res, err)
    if res.inconclusive:
        return 4
    if not res.labels:
        return 0
    # A failed guard exits 1 even with --force (the file is then written anyway).
    return 0 if res.guard_passed else 1
