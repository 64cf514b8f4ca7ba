"""What every converter shares: the splits, how invalid values are refused or dropped, safe reading of text, JSON,
split lists, folders and image headers, and pixel boxes normalised into objects."""
from __future__ import annotations

import codecs
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

from rslib.data.records import METADATA_FIELDS, DataFormatError, ObjectAnnotation, Record, check_inside

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
MAX_IMAGE_SIDE = 10**6  # pixels: a larger recorded width or height is an invalid value

Items = list[tuple[Record, Path]]  # (record, image to copy) for one split


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
        :class:`DropRecord` for the reader to leave the record out)."""
        if not self.skip:
            raise DataFormatError(path, f"{reason}: {value}", line,
                                  f"correct it, or pass --skip-invalid (skip_invalid=True) to drop the {drops}")
        self.dropped[(drops, reason)] += 1
        if drops == "record":
            raise DropRecord

    def summary(self) -> list[dict[str, Any]]:
        """The drops as ``[{"dropped": "object", "reason": ..., "count": n}, ...]``, most frequent first."""
        return [{"dropped": d, "reason": r, "count": n} for (d, r), n in self.dropped.most_common()]


class DropRecord(Exception):
    """Raised by :meth:`InvalidValues.found` when a record is dropped: the reader leaves it out."""


def keep_records(build: Callable[[Any], tuple[Record, Path]], sources: Iterable[Any]) -> Items:
    """``build(source)`` for each source, leaving out the records that :class:`InvalidValues` dropped."""
    items: Items = []
    for source in sources:
        try:
            items.append(build(source))
        except DropRecord:
            pass
    return items


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


def null_metadata() -> dict[str, float | int | None]:
    """Every metadata field unknown (None)."""
    return {k: None for k in METADATA_FIELDS}


def class_key(name: str) -> str:
    """A class name as matched: lower case, without spaces, underscores and hyphens."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


def class_lookup(classes: Iterable[str]) -> dict[str, str]:
    """The canonical class name by :func:`class_key` of each of ``classes``."""
    return {class_key(c): c for c in classes}


def clip01(v: float) -> float:
    """``v`` clipped to [0, 1]."""
    return min(1.0, max(0.0, float(v)))


def numbers_text(values: Iterable[float]) -> str:
    """Numbers as an error message shows them: ``[1, 2.5, 3]``."""
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def norm_object(label: str, bbox_px: list[float], obb_px: list[float] | None, width: float, height: float,
                 report: Callable[[str, str], None], shown: str | None = None) -> ObjectAnnotation | None:
    """Normalise pixel boxes (``bbox_px`` as x1, y1, x2, y2) by the image size and clip them to [0, 1].

    A box no image can hold (a coordinate more than an image size beyond the border, inverted, of zero width or
    height, or wholly outside the image) goes to ``report(reason, value)`` and gives None (when it returns).
    ``shown`` is how the message shows the box (default: ``box`` and the pixel coordinates).
    """
    shown = f"{label} {shown or 'box ' + numbers_text(bbox_px)}"
    size = f"on a {width:g} x {height:g} image"
    coords = [*bbox_px, *(obb_px or [])]
    if not np.isfinite(coords).all():
        report("coordinate is not finite", shown if obb_px is None else f"{shown}, corners {numbers_text(obb_px)}")
        return None
    if not all(-width <= x <= 2 * width for x in coords[0::2]) or not all(
            -height <= y <= 2 * height for y in coords[1::2]):
        report("coordinate far outside the image", f"{shown} {size}" if obb_px is None
               else f"{shown}, corners {numbers_text(obb_px)} {size}")
        return None
    x1, y1, x2, y2 = bbox_px
    if x2 < x1 or y2 < y1:
        report("inverted box", shown)
        return None
    if x2 == x1 or y2 == y1:
        report("degenerate box (zero width or height)", shown)
        return None
    box = [clip01(x1 / width), clip01(y1 / height), clip01(x2 / width), clip01(y2 / height)]
    if box[2] <= box[0] or box[3] <= box[1]:
        report("box outside the image", f"{shown} {size}")
        return None
    if obb_px is None:
        return ObjectAnnotation.from_bbox(label, box)
    obb = [clip01(v / (width if i % 2 == 0 else height)) for i, v in enumerate(obb_px)]
    return ObjectAnnotation(label, box, obb)


def image_size(path: Path, where: Path | None = None, line: int | None = None) -> tuple[int, int]:
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


def read_text(path: Path) -> str:
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


def load_json(path: Path) -> Any:
    """A JSON file (UTF-8); a :class:`DataFormatError` names the line of bad JSON and a truncated file."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        truncated = e.pos >= len(text.rstrip())
        raise DataFormatError(path, f"invalid JSON ({e.msg}, column {e.colno})", e.lineno,
                              "the file ends early, it may be truncated: extract it again" if truncated
                              else "correct the JSON at this line") from None


def read_list(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines of a split file as (line number, stripped text)."""
    if not path.is_file():
        raise DataFormatError(path, "split file missing", fix="the published data set ships it; restore it")
    check_inside(path, path.parent)
    lines = read_text(path).splitlines()
    return [(i, s.strip()) for i, s in enumerate(lines, start=1) if s.strip()]


def is_folder(path: Path) -> bool:
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


def id_key(token: str) -> str:
    """Image id as matched across files: no extension, no zero padding ('00012.jpg' -> '12')."""
    stem = token.strip()
    if stem.lower().endswith((*IMAGE_EXTENSIONS, ".xml", ".txt")):
        stem = stem.rsplit(".", 1)[0]
    return str(int(stem)) if stem.isdigit() else stem


def scan_folder(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Files of ``folder`` with these suffixes, by :func:`id_key` of their stem."""
    found: dict[str, Path] = {}
    if is_folder(folder):
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in suffixes and (p.is_file() or p.is_symlink()):
                check_inside(p, folder)
                found.setdefault(id_key(p.stem), p)
    return found


def check_unique(items: Items, where: Path) -> None:
    """A :class:`DataFormatError` when two records of a split have the same file name."""
    seen: dict[str, Path] = {}
    for rec, image in items:
        if rec.file_name in seen:
            raise DataFormatError(image, f"same file name as {seen[rec.file_name]} in {where}")
        seen[rec.file_name] = image
