"""The codebase's shape (issue #18): short functions, modules that import on their own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

MAX_LINES = 120  # a function (signature, docstring and body) fits on one screen or two
# Functions allowed to stay longer, each with the reason (keep this list short).
LONG_OK: dict[str, str] = {
    "ncscan/patch.py:patch": "the public API: 35 keyword parameters and their docstring are ~130 of its lines; "
    "the body calls the named stages",
}


def _modules() -> list[Path]:
    return sorted(p for d in ("ncscan", "adapters") for p in (ROOT / d).rglob("*.py"))


def _functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((f"{path.relative_to(ROOT)}:{node.name}", node.end_lineno - node.lineno + 1))
    return out


def test_no_function_is_longer_than_a_screen_or_two() -> None:
    long = {name: n for p in _modules() for name, n in _functions(p) if n > MAX_LINES and name not in LONG_OK}
    assert long == {}, f"split these (or list them in LONG_OK with a reason): {long}"


@pytest.mark.slow
def test_every_module_imports_on_its_own() -> None:
    """Each module first in a fresh interpreter: an import cycle fails only when the module
    that closes it is imported first (as `python -c 'import ncscan.cli_patch'` once did)."""
    failed = {}
    for p in _modules():
        mod = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if mod == "adapters" or mod.startswith("adapters."):
            mod = "ncscan." + mod  # the adapters ship as ncscan.adapters
        if mod.endswith("__main__"):
            continue
        r = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True, timeout=300,
                           check=False)
        if r.returncode != 0:
            failed[mod] = r.stderr.strip().splitlines()[-1:]
    assert failed == {}
