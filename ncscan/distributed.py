"""Run a scan's label chunks as Ray tasks (`ncscan scan --ray`, `ncscan scan-many --ray`).

Ray is an optional extra (`pip install 'ncscan[ray]'`): it is imported here only, inside
the functions that need it, and nothing else in ncscan imports this module at import time.

The driver (the process that runs `ncscan`) prepares the model as for a local scan (load,
convert, parity check, data), plans the label chunks with `plan_chunks` and the seeds with
`chunk_seed`, exactly as the local loop would, and sends every chunk to the cluster as one
task. A worker rebuilds the pixel-space model from the ONNX file's bytes (cached per worker
process) and runs `reverse_chunk`: on CPU workers a chunk's traces are bit-identical to the
local scan's (same chunk, same seed, one thread). The statistics, attack success and the
verdict are computed in the driver once every chunk is back.

Why rebuild instead of pickling the torch module: an onnx2torch GraphModule does pickle
(checked on the fixtures), but the rebuild depends only on ncscan being installed on the
workers, not on the driver's torch/fx internals matching the workers', and the ONNX bytes
are what identifies the model anyway.

Fault tolerance: tasks are retried by Ray when their worker process dies (`max_retries`);
an exception raised by the code inside a task is not retried (it would fail the same way)
and is re-raised in the driver as itself.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ClusterError, ConfigError, NcscanError
from .reverse import LabelTrace, Progress, ReverseConfig

INSTALL_HINT = "install ncscan[ray] (pip install 'ncscan[ray]')"
TASK_RETRIES = 3
CONNECT_TIMEOUT_S = 5.0
POLL_S = 0.25


def import_ray() -> Any:
    """Import Ray or fail with a one-line user error.

    Raises:
        ConfigError: Ray is not installed.
    """
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"--ray needs Ray, which is not installed; {INSTALL_HINT}") from e
    return ray


def _probe(address: str, timeout: float) -> None:
    """Fail fast when a host:port cluster address cannot be reached (ray.init would retry
    for a long time before giving up)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(
            f"--ray {address!r} is not an address; use auto, local, HOST:PORT or ray://HOST:PORT"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, (socket.timeout, TimeoutError)) else (e.strerror or type(e).__name__)
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} ({why}); start it with `ray start --head` "
            "or check --ray"
        ) from e


@contextmanager
def _native_stderr_muted() -> Iterator[None]:
    """Silence file descriptor 2 for the duration: Ray's C++ client logs every failed
    connection attempt there (one line a second), which would bury the one-line error."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


@dataclass
class RayBackend:
    """A connection to a Ray cluster that turns label chunks into Ray tasks.

    Use `connect()` to make one; `runner` is what `ncscan.scanner.scan(runner=...)` takes.
    """

    address: str
    ray: Any
    owns_ray: bool  # we called ray.init, so close() shuts it down
    gpus: float
    cpus: float
    retries: int = TASK_RETRIES
    # The function each Ray task runs (default `_chunk_task`); a wrapper may replace it, e.g. to
    # add logging on the workers (the tests wrap it in one that kills its worker once).
    chunk_task: Callable[..., tuple[list[LabelTrace], int]] | None = field(default=None, repr=False)
    _task: Any = field(default=None, repr=False)

    @property
    def device(self) -> str:
        """Where the chunks run: "cuda" when the cluster has GPUs (one per task), else "cpu"."""
        return "cuda" if self.gpus >= 1 else "cpu"

    @property
    def slots(self) -> int:
        """How many chunks the cluster runs at once (one per GPU, else one per CPU)."""
        return max(1, int(self.gpus if self.gpus >= 1 else self.cpus))

    def task_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"max_retries": self.retries, "retry_exceptions": False}
        if self.device == "cuda":
            opts.update(num_gpus=1, num_cpus=1)
        else:
            opts.update(num_cpus=1)
        return opts

    def remote_task(self) -> Any:
        if self._task is None:
            self._task = self.ray.remote(self.chunk_task or _chunk_task)
        return self._task

    def runner(self, prep: Any) -> RayChunkRunner:
        """A ChunkRunner for one prepared model (ships its ONNX bytes and data once)."""
        return RayChunkRunner(self, prep)

    def close(self) -> None:
        """Disconnect (and stop the local cluster if this backend started it)."""
        if self.owns_ray and self.ray.is_initialized():
            self.ray.shutdown()

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(address: str, *, timeout: float = CONNECT_TIMEOUT_S) -> RayBackend:
    """Connect to a Ray cluster.

    Args:
        address: "auto" (the cluster `ray start` runs on this machine), "local" (start a
            private one-machine cluster for this run), "HOST:PORT" or "ray://HOST:PORT".
            When Ray is already initialised in this process (e.g. by a test or a notebook),
            that connection is used whatever the address.
        timeout: seconds to wait for a HOST:PORT address to accept a connection.

    Returns:
        The backend; call `close()` (or use it as a context manager) when done.

    Raises:
        ConfigError: Ray is not installed, or the cluster cannot be reached.
    """
    ray = import_ray()
    owns = False
    if not ray.is_initialized():
        import logging

        addr = (address or "").strip()
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
        if addr == "local":
            kwargs.update(include_dashboard=False)
            target: str | None = None
        elif addr == "auto":
            target = "auto"
        else:
            _probe(addr, timeout)
            target = addr
        try:
            with _native_stderr_muted():
                ray.init(address=target, **kwargs)
        except NcscanError:
            raise
        except Exception as e:  # ConnectionError, RuntimeError, ValueError from ray.init
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(
                f"cannot connect to the Ray cluster at {address} ({first}); start one with "
                "`ray start --head`, or use --ray local"
            ) from e
        owns = True
    res = ray.cluster_resources()
    return RayBackend(
        address=address, ray=ray, owns_ray=owns, gpus=float(res.get("GPU", 0.0)), cpus=float(res.get("CPU", 1.0))
    )


def _model_files(path: Path, proto: Any) -> dict[str, bytes]:
    """The .onnx file and any external-data files beside it, by name relative to it."""
    from onnx import TensorProto

    from .model import all_tensors

    files = {path.name: path.read_bytes()}
    for t in all_tensors(proto):
        if t.data_location == TensorProto.EXTERNAL:
            loc = next((kv.value for kv in t.external_data if kv.key == "location"), None)
            if loc and loc not in files:
                files[loc] = (path.parent / loc).read_bytes()
    return files


class RayChunkRunner:
    """Runs one prepared model's label chunks as Ray tasks (a `ncscan.reverse.ChunkRunner`)."""

    def __init__(self, backend: RayBackend, prep: Any) -> None:
        import onnx

        ray = backend.ray
        self.backend = backend
        om = prep.onnx
        # load_onnx may already have pulled external data into prep.onnx.proto; re-read the
        # header only to list the side files.
        header = onnx.load(str(om.path), load_external_data=False)
        self.files_ref = ray.put(_model_files(Path(om.path), header))
        self.spec = {
            "key": f"{om.sha256}:{prep.preprocess!r}:{prep.output}:{om.input.batch}",
            "name": Path(om.path).name,
            "layout": om.input.layout,
            "preprocess": prep.preprocess,
            "channels": om.input.channels,
            "output_is_prob": prep.output == "probabilities",
            "static_batch_one": om.input.batch == 1,
            "output_name": om.output_name,  # the scores of a multi-output model
        }
        self.x_ref = ray.put(prep.x.cpu())
        self.y_ref = ray.put(None if prep.y is None else prep.y.cpu())
        self.device_name = f"ray:{backend.device}"

    def __call__(
        self,
        chunks: list[list[int]],
        seeds: list[int],
        cfg: ReverseConfig,
        *,
        progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[tuple[list[LabelTrace], int]]:
        ray = self.backend.ray
        task = self.backend.remote_task().options(**self.backend.task_options())
        refs = [
            task.remote(self.files_ref, self.spec, self.x_ref, self.y_ref, lab, cfg, s, self.backend.device)
            for lab, s in zip(chunks, seeds)
        ]
        where = {r: i for i, r in enumerate(refs)}
        out: list[tuple[list[LabelTrace], int] | None] = [None] * len(refs)
        pending = list(refs)
        total = sum(len(c) for c in chunks)
        done = passes = 0
        try:
            while pending:
                if should_stop is not None and should_stop():
                    raise KeyboardInterrupt
                ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
                for r in ready:
                    res = _get(ray, r, chunks[where[r]])
                    out[where[r]] = res
                    done += len(chunks[where[r]])
                    passes += res[1]
                    if progress is not None:
                        progress(Progress(labels_done=done, labels_total=total, step=0,
                                          active=total - done, passes=passes))
        except BaseException:
            for r in pending:
                try:
                    ray.cancel(r, force=True)
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
            raise
        return [o for o in out if o is not None]


def _get(ray: Any, ref: Any, labels: list[int]) -> tuple[list[LabelTrace], int]:
    """ray.get with Ray's wrappers turned back into ncscan's errors."""
    from ray import exceptions as rex

    try:
        traces, passes = ray.get(ref)
    except rex.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise
    except rex.RayError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClusterError(
            f"the Ray task for labels {labels[0]}..{labels[-1]} failed after {TASK_RETRIES} retries "
            f"({type(e).__name__}: {first[:160]}); check the workers' memory and `ray logs`"
        ) from e
    # Arrays come back as read-only views of Ray's object store: own them.
    return [replace(t, trigger=replace(t.trigger, mask=np.array(t.trigger.mask), pattern=np.array(t.trigger.pattern)))
            for t in traces], int(passes)


# ------------------------------------------------------------------ worker side

_CACHE: OrderedDict[str, torch.nn.Module] = OrderedDict()
_CACHE_MAX = 4
_CACHE_LOCK = threading.Lock()


def _worker_model(files: dict[str, bytes], spec: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the pixel-space model from the ONNX bytes, once per worker process."""
    from .model import convert, load_onnx
    from .preprocess import PixelModel

    key = spec["key"]
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    with tempfile.TemporaryDirectory(prefix="ncscan-ray-") as td:
        for name, data in files.items():
            p = Path(td) / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        om = load_onnx(Path(td) / spec["name"], layout=spec["layout"], output_name=spec.get("output_name"))
        net = convert(om)
    pm = PixelModel(
        net, spec["preprocess"], spec["channels"],
        output_is_prob=spec["output_is_prob"], static_batch_one=spec["static_batch_one"],
    )
    pm.eval()
    with _CACHE_LOCK:
        _CACHE[key] = pm
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    return pm


def _chunk_task(
    files: dict[str, bytes],
    spec: dict[str, Any],
    x: torch.Tensor,
    y: torch.Tensor | None,
    labels: list[int],
    cfg: ReverseConfig,
    seed: int,
    device: str,
) -> tuple[list[LabelTrace], int]:
    """One Ray task: reverse one chunk of labels (runs on a worker)."""
    from .reverse import reverse_chunk

    try:
        import ray

        n = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)
    except Exception:  # noqa: BLE001 - outside a Ray worker
        n = 1
    # One thread per CPU the task was given: several tasks share a node, and oversubscribed
    # BLAS/OpenMP threads make every task slower.
    torch.set_num_threads(max(1, n))
    model = _worker_model(files, spec)
    dev = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
    return reverse_chunk(model, x, y, labels, cfg, seed=seed, device=dev)
