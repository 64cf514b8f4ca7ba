"""Folders in the record format as in-memory tensors for the evaluation models and measures.

:func:`load_folder` reads a split (real or generated) once: images, every object with its class, the
metadata, the captions and, where the records name them, the condition maps the measures compare with
(segmentation classes, road mask, soft edges, line segments). The evaluation models train on these
tensors directly, which is much faster at small sizes than decoding PNGs at every step.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rslib.config import Preset
from rslib.data.conditions import rgb_to_seg
from rslib.data.datasets import load_image, split_dir
from rslib.data.records import Record, read_records
from rslib.data.synthrs import OBJECT_CLASSES

EVAL_MAPS = ("segmentation", "road", "soft_edges", "lines")


@dataclass
class EvalSet:
    """One split in memory; per-image object lists keep every object (no padding, no truncation)."""

    root: Path
    records: list[Record]
    images: torch.Tensor  # (N, 3, S, S) uint8
    boxes: list[torch.Tensor]  # N x (K_i, 4) normalised x1, y1, x2, y2
    labels: list[torch.Tensor]  # N x (K_i,) long, index into ``classes`` (unknown labels dropped)
    classes: tuple[str, ...] = OBJECT_CLASSES
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (N, S, S), see :func:`load_folder`

    def __len__(self) -> int:
        return len(self.records)

    @property
    def size(self) -> int:
        """Image side in pixels."""
        return int(self.images.shape[-1])

    def pixel_values(self, index: slice | Sequence[int] | None = None) -> torch.Tensor:
        """Images as float in [-1, 1] (B, 3, S, S), all of them or ``index``."""
        x = self.images if index is None else self.images[index]
        return x.float() / 127.5 - 1.0

    @property
    def metadata(self) -> list[dict[str, Any]]:
        """The metadata dict of every record (``None`` for fields the source lacks)."""
        return [dict(r.metadata) for r in self.records]

    @property
    def captions(self) -> list[str]:
        """The first caption of every record ("" when it has none)."""
        return [r.captions[0] if r.captions else "" for r in self.records]

    @property
    def has_objects(self) -> bool:
        """True when at least one record holds an object of a known class."""
        return any(len(b) for b in self.boxes)

    def targets(self, index: Sequence[int] | None = None) -> list[dict[str, torch.Tensor]]:
        """Detection targets: ``{"boxes": (K, 4) normalised xyxy, "labels": (K,)}`` per image."""
        idx = range(len(self)) if index is None else index
        return [{"boxes": self.boxes[i], "labels": self.labels[i]} for i in idx]


def _read_map(path: Path, name: str, size: int) -> np.ndarray:
    """One condition map at ``size``: segmentation -> class indices uint8, others -> grey uint8."""
    if name == "segmentation":
        return rgb_to_seg(load_image(path, size, "RGB", Image.NEAREST))
    resample = Image.NEAREST if name in ("road", "lines") else Image.BILINEAR
    return load_image(path, size, "L", resample)


def load_folder(split_dir: str | os.PathLike, size: int | None = None, maps: Sequence[str] = EVAL_MAPS,
                classes: Sequence[str] = OBJECT_CLASSES, limit: int | None = None) -> EvalSet:
    """Read a record-format folder into memory (images resized to ``size`` when given).

    ``maps`` names the condition maps to load where every record has them: ``segmentation`` becomes LoveDA
    class indices (N, S, S) long, ``road`` a bool mask, ``soft_edges`` and ``lines`` floats in [0, 1].
    """
    root = Path(split_dir)
    records = read_records(root)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"{root / 'metadata.jsonl'} holds no records")
    if size is None:
        with Image.open(root / records[0].file_name) as im:
            size = im.size[0]
    images = np.stack([load_image(root / r.file_name, size).transpose(2, 0, 1) for r in records])
    index = {c: i for i, c in enumerate(classes)}
    boxes, labels = [], []
    for r in records:
        objs = [o for o in r.objects if o.label in index]
        boxes.append(torch.tensor([o.bbox for o in objs], dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.tensor([index[o.label] for o in objs], dtype=torch.long))
    out: dict[str, torch.Tensor] = {}
    for name in maps:
        if not all(name in r.conditions for r in records):
            continue
        arr = torch.from_numpy(np.stack([_read_map(root / r.conditions[name], name, size) for r in records]))
        if name == "segmentation":
            out[name] = arr.long()
        elif name == "road":
            out[name] = arr > 127
        else:
            out[name] = arr.float() / 255.0
    return EvalSet(root, records, torch.from_numpy(np.ascontiguousarray(images)), boxes, labels, tuple(classes), out)


def preset_split(cfg: Preset, split: str = "train", maps: Sequence[str] = EVAL_MAPS) -> EvalSet:
    """One split of the preset's data set in memory (SynthRS is generated first when it is the data)."""
    from rslib.train.cc_diff import dataset_classes  # CC-Diff's classes: one order for every split and model

    folder = split_dir(cfg, split)
    return load_folder(folder, cfg.data.image_size, maps, classes=dataset_classes(cfg))
