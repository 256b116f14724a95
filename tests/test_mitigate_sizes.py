"""Unlearning's augmentation sizes are fractions of the image side (issue #17): the pixel
values measured at 28-32 px stay as they were, and a 224 px input gets proportionally
larger shifts and growth instead of 1-2 px ones."""

from __future__ import annotations

import torch

from ncscan.mitigate.unlearn import UnlearnConfig, _augmented, side_pixels


def test_side_pixels_keep_the_small_image_values():
    cfg = UnlearnConfig()
    for side in (28, 32):
        assert side_pixels(cfg.mix_shift_fraction, side) == 2
        assert side_pixels(cfg.augment_grow_fraction, side) == 1
        assert side_pixels(cfg.augment_shift_fraction, side) == 1
    assert side_pixels(cfg.mix_shift_fraction, 224) == 16
    assert side_pixels(cfg.augment_grow_fraction, 224) == 8
    assert side_pixels(cfg.augment_shift_fraction, 224) == 8
    assert side_pixels(0.0, 224) == 0  # off stays off
    assert side_pixels(1 / 1000, 28) == 1  # the 1 px floor


def _extents(side: int, draws: int = 300) -> tuple[int, int]:
    """(largest centre offset, largest half-width) of a 1 px mask after augmentation."""
    cfg = UnlearnConfig()
    gen = torch.Generator().manual_seed(0)
    c = side // 2
    mask = torch.zeros(side, side)
    mask[c, c] = 1.0
    pattern = torch.zeros(1, side, side)
    max_off = max_half = 0
    for _ in range(draws):
        m, p = _augmented(mask, pattern, cfg, gen)
        assert p.shape == pattern.shape
        ys, xs = torch.nonzero(m > 0, as_tuple=True)
        cy = (int(ys.min()) + int(ys.max())) // 2
        cx = (int(xs.min()) + int(xs.max())) // 2
        max_off = max(max_off, abs(cy - c), abs(cx - c))
        max_half = max(max_half, (int(ys.max()) - int(ys.min())) // 2)
    return max_off, max_half


def test_trigger_augmentation_at_28_px():
    off, half = _extents(28)
    assert off == 1 and half == 1


def test_trigger_augmentation_scales_at_224_px():
    off, half = _extents(224)
    # up to 8 px each way (1/28 of 224), and the draws reach well past the 28 px value
    assert 4 <= off <= 8 and 4 <= half <= 8
