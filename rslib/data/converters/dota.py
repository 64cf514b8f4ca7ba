"""DOTA v1.0 and v1.5: oriented boxes in a label text file beside each (very large) image."""
from __future__ import annotations

from pathlib import Path

from rslib.data.captions import count_caption
from rslib.data.converters.common import (
    IMAGE_EXTENSIONS,
    SPLITS,
    InvalidValues,
    Items,
    check_unique,
    class_key,
    class_lookup,
    id_key,
    image_size,
    is_folder,
    keep_records,
    norm_object,
    null_metadata,
    numbers_text,
    read_text,
    scan_folder,
)
from rslib.data.records import DataFormatError, ObjectAnnotation, Record, UsageError, metadata_problem

DOTA_CLASSES_V10 = (
    "plane", "ship", "storage-tank", "baseball-diamond", "tennis-court", "basketball-court",
    "ground-track-field", "harbor", "bridge", "large-vehicle", "small-vehicle", "helicopter",
    "roundabout", "soccer-ball-field", "swimming-pool",
)
DOTA_CLASSES_V15 = DOTA_CLASSES_V10 + ("container-crane",)


def _dota_label_dir(split_dir: Path, split: str) -> tuple[Path | None, tuple[str, ...]]:
    """The label folder of a DOTA split and the classes it may use.

    ``labelTxt/``, or the official ``labelTxt-v1.5/`` and ``labelTxt-v1.0/`` with the label files inside or in
    the folder their archive extracts to (``labelTxt/``, ``DOTA-v1.5_<split>/``).
    """
    for name, classes in (("labelTxt", DOTA_CLASSES_V15), ("labelTxt-v1.5", DOTA_CLASSES_V15),
                          ("labelTxt-v1.0", DOTA_CLASSES_V10)):
        d = split_dir / name
        if not is_folder(d):
            continue
        for inner in ("labelTxt", f"DOTA-v1.5_{split}"):
            if name != "labelTxt" and is_folder(d / inner):
                return d / inner, classes
        return d, classes
    return None, DOTA_CLASSES_V15


def _dota_labels(path: Path, width: int, height: int, classes: tuple[str, ...], invalid: InvalidValues
                 ) -> tuple[float | None, list[ObjectAnnotation]]:
    """Parse a DOTA label file: ``imagesource:``/``gsd:`` header lines, then ``x1 y1 ... x4 y4 class difficult``."""
    lookup = class_lookup(classes)
    gsd: float | None = None
    objects: list[ObjectAnnotation] = []
    for i, raw in enumerate(read_text(path).splitlines(), start=1):
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
        label = lookup.get(class_key(fields[8]))
        if label is None:
            raise DataFormatError(path, f"unknown class {fields[8]!r}", i, f"known classes: {', '.join(classes)}")
        if len(fields) == 10 and fields[9] not in ("0", "1"):
            raise DataFormatError(path, f"difficult flag {fields[9]!r} must be 0 or 1", i)
        xs, ys = coords[0::2], coords[1::2]

        def report(reason: str, value: str, i: int = i) -> None:
            invalid.found(path, i, reason, value)

        obj = norm_object(label, [min(xs), min(ys), max(xs), max(ys)], coords, width, height, report,
                           shown=f"corners {numbers_text(coords)}")
        if obj is not None:
            objects.append(obj)
    return gsd, objects


def dota_readable(label: str) -> str:
    """A DOTA class as a caption writes it ("large-vehicle" -> "large vehicle")."""
    return label.replace("-", " ")


def _dota_image_dir(split_dir: Path) -> Path | None:
    """``images/`` of a DOTA split folder (``images/images/`` where the archives extracted so), or None."""
    img_dir = split_dir / "images"
    if is_folder(img_dir) and is_folder(img_dir / "images"):
        return img_dir / "images"
    return img_dir if is_folder(img_dir) else None


def _dota_split(split_dir: Path, split: str, img_dir: Path, invalid: InvalidValues) -> Items:
    """The images of one DOTA split folder with their labels (none when the split has no label folder)."""
    label_dir, classes = _dota_label_dir(split_dir, split)
    if label_dir is None and split != "test":
        raise DataFormatError(split_dir / "labelTxt", "label folder missing",
                              fix="DOTA ships labelTxt/ (or labelTxt-v1.0/, labelTxt-v1.5/) beside images/")
    images = scan_folder(img_dir, IMAGE_EXTENSIONS)
    labels = scan_folder(label_dir, (".txt",)) if label_dir is not None else {}
    for key, path in labels.items():
        if key not in images:
            raise DataFormatError(path, f"label file has no image {key}.png in {img_dir}")

    def item(image: Path) -> tuple[Record, Path]:
        meta, objects = null_metadata(), []
        if label_dir is not None:
            label_file = labels.get(id_key(image.stem))
            if label_file is None:
                raise DataFormatError(label_dir / f"{image.stem}.txt", f"label file missing for image {image.name}")
            width, height = image_size(image)
            meta["gsd"], objects = _dota_labels(label_file, width, height, classes, invalid)
        caption = count_caption([o.label for o in objects], dota_readable)
        return Record(f"images/{image.name}", [caption], meta, objects, None), image

    items = keep_records(item, images.values())
    check_unique(items, img_dir)
    return items


def dota_splits(src: Path, invalid: InvalidValues, split: str | None = None) -> dict[str, Items]:
    """DOTA v1.0/v1.5: ``{split}/images/*.png`` and ``{train,val}/labelTxt/*.txt`` (``labelTxt-v1.x`` accepted),
    or a single split folder with ``images/`` and ``labelTxt/`` (as DOTA_devkit's image splitter writes it).

    A single split folder goes to the split ``split`` (default: the folder's name when it is train, val or test,
    else train). A split without labels (the published test set) gets no objects and no gsd; its column types
    then differ from the labeled splits, so load it on its own
    (``load_dataset("imagefolder", data_dir=out / "test")``).
    """
    splits: dict[str, Items] = {}
    for name in SPLITS:
        if is_folder(src / name) and (img_dir := _dota_image_dir(src / name)) is not None:
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
