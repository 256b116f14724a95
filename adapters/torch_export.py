"""PyTorch -> ONNX via `torch.onnx.export` (dynamo or legacy TorchScript exporter).

Named `torch_export` so that `import torch` inside this package can never resolve here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ncscan.errors import ConfigError, ModelError
from ncscan.tfcompat import block_triton_after_tensorflow

from ._common import (
    DEFAULT_OPSET,
    PARITY_RTOL,
    ExportResult,
    Preprocessing,
    check_output_path,
    complete_export,
    load_with_external,
    require,
    sample_shape_from,
)

INPUT_NAME = "input"
OUTPUT_NAME = "output"


def _example_shape_from_program(ep: Any) -> tuple[int, ...] | None:
    ex = getattr(ep, "example_inputs", None)
    if not ex:
        return None
    args = ex[0] if isinstance(ex, tuple) and len(ex) == 2 else ex
    if len(args) != 1:
        return None
    shape = getattr(args[0], "shape", None)
    if shape is None or len(shape) != 4:
        return None
    try:
        return tuple(int(s) for s in shape[1:])
    except (TypeError, ValueError):
        return None


def export_recipe(shape: Sequence[int] | None, path: str = "model.pt2") -> str:
    """The Python line that saves a torch.export program `ncscan export --from torch` takes
    with a dynamic batch. The example batch is 2: torch specialises a dimension whose
    example size is 0 or 1, so a batch-1 example cannot become dynamic."""
    c, h, w = (str(v) for v in shape) if shape is not None and len(shape) == 3 else ("C", "H", "W")
    return (
        f"torch.export.save(torch.export.export(model.eval(), (torch.randn(2, {c}, {h}, {w}),), "
        f"dynamic_shapes=({{0: torch.export.Dim('batch')}},)), '{path}')"
    )


def _program_batch(ep: Any) -> int | None:
    """The fixed batch size a torch.export program was traced with (None: symbolic)."""
    sig = ep.graph_signature
    user = set(sig.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            val = node.meta.get("val")
            shape = getattr(val, "shape", None)
            if shape is not None and len(shape) >= 1 and isinstance(shape[0], int):
                return int(shape[0])
            return None
    return None


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the named loggers to ERROR for the duration (their levels are restored)."""
    saved = [(lg, lg.level) for lg in (logging.getLogger(n) for n in names)]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _run_export(
    torch: Any, model: Any, x: Any, tmp: Path, *, dynamo: bool, opset: int
) -> tuple[Any, list[str]]:
    warns: list[str] = []
    if dynamo:
        require("onnxscript", "torch-export")
        batch = torch.export.Dim("batch", min=1, max=65536)
        kwargs: dict[str, Any] = {
            "dynamo": True,
            "opset_version": opset,
            "input_names": [INPUT_NAME],
            "output_names": [OUTPUT_NAME],
            "external_data": False,
            "verbose": False,
        }
        # The dynamo exporter and onnxscript log their fallbacks (with tracebacks) even when
        # they succeed; the exported graph is checked by complete_export either way.
        with _quiet_loggers("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
            if isinstance(model, torch.export.ExportedProgram):
                # A saved program has its shapes fixed at torch.export time (checked earlier
                # that its batch is symbolic); export it as it is.
                prog = torch.onnx.export(model, (), str(tmp), **kwargs)
            else:
                prog = torch.onnx.export(model, (x,), str(tmp), dynamic_shapes=({0: batch},), **kwargs)
        del prog
    else:
        if isinstance(model, torch.export.ExportedProgram):
            raise ConfigError(
                "a torch.export program can only go through the dynamo exporter; pass dynamo=True"
            )
        torch.onnx.export(
            model,
            (x,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    return load_with_external(tmp), warns


def _batch_plan(program: Any, shape: tuple[int, ...]) -> tuple[bool, list[str]]:
    """(dynamic batch?, notes) for a torch.export program: a traced batch of 1 is kept (its
    shapes, e.g. a flatten's view(1, -1), are baked in); any other fixed batch is refused."""
    fixed = _program_batch(program)
    if fixed is None:
        return True, []
    if fixed != 1:
        raise ModelError(
            f"the torch.export program was traced with a fixed batch of {fixed}, which a "
            f"scanner cannot feed; save it with a dynamic batch: {export_recipe(shape)}"
        )
    return False, [
        "the torch.export program has a fixed batch of 1, kept in the ONNX model: "
        "ncscan scans it one image at a time (slower); for a dynamic batch save it "
        f"with {export_recipe(shape)}"
    ]


def _export_proto(torch: Any, model: Any, example: Any, *, dynamo: bool, opset: int) -> tuple[Any, list[str]]:
    """torch.onnx.export into a temporary file; any exporter failure becomes one line."""
    exporter = "torch-dynamo" if dynamo else "torch-legacy"
    with tempfile.TemporaryDirectory(prefix="ncscan-export-") as td:
        try:
            return _run_export(torch, model, example, Path(td) / "model.onnx", dynamo=dynamo, opset=opset)
        except (ModelError, ConfigError):
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = "try dynamo=False" if dynamo else "try dynamo=True"
            raise ModelError(
                f"torch.onnx.export ({exporter}) failed: {first[:300]}; check --input-shape; from Python, {hint}"
            ) from e


def to_onnx(
    model: Any,
    path: str | os.PathLike[str],
    *,
    preprocess: Any = None,
    input_shape: Sequence[int] | str | None = None,
    layout: str = "NCHW",
    dynamo: bool = True,
    opset: int | None = None,
    class_names: Sequence[str] | None = None,
    verify: bool = True,
    rtol: float = PARITY_RTOL,
    seed: int = 0,
) -> ExportResult:
    """Export a PyTorch image classifier to ONNX with ncscan's preprocessing metadata.

    Args:
        model: an `nn.Module`, a TorchScript module (`torch.jit.load`) or a
            `torch.export.ExportedProgram`. It is put in eval mode.
        path: output `.onnx` file (written atomically, one file, weights embedded).
        preprocess: a `Preprocessing`, a dict with pixel_range/mean/std/channel_order/
            class_names, or an `ncscan.preprocess.Preprocess`.
        input_shape: per-image shape, (C, H, W) for NCHW or (H, W, C) for NHWC. Optional for
            an ExportedProgram (taken from its example input).
        layout: "NCHW" (PyTorch's usual) or "NHWC" if the module takes channels-last.
        dynamo: True for the `torch.export`-based exporter, False for the legacy
            TorchScript one (needed for TorchScript modules on some torch versions).
        opset: target opset (default 17; the dynamo exporter may only reach 18, then the
            result keeps its own and a warning says so).
        class_names: overrides preprocess.class_names.
        verify: run torch and onnxruntime on random inputs (batch 1 and 5) and raise
            `ConversionMismatchError` if they differ by more than `rtol` of max |output|.

    Returns:
        ExportResult (path, opset, IR version, max parity diff, metadata written).
    """
    block_triton_after_tensorflow()  # torch.onnx/torch.export import torch._dynamo -> triton
    torch = require("torch", "torch-export")
    out = check_output_path(path)
    layout = layout.upper()
    if layout not in ("NCHW", "NHWC"):
        raise ConfigError(f"layout must be NCHW or NHWC, got {layout!r}")
    pre = Preprocessing.coerce(preprocess, class_names=class_names)
    target_opset = opset if opset is not None else DEFAULT_OPSET

    is_program = isinstance(model, torch.export.ExportedProgram)
    is_script = isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction))
    if not (is_program or is_script or isinstance(model, torch.nn.Module)):
        raise ModelError(
            f"expected a torch.nn.Module, TorchScript module or torch.export program, got "
            f"{type(model).__name__}"
        )
    what = "C,H,W" if layout == "NCHW" else "H,W,C"
    shape = sample_shape_from(input_shape, what)
    if shape is None and is_program:
        shape = _example_shape_from_program(model)
    if shape is None:
        raise ConfigError(
            f"the model's input shape is unknown; pass --input-shape {what} (Python: input_shape=), e.g. 3,224,224"
        )
    dynamic_batch, notes = _batch_plan(model, shape) if is_program else (True, [])
    if is_program:
        runner = model.module()
    else:
        if hasattr(model, "eval"):
            model.eval()
        runner = model

    def reference(x: Any) -> Any:
        with torch.no_grad():
            y = runner(torch.from_numpy(x))
        if isinstance(y, (tuple, list)):
            y = y[0]
        return y.detach().float().cpu().numpy()

    example = torch.from_numpy(pre.random_inputs(2, shape, layout, seed))
    exporter = "torch-dynamo" if dynamo else "torch-legacy"
    proto, warns = _export_proto(torch, model, example, dynamo=dynamo, opset=target_opset)
    return complete_export(
        proto,
        out,
        dynamic_batch=dynamic_batch,
        preprocessing=pre,
        layout=layout,
        exporter=exporter,
        opset=target_opset,
        reference=reference,
        sample_shape=shape,
        verify=verify,
        seed=seed,
        rtol=rtol,
        what="torch",
        extra_warnings=[*notes, *warns],
    )


def load_file(source: Path) -> tuple[Any, bool]:
    """Load a model file that needs no user code: a torch.export program (.pt2) or TorchScript.

    Returns:
        (model, is_program)
    """
    block_triton_after_tensorflow()
    torch = require("torch", "torch-export")
    if not source.is_file():
        raise ModelError(
            f"{source} is not a file; pass a TorchScript (.pt) or torch.export (.pt2) file"
        )
    errors = []
    if source.suffix.lower() == ".pt2":
        try:
            return torch.export.load(str(source)), True
        except Exception as e:  # noqa: BLE001
            errors.append(
                f"torch.export.load: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            )
    try:
        return torch.jit.load(str(source), map_location="cpu"), False
    except Exception as e:  # noqa: BLE001
        errors.append(f"torch.jit.load: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if source.suffix.lower() != ".pt2" and zipfile.is_zipfile(source):
        try:
            return torch.export.load(str(source)), True
        except Exception:  # noqa: BLE001, S110 - reported below as "neither ... nor"
            pass
    raise ModelError(
        f"{source} is neither TorchScript nor a torch.export program (a pickled nn.Module or "
        "state_dict needs its Python class to load); where the model is loaded, save it with "
        f"{export_recipe(None)} (C,H,W: one image's shape) and run ncscan export --from torch "
        "model.pt2 -o model.onnx, or call ncscan.adapters.torch_export.to_onnx(model, "
        "'model.onnx', input_shape=(C, H, W)) there"
        + (f" [{errors[0][:200]}]" if source.suffix.lower() == ".pt2" and errors else "")
    )
