"""Exception families.

`NcscanError` and its subclasses are *user* mistakes (a bad model file, bad data, bad
flags): the CLI prints their message as one line and exits 2. Anything else escaping
the library is a bug in ncscan and exits 3.
"""

from __future__ import annotations


class NcscanError(Exception):
    """A problem with the user's input. The message names the problem and the fix."""

    exit_code = 2


class ModelError(NcscanError):
    """The model file cannot be loaded, checked, or converted."""


class UnsupportedOpsError(ModelError):
    """The model uses operators that cannot be converted to torch (all listed at once)."""

    def __init__(self, ops: list[str], hint: str = "") -> None:
        self.ops = sorted(set(ops))
        msg = f"model uses operators ncscan cannot convert to torch: {', '.join(self.ops)}"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)


class ConversionMismatchError(ModelError):
    """The torch graph disagrees with onnxruntime on the user's images."""


class DataError(NcscanError):
    """The image data is missing, unreadable, or does not fit the model."""


class ConfigError(NcscanError):
    """Flags or configuration contradict each other or are malformed."""


class OutputError(NcscanError):
    """An output path cannot be written (missing directory, read-only, equals an input)."""


class DeviceError(NcscanError):
    """The requested device is unknown or not available."""


class ClusterError(NcscanError):
    """A distributed run (--ray) failed outside ncscan's code: the cluster is unreachable,
    or a task's worker died more often than Ray retries it."""


class Interrupted(NcscanError):
    """The run was interrupted (Ctrl-C / SIGTERM); nothing partial was written."""

    exit_code = 130
