"""Atomic file output: write to a temp file in the target directory, then rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputError


def _external_data_files(model: Path) -> list[Path]:
    """The side files an .onnx model keeps its weights in (best effort; [] if unreadable)."""
    files = [model.with_name(model.name + ".data")]
    try:
        import onnx

        from .model import external_locations

        files += [model.parent / loc for loc in external_locations(onnx.load(str(model), load_external_data=False))]
    except Exception:  # not a readable model: the scan itself will say so
        pass
    return files


def refuse_inputs(
    path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None], *, writes_images: bool = False
) -> None:
    """Raise OutputError when writing `path` would overwrite or pollute an input: a model, its
    external-data files, a data file, or an image (or, with `writes_images`, a folder of
    images) inside a data folder, which the next scan would read as clean data."""
    from .data import IMAGE_EXTS

    try:
        out = Path(path).resolve()
    except OSError:
        return
    for i in inputs:
        if i is None:
            continue
        try:
            src = Path(i).resolve()
            if src.is_dir():
                inside = out == src or src in out.parents
                if inside and (writes_images or out.suffix.lower() in IMAGE_EXTS | {".npz"}):
                    raise OutputError(
                        f"output {path} is inside the data folder {i}, where the next scan would read it "
                        "as clean data; write it somewhere else"
                    )
                continue
            if out == src:
                raise OutputError(f"output {path} is the input {i}; choose another output path")
            side = _external_data_files(src) if src.suffix.lower() == ".onnx" else []
            if any(out == f.resolve() for f in side):
                raise OutputError(
                    f"output {path} is the weights file of the input model {i}; choose another output path"
                )
        except OSError:
            continue


def check_output_path(path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Path:
    """Validate an output path before any work is done.

    Raises:
        OutputError: the directory is missing or not writable, or the path is (part of) an input.
    """
    p = Path(path)
    refuse_inputs(p, inputs)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"output directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory {parent} is not writable; choose another --output")
    if p.is_dir():
        raise OutputError(f"output {p} is a directory; give a file name")
    return p


def _proc_umask() -> int | None:
    """The umask from /proc/self/status (Linux >= 4.7), or None where it is not published."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _import_umask() -> int:
    # os.umask() can only be read by setting it, which is process-global and races with
    # threads creating files; done once, at import, and only where /proc has no answer.
    mask = _proc_umask()
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _import_umask()


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file now: 0o666 minus the umask
    (read live from /proc where possible, else as it was when ncscan was imported)."""
    mask = _proc_umask()
    return 0o666 & ~(_UMASK_AT_IMPORT if mask is None else mask)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + fsync + rename).

    The file gets the mode a normal write would give it (0o666 minus the user's umask):
    mkstemp creates its temp file 0600, which another user (a serving container, a CI step)
    could not read. This is the one writer of every file ncscan produces (reports, trigger
    images, patched and exported models).
    """
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=str(p.parent or "."))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))
