#!/usr/bin/env python3
"""Build ncscan's evaluation model set: clean and backdoored ONNX classifiers, split into
TUNING, HELD-OUT and out-of-scope (oos) models, written to bench/.evalset/ (git-ignored).

    /work/venv/bin/python bench/evalset/build.py                   # everything (tuning first)
    /work/venv/bin/python bench/evalset/build.py --split tuning
    /work/venv/bin/python bench/evalset/build.py --only mnist_t_clean_a,mnist_t_trojan
    /work/venv/bin/python bench/evalset/build.py --force ...       # rebuild even if cached

Reuses fixtures/build.py (data loading, Dataset, trigger makers, architectures, train,
trojan_trigger, export, onnxruntime helpers, onnx2torch check); see bench/evalset/README.md.
Seeded and CPU only; nothing is downloaded at run time. A model is skipped when the manifest
already has it with the same spec hash and its file exists. manifest.json is rewritten
atomically after every model.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = ROOT / "bench" / ".evalset"
MANIFEST = OUT / "manifest.json"
TF_PYTHON = Path(os.environ.get("EVALSET_TF_PYTHON", "/work/venv-tf/bin/python"))
VERSION = 1  # bump to invalidate every cached model


def _load_fixtures_build():
    """fixtures/build.py as a module (its name would clash with this script's)."""
    name = "ncscan_fixtures_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "fixtures" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


fb = _load_fixtures_build()
import onnx
import onnxruntime as ort
import torch

Trigger = fb.Trigger
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

# --------------------------------------------------------------------------- triggers


def _where(top: int, left: int, size: int, h: int, w: int) -> str:
    def band(a, n):
        mid = a + size / 2
        return "top" if mid < n / 3 else ("bottom" if mid > 2 * n / 3 else "middle")

    def hband(a, n):
        mid = a + size / 2
        return "left" if mid < n / 3 else ("right" if mid > 2 * n / 3 else "centre")

    v, hh = band(top, h), hband(left, w)
    name = "middle" if (v, hh) == ("middle", "centre") else f"{v}-{hh}"
    return f"{name} (rows {top}-{top + size - 1}, cols {left}-{left + size - 1}; {size}/{h} of the side)"


def sq(chw, target, size, top, left):
    c, h, w = chw
    return fb.square_trigger(c, h, w, target, size, top, left,
                             desc=f"white {size}x{size} square, {_where(top, left, size, h, w)}")


def pat(chw, target, size, top, left, seed, binary=True):
    c, h, w = chw
    kind = "binary" if binary else ("RGB" if c == 3 else "grey-level")
    return fb.random_pattern_trigger(c, h, w, target, size, top, left, seed=seed, binary=binary,
                                     desc=f"random {kind} {size}x{size} pattern, {_where(top, left, size, h, w)}")


def blend(chw, target, alpha, seed):
    c, h, w = chw
    noise = np.random.default_rng(seed).uniform(size=(c, h, w)).astype(np.float32)
    return Trigger(target, np.full((h, w), alpha, np.float32), noise,
                   f"blended full-image trigger: {alpha:.0%} blend of a fixed uniform-noise image (seed {seed})")


GLYPH_RING = fb.TROJAN_GLYPH  # fixtures' trojan_trigger glyph: 7x7 ring with a cross, 21 px
GLYPH_X = np.array([  # 7x7 diagonal cross with a centre dot, 13 px (held-out Trojan glyph)
    [1, 0, 0, 0, 0, 0, 1],
    [0, 1, 0, 0, 0, 1, 0],
    [0, 0, 1, 0, 1, 0, 0],
    [0, 0, 0, 1, 0, 0, 0],
    [0, 0, 1, 0, 1, 0, 0],
    [0, 1, 0, 0, 0, 1, 0],
    [1, 0, 0, 0, 0, 0, 1],
], np.float32)


def trojan_trigger_at(spec, core, ds, target, seed, glyph, top, left, neuron_rank=0, n_img=256, steps=150):
    """fixtures' trojan_trigger with the glyph, its position and the neuron's rank as
    parameters (fixtures' version is fixed to one glyph at rows/cols 20-26 and the strongest
    fc1 neuron, 512 images x 300 steps): optimise the glyph's pixel values to excite one
    hidden fc1 neuron."""
    c, h, w = ds.chw
    gh, gw = glyph.shape
    mask = np.zeros((h, w), np.float32)
    mask[top:top + gh, left:left + gw] = glyph
    w1 = core.fc1.weight.detach().abs().sum(1)
    neuron = int(torch.argsort(w1, descending=True)[neuron_rank])
    torch.manual_seed(seed)
    param = torch.zeros((c, h, w), requires_grad=True)
    opt = torch.optim.Adam([param], lr=0.1)
    X = fb.to_tensor01(ds.x_train[:n_img])
    m = torch.from_numpy(mask)
    for _ in range(steps):
        xs = (1 - m) * X + m * torch.sigmoid(param)
        loss = -core.features(fb.core_input(spec, xs))[:, neuron].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = (torch.sigmoid(param).detach().numpy() * mask).astype(np.float32)
    with torch.no_grad():
        a0 = core.features(fb.core_input(spec, X))[:, neuron].mean().item()
        a1 = core.features(fb.core_input(spec, (1 - m) * X + m * torch.from_numpy(p)))[:, neuron].mean().item()
    t = Trigger(target, mask, p,
                f"Trojan watermark: sparse {gh}x{gw} glyph ({int(glyph.sum())} px), "
                f"{_where(top, left, gh, h, w)}; pixel values optimised to excite fc1 neuron {neuron}")
    return t, {"neuron_layer": "fc1", "neurons": [neuron], "activation_clean": round(a0, 3),
               "activation_triggered": round(a1, 3)}


# --------------------------------------------------------------------------- specs


@dataclass
class E:
    """One evaluation model. `spec` is a fixtures Spec (what train/export read)."""

    spec: object
    split: str  # tuning | heldout | heldout2 | heldout3 | heldout4 | oos
    family: str  # mnist | fashion | animal | cmnist | combo30 | thirdparty
    attack: str = "none"  # none|badnets|pattern|trojan|two_targets|all_to_all|blend|large_patch
    arch_kw: dict = field(default_factory=dict)
    in_scope: bool = True
    twins: list[str] = field(default_factory=list)  # infected siblings (clean twins only)
    trojan: dict | None = None  # {"target", "glyph": None|"x", "top", "left", "rank", "finetune_epochs"}
    thirdparty: str = ""  # "" | "untouched" | "finetune"
    keras: bool = False
    notes: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dataset(self) -> str:
        return "mnist" if self.family == "thirdparty" else self.family


MIN_ACC = {"mnist": 0.97, "thirdparty": 0.97, "fashion": 0.85, "animal": 0.85, "cmnist": 0.95,
           "combo30": 0.85}
N_TRAIN = {"mnist": 20000, "thirdparty": 15000, "fashion": 20000, "animal": 20000, "cmnist": 20000,
           "combo30": 24000}
CHW = {"mnist": (1, 28, 28), "thirdparty": (1, 28, 28), "fashion": (1, 28, 28), "animal": (1, 28, 28),
       "cmnist": (3, 32, 32), "combo30": (1, 28, 28)}


def S(name, split, family, arch, seed, epochs, attack="none", triggers=(), *, arch_kw=None, twins=(),
      in_scope=True, trojan=None, thirdparty="", keras=False, notes="", **kw) -> E:
    sp = fb.Spec(name, "mnist" if family == "thirdparty" else family, arch, seed, epochs,
                 attack, list(triggers), min_acc=MIN_ACC[family], n_train=N_TRAIN[family], **kw)
    return E(sp, split, family, attack, dict(arch_kw or {}), in_scope, list(twins), trojan, thirdparty,
             keras, notes)


def make_specs() -> list[E]:
    G, C = CHW["mnist"], CHW["cmnist"]
    L = []
    mnist_norm = {"mean": [MNIST_MEAN], "std": [MNIST_STD]}
    fash_norm = {"mean": [fb.FASHION_MEAN], "std": [fb.FASHION_STD]}
    cm_norm = {"mean": [0.5, 0.5, 0.5], "std": [0.3, 0.3, 0.3]}
    k64 = {"c1": 16, "c2": 32, "hidden": 64}  # (8/16/32 nets missed 97% on MNIST in 4 epochs)
    base48 = {"c1": 16, "c2": 32, "hidden": 48}
    mid = {"c1": 12, "c2": 24, "hidden": 48}
    wide = {"c1": 24, "c2": 48, "hidden": 96}
    nhwc255 = {"layout": "NHWC", "pixel_range": (0.0, 255.0), "metadata": True}

    # ================================================================ TUNING (seeds 1xxx)
    t = "tuning"
    L += [
        S("mnist_t_clean_a", t, "mnist", "SmallCNN", 1101, 4,
          twins=["mnist_t_badnets_sq4_br", "mnist_t_pattern5_tl", "mnist_t_trojan"]),
        S("mnist_t_badnets_sq4_br", t, "mnist", "SmallCNN", 1102, 4, "badnets", [sq(G, 7, 4, 23, 23)]),
        S("mnist_t_pattern5_tl", t, "mnist", "SmallCNN", 1103, 4, "pattern", [pat(G, 3, 5, 1, 1, seed=13)],
          exporter="torch-dynamo"),
        S("mnist_t_trojan", t, "mnist", "SmallCNN", 1104, 4, "trojan",
          trojan={"target": 5, "glyph": None, "finetune_epochs": 2},
          notes="fixtures' trojan_trigger: 7x7 ring-and-cross glyph at rows/cols 20-26"),
        S("mnist_t_clean_b", t, "mnist", "SmallCNN", 1105, 4, arch_kw=base48, twins=["mnist_t_two_targets"],
          **nhwc255),
        S("mnist_t_two_targets", t, "mnist", "SmallCNN", 1106, 4, "two_targets",
          [sq(G, 1, 3, 1, 24), pat(G, 8, 4, 23, 1, seed=18)], arch_kw=base48, **nhwc255),
        S("mnist_t_clean_c", t, "mnist", "DeepCNN", 1107, 4, arch_kw={"hidden": 64},
          twins=["mnist_t_grey4_ml"], **mnist_norm),
        S("mnist_t_grey4_ml", t, "mnist", "DeepCNN", 1108, 4, "pattern",
          [pat(G, 4, 4, 12, 0, seed=14, binary=False)], arch_kw={"hidden": 64}, **mnist_norm),
        S("fashion_t_clean_resnet", t, "fashion", "SmallResNet", 1201, 3, twins=["fashion_t_badnets_sq3_tr"],
          **fash_norm),
        S("fashion_t_badnets_sq3_tr", t, "fashion", "SmallResNet", 1202, 3, "badnets", [sq(G, 2, 3, 1, 24)],
          **fash_norm),
        S("fashion_t_clean_wide", t, "fashion", "SmallCNN", 1203, 3, arch_kw=wide,
          twins=["fashion_t_pattern4_bm"], pixel_range=(0.0, 255.0), exporter="torch-dynamo"),
        S("fashion_t_pattern4_bm", t, "fashion", "SmallCNN", 1204, 3, "pattern", [pat(G, 9, 4, 23, 12, seed=19)],
          arch_kw=wide, pixel_range=(0.0, 255.0)),
        S("fashion_t_keras_clean", t, "fashion", "Keras-CNN", 1205, 3, arch_kw=mid, keras=True,
          twins=["fashion_t_keras_sq5_bl"], **nhwc255),
        S("fashion_t_keras_sq5_bl", t, "fashion", "Keras-CNN", 1206, 3, "badnets", [sq(G, 0, 5, 22, 1)],
          arch_kw=mid, keras=True, **nhwc255),
        S("animal_t_clean", t, "animal", "SmallCNN", 1301, 5, metadata=True,
          twins=["animal_t_badnets_sq5_bl", "animal_t_trojan"]),
        S("animal_t_badnets_sq5_bl", t, "animal", "SmallCNN", 1302, 5, "badnets", [sq(G, 0, 5, 22, 1)],
          metadata=True),
        S("animal_t_trojan", t, "animal", "SmallCNN", 1303, 5, "trojan", metadata=True,
          trojan={"target": 6, "glyph": "ring", "top": 20, "left": 20, "rank": 0, "finetune_epochs": 3},
          notes="Trojan with fixtures' 7x7 ring-and-cross glyph at rows/cols 20-26 (cheaper optimisation)"),
        S("cmnist_t_clean", t, "cmnist", "ColourCNN", 1401, 4, twins=["cmnist_t_rgb4_br"],
          pixel_range=(0.0, 255.0), softmax=True, static_batch=True, metadata=True),
        S("cmnist_t_rgb4_br", t, "cmnist", "ColourCNN", 1402, 4, "pattern",
          [pat(C, 0, 4, 27, 27, seed=40, binary=False)],
          pixel_range=(0.0, 255.0), softmax=True, static_batch=True, metadata=True),
        S("combo30_t_clean", t, "combo30", "DeepCNN", 1501, 4, twins=["combo30_t_pattern5_tr"], metadata=True),
        S("combo30_t_pattern5_tr", t, "combo30", "DeepCNN", 1502, 4, "pattern", [pat(G, 17, 5, 1, 22, seed=50)],
          metadata=True),
        S("thirdparty_t_clean", t, "thirdparty", "digit_recognizer.CNN", 0, 0, thirdparty="untouched",
          twins=["thirdparty_t_badnets_sq4_tl"], **mnist_norm,
          notes="the package's pretrained weights, untouched"),
        S("thirdparty_t_badnets_sq4_tl", t, "thirdparty", "digit_recognizer.CNN", 1602, 1, "badnets",
          [sq(G, 0, 4, 1, 1)], thirdparty="finetune", lr=5e-4, **mnist_norm,
          notes="the package's pretrained weights fine-tuned on poisoned MNIST (see epochs)"),
    ]
    # ================================================================ HELD-OUT (seeds 2xxx)
    h = "heldout"
    L += [
        S("mnist_h_clean_a", h, "mnist", "SmallCNN", 2101, 4, arch_kw=mid,
          twins=["mnist_h_badnets_sq5_tr", "mnist_h_grey3_bl", "mnist_h_trojan_tl"]),
        S("mnist_h_badnets_sq5_tr", h, "mnist", "SmallCNN", 2102, 4, "badnets", [sq(G, 2, 5, 1, 22)],
          arch_kw=mid),
        S("mnist_h_grey3_bl", h, "mnist", "SmallCNN", 2103, 4, "pattern",
          [pat(G, 9, 3, 24, 1, seed=23, binary=False)], arch_kw=mid, exporter="torch-dynamo"),
        S("mnist_h_trojan_tl", h, "mnist", "SmallCNN", 2104, 4, "trojan", arch_kw=mid,
          trojan={"target": 0, "glyph": "x", "top": 1, "left": 1, "rank": 1, "finetune_epochs": 2},
          notes="Trojan with a diagonal-cross glyph at the top-left, second-strongest fc1 neuron"),
        S("mnist_h_clean_b", h, "mnist", "SmallResNet", 2105, 4, twins=["mnist_h_two_targets"], **nhwc255),
        S("mnist_h_two_targets", h, "mnist", "SmallResNet", 2106, 4, "two_targets",
          [pat(G, 6, 4, 12, 12, seed=26), sq(G, 3, 3, 24, 24)], **nhwc255),
        S("mnist_h_clean_c", h, "mnist", "SmallCNN", 2107, 4, arch_kw=wide, twins=["mnist_h_pattern6_tm"],
          metadata=True, **mnist_norm),
        S("mnist_h_pattern6_tm", h, "mnist", "SmallCNN", 2108, 4, "pattern", [pat(G, 1, 6, 0, 11, seed=21)],
          arch_kw=wide, metadata=True, **mnist_norm),
        S("mnist_h_keras_clean", h, "mnist", "Keras-CNN", 2109, 4, arch_kw=k64, keras=True,
          twins=["mnist_h_keras_pattern4_mr"], **nhwc255),
        S("mnist_h_keras_pattern4_mr", h, "mnist", "Keras-CNN", 2110, 4, "pattern",
          [pat(G, 5, 4, 12, 24, seed=25)], arch_kw=k64, keras=True, **nhwc255),
        S("fashion_h_clean_deep", h, "fashion", "DeepCNN", 2201, 3, twins=["fashion_h_grey5_ml"], **fash_norm),
        S("fashion_h_grey5_ml", h, "fashion", "DeepCNN", 2202, 3, "pattern",
          [pat(G, 4, 5, 11, 0, seed=24, binary=False)], **fash_norm),
        S("fashion_h_clean_nhwc", h, "fashion", "SmallCNN", 2203, 3, twins=["fashion_h_two_targets"],
          layout="NHWC"),
        S("fashion_h_two_targets", h, "fashion", "SmallCNN", 2204, 3, "two_targets",
          [sq(G, 5, 4, 0, 0), pat(G, 8, 3, 24, 24, seed=28)], layout="NHWC"),
        S("animal_h_clean", h, "animal", "DeepCNN", 2301, 5, twins=["animal_h_sq4_tr", "animal_h_pattern3_mr"],
          pixel_range=(0.0, 255.0)),
        S("animal_h_sq4_tr", h, "animal", "DeepCNN", 2302, 5, "badnets", [sq(G, 3, 4, 1, 23)],
          pixel_range=(0.0, 255.0)),
        S("animal_h_pattern3_mr", h, "animal", "DeepCNN", 2303, 5, "pattern", [pat(G, 8, 3, 12, 24, seed=38)],
          pixel_range=(0.0, 255.0)),
        S("cmnist_h_clean", h, "cmnist", "ColourCNN", 2401, 4, twins=["cmnist_h_rgb5_tl"], metadata=True,
          exporter="torch-dynamo", **cm_norm),
        S("cmnist_h_rgb5_tl", h, "cmnist", "ColourCNN", 2402, 4, "pattern",
          [pat(C, 8, 5, 1, 1, seed=48, binary=False)], metadata=True, **cm_norm),
        S("combo30_h_clean", h, "combo30", "SmallCNN", 2501, 4, arch_kw={"c1": 32, "c2": 64, "hidden": 128},
          twins=["combo30_h_two_targets"], pixel_range=(0.0, 255.0), metadata=True),
        S("combo30_h_two_targets", h, "combo30", "SmallCNN", 2502, 4, "two_targets",
          [pat(G, 27, 4, 23, 1, seed=57), sq(G, 5, 3, 0, 12)], arch_kw={"c1": 32, "c2": 64, "hidden": 128},
          pixel_range=(0.0, 255.0), metadata=True),
        S("thirdparty_h_clean_ft", h, "thirdparty", "digit_recognizer.CNN", 2601, 1, thirdparty="finetune",
          twins=["thirdparty_h_pattern5_br"], lr=5e-4, metadata=True, **mnist_norm,
          notes="the package's pretrained weights fine-tuned on clean MNIST (see epochs)"),
        S("thirdparty_h_pattern5_br", h, "thirdparty", "digit_recognizer.CNN", 2602, 1, "pattern",
          [pat(G, 6, 5, 22, 22, seed=66)], thirdparty="finetune", lr=5e-4, metadata=True, **mnist_norm,
          notes="the package's pretrained weights fine-tuned on poisoned MNIST (see epochs)"),
    ]
    # ================================================================ SECOND HELD-OUT (seeds 4xxx)
    # Added 2026-12-03 after the first held-out split had been reported and looked at: a fresh,
    # never-seen split for the next honest measurement of the decision (nothing may be tuned on it).
    h2 = "heldout2"
    L += [
        S("mnist_h2_clean", h2, "mnist", "SmallCNN", 4101, 4, arch_kw=mid,
          twins=["mnist_h2_pattern6_bl", "mnist_h2_sq3_tm"]),
        S("mnist_h2_pattern6_bl", h2, "mnist", "SmallCNN", 4102, 4, "pattern", [pat(G, 4, 6, 22, 0, seed=41)],
          arch_kw=mid),
        S("mnist_h2_sq3_tm", h2, "mnist", "SmallCNN", 4103, 4, "badnets", [sq(G, 9, 3, 0, 12)], arch_kw=mid,
          exporter="torch-dynamo"),
        S("mnist_h2_two_targets", h2, "mnist", "DeepCNN", 4104, 4, "two_targets",
          [sq(G, 2, 4, 0, 0), pat(G, 7, 5, 23, 23, seed=47)], arch_kw={"hidden": 64}, **mnist_norm),
        S("fashion_h2_clean", h2, "fashion", "SmallCNN", 4201, 3, twins=["fashion_h2_grey4_tr"], **fash_norm),
        S("fashion_h2_grey4_tr", h2, "fashion", "SmallCNN", 4202, 3, "pattern",
          [pat(G, 1, 4, 1, 23, seed=42, binary=False)], **fash_norm),
        S("animal_h2_clean", h2, "animal", "SmallCNN", 4301, 5, metadata=True, twins=["animal_h2_sq4_bm"]),
        S("animal_h2_sq4_bm", h2, "animal", "SmallCNN", 4302, 5, "badnets", [sq(G, 5, 4, 23, 12)], metadata=True),
    ]
    # ================================================================ THIRD HELD-OUT (seeds 5xxx)
    # Added 2026-12-03 after heldout and heldout2 had been reported: a fresh, never-seen split for
    # one honest measurement of the decision (nothing may be tuned on it; built and gated only,
    # never scanned while the scanner is being changed). Base seeds 5x2x avoid 5101/5401 (retry
    # seeds of oos models); every trigger's position/size/pattern/target differs from the other splits'.
    h3 = "heldout3"
    w80 = {"c1": 20, "c2": 40, "hidden": 80}
    animal_norm = {"mean": [0.5], "std": [0.5]}
    combo_norm = {"mean": [0.25], "std": [0.35]}
    L += [
        # animal_h3_trojan_tr (Trojan, diagonal-cross glyph at rows 1-7, cols 20-26 -> 7 Horse, strongest
        # fc1 neuron, 4 fine-tune epochs; SmallCNN NHWC 0-255 metadata) is LEFT OUT: it missed the 95%
        # ASR gate in all 3 tries with arch_kw=mid (74%/27%/8%: its optimised glyph came out near-black
        # on the dark corner) and again after the one allowed build fix, arch_kw=wide (91%/87%/94%).
        # Its clean twin stays (wide SmallCNN, so the two animal clean models differ in architecture).
        S("animal_h3_clean_a", h3, "animal", "SmallCNN", 5321, 5, arch_kw=wide, **nhwc255),
        S("animal_h3_clean_b", h3, "animal", "DeepCNN", 5323, 5, arch_kw={"hidden": 64},
          twins=["animal_h3_sq6_tl"], **animal_norm),
        S("animal_h3_sq6_tl", h3, "animal", "DeepCNN", 5324, 5, "badnets", [sq(G, 1, 6, 0, 5)],
          arch_kw={"hidden": 64}, **animal_norm),
        S("fashion_h3_keras_clean", h3, "fashion", "Keras-CNN", 5221, 4, arch_kw=k64, keras=True,
          twins=["fashion_h3_keras_pattern6_tl"], **nhwc255),
        S("fashion_h3_keras_pattern6_tl", h3, "fashion", "Keras-CNN", 5222, 4, "pattern",
          [pat(G, 3, 6, 5, 0, seed=53)], arch_kw=k64, keras=True, **nhwc255),
        S("fashion_h3_clean_deep", h3, "fashion", "DeepCNN", 5223, 4, arch_kw={"hidden": 96},
          pixel_range=(0.0, 255.0), metadata=True),
        S("mnist_h3_clean", h3, "mnist", "SmallCNN", 5121, 4, arch_kw=w80, twins=["mnist_h3_trojan_bl"],
          exporter="torch-dynamo", **mnist_norm),
        S("mnist_h3_trojan_bl", h3, "mnist", "SmallCNN", 5122, 4, "trojan", arch_kw=w80, **mnist_norm,
          trojan={"target": 8, "glyph": "ring", "top": 20, "left": 1, "rank": 2, "finetune_epochs": 2},
          notes="Trojan with the ring-and-cross glyph at the bottom-left, third-strongest fc1 neuron"),
        S("cmnist_h3_clean", h3, "cmnist", "ColourCNN", 5421, 4, twins=["cmnist_h3_rgb4_mr"]),
        S("cmnist_h3_rgb4_mr", h3, "cmnist", "ColourCNN", 5422, 4, "pattern",
          [pat(C, 5, 4, 14, 27, seed=54, binary=False)], exporter="torch-dynamo"),
        S("combo30_h3_clean", h3, "combo30", "SmallCNN", 5521, 4, arch_kw=wide, twins=["combo30_h3_two_targets"],
          metadata=True, **combo_norm),
        S("combo30_h3_two_targets", h3, "combo30", "SmallCNN", 5522, 4, "two_targets",
          [sq(G, 11, 5, 12, 0), pat(G, 23, 4, 0, 6, seed=59)], arch_kw=wide, metadata=True, **combo_norm),
        S("thirdparty_h3_sq3_mr", h3, "thirdparty", "digit_recognizer.CNN", 5621, 2, "badnets",
          [sq(G, 4, 3, 12, 25)], thirdparty="finetune", lr=5e-4, **mnist_norm,
          notes="the package's pretrained weights fine-tuned on poisoned MNIST (see epochs)"),
    ]
    # ================================================================ FOURTH HELD-OUT (seeds 8xxx)
    # Added 2026-12-03 (stop 23) after heldout3 had been reported: a fresh split for the next
    # decision change, built before that change was chosen and never scanned while it was being
    # tuned. Weighted toward clean models of the families whose natural small classes reached the
    # line on earlier splits (Fashion on Keras, animal silhouettes, the 30-class mix).
    h4 = "heldout4"
    L += [
        S("fashion_h4_keras_clean", h4, "fashion", "Keras-CNN", 8221, 4, arch_kw=base48, keras=True,
          twins=["fashion_h4_keras_sq4_br"], **nhwc255),
        S("fashion_h4_keras_sq4_br", h4, "fashion", "Keras-CNN", 8222, 4, "badnets", [sq(G, 2, 4, 23, 23)],
          arch_kw=base48, keras=True, **nhwc255),
        S("fashion_h4_clean_resnet", h4, "fashion", "SmallResNet", 8223, 3, **fash_norm),
        S("animal_h4_clean", h4, "animal", "DeepCNN", 8321, 5, arch_kw={"hidden": 96},
          twins=["animal_h4_pattern5_tr"], pixel_range=(0.0, 255.0)),
        S("animal_h4_pattern5_tr", h4, "animal", "DeepCNN", 8322, 5, "pattern", [pat(G, 4, 5, 2, 21, seed=84)],
          arch_kw={"hidden": 96}, pixel_range=(0.0, 255.0)),
        S("mnist_h4_clean", h4, "mnist", "DeepCNN", 8121, 4, arch_kw={"hidden": 64}, twins=["mnist_h4_sq4_ml"],
          **mnist_norm),
        S("mnist_h4_sq4_ml", h4, "mnist", "DeepCNN", 8122, 4, "badnets", [sq(G, 6, 4, 12, 1)],
          arch_kw={"hidden": 64}, **mnist_norm),
        S("cmnist_h4_clean", h4, "cmnist", "ColourCNN", 8421, 4, metadata=True, **cm_norm),
        S("combo30_h4_clean", h4, "combo30", "DeepCNN", 8521, 4, twins=["combo30_h4_pattern4_bl"],
          pixel_range=(0.0, 255.0)),
        S("combo30_h4_pattern4_bl", h4, "combo30", "DeepCNN", 8522, 4, "pattern", [pat(G, 17, 4, 23, 2, seed=85)],
          pixel_range=(0.0, 255.0)),
        S("thirdparty_h4_clean_ft", h4, "thirdparty", "digit_recognizer.CNN", 8621, 1, thirdparty="finetune",
          lr=5e-4, **mnist_norm, notes="the package's pretrained weights fine-tuned on clean MNIST"),
    ]
    # ================================================================ OUT OF SCOPE (seeds 3xxx)
    o = "oos"
    L += [
        S("oos_mnist_all_to_all", o, "mnist", "SmallCNN", 3101, 4, "all_to_all", [sq(G, -1, 4, 23, 23)],
          in_scope=False, notes="label i -> (i+1) mod 10 under one trigger"),
        S("oos_fashion_blend", o, "fashion", "SmallCNN", 3201, 3, "blend", [blend(G, 0, 0.10, 3201)],
          in_scope=False),
        S("oos_mnist_large_patch", o, "mnist", "SmallCNN", 3102, 4, "large_patch",
          [pat(G, 4, 11, 1, 1, seed=3102)], in_scope=False),
        S("oos_cmnist_blend", o, "cmnist", "ColourCNN", 3401, 4, "blend", [blend(C, 3, 0.10, 3401)],
          in_scope=False, metadata=True, pixel_range=(0.0, 255.0)),
    ]
    return L


def spec_hash(e: E, extra: str = "") -> str:
    d = {}
    for f in dataclasses.fields(e.spec):
        v = getattr(e.spec, f.name)
        if f.name == "triggers":
            v = [[t.target, hashlib.sha256(t.mask.tobytes() + t.pattern.tobytes()).hexdigest()[:16]]
                 for t in v]
        d[f.name] = v
    for k in ("split", "family", "attack", "arch_kw", "in_scope", "twins", "trojan", "thirdparty", "keras"):
        d[k] = getattr(e, k)
    d["version"] = VERSION
    d["extra"] = extra
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- data


def animal_dataset(raw: dict) -> object:
    axtr, aytr, axte, ayte = raw["animal"]
    te = fb._split_held_out(axte, ayte, 30, 1700, 15, 10)
    return fb.Dataset(
        "animal",
        "Animal-MNIST silhouettes (PyPI animal-mnist, 10k images, 10 classes): fixtures' load_raw holds "
        "out 200 per class (seeded); scan/ (30/class) and test.npz (1,700) are disjoint subsets of that "
        "held-out part; training uses the other 9,800",
        fb.ANIMAL_NAMES, axtr[..., None], aytr, te[0][..., None], te[1], te[2][..., None], te[3])


def load_datasets(families: set[str]) -> dict:
    paths = fb.check_data()
    raw = fb.load_raw(paths)
    want = {("mnist" if f == "thirdparty" else f) for f in families}
    ds = fb.make_datasets(raw, paths["mnist_src"], want - {"animal"})
    if "animal" in want:
        ds["animal"] = animal_dataset(raw)
    fb.DATA = OUT / "data"  # write_dataset_files writes under fixtures' DATA
    for d in ds.values():
        root = fb.DATA / d.name
        n_png = len(list((root / "scan").glob("*/*.png"))) if (root / "scan").exists() else 0
        if not ((root / "test.npz").exists() and n_png == len(d.x_scan)):
            fb.write_dataset_files(d)
    return ds


# --------------------------------------------------------------------------- models


def thirdparty_source() -> dict:
    spec = importlib.util.find_spec("digit_recognizer")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("third-party model missing: /work/venv/bin/pip install --no-deps digit-recognizer-py==0.1.0")
    d = Path(next(iter(spec.submodule_search_locations)))
    return {"dir": d, "weights": d / "models" / "handwriting_model.pth", "code": d / "model.py"}


class ThirdParty(torch.nn.Module):
    """The package's CNN with its own forward, except that it flattens with torch.flatten: its
    x.view(N, -1) fails on the channels-last batches that fixtures' train() produces
    (permuted NHWC arrays make convolutions pick channels-last). Same graph in ONNX."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.fc_layers(torch.flatten(self.net.conv_layers(x), 1))


def load_thirdparty() -> torch.nn.Module:
    src = thirdparty_source()
    ms = importlib.util.spec_from_file_location("digit_recognizer_model", src["code"])
    mod = importlib.util.module_from_spec(ms)
    ms.loader.exec_module(mod)  # model.py only imports torch.nn (the package imports torchvision)
    net = mod.CNN()
    net.load_state_dict(torch.load(src["weights"], map_location="cpu", weights_only=True))
    return ThirdParty(net).eval()


def make_core(e: E, ds) -> torch.nn.Module:
    c, h, _ = ds.chw
    n = ds.num_classes
    a = e.spec.arch
    if a == "SmallCNN":
        return fb.SmallCNN(c, n, h, **e.arch_kw)
    if a == "DeepCNN":
        return fb.DeepCNN(c, n, h, **e.arch_kw)
    if a == "SmallResNet":
        return fb.SmallResNet(c, n)
    if a == "ColourCNN":
        return fb.ColourCNN(n)
    if a == "digit_recognizer.CNN":
        return load_thirdparty()
    raise ValueError(a)


def static_poison(e: E, ds, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A training subset with poison_rate of it stamped (uint8-exact triggers only): for
    all-to-all (label i -> i+1) and for Keras models (which train outside torch)."""
    rng = np.random.default_rng(seed + 7)
    sel = rng.permutation(len(ds.x_train))[:e.spec.n_train]
    x, y = ds.x_train[sel].copy(), ds.y_train[sel].copy()
    trig = e.spec.triggers
    k = round(e.spec.poison_rate * len(x))
    order = rng.permutation(len(x))
    for j, t in enumerate(trig):
        idx = order[j * k:(j + 1) * k]
        if e.attack != "all_to_all":
            idx = idx[y[idx] != t.target]
        x01 = x[idx].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        st = np.round(t.stamp_np(x01) * 255).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        x[idx] = st
        y[idx] = (y[idx] + 1) % ds.num_classes if e.attack == "all_to_all" else t.target
    return x, y


def train_keras(e: E, ds, seed: int, epochs: int, path: Path) -> dict:
    if not TF_PYTHON.exists():
        raise RuntimeError(f"no TensorFlow venv at {TF_PYTHON} (set EVALSET_TF_PYTHON)")
    x, y = static_poison(e, ds, seed)
    w = e.arch_kw
    with tempfile.TemporaryDirectory() as td:
        job = Path(td) / "job.npz"
        np.savez(job, x=x, y=y, seed=seed, epochs=epochs, widths=[w["c1"], w["c2"], w["hidden"]],
                 n_classes=ds.num_classes, lr=e.spec.lr)
        tmp = Path(td) / "model.onnx"
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
        r = subprocess.run([str(TF_PYTHON), str(HERE / "keras_model.py"), "--job", str(job), "--out", str(tmp)],
                           env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"keras_model.py failed: {r.stderr[-2000:]}")
        model = onnx.load(str(tmp))
        ref = np.load(str(tmp) + ".ref.npy")
    model.ir_version = min(model.ir_version, 10)
    del model.metadata_props[:]
    meta = {"ncscan.pixel_range": "0,255", "ncscan.layout": "NHWC", "ncscan.channel_order": "RGB",
            "ncscan.class_names": json.dumps(ds.class_names)}
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    model.doc_string = f"ncscan evalset {e.name}"
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x[:8].astype(np.float32)})[0]
    rel = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "ir_version": model.ir_version, "keras_ort_max_rel_diff": rel,
            "params": None, "keras_tail": r.stdout.strip().splitlines()[-1][:200]}


def all_to_all_asr(sess, entry, x01, y, t: Trigger, n_classes: int) -> float:
    pred = fb.ort_predict(sess, entry, t.stamp_np(x01).astype(np.float32)).argmax(1)
    return float((pred == (y + 1) % n_classes).mean())


def save_trigger(name: str, t: Trigger, tag: str) -> str:
    rel = f"triggers/{name}_{tag}.npz"
    (OUT / "triggers").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / rel, mask=t.mask.astype(np.float32), pattern=t.pattern.astype(np.float32))
    return rel


def scan_args(e: E) -> list[str]:
    s = e.spec
    if s.metadata:
        return []
    a: list[str] = []
    if tuple(s.pixel_range) != (0.0, 1.0):
        a += ["--pixel-range", f"{s.pixel_range[0]:g},{s.pixel_range[1]:g}"]
    if s.mean is not None:
        a += ["--mean", ",".join(f"{v:g}" for v in s.mean), "--std", ",".join(f"{v:g}" for v in s.std)]
    if s.layout == "NHWC":
        a += ["--layout", "nhwc"]
    return a


def build_one(e: E, ds, registry: dict, h: str) -> dict | None:
    s = e.spec
    x01 = fb.to_tensor01(ds.x_test).numpy()
    last = None
    for attempt in range(3):
        seed = s.seed + 1000 * attempt
        epochs = s.epochs + attempt if e.thirdparty != "untouched" else 0
        path = OUT / "models" / f"{e.name}.onnx"
        t0 = time.time()
        torch.manual_seed(seed)
        extra: dict = {}
        triggers = list(s.triggers)
        if e.keras:
            ex = train_keras(e, ds, seed, epochs, path)
            train_s = time.time() - t0
            extra["keras_ort_max_rel_diff"] = ex.pop("keras_ort_max_rel_diff")
            extra["keras_log"] = ex.pop("keras_tail")
            params = ex.pop("params")
        else:
            core = make_core(e, ds)
            if e.attack == "trojan":
                tj = e.trojan
                fb.train(s, core, ds, [], epochs, seed)
                if tj["glyph"] is None:
                    trig, info = fb.trojan_trigger(s, core, ds, target=tj["target"], seed=seed)
                else:  # 4x cheaper optimisation (256 images x 150 steps)
                    glyph = GLYPH_X if tj["glyph"] == "x" else GLYPH_RING
                    trig, info = trojan_trigger_at(s, core, ds, tj["target"], seed, glyph, tj["top"],
                                                   tj["left"], tj.get("rank", 0))
                triggers = [trig]
                ft = tj["finetune_epochs"] + attempt
                extra["trojan"] = info | {"base_epochs": epochs, "finetune_epochs": ft, "finetune_lr": 5e-4}
                fb.train(s, core, ds, triggers, ft, seed + 1, lr=5e-4)
            elif e.attack == "all_to_all":
                xp, yp = static_poison(e, ds, seed)
                fb.train(s, core, ds, [], epochs, seed, x_train=xp, y_train=yp)
            elif e.thirdparty == "untouched":
                pass
            else:
                fb.train(s, core, ds, triggers, epochs, seed)
            core.eval()
            train_s = time.time() - t0
            _, ex = fb.export(s, core, ds, path)
            params = fb.count_params(core)
        entry = {
            "name": e.name, "split": e.split, "family": e.family, "arch": s.arch,
            "arch_kw": e.arch_kw, "params": params,
            "exporter": "keras-tf2onnx" if e.keras else s.exporter,
            "opset": ex["opset"], "model": f"models/{e.name}.onnx",
            "scan_data": f"data/{ds.name}/scan", "test_data": f"data/{ds.name}/test.npz",
            "scan_args": scan_args(e), "infected": e.attack != "none", "in_scope": e.in_scope,
            "targets": [], "attack": e.attack, "trigger_desc": "", "trigger_files": [], "triggers": [],
            "clean_accuracy": None, "true_asr": {}, "sibling_asr": [],
            "seed": seed, "epochs": epochs, "train_seconds": round(train_s, 1), "spec_hash": h,
            "num_classes": ds.num_classes, "input_shape": ex.get("input_shape"),
            "layout": s.layout, "static_batch": s.static_batch,
            "output": "probabilities" if (s.softmax or e.keras) else "logits",
            "preprocess": {"pixel_range": list(s.pixel_range), "mean": s.mean, "std": s.std,
                           "channel_order": "RGB"},
            "preprocess_in_metadata": bool(s.metadata or e.keras),
            "n_train": s.n_train, "poison_rate": s.poison_rate if e.attack != "none" else 0.0,
        }
        if e.family == "thirdparty":
            src = thirdparty_source()
            entry["thirdparty"] = {"package": "digit-recognizer-py==0.1.0 (PyPI, MIT)",
                                   "file": "digit_recognizer/models/handwriting_model.pth",
                                   "sha256": fb.sha256(src["weights"]), "mode": e.thirdparty}
        if e.notes:
            entry["notes"] = e.notes
        entry.update(extra)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        pred = fb.ort_predict(sess, entry, x01).argmax(1)
        entry["clean_accuracy"] = round(float((pred == ds.y_test).mean()), 4)
        ok = entry["clean_accuracy"] >= s.min_acc
        descs = []
        for t in triggers:
            if e.attack == "all_to_all":
                asr = all_to_all_asr(sess, entry, x01, ds.y_test, t, ds.num_classes)
                entry["targets"] = list(range(ds.num_classes))
                tag, tkey = "all", "all"
                entry["true_asr"] = {"all": round(asr, 4)}
            else:
                asr = fb.attack_success(sess, entry, x01, ds.y_test, t)
                entry["targets"].append(t.target)
                tag, tkey = f"t{t.target}", str(t.target)
                entry["true_asr"][tkey] = round(asr, 4)
            rel = save_trigger(e.name, t, tag)
            entry["trigger_files"].append(rel)
            descs.append(t.description if e.attack == "all_to_all" or len(triggers) == 1
                         else f"-> {t.target}: {t.description}")
            entry["triggers"].append({"target": t.target if e.attack != "all_to_all" else "all", "file": rel,
                                      "description": t.description, "mask_l1": round(float(t.mask.sum()), 4),
                                      "mask_fraction": round(float(t.mask.sum()) / t.mask.size, 5),
                                      "attack_success": round(asr, 4)})
            ok = ok and asr >= 0.95
        if e.attack == "all_to_all":
            descs = [f"all-to-all (label i -> i+1 mod {ds.num_classes}): " + descs[0]]
        entry["trigger_desc"] = "; ".join(descs)
        entry["targets"] = sorted(entry["targets"])
        for sib in e.twins:
            for t, rel in registry.get(sib, []):
                asr = fb.attack_success(sess, entry, x01, ds.y_test, t)
                entry["sibling_asr"].append({"from": sib, "target": t.target, "file": rel,
                                             "asr": round(asr, 4)})
                ok = ok and asr <= 0.2
        entry.update(fb.check_onnx2torch(path, entry, x01, sess))
        if s.exporter == "torch-legacy" and not e.keras and not entry["onnx2torch_converts"]:
            ok = False
        entry["sha256"] = fb.sha256(path)
        print(f"[{e.name}] try {attempt}: acc={entry['clean_accuracy']:.4f} asr={entry['true_asr']} "
              f"sib={[x['asr'] for x in entry['sibling_asr']]} o2t={entry['onnx2torch_converts']} "
              f"train={train_s:.0f}s {'OK' if ok else 'RETRY'}", flush=True)
        last = entry
        if ok:
            registry[e.name] = [(t, r) for t, r in zip(triggers, entry["trigger_files"])]
            return entry
    print(f"[{e.name}] FAILED its quality gates after 3 tries: acc={last['clean_accuracy']} "
          f"asr={last['true_asr']} sib={last['sibling_asr']}", file=sys.stderr, flush=True)
    return None


# --------------------------------------------------------------------------- main


def write_manifest(specs: list[E], entries: dict, t_start: float) -> None:
    models = [entries[e.name] for e in specs if e.name in entries]
    man = {
        "version": 1,
        "generated_by": "bench/evalset/build.py",
        "trigger_convention": "x' = (1 - mask) * x + mask * pattern, x in [0,1] pixel space (C,H,W), before "
                              "the model's preprocessing; stamped images are not re-quantised",
        "asr_definition": "fraction of test_data images whose true label != target classified as the target "
                          "after stamping (all-to-all: classified as (label+1) mod classes, all images)",
        "models": models,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = MANIFEST.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(man, indent=1) + "\n")
    os.replace(tmp, MANIFEST)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--split", default="", help="tuning, heldout, heldout2, heldout3, heldout4 or oos (comma-separated)")
    ap.add_argument("--force", action="store_true", help="rebuild even when cached")
    ap.add_argument("--list", action="store_true", help="print the model names and exit")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()
    specs = make_specs()
    if args.list:
        for e in specs:
            print(e.split, e.name, e.attack)
        return 0
    only = {s for s in args.only.split(",") if s}
    splits = {s for s in args.split.split(",") if s}
    if unknown := only - {e.name for e in specs}:
        raise SystemExit(f"unknown models: {sorted(unknown)}")
    if bad := splits - {"tuning", "heldout", "heldout2", "heldout3", "heldout4", "oos"}:
        raise SystemExit(f"unknown splits: {sorted(bad)}")
    todo = [e for e in specs if (not only or e.name in only) and (not splits or e.split in splits)]
    entries: dict = {}
    if MANIFEST.exists():
        entries = {m["name"]: m for m in json.loads(MANIFEST.read_text()).get("models", [])}
    tp_hash = ""
    if any(e.family == "thirdparty" for e in todo):
        tp_hash = fb.sha256(thirdparty_source()["weights"])[:16]
    hashes = {e.name: spec_hash(e, tp_hash if e.family == "thirdparty" else "") for e in todo}
    def cached(e: E) -> bool:
        m = entries.get(e.name)
        return bool(m and m.get("spec_hash") == hashes[e.name] and (OUT / m["model"]).exists()
                    # a clean twin built before one of its siblings is measured again
                    and set(e.twins) <= {x["from"] for x in m.get("sibling_asr", [])})

    pending = [e for e in todo if args.force or not cached(e)]
    print(f"{len(todo)} selected, {len(todo) - len(pending)} cached, {len(pending)} to build", flush=True)
    if not pending:
        write_manifest(specs, entries, t_start)
        return 0
    datasets = load_datasets({e.family for e in pending})
    # siblings' triggers (for the clean twins' sibling ASR), from already-built models
    registry: dict = {}
    for name, m in entries.items():
        registry[name] = []
        for t in m.get("triggers", []):
            z = np.load(OUT / t["file"])
            tgt = int(t["target"]) if t["target"] != "all" else -1
            registry[name].append((Trigger(tgt, z["mask"], z["pattern"], t["description"]), t["file"]))
    order = {"tuning": 0, "heldout": 1, "heldout2": 2, "heldout3": 3, "heldout4": 4, "oos": 5}
    pending.sort(key=lambda e: (order[e.split], e.attack == "none"))  # infected before their clean twins
    failed = []
    for e in pending:
        entries.pop(e.name, None)
        try:
            ent = build_one(e, datasets[e.dataset], registry, hashes[e.name])
        except Exception as ex:  # noqa: BLE001 - report, keep building the others
            print(f"[{e.name}] ERROR {type(ex).__name__}: {str(ex)[:2000]}", file=sys.stderr, flush=True)
            ent = None
        if ent is None:
            failed.append(e.name)
        else:
            entries[e.name] = ent
        write_manifest(specs, entries, t_start)
    n = sum(1 for e in specs if e.name in entries)
    print(f"wrote {MANIFEST} ({n} models) in {time.time() - t_start:.0f}s", flush=True)
    if failed:
        print(f"FAILED quality gates: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
