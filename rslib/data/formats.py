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
folder and rename it into place only when everything succeeded. Each folder
they write holds a marker file (:data:`DATASET_MARKER`); ``overwrite`` replaces
only a folder that has one.
"""
from __future__ import annotations

import codecs
import json
import os
import re
import secrets
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterable, Iterator
from xml.parsers import expat

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


def _inside(folder: Path, name: str, where: str | os.PathLike, entry: str, line: int | None = None) -> Path:
    """``folder / name`` for a name read from the file ``where`` (its ``entry``, at ``line``); a
    :class:`DataFormatError` when the name is absolute, has a '..' component or leads outside ``folder``."""
    why = unsafe_name_reason(name)
    if why is not None:
        raise DataFormatError(where, f"{entry}: file name {name!r} {why}", line,
                              f"file names must be relative to {folder}")
    path = folder / name
    _check_inside(path, folder, where, entry, line)
    return path


def _check_inside(path: Path, folder: Path, where: str | os.PathLike | None = None, entry: str = "",
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
            if not _numbers(bbox, 4) or not (0 <= bbox[0] <= bbox[2] <= 1 and 0 <= bbox[1] <= bbox[3] <= 1):
                raise fail(f"objects[{i}].bbox must be 4 numbers [x1, y1, x2, y2] with 0 <= x1 <= x2 <= 1 and "
                           f"0 <= y1 <= y2 <= 1, got {bbox!r}")
            if obb is None:
                objects.append(ObjectAnnotation.from_bbox(o["label"], bbox))
                continue
            if not _numbers(obb, 8):
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


def _numbers(value: Any, n: int, finite: bool = True) -> bool:
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
                    if not _inside(split_dir, rel, meta, "file", i).is_file():
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


def _write_marker(folder: Path, fmt: str, **info: Any) -> None:
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
                _write_marker(self.tmp, self.fmt, **self.info)
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


# --------------------------------------------------------------------------------------------
# Readers of real data sets, as published, into the record format
# --------------------------------------------------------------------------------------------

CONVERT_FORMATS = ("rsicd", "fmow", "dior", "dior-rsvg", "dota")
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
MAX_IMAGE_SIDE = 10**6  # pixels: a larger recorded width or height is an invalid value

FMOW_CLASSES = (
    "airport", "airport_hangar", "airport_terminal", "amusement_park", "aquaculture",
    "archaeological_site", "barn", "border_checkpoint", "burial_site", "car_dealership",
    "construction_site", "crop_field", "dam", "debris_or_rubble", "educational_institution",
    "electric_substation", "factory_or_powerplant", "fire_station", "flooded_road", "fountain",
    "gas_station", "golf_course", "ground_transportation_station", "helipad", "hospital",
    "impoverished_settlement", "interchange", "lake_or_pond", "lighthouse", "military_facility",
    "multi-unit_residential", "nuclear_powerplant", "office_building", "oil_or_gas_facility", "park",
    "parking_lot_or_garage", "place_of_worship", "police_station", "port", "prison", "race_track",
    "railway_bridge", "recreational_facility", "road_bridge", "runway", "shipyard", "shopping_mall",
    "single-unit_residential", "smokestack", "solar_farm", "space_facility", "stadium", "storage_tank",
    "surface_mine", "swimming_pool", "toll_booth", "tower", "tunnel_opening", "waste_disposal",
    "water_treatment_facility", "wind_farm", "zoo",
)
FMOW_FALSE_DETECTION = "false_detection"

DIOR_CLASSES = (
    "airplane", "airport", "baseballfield", "basketballcourt", "bridge", "chimney", "dam",
    "Expressway-Service-area", "Expressway-toll-station", "golffield", "groundtrackfield", "harbor",
    "overpass", "ship", "stadium", "storagetank", "tenniscourt", "trainstation", "vehicle", "windmill",
)
_DIOR_READABLE = {
    "baseballfield": "baseball field", "basketballcourt": "basketball court",
    "Expressway-Service-area": "expressway service area", "Expressway-toll-station": "expressway toll station",
    "golffield": "golf field", "groundtrackfield": "ground track field", "storagetank": "storage tank",
    "tenniscourt": "tennis court", "trainstation": "train station",
}

DOTA_CLASSES_V10 = (
    "plane", "ship", "storage-tank", "baseball-diamond", "tennis-court", "basketball-court",
    "ground-track-field", "harbor", "bridge", "large-vehicle", "small-vehicle", "helicopter",
    "roundabout", "soccer-ball-field", "swimming-pool",
)
DOTA_CLASSES_V15 = DOTA_CLASSES_V10 + ("container-crane",)

_Items = list[tuple[Record, Path]]  # (record, image to copy) for one split


class InvalidValues:
    """What the readers do with a value no image can have (a box outside the image, a cloud cover of 1e9, an
    image that does not decode): refuse it, naming the file, the line and the value (default), or, with
    ``skip``, drop its object or record and count the drop by reason."""

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.dropped: Counter[tuple[str, str]] = Counter()  # (object | record, reason) -> count

    def found(self, path: str | os.PathLike, line: int | None, reason: str, value: str,
              drops: str = "object") -> None:
        """Raise a :class:`DataFormatError`, or when skipping count the drop (and, for a record, raise
        :class:`_DropRecord` for the reader to leave the record out)."""
        if not self.skip:
            raise DataFormatError(path, f"{reason}: {value}", line,
                                  f"correct it, or pass --skip-invalid (skip_invalid=True) to drop the {drops}")
        self.dropped[(drops, reason)] += 1
        if drops == "record":
            raise _DropRecord

    def summary(self) -> list[dict[str, Any]]:
        """The drops as ``[{"dropped": "object", "reason": ..., "count": n}, ...]``, most frequent first."""
        return [{"dropped": d, "reason": r, "count": n} for (d, r), n in self.dropped.most_common()]


class _DropRecord(Exception):
    """Raised by :meth:`InvalidValues.found` when a record is dropped: the reader leaves it out."""


def _keep_records(build: Callable[[Any], tuple[Record, Path]], sources: Iterable[Any]) -> _Items:
    """``build(source)`` for each source, leaving out the records that :class:`InvalidValues` dropped."""
    items: _Items = []
    for source in sources:
        try:
            items.append(build(source))
        except _DropRecord:
            pass
    return items


def convert(fmt: str, src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
            skip_invalid: bool = False, split: str | None = None, dior_r: str | os.PathLike | None = None,
            tile: int | None = None, gap: int | None = None) -> list[Path]:
    """Convert a data set in its published layout at ``src`` into record-format splits ``out/{train,val,test}``.

    Every annotation is read and checked, and every image decoded, before any image is copied; all splits are
    written into one temporary folder beside ``out`` that is renamed into place at the end, so a failure leaves
    ``out`` as it was (absent, or the previous conversion when ``overwrite``). ``overwrite`` replaces only a
    folder written by this function (:func:`check_output_folder`). Invalid values are refused unless
    ``skip_invalid``, which drops their objects or records and records the count per reason in
    ``out/.rslib-dataset.json`` (:func:`dataset_info`). ``split`` names the split of a single DOTA split folder
    (default: the folder's name when it is train, val or test, else train). ``dior_r`` (DIOR-RSVG only) is the
    DIOR-R folder whose oriented boxes are joined to the boxes by image id (default: one found inside ``src``).
    ``tile`` (DOTA only) cuts every image into ``tile`` x ``tile`` tiles overlapping by ``gap`` pixels (default
    :data:`DOTA_GAP`), see :func:`dota_tiles`. Returns the split folders written.
    """
    notes: dict[str, Any] = {}  # what a converter records in the marker besides the splits
    converters: dict[str, Callable[[Path, InvalidValues], dict[str, _Items]]] = {
        "rsicd": _rsicd_splits, "fmow": _fmow_splits, "dior": _dior_splits,
        "dior-rsvg": lambda path, invalid: _dior_rsvg_splits(path, invalid, dior_r, notes),
        "dota": lambda path, invalid: _dota_splits(path, invalid, split),
    }
    if fmt not in converters:
        raise UsageError(f"unknown format {fmt!r}; choose one of: {', '.join(CONVERT_FORMATS)}")
    if split is not None and (fmt != "dota" or split not in SPLITS):
        raise UsageError(f"split {split!r}: a split is named only for a single DOTA split folder, as one of "
                         f"{', '.join(SPLITS)}")
    if dior_r is not None:
        dior_r = Path(dior_r)
        if fmt != "dior-rsvg":
            raise UsageError("a DIOR-R folder is joined only to DIOR-RSVG (--format dior-rsvg); the dior format "
                             "reads DIOR-R's boxes from its own Annotations/Oriented Bounding Boxes/")
        if not dior_r.is_dir():
            raise UsageError(f"{dior_r}: DIOR-R folder does not exist (point --dior-r at the DIOR-R folder as "
                             f"published, or at its Oriented Bounding Boxes folder)")
    if tile is not None or gap is not None:
        if fmt != "dota":
            raise UsageError("tiles (--tile, --gap) are cut only from DOTA images (--format dota)")
        if tile is None:
            raise UsageError("--gap needs --tile (the tile side in pixels, e.g. --tile 512)")
        gap = DOTA_GAP if gap is None else gap
        if tile < 1 or not 0 <= gap < tile:
            raise UsageError(f"tiles of {tile} px with a gap of {gap} px: the tile side must be at least 1 and the "
                             f"gap at least 0 and smaller than the tile (e.g. --tile 512 --gap 100)")
        notes["tiles"] = {"tile": tile, "gap": gap, "min_visible": DOTA_MIN_VISIBLE}
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UsageError(f"{src}: source folder does not exist (point --src at the {fmt} folder as published)")
    src_abs, out_abs = src.resolve(), out.resolve()
    if out_abs == src_abs or out_abs in src_abs.parents:
        raise UsageError(f"the output folder {out} must not contain the source folder {src}")
    recover_dir(out)  # what a killed conversion into ``out`` left
    check_output_folder(out, overwrite)
    invalid = InvalidValues(skip_invalid)
    splits = converters[fmt](src, invalid)
    splits = {name: _decodable(items, invalid) for name, items in splits.items()}
    splits = {name: items for name, items in splits.items() if items}
    if not splits:
        raise DataFormatError(src, f"no images found for format {fmt!r}")
    written = []
    with atomic_write_dir(out) as tmp:
        for name, items in splits.items():
            with DatasetWriter(tmp / name, fmt=fmt) as writer:
                for record, image in (dota_tiles(items, tile, gap, invalid) if tile is not None else items):
                    writer.add(record, image)
            if writer.records:
                written.append(name)
            else:  # every image of the split was dropped while tiling
                shutil.rmtree(tmp / name)
        if not written:
            raise DataFormatError(src, f"no image of format {fmt!r} could be read")
        _write_marker(tmp, fmt, splits=written, source=str(src_abs), skipped=invalid.summary(), **notes)
    return [out / name for name in written]


def dataset_info(folder: str | os.PathLike) -> dict[str, Any]:
    """What a folder's :data:`DATASET_MARKER` records (format, version, splits, skipped); {} without one."""
    try:
        info = json.loads((Path(folder) / DATASET_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def image_problem(path: Path) -> str | None:
    """Why the image at ``path`` does not decode (empty, truncated, not an image), or None.

    PNG files are checked chunk by chunk (CRCs, without inflating the pixels), JPEG files decoded at 1/8 scale,
    other formats decoded in full; the decompression-bomb limit does not apply to a file being checked.
    """
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                im.verify()
            else:
                im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return None


def _decodable(items: _Items, invalid: InvalidValues) -> _Items:
    """The items whose image decodes; another image is refused, or its record dropped (``skip_invalid``)."""

    def check(item: tuple[Record, Path]) -> tuple[Record, Path]:
        problem = image_problem(item[1])
        if problem is not None:
            invalid.found(item[1], None, "image does not decode", problem, drops="record")
        return item

    return _keep_records(check, items)


# CC-Diff's instance counts per format, as (at most, padded to): upstream truncates and pads DIOR(-RSVG) to 6
# instances; its DOTA converter only pads, so DOTA keeps every object (None: no limit)
CCDIFF_INSTANCES: dict[str, tuple[int | None, int | None]] = {"dior": (6, 6), "dior-rsvg": (6, 6), "dota": (None, 6)}


def write_ccdiff_metadata(records: Iterable[Record], path: str | os.PathLike, max_instances: int | None = 6,
                          pad_to: int | None = None) -> None:
    """Write CC-Diff's own ``metadata.jsonl`` (file_name, caption, bndboxes, obboxes), one line per image.

    ``caption`` is ``[global caption, label_1, ..., label_k]``; boxes are
    normalised ``[x1, y1, x2, y2]`` and ``[x1, y1, ..., x4, y4]``. The first
    ``max_instances`` objects are kept (``None``: all of them), and the lists
    are padded with ``""`` and zero boxes to ``pad_to`` objects (default:
    ``max_instances``; 0 or ``None`` with ``max_instances=None``: no padding).
    :data:`CCDIFF_INSTANCES` holds upstream's values per format, and
    :func:`write_ccdiff_split` uses them.
    """
    for name, value in (("max_instances", max_instances), ("pad_to", pad_to)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0 or None, got {value}")
    rows = []
    for rec in records:
        objs = list(rec.objects) if max_instances is None else list(rec.objects)[:max_instances]
        caption = [rec.captions[0] if rec.captions else "", *(o.label for o in objs)]
        bnd = [[round(float(v), 5) for v in o.bbox] for o in objs]
        obb = [[round(float(v), 5) for v in o.obb] for o in objs]
        pad = max(0, ((max_instances if pad_to is None else pad_to) or 0) - len(objs))
        caption += [""] * pad
        bnd += [[0.0] * 4 for _ in range(pad)]
        obb += [[0.0] * 8 for _ in range(pad)]
        rows.append({"file_name": rec.file_name, "caption": caption, "bndboxes": bnd, "obboxes": obb})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part-{secrets.token_hex(6)}")  # permissions from the umask, as for path
    try:
        write_jsonl(tmp, rows)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_ccdiff_split(split_dir: str | os.PathLike, path: str | os.PathLike) -> tuple[int | None, int | None]:
    """CC-Diff's ``metadata.jsonl`` at ``path`` for a converted split, with the instance counts upstream uses for
    the split's format (:data:`CCDIFF_INSTANCES`; 6 and 6 for other formats); returns (at most, padded to)."""
    fmt = dataset_info(split_dir).get("format")
    max_instances, pad_to = CCDIFF_INSTANCES.get(fmt, (6, 6))
    write_ccdiff_metadata(read_records(split_dir), path, max_instances, pad_to)
    return max_instances, pad_to


# --------------------------------------------------------------------------------- captions

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_POSITIONS = {(0, 0): "at the top left", (1, 0): "at the top", (2, 0): "at the top right",
              (0, 1): "on the left", (1, 1): "in the center", (2, 1): "on the right",
              (0, 2): "at the bottom left", (1, 2): "at the bottom", (2, 2): "at the bottom right"}
# Long-side directions of oriented boxes, in 45-degree sectors centred on 0, 45, 90 and 135 degrees (north up)
DIRECTIONS = ("east-west", "northeast-southwest", "north-south", "northwest-southeast")
GENERIC_SCENE = "a remote sensing scene"  # <scene> of a DIOR caption when no object type names one
# DIOR classes that name the scene of CC-Diff's global caption (upstream overrides its scene classifier with them)
DIOR_SCENE_CLASSES = {"golffield": "golffield", "harbor": "harbor", "airport": "airport",
                      "Expressway-Service-area": "freeway", "Expressway-toll-station": "freeway"}


def count_words(n: int) -> str:
    """A count as captions write it: in words up to ten ("three"), in digits above ("12")."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def position_phrase(x: float, y: float, grid: int = 3) -> str:
    """Where a point (normalised) lies, as a caption phrase ("on the left", "at the top right", "in the center").

    The image is cut into ``grid`` x ``grid`` cells; the outer ring of cells gives the eight edge and corner
    phrases and every inner cell is the centre: ``grid=3`` is nine equal cells (SynthRS), ``grid=4`` CC-Diff's
    layout grid, whose centre is the central 2 x 2 cells.
    """

    def band(v: float) -> int:
        cell = min(grid - 1, max(0, int(v * grid)))
        return 0 if cell == 0 else 2 if cell == grid - 1 else 1

    return _POSITIONS[(band(x), band(y))]


def obb_direction(obb: Iterable[float], width: float = 1.0, height: float = 1.0) -> str:
    """The compass direction of an oriented box's long side (one of :data:`DIRECTIONS`), with north up.

    ``obb`` holds the 4 corners in order, normalised by an image of ``width`` x ``height`` pixels; of two equal
    sides (a square) the first one counts.
    """
    pts = np.asarray(list(obb), dtype=float).reshape(4, 2) * [width, height]
    first, second = pts[1] - pts[0], pts[2] - pts[1]
    dx, dy = first if np.hypot(*first) >= np.hypot(*second) else second
    angle = np.degrees(np.arctan2(-dy, dx)) % 180.0  # image y points down: north is -y
    return DIRECTIONS[int((angle + 22.5) % 180.0 // 45.0)]


def layout_sentence(objects: Iterable[ObjectAnnotation], readable: Callable[[str], str] = str,
                    width: float = 1.0, height: float = 1.0) -> str:
    """CC-Diff's layout sentence: the objects counted by class, direction and place on the 4 x 4 grid, e.g.
    "There are two airplanes oriented north-south at the top left and one vehicle oriented east-west in the
    center." (groups in order of first appearance; "" without objects). ``readable`` names a class."""
    groups: Counter[tuple[str, str, str]] = Counter()
    for o in objects:
        x1, y1, x2, y2 = o.bbox
        groups[(o.label, obb_direction(o.obb, width, height), position_phrase((x1 + x2) / 2, (y1 + y2) / 2, 4))] += 1
    if not groups:
        return ""
    parts = [f"{count_words(n)} {_plural(readable(label)) if n > 1 else readable(label)} oriented {direction} {place}"
             for (label, direction, place), n in groups.items()]
    return f"There {'is' if next(iter(groups.values())) == 1 else 'are'} {_join_words(parts)}."


def layout_caption(scene: str, objects: Iterable[ObjectAnnotation], readable: Callable[[str], str] = str,
                   width: float = 1.0, height: float = 1.0) -> str:
    """CC-Diff's global caption: "This is an aerial image of <scene>. " and the :func:`layout_sentence`."""
    return f"This is an aerial image of {scene}. {layout_sentence(objects, readable, width, height)}".rstrip()


def dior_scene(labels: Iterable[str], fallback: str | None = None) -> str:
    """<scene> of a DIOR image's global caption: the scene its first object of :data:`DIOR_SCENE_CLASSES` names
    (golffield, harbor, airport; freeway for the expressway classes), else ``fallback`` (the record's scene), else
    :data:`GENERIC_SCENE` (upstream asks a scene classifier, RSMamba trained on NWPU-RESISC45, which is not
    part of this project)."""
    named = next((DIOR_SCENE_CLASSES[label] for label in labels if label in DIOR_SCENE_CLASSES), None)
    return named or fallback or GENERIC_SCENE


# ---------------------------------------------------------------------------------- helpers

def _null_metadata() -> dict[str, float | int | None]:
    return {k: None for k in METADATA_FIELDS}


def _class_key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


def _class_lookup(classes: Iterable[str]) -> dict[str, str]:
    return {_class_key(c): c for c in classes}


def _plural(noun: str) -> str:
    head, _, last = noun.rpartition(" ")
    if re.search(r"(s|sh|ch|x|z)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def _join_words(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _count_caption(labels: list[str], readable: Callable[[str], str], prefix: str = "an aerial image") -> str:
    """'an aerial image with 3 airplanes and 1 vehicle' (most frequent class first)."""
    if not labels:
        return prefix
    counts = Counter(labels)
    order = sorted(counts, key=lambda c: (-counts[c], labels.index(c)))
    parts = [f"{counts[c]} {_plural(readable(c)) if counts[c] > 1 else readable(c)}" for c in order]
    return f"{prefix} with {_join_words(parts)}"


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _clip01(v: float) -> float:
    return min(1.0, max(0.0, float(v)))


def _numbers_text(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def _norm_object(label: str, bbox_px: list[float], obb_px: list[float] | None, width: float, height: float,
                 report: Callable[[str, str], None], shown: str | None = None) -> ObjectAnnotation | None:
    """Normalise pixel boxes (``bbox_px`` as x1, y1, x2, y2) by the image size and clip them to [0, 1].

    A box no image can hold (a coordinate more than an image size beyond the border, inverted, of zero width or
    height, or wholly outside the image) goes to ``report(reason, value)`` and gives None (when it returns).
    ``shown`` is how the message shows the box (default: ``box`` and the pixel coordinates).
    """
    shown = f"{label} {shown or 'box ' + _numbers_text(bbox_px)}"
    size = f"on a {width:g} x {height:g} image"
    coords = [*bbox_px, *(obb_px or [])]
    if not np.isfinite(coords).all():
        report("coordinate is not finite", shown if obb_px is None else f"{shown}, corners {_numbers_text(obb_px)}")
        return None
    if not all(-width <= x <= 2 * width for x in coords[0::2]) or not all(
            -height <= y <= 2 * height for y in coords[1::2]):
        report("coordinate far outside the image", f"{shown} {size}" if obb_px is None
               else f"{shown}, corners {_numbers_text(obb_px)} {size}")
        return None
    x1, y1, x2, y2 = bbox_px
    if x2 < x1 or y2 < y1:
        report("inverted box", shown)
        return None
    if x2 == x1 or y2 == y1:
        report("degenerate box (zero width or height)", shown)
        return None
    box = [_clip01(x1 / width), _clip01(y1 / height), _clip01(x2 / width), _clip01(y2 / height)]
    if box[2] <= box[0] or box[3] <= box[1]:
        report("box outside the image", f"{shown} {size}")
        return None
    if obb_px is None:
        return ObjectAnnotation.from_bbox(label, box)
    obb = [_clip01(v / (width if i % 2 == 0 else height)) for i, v in enumerate(obb_px)]
    return ObjectAnnotation(label, box, obb)


def _image_size(path: Path, where: Path | None = None, line: int | None = None) -> tuple[int, int]:
    """Width and height from the image header, without decoding pixels (very large images included)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # header only: the decompression-bomb guard does not apply
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError) as e:
        raise DataFormatError(where or path, f"cannot read the image {path.name} ({e})", line) from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _read_text(path: Path) -> str:
    """A text file as UTF-8 (with or without a byte-order mark); a byte that is not UTF-8 is reported with its line."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        raise DataFormatError(path, f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {e.start - line_start + 1})",
                              data.count(b"\n", 0, e.start) + 1, "save it as UTF-8") from None


def _load_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        truncated = e.pos >= len(text.rstrip())
        raise DataFormatError(path, f"invalid JSON ({e.msg}, column {e.colno})", e.lineno,
                              "the file ends early, it may be truncated: extract it again" if truncated
                              else "correct the JSON at this line") from None


def _read_list(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines of a split file as (line number, stripped text)."""
    if not path.is_file():
        raise DataFormatError(path, "split file missing", fix="the published data set ships it; restore it")
    _check_inside(path, path.parent)
    lines = _read_text(path).splitlines()
    return [(i, s.strip()) for i, s in enumerate(lines, start=1) if s.strip()]


def _is_folder(path: Path) -> bool:
    """True for a folder, False when nothing is there; a :class:`DataFormatError` for a broken or looping symbolic
    link, or a file where a folder belongs."""
    if path.is_dir():
        return True
    if path.is_symlink() and not path.exists():
        raise DataFormatError(path, f"is a symbolic link to {os.readlink(path)} that leads nowhere (missing, or a loop)",
                              fix="make it point at the folder, or remove it")
    if path.exists():
        raise DataFormatError(path, "is a file where a folder belongs", fix="move it away")
    return False


def _id_key(token: str) -> str:
    """Image id as matched across files: no extension, no zero padding ('00012.jpg' -> '12')."""
    stem = token.strip()
    if stem.lower().endswith((*IMAGE_EXTENSIONS, ".xml", ".txt")):
        stem = stem.rsplit(".", 1)[0]
    return str(int(stem)) if stem.isdigit() else stem


def _scan(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Files of ``folder`` with these suffixes, by :func:`_id_key` of their stem."""
    found: dict[str, Path] = {}
    if _is_folder(folder):
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in suffixes and (p.is_file() or p.is_symlink()):
                _check_inside(p, folder)
                found.setdefault(_id_key(p.stem), p)
    return found


_XML_TRUNCATED = (expat.errors.XML_ERROR_NO_ELEMENTS, expat.errors.XML_ERROR_UNCLOSED_TOKEN,
                  expat.errors.XML_ERROR_PARTIAL_CHAR, expat.errors.XML_ERROR_UNCLOSED_CDATA_SECTION)


class _Xml:
    """A parsed XML file that remembers each element's line, for error messages."""

    def __init__(self, path: Path):
        self.path = path
        builder = ET.TreeBuilder()
        self._lines: dict[int, int] = {}
        parser = expat.ParserCreate()

        def start(tag: str, attrs: dict[str, str]) -> None:
            self._lines[id(builder.start(tag, attrs))] = parser.CurrentLineNumber

        parser.StartElementHandler = start
        parser.EndElementHandler = builder.end
        parser.CharacterDataHandler = builder.data
        data = path.read_bytes()
        try:
            parser.Parse(data, True)
        except expat.ExpatError as e:
            if not re.match(rb"\s*<\?xml[^>]*encoding", data.lstrip(codecs.BOM_UTF8)):  # UTF-8 unless declared
                _read_text(path)  # names the line of a byte that is not UTF-8
            message = expat.ErrorString(e.code)
            raise DataFormatError(path, f"XML does not parse ({message}, column {e.offset + 1})", e.lineno,
                                  "the file ends early, it may be truncated: extract it again"
                                  if message in _XML_TRUNCATED else "correct the XML at this line") from None
        self.root = builder.close()

    def line(self, el: ET.Element) -> int | None:
        return self._lines.get(id(el))

    def reporter(self, el: ET.Element, invalid: InvalidValues) -> Callable[[str, str], None]:
        """``report(reason, value)`` for :func:`_norm_object`: an invalid value of ``el``, at its line."""
        return lambda reason, value: invalid.found(self.path, self.line(el), reason, value)

    def fail(self, el: ET.Element, message: str, fix: str = "") -> DataFormatError:
        return DataFormatError(self.path, message, self.line(el), fix)

    def number(self, el: ET.Element, tag: str, finite: bool = True) -> float:
        """The number in ``el``'s child ``tag`` (``finite=False`` lets inf and nan through, for a box checker)."""
        child = el.find(tag)
        if child is None:
            raise self.fail(el, f"<{el.tag}> has no <{tag}>")
        try:
            value = float((child.text or "").strip())
        except ValueError:
            raise self.fail(child, f"<{tag}> is not a number: {child.text!r}") from None
        if finite and not np.isfinite(value):
            raise self.fail(child, f"<{tag}> is not finite: {child.text!r}")
        return value

    def label(self, obj: ET.Element, lookup: dict[str, str]) -> str:
        name = obj.find("name")
        if name is None or not (name.text or "").strip():
            raise self.fail(obj, "<object> has no <name>")
        canonical = lookup.get(_class_key(name.text or ""))
        if canonical is None:
            raise self.fail(name, f"unknown class {name.text.strip()!r}",
                            f"known classes: {', '.join(sorted(set(lookup.values())))}")
        return canonical

    def size(self, image: Path) -> tuple[float, float]:
        """(width, height) from <size>, or from the image header when absent or zero."""
        size = self.root.find("size")
        if size is not None and size.find("width") is not None and size.find("height") is not None:
            w, h = self.number(size, "width"), self.number(size, "height")
            if max(w, h) > MAX_IMAGE_SIDE:
                raise self.fail(size, f"<size> {w:g} x {h:g} is not the size of an image")
            if w > 0 and h > 0:
                return w, h
        return _image_size(image, self.path)


def _voc_boxes(xml: _Xml, lookup: dict[str, str]) -> list[tuple[str, list[float], ET.Element]]:
    """(label, [xmin, ymin, xmax, ymax] in pixels, element) of each <object> with a <bndbox>."""
    out = []
    for obj in xml.root.iter("object"):
        label = xml.label(obj, lookup)
        box = obj.find("bndbox")
        if box is None:
            raise xml.fail(obj, "<object> has no <bndbox>")
        out.append((label, [xml.number(box, t, finite=False) for t in ("xmin", "ymin", "xmax", "ymax")], obj))
    return out


# ------------------------------------------------------------------------------------ RSICD

def _rsicd_scene(file_name: str) -> str | None:
    """Scene of an RSICD file name: the prefix before the first '_' or digit ('airport_1.jpg' -> 'airport')."""
    prefix = re.split(r"[_\d]", Path(file_name).stem, maxsplit=1)[0].strip()
    return prefix or None


def _rsicd_splits(src: Path, invalid: InvalidValues) -> dict[str, _Items]:
    """RSICD: ``dataset_rsicd.json`` (images with 5 sentences and a split each) and ``RSICD_images/``."""
    ann = src / "dataset_rsicd.json"
    if not ann.is_file():
        raise DataFormatError(ann, "annotation file missing",
                              fix="RSICD ships dataset_rsicd.json at its top level")
    _check_inside(ann, src)
    data = _load_json(ann)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataFormatError(ann, "expected a JSON object with an 'images' list")
    image_dir = next((d for d in (src / "RSICD_images", src / "images") if d.is_dir()), None)
    if image_dir is None:
        raise DataFormatError(src / "RSICD_images", "image folder missing",
                              fix="put the images in RSICD_images/ (or images/) beside dataset_rsicd.json")
    splits: dict[str, _Items] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for i, entry in enumerate(images):
        where = f"images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) or not entry["filename"]:
            raise DataFormatError(ann, f"{where} has no 'filename' string")
        name = entry["filename"]
        where += f" ({name})"
        split = entry.get("split")
        if split not in splits:
            raise DataFormatError(ann, f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not all(
                isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
            raise DataFormatError(ann, f"{where}: 'sentences' must be a list of objects with a 'raw' string")
        captions = [s["raw"].strip() for s in sentences if s["raw"].strip()]
        if not captions:
            raise DataFormatError(ann, f"{where}: no non-empty sentence")
        if name in seen:
            raise DataFormatError(ann, f"{where}: image listed twice")
        seen.add(name)
        image = _inside(image_dir, name, ann, where)
        if not image.is_file():
            raise DataFormatError(ann, f"{where}: image listed but missing from {image_dir}")
        splits[split].append((Record(f"images/{name}", captions, _null_metadata(), [], _rsicd_scene(name)), image))
    return splits


# ------------------------------------------------------------------------------------- fMoW

_FMOW_LOOKUP = _class_lookup((*FMOW_CLASSES, FMOW_FALSE_DETECTION))


def _wkt_centroid(text: Any, path: Path, invalid: InvalidValues) -> tuple[float, float]:
    """(latitude, longitude): mean of the distinct vertices of a WKT ``POLYGON ((lon lat, ...))`` outer ring."""
    m = re.match(r"\s*(?:MULTI)?POLYGON\s*\(+([^()]*)\)", text, re.I) if isinstance(text, str) else None
    if m is None:
        raise DataFormatError(path, f"'raw_location' is not a WKT POLYGON: {text!r}")
    vertices: list[tuple[float, float]] = []
    for pair in m.group(1).split(","):
        try:
            lon, lat = (float(v) for v in pair.split())
        except ValueError:
            raise DataFormatError(path, f"'raw_location' has a bad vertex {pair.strip()!r}") from None
        if (lon, lat) not in vertices:
            vertices.append((lon, lat))
    lat = float(np.mean([v[1] for v in vertices]))
    lon = float(np.mean([v[0] for v in vertices]))
    if metadata_problem("latitude", lat) or metadata_problem("longitude", lon):
        invalid.found(path, None, "'raw_location' is not a latitude/longitude", f"centroid ({lat}, {lon})",
                      drops="record")
    return lat, lon


def _fmow_number(data: dict, key: str, path: Path) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataFormatError(path, f"{key!r} must be a number, got {value!r}")
    return float(value)


def _fmow_metadata(data: dict, key: str, path: Path, invalid: InvalidValues) -> float | None:
    """A metadata field of an fMoW JSON, checked against :data:`METADATA_LIMITS`."""
    value = _fmow_number(data, key, path)
    if value is not None and (problem := metadata_problem(key, value)) is not None:
        invalid.found(path, None, f"'{key}' {problem}", repr(data[key]), drops="record")
    return value


def _fmow_size(data: dict, image: Path, path: Path, invalid: InvalidValues) -> tuple[float, float]:
    """The image size an fMoW JSON records (``img_width``, ``img_height``), else the image header's."""
    w, h = _fmow_number(data, "img_width", path), _fmow_number(data, "img_height", path)
    for key, v in (("img_width", w), ("img_height", h)):
        if v is not None and not (np.isfinite(v) and 0 <= v <= MAX_IMAGE_SIDE):
            invalid.found(path, None, "image size out of range", f"{key} {data[key]!r}", drops="record")
    return (w, h) if w and h else _image_size(image, path)


def _fmow_item(js: Path, split_dir: Path, invalid: InvalidValues) -> tuple[Record, Path]:
    _check_inside(js, split_dir)
    data = _load_json(js)
    if not isinstance(data, dict):
        raise DataFormatError(js, "expected a JSON object")
    image = js.with_suffix(".jpg")
    if not image.is_file():
        raise DataFormatError(js, f"image {image.name} missing beside its JSON")
    _check_inside(image, split_dir)
    meta = _null_metadata()
    stamp = data.get("timestamp")
    if stamp is not None:
        m = re.match(r"\s*(\d{4})-(\d{2})-(\d{2})", stamp) if isinstance(stamp, str) else None
        try:
            day = date(int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None
        except ValueError:
            day = None
        if day is None:
            raise DataFormatError(js, f"'timestamp' is not an ISO date like 2015-03-12T10:12:43Z: {stamp!r}")
        if metadata_problem("year", day.year):
            invalid.found(js, None, f"'timestamp' year {metadata_problem('year', day.year)}", repr(stamp),
                          drops="record")
        meta.update(year=day.year, month=day.month, day=day.day)
    meta["gsd"] = _fmow_metadata(data, "gsd", js, invalid)
    meta["cloud_cover"] = _fmow_metadata(data, "cloud_cover", js, invalid)
    if data.get("raw_location") is not None:
        meta["latitude"], meta["longitude"] = _wkt_centroid(data["raw_location"], js, invalid)

    parts = js.relative_to(split_dir).parts
    folder = parts[0] if len(parts) >= 3 else None
    folder_class = _FMOW_LOOKUP.get(_class_key(folder)) if folder else None
    boxes = data.get("bounding_boxes") or []
    if not isinstance(boxes, list):
        raise DataFormatError(js, "'bounding_boxes' must be a list")
    size: tuple[float, float] | None = None
    objects, labels = [], []
    for i, b in enumerate(boxes):
        if not isinstance(b, dict) or not _numbers(b.get("box"), 4, finite=False):
            raise DataFormatError(js, f"bounding_boxes[{i}] needs a 'box' of 4 numbers [x, y, w, h]")
        raw = b.get("category")
        if raw is None or raw == "":  # unlabeled (e.g. the sequestered test set): the folder names the class
            label = folder_class
        else:
            label = _FMOW_LOOKUP.get(_class_key(str(raw)))
            if label is None:
                raise DataFormatError(js, f"bounding_boxes[{i}]: unknown category {raw!r}",
                                      fix="fMoW has 62 classes plus 'false_detection'")
        if label is None or label == FMOW_FALSE_DETECTION:
            continue
        labels.append(label)
        if size is None:
            size = _fmow_size(data, image, js, invalid)
        x, y, bw, bh = (float(v) for v in b["box"])

        def report(reason: str, value: str, i: int = i) -> None:
            invalid.found(js, None, reason, f"bounding_boxes[{i}] {value}")

        obj = _norm_object(label, [x, y, x + bw, y + bh], None, *size, report,
                           shown=f"box [x, y, w, h] {_numbers_text(b['box'])}")
        if obj is not None:
            objects.append(obj)
    scene = folder_class if folder_class not in (None, FMOW_FALSE_DETECTION) else (labels[0] if labels else None)
    caption = f"a satellite image of {_article(scene.replace('_', ' '))}" if scene else "a satellite image"
    return Record(f"images/{image.name}", [caption], meta, objects, scene), image


def _fmow_splits(src: Path, invalid: InvalidValues) -> dict[str, _Items]:
    """fMoW-rgb: ``{split}/<category>/<category>_<id>/<category>_<id>_<n>_rgb.{jpg,json}``."""
    splits: dict[str, _Items] = {}
    for split in SPLITS:
        if (src / split).is_dir():
            files = sorted((src / split).rglob("*_rgb.json"))
            items = _keep_records(lambda js, d=src / split: _fmow_item(js, d, invalid), files)
            _check_unique(items, src / split)
            splits[split] = items
    if not splits:
        raise DataFormatError(src, "no train/, val/ or test/ folder", fix="point --src at the fMoW-rgb folder")
    return splits


def _check_unique(items: _Items, where: Path) -> None:
    seen: dict[str, Path] = {}
    for rec, image in items:
        if rec.file_name in seen:
            raise DataFormatError(image, f"same file name as {seen[rec.file_name]} in {where}")
        seen[rec.file_name] = image


# ------------------------------------------------------------------------------------- DIOR

_DIOR_LOOKUP = _class_lookup(DIOR_CLASSES)


def _dior_readable(label: str) -> str:
    return _DIOR_READABLE.get(label, label.lower())


def _box_iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _dior_oriented(path: Path) -> list[tuple[str, list[float]]]:
    """(label, 8 corner coordinates in pixels) of each object of a DIOR-R oriented-box XML."""
    xml = _Xml(path)
    tags = ("x_left_top", "y_left_top", "x_right_top", "y_right_top",
            "x_right_bottom", "y_right_bottom", "x_left_bottom", "y_left_bottom")
    out = []
    for obj in xml.root.iter("object"):
        label = xml.label(obj, _DIOR_LOOKUP)
        box = obj.find("robndbox")
        if box is None:
            raise xml.fail(obj, "<object> has no <robndbox>")
        out.append((label, [xml.number(box, t, finite=False) for t in tags]))
    return out


def _match_oriented(hbbs: list[tuple[str, list[float], ET.Element]], obbs: list[tuple[str, list[float]]],
                    by_order: bool = True) -> list[list[float] | None]:
    """Oriented box for each horizontal one: by order when ``by_order`` and the labels agree (the two files of one
    annotation), else the free one of the same label whose enclosing box overlaps it best (IoU at least 0.3)."""
    if by_order and len(hbbs) == len(obbs) and all(h[0] == o[0] for h, o in zip(hbbs, obbs)):
        return [o[1] for o in obbs]
    free = list(range(len(obbs)))
    out: list[list[float] | None] = []
    for label, box, _ in hbbs:
        best, best_iou = None, 0.0
        for j in free:
            if obbs[j][0] != label:
                continue
            pts = np.asarray(obbs[j][1]).reshape(4, 2)
            iou = _box_iou(box, [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])
            if iou > best_iou:
                best, best_iou = j, iou
        if best is not None and best_iou >= 0.3:
            free.remove(best)
            out.append(obbs[best][1])
        else:
            out.append(None)
    return out


def _dior_splits(src: Path, invalid: InvalidValues) -> dict[str, _Items]:
    """DIOR / DIOR-R: ``JPEGImages-*/``, ``Annotations/{Horizontal,Oriented} Bounding Boxes/``, ``ImageSets/``."""
    lists = {s: _read_list(src / "ImageSets" / "Main" / f"{s}.txt") for s in SPLITS}
    images: dict[str, Path] = {}
    for folder in ("JPEGImages-trainval", "JPEGImages-test", "JPEGImages"):
        for key, path in _scan(src / folder, IMAGE_EXTENSIONS).items():
            images.setdefault(key, path)
    if not images:
        raise DataFormatError(src / "JPEGImages-trainval", "no images found",
                              fix="DIOR ships JPEGImages-trainval/ and JPEGImages-test/ (or one JPEGImages/)")
    hbb_dir = src / "Annotations" / "Horizontal Bounding Boxes"
    if not hbb_dir.is_dir():
        hbb_dir = src / "Annotations"
    if not hbb_dir.is_dir():
        raise DataFormatError(src / "Annotations" / "Horizontal Bounding Boxes", "annotation folder missing")
    hbb_files = _scan(hbb_dir, (".xml",))
    obb_files = _scan(src / "Annotations" / "Oriented Bounding Boxes", (".xml",))
    splits: dict[str, _Items] = {}
    for split, entries in lists.items():
        list_file = src / "ImageSets" / "Main" / f"{split}.txt"
        items: _Items = []
        for line, token in entries:
            key = _id_key(token)
            image = images.get(key)
            if image is None:
                raise DataFormatError(list_file, f"image {token!r} listed but missing", line)
            if key not in hbb_files:
                raise DataFormatError(list_file, f"image {token!r} has no annotation in {hbb_dir}", line)
            xml = _Xml(hbb_files[key])
            width, height = xml.size(image)
            hbbs = _voc_boxes(xml, _DIOR_LOOKUP)
            oriented = (_match_oriented(hbbs, _dior_oriented(obb_files[key])) if key in obb_files
                        else [None] * len(hbbs))
            objects = [o for (label, box, el), obb in zip(hbbs, oriented)
                       if (o := _norm_object(label, box, obb, width, height, xml.reporter(el, invalid))) is not None]
            caption = _count_caption([o.label for o in objects], _dior_readable)
            items.append((Record(f"images/{image.name}", [caption], _null_metadata(), objects, None), image))
        _check_unique(items, list_file)
        splits[split] = items
    return splits


# -------------------------------------------------------------------------------- DIOR-RSVG

def _is_object_index(token: str) -> bool:
    """True for a plain object number ('0', '12'); zero-padded ids ('00012') and file names name images."""
    return token.isdigit() and (len(token) == 1 or not token.startswith("0"))


def _dior_r_folder(root: Path) -> Path | None:
    """DIOR-R's folder of oriented-box XML files under ``root`` (``Annotations/Oriented Bounding Boxes/`` as
    published, or ``Oriented Bounding Boxes/``), or None."""
    for folder in (root / "Annotations" / "Oriented Bounding Boxes", root / "Oriented Bounding Boxes"):
        if _is_folder(folder):
            return folder
    return None


def _dior_r_files(src: Path, dior_r: Path | None) -> tuple[Path | None, dict[str, Path]]:
    """The DIOR-R folder joined to a DIOR-RSVG source (``dior_r``, else one found inside ``src``) and its XML
    files by image id; (None, {}) when there is none."""
    if dior_r is None:
        folder = _dior_r_folder(src)
        return (folder, _scan(folder, (".xml",))) if folder is not None else (None, {})
    folder = _dior_r_folder(dior_r) or dior_r
    files = _scan(folder, (".xml",))
    if not files:
        raise DataFormatError(folder, "no DIOR-R oriented-box XML files here",
                              fix="point --dior-r at the DIOR-R folder (the one holding Annotations/Oriented "
                                  "Bounding Boxes/) or at the folder of its XML files")
    return folder, files


def _dior_rsvg_splits(src: Path, invalid: InvalidValues, dior_r: Path | None = None,
                      notes: dict[str, Any] | None = None) -> dict[str, _Items]:
    """DIOR-RSVG: ``JPEGImages/``, ``Annotations/<id>.xml`` (objects with a <description>), ``{split}.txt``.

    The published split files list object indexes: the running count of
    ``<object>`` elements over the annotation files in name order, as the RSVG
    reference loader reads them. A split file that names images instead
    (zero-padded ids such as ``00012`` or names such as ``00012.jpg``) is
    accepted too; the first line of a split file says which of the two it
    holds. Each image goes to one split, with all its objects: test
    first, then val, then train, so that no test image is trained on.

    The captions are CC-Diff's global caption (:func:`layout_caption`, the
    scene from :func:`dior_scene`) and then the referring expressions. The
    oriented boxes come from DIOR-R (``dior_r``, else a DIOR-R folder inside
    ``src``), joined by image id and matched box by box (same class, best
    overlap); a box without a match keeps its corners. ``notes["dior_r"]``
    records the folder and how many boxes were joined.
    """
    lists = {s: _read_list(src / f"{s}.txt") for s in SPLITS}
    images = _scan(src / "JPEGImages", IMAGE_EXTENSIONS)
    if not images:
        raise DataFormatError(src / "JPEGImages", "no images found", fix="DIOR-RSVG ships JPEGImages/")
    ann_dir = src / "Annotations"
    xml_files = sorted(_scan(ann_dir, (".xml",)).values(),
                       key=lambda p: (0, int(p.stem), p.name) if p.stem.isdigit() else (1, 0, p.name))
    if not xml_files:
        raise DataFormatError(ann_dir, "no annotation files found", fix="DIOR-RSVG ships Annotations/<id>.xml")
    parsed: dict[str, tuple[Path, _Xml, list]] = {}
    owner: list[str] = []  # image key of each object, in reference-loader order
    for path in xml_files:
        xml = _Xml(path)
        key = _id_key(path.stem)
        boxes = []
        for label, box, obj in _voc_boxes(xml, _DIOR_LOOKUP):
            desc = obj.find("description")
            boxes.append((label, box, (desc.text or "").strip() if desc is not None else "", obj))
            owner.append(key)
        parsed[key] = (path, xml, boxes)

    assigned: dict[str, str] = {}
    for split in ("test", "val", "train"):
        list_file = src / f"{split}.txt"
        entries = lists[split]
        by_object = not entries or _is_object_index(entries[0][1])
        for line, token in entries:
            if by_object and not _is_object_index(token):
                raise DataFormatError(list_file, f"{token!r} is not an object index (this file lists object numbers, "
                                                 f"as its first line {entries[0][1]!r} does)", line)
            if by_object:
                index = int(token)
                if index >= len(owner):
                    raise DataFormatError(list_file, f"object index {index} out of range (the annotations hold "
                                                     f"{len(owner)} objects)", line)
                key = owner[index]
            else:
                key = _id_key(token)
                if key not in parsed:
                    raise DataFormatError(list_file, f"image {token!r} has no annotation in {ann_dir}", line)
            if key not in images:
                raise DataFormatError(list_file, f"image {token!r} listed but missing from {src / 'JPEGImages'}",
                                      line)
            assigned.setdefault(key, split)

    obb_folder, obb_files = _dior_r_files(src, dior_r)
    n_boxes = n_joined = 0
    splits: dict[str, _Items] = {s: [] for s in SPLITS}
    for key, (path, xml, boxes) in parsed.items():
        split = assigned.get(key)
        if split is None:
            continue
        image = images[key]
        width, height = xml.size(image)
        first: dict[tuple, tuple[str, list[float], ET.Element]] = {}  # the same box twice is one object
        for label, box, _, el in boxes:
            first.setdefault((label, *box), (label, box, el))
        unique = list(first.values())
        oriented = (_match_oriented(unique, _dior_oriented(obb_files[key]), by_order=False) if key in obb_files
                    else [None] * len(unique))
        objects = []
        for (label, box, el), obb in zip(unique, oriented):
            obj = _norm_object(label, box, obb, width, height, xml.reporter(el, invalid))
            if obj is not None:
                objects.append(obj)
                n_boxes, n_joined = n_boxes + 1, n_joined + (obb is not None)
        expressions = list(dict.fromkeys(desc for _, _, desc, _ in boxes if desc))
        caption = layout_caption(dior_scene(o.label for o in objects), objects, _dior_readable, width, height)
        splits[split].append((Record(f"images/{image.name}", [caption, *expressions], _null_metadata(), objects,
                                     None), image))
    if notes is not None and obb_folder is not None:
        notes["dior_r"] = {"folder": str(obb_folder), "boxes": n_boxes, "joined": n_joined}
    return splits


# ------------------------------------------------------------------------------------- DOTA

def _dota_label_dir(split_dir: Path, split: str) -> tuple[Path | None, tuple[str, ...]]:
    """The label folder of a DOTA split and the classes it may use.

    ``labelTxt/``, or the official ``labelTxt-v1.5/`` and ``labelTxt-v1.0/`` with the label files inside or in
    the folder their archive extracts to (``labelTxt/``, ``DOTA-v1.5_<split>/``).
    """
    for name, classes in (("labelTxt", DOTA_CLASSES_V15), ("labelTxt-v1.5", DOTA_CLASSES_V15),
                          ("labelTxt-v1.0", DOTA_CLASSES_V10)):
        d = split_dir / name
        if not _is_folder(d):
            continue
        for inner in ("labelTxt", f"DOTA-v1.5_{split}"):
            if name != "labelTxt" and _is_folder(d / inner):
                return d / inner, classes
        return d, classes
    return None, DOTA_CLASSES_V15


def _dota_labels(path: Path, width: int, height: int, classes: tuple[str, ...], invalid: InvalidValues
                 ) -> tuple[float | None, list[ObjectAnnotation]]:
    """Parse a DOTA label file: ``imagesource:``/``gsd:`` header lines, then ``x1 y1 ... x4 y4 class difficult``."""
    lookup = _class_lookup(classes)
    gsd: float | None = None
    objects: list[ObjectAnnotation] = []
    for i, raw in enumerate(_read_text(path).splitlines(), start=1):
        text = raw.strip()
        if not text:
            continue
        low = text.lower()
        if low.startswith("imagesource:"):
            continue
        if low.startswith("gsd:"):
            value = text[4:].strip()
            if value.lower() in ("", "null", "none", "nan"):
                continue
            try:
                gsd = float(value)
            except ValueError:
                raise DataFormatError(path, f"gsd {value!r} is not a number (or null)", i) from None
            if (problem := metadata_problem("gsd", gsd)) is not None:
                invalid.found(path, i, f"gsd {problem}", value, drops="record")
            continue
        fields = text.split()
        if len(fields) not in (9, 10):
            raise DataFormatError(path, f"expected 10 fields 'x1 y1 x2 y2 x3 y3 x4 y4 category difficult', "
                                        f"got {len(fields)}", i)
        coords = []
        for f in fields[:8]:
            try:
                coords.append(float(f))
            except ValueError:
                raise DataFormatError(path, f"coordinate {f!r} is not a number", i) from None
        label = lookup.get(_class_key(fields[8]))
        if label is None:
            raise DataFormatError(path, f"unknown class {fields[8]!r}", i, f"known classes: {', '.join(classes)}")
        if len(fields) == 10 and fields[9] not in ("0", "1"):
            raise DataFormatError(path, f"difficult flag {fields[9]!r} must be 0 or 1", i)
        xs, ys = coords[0::2], coords[1::2]

        def report(reason: str, value: str, i: int = i) -> None:
            invalid.found(path, i, reason, value)

        obj = _norm_object(label, [min(xs), min(ys), max(xs), max(ys)], coords, width, height, report,
                           shown=f"corners {_numbers_text(coords)}")
        if obj is not None:
            objects.append(obj)
    return gsd, objects


def _dota_readable(label: str) -> str:
    return label.replace("-", " ")


def _dota_image_dir(split_dir: Path) -> Path | None:
    """``images/`` of a DOTA split folder (``images/images/`` where the archives extracted so), or None."""
    img_dir = split_dir / "images"
    if _is_folder(img_dir) and _is_folder(img_dir / "images"):
        return img_dir / "images"
    return img_dir if _is_folder(img_dir) else None


def _dota_split(split_dir: Path, split: str, img_dir: Path, invalid: InvalidValues) -> _Items:
    """The images of one DOTA split folder with their labels (none when the split has no label folder)."""
    label_dir, classes = _dota_label_dir(split_dir, split)
    if label_dir is None and split != "test":
        raise DataFormatError(split_dir / "labelTxt", "label folder missing",
                              fix="DOTA ships labelTxt/ (or labelTxt-v1.0/, labelTxt-v1.5/) beside images/")
    images = _scan(img_dir, IMAGE_EXTENSIONS)
    labels = _scan(label_dir, (".txt",)) if label_dir is not None else {}
    for key, path in labels.items():
        if key not in images:
            raise DataFormatError(path, f"label file has no image {key}.png in {img_dir}")

    def item(image: Path) -> tuple[Record, Path]:
        meta, objects = _null_metadata(), []
        if label_dir is not None:
            label_file = labels.get(_id_key(image.stem))
            if label_file is None:
                raise DataFormatError(label_dir / f"{image.stem}.txt", f"label file missing for image {image.name}")
            width, height = _image_size(image)
            meta["gsd"], objects = _dota_labels(label_file, width, height, classes, invalid)
        caption = _count_caption([o.label for o in objects], _dota_readable)
        return Record(f"images/{image.name}", [caption], meta, objects, None), image

    items = _keep_records(item, images.values())
    _check_unique(items, img_dir)
    return items


def _dota_splits(src: Path, invalid: InvalidValues, split: str | None = None) -> dict[str, _Items]:
    """DOTA v1.0/v1.5: ``{split}/images/*.png`` and ``{train,val}/labelTxt/*.txt`` (``labelTxt-v1.x`` accepted),
    or a single split folder with ``images/`` and ``labelTxt/`` (as DOTA_devkit's image splitter writes it).

    A single split folder goes to the split ``split`` (default: the folder's name when it is train, val or test,
    else train). A split without labels (the published test set) gets no objects and no gsd; its column types
    then differ from the labeled splits, so load it on its own
    (``load_dataset("imagefolder", data_dir=out / "test")``).
    """
    splits: dict[str, _Items] = {}
    for name in SPLITS:
        if _is_folder(src / name) and (img_dir := _dota_image_dir(src / name)) is not None:
            splits[name] = _dota_split(src / name, name, img_dir, invalid)
    if split is not None and splits:
        raise UsageError(f"--split is for a single DOTA split folder (images/ and labelTxt/); {src} holds the split "
                         f"folders {', '.join(splits)}")
    single = None if splits else _dota_image_dir(src)
    if single is not None:
        name = split or (src.name if src.name in SPLITS else "train")
        splits[name] = _dota_split(src, name, single, invalid)
    if not splits:
        raise DataFormatError(src / "train" / "images", "no split folder with images/ found",
                              fix="DOTA is laid out as train/images, train/labelTxt, val/..., test/images, or as "
                                  "one split folder with images/ and labelTxt/")
    return splits


# ------------------------------------------------------------------------------- DOTA tiles

DOTA_GAP = 100  # pixels two neighbouring tiles share (CC-Diff: 512-px tiles, 100-px gap)
DOTA_MIN_VISIBLE = 0.7  # a tile keeps an object when more than this fraction of its area lies in it (DOTA_devkit)


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Where the tiles along a side of ``length`` pixels start: every ``stride`` pixels, the last one shifted to
    end at the border (DOTA_devkit's splitter); a single tile at 0 when the side is not longer than a tile."""
    if length <= tile:
        return [0]
    return [*range(0, length - tile, stride), length - tile]


def _clip_polygon(points: np.ndarray, x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    """The part (M, 2) of a polygon (K, 2) inside the rectangle [x1, x2] x [y1, y2] (Sutherland-Hodgman; M may
    be 0)."""
    poly = points
    for axis, bound, below in ((0, x1, False), (0, x2, True), (1, y1, False), (1, y2, True)):
        if len(poly) == 0:
            break
        inside = poly[:, axis] <= bound if below else poly[:, axis] >= bound
        kept = []
        for i in range(len(poly)):
            cur, prev = poly[i], poly[i - 1]
            if inside[i] != inside[i - 1]:  # the edge crosses the bound: keep the crossing point
                kept.append(prev + (bound - prev[axis]) / (cur[axis] - prev[axis]) * (cur - prev))
            if inside[i]:
                kept.append(cur)
        poly = np.array(kept, dtype=float).reshape(-1, 2)
    return poly


def _polygon_area(points: np.ndarray) -> float:
    """Area of a simple polygon (K, 2) (the shoelace formula); 0 for fewer than 3 points."""
    if len(points) < 3:
        return 0.0
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def tile_object(obj: ObjectAnnotation, width: int, height: int, x: int, y: int, tile: int,
                min_visible: float = DOTA_MIN_VISIBLE) -> ObjectAnnotation | None:
    """``obj`` (normalised on a ``width`` x ``height`` image) in the ``tile`` x ``tile`` tile at (x, y),
    normalised by the tile; None unless more than ``min_visible`` of its area lies in the tile.

    The box is the visible part's enclosing box; the oriented box is the object's own when it lies wholly in
    the tile, else the smallest rectangle around its visible part (clipped to the tile).
    """
    import cv2

    poly = np.asarray(obj.obb, dtype=float).reshape(4, 2) * [width, height]
    if _polygon_area(poly) <= 0:  # a degenerate oriented box: its enclosing box stands for it
        x1, y1, x2, y2 = obj.bbox
        poly = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]]) * [width, height]
    area = _polygon_area(poly)
    seen = _clip_polygon(poly, x, y, x + tile, y + tile)
    visible = _polygon_area(seen) / area if area > 0 else 0.0
    if not visible > min_visible:
        return None
    corners = poly if visible >= 1 - 1e-9 else cv2.boxPoints(cv2.minAreaRect(seen.astype(np.float32)))
    origin = np.array([x, y], dtype=float)
    box = np.concatenate([seen.min(0), seen.max(0)]) - np.tile(origin, 2)
    return ObjectAnnotation(obj.label, [_clip01(v / tile) for v in box],
                            [_clip01(v / tile) for v in (np.asarray(corners, dtype=float) - origin).reshape(-1)])


def _decode_rgb(path: Path, invalid: InvalidValues) -> np.ndarray:
    """Every pixel of an image, however large, as RGB uint8 (H, W, 3); one that does not decode is an invalid
    value (its record is refused, or dropped with ``skip_invalid``)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # DOTA images reach 20000 x 20000 pixels
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        problem = str(e) or type(e).__name__
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    invalid.found(path, None, "image does not decode", problem, drops="record")
    raise _DropRecord  # found() raises for a record; this is not reached


def _padded(pixels: np.ndarray, tile: int) -> np.ndarray:
    """A tile's pixels, padded with black at the right and bottom to ``tile`` x ``tile``."""
    h, w = pixels.shape[:2]
    if (h, w) == (tile, tile):
        return pixels
    out = np.zeros((tile, tile, 3), np.uint8)
    out[:h, :w] = pixels
    return out


def dota_tiles(items: Iterable[tuple[Record, Path]], tile: int, gap: int = DOTA_GAP,
               invalid: InvalidValues | None = None) -> Iterator[tuple[Record, bytes]]:
    """Each image cut into ``tile`` x ``tile`` tiles that overlap by ``gap`` pixels, as (record, PNG bytes).

    As DOTA_devkit's splitter: tiles start every ``tile - gap`` pixels and the last of a row or column is
    shifted to end at the border (:func:`tile_origins`); an image side shorter than a tile gets one tile, padded
    with black at the right or bottom. A tile is named after its origin, ``<image>__<tile>__<x>___<y>.png``, and
    keeps the objects of which more than :data:`DOTA_MIN_VISIBLE` of the area lies in it, clipped to it
    (:func:`tile_object`). Every tile is kept, those without objects too. Its caption counts its objects; the
    metadata (gsd) is the image's.
    """
    invalid = invalid or InvalidValues()
    stride = tile - gap
    for record, image in items:
        try:
            pixels = _decode_rgb(image, invalid)
        except _DropRecord:
            continue
        height, width = pixels.shape[:2]
        stem = Path(record.file_name).stem
        boxes = np.array([o.bbox for o in record.objects], dtype=float).reshape(-1, 4) * [width, height, width, height]
        for x in tile_origins(width, tile, stride):
            for y in tile_origins(height, tile, stride):
                near = np.flatnonzero((boxes[:, 0] < x + tile) & (boxes[:, 2] > x) & (boxes[:, 1] < y + tile)
                                      & (boxes[:, 3] > y))  # the objects whose box overlaps the tile
                objects = [o for i in near
                           if (o := tile_object(record.objects[i], width, height, x, y, tile)) is not None]
                caption = _count_caption([o.label for o in objects], _dota_readable)
                tile_record = Record(f"images/{stem}__{tile}__{x}___{y}.png", [caption], dict(record.metadata),
                                     objects, record.scene)
                yield tile_record, encode_png(_padded(pixels[y:y + tile, x:x + tile], tile))
