"""fMoW-rgb: beside each image a JSON file of its metadata (date, gsd, cloud cover, location) and boxes."""
from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from rslib.data.converters.common import (
    MAX_IMAGE_SIDE,
    SPLITS,
    InvalidValues,
    Items,
    check_unique,
    class_key,
    class_lookup,
    image_size,
    keep_records,
    load_json,
    norm_object,
    null_metadata,
    numbers_text,
)
from rslib.data.records import DataFormatError, Record, are_numbers, check_inside, metadata_problem

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


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


_FMOW_LOOKUP = class_lookup((*FMOW_CLASSES, FMOW_FALSE_DETECTION))


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
    return (w, h) if w and h else image_size(image, path)


def _fmow_item(js: Path, split_dir: Path, invalid: InvalidValues) -> tuple[Record, Path]:
    check_inside(js, split_dir)
    data = load_json(js)
    if not isinstance(data, dict):
        raise DataFormatError(js, "expected a JSON object")
    image = js.with_suffix(".jpg")
    if not image.is_file():
        raise DataFormatError(js, f"image {image.name} missing beside its JSON")
    check_inside(image, split_dir)
    meta = null_metadata()
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
    folder_class = _FMOW_LOOKUP.get(class_key(folder)) if folder else None
    boxes = data.get("bounding_boxes") or []
    if not isinstance(boxes, list):
        raise DataFormatError(js, "'bounding_boxes' must be a list")
    size: tuple[float, float] | None = None
    objects, labels = [], []
    for i, b in enumerate(boxes):
        if not isinstance(b, dict) or not are_numbers(b.get("box"), 4, finite=False):
            raise DataFormatError(js, f"bounding_boxes[{i}] needs a 'box' of 4 numbers [x, y, w, h]")
        raw = b.get("category")
        if raw is None or raw == "":  # unlabeled (e.g. the sequestered test set): the folder names the class
            label = folder_class
        else:
            label = _FMOW_LOOKUP.get(class_key(str(raw)))
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

        obj = norm_object(label, [x, y, x + bw, y + bh], None, *size, report,
                           shown=f"box [x, y, w, h] {numbers_text(b['box'])}")
        if obj is not None:
            objects.append(obj)
    scene = folder_class if folder_class not in (None, FMOW_FALSE_DETECTION) else (labels[0] if labels else None)
    caption = f"a satellite image of {_article(scene.replace('_', ' '))}" if scene else "a satellite image"
    return Record(f"images/{image.name}", [caption], meta, objects, scene), image


def fmow_splits(src: Path, invalid: InvalidValues) -> dict[str, Items]:
    """fMoW-rgb: ``{split}/<category>/<category>_<id>/<category>_<id>_<n>_rgb.{jpg,json}``."""
    splits: dict[str, Items] = {}
    for split in SPLITS:
        if (src / split).is_dir():
            files = sorted((src / split).rglob("*_rgb.json"))
            items = keep_records(lambda js, d=src / split: _fmow_item(js, d, invalid), files)
            check_unique(items, src / split)
            splits[split] = items
    if not splits:
        raise DataFormatError(src, "no train/, val/ or test/ folder", fix="point --src at the fMoW-rgb folder")
    return splits
