"""The record format every data set is converted to: its schema, the checks of file names and values, the writer.

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
folder and rename it into place only when everything succeeded. Each folder
they write holds a marker file (:data:`DATASET_MARKER`); ``overwrite`` replaces
only a folder that has one.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator

import numpy as np
from PIL import Image

from rslib.utils import atomic_write_dir, recover_dir

METADATA_FIELDS = ("year", "month", "day", "gsd", "cloud_cover", "latitude", "longitude")
CONDITION_NAMES = ("lines", "soft_edges", "sketch", "road", "depth", "segmentation")
CONTENT = "content"  # the content image: another scene of the same type
# the values each metadata field can take (gsd must also be above 0); anything else is a data error
METADATA_LIMITS = {"year": (1900, 2100), "month": (1, 12), "day": (1, 31), "gsd": (0, 1000),
                   "cloud_cover": (0, 100), "latitude": (-90, 90), "longitude": (-180, 180)}
DATASET_MARKER = ".rslib-dataset.json"  # in every folder the writers make: {"format": ..., "version": ...}
MARKER_VERSION = 1


class DataFormatError(ValueError):
    """Malformed input: names the file, the line (when there is one), what is wrong and the fix."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None, fix: str = ""):
        self.path, self.line, self.problem = Path(path), line, message
        where = f"{path}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {message}" + (f" ({fix})" if fix else ""))


def unsafe_name_reason(name: str) -> str | None:
    """Why ``name`` may not be used as a file name relative to a folder (absolute, a '..' component), or None."""
    if "\0" in name:
        return "contains a NUL character"
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.anchor:
            return "is an absolute path"
        if ".." in pure.parts:
            return "has a '..' component"
    return None


def _outside(path: Path, folder: Path) -> str | None:
    """Where ``path`` leads outside ``folder`` once symbolic links are followed, or None when it stays inside."""
    try:
        target, base = path.resolve(), folder.resolve()
    except (OSError, RuntimeError):  # a symbolic link loop
        return "a symbolic link loop"
    return None if target == base or base in target.parents else str(target)


def path_inside(folder: Path, name: str, where: str | os.PathLike, entry: str, line: int | None = None) -> Path:
    """``folder / name`` for a name read from the file ``where`` (its ``entry``, at ``line``); a
    :class:`DataFormatError` when the name is absolute, has a '..' component or leads outside ``folder``."""
    why = unsafe_name_reason(name)
    if why is not None:
        raise DataFormatError(where, f"{entry}: file name {name!r} {why}", line,
                              f"file names must be relative to {folder}")
    path = folder / name
    check_inside(path, folder, where, entry, line)
    return path


def check_inside(path: Path, folder: Path, where: str | os.PathLike | None = None, entry: str = "",
                  line: int | None = None) -> None:
    """A :class:`DataFormatError` when ``path`` (symbolic links followed) is not inside ``folder``."""
    target = _outside(path, folder)
    if target is not None:
        raise DataFormatError(where or path, f"{entry + ': ' if entry else ''}{path.name!r} leads to {target}, "
                                             f"outside {folder}", line,
                              "copy the file into the folder instead of linking to it")


def metadata_problem(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be the metadata field ``name`` (see :data:`METADATA_LIMITS`), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "is not a number"
    if not np.isfinite(value):
        return "is not finite"
    lo, hi = METADATA_LIMITS[name]
    if not lo <= value <= hi or (name == "gsd" and value <= 0):
        return f"is outside {'(' if name == 'gsd' else '['}{lo}, {hi}]"
    return None


class UsageError(ValueError):
    """A call that cannot work as asked (an unknown format, a missing source folder, a negative count): the
    message says what to change. The command lines exit with status 2 for it, and 1 for a :class:`DataFormatError`."""


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
        if (why := unsafe_name_reason(obj["file_name"])) is not None:
            raise fail(f"field 'file_name' {obj['file_name']!r} {why}", "file names are relative to the split folder")
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
            if v is not None and (problem := metadata_problem(k, v)) is not None:
                raise fail(f"metadata field {k!r} {problem}: {v!r}", "use a number in range, or null where unknown")
        objects = []
        for i, o in enumerate(obj.get("objects", []) or []):
            if not isinstance(o, dict) or not isinstance(o.get("label"), str):
                raise fail(f"objects[{i}] needs a string 'label'")
            bbox, obb = o.get("bbox"), o.get("obb")
            if not are_numbers(bbox, 4) or not (0 <= bbox[0] <= bbox[2] <= 1 and 0 <= bbox[1] <= bbox[3] <= 1):
                raise fail(f"objects[{i}].bbox must be 4 numbers [x1, y1, x2, y2] with 0 <= x1 <= x2 <= 1 and "
                           f"0 <= y1 <= y2 <= 1, got {bbox!r}")
            if obb is None:
                objects.append(ObjectAnnotation.from_bbox(o["label"], bbox))
                continue
            if not are_numbers(obb, 8):
                raise fail(f"objects[{i}].obb must be 8 numbers [x1, y1, ..., x4, y4]")
            objects.append(ObjectAnnotation(o["label"], [float(v) for v in bbox], [float(v) for v in obb]))
        conds = obj.get("conditions") or {}
        if not isinstance(conds, dict) or not all(isinstance(v, str) for v in conds.values()):
            raise fail("field 'conditions' must map names to relative paths")
        for name, rel in conds.items():
            if (why := unsafe_name_reason(rel)) is not None:
                raise fail(f"conditions[{name!r}] {rel!r} {why}", "file names are relative to the split folder")
        return Record(obj["file_name"], caps, {k: meta.get(k) for k in METADATA_FIELDS}, objects,
                      obj.get("scene"), conds)


def are_numbers(value: Any, n: int, finite: bool = True) -> bool:
    """True for a list of ``n`` numbers (finite ones only, unless ``finite=False``)."""
    return isinstance(value, (list, tuple)) and len(value) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and (not finite or np.isfinite(v)) for v in value)


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
                    if not path_inside(split_dir, rel, meta, "file", i).is_file():
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


def encode_png(image: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) or RGB (H, W, 3) array as PNG bytes (fast, lossless, deterministic)."""
    import cv2

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8, got {arr.dtype}")
    ok, buf = cv2.imencode(".png", arr[..., ::-1] if arr.ndim == 3 else arr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def _save_png(image: Image.Image | np.ndarray | bytes, dst: Path) -> None:
    if isinstance(image, bytes):
        dst.write_bytes(image)
    else:
        _to_pil(image).save(dst)


def written_here(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is a data set these writers made (it holds :data:`DATASET_MARKER`, or ``synthrs.json``
    as SynthRS splits held before the marker existed)."""
    folder = Path(folder)
    if (folder / "synthrs.json").is_file():
        return True
    try:
        marker = json.loads((folder / DATASET_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and "format" in marker


def check_output_folder(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to write ``out`` unless it is absent or empty, or ``overwrite`` and a data set these writers made.

    Raises ``FileExistsError`` with what to do; a folder of anything else is never replaced.
    """
    out = Path(out)
    if out.is_symlink():
        raise FileExistsError(f"{out} is a symbolic link; give the output folder itself")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    if not out.is_dir() or not written_here(out):
        raise FileExistsError(f"{out} was not written by python -m rslib.data (it has no {DATASET_MARKER}), so "
                              f"--overwrite leaves it as it is: choose another output folder, or move it away first")


def write_marker(folder: Path, fmt: str, **info: Any) -> None:
    """Write ``folder``'s :data:`DATASET_MARKER`: the format, the marker version and ``info``."""
    (folder / DATASET_MARKER).write_text(json.dumps({"format": fmt, "version": MARKER_VERSION, **info}, indent=1))


class DatasetWriter:
    """Write one split atomically: ``with DatasetWriter(out) as w: w.add(record, image, conditions)``.

    Files go to a temporary folder beside ``out``; on success it is renamed to
    ``out`` (replacing an existing folder only if ``overwrite`` and only one
    these writers made, see :func:`check_output_folder`); on error it is
    removed and ``out`` is untouched. ``fmt`` and ``info`` go into the
    folder's :data:`DATASET_MARKER`.
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False, fmt: str = "record", **info: Any):
        self.out = Path(out)
        recover_dir(self.out)  # what a killed writer of this folder left
        check_output_folder(self.out, overwrite)
        self.fmt, self.info = fmt, info
        self.tmp: Path | None = None
        self.records: list[Record] = []
        self._writing = atomic_write_dir(self.out)

    def __enter__(self) -> "DatasetWriter":
        self.tmp = self._writing.__enter__()
        return self

    def add(self, record: Record, image: Image.Image | np.ndarray | bytes | str | os.PathLike,
            conditions: dict[str, Image.Image | np.ndarray | bytes] | None = None) -> Record:
        """Add one image (array, PIL image, encoded PNG bytes, or a path to copy) and its condition maps."""
        assert self.tmp is not None, "use DatasetWriter as a context manager"
        why = unsafe_name_reason(record.file_name)
        if why is not None:
            raise ValueError(f"record file name {record.file_name!r} {why}")
        dst = self.tmp / record.file_name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(image, (str, os.PathLike)):
            shutil.copyfile(image, dst)
        else:
            _save_png(image, dst)
        stem = Path(record.file_name).stem
        for name, cmap in (conditions or {}).items():
            rel = f"conditions/{name}/{stem}.png"
            (self.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            _save_png(cmap, self.tmp / rel)
            record.conditions[name] = rel
        self.records.append(record)
        return record

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        if exc_type is None:
            try:
                write_jsonl(self.tmp / "metadata.jsonl", (r.to_json() for r in self.records))
                write_marker(self.tmp, self.fmt, **self.info)
            except BaseException as e:
                self._writing.__exit__(type(e), e, e.__traceback__)
                raise
        return bool(self._writing.__exit__(exc_type, exc, tb))


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


def dataset_info(folder: str | os.PathLike) -> dict[str, Any]:
    """What a folder's :data:`DATASET_MARKER` records (format, version, splits, skipped); {} without one."""
    try:
        info = json.loads((Path(folder) / DATASET_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}
