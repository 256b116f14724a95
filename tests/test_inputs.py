"""InputOptions: one object for the preprocessing and data-reading choices (issue #18)."""

from __future__ import annotations

import pytest

from ncscan.inputs import MAX_IMAGES, InputOptions, input_options


def test_keyword_arguments_override_the_object_and_none_keeps_it():
    base = InputOptions(pixel_range=(0, 255), mean=(0.5,), max_images=500)
    out = input_options(base, pixel_range=None, mean=(0.1,), layout="NHWC")
    assert out.pixel_range == (0, 255) and out.mean == (0.1,) and out.layout == "NHWC"
    assert out.max_images == 500  # the keyword left at its default keeps the object's cap
    assert input_options(base, max_images=None).max_images is None  # None: no cap
    assert input_options(None).max_images == MAX_IMAGES


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match="pixelrange"):
        InputOptions().overridden(pixelrange=(0, 1))


def test_scan_many_merges_the_run_and_the_job_options():
    from ncscan.many import run_inputs

    kw = {"inputs": InputOptions(mean=(0.5,)), "pixel_range": (0, 255), "seed": 3}
    base = run_inputs(kw)
    assert kw == {"seed": 3}  # what is left goes to scan as is
    assert base == InputOptions(pixel_range=(0, 255), mean=(0.5,))
    job = base.overridden(pixel_range=(0.0, 1.0), channel_order="BGR")
    assert job.pixel_range == (0.0, 1.0) and job.mean == (0.5,) and job.channel_order == "BGR"
