"""Captions built from a layout: counts in words, places on a grid, the directions of oriented boxes, and
CC-Diff's global caption (the layout sentence and the scene of a DIOR image)."""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Iterable

import numpy as np

from rslib.data.records import ObjectAnnotation

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


def count_caption(labels: list[str], readable: Callable[[str], str], prefix: str = "an aerial image") -> str:
    """'an aerial image with 3 airplanes and 1 vehicle' (most frequent class first)."""
    if not labels:
        return prefix
    counts = Counter(labels)
    order = sorted(counts, key=lambda c: (-counts[c], labels.index(c)))
    parts = [f"{counts[c]} {_plural(readable(c)) if counts[c] > 1 else readable(c)}" for c in order]
    return f"{prefix} with {_join_words(parts)}"
