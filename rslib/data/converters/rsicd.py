"""RSICD: five captions for each image, in ``dataset_rsicd.json``."""
from __future__ import annotations

import re
from pathlib import Path

from rslib.data.converters.common import SPLITS, InvalidValues, Items, load_json, null_metadata
from rslib.data.records import DataFormatError, Record, check_inside, path_inside


def _rsicd_scene(file_name: str) -> str | None:
    """Scene of an RSICD file name: the prefix before the first '_' or digit ('airport_1.jpg' -> 'airport')."""
    prefix = re.split(r"[_\d]", Path(file_name).stem, maxsplit=1)[0].strip()
    return prefix or None


def rsicd_splits(src: Path, invalid: InvalidValues) -> dict[str, Items]:
    """RSICD: ``dataset_rsicd.json`` (images with 5 sentences and a split each) and ``RSICD_images/``."""
    ann = src / "dataset_rsicd.json"
    if not ann.is_file():
        raise DataFormatError(ann, "annotation file missing",
                              fix="RSICD ships dataset_rsicd.json at its top level")
    check_inside(ann, src)
    data = load_json(ann)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataFormatError(ann, "expected a JSON object with an 'images' list")
    image_dir = next((d for d in (src / "RSICD_images", src / "images") if d.is_dir()), None)
    if image_dir is None:
        raise DataFormatError(src / "RSICD_images", "image folder missing",
                              fix="put the images in RSICD_images/ (or images/) beside dataset_rsicd.json")
    splits: dict[str, Items] = {s: [] for s in SPLITS}
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
        image = path_inside(image_dir, name, ann, where)
        if not image.is_file():
            raise DataFormatError(ann, f"{where}: image listed but missing from {image_dir}")
        splits[split].append((Record(f"images/{name}", captions, null_metadata(), [], _rsicd_scene(name)), image))
    return splits
