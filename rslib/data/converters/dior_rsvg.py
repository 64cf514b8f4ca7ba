"""DIOR-RSVG: objects with referring expressions, their oriented boxes joined from DIOR-R."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from rslib.data.captions import dior_scene, layout_caption
from rslib.data.converters.common import (
    IMAGE_EXTENSIONS,
    SPLITS,
    InvalidValues,
    Items,
    id_key,
    is_folder,
    norm_object,
    null_metadata,
    read_list,
    scan_folder,
)
from rslib.data.converters.dior import DIOR_LOOKUP, dior_oriented, dior_readable, match_oriented
from rslib.data.converters.voc import VocXml, voc_boxes
from rslib.data.records import DataFormatError, Record


def _is_object_index(token: str) -> bool:
    """True for a plain object number ('0', '12'); zero-padded ids ('00012') and file names name images."""
    return token.isdigit() and (len(token) == 1 or not token.startswith("0"))


def _dior_r_folder(root: Path) -> Path | None:
    """DIOR-R's folder of oriented-box XML files under ``root`` (``Annotations/Oriented Bounding Boxes/`` as
    published, or ``Oriented Bounding Boxes/``), or None."""
    for folder in (root / "Annotations" / "Oriented Bounding Boxes", root / "Oriented Bounding Boxes"):
        if is_folder(folder):
            return folder
    return None


def _dior_r_files(src: Path, dior_r: Path | None) -> tuple[Path | None, dict[str, Path]]:
    """The DIOR-R folder joined to a DIOR-RSVG source (``dior_r``, else one found inside ``src``) and its XML
    files by image id; (None, {}) when there is none."""
    if dior_r is None:
        folder = _dior_r_folder(src)
        return (folder, scan_folder(folder, (".xml",))) if folder is not None else (None, {})
    folder = _dior_r_folder(dior_r) or dior_r
    files = scan_folder(folder, (".xml",))
    if not files:
        raise DataFormatError(folder, "no DIOR-R oriented-box XML files here",
                              fix="point --dior-r at the DIOR-R folder (the one holding Annotations/Oriented "
                                  "Bounding Boxes/) or at the folder of its XML files")
    return folder, files


def dior_rsvg_splits(src: Path, invalid: InvalidValues, dior_r: Path | None = None,
                      notes: dict[str, Any] | None = None) -> dict[str, Items]:
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
    lists = {s: read_list(src / f"{s}.txt") for s in SPLITS}
    images = scan_folder(src / "JPEGImages", IMAGE_EXTENSIONS)
    if not images:
        raise DataFormatError(src / "JPEGImages", "no images found", fix="DIOR-RSVG ships JPEGImages/")
    ann_dir = src / "Annotations"
    xml_files = sorted(scan_folder(ann_dir, (".xml",)).values(),
                       key=lambda p: (0, int(p.stem), p.name) if p.stem.isdigit() else (1, 0, p.name))
    if not xml_files:
        raise DataFormatError(ann_dir, "no annotation files found", fix="DIOR-RSVG ships Annotations/<id>.xml")
    parsed: dict[str, tuple[Path, VocXml, list]] = {}
    owner: list[str] = []  # image key of each object, in reference-loader order
    for path in xml_files:
        xml = VocXml(path)
        key = id_key(path.stem)
        boxes = []
        for label, box, obj in voc_boxes(xml, DIOR_LOOKUP):
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
                key = id_key(token)
                if key not in parsed:
                    raise DataFormatError(list_file, f"image {token!r} has no annotation in {ann_dir}", line)
            if key not in images:
                raise DataFormatError(list_file, f"image {token!r} listed but missing from {src / 'JPEGImages'}",
                                      line)
            assigned.setdefault(key, split)

    obb_folder, obb_files = _dior_r_files(src, dior_r)
    n_boxes = n_joined = 0
    splits: dict[str, Items] = {s: [] for s in SPLITS}
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
        oriented = (match_oriented(unique, dior_oriented(obb_files[key]), by_order=False) if key in obb_files
                    else [None] * len(unique))
        objects = []
        for (label, box, el), obb in zip(unique, oriented):
            obj = norm_object(label, box, obb, width, height, xml.reporter(el, invalid))
            if obj is not None:
                objects.append(obj)
                n_boxes, n_joined = n_boxes + 1, n_joined + (obb is not None)
        expressions = list(dict.fromkeys(desc for _, _, desc, _ in boxes if desc))
        caption = layout_caption(dior_scene(o.label for o in objects), objects, dior_readable, width, height)
        splits[split].append((Record(f"images/{image.name}", [caption, *expressions], null_metadata(), objects,
                                     None), image))
    if notes is not None and obb_folder is not None:
        notes["dior_r"] = {"folder": str(obb_folder), "boxes": n_boxes, "joined": n_joined}
    return splits
