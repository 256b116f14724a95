"""Reverse-engineer one trigger per label, many labels in one forward/backward.

Each label t has its own mask, pattern, Adam state, cost lambda, schedule state and best
result. A mini-batch stacks B clean images for every active label (images of class t
left out of t's batches when labels are known), stamps each label's trigger on its own
images, and runs them through the network as one batch of A*B images. Losses are summed
over labels: the parameters are disjoint, so each label receives exactly the gradient it
would get alone. Labels that early-stop leave the batch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from . import schedule as sched
from .fastgraph import for_gradients
from .optim import RowAdam
from .preprocess import PixelModel
from .trigger import Trigger, from_raw, to_raw


@dataclass(frozen=True)
class ReverseConfig:
    """Optimisation hyperparameters.

    Attributes:
        lr: Adam learning rate (paper: 0.1).
        betas: Adam betas (paper: 0.5, 0.9).
        batch_size: images per label per mini-batch (paper: 32).
        mini_batches: mini-batches per schedule step (paper: 31, one pass over ~1000 images).
        max_steps: cap on schedule steps per label (paper: 1000).
        schedule: the cost schedule (see `ncscan.schedule`).
        label_chunk: labels optimised together; None = fit to the memory budget.
        memory_budget_mb: activation memory to aim for when choosing the chunk; None = 1 GiB
            on CPU, half the free memory on a GPU (at most 40 GiB).
        verify_images: before a step's mask becomes a label's best, its attack success is
            re-checked on this many fixed images (forward only); 0 disables. The step's own
            estimate comes from the few mini-batches it saw while the mask was changing,
            and taking the minimum norm over many noisy estimates would favour lucky steps.
        name: "fast" (ncscan's default) or "reference" (the original algorithm).
    """

    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    batch_size: int = 32
    mini_batches: int = 4
    max_steps: int = 300
    schedule: sched.ScheduleConfig = field(default_factory=sched.ScheduleConfig)
    label_chunk: int | None = None
    memory_budget_mb: float | None = None
    verify_images: int = 256
    name: str = "fast"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


def preset(name: str) -> ReverseConfig:
    """Named configurations: "fast" (default) and "reference" (the original's settings,
    labels one after another)."""
    if name == "fast":
        # Steps are 4 mini-batches instead of 31, so the early-stop patience is counted in
        # shorter steps too (12 x 4 = 48 updates without improvement instead of 25 x 31).
        # Best masks are verified on fixed images (verify_images), which keeps the smaller
        # per-step sample from rewarding lucky steps. Measured on the fixtures (issue #6):
        # a lambda patience of 3 steps saved 20-40% of the passes but flagged a label of
        # combo30_clean; 4 saved ~10%; early-stop patience 9 or 10, a 1% early-stop
        # threshold, or batch 24 flipped verdicts; 3 mini-batches, batch 24 with patience 3,
        # or 128 verify images saved nothing (weaker checks let lucky steps prolong the run).
        return ReverseConfig(schedule=sched.ScheduleConfig(early_stop_patience=12))
    if name == "reference":
        return ReverseConfig(
            batch_size=32, mini_batches=31, max_steps=1000, label_chunk=1, verify_images=0, name="reference"
        )
    raise ValueError(name)


@dataclass
class LabelTrace:
    """What happened while optimising one label."""

    label: int
    trigger: Trigger  # best (or last, if no successful step)
    working: bool  # a step reached the attack-success threshold (a working trigger)
    steps: int
    early_stopped: bool
    final_cost: float


@dataclass
class Progress:
    """Sent to the progress callback after every schedule step."""

    labels_done: int
    labels_total: int
    step: int
    active: int
    passes: int  # image forward+backward passes so far


@dataclass(frozen=True)
class MemoryPlan:
    """Activation memory per image, measured on a probe pass, and the pass sizes it allows.

    Attributes:
        train_bytes_per_image: a forward+backward for the trigger's gradient: the tensors
            autograd keeps for the backward (measured on the probe pass with saved-tensor
            hooks; the network's weights excluded), the stamped image, and three times the
            largest single activation for the backward's transient gradients.
        forward_bytes_per_image: a forward without gradients: the image and three times the
            largest activation (a layer's input and output and one skip connection alive).
        budget_bytes: the activation budget (`memory_budget_mb`).
        train_images: images per forward+backward pass that fit the budget (>= 1).
        forward_images: images per forward-only pass that fit the budget (>= 1).
    """

    train_bytes_per_image: int
    forward_bytes_per_image: int
    budget_bytes: int
    train_images: int
    forward_images: int

    def to_dict(self) -> dict[str, Any]:
        mb = 2.0**20
        return {
            "train_mb_per_image": round(self.train_bytes_per_image / mb, 3),
            "forward_mb_per_image": round(self.forward_bytes_per_image / mb, 3),
            "budget_mb": round(self.budget_bytes / mb, 1),
            "train_images_per_pass": self.train_images,
            "forward_images_per_pass": self.forward_images,
        }


def probe_memory(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(train, forward) activation bytes per image, from one forward of up to 2 images with a
    trigger mask that needs a gradient, on the model's own device.

    What autograd saves is counted by storage (views of one tensor count once), leaving out
    the network's parameters and buffers; nothing is run backward.
    """
    where = next(iter(model.parameters()), None)
    if where is None:
        where = next(iter(model.buffers()), None)
    dev = where.device if where is not None else x.device
    xb = x[:2].to(dev).clone()  # not a view: a saved view would count the whole data set's storage
    n = max(1, len(xb))
    fixed = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. a tensor subclass without storage
            return t
        if st.data_ptr() not in fixed:
            saved[st.data_ptr()] = max(saved.get(st.data_ptr(), 0), int(st.nbytes()))
        return t

    biggest = [0]

    def hook(_m: Any, _i: Any, out: Any) -> None:
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                biggest[0] = max(biggest[0], o.numel() * o.element_size())

    hs = [m.register_forward_hook(hook) for m in model.modules() if len(list(m.children())) == 0]
    mask = torch.full((1, 1, *xb.shape[2:]), 0.5, device=dev, requires_grad=True)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(xb * (1 - mask) + mask * 0.5)
        del out
    finally:
        for h in hs:
            h.remove()
    img = int(xb[:1].numel() * 4)
    act = biggest[0] // n
    train = sum(saved.values()) // n + img + 3 * act
    fwd = img + 3 * act
    return max(train, 1), max(fwd, 1)


def _rss_mb() -> float | None:
    """This process's resident memory now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (getrusage; None where unavailable)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def memory_start(device: torch.device | str) -> dict[str, Any]:
    """Call before a scan: the RSS at its start, and CUDA's peak counter reset on `device`
    (torch.cuda.reset_peak_memory_stats) so that `memory_peak` reads the scan's own peak."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    return {"rss_at_start_mb": _rss_mb()}


def memory_peak(device: torch.device | str, start: dict[str, Any]) -> dict[str, Any]:
    """Peak memory after a scan: `peak_rss_mb` is the PROCESS's peak resident memory so far
    (it includes whatever the process did before the scan; `rss_at_start_mb` says how much it
    held then), `cuda_max_allocated_mb` the peak of torch's CUDA allocator since
    `memory_start` (None on CPU). Label chunks run by Ray workers are not included."""
    dev = torch.device(device)
    r = lambda v: None if v is None else round(float(v), 1)
    return {
        "peak_rss_mb": r(_peak_rss_mb()),
        "rss_at_start_mb": r(start.get("rss_at_start_mb")),
        "cuda_max_allocated_mb": r(torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda" else None,
    }


def _has_conv(model: torch.nn.Module) -> bool:
    return any(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) for m in model.modules())


def memory_budget_mb(cfg: ReverseConfig, device: torch.device | str = "cpu") -> float:
    """The activation-memory budget for choosing the chunk on `device`."""
    if cfg.memory_budget_mb is not None:
        return float(cfg.memory_budget_mb)
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return min(free / 2**20 / 2, 40 * 1024.0)
    return 1024.0


def memory_plan(
    model: torch.nn.Module, x: torch.Tensor, cfg: ReverseConfig, device: torch.device | str = "cpu"
) -> MemoryPlan:
    """Measure the model's activation memory per image (`probe_memory`) and size the passes
    to the budget for `device`."""
    train, fwd = probe_memory(model, x[:2])
    budget = int(memory_budget_mb(cfg, device) * 2**20)
    return MemoryPlan(
        train_bytes_per_image=train,
        forward_bytes_per_image=fwd,
        budget_bytes=budget,
        train_images=max(1, budget // train),
        forward_images=max(1, budget // fwd),
    )


def forward_batch(
    model: torch.nn.Module, x: torch.Tensor, device: torch.device | str = "cpu", cap: int = 512
) -> int:
    """Images per forward-only pass (no gradients): what the activation budget for `device`
    holds by `probe_memory`, at most `cap`. (At 224x224 a ResNet-50 forward of 512 images
    peaked at 6.9 GB RSS on CPU.)"""
    if len(x) == 0:
        return cap
    _train, fwd = probe_memory(model, x[:2])
    return max(1, min(cap, int(memory_budget_mb(ReverseConfig(), device) * 2**20) // fwd))


def choose_chunk(
    model: torch.nn.Module,
    x1: torch.Tensor,
    n_labels: int,
    cfg: ReverseConfig,
    device: torch.device | str = "cpu",
    plan: MemoryPlan | None = None,
) -> int:
    """Labels per batch: as many whole labels (`batch_size` images each) as one
    forward+backward pass within the activation budget holds; at least one (a label that
    alone is over the budget is split into several passes by `reverse_chunk`)."""
    if cfg.label_chunk is not None:
        return max(1, min(n_labels, cfg.label_chunk))
    plan = plan or memory_plan(model, x1, cfg, device)
    return max(1, min(n_labels, plan.train_images // cfg.batch_size))


def plan_chunks(
    model: torch.nn.Module,
    x: torch.Tensor,
    labels: list[int],
    cfg: ReverseConfig,
    device: torch.device | str = "cpu",
    plan: MemoryPlan | None = None,
) -> list[list[int]]:
    """Split `labels` into the chunks that are optimised together (sized to the memory
    budget). A chunk is the unit of work: local scans run them one after another,
    distributed scans (`ncscan.distributed`) send each to a worker."""
    chunk = choose_chunk(model, x[:2], len(labels), cfg, device, plan)
    return [labels[i : i + chunk] for i in range(0, len(labels), chunk)]


class ChunkRunner(Protocol):
    """Runs planned label chunks elsewhere (e.g. as Ray tasks) and returns, per chunk and in
    order, what `reverse_chunk` returns for it: (traces, image passes)."""

    def __call__(
        self,
        chunks: list[list[int]],
        seeds: list[int],
        cfg: ReverseConfig,
        *,
        progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[tuple[list[LabelTrace], int]]: ...


def chunk_seed(seed: int, index: int) -> int:
    """The generator seed of chunk `index`: chunk 0 uses the scan seed itself."""
    return seed if index == 0 else seed * 1_000_003 + index


def reverse_engineer(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    labels: list[int],
    cfg: ReverseConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    runner: ChunkRunner | None = None,
) -> tuple[list[LabelTrace], dict[str, Any]]:
    """Optimise a trigger for every label in `labels`.

    Args:
        model: pixel-space model (PixelModel): [N,C,H,W] in [0,1] -> logits/log-probs.
        x: clean images, float [N,C,H,W] in [0,1] (on any device).
        y: their labels (or None when unknown).
        labels: the target labels to reverse.
        cfg: hyperparameters.
        seed: seeds the initial masks/patterns and the batch sampling.
        device: where to run.
        progress: called after every step.
        should_stop: polled between mini-batches; when it returns True, raises KeyboardInterrupt.
        runner: runs the planned chunks somewhere else (`ncscan.distributed`): it gets the
            chunks, their seeds (`chunk_seed(seed, i)`) and `cfg`, and returns what
            `reverse_chunk` returns for each chunk, in order. None: one after another, here.

    Returns:
        (one trace per label in order, stats dict with "passes", "chunk" (labels in the
        first chunk) and "memory" (`MemoryPlan.to_dict()`)).
    """
    plan = memory_plan(model, x, cfg, device)
    chunks = plan_chunks(model, x, labels, cfg, device, plan)
    traces: dict[int, LabelTrace] = {}
    passes = 0
    info: dict[str, Any] = {"chunk": len(chunks[0]) if chunks else 0, "memory": plan.to_dict()}
    if runner is not None:
        seeds = [chunk_seed(seed, ci) for ci in range(len(chunks))]
        for tr, p in runner(chunks, seeds, cfg, progress=progress, should_stop=should_stop):
            passes += p
            traces.update({t.label: t for t in tr})
        return [traces[t] for t in labels], {"passes": passes, **info}
    for ci, lab in enumerate(chunks):
        tr, p = reverse_chunk(
            model, x, y, lab, cfg, seed=chunk_seed(seed, ci), device=device, progress=progress,
            should_stop=should_stop, done_before=sum(len(c) for c in chunks[:ci]), passes_before=passes,
            total=len(labels), plan=plan,
        )
        passes += p
        traces.update({t.label: t for t in tr})
    return [traces[t] for t in labels], {"passes": passes, **info}


@torch.no_grad()
def _verify(
    model: torch.nn.Module,
    x: torch.Tensor,
    images: list[torch.Tensor],
    mraw: torch.Tensor,
    praw: torch.Tensor,
    rows: np.ndarray,
    targets: torch.Tensor,
    threshold: float,
    *,
    max_images: int,
    fmt: torch.memory_format,
) -> tuple[np.ndarray, int]:
    """Whether each candidate trigger (row `rows[k]` of the raw masks/patterns) sends at
    least `threshold` of its fixed images `images[k]` to its target.

    The candidates of a step share forward passes (at most `max_images` images each) and
    are checked in two halves: a candidate that already has too many misses after the first
    half is rejected without the second. The decisions are exactly those of checking every
    image. Returns (passed per candidate, image passes spent: a forward counts a third).
    """
    n = np.array([len(v) for v in images], dtype=np.int64)
    need = np.ceil(threshold * n - 1e-9).astype(np.int64)
    hits = np.zeros(len(images), dtype=np.int64)
    alive = np.ones(len(images), dtype=bool)
    mid = (n + 1) // 2
    seen = 0
    for lo, hi in ((np.zeros_like(n), mid), (mid, n)):
        # (candidate, first, end) pieces: a candidate's half larger than `max_images` (the
        # memory plan's forward batch) is checked in several forwards.
        todo = [
            (int(k), a, min(a + max_images, int(hi[k])))
            for k in np.flatnonzero(alive & (hi > lo))
            for a in range(int(lo[k]), int(hi[k]), max(1, max_images))
        ]
        while todo:
            group, size = [], 0
            while todo and (not group or size + todo[0][2] - todo[0][1] <= max_images):
                seg = todo.pop(0)
                group.append(seg)
                size += seg[2] - seg[1]
            xs, tg = [], []
            for k, a, b in group:
                r = int(rows[k])
                m, p = from_raw(mraw[r : r + 1]), from_raw(praw[r : r + 1])
                xs.append(x[images[k][a:b].to(x.device)] * (1 - m) + m * p)
                tg.append(targets[r].expand(b - a))
            ok = (model(torch.cat(xs).contiguous(memory_format=fmt)).argmax(1) == torch.cat(tg)).cpu().numpy()
            at = 0
            for k, a, b in group:
                hits[k] += int(ok[at : at + b - a].sum())
                at += b - a
            seen += at
        # Reject those that cannot reach `need` even if every remaining image is a hit.
        alive &= hits + (n - hi) >= need
    return alive & (hits >= need), seen // 3


def _split_grads(
    model: torch.nn.Module,
    x: torch.Tensor,
    bidx: torch.Tensor,
    mraw: torch.Tensor,
    praw: torch.Tensor,
    ai: torch.Tensor,
    targets: torch.Tensor,
    cost: torch.Tensor,
    per_pass: int,
    fmt: torch.memory_format,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradient of one mini-batch's loss (sum over active labels of mean cross-entropy +
    cost * mask L1) when its A x B images do not fit one pass: equal slices of at most
    `per_pass` images, each a forward+backward of its share of the cross-entropy, the
    gradients summed; the L1 term once. Returns (mask grad, pattern grad, per-label accuracy).
    """
    A, B = bidx.shape
    n_all = A * B
    size = -(-n_all // -(-n_all // max(1, per_pass)))  # equal slices, none over per_pass
    gm = torch.zeros_like(mraw)
    gp = torch.zeros_like(praw)
    hits = torch.zeros(A, device=mraw.device)
    flat = bidx.reshape(-1)
    for s0 in range(0, n_all, size):
        rows = torch.arange(s0, min(s0 + size, n_all), device=bidx.device)
        li = rows // B  # position among the active labels
        lab_rows = ai[li.to(ai.device)]
        m = from_raw(mraw[lab_rows])  # [n,1,H,W]
        p = from_raw(praw[lab_rows])
        xs = x[flat[rows].to(x.device)] * (1 - m) + m * p
        out = model(xs.contiguous(memory_format=fmt))
        tgt = targets[lab_rows]
        ce = F.cross_entropy(out, tgt, reduction="sum") / B
        g_m, g_p = torch.autograd.grad(ce, (mraw, praw))
        with torch.no_grad():
            gm += g_m
            gp += g_p
            hits.index_add_(0, li.to(hits.device), (out.argmax(1) == tgt).float())
        del out, xs, g_m, g_p
    reg = from_raw(mraw[ai]).abs().sum(dim=(1, 2, 3))
    (g_reg,) = torch.autograd.grad((cost * reg).sum(), (mraw,))
    gm += g_reg
    return gm, gp, hits / B


@dataclass
class _Chunk:
    """The optimisation state of one chunk of labels: row i of every array is label lab[i]."""

    lab: list[int]
    cfg: ReverseConfig
    plan: MemoryPlan
    model: torch.nn.Module
    fmt: torch.memory_format
    x: torch.Tensor  # all clean images, on the device
    gen: torch.Generator  # the mini-batch sampling (after the initial masks/patterns)
    pools: dict[int, torch.Tensor]  # each label's mini-batch images (not of its own class)
    verify: dict[int, torch.Tensor]  # each label's fixed verification images
    targets: torch.Tensor
    mraw: torch.Tensor  # raw masks [L,1,H,W] (see trigger.to_raw)
    praw: torch.Tensor  # raw patterns [L,C,H,W]
    adam: RowAdam
    state: sched.ScheduleState
    best_m: np.ndarray  # each label's best mask [L,H,W] (the initial one until a success)
    best_p: np.ndarray  # and pattern [L,C,H,W]
    passes: int = 0  # image passes spent

    def running(self) -> np.ndarray:
        """The labels still being optimised: not early-stopped and under `max_steps`."""
        return ~self.state.done & (self.state.steps < self.cfg.max_steps)


def _place(model: torch.nn.Module, dev: torch.device) -> tuple[torch.nn.Module, torch.memory_format]:
    """The model made ready for gradients on `dev`, and the memory format its inputs take."""
    if isinstance(model, PixelModel):
        model = for_gradients(model)
    model = model.to(dev)
    # channels_last makes oneDNN/cuDNN convolutions markedly faster (1.5x measured on CPU
    # for the MNIST fixtures); values are unchanged.
    fmt = torch.channels_last if _has_conv(model) else torch.contiguous_format
    try:
        model = model.to(memory_format=fmt)
    except RuntimeError:  # a parameter that is not 4-D (e.g. a 5-D GroupNorm weight): keep NCHW
        fmt = torch.contiguous_format
    return model, fmt


def _image_pools(
    n: int, y: torch.Tensor | None, lab: list[int], seed: int, verify_images: int
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Each label's mini-batch pool (the images not of its class, when labels are known) and
    its fixed verification images."""
    y_np = y.cpu().numpy() if y is not None else None
    all_idx = np.arange(n)
    pools: dict[int, torch.Tensor] = {}
    verify: dict[int, torch.Tensor] = {}
    for t in lab:
        pool = all_idx if y_np is None else all_idx[y_np != t]
        if len(pool) == 0:
            pool = all_idx
        pools[t] = torch.from_numpy(pool)
        # Each label's verification images depend on (seed, label) only.
        verify[t] = torch.from_numpy(np.random.default_rng([seed, 7, t]).permutation(pool)[:verify_images])
    return pools, verify


def _start(
    model: torch.nn.Module,
    fmt: torch.memory_format,
    x: torch.Tensor,
    y: torch.Tensor | None,
    lab: list[int],
    cfg: ReverseConfig,
    plan: MemoryPlan,
    seed: int,
) -> _Chunk:
    """Seeded random masks and patterns, fresh Adam and schedule state for `lab`."""
    dev = x.device
    n, c, h, w = x.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pools, verify = _image_pools(n, y, lab, seed, cfg.verify_images)
    L = len(lab)
    init_m = torch.rand((L, 1, h, w), generator=gen)
    init_p = torch.rand((L, c, h, w), generator=gen)
    mraw = to_raw(init_m).to(dev).requires_grad_(True)
    praw = to_raw(init_p).to(dev).requires_grad_(True)
    return _Chunk(
        lab=lab, cfg=cfg, plan=plan, model=model, fmt=fmt, x=x, gen=gen, pools=pools, verify=verify,
        targets=torch.tensor(lab, device=dev), mraw=mraw, praw=praw,
        adam=RowAdam([mraw, praw], lr=cfg.lr, betas=cfg.betas),
        state=sched.ScheduleState.init(L), best_m=init_m.numpy()[:, 0].copy(), best_p=init_p.numpy().copy(),
    )


def _one_pass_grads(
    ch: _Chunk, bidx: torch.Tensor, ai: torch.Tensor, cost: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradient of one mini-batch's loss (sum over active labels of mean cross-entropy +
    cost * mask L1) in one forward+backward. Returns (mask grad, pattern grad, per-label
    accuracy)."""
    A, B = bidx.shape
    _, c, h, w = ch.x.shape
    xb = ch.x[bidx]  # [A, B, C, H, W]
    m = from_raw(ch.mraw[ai])  # [A,1,H,W]
    p = from_raw(ch.praw[ai])  # [A,C,H,W]
    xs = xb * (1 - m[:, None]) + m[:, None] * p[:, None]
    out = ch.model(xs.reshape(A * B, c, h, w).contiguous(memory_format=ch.fmt))
    tgt = ch.targets[ai].repeat_interleave(B)
    ce = F.cross_entropy(out, tgt, reduction="none").view(A, B).mean(1)
    reg = m.abs().sum(dim=(1, 2, 3))
    loss = (ce + cost * reg).sum()
    gm, gp = torch.autograd.grad(loss, (ch.mraw, ch.praw))
    with torch.no_grad():
        acc = (out.argmax(1) == tgt).float().view(A, B).mean(1)
    return gm, gp, acc


def _mini_batch(ch: _Chunk, act_idx: np.ndarray, ai: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """One Adam update of the active labels on a fresh mini-batch each (in several passes
    when it is over the memory plan). Returns each active label's accuracy on its batch."""
    cfg = ch.cfg
    bidx = torch.stack(
        [ch.pools[ch.lab[i]][torch.randint(len(ch.pools[ch.lab[i]]), (cfg.batch_size,), generator=ch.gen)]
         for i in act_idx]
    ).to(ch.x.device)
    if len(act_idx) * cfg.batch_size <= ch.plan.train_images:
        gm, gp, acc = _one_pass_grads(ch, bidx, ai, cost)
    else:
        gm, gp, acc = _split_grads(
            ch.model, ch.x, bidx, ch.mraw, ch.praw, ai, ch.targets, cost, ch.plan.train_images, ch.fmt
        )
    ch.passes += len(act_idx) * cfg.batch_size
    ch.adam.step([gm, gp], ai)
    return acc


def _verified(ch: _Chunk, active: np.ndarray, acc: np.ndarray, l1: np.ndarray) -> np.ndarray | None:
    """Which labels' current masks pass the check on their fixed images (True for those that
    are not candidates for a new best); None when verification is off."""
    cfg = ch.cfg
    if cfg.verify_images <= 0:
        return None
    L = len(ch.lab)
    cand = active & (acc >= cfg.schedule.attack_succ_threshold) & (l1 < ch.state.best_l1)
    rows = np.flatnonzero(cand)
    ok, spent = _verify(
        ch.model, ch.x, [ch.verify[ch.lab[i]] for i in rows], ch.mraw, ch.praw, rows, ch.targets,
        cfg.schedule.attack_succ_threshold, max_images=min(L * cfg.batch_size, ch.plan.forward_images),
        fmt=ch.fmt,
    )
    verified = np.ones(L, dtype=bool)
    verified[rows] = ok
    ch.passes += spent
    return verified


def _schedule_step(
    ch: _Chunk, active: np.ndarray, should_stop: Callable[[], bool] | None
) -> None:
    """One schedule step: `mini_batches` updates of the active labels, then the cost
    schedule (lambda, early stop) on the step's accuracy and mask L1, and a new best for
    each label whose (verified) mask improved."""
    dev = ch.x.device
    L = len(ch.lab)
    act_idx = np.flatnonzero(active)
    ai = torch.from_numpy(act_idx).to(dev)
    acc_sum = torch.zeros(len(act_idx), device=dev)
    cost = torch.from_numpy(ch.state.cost[act_idx]).float().to(dev)
    for _ in range(ch.cfg.mini_batches):
        if should_stop is not None and should_stop():
            raise KeyboardInterrupt
        acc_sum += _mini_batch(ch, act_idx, ai, cost)
    with torch.no_grad():
        cur_m = from_raw(ch.mraw[ai])
        l1 = cur_m.sum(dim=(1, 2, 3)).double().cpu().numpy()
        acc = (acc_sum / ch.cfg.mini_batches).double().cpu().numpy()
    full_acc = np.zeros(L)
    full_l1 = np.full(L, np.inf)
    full_acc[act_idx] = acc
    full_l1[act_idx] = l1
    verified = _verified(ch, active, full_acc, full_l1)
    ch.state, improved = sched.step(ch.state, full_acc, full_l1, ch.cfg.schedule, active=active, verified=verified)
    if improved.any():
        with torch.no_grad():
            imp = np.flatnonzero(improved)
            ti = torch.from_numpy(imp).to(dev)
            ch.best_m[imp] = from_raw(ch.mraw[ti])[:, 0].cpu().numpy()
            ch.best_p[imp] = from_raw(ch.praw[ti]).cpu().numpy()


def _traces(ch: _Chunk) -> list[LabelTrace]:
    """Each label's result: its best trigger, or its last one when no step succeeded."""
    with torch.no_grad():
        last_m = from_raw(ch.mraw)[:, 0].cpu().numpy()
        last_p = from_raw(ch.praw).cpu().numpy()
    state = ch.state
    traces: list[LabelTrace] = []
    for i, t in enumerate(ch.lab):
        working = bool(np.isfinite(state.best_l1[i]))
        trig = Trigger(
            mask=(ch.best_m[i] if working else last_m[i]).astype(np.float32),
            pattern=(ch.best_p[i] if working else last_p[i]).astype(np.float32),
        )
        traces.append(LabelTrace(
            label=t,
            trigger=trig,
            working=working,
            steps=int(state.steps[i]),
            early_stopped=bool(state.done[i]),
            final_cost=float(state.cost[i]),
        ))
    return traces


def reverse_chunk(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    lab: list[int],
    cfg: ReverseConfig,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    done_before: int = 0,
    passes_before: int = 0,
    total: int | None = None,
    plan: MemoryPlan | None = None,
) -> tuple[list[LabelTrace], int]:
    """Optimise the labels of one chunk together. Deterministic given (seed, lab) on CPU.

    A mini-batch (len(lab) x batch_size images) larger than `plan.train_images` is run as
    several forward+backward passes whose gradients are summed (the same gradient, in
    less memory); otherwise as one pass.

    Args:
        plan: the activation-memory plan (default: measured here on the model).

    Returns:
        (one trace per label of `lab`, image passes spent)
    """
    dev = torch.device(device)
    model, fmt = _place(model, dev)
    x = x.to(dev)
    if plan is None:
        plan = memory_plan(model, x, cfg, dev)
    total = len(lab) if total is None else total
    ch = _start(model, fmt, x, y, lab, cfg, plan, seed)
    while (active := ch.running()).any():
        _schedule_step(ch, active, should_stop)
        if progress is not None:
            running = ch.running()
            progress(
                Progress(
                    labels_done=done_before + int((~running).sum()),
                    labels_total=total,
                    step=int(ch.state.steps.max()),
                    active=int(running.sum()),
                    passes=passes_before + ch.passes,
                )
            )
    return _traces(ch), ch.passes


@torch.no_grad()
def attack_success(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    triggers: dict[int, Trigger],
    *,
    device: torch.device | str = "cpu",
    batch: int | None = None,
    max_images: int | None = None,
) -> dict[int, float]:
    """Fraction of clean images (not of the target class) sent to the target by each trigger
    (on the first `max_images` of those images, when given). `batch`: images per forward
    (default: `forward_batch`, at most 512)."""
    dev = torch.device(device)
    out: dict[int, float] = {}
    if batch is None:
        batch = forward_batch(model, x, dev) if triggers else 512
    for t, trig in triggers.items():
        m = torch.from_numpy(trig.mask).to(dev)
        p = torch.from_numpy(trig.pattern).to(dev)
        keep = torch.ones(len(x), dtype=torch.bool) if y is None else (y.cpu() != t)
        xs = x[keep.to(x.device)]
        if max_images is not None:
            xs = xs[:max_images]
        if len(xs) == 0:
            out[t] = float("nan")
            continue
        hits = 0
        for i in range(0, len(xs), batch):
            xb = xs[i : i + batch].to(dev)
            pred = model(xb * (1 - m) + m * p).argmax(1)
            hits += int((pred == t).sum())
        out[t] = hits / len(xs)
    return out


@torch.no_grad()
def predict(
    model: torch.nn.Module, x: torch.Tensor, *, device: torch.device | str = "cpu", batch: int | None = None
) -> torch.Tensor:
    """argmax predictions for [0,1] images (`batch` per forward; default `forward_batch`)."""
    dev = torch.device(device)
    if batch is None:
        batch = forward_batch(model, x, dev)
    preds = [model(x[i : i + batch].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch)]
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


