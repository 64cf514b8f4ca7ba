"""One record format for every data set, its writer, and readers of real data sets.

A data set split is a folder in the Hugging Face ``imagefolder`` layout::

    split/
      metadata.jsonl          one JSON object per image (see :class:`Record`)
      images/000000.png
      conditions/<name>/000000.png   condition maps, when the data set has them

Each ``metadata.jsonl`` line holds ``file_name``, ``captions`` (list),
``metadata`` (the 7 fields of :data:`METADATA_FIELDS`, ``null`` where unknown),
``objects`` (list of ``{label, bbox, obb}`` with coordinates normalised to
[0, 1]), ``scene`` and ``conditions`` (relative paths of condition maps by
name). Condition maps are referenced through ``<name>_file_name`` columns as
well, so ``datasets.load_dataset("imagefolder", data_dir=split)`` loads them as
extra image columns.

Writers never leave half-written output: they write into a temporary sibling
folder and rename it into place only when everything succeeded.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

METADATA_FIELDS = ("year", "month", "day", "gsd", "cloud_cover", "latitude", "longitude")
CONDITION_NAMES = ("lines", "soft_edges", "sketch", "road", "depth", "segmentation")
CONTENT = "content"  # the content image: another scene of the same type


class DataFormatError(ValueError):
    """Malformed input: names the file, the line (when there is one), what is wrong and the fix."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None, fix: str = ""):
        self.path, self.line, self.problem = Path(path), line, message
        where = f"{path}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {message}" + (f" ({fix})" if fix else ""))


@dataclass
class ObjectAnnotation:
    """One object: class label, horizontal box and oriented box, both normalised to [0, 1]."""

    label: str
    bbox: list[float]  # x1, y1, x2, y2
    obb: list[float]  # x1, y1, x2, y2, x3, y3, x4, y4 (corners in order)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "bbox": [round(float(v), 5) for v in self.bbox],
                "obb": [round(float(v), 5) for v in self.obb]}

    @staticmethod
    def from_obb(label: str, obb: list[float] | np.ndarray) -> "ObjectAnnotation":
        """Build from the 8 corner coordinates; the bbox is their enclosing box."""
        pts = np.asarray(obb, dtype=float).reshape(4, 2)
        bbox = [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()]
        return ObjectAnnotation(label, [float(v) for v in bbox], [float(v) for v in pts.reshape(-1)])

    @staticmethod
    def from_bbox(label: str, bbox: list[float] | np.ndarray) -> "ObjectAnnotation":
        """Build from a horizontal box; the oriented box is its four corners."""
        x1, y1, x2, y2 = (float(v) for v in bbox)
        return ObjectAnnotation(label, [x1, y1, x2, y2], [x1, y1, x2, y1, x2, y2, x1, y2])


@dataclass
class Record:
    """One image of a data set split, as one line of ``metadata.jsonl``."""

    file_name: str
    captions: list[str]
    metadata: dict[str, float | int | None] = field(default_factory=dict)
    objects: list[ObjectAnnotation] = field(default_factory=list)
    scene: str | None = None
    conditions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file_name": self.file_name,
            "captions": list(self.captions),
            "metadata": {k: self.metadata.get(k) for k in METADATA_FIELDS},
            "objects": [o.to_json() for o in self.objects],
            "scene": self.scene,
            "conditions": dict(self.conditions),
        }
        for name, rel in self.conditions.items():  # extra image columns for `datasets`
            out[f"{name}_file_name"] = rel
        return out

    @staticmethod
    def from_json(obj: Any, path: str | os.PathLike, line: int | None = None) -> "Record":
        """Validate one parsed line; errors name the file, the line and the field."""

        def fail(msg: str, fix: str = "") -> DataFormatError:
            return DataFormatError(path, msg, line, fix)

        if not isinstance(obj, dict):
            raise fail("expected a JSON object")
        if not isinstance(obj.get("file_name"), str) or not obj["file_name"]:
            raise fail("field 'file_name' is missing or not a string")
        caps = obj.get("captions", [])
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise fail("field 'captions' must be a list of strings")
        meta = obj.get("metadata") or {}
        if not isinstance(meta, dict):
            raise fail("field 'metadata' must be an object")
        unknown = set(meta) - set(METADATA_FIELDS)
        if unknown:
            raise fail(f"unknown metadata field(s) {sorted(unknown)}", f"allowed: {', '.join(METADATA_FIELDS)}")
        for k, v in meta.items():
            if v is not None and not isinstance(v, (int, float)):
                raise fail(f"metadata field {k!r} must be a number or null, got {v!r}")
        objects = []
        for i, o in enumerate(obj.get("objects", []) or []):
            if not isinstance(o, dict) or not isinstance(o.get("label"), str):
                raise fail(f"objects[{i}] needs a string 'label'")
            bbox, obb = o.get("bbox"), o.get("obb")
            if not _numbers(bbox, 4):
                raise fail(f"objects[{i}].bbox must be 4 numbers [x1, y1, x2, y2]")
            if obb is None:
                objects.append(ObjectAnnotation.from_bbox(o["label"], bbox))
                continue
            if not _numbers(obb, 8):
                raise fail(f"objects[{i}].obb must be 8 numbers [x1, y1, ..., x4, y4]")
            objects.append(ObjectAnnotation(o["label"], [float(v) for v in bbox], [float(v) for v in obb]))
        conds = obj.get("conditions") or {}
        if not isinstance(conds, dict) or not all(isinstance(v, str) for v in conds.values()):
            raise fail("field 'conditions' must map names to relative paths")
        return Record(obj["file_name"], caps, {k: meta.get(k) for k in METADATA_FIELDS}, objects,
                      obj.get("scene"), conds)


def _numbers(value: Any, n: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == n and all(
        isinstance(v, (int, float)) and np.isfinite(v) for v in value)


def read_records(split_dir: str | os.PathLike, check_files: bool = False) -> list[Record]:
    """Read and validate ``split_dir/metadata.jsonl`` (optionally checking that every file exists)."""
    split_dir = Path(split_dir)
    meta = split_dir / "metadata.jsonl"
    if not meta.is_file():
        raise DataFormatError(meta, "no metadata.jsonl here",
                              fix="generate SynthRS with notebook 00 or convert a data set with "
                                  "`python -m rslib.data convert`")
    records = []
    with open(meta, encoding="utf-8") as f:
        for i, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataFormatError(meta, f"invalid JSON ({e.msg} at column {e.colno})", i) from None
            rec = Record.from_json(obj, meta, i)
            if check_files:
                for rel in [rec.file_name, *rec.conditions.values()]:
                    if not (split_dir / rel).is_file():
                        raise DataFormatError(meta, f"file {rel!r} does not exist", i)
            records.append(rec)
    return records


def _to_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8, got {arr.dtype}")
    return Image.fromarray(arr)


class DatasetWriter:
    """Write one split atomically: ``with DatasetWriter(out) as w: w.add(record, image, conditions)``.

    Files go to a temporary folder beside ``out``; on success it is renamed to
    ``out`` (replacing an existing folder only if ``overwrite``); on error it is
    removed and ``out`` is untouched.
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} exists; pass overwrite=True (or --overwrite) to replace it")
        self.overwrite = overwrite
        self.tmp: Path | None = None
        self.records: list[Record] = []

    def __enter__(self) -> "DatasetWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self

    def add(self, record: Record, image: Image.Image | np.ndarray | str | os.PathLike,
            conditions: dict[str, Image.Image | np.ndarray] | None = None) -> Record:
        """Add one image (array, PIL image, or a path to copy) and its condition maps."""
        assert self.tmp is not None, "use DatasetWriter as a context manager"
        dst = self.tmp / record.file_name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(image, (str, os.PathLike)):
            shutil.copyfile(image, dst)
        else:
            _to_pil(image).save(dst)
        stem = Path(record.file_name).stem
        for name, cmap in (conditions or {}).items():
            rel = f"conditions/{name}/{stem}.png"
            (self.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            _to_pil(cmap).save(self.tmp / rel)
            record.conditions[name] = rel
        self.records.append(record)
        return record

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            write_jsonl(self.tmp / "metadata.jsonl", (r.to_json() for r in self.records))
            if self.out.exists():
                shutil.rmtree(self.out)
            os.replace(self.tmp, self.out)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


def write_jsonl(path: str | os.PathLike, rows: Any) -> None:
    """Write one JSON object per line (sorted keys are not used: column order matters to readers)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def iter_split_dirs(root: str | os.PathLike) -> Iterator[tuple[str, Path]]:
    """Yield (split name, folder) for each split folder holding a metadata.jsonl."""
    root = Path(root)
    for name in ("train", "val", "test"):
        if (root / name / "metadata.jsonl").is_file():
            yield name, root / name
