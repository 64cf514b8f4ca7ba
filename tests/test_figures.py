"""The figures' display convention: uint8 as it is, floats in [-1, 1], maps in [0, 1] said so explicitly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rslib.eval import figures


def test_a_bright_float_image_is_read_in_minus_one_to_one():
    """An image in [-1, 1] that happens to have no negative value is not mistaken for a [0, 1] one."""
    bright = torch.full((3, 4, 4), 0.5)  # light grey in the library's [-1, 1] convention
    shown = figures._as_display(bright)
    assert shown.shape == (4, 4, 3)
    assert np.allclose(shown, 0.75)


def test_uint8_is_shown_as_it_is_and_chw_becomes_hwc():
    img = np.arange(48, dtype=np.uint8).reshape(3, 4, 4)
    assert np.array_equal(figures._as_display(img), img.transpose(1, 2, 0))


def test_a_float_image_outside_the_range_is_refused_with_the_way_on():
    with pytest.raises(ValueError, match=r"\[-1, 1\].*unit_to_uint8"):
        figures._as_display(np.full((4, 4, 3), 200.0))


def test_unit_to_uint8_scales_and_clips_maps():
    maps = torch.tensor([[-0.2, 0.0, 0.5], [1.0, 1.3, 0.25]])
    out = figures.unit_to_uint8(maps)
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 0, 128], [255, 255, 64]]
    assert np.array_equal(figures.unit_to_uint8(maps.numpy()), out)


def test_image_grid_mixes_uint8_maps_and_generated_images():
    maps = figures.unit_to_uint8(torch.rand(3, 8, 8))
    generated = torch.rand(3, 8, 8) * 2 - 1
    fig = figures.image_grid([maps, generated], ["map", "generated"], ncols=2)
    assert len(fig.axes) == 2
    figures.plt.close(fig)


def test_sweep_figure_pads_short_rows_of_float_images_with_white():
    rows = [[torch.zeros(3, 8, 8)] * 2, [torch.zeros(3, 8, 8)] * 3]  # [-1, 1] images: mid grey
    fig = figures.sweep_figure(rows, ["two", "three"], [["a", "b"], ["a", "b", "c"]])
    padded = fig.axes[2].get_images()[0].get_array()
    assert padded.dtype == np.uint8 and int(padded.min()) == 255
    figures.plt.close(fig)
