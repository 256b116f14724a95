"""Unit tests for the pure parts: statistics, schedule, trigger blend, preprocessing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ncscan import schedule as sched
from ncscan.errors import ConfigError
from ncscan.preprocess import PixelModel, Preprocess, parse_floats, resolve_preprocess
from ncscan.stats import CONSISTENCY, anomaly_indices
from ncscan.trigger import Trigger, blend, from_raw, to_raw

# ------------------------------------------------------------------ stats


def test_anomaly_index_matches_hand_computation() -> None:
    l1 = np.array([10.0, 50.0, 52.0, 48.0, 55.0, 45.0, 51.0, 49.0, 53.0, 47.0])
    med = np.median(l1)
    mad = CONSISTENCY * np.median(np.abs(l1 - med))
    out = anomaly_indices(l1, threshold=2.0)
    assert out.median == pytest.approx(med)
    assert out.mad == pytest.approx(mad)
    np.testing.assert_allclose(out.anomaly_index, np.abs(l1 - med) / mad)
    assert out.flagged == [0]


def test_large_outliers_are_not_flagged() -> None:
    l1 = np.array([50.0, 52.0, 48.0, 500.0, 51.0, 49.0])
    out = anomaly_indices(l1)
    assert out.anomaly_index[3] > 2
    assert out.flagged == []


def test_flagged_sorted_most_anomalous_first() -> None:
    l1 = np.array([20.0, 50.0, 5.0, 51.0, 49.0, 50.5, 49.5, 50.2])
    assert anomaly_indices(l1).flagged == [2, 0]


def test_mad_zero_is_guarded() -> None:
    l1 = np.array([40.0, 40.0, 40.0, 40.0, 3.0])
    out = anomaly_indices(l1)
    assert np.all(np.isfinite(out.anomaly_index))
    assert out.flagged == [4]
    same = anomaly_indices(np.full(6, 7.0))
    assert same.flagged == [] and np.all(same.anomaly_index == 0)


def test_nan_labels_ignored() -> None:
    l1 = np.array([np.nan, 50.0, 52.0, 48.0, 5.0, 51.0, 49.0])
    out = anomaly_indices(l1)
    assert out.flagged == [4]
    assert out.anomaly_index[0] == 0


def test_reference_sample_sets_median_and_mad() -> None:
    l1 = np.array([5.0, 50.0, 52.0, 48.0, 500.0, 51.0, 49.0, 1000.0])
    ref = np.array([False, True, True, True, False, True, True, False])
    out = anomaly_indices(l1, reference=ref)
    assert out.median == pytest.approx(50.0)
    assert out.flagged == [0]
    assert out.anomaly_index[7] > 100  # far above, never flagged


# ------------------------------------------------------------------ schedule


def _run(seq_ok: list[bool], l1s: list[float] | None = None, cfg: sched.ScheduleConfig | None = None):
    cfg = cfg or sched.ScheduleConfig()
    s = sched.ScheduleState.init(1)
    hist = []
    for i, ok in enumerate(seq_ok):
        l1 = np.array([l1s[i] if l1s else 100.0 - i])
        s, imp = sched.step(s, np.array([1.0 if ok else 0.5]), l1, cfg)
        hist.append((float(s.cost[0]), bool(imp[0]), bool(s.done[0])))
    return s, hist


def test_cost_starts_at_zero_and_arms_after_patience() -> None:
    s, hist = _run([True] * 5)
    assert [h[0] for h in hist[:4]] == [0.0] * 4
    assert hist[4][0] == pytest.approx(1e-3)


def test_cost_goes_up_after_patience_successes_and_down_after_failures() -> None:
    s, hist = _run([True] * 5 + [True] * 5 + [False] * 5)
    assert hist[9][0] == pytest.approx(2e-3)  # up x2 after 5 more successes
    assert hist[14][0] == pytest.approx(2e-3 / 2**1.5)  # down after 5 failures
    assert s.cost_up_flag[0] and s.cost_down_flag[0]


def test_cost_not_reset_every_step_once_successful() -> None:
    # ART's bug: resetting the cost on every successful step means it never rises.
    s, hist = _run([True] * 30)
    assert hist[-1][0] > 1e-3 * 2**4


def test_best_only_from_successful_steps_with_smaller_l1() -> None:
    # A failing step with a tiny mask must not become the best (TrojanZoo's bug).
    s, hist = _run([True, False, True], l1s=[50.0, 1.0, 60.0])
    assert [h[1] for h in hist] == [True, False, False]
    assert s.best_l1[0] == 50.0


def test_early_stop_needs_both_directions_and_patience() -> None:
    cfg = sched.ScheduleConfig(early_stop_patience=3)
    # Only successes: the cost never goes down, so no early stop however long.
    s, hist = _run([True] * 40, l1s=[10.0] * 40, cfg=cfg)
    assert not s.done[0]
    # Up then down, then stagnation -> stops.
    seq = [True] * 10 + [False] * 5 + [True] * 10
    s, hist = _run(seq, l1s=[10.0] * len(seq), cfg=cfg)
    assert s.done[0]


def test_schedule_is_vectorised_per_label() -> None:
    cfg = sched.ScheduleConfig()
    s = sched.ScheduleState.init(3)
    for _ in range(5):
        s, _ = sched.step(s, np.array([1.0, 0.0, 1.0]), np.array([10.0, 10.0, 10.0]), cfg, active=np.array([True, True, False]))
    assert list(s.cost) == [1e-3, 0.0, 0.0]
    assert list(s.steps) == [5, 5, 0]


# ------------------------------------------------------------------ trigger


def test_blend_formula() -> None:
    x = torch.rand(2, 3, 4, 4)
    m = torch.zeros(4, 4)
    m[1, 2] = 1.0
    m[0, 0] = 0.25
    p = torch.rand(3, 4, 4)
    out = blend(x, m, p)
    np.testing.assert_allclose(out[:, :, 1, 2], p[:, 1, 2].expand(2, 3))
    np.testing.assert_allclose(out[:, :, 3, 3], x[:, :, 3, 3])
    np.testing.assert_allclose(out[:, :, 0, 0], 0.75 * x[:, :, 0, 0] + 0.25 * p[:, 0, 0], rtol=1e-6)
    t = Trigger(mask=m.numpy(), pattern=p.numpy())
    np.testing.assert_allclose(t.apply(x.numpy()), out.numpy(), rtol=1e-6)
    assert t.l1 == pytest.approx(1.25)


def test_tanh_parameterisation_roundtrip() -> None:
    v = torch.tensor([0.001, 0.2, 0.5, 0.9, 0.999])
    np.testing.assert_allclose(from_raw(to_raw(v)), v, atol=1e-5)
    assert float(from_raw(torch.tensor(50.0))) <= 1.0
    assert float(from_raw(torch.tensor(-50.0))) >= 0.0


# ------------------------------------------------------------------ preprocessing


class _Echo(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


def test_pixel_model_applies_range_mean_std_bgr_layout() -> None:
    pp = Preprocess(pixel_range=(0, 255), mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0), channel_order="BGR", layout="NHWC")
    pm = PixelModel(_Echo(), pp.validate(3), 3)
    x = torch.rand(2, 3, 5, 6)
    got = pm.to_model_input(x)
    want = x.flip(1) * 255
    want = (want - torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)) / torch.tensor([2.0, 4.0, 8.0]).view(1, 3, 1, 1)
    want = want.permute(0, 2, 3, 1)
    assert got.shape == (2, 5, 6, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_pixel_model_log_probabilities() -> None:
    class Soft(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x.reshape(x.shape[0], -1)[:, :5], 1)

    pm = PixelModel(Soft(), Preprocess(), 1, output_is_prob=True)
    x = torch.rand(3, 1, 4, 4)
    np.testing.assert_allclose(pm(x), torch.log_softmax(x.reshape(3, -1)[:, :5], 1), atol=1e-5)


def test_static_batch_one_handled() -> None:
    class One(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape[0] == 1 or x.dim() == 3
            return x.reshape(1, -1)[:, :4] * 2

    pm = PixelModel(One(), Preprocess(), 1, static_batch_one=True)
    x = torch.rand(5, 1, 2, 2)
    np.testing.assert_allclose(pm(x), x.reshape(5, -1) * 2, rtol=1e-6)


def test_preprocess_precedence_flags_over_metadata() -> None:
    meta = {"ncscan.pixel_range": "0,255", "ncscan.mean": "0.5", "ncscan.channel_order": "BGR"}
    pp, src = resolve_preprocess(meta, "NCHW", {"mean": (0.1,), "pixel_range": None})
    assert pp.pixel_range == (0, 255) and src["pixel_range"] == "metadata"
    assert pp.mean == (0.1,) and src["mean"] == "flag"
    assert pp.channel_order == "BGR"
    pp2, _ = resolve_preprocess({"Image.NominalPixelRange": "NominalRange_0_255"}, "NCHW")
    assert pp2.pixel_range == (0, 255)


@pytest.mark.parametrize(
    "pp",
    [
        Preprocess(pixel_range=(1, 0)),
        Preprocess(mean=(0.1, 0.2)),
        Preprocess(std=(0.0,)),
        Preprocess(channel_order="BGR"),
    ],
)
def test_preprocess_rejects_contradictions(pp: Preprocess) -> None:
    with pytest.raises(ConfigError):
        pp.validate(channels=1 if pp.channel_order == "BGR" else 3)


def test_parse_floats() -> None:
    assert parse_floats("0,255", "x") == (0.0, 255.0)
    assert parse_floats("[0.5, 0.25]", "x") == (0.5, 0.25)
    with pytest.raises(ConfigError):
        parse_floats("a,b", "x")
    with pytest.raises(ConfigError):
        parse_floats("nan", "x")


def test_filter_calibration_bounds_new_data_fpr():
    """The threshold keeps the FPR on NEW clean inputs <= target in >= ~90% of draws, where
    the plain empirical quantile misses about half the time."""
    from ncscan.mitigate.filter import _max_exceedances, calibrate

    rng = np.random.default_rng(0)
    ok = plain_ok = 0
    trials = 400
    for _ in range(trials):
        s = rng.normal(size=240)
        thr, guaranteed = calibrate(s, 0.05)
        assert guaranteed
        true_fpr = 0.5 * math.erfc(thr / math.sqrt(2))  # P(N(0,1) > thr)
        ok += true_fpr <= 0.05
        plain_ok += 0.5 * math.erfc(np.quantile(s, 0.95) / math.sqrt(2)) <= 0.05
    assert ok / trials >= 0.86
    assert plain_ok / trials < 0.7
    # too few scores for the bound: the largest score, flagged as not guaranteed
    thr, guaranteed = calibrate(np.arange(20.0), 0.05)
    assert thr == 19.0 and not guaranteed
    assert _max_exceedances(45, 0.05, 0.1) == 0 and _max_exceedances(44, 0.05, 0.1) == -1
    assert calibrate(np.array([]), 0.05) == (float("inf"), False)


def test_relu_pool_swap_keeps_values_gradients_and_weights() -> None:
    from torch import fx, nn

    from ncscan.fastgraph import for_gradients

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.r1, self.p1 = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
            self.c2, self.r2, self.p2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
            self.fc = nn.Linear(4 * 2 * 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.r1(self.c1(x))
            b = self.p1(a)  # r1 has a second user below: must stay before its pool
            c = self.p2(self.r2(self.c2(b)))
            return self.fc(c.flatten(1)) + a.mean()

    torch.manual_seed(0)
    pm = PixelModel(fx.symbolic_trace(Net()), Preprocess(), 1)
    before = pm.net.code
    fast = for_gradients(pm)
    assert fast is not pm and pm.net.code == before  # the original graph is untouched
    order = [n.target for n in fast.net.graph.nodes if n.op == "call_module"]
    assert order.index("p2") < order.index("r2") and order.index("r1") < order.index("p1")
    assert fast.net.c1.weight is pm.net.c1.weight  # weights shared, not copied
    x = torch.rand(5, 1, 8, 8, requires_grad=True)
    g1, = torch.autograd.grad(pm(x).square().sum(), x)
    g2, = torch.autograd.grad(fast(x).square().sum(), x)
    assert torch.equal(pm(x), fast(x)) and torch.equal(g1, g2)
    plain = PixelModel(nn.Sequential(nn.Linear(2, 2)), Preprocess(), 1)
    assert for_gradients(plain) is plain  # not an FX graph: left alone


def test_grouped_two_half_verification_equals_checking_every_image() -> None:
    from ncscan.reverse import _verify

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(40, 1, 4, 4)
    mraw, praw = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    rows = np.array([0, 2, 3, 5])
    images = [torch.randperm(40)[:n] for n in (9, 40, 1, 17)]
    for thr in (0.0, 0.2, 0.34, 0.5, 0.99):
        got, spent = _verify(net, x, images, mraw, praw, rows, targets, thr, max_images=20, fmt=torch.contiguous_format)
        want = []
        for k, r in enumerate(rows):
            m, p = from_raw(mraw[r : r + 1]), from_raw(praw[r : r + 1])
            pred = net(x[images[k]] * (1 - m) + m * p).argmax(1)
            want.append(float((pred == targets[r]).float().mean()) >= thr)
        assert got.tolist() == want, thr
        assert spent <= sum(len(v) for v in images) // 3


# ---------------------------------------------------------------- the row-wise Adam


def _adam_pair(rows: int = 3, steps: int = 25) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """RowAdam on [rows, 4, 5] and one torch.optim.Adam per row, on the same gradients."""
    from ncscan.optim import RowAdam

    g = torch.Generator().manual_seed(0)
    p = torch.randn(rows, 4, 5, generator=g)
    ours = p.clone()
    ref = [p[i].clone().requires_grad_(True) for i in range(rows)]
    opt = RowAdam([ours], lr=0.1, betas=(0.5, 0.9))
    refs = [torch.optim.Adam([r], lr=0.1, betas=(0.5, 0.9), eps=1e-8) for r in ref]
    for s in range(steps):
        grad = torch.randn(rows, 4, 5, generator=g)
        active = torch.tensor([i for i in range(rows) if i == 0 or s % (i + 1) == 0])  # rows step at different rates
        opt.step([grad], active)
        for i in active.tolist():
            ref[i].grad = grad[i].clone()
            refs[i].step()
    return ours, [r.detach() for r in ref]


def test_row_adam_matches_torch_adam_row_by_row() -> None:
    """Each row follows torch.optim.Adam over the steps that row took (its own step count);
    float32 rounding differs because torch folds the bias corrections differently."""
    ours, ref = _adam_pair()
    for i, r in enumerate(ref):
        torch.testing.assert_close(ours[i], r, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours[1], ours[0])


def test_row_adam_leaves_inactive_rows_alone() -> None:
    from ncscan.optim import RowAdam

    p = torch.ones(3, 2)
    opt = RowAdam([p], lr=0.5, betas=(0.9, 0.999))
    opt.step([torch.ones(3, 2)], torch.tensor([1]))
    assert torch.equal(p[0], torch.ones(2)) and torch.equal(p[2], torch.ones(2))
    assert torch.allclose(p[1], torch.full((2,), 0.5))  # Adam's first step moves by lr
    assert opt.t.tolist() == [0.0, 1.0, 0.0]
