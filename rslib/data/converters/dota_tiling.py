"""DOTA images cut into overlapping tiles, as DOTA_devkit's splitter (and CC-Diff) cut them, with the objects each
tile keeps."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from rslib.data.captions import count_caption
from rslib.data.converters.common import DropRecord, InvalidValues, clip01
from rslib.data.converters.dota import dota_readable
from rslib.data.records import ObjectAnnotation, Record, encode_png

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
    return ObjectAnnotation(obj.label, [clip01(v / tile) for v in box],
                            [clip01(v / tile) for v in (np.asarray(corners, dtype=float) - origin).reshape(-1)])


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
    raise DropRecord  # found() raises for a record; this is not reached


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
        except DropRecord:
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
                caption = count_caption([o.label for o in objects], dota_readable)
                tile_record = Record(f"images/{stem}__{tile}__{x}___{y}.png", [caption], dict(record.metadata),
                                     objects, record.scene)
                yield tile_record, encode_png(_padded(pixels[y:y + tile, x:x + tile], tile))
