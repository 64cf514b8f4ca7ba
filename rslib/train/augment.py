"""The flips and rotations the instruments (segmenter, detector) train under: the dihedral group of the square."""
from __future__ import annotations

import torch


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of the last two axes (k in 0..7); the same k on image and labels."""
    if k & 4:
        x = x.flip(-1)
    return torch.rot90(x, k & 3, dims=(-2, -1))


def dihedral_boxes(boxes: torch.Tensor, k: int) -> torch.Tensor:
    """Normalised boxes (K, 4) moved as :func:`dihedral` moves the image (k in 0..7)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    if k & 4:  # horizontal flip
        x1, x2 = 1 - x2, 1 - x1
    for _ in range(k & 3):  # rot90 counter-clockwise: (x, y) -> (y, 1 - x)
        x1, y1, x2, y2 = y1, 1 - x2, y2, 1 - x1
    return torch.stack([x1, y1, x2, y2], -1)
