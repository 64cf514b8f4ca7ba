"""DIOR and DIOR-R: horizontal (and oriented) boxes in VOC XML files, the splits listed in ``ImageSets/Main/``."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from rslib.data.captions import count_caption
from rslib.data.converters.common import (
    IMAGE_EXTENSIONS,
    SPLITS,
    InvalidValues,
    Items,
    check_unique,
    class_lookup,
    id_key,
    norm_object,
    null_metadata,
    read_list,
    scan_folder,
)
from rslib.data.converters.voc import VocXml, object_boxes, voc_boxes
from rslib.data.records import DataFormatError, Record

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


DIOR_LOOKUP = class_lookup(DIOR_CLASSES)


def dior_readable(label: str) -> str:
    """A DIOR class as a caption writes it ("golffield" -> "golf field")."""
    return _DIOR_READABLE.get(label, label.lower())


def _box_iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def dior_oriented(path: Path) -> list[tuple[str, list[float]]]:
    """(label, 8 corner coordinates in pixels) of each object of a DIOR-R oriented-box XML."""
    tags = ("x_left_top", "y_left_top", "x_right_top", "y_right_top",
            "x_right_bottom", "y_right_bottom", "x_left_bottom", "y_left_bottom")
    return [(label, corners) for label, corners, _ in object_boxes(VocXml(path), DIOR_LOOKUP, "robndbox", tags)]


def match_oriented(hbbs: list[tuple[str, list[float], ET.Element]], obbs: list[tuple[str, list[float]]],
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


def dior_splits(src: Path, invalid: InvalidValues) -> dict[str, Items]:
    """DIOR / DIOR-R: ``JPEGImages-*/``, ``Annotations/{Horizontal,Oriented} Bounding Boxes/``, ``ImageSets/``."""
    lists = {s: read_list(src / "ImageSets" / "Main" / f"{s}.txt") for s in SPLITS}
    images: dict[str, Path] = {}
    for folder in ("JPEGImages-trainval", "JPEGImages-test", "JPEGImages"):
        for key, path in scan_folder(src / folder, IMAGE_EXTENSIONS).items():
            images.setdefault(key, path)
    if not images:
        raise DataFormatError(src / "JPEGImages-trainval", "no images found",
                              fix="DIOR ships JPEGImages-trainval/ and JPEGImages-test/ (or one JPEGImages/)")
    hbb_dir = src / "Annotations" / "Horizontal Bounding Boxes"
    if not hbb_dir.is_dir():
        hbb_dir = src / "Annotations"
    if not hbb_dir.is_dir():
        raise DataFormatError(src / "Annotations" / "Horizontal Bounding Boxes", "annotation folder missing")
    hbb_files = scan_folder(hbb_dir, (".xml",))
    obb_files = scan_folder(src / "Annotations" / "Oriented Bounding Boxes", (".xml",))
    splits: dict[str, Items] = {}
    for split, entries in lists.items():
        list_file = src / "ImageSets" / "Main" / f"{split}.txt"
        items: Items = []
        for line, token in entries:
            key = id_key(token)
            image = images.get(key)
            if image is None:
                raise DataFormatError(list_file, f"image {token!r} listed but missing", line)
            if key not in hbb_files:
                raise DataFormatError(list_file, f"image {token!r} has no annotation in {hbb_dir}", line)
            xml = VocXml(hbb_files[key])
            width, height = xml.size(image)
            hbbs = voc_boxes(xml, DIOR_LOOKUP)
            oriented = (match_oriented(hbbs, dior_oriented(obb_files[key])) if key in obb_files
                        else [None] * len(hbbs))
            objects = [o for (label, box, el), obb in zip(hbbs, oriented)
                       if (o := norm_object(label, box, obb, width, height, xml.reporter(el, invalid))) is not None]
            caption = count_caption([o.label for o in objects], dior_readable)
            items.append((Record(f"images/{image.name}", [caption], null_metadata(), objects, None), image))
        check_unique(items, list_file)
        splits[split] = items
    return splits
