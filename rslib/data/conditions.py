"""Condition maps: the six CRS-Diff spatial conditions and their conventions.

Every map is an ``uint8`` array of the image's height and width:

============  =========================================================
name          content
============  =========================================================
lines         1-px white straight line segments on black (MLSD-like)
soft_edges    soft edge strength, 0..255, white = edge (HED-like)
sketch        thin binary edges {0, 255}, white on black (sketch-like)
road          binary road mask {0, 255}
depth         height map, 0..255, brighter = higher (closer to the sensor)
segmentation  H x W x 3 colours of the LoveDA 7-class palette
============  =========================================================

The model input stacks them in :data:`~rslib.data.formats.CONDITION_NAMES`
order as 3 channels each (18 channels, values in [0, 1]), as CRS-Diff does.
"""
from __future__ import annotations

import numpy as np

LOVEDA_CLASSES = ("background", "building", "road", "water", "barren", "forest", "agriculture")
LOVEDA_PALETTE = np.array(
    [(255, 255, 255), (255, 0, 0), (255, 255, 0), (0, 0, 255), (159, 129, 183), (0, 255, 0), (255, 195, 128)],
    dtype=np.uint8,
)


def seg_to_rgb(labels: np.ndarray) -> np.ndarray:
    """LoveDA class indices (H, W) -> palette colours (H, W, 3)."""
    return LOVEDA_PALETTE[labels]


def rgb_to_seg(rgb: np.ndarray) -> np.ndarray:
    """Palette colours (H, W, 3) -> class indices (H, W), nearest palette colour."""
    d = ((rgb[..., None, :].astype(np.int32) - LOVEDA_PALETTE.astype(np.int32)) ** 2).sum(-1)
    return d.argmin(-1).astype(np.uint8)
