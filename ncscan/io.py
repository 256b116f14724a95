"""Atomic file output: write to a temp file in the target directory, then rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import OutputError


def check_output_path(path: str | os.PathLike[str], inputs: list[str | os.PathLike[str]] = ()) -> Path:  # type: ignore[assignment]
    """Validate an output path before any work is done.

    Raises:
        OutputError: the directory is missing or not writable, or the path is an input.
    """
    p = Path(path)
    for i in inputs:
        try:
            if p.resolve() == Path(i).resolve():
                raise OutputError(f"output {p} is the input {i}; choose another output path")
        except OSError:
            pass
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


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + fsync + rename)."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=str(p.parent or "."))
    try:
        with os.fdopen(fd, "wb") as f:
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
    atomic_write_bytes(path, text.encode("utf-8"))
