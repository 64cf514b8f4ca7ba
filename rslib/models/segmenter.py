"""The road / land-cover segmenter of the condition-fidelity measures: the network and its saved folder.


The network is a plain fully convolutional encoder-decoder (U-Net-like, GroupNorm so that training and
evaluation behave alike and the shared loop's checkpoints hold every tensor)::

    image (B, 3, S, S) in [-1, 1]
      -> stem: 2 conv3x3 at full resolution, channels[0]
      -> per further level: conv3x3 stride 2 + conv3x3, channels[i]        (S / 2^i)
      -> per level back up: bilinear x2, concat the skip, conv3x3          (S / 2^(i-1))

It is trained by :mod:`rslib.train.segmenter` and scored by :mod:`rslib.eval.segmenter`. A trained segmenter's
folder holds ``model.safetensors`` and ``segmenter.json`` (:func:`load_segmenter`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from rslib.config import Preset, SegmenterConfig, resolve_path
from rslib.data.conditions import LOVEDA_CLASSES

NUM_CLASSES = len(LOVEDA_CLASSES)
ROAD = LOVEDA_CLASSES.index("road")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "segmenter.json"


# ---------------------------------------------------------------------------
# The network


def _groups(c: int) -> int:
    """GroupNorm groups for ``c`` channels: 8 where they divide it, else fewer."""
    return next(g for g in (8, 4, 2, 1) if c % g == 0)


def conv_block(cin: int, cout: int, stride: int = 1, norm: bool = False) -> nn.Sequential:
    """conv3x3 (stride) -> [GroupNorm] -> ReLU (no normalisation by default: half the CPU time at small sizes)."""
    if norm:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(_groups(cout), cout),
                             nn.ReLU(inplace=True))
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU(inplace=True))


class Segmenter(nn.Module):
    """Fully convolutional encoder-decoder with skip connections: (B, 3, H, W) in [-1, 1] -> logits (B, C, H, W).

    With ``patch`` p > 1 the image is first folded into p x p pixel blocks (space-to-depth, lossless) and the
    logits are unfolded back at the end, so every layer runs at 1/p of the resolution: p^2 times cheaper.
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 128), num_classes: int = NUM_CLASSES, norm: bool = False,
                 patch: int = 1):
        super().__init__()
        ch = [int(c) for c in channels]
        if not ch or patch < 1:
            raise ValueError(f"the segmenter needs at least one level of channels and patch >= 1, got {ch}, {patch}")
        self.channels, self.num_classes, self.norm, self.patch = tuple(ch), int(num_classes), bool(norm), int(patch)
        cin = 3 * patch * patch
        self.stem = nn.Sequential(conv_block(cin, ch[0], 1, norm), conv_block(ch[0], ch[0], 1, norm))
        self.down = nn.ModuleList(nn.Sequential(conv_block(a, b, 2, norm), conv_block(b, b, 1, norm))
                                  for a, b in zip(ch, ch[1:]))
        self.up = nn.ModuleList(conv_block(b + a, a, 1, norm) for a, b in zip(ch, ch[1:]))
        self.head = nn.Conv2d(ch[0], num_classes * patch * patch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C, H, W) of images in [-1, 1] (B, 3, H, W); H and W divisible by ``patch``."""
        p = self.patch
        if p > 1:
            if x.shape[-1] % p or x.shape[-2] % p:
                raise ValueError(f"image sides {tuple(x.shape[-2:])} must be divisible by the patch size {p}")
            x = F.pixel_unshuffle(x, p)  # (B, 3 p^2, H / p, W / p)
        skips = [self.stem(x)]  # (B, c0, h, w)
        for down in self.down:
            skips.append(down(skips[-1]))  # (B, c_i, h / 2^i, w / 2^i)
        h = skips.pop()
        for up in reversed(self.up):
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = up(torch.cat([h, skip], 1))  # (B, c_{i-1}, ...)
        out = self.head(h)  # (B, C p^2, h, w)
        return F.pixel_shuffle(out, p) if p > 1 else out


def build_segmenter(cfg: Preset | SegmenterConfig) -> Segmenter:
    """A fresh segmenter sized by ``cfg.seg`` (or a SegmenterConfig)."""
    seg = cfg.seg if isinstance(cfg, Preset) else cfg
    return Segmenter(seg.channels, NUM_CLASSES, seg.norm, seg.patch)


# ---------------------------------------------------------------------------
# A trained segmenter's folder


def load_segmenter(path: str | os.PathLike) -> Segmenter:
    """A trained segmenter from its folder (``model.safetensors`` + ``segmenter.json``), in eval mode on CPU."""
    path = resolve_path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no trained segmenter at {path} (needs {CONFIG_FILE} and {WEIGHTS_FILE}): run "
                                f"rslib.train.segmenter.train_segmenter(cfg) first")
    info = json.loads((path / CONFIG_FILE).read_text())
    model = Segmenter(info["channels"], info["num_classes"], info.get("norm", False), info.get("patch", 1))
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
    return model.eval()
