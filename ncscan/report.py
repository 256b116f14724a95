"""Render a ScanReport: rich table, JSON, SARIF 2.1.0, trigger PNGs.

Nothing here decides exit codes or touches stdout by itself: the CLI passes consoles in.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .io import atomic_write_bytes, atomic_write_text
from .scanner import LabelResult, ScanReport

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
RULE_ID = "NCSCAN001"

# A model with at most this many labels gets every label in the table and in --triggers; a
# larger one (1,000 ImageNet classes) gets the flagged and borderline labels, the TOP_SUSPECTS
# smallest working triggers and a summary of the rest, unless every label is asked for. The
# JSON report always keeps every label.
ALL_LABELS_MAX = 30
TOP_SUSPECTS = 10
# Trigger PNGs are enlarged by a whole factor up to about this side (x8 at 28 px, x7 at
# 32 px, x1 from 113 px up), so a 224 px trigger is written at 224 px, not 1792.
PNG_TARGET_SIDE = 224


def png_scale(height: int, width: int) -> int:
    """Nearest-neighbour enlargement of a trigger PNG: the largest whole factor that keeps
    its longer side within PNG_TARGET_SIDE (at least 1: larger inputs are written as they are)."""
    return max(1, PNG_TARGET_SIDE // max(1, height, width))


def select_labels(report: ScanReport, all_labels: bool = False, top: int = TOP_SUSPECTS) -> list[LabelResult]:
    """The labels a person is shown (table) and given (--triggers), smallest trigger first.

    Every label when `all_labels` or when the model has at most ALL_LABELS_MAX of them;
    otherwise the flagged and borderline labels, the `top` smallest working triggers among
    the fully optimised labels (the next suspects), and up to `top` labels with no working
    trigger (what makes a scan inconclusive).
    """
    by_size = sorted(report.labels, key=lambda r: (r.mask_l1, r.label))
    if all_labels or len(report.labels) <= ALL_LABELS_MAX:
        return by_size
    suspects = [r for r in by_size if r.decision == "clear" and r.working and not r.screened_out][:top]
    missing = [r for r in by_size if r.decision == "no_trigger"][:top]
    keep = {r.label for r in by_size if r.decision in ("flagged", "borderline")}
    keep |= {r.label for r in suspects} | {r.label for r in missing}
    return [r for r in by_size if r.label in keep]


def summarize_rest(report: ScanReport, shown: list[LabelResult]) -> str | None:
    """One line on the labels `select_labels` left out (None when none were)."""
    seen = {r.label for r in shown}
    rest = [r for r in report.labels if r.label not in seen]
    if not rest:
        return None
    counts: dict[str, int] = {}
    for r in rest:
        counts[r.decision] = counts.get(r.decision, 0) + 1
    names = {"clear": "clear", "screened_out": "screened out", "no_trigger": "no trigger found"}
    parts = [f"{n} {names.get(k, k)}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    worked = [r for r in rest if r.working]
    span = ""
    if worked:
        l1 = [r.mask_l1 for r in worked]
        sc = [r.score for r in worked if np.isfinite(r.score)]
        span = f"; mask L1 {min(l1):.1f}-{max(l1):.1f}"
        if sc:
            span += f", score {min(sc):.2f} to {max(sc):.2f}"
    return (
        f"{len(rest)} more label(s) not shown ({', '.join(parts)}{span}); "
        "--all-labels lists every label, and the JSON report has them all"
    )


def json_safe(obj: Any) -> Any:
    """The object with every non-finite float as None (JSON has no NaN or infinity)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def report_json(report: ScanReport) -> str:
    """The JSON report as text (NaN -> null)."""
    return json.dumps(json_safe(report.to_dict()), indent=2) + "\n"


def sarif_driver() -> dict[str, Any]:
    """SARIF's tool.driver: ncscan and its one rule (the scan's log and scan-many's share it)."""
    return {
        "name": "ncscan",
        "version": __version__,
        "semanticVersion": __version__,
        "informationUri": "https://github.com/ncscan/ncscan",
        "rules": [
            {
                "id": RULE_ID,
                "name": "NeuralCleanseBackdoor",
                "shortDescription": {"text": "Model label with an abnormally small trigger (backdoor)"},
                "fullDescription": {
                    "text": (
                        "Neural Cleanse reverse-engineers the smallest input patch that "
                        "sends clean images to each label. A label whose patch is an "
                        "outlier on the small side (log-size score above its line and "
                        "band, confirmed by restarts; the line is lower for a compact, "
                        "patch-like trigger and higher for one that makes images look like "
                        "the class's own) is likely the target of a backdoor trigger."
                    )
                },
                "help": {
                    "text": "Inspect the reversed trigger (ncscan --triggers DIR) and mitigate "
                    "with `ncscan patch --unlearn`, or retrain from trusted data."
                },
                "defaultConfiguration": {"level": "error"},
                "properties": {
                    "security-severity": "8.8",
                    "tags": ["security", "machine-learning", "backdoor"],
                    "precision": "medium",
                },
            }
        ],
    }


def to_sarif(report: ScanReport, model_uri: str | None = None) -> dict[str, Any]:
    """SARIF 2.1.0 log: one result per flagged label, accepted by GitHub code scanning."""
    uri = (model_uri or report.model).replace(os.sep, "/")
    uri = uri.removeprefix("./")
    results = []
    by = report.by_label
    for lab in report.flagged:
        r = by[lab]
        name = f" ({r.name})" if r.name else ""
        results.append(
            {
                "ruleId": RULE_ID,
                "ruleIndex": 0,
                "level": "error",
                "message": {
                    "text": (
                        f"Backdoor suspected: label {lab}{name} has an abnormally small reversed "
                        f"trigger (mask L1 {r.mask_l1:.1f} vs median {report.median_l1:.1f}, score "
                        f"{r.score:.2f} > line {r.line:g} + {report.decide_config.band:g}, evidence "
                        f"{r.evidence}, {len(r.run_l1)} run(s)); the trigger sends "
                        f"{r.attack_success:.0%} of clean images to label {lab}."
                    )
                },
                "locations": [
                    {
                        "physicalLocation": {
                            "artifactLocation": {"uri": uri},
                            "region": {"startLine": 1},
                        }
                    }
                ],
                "partialFingerprints": {
                    "ncscanModelLabel/v1": f"{report.model_sha256}:{lab}",
                },
                "properties": {
                    "label": lab,
                    "mask_l1": round(r.mask_l1, 4),
                    "score": round(r.score, 4),
                    "margin": round(r.margin, 4),
                    "line": round(r.line, 4),
                    "compactness": round(r.compactness, 4),
                    "likeness": round(r.likeness, 4) if np.isfinite(r.likeness) else None,
                    "evidence": r.evidence,
                    "anomaly_index": round(r.anomaly_index, 4),
                    "attack_success": round(r.attack_success, 4),
                    "model_sha256": report.model_sha256,
                },
            }
        )
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": sarif_driver(),
                },
                "results": results,
                "properties": {
                    "verdict": report.verdict,
                    "margin": report.margin,
                    "borderline": report.borderline,
                    "model_sha256": report.model_sha256,
                },
            }
        ],
    }


def sarif_text(report: ScanReport, model_uri: str | None = None) -> str:
    return json.dumps(json_safe(to_sarif(report, model_uri)), indent=2) + "\n"


# ------------------------------------------------------------------ images


def trigger_images(r: LabelResult) -> dict[str, np.ndarray]:
    """uint8 HxWxC images: mask, pattern and mask*pattern (the stamp)."""
    m = np.clip(r.trigger.mask, 0, 1)
    p = np.clip(r.trigger.pattern, 0, 1).transpose(1, 2, 0)
    if p.shape[2] == 4:
        p = p[:, :, :3]
    stamp = m[:, :, None] * p
    to8 = lambda a: np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8)
    return {"mask": to8(m), "pattern": to8(p), "trigger": to8(stamp)}


def png_bytes(a: np.ndarray) -> bytes:
    from PIL import Image

    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_triggers(
    report: ScanReport,
    out_dir: str | os.PathLike[str],
    scale: int | None = None,
    all_labels: bool = False,
) -> list[Path]:
    """Write label_<k>_{mask,pattern,trigger}.png (enlarged) and label_<k>.npz, and an
    index.json listing them.

    Args:
        report: the scan.
        out_dir: the directory (created if missing).
        scale: nearest-neighbour enlargement of the PNGs (default `png_scale` of the input).
        all_labels: every label; otherwise `select_labels` (every label of a model with at
            most ALL_LABELS_MAX, else the flagged/borderline labels and the top suspects).

    Returns:
        The files written.
    """
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    chosen = select_labels(report, all_labels)
    if scale is None:
        h, w = report.labels[0].trigger.mask.shape if report.labels else (1, 1)
        scale = png_scale(int(h), int(w))
    written = []
    for r in sorted(chosen, key=lambda r: r.label):
        for kind, img in trigger_images(r).items():
            if scale > 1:
                img = np.repeat(np.repeat(img, scale, 0), scale, 1)  # nearest-neighbour upscale
            p = d / f"label_{r.label}_{kind}.png"
            atomic_write_bytes(p, png_bytes(img))
            written.append(p)
        buf = io.BytesIO()
        np.savez_compressed(buf, mask=r.trigger.mask, pattern=r.trigger.pattern)
        p = d / f"label_{r.label}.npz"
        atomic_write_bytes(p, buf.getvalue())
        written.append(p)
    atomic_write_text(d / "index.json", json.dumps(
        {
            "model_sha256": report.model_sha256,
            "labels": {str(r.label): f"label_{r.label}.npz" for r in sorted(chosen, key=lambda r: r.label)},
            "omitted_labels": len(report.labels) - len(chosen),
            "png_scale": scale,
        },
        indent=2,
    ))
    return written


# ------------------------------------------------------------------ terminal


def _half_block_preview(r: LabelResult, max_width: int = 32) -> Any:
    """mask x pattern drawn with coloured upper-half blocks (two pixel rows per line)."""
    from rich.text import Text

    img = trigger_images(r)["trigger"]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, 2)
    h, w = img.shape[:2]
    step = max(1, int(np.ceil(w / max_width)))
    if step > 1:
        # Block means, not every step-th pixel: a few-pixel trigger on a 224 px input must
        # not fall between the samples.
        rows, cols = int(np.ceil(h / step)), int(np.ceil(w / step))
        pad = np.zeros((rows * step, cols * step, 3), np.float32)
        cnt = np.zeros((rows * step, cols * step, 1), np.float32)
        pad[:h, :w] = img
        cnt[:h, :w] = 1
        tot = pad.reshape(rows, step, cols, step, 3).sum(axis=(1, 3))
        n = cnt.reshape(rows, step, cols, step, 1).sum(axis=(1, 3))
        img = np.clip(tot / np.maximum(n, 1) + 0.5, 0, 255).astype(np.uint8)
    h, w = img.shape[:2]
    text = Text()
    for y in range(0, h, 2):
        for x in range(w):
            top = img[y, x]
            bot = img[y + 1, x] if y + 1 < h else np.zeros(3, np.uint8)
            text.append(
                "▀",
                style=f"rgb({top[0]},{top[1]},{top[2]}) on rgb({bot[0]},{bot[1]},{bot[2]})",
            )
        text.append("\n")
    return text


ASCII_RAMP = " .:-=+*#%@"  # dark -> bright


def _ascii_preview(r: LabelResult, max_width: int = 32) -> str:
    """mask x pattern as ASCII greyscale (for logs and files: no colours, no block glyphs).

    A character is about twice as tall as wide, so each one covers a block of `step` pixels
    across and 2*`step` down (block means of the luminance)."""
    img = trigger_images(r)["trigger"].astype(np.float32)
    lum = img[:, :, 0] if img.shape[2] == 1 else img[:, :, :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    h, w = lum.shape
    step = max(1, int(np.ceil(w / max_width)))
    rows, cols = int(np.ceil(h / (2 * step))), int(np.ceil(w / step))
    pad = np.zeros((rows * 2 * step, cols * step), np.float32)
    pad[:h, :w] = lum
    blocks = pad.reshape(rows, 2 * step, cols, step).mean(axis=(1, 3)) / 255.0
    idx = np.clip(np.round(blocks * (len(ASCII_RAMP) - 1)), 0, len(ASCII_RAMP) - 1).astype(int)
    return "\n".join("".join(ASCII_RAMP[i] for i in row) for row in idx)


def trigger_preview(r: LabelResult, console: Any) -> Any:
    """Coloured half blocks on a terminal; ASCII greyscale anywhere else (CI logs, `-o
    report.txt`), where colour codes are dropped and the blocks would all look the same."""
    if getattr(console, "is_terminal", False):
        return _half_block_preview(r)
    from rich.text import Text

    return Text(_ascii_preview(r))


def render_table(
    report: ScanReport, console: Any, show_all_previews: bool = False, all_labels: bool = False
) -> None:
    """The human report on a rich console: every label of a model with at most
    ALL_LABELS_MAX labels (or with `all_labels`), else the suspects (`select_labels`) and
    a one-line summary of the rest."""
    from rich.panel import Panel
    from rich.table import Table

    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    t = Table(title=f"ncscan · {report.model}", title_justify="left")
    # Narrow headers and an unwrapped note column: the table must stay readable in an 80-column
    # CI log (the margin is score - line; the JSON carries it per label).
    t.add_column("label", justify="right")
    t.add_column("name", overflow="fold")
    t.add_column("mask L1", justify="right")
    t.add_column("runs", justify="right")
    t.add_column("ASR¹", justify="right")
    t.add_column("score", justify="right")
    t.add_column("line", justify="right")
    t.add_column("paper idx", justify="right")
    t.add_column("", no_wrap=True)
    notes = {"flagged": "FLAGGED", "borderline": "borderline", "no_trigger": "no trigger found",
             "screened_out": "screened out", "clear": ""}
    styles = {"flagged": "bold red", "borderline": "yellow", "no_trigger": "yellow"}
    shown = select_labels(report, all_labels)
    for r in shown:
        # A label with no working trigger has no meaningful size or score: its last mask is
        # shown in brackets and the score as a dash.
        l1_s = f"{r.mask_l1:.1f}" if r.working else f"({r.mask_l1:.1f})"
        sc = (f"{r.score:.2f}", f"{r.line:.1f}", f"{r.anomaly_index:.2f}") if r.working else ("-",) * 3
        t.add_row(
            str(r.label), r.name or "", l1_s, str(len(r.run_l1)), f"{r.attack_success:.1%}", *sc,
            notes.get(r.decision, ""), style=styles.get(r.decision, ""),
        )
    console.print(t)
    rest = summarize_rest(report, shown)
    if rest is not None:
        console.print(rest)
    acc = "n/a (no labels)" if report.clean_accuracy is None else f"{report.clean_accuracy:.1%}"
    console.print(
        f"median mask L1 {report.median_l1:.1f} · threshold {report.threshold:g} ± {report.decide_config.band:g}"
        f" · clean accuracy {acc} on {report.n_images} images · {report.output}"
        f" · {report.elapsed_seconds:.1f}s on {report.device}"
    )
    console.print(
        "¹ attack success on every clean image not of that label (a trigger counts as working when "
        "it reaches 99% on a fixed check sample of up to 256 of them during optimisation). score: "
        "how much smaller the label's trigger is than typical (log scale, in robust spreads); "
        "flagged above line + band. line: the threshold, lower for a compact (patch-like) "
        "mask, higher for a spread-out one whose trigger makes images look like the class's own. "
        "paper idx: the paper's MAD anomaly index, for comparison."
    )
    for lab in report.flagged:
        r = report.by_label[lab]
        console.print(
            Panel(
                trigger_preview(r, console),
                title=f"label {lab} reversed trigger (mask × pattern)",
                expand=False,
            )
        )
    render_verdict(report, console)


def render_verdict(report: ScanReport, console: Any) -> None:
    """The one-line verdict (the CLI's last line on stderr, also when JSON/SARIF go to stdout)."""
    if report.verdict == "backdoor":
        labs = ", ".join(str(v) for v in report.flagged)
        console.print(
            f"[bold red]BACKDOOR[/] suspected: label(s) {labs} (score above its line + "
            f"{report.decide_config.band:g}; margin {report.margin:+.2f})"
        )
    elif report.verdict == "clean":
        console.print(
            f"[bold green]CLEAN[/]: no label has an abnormally small trigger (margin {report.margin:+.2f} "
            "below the line)"
        )
    else:
        console.print("[bold yellow]INCONCLUSIVE[/]: " + "; ".join(report.reasons))
