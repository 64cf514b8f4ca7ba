"""Torch datasets over the record format, and CRS-Diff's condition-dropout policy.

One item of :class:`RSDataset` is a dict of tensors:

==================  ==================  ==========================================
key                 shape               meaning
==================  ==================  ==========================================
pixel_values        (3, S, S)           image in [-1, 1]
conditions          (18, S, S)          six condition maps x 3 channels in [0, 1]
content             (3, S, S)           content image in [-1, 1] (zeros if none)
metadata            (7,)                fields normalised to [0, 1] (CRS-Diff ranges)
metadata_valid      (7,)                False where the source had no value
boxes, obb          (M, 4), (M, 8)      normalised boxes, padded to M (the M largest if more)
labels, valid       (M,), (M,)          class index (-1 for padding), padding mask
captions            list[str]           every caption of the image
scene               int                 scene index (-1 if unknown)
==================  ==================  ==========================================

Use :func:`collate` as the DataLoader's ``collate_fn`` (it keeps caption lists intact).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from rslib.data.conditions import LOVEDA_PALETTE
from rslib.data.records import CONDITION_NAMES, CONTENT, METADATA_FIELDS, Record, read_records

# Min-max normalisation intervals of CRS-Diff (year, month, day, GSD m, cloud %, latitude, longitude).
METADATA_RANGES = {
    "year": (1980.0, 2024.0), "month": (0.0, 12.0), "day": (0.0, 31.0), "gsd": (0.0, 5.0),
    "cloud_cover": (0.0, 100.0), "latitude": (-90.0, 90.0), "longitude": (-180.0, 180.0),
}


def normalise_metadata(meta: dict[str, float | int | None]) -> tuple[np.ndarray, np.ndarray]:
    """Metadata dict -> (values (7,) in [0, 1], valid (7,) bool); missing fields are 0 and invalid."""
    values = np.zeros(len(METADATA_FIELDS), np.float32)
    valid = np.zeros(len(METADATA_FIELDS), bool)
    for i, name in enumerate(METADATA_FIELDS):
        v = meta.get(name)
        if v is None:
            continue
        lo, hi = METADATA_RANGES[name]
        values[i] = np.clip((float(v) - lo) / (hi - lo), 0.0, 1.0)
        valid[i] = True
    return values, valid


def denormalise_metadata(values: Sequence[float]) -> dict[str, float]:
    """Inverse of :func:`normalise_metadata` (for printing what a vector asks for)."""
    return {name: lo + float(v) * (hi - lo) for name, v, (lo, hi) in
            zip(METADATA_FIELDS, values, (METADATA_RANGES[n] for n in METADATA_FIELDS))}


def load_image(path: str | os.PathLike, size: int | None = None, mode: str = "RGB",
               resample: int = Image.BICUBIC) -> np.ndarray:
    """Read an image as uint8 (H, W, C) or (H, W), resized to size x size when given."""
    with Image.open(path) as im:
        im = im.convert(mode)
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), resample)
        return np.asarray(im)


def _as_map(path: Path, name: str, size: int | None) -> np.ndarray:
    """One condition map as uint8 (3, H, W)."""
    if name == "segmentation":
        arr = load_image(path, size, "RGB", Image.NEAREST)
    else:
        resample = Image.NEAREST if name in ("road", "sketch", "lines") else Image.BILINEAR
        arr = np.repeat(load_image(path, size, "L", resample)[..., None], 3, axis=2)
    return arr.transpose(2, 0, 1)


class MissingConditionsError(ValueError):
    """A split whose records lack condition maps (or content images) that training asks for: names the maps,
    the first record lacking them and the command that computes them."""

    def __init__(self, split_dir: Path, records: Sequence[Record], lacking: Sequence[tuple[int, list[str]]],
                 asked: Sequence[str]):
        first, missing = lacking[0]
        self.missing = sorted({n for _, names in lacking for n in names}, key=list(asked).index)
        self.first_record = records[first].file_name
        data_root = split_dir.parent if split_dir.name in ("train", "val", "test") else split_dir
        super().__init__(
            f"{split_dir / 'metadata.jsonl'}: training asks for {', '.join(self.missing)} but {len(lacking)} of "
            f"{len(records)} records lack them, the first {self.first_record!r} (record {first + 1}: no "
            f"{', '.join(missing)}). Compute them with `python -m rslib.data conditions --root {data_root} "
            f"--road-model P --depth-model P --segmentation-model P` (see data/README.md), or train without what "
            f"the data set lacks (crs.condition_maps, crs.use_content)")


# where a training item's content image comes from: the one its record names ("record": another image of its
# scene in SynthRS) or the item's own image ("self")
CONTENT_SOURCES = ("record", "self")


class RSDataset(torch.utils.data.Dataset):
    """A split folder in the record format as torch tensors (see the module docstring); ``content_from``: see
    :data:`CONTENT_SOURCES`."""

    def __init__(self, split_dir: str | os.PathLike, size: int | None = None, max_objects: int = 12,
                 classes: Sequence[str] | None = None, scenes: Sequence[str] | None = None,
                 with_conditions: bool = True, in_memory: bool = False, content_from: str = "record"):
        if content_from not in CONTENT_SOURCES:
            raise ValueError(f"content_from must be one of {', '.join(CONTENT_SOURCES)}, not {content_from!r} "
                             f"(crs.content_source)")
        self.content_from = content_from
        self.root = Path(split_dir)
        self.records: list[Record] = read_records(self.root)
        if not self.records:
            raise ValueError(f"{self.root / 'metadata.jsonl'} holds no records")
        self.size = size or Image.open(self.root / self.records[0].file_name).size[0]
        self.max_objects = max_objects
        self.classes = list(classes) if classes is not None else sorted(
            {o.label for r in self.records for o in r.objects})
        self.scenes = list(scenes) if scenes is not None else sorted({r.scene for r in self.records if r.scene})
        self.with_conditions = with_conditions
        self._class_index = {c: i for i, c in enumerate(self.classes)}
        self._scene_index = {s: i for i, s in enumerate(self.scenes)}
        self._cache: dict[int, dict[str, np.ndarray]] | None = {} if in_memory else None

    def __len__(self) -> int:
        return len(self.records)

    def require_conditions(self, names: Sequence[str]) -> None:
        """Refuse (:class:`MissingConditionsError`) when a record lacks one of the conditions ``names``
        (map names or ``content``), which this data set would otherwise hand out as zeros."""
        lacking = [(i, [n for n in names if n not in rec.conditions]) for i, rec in enumerate(self.records)]
        lacking = [(i, missing) for i, missing in lacking if missing]
        if lacking:
            raise MissingConditionsError(self.root, self.records, lacking, names)

    def _arrays(self, i: int) -> dict[str, np.ndarray]:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        rec = self.records[i]
        out = {"image": load_image(self.root / rec.file_name, self.size).transpose(2, 0, 1)}
        if self.with_conditions:
            maps = [(_as_map(self.root / rec.conditions[n], n, self.size) if n in rec.conditions
                     else np.zeros((3, self.size, self.size), np.uint8)) for n in CONDITION_NAMES]
            out["conditions"] = np.concatenate(maps)
            if self.content_from == "self":  # the image is its own content (Uni-ControlNet's training rule)
                out["content"] = out["image"]
            elif CONTENT in rec.conditions:
                out["content"] = load_image(self.root / rec.conditions[CONTENT], self.size).transpose(2, 0, 1)
        if self._cache is not None:
            self._cache[i] = out
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        arr = self._arrays(i)
        s = self.size
        item: dict[str, Any] = {"pixel_values": torch.from_numpy(arr["image"].astype(np.float32) / 127.5 - 1.0)}
        if self.with_conditions:
            item["conditions"] = torch.from_numpy(arr["conditions"].astype(np.float32) / 255.0)
            content = arr.get("content")
            item["content"] = (torch.from_numpy(content.astype(np.float32) / 127.5 - 1.0) if content is not None
                               else torch.zeros(3, s, s))
            item["has_content"] = content is not None
        meta, valid = normalise_metadata(rec.metadata)
        item["metadata"], item["metadata_valid"] = torch.from_numpy(meta), torch.from_numpy(valid)
        m = self.max_objects
        boxes, obb = torch.zeros(m, 4), torch.zeros(m, 8)
        labels, valid_obj = torch.full((m,), -1, dtype=torch.long), torch.zeros(m, dtype=torch.bool)
        objects = rec.objects
        if len(objects) > m:  # keep the m largest objects (small ones matter least to a layout)
            objects = sorted(objects, key=lambda o: -(o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1]))[:m]
        for k, o in enumerate(objects):
            boxes[k], obb[k] = torch.tensor(o.bbox), torch.tensor(o.obb)
            labels[k] = self._class_index.get(o.label, -1)
            valid_obj[k] = o.label in self._class_index
        item.update(boxes=boxes, obb=obb, labels=labels, valid=valid_obj)
        item["captions"] = list(rec.captions) or [""]
        item["scene"] = self._scene_index.get(rec.scene, -1) if rec.scene else -1
        item["index"] = i
        return item


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep lists (captions) as a list per item."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], (bool, int, float)):
            out[key] = torch.tensor(vals)
        else:
            out[key] = vals
    return out


def pick_captions(captions: list[list[str]], generator: torch.Generator) -> list[str]:
    """One caption per image, drawn with ``generator`` (so a training step's choice is reproducible)."""
    idx = [int(torch.randint(len(c), (1,), generator=generator)) for c in captions]
    return [c[i] for c, i in zip(captions, idx)]


@dataclass(frozen=True)
class ConditionDropout:
    """CRS-Diff's condition-dropout policy (the Uni-ControlNet ``keep_and_drop`` rule).

    Per sample draw u: u < keep_all keeps every condition; u < keep_all + drop_all
    drops every condition; otherwise condition i is dropped with ``drop_each[i]``.
    The rule runs separately on the local maps and on the global conditions
    (content, metadata); the caption is dropped (replaced by "") with ``drop_caption``.
    """

    keep_all: float = 0.1
    drop_all: float = 0.1
    drop_each: tuple[float, ...] = (0.6, 0.5, 0.5, 0.5, 0.5, 0.5)
    drop_each_global: tuple[float, ...] = (0.5, 0.5)
    drop_caption: float = 0.5

    def _keep(self, n: int, probs: Sequence[float], generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(n, 1, generator=generator)
        each = torch.rand(n, len(probs), generator=generator) >= torch.tensor(probs)
        keep = torch.where(u < self.keep_all, True, torch.where(u < self.keep_all + self.drop_all, False, each))
        return keep

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Keep masks for n samples: ``local`` (n, 6), ``global`` (n, 2: content, metadata), ``caption`` (n,)."""
        return {
            "local": self._keep(n, self.drop_each, generator),
            "global": self._keep(n, self.drop_each_global, generator),
            "caption": torch.rand(n, generator=generator) >= self.drop_caption,
        }

    @staticmethod
    def apply_local(conditions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Zero the dropped maps: conditions (B, 18, H, W), keep (B, 6) -> (B, 18, H, W)."""
        mask = keep.to(conditions.dtype).repeat_interleave(3, dim=1)[:, :, None, None]
        return conditions * mask

    @staticmethod
    def apply_captions(captions: list[str], keep: torch.Tensor) -> list[str]:
        """Replace dropped captions by the empty string."""
        return [c if bool(k) else "" for c, k in zip(captions, keep)]


def segmentation_to_classes(conditions: torch.Tensor) -> torch.Tensor:
    """The segmentation channels of a condition stack (B, 18, H, W) -> LoveDA class indices (B, H, W)."""
    seg = conditions[:, 15:18] * 255.0  # (B, 3, H, W)
    pal = torch.tensor(LOVEDA_PALETTE, dtype=seg.dtype, device=seg.device)  # (7, 3)
    d = ((seg[:, None] - pal[None, :, :, None, None]) ** 2).sum(2)  # (B, 7, H, W)
    return d.argmin(1)


def split_dir(cfg: Any, split: str) -> Path:
    """The folder of one split of a preset's data set (a :class:`rslib.config.Preset`); SynthRS is generated
    first when it is the data (``data.root`` empty), and a missing split is an error saying how to make it."""
    if not cfg.data.root:
        from rslib.data.synthrs import ensure_synthrs

        ensure_synthrs(cfg.synthrs_dir(), cfg.split_sizes(), cfg.data.image_size, seed=cfg.data.seed)
    folder = cfg.data_dir() / split
    if not (folder / "metadata.jsonl").is_file():
        raise FileNotFoundError(f"no {split} split at {folder}: convert a data set into it (python -m rslib.data "
                                f"convert ..., see data/README.md) or leave data.root empty for SynthRS")
    return folder


def load_all(ds: torch.utils.data.Dataset, n: int | None = None) -> dict[str, Any]:
    """The first ``n`` items of a data set (all by default) collated into one batch."""
    n = len(ds) if n is None else min(n, len(ds))
    return collate([ds[i] for i in range(n)])


def split_dataset(cfg: Any, split: str, content_from: str = "record") -> RSDataset:
    """One split of a preset (``cfg``: rslib.config.Preset) with its condition maps (SynthRS generated first when it
    is the data); ``content_from`` as :class:`RSDataset`'s."""
    return RSDataset(split_dir(cfg, split), size=cfg.data.image_size, max_objects=1, content_from=content_from)


def maps_as_uint8(conditions: torch.Tensor) -> torch.Tensor:
    """Condition maps in [0, 1] (..., 18, S, S) -> uint8, the form training stores and batches them in."""
    return (conditions * 255).round().to(torch.uint8)


def load_split_tensors(ds: torch.utils.data.Dataset, n: int | None = None) -> dict[str, Any]:
    """The first ``n`` items of a split (all by default) stacked (:func:`load_all`): images (N, 3, S, S) in
    [-1, 1], conditions (N, 18, S, S) as uint8, content images, metadata and its validity, captions."""
    batch = load_all(ds, n)
    kept = ("pixel_values", "content", "has_content", "metadata", "metadata_valid", "captions")
    return {**{k: batch[k] for k in kept}, "conditions": maps_as_uint8(batch["conditions"])}
