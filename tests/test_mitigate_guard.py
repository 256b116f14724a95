"""The patch guard (issue #16 item 3): before/after measured by k-fold cross-fitting on ALL
the clean images, the accuracy drop with a paired interval, and a decision that accepts a
patch that really costs < 1 point and refuses one that really costs > 3, on a fixed
300-image folder, judged on 2,000 held-out images never used for patching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ncscan.patch import Check, Outcomes, fold_ids, guard, paired_drop

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
MODEL = FIX / "models" / "mnist_badnets_square.onnx"
SCAN = FIX / "data" / "mnist" / "scan"  # 300 images
TEST = FIX / "data" / "mnist" / "test.npz"  # 2,000 images, never used for patching
TARGET = 7


# ---------------------------------------------------------------- the statistic (pure)


def test_paired_drop_counts_only_changed_images():
    before = np.array([True] * 290 + [False] * 10)
    after = before.copy()
    after[:6] = False  # 6 lost
    after[295:297] = True  # 2 gained
    drop, lo, hi = paired_drop(before, after)
    assert drop == pytest.approx(100 * 4 / 300)
    # 8 changed of 300: the standard error is about 1 point, so a 90% interval ~3.3 wide
    assert lo < drop < hi and 2.5 < hi - lo < 4.0
    # the same net change from more churn is less certain
    after2 = before.copy()
    after2[:24] = False
    after2[290:300] = True
    after2[24:30] = False  # 30 lost, 10 gained: net 20 -> drop 6.7 points
    d2, lo2, hi2 = paired_drop(before, after2)
    assert d2 == pytest.approx(100 * 20 / 300) and hi2 - lo2 > hi - lo


def test_paired_drop_no_change_has_a_width():
    c = np.ones(300, dtype=bool)
    drop, lo, hi = paired_drop(c, c)
    assert drop == 0.0 and lo < 0.0 < hi


def test_fold_ids_balanced_and_seeded():
    ids = fold_ids(300, 5, seed=0)
    assert sorted(np.bincount(ids).tolist()) == [60] * 5
    assert np.array_equal(ids, fold_ids(300, 5, seed=0))
    assert not np.array_equal(ids, fold_ids(300, 5, seed=1))
    assert set(np.bincount(fold_ids(11, 5, seed=0)).tolist()) == {2, 3}


def _check(lost: int, asr_hits: int = 0, n: int = 300) -> Check:
    y = np.zeros(n, dtype=np.int64)
    y[: n // 2] = 1
    before = Outcomes(correct=np.ones(n, dtype=bool), hits={0: np.zeros(n, dtype=bool)})
    c = np.ones(n, dtype=bool)
    c[:lost] = False
    h = np.zeros(n, dtype=bool)
    h[:asr_hits] = True  # labels 1: not the target, so they count
    return Check(y=y, before=before, after=Outcomes(correct=c, hits={0: h}), folds=5)


def test_guard_decides_on_the_estimate():
    assert guard(_check(lost=5), max_accuracy_drop=2.0) == []  # 1.7 points
    r = guard(_check(lost=7), max_accuracy_drop=2.0)  # 2.3 points
    assert len(r) == 1 and "2.3 points" in r[0] and "interval" in r[0] and "cross-fitting" in r[0]
    r = guard(_check(lost=0, asr_hits=9), max_accuracy_drop=2.0)  # 9/150 = 6% > 5%
    assert len(r) == 1 and "6.0%" in r[0]


# ---------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A scan report carrying the REVERSED trigger of label 7 (only that label reversed)."""
    from ncscan.scanner import encode_trigger, scan

    torch.set_num_threads(2)
    rep = scan(MODEL, SCAN, labels=[TARGET], device="cpu", seed=0)
    lr = rep.by_label[TARGET]
    d = rep.to_dict()
    d["flagged"] = [TARGET]
    d["labels"] = [{**lr.to_dict(), "flagged": True, "trigger": encode_trigger(lr.trigger)}]
    p = tmp_path_factory.mktemp("rep") / "scan.json"
    p.write_text(json.dumps(d))
    return p


def _true_drop(out: Path) -> float:
    """Clean-accuracy drop in points on the 2,000 test images, in onnxruntime."""
    import onnxruntime as ort

    z = np.load(TEST)
    x = z["x"].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    y = z["y"]
    accs = []
    for p in (MODEL, out):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        accs.append(
            float((s.run(["output"], {s.get_inputs()[0].name: x})[0].argmax(1) == y).mean())
        )
    return (accs[0] - accs[1]) * 100.0


def test_cross_check_restores_the_original_weights(report):
    """The folds' patches never leak into the written model: after cross-fitting the network
    holds its original weights, and the check covered every image once."""
    from ncscan.export import snapshot
    from ncscan.inputs import InputOptions
    from ncscan.mitigate.layers import find_layer, tensor_links
    from ncscan.mitigate.prune import PruneConfig
    from ncscan.patch import Plan, cross_check, labelled_images, prepare_context, source_triggers
    from ncscan.reverse import preset

    ctx = prepare_context(MODEL, SCAN, seed=0, device="cpu", folds=5, inputs=InputOptions(), say=lambda s: None)
    source_triggers(
        ctx, MODEL, report=report, labels=None, rcfg=preset("fast"), device="cpu", inputs=InputOptions()
    )
    x, y, _ = labelled_images(ctx)
    original = snapshot(ctx.net)
    lay = find_layer(ctx.om.proto, ctx.net, None)
    plan = Plan(
        unlearn=None,
        unlearn_rounds=1,
        rcfg=None,
        prune=True,
        input_filter=True,
        max_accuracy_drop=2.0,
        fpr=0.05,
        top_fraction=0.01,
        min_neurons=8,
        prune_cfg=PruneConfig(fine_tune_steps=20),  # the fine-tune's weights must be restored too
        prune_layer=lay,
    )
    chk = cross_check(
        ctx,
        x,
        y,
        plan,
        folds=5,
        links=tensor_links(ctx.net, ctx.om.proto),
        original=original,
        lay=lay,
        fpm=ctx.pm,
    )
    assert chk.n == 300 and chk.after.flagged_clean is not None
    now = snapshot(ctx.net)
    assert all(torch.equal(now[k], v) for k, v in original.items())
    # pruning zeroed some neurons in each fold: the folds' predictions differ from the original's
    assert chk.accuracy(chk.before) != chk.accuracy(chk.after) or any(
        not np.array_equal(chk.before.hits[t], chk.after.hits[t]) for t in chk.before.hits
    )
    fpr, _, by = chk.filter_rates()
    assert 0.0 <= fpr <= 0.1 and set(by) == {TARGET}


@pytest.mark.slow
def test_guard_accepts_a_cheap_patch_and_refuses_a_costly_one(report, tmp_path):
    """On the fixed 300-image folder: the default unlearning, whose true cost on 2,000 held-out
    images is within the allowed 2.0 points (measured 1.05), passes; plain fine-tuning without
    distillation (true drop > 3 points) is refused for accuracy. Both with the default guard
    (5 folds, 2.0 points). (A < 1-point case on this fixture does not exist: see
    bench/patch_results_tuning.md for the guard on < 1-point patches.)"""
    from ncscan.mitigate.unlearn import UnlearnConfig
    from ncscan.patch import patch

    good = tmp_path / "good.onnx"
    res = patch(
        MODEL, SCAN, output=good, unlearn=True, report=report, device="cpu", seed=0, force=True
    )
    true_good = _true_drop(good)
    print(
        f"default: true drop {true_good:.2f}, estimate {res.clean_accuracy_drop:.2f} {res.clean_accuracy_drop_interval}"
    )
    assert true_good < 2.0
    assert res.guard_passed, res.guard_reasons

    bad = tmp_path / "bad.onnx"
    res = patch(
        MODEL,
        SCAN,
        output=bad,
        unlearn=True,
        report=report,
        device="cpu",
        seed=0,
        force=True,
        unlearn_config=UnlearnConfig(lr=1e-3, mix=0.0, distill=0.0),
    )
    true_bad = _true_drop(bad)
    print(
        f"plain fine-tuning: true drop {true_bad:.2f}, estimate {res.clean_accuracy_drop:.2f} {res.clean_accuracy_drop_interval}"
    )
    assert true_bad > 3.0
    assert not res.guard_passed and any("accuracy dropped" in r for r in res.guard_reasons)
    lo, hi = res.clean_accuracy_drop_interval
    assert lo <= res.clean_accuracy_drop <= hi
