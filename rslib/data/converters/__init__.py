"""Readers of real data sets, as published, into the record format: :func:`convert`.

One module per data set: :mod:`.rsicd`, :mod:`.fmow`, :mod:`.dior` (DIOR and DIOR-R), :mod:`.dior_rsvg`,
:mod:`.dota` and :mod:`.dota_tiling` (DOTA images cut into tiles). What they share is in :mod:`.common` (the
splits, :class:`InvalidValues`, safe reading of files and folders, normalised boxes) and :mod:`.voc` (VOC XML
annotation files).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from rslib.data.converters.common import SPLITS, InvalidValues, Items, image_problem, keep_records
from rslib.data.converters.dior import dior_splits
from rslib.data.converters.dior_rsvg import dior_rsvg_splits
from rslib.data.converters.dota import dota_splits
from rslib.data.converters.dota_tiling import DOTA_GAP, DOTA_MIN_VISIBLE, dota_tiles
from rslib.data.converters.fmow import fmow_splits
from rslib.data.converters.rsicd import rsicd_splits
from rslib.data.records import DataFormatError, DatasetWriter, Record, UsageError, check_output_folder, write_marker
from rslib.utils import atomic_write_dir, recover_dir

__all__ = ["CONVERT_FORMATS", "InvalidValues", "convert"]


CONVERT_FORMATS = ("rsicd", "fmow", "dior", "dior-rsvg", "dota")


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
    converters: dict[str, Callable[[Path, InvalidValues], dict[str, Items]]] = {
        "rsicd": rsicd_splits, "fmow": fmow_splits, "dior": dior_splits,
        "dior-rsvg": lambda path, invalid: dior_rsvg_splits(path, invalid, dior_r, notes),
        "dota": lambda path, invalid: dota_splits(path, invalid, split),
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
        write_marker(tmp, fmt, splits=written, source=str(src_abs), skipped=invalid.summary(), **notes)
    return [out / name for name in written]


def _decodable(items: Items, invalid: InvalidValues) -> Items:
    """The items whose image decodes; another image is refused, or its record dropped (``skip_invalid``)."""

    def check(item: tuple[Record, Path]) -> tuple[Record, Path]:
        problem = image_problem(item[1])
        if problem is not None:
            invalid.found(item[1], None, "image does not decode", problem, drops="record")
        return item

    return keep_records(check, items)
