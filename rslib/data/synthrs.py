"""SynthRS: procedural aerial scenes whose ground truth is known exactly.

Every image comes with its scene graph, so every control signal of the two
papers can be measured: captions written from the objects and their places,
the seven fMoW/CRS-Diff metadata fields (each with a visible effect), boxes and
oriented boxes of objects placed where they belong, and the six CRS-Diff
condition maps drawn from the geometry itself.

* ``make_scene(seed, size)`` draws one scene; the same seed gives the same bytes.
* ``write_split(out, n, size, seed, split)`` writes a split in the record format.

Metadata effects: ``month``/``day`` and ``latitude`` set the season (hemisphere
aware: green summers, orange autumns, snow in high-latitude winters) and the
climate palette (arid band, tropics); ``cloud_cover`` draws clouds over exactly
that fraction of the image; ``gsd`` (metres per pixel at the nominal 512 px)
sets the ground extent and so the pixel size of every object; ``year`` sets how
built-up towns are; ``longitude`` tints the soil by region.
"""
from __future__ import annotations

import calendar
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from rslib.data.captions import NUMBER_WORDS, position_phrase
from rslib.data.conditions import seg_to_rgb
from rslib.data.records import CONTENT, DatasetWriter, ObjectAnnotation, Record, UsageError, encode_png

SCENES = (
    "airport", "port", "dense_residential", "sparse_residential", "industrial", "farmland",
    "forest", "river", "beach", "desert", "parking", "playground", "bridge",
)
OBJECT_CLASSES = (
    "airplane", "ship", "storagetank", "vehicle", "tenniscourt", "groundtrackfield", "building", "windmill",
)
CLASS_PHRASES = {
    "airplane": ("airplane", "airplanes"), "ship": ("ship", "ships"),
    "storagetank": ("storage tank", "storage tanks"), "vehicle": ("vehicle", "vehicles"),
    "tenniscourt": ("tennis court", "tennis courts"),
    "groundtrackfield": ("ground track field", "ground track fields"),
    "building": ("building", "buildings"), "windmill": ("windmill", "windmills"),
}
SCENE_PHRASES = {
    "airport": "an airport", "port": "a port", "dense_residential": "a dense residential area",
    "sparse_residential": "a sparse residential area", "industrial": "an industrial area",
    "farmland": "farmland", "forest": "a forest", "river": "a river", "beach": "a beach",
    "desert": "a desert", "parking": "a parking lot", "playground": "a playground", "bridge": "a bridge",
}
# Ground extent range (gsd in metres per pixel at the nominal 512 px) per scene type.
GSD_RANGE = {
    "airport": (0.6, 1.2), "port": (0.45, 1.0), "dense_residential": (0.3, 0.6),
    "sparse_residential": (0.3, 0.7), "industrial": (0.35, 0.8), "farmland": (0.5, 1.2),
    "forest": (0.3, 1.2), "river": (0.4, 1.0), "beach": (0.3, 0.9), "desert": (0.4, 1.2),
    "parking": (0.25, 0.45), "playground": (0.45, 0.8), "bridge": (0.35, 0.8),
}
NOMINAL_SIZE = 512
SYNTHRS_VERSION = "1.1"  # bump when the generator's output changes, so cached splits are regenerated
# Roads are drawn at least this many output pixels wide (one latent cell of an 8x-downsampling autoencoder at
# 64 px is 8 px, of the small presets' 4x autoencoder 4 px): narrower roads are lost in the latent space and a
# diffusion model cannot learn to draw them (version 1.0 drew them 2-3 px wide at 64 px).
MIN_ROAD_PX = 4

# Materials: LoveDA class, base colour, texture amplitude, height (m).
#  0 background 1 building 2 road 3 water 4 barren 5 forest 6 agriculture
_MATERIALS = {
    "urban": (0, (146, 142, 136), 10, 0.0),
    "roof": (1, (160, 150, 140), 5, 8.0),
    "road": (2, (92, 92, 95), 5, 0.0),
    "water": (3, (38, 72, 98), 4, 0.0),
    "bare": (4, (164, 142, 112), 14, 0.0),
    "trees": (5, (48, 86, 44), 26, 10.0),
    "grass": (5, (96, 128, 64), 14, 0.3),
    "crop": (6, (120, 140, 70), 10, 0.3),
    "sand": (4, (212, 196, 152), 8, 0.0),
    "runway": (2, (74, 74, 76), 4, 0.0),
    "concrete": (0, (178, 175, 170), 5, 0.0),
    "track": (0, (176, 72, 60), 4, 0.0),
    "court": (0, (62, 122, 92), 3, 0.0),
    "tank": (1, (214, 214, 210), 3, 15.0),
    "shallow": (3, (58, 104, 116), 4, 0.0),
}
MAT = {name: i for i, name in enumerate(_MATERIALS)}
_MAT_CLASS = np.array([m[0] for m in _MATERIALS.values()], dtype=np.uint8)
_MAT_COLOR = np.array([m[1] for m in _MATERIALS.values()], dtype=np.float32)
_MAT_TEXTURE = np.array([m[2] for m in _MATERIALS.values()], dtype=np.float32)
_MAT_HEIGHT = np.array([m[3] for m in _MATERIALS.values()], dtype=np.float32)
_N_VARIANTS = 6
_ROOF_COLORS = np.array([(168, 160, 150), (150, 80, 62), (112, 118, 130), (205, 203, 196), (128, 106, 90),
                         (92, 96, 104)], dtype=np.float32)
_CROP_COLORS = np.array([(118, 142, 64), (152, 150, 82), (96, 124, 58), (176, 160, 104), (134, 112, 80),
                         (84, 112, 62)], dtype=np.float32)
MAX_DEPTH_M = 40.0  # depth map: 255 = 40 m above ground, square-root scale (small heights stay visible)


@dataclass
class Scene:
    """One SynthRS sample: image, condition maps, objects, captions, metadata and scene graph."""

    image: np.ndarray  # (S, S, 3) uint8
    maps: dict[str, np.ndarray]  # the six condition maps, conventions of rslib.data.conditions
    objects: list[ObjectAnnotation]
    captions: list[str]
    metadata: dict[str, float | int]
    scene: str
    labels: np.ndarray  # (S, S) LoveDA class indices (ground truth land cover)
    cloud_mask: np.ndarray  # (S, S) bool, pixels under cloud
    relations: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- textures


@lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """Fixed fractal noise tiles (4, 2*size, 2*size) in about [-1, 1]; crops of them texture every image."""
    rng = np.random.default_rng(12345)
    n = 2 * size
    tiles = []
    for octaves in ((4, 8, 16, 32), (64, 128), (8, 16, 32, 64, 128), (2, 4, 8)):
        acc = np.zeros((n, n), np.float32)
        for k, cells in enumerate(octaves):
            cells = max(2, min(cells, n))
            grid = rng.standard_normal((cells, cells)).astype(np.float32)
            acc += cv2.resize(grid, (n, n), interpolation=cv2.INTER_CUBIC) * (0.65 ** k)
        acc /= np.abs(acc).max() + 1e-6
        tiles.append(acc)
    return np.stack(tiles)


def _noise(rng: np.random.Generator, kind: int, r: int) -> np.ndarray:
    bank = _noise_bank(max(64, r))
    n = bank.shape[1]
    y, x = rng.integers(0, n - r, size=2)
    return bank[kind, y:y + r, x:x + r]


# ----------------------------------------------------------------------------- geometry


def _rect(cx: float, cy: float, length: float, width: float, angle: float) -> np.ndarray:
    """Corners (4, 2) of a rectangle centred at (cx, cy), long side along ``angle`` (radians)."""
    c, s = math.cos(angle) / 2, math.sin(angle) / 2
    lc, ls, wc, ws = length * c, length * s, width * c, width * s
    return np.array([[cx - lc + ws, cy - ls - wc], [cx + lc + ws, cy + ls - wc],
                     [cx + lc - ws, cy + ls + wc], [cx - lc - ws, cy - ls + wc]])


def _smooth_path(rng: np.random.Generator, p0: np.ndarray, p1: np.ndarray, wiggle: float, n: int = 24) -> np.ndarray:
    """A gently curving polyline from p0 to p1 (normalised coordinates)."""
    t = np.linspace(0, 1, n)[:, None]
    base = p0 + (p1 - p0) * t
    normal = np.array([-(p1 - p0)[1], (p1 - p0)[0]])
    normal /= np.linalg.norm(normal) + 1e-9
    k = rng.uniform(0.5, 2.0)
    phase = rng.uniform(0, 2 * math.pi)
    offset = wiggle * np.sin(k * math.pi * t + phase) * np.sin(math.pi * t)
    return base + offset * normal


def _edge_point(rng: np.random.Generator, side: int, lo: float = 0.15, hi: float = 0.85) -> np.ndarray:
    """A point just outside one side of the unit square (0 top, 1 right, 2 bottom, 3 left)."""
    u = rng.uniform(lo, hi)
    return np.array([(u, -0.1), (1.1, u), (u, 1.1), (-0.1, u)][side])


@lru_cache(maxsize=64)
def _allowed_lut(allowed: tuple[str, ...]) -> np.ndarray:
    lut = np.zeros(256, bool)
    lut[[MAT[a] for a in allowed]] = True
    return lut


class _Canvas:
    """Render buffers at ``r`` pixels: material, variant, height, shading, shadow, object ids, segments."""

    def __init__(self, r: int, extent_m: float, min_road: float = 0.0):
        self.r = r
        self.min_road = min_road  # narrowest road, in normalised units
        self.m = r / extent_m  # normalised units per metre times r -> pixels per metre
        self.per_m = 1.0 / extent_m  # normalised units per metre
        self.mat = np.zeros((r, r), np.uint8)
        self.var = np.zeros((r, r), np.uint8)
        self.height = np.zeros((r, r), np.float32)
        self.shade = np.zeros((r, r), np.float32)
        self.shadow = np.zeros((r, r), np.float32)
        self.oid = np.zeros((r, r), np.uint8)
        self.segments: list[tuple[float, float, float, float]] = []
        self.objects: list[ObjectAnnotation] = []
        self.overlays: list[tuple] = []  # drawn on the colour image after texturing

    def px(self, pts: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(pts) * (self.r * 16)).astype(np.int32)  # 4 fractional bits

    def fill(self, poly: np.ndarray, mat: str, var: int = 0, height: float | None = None) -> None:
        p = [self.px(poly)]
        cv2.fillPoly(self.mat, p, MAT[mat], lineType=cv2.LINE_8, shift=4)
        cv2.fillPoly(self.var, p, var, shift=4)
        cv2.fillPoly(self.height, p, float(_MAT_HEIGHT[MAT[mat]] if height is None else height), shift=4)
        cv2.fillPoly(self.shadow, p, 0.0, shift=4)

    def stroke(self, path: np.ndarray, width: float, mat: str, var: int = 0) -> None:
        t = max(1, int(round(width * self.r)))
        pts = [self.px(path)]
        cv2.polylines(self.mat, pts, False, MAT[mat], thickness=t, shift=4)
        cv2.polylines(self.var, pts, False, var, thickness=t, shift=4)
        cv2.polylines(self.height, pts, False, float(_MAT_HEIGHT[MAT[mat]]), thickness=t, shift=4)

    def cast_shadow(self, poly: np.ndarray, height_m: float, strength: float = 1.0) -> None:
        d = height_m * self.per_m * np.array([0.55, 0.8])  # sun from the upper left
        hull = cv2.convexHull(self.px(np.concatenate([poly, poly + d])).reshape(-1, 1, 2))
        cv2.fillPoly(self.shadow, [hull], strength, shift=4)

    def rect_lines(self, poly: np.ndarray) -> None:
        for i in range(4):
            a, b = poly[i], poly[(i + 1) % 4]
            self.segments.append((a[0], a[1], b[0], b[1]))

    def free(self, poly: np.ndarray, allowed: Sequence[str]) -> bool:
        """True if the polygon's corners and centre lie inside the image on allowed materials."""
        if poly.min() < 0.01 or poly.max() > 0.99:
            return False
        ij = (np.concatenate([poly, poly.mean(0, keepdims=True)]) * self.r).astype(np.intp)
        mats = self.mat[ij[:, 1], ij[:, 0]]
        return bool(_allowed_lut(tuple(allowed))[mats].all()) and not self.oid[ij[:, 1], ij[:, 0]].any()

    def add_object(self, label: str, poly: np.ndarray) -> None:
        self.objects.append(ObjectAnnotation.from_obb(label, np.clip(poly, 0, 1).reshape(-1)))
        cv2.fillPoly(self.oid, [self.px(poly)], min(255, len(self.objects)), shift=4)


# ----------------------------------------------------------------------------- scene recipes


def _place(c: _Canvas, rng: np.random.Generator, size_m: tuple[float, float], allowed: Sequence[str],
           angle: float | None = None, region: tuple[float, float, float, float] = (0, 0, 1, 1),
           tries: int = 16) -> np.ndarray | None:
    """Find a free spot for a rectangle of size_m (length, width in metres); candidates are tested at once."""
    L, W = size_m[0] * c.per_m, size_m[1] * c.per_m
    cx = rng.uniform(region[0], region[2], tries)
    cy = rng.uniform(region[1], region[3], tries)
    a = rng.uniform(0, math.pi, tries) if angle is None else np.full(tries, float(angle))
    co, si = np.cos(a) / 2, np.sin(a) / 2
    dx = np.stack([-L * co + W * si, L * co + W * si, L * co - W * si, -L * co - W * si], 1)
    dy = np.stack([-L * si - W * co, L * si - W * co, L * si + W * co, -L * si + W * co], 1)
    polys = np.stack([cx[:, None] + dx, cy[:, None] + dy], 2)  # (tries, 4, 2)
    pts = np.concatenate([polys, np.stack([cx, cy], 1)[:, None]], 1)  # corners and centre
    inside = ((pts > 0.01) & (pts < 0.99)).all((1, 2))
    ij = np.clip(pts * c.r, 0, c.r - 1).astype(np.intp)
    ok = inside & _allowed_lut(tuple(allowed))[c.mat[ij[..., 1], ij[..., 0]]].all(1)
    ok &= ~c.oid[ij[..., 1], ij[..., 0]].any(1)
    hits = np.flatnonzero(ok)
    return polys[hits[0]] if len(hits) else None


def _building(c: _Canvas, poly: np.ndarray, rng: np.random.Generator, height: float, label: bool = True) -> None:
    c.cast_shadow(poly, height)
    c.fill(poly, "roof", var=int(rng.integers(_N_VARIANTS)), height=height)
    if rng.random() < 0.5:  # a ridge line along the long side
        mid = (poly[0] + poly[3]) / 2, (poly[1] + poly[2]) / 2
        cv2.line(c.shade, tuple(c.px(mid[0])), tuple(c.px(mid[1])), -0.12, 1, shift=4)
    c.rect_lines(poly)
    if label:
        c.add_object("building", poly)


def _road(c: _Canvas, path: np.ndarray, width_m: float, straight: bool, lanes: int = 2) -> None:
    w = max(width_m * c.per_m, c.min_road)
    c.stroke(path, w, "road")
    c.overlays.append(("lane", path, lanes))
    if straight:
        d = path[-1] - path[0]
        n = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-9) * w / 2
        for s in (-1, 1):
            a, b = path[0] + s * n, path[-1] + s * n
            c.segments.append((a[0], a[1], b[0], b[1]))


def _road_grid(c: _Canvas, rng: np.random.Generator, spacing_m: float, width_m: float) -> float:
    """A jittered, slightly rotated grid of straight roads; returns its angle."""
    ang = rng.uniform(-0.35, 0.35)
    cs, sn = math.cos(ang), math.sin(ang)
    step = spacing_m * c.per_m
    off = rng.uniform(0, step, size=2)
    for axis in (0, 1):
        k = -3
        while k * step < 1.8:
            t = off[axis] + k * step + rng.uniform(-0.1, 0.1) * step
            k += 1
            if axis == 0:
                p0, p1 = np.array([t, -0.5]), np.array([t, 1.5])
            else:
                p0, p1 = np.array([-0.5, t]), np.array([1.5, t])
            rot = lambda p: 0.5 + np.array([cs * (p[0] - 0.5) - sn * (p[1] - 0.5), sn * (p[0] - 0.5) + cs * (p[1] - 0.5)])
            a, b = rot(p0), rot(p1)
            if _segment_hits_unit(a, b):
                _road(c, np.stack([a, b]), width_m, straight=True)
    return ang


def _segment_hits_unit(a: np.ndarray, b: np.ndarray) -> bool:
    ts = np.linspace(0, 1, 64)[:, None]
    p = a + (b - a) * ts
    return bool(((p > 0) & (p < 1)).all(1).any())


def _water_side(c: _Canvas, rng: np.random.Generator, frac: float, shore: str | None = "sand") -> tuple[int, float]:
    """Fill one side of the image with sea behind a wavy shoreline; returns (side, shoreline position)."""
    side = int(rng.integers(4))
    r = c.r
    t = np.linspace(0, 1, 33)
    wave = frac + 0.04 * np.sin(rng.uniform(1, 4) * math.pi * t + rng.uniform(0, 6)) + 0.02 * rng.standard_normal(33).cumsum() / 6
    if side == 0:
        poly = np.concatenate([np.stack([t, wave], 1), [[1, -0.1], [0, -0.1]]])
    elif side == 2:
        poly = np.concatenate([np.stack([t, 1 - wave], 1), [[1, 1.1], [0, 1.1]]])
    elif side == 3:
        poly = np.concatenate([np.stack([wave, t], 1), [[-0.1, 1], [-0.1, 0]]])
    else:
        poly = np.concatenate([np.stack([1 - wave, t], 1), [[1.1, 1], [1.1, 0]]])
    if shore:
        band = max(2, int(r * rng.uniform(0.03, 0.06)))
        water = np.zeros((r, r), np.uint8)
        cv2.fillPoly(water, [c.px(poly)], 1, shift=4)
        grown = cv2.dilate(water, np.ones((2 * band + 1, 2 * band + 1), np.uint8)) > 0
        c.mat[grown & (water == 0)] = MAT[shore]
        c.height[grown & (water == 0)] = 0
    c.fill(poly, "water")
    _shallows(c)
    return side, float(frac)


def _shallows(c: _Canvas) -> None:
    water = (c.mat == MAT["water"]).astype(np.uint8)
    k = max(3, c.r // 40) | 1
    inner = cv2.erode(water, np.ones((k, k), np.uint8))
    c.mat[(water > 0) & (inner == 0)] = MAT["shallow"]


def _river(c: _Canvas, rng: np.random.Generator, width_m: float) -> np.ndarray:
    side = int(rng.integers(2))
    p0, p1 = _edge_point(rng, side), _edge_point(rng, side + 2)
    path = _smooth_path(rng, p0, p1, wiggle=rng.uniform(0.05, 0.18))
    w = width_m * c.per_m
    c.stroke(path, w * 1.5, "sand")
    c.stroke(path, w, "water")
    _shallows(c)
    return path


def _parcels(c: _Canvas, rng: np.random.Generator, region_mat: Sequence[str] = ("grass", "bare", "urban")) -> None:
    """Farmland: a rotated grid of crop parcels with furrow stripes and straight boundaries."""
    ang = rng.uniform(0, math.pi)
    size = rng.uniform(90, 200) * c.per_m
    cs, sn = math.cos(ang), math.sin(ang)
    ids = np.zeros_like(c.mat)
    stripes = np.zeros_like(c.shade)
    variants = [0]
    d_unit, n = np.array([cs, sn]), np.array([-sn, cs])
    for i in range(-4, 5):
        for j in range(-4, 5):
            w, h = size * rng.uniform(0.7, 1.3), size * rng.uniform(0.5, 1.0)
            cx = 0.5 + (i * size) * cs - (j * size * 0.8) * sn
            cy = 0.5 + (i * size) * sn + (j * size * 0.8) * cs
            if not (-0.3 < cx < 1.3 and -0.3 < cy < 1.3) or len(variants) > 250:
                continue
            poly = _rect(cx, cy, w * 0.97, h * 0.95, ang)
            cv2.fillPoly(ids, [c.px(poly)], len(variants), shift=4)
            variants.append(int(rng.integers(_N_VARIANTS)))
            c.rect_lines(poly)
            d = d_unit * w * 0.97
            for s in np.linspace(-h / 2, h / 2, int(rng.integers(4, 9))):  # furrows
                a = np.array([cx, cy]) + n * s - d / 2
                cv2.line(stripes, tuple(c.px(a)), tuple(c.px(a + d)), 0.08, 1, shift=4)
    mask = (ids > 0) & _allowed_lut(tuple(region_mat))[c.mat]
    c.mat[mask] = MAT["crop"]
    c.var[mask] = np.array(variants, np.uint8)[ids[mask]]
    c.height[mask] = 0.3
    c.shade[mask] -= stripes[mask]


def _trees(c: _Canvas, rng: np.random.Generator, n: int, allowed: Sequence[str] = ("grass", "urban")) -> None:
    """Clumps of tree crowns with shadows."""
    for _ in range(n):
        cx, cy = rng.uniform(0, 1, size=2)
        rad_m = rng.uniform(4, 9)
        for _k in range(int(rng.integers(2, 7))):
            x, y = cx + rng.normal(0, 12) * c.per_m, cy + rng.normal(0, 12) * c.per_m
            ij = (int(np.clip(y, 0, 0.999) * c.r), int(np.clip(x, 0, 0.999) * c.r))
            if c.mat[ij] not in [MAT[a] for a in allowed]:
                continue
            rp = max(1, int(rad_m * c.m))
            centre = (int(x * c.r), int(y * c.r))
            sh = (centre[0] + int(6 * c.m), centre[1] + int(8 * c.m))
            cv2.circle(c.shadow, sh, rp, 0.8, -1)
            cv2.circle(c.mat, centre, rp, MAT["trees"], -1)
            cv2.circle(c.height, centre, rp, 10.0, -1)
            cv2.circle(c.shadow, centre, rp, 0.0, -1)


def _vehicles_along(c: _Canvas, rng: np.random.Generator, n: int) -> int:
    """Vehicles on road pixels, aligned with the local road direction."""
    ys, xs = np.nonzero(c.mat == MAT["road"])
    if len(xs) == 0:
        return 0
    placed = 0
    gy = cv2.Sobel((c.mat == MAT["road"]).astype(np.float32), cv2.CV_32F, 0, 1, ksize=5)
    gx = cv2.Sobel((c.mat == MAT["road"]).astype(np.float32), cv2.CV_32F, 1, 0, ksize=5)
    for _ in range(n * 4):
        if placed >= n:
            break
        k = rng.integers(len(xs))
        y, x = ys[k], xs[k]
        # direction along the road: perpendicular to the mask gradient, else axis guess
        g = np.array([gx[y, x], gy[y, x]])
        ang = math.atan2(g[1], g[0]) + math.pi / 2 if np.linalg.norm(g) > 1e-3 else rng.choice([0, math.pi / 2])
        poly = _rect((x + 0.5) / c.r, (y + 0.5) / c.r, 9 * c.per_m, 4 * c.per_m, ang)
        if c.free(poly, ("road", "concrete")):
            c.add_object("vehicle", poly)
            c.overlays.append(("vehicle", poly, int(rng.integers(6))))
            placed += 1
    return placed


def _airport(c: _Canvas, rng: np.random.Generator, dev: float, scene: str) -> list[str]:
    """A runway, an apron with parked airplanes (one may be taking off) and a terminal."""
    rel: list[str] = []
    c.mat[:] = MAT["grass"]
    ang = rng.uniform(0, math.pi)
    cx, cy = rng.uniform(0.35, 0.65, size=2)
    run = _rect(cx, cy, 3.0, 45 * c.per_m, ang)
    c.fill(run, "runway")
    c.segments += [tuple(np.r_[run[0], run[1]]), tuple(np.r_[run[2], run[3]])]
    c.overlays.append(("runway", run))
    normal = np.array([-math.sin(ang), math.cos(ang)]) * rng.choice([-1, 1])
    apron_c = np.array([cx, cy]) + normal * (45 * c.per_m / 2 + 70 * c.per_m)
    apron = _rect(apron_c[0], apron_c[1], rng.uniform(260, 420) * c.per_m, 100 * c.per_m, ang)
    c.fill(apron, "concrete")
    c.rect_lines(apron)
    term_c = apron_c + normal * (50 + 25) * c.per_m
    _building(c, _rect(term_c[0], term_c[1], 180 * c.per_m, 40 * c.per_m, ang), rng, 14, label=True)
    n_on_apron = int(rng.integers(1, 5))
    for k in range(n_on_apron):
        t = (k - (n_on_apron - 1) / 2) * 55 * c.per_m
        p = apron_c + np.array([math.cos(ang), math.sin(ang)]) * t
        plane = _rect(p[0], p[1], 38 * c.per_m, 36 * c.per_m, ang + math.pi / 2)
        if c.free(plane, ("concrete",)):
            c.add_object("airplane", plane)
            c.overlays.append(("airplane", plane, ang + math.pi / 2 * float(rng.choice([1, -1]))))
    if rng.random() < 0.5:
        t = rng.uniform(-0.25, 0.25)
        p = np.array([cx, cy]) + np.array([math.cos(ang), math.sin(ang)]) * t
        plane = _rect(p[0], p[1], 38 * c.per_m, 36 * c.per_m, ang)
        if c.free(plane, ("runway",)):
            c.add_object("airplane", plane)
            c.overlays.append(("airplane", plane, ang))
            rel.append("an airplane is taking off on the runway")
    rel.append("airplanes are parked on the apron next to the runway")
    _trees(c, rng, 3, ("grass",))
    return rel


def _coast(c: _Canvas, rng: np.random.Generator, dev: float, scene: str) -> list[str]:
    """Port: piers into the sea with ships along them, buildings and tanks ashore; beach: sand, foam, a few houses."""
    rel: list[str] = []
    c.mat[:] = MAT["urban"] if scene == "port" else MAT["grass"]
    side, frac = _water_side(c, rng, rng.uniform(0.35, 0.55), shore=None if scene == "port" else "sand")
    if scene == "beach":
        # a wide sand strip and foam along the shore
        water = (np.isin(c.mat, [MAT["water"], MAT["shallow"]])).astype(np.uint8)
        k = max(3, int(c.r * rng.uniform(0.12, 0.22)))
        grown = cv2.dilate(water, np.ones((k, k), np.uint8)) > 0
        c.mat[grown & (water == 0)] = MAT["sand"]
        c.overlays.append(("foam",))
        _trees(c, rng, 6, ("grass",))
        for _ in range(int(rng.integers(0, 5) * dev)):
            p = _place(c, rng, (rng.uniform(14, 26), rng.uniform(10, 16)), ("grass",), angle=0.0)
            if p is not None:
                _building(c, p, rng, rng.uniform(4, 9))
        rel.append("the sea meets a long sandy beach")
    else:
        # piers perpendicular to the shore, ships along them
        direction = np.array([(0, -1), (1, 0), (0, 1), (-1, 0)][side], dtype=float)
        along = np.array([direction[1], direction[0]])
        n_piers = int(rng.integers(1, 4))
        ships = 0
        for k in range(n_piers):
            u = (k + 0.5) / n_piers + rng.uniform(-0.08, 0.08)
            shore_pt = np.array([0.5, 0.5]) + direction * (0.5 - frac) + along * (u - 0.5)
            length = rng.uniform(0.2, 0.4)
            ctr = shore_pt + direction * length / 2
            pier = _rect(ctr[0], ctr[1], length + 0.05, 18 * c.per_m, math.atan2(direction[1], direction[0]))
            c.fill(pier, "concrete")
            c.rect_lines(pier)
            for s in (-1, 1):
                for j in range(int(rng.integers(0, 3))):
                    for _try in range(4):
                        pos = ctr + direction * rng.uniform(-0.1, 0.45) * length + along * s * (9 + 12) * c.per_m
                        ship = _rect(pos[0], pos[1], rng.uniform(40, 80) * c.per_m, rng.uniform(12, 18) * c.per_m,
                                     math.atan2(direction[1], direction[0]))
                        if c.free(ship, ("water", "shallow")):
                            c.add_object("ship", ship)
                            c.overlays.append(("ship", ship, int(rng.integers(4))))
                            ships += 1
                            break
        for _ in range(int(rng.integers(0, 3))):
            ship = _place(c, rng, (rng.uniform(40, 110), rng.uniform(10, 22)), ("water",))
            if ship is not None:
                c.add_object("ship", ship)
                c.overlays.append(("ship", ship, int(rng.integers(4))))
        where = {0: "top", 1: "right", 2: "bottom", 3: "left"}[side]
        if ships:
            rel.append(f"ships are docked along the pier on the {where}" if where in ("left", "right")
                       else f"ships are docked along the pier at the {where}")
        else:
            rel.append(f"piers stretch into the sea on the {where}" if where in ("left", "right")
                       else f"piers stretch into the sea at the {where}")
        for _ in range(int(rng.integers(2, 6) * dev)):
            p = _place(c, rng, (rng.uniform(40, 80), rng.uniform(20, 35)), ("urban",))
            if p is not None:
                _building(c, p, rng, rng.uniform(6, 14))
        for _ in range(int(rng.integers(0, 4))):
            d = rng.uniform(18, 30)
            p = _place(c, rng, (d, d), ("urban",), angle=0.0)
            if p is not None:
                c.fill(p, "tank")
                c.add_object("storagetank", p)
                c.overlays.append(("tank", p))
    return rel


def _dense_residential(c: _Canvas, rng: np.random.Generator, dev: float, scene: str) -> list[str]:
    """A road grid lined with many buildings, some trees and vehicles."""
    rel: list[str] = []
    ang = _road_grid(c, rng, rng.uniform(70, 110), rng.uniform(9, 14))
    n = int(rng.integers(25, 60) * dev)
    for _ in range(n):
        p = _place(c, rng, (rng.uniform(10, 20), rng.uniform(8, 14)), ("urban",), angle=ang + rng.choice([0, math.pi / 2]))
        if p is not None:
            _building(c, p, rng, rng.uniform(4, 12))
    _trees(c, rng, 4, ("urban",))
    _vehicles_along(c, rng, int(rng.integers(2, 8)))
    rel.append("many buildings are arranged densely along the roads")
    return rel


def _sparse_residential(c: _Canvas, rng: np.random.Generator, dev: float, scene: str) -> list[str]:
    """Winding roads, houses scattered among trees."""
    rel: list[str] = []
    for _ in range(int(rng.integers(1, 3))):
        s = int(rng.integers(4))
        path = _smooth_path(rng, _edge_point(rng, s), _edge_point(rng, (s + 2) % 4), rng.uniform(0.02, 0.1))
        _road(c, path, rng.uniform(7, 10), straight=False, lanes=1)
    for _ in range(int(rng.integers(5, 14) * dev)):
        p = _place(c, rng, (rng.uniform(10, 18), rng.uniform(8, 13)), ("grass",))
        if p is not None:
            _building(c, p, rng, rng.uniform(4, 8))
    _trees(c, rng, int(rng.integers(8, 16)), ("grass",))
    _vehicles_along(c, rng, int(rng.integers(0, 3)))
    rel.append("some houses are scattered among green trees")
    return rel


def _industrial(c: _Canvas, rng: np.random.Generator, dev: float, scene: str) -> list[str]:
    """Large buildings on a road grid and storage tanks in a tidy block."""
    rel: list[str] = []
    c.mat[:] = MAT["bare"] if rng.random() < 0.4 else MAT["urban"]
    ground = "bare" if c.mat[0, 0] == MAT["bare"] else "urban"
    _road_grid(c, rng, rng.uniform(160, 240), rng.uniform(10, 14))
    for _ in range(int(rng.integers(3, 7) * dev)):
        p = _place(c, rng, (rng.uniform(40, 90), rng.uniform(25, 50)), (ground,), angle=0.0)
        if p is not None:
            _building(c, p, rng, rng.uniform(8, 16))
    # storage tanks in a tidy block
    d = rng.uniform(18, 32)
    rows, cols = int(rng.integers(1, 4)), int(rng.integers(2, 5))
    x0, y0 = rng.uniform(0.1, 0.6, size=2)
    for i in range(rows):
        for j in range(cols):
            cx, cy = x0 + j * d * 1.4 * c.per_m, y0 + i * d * 1.4 * c.per_m
            p = _rect(cx, cy, d * c.per_m, d * c.per_m, 0.0)
            if c.free(p, (ground,)):
                c.fill(p, "tank")
                c.add_object("storagetank", p)
                c.overlays.append(("tank", p))
    _vehicles_along(c, rng, int(rng.integers(1, 5)))
    rel.append("storage tanks stand in rows in the industrial area")
    return rel


def _farmland(c: _Canvas, rng: np.random.Generator, dev: float, scene: str) -> list[str]:
    """Field parcels, maybe a straight road, a farm building or windmills."""
    rel: list[str] = []
    c.mat[:] = MAT["grass"]
    _parcels(c, rng)
    if rng.random() < 0.6:
        s = int(rng.integers(4))
        _road(c, np.stack([_edge_point(rng, s), _edge_point(rng, (s + 2) % 4)]), 8, straight=True, lanes=1)
    if rng.random() < 0.3:
        p = _place(c, rng, (20, 12), ("crop", "grass"))
        if p is not None:
            _building(c, p, rng, 6)
    _windmills(c, rng, int(rng.integers(0, 3)) if rng.random() < 0.35 else 0)
    rel.append("the fields are divided into neat parcels")
    return rel


def _forest(c: _Canvas, rng: np.random.Generator, dev: float, scene: str) -> list[str]:
    """Trees everywhere, maybe clearings and a track."""
    rel: list[str] = []
    c.mat[:] = MAT["trees"]
    c.height[:] = 12.0
    if rng.random() < 0.4:
        for _ in range(int(rng.integers(1, 3))):
            cx, cy = rng.uniform(0.1, 0.9, size=2)
            cv2.ellipse(c.mat, (int(cx * c.r), int(cy * c.r)),
                        (int(rng.uniform(0.05, 0.15) * c.r), int(rng.uniform(0.05, 0.15) * c.r)),
                        rng.uniform(0, 180), 0, 360, MAT["grass"], -1)
    if rng.random() < 0.4:
        s = int(rng.integers(4))
        path = _smooth_path(rng, _edge_point(rng, s), _edge_point(rng, (s + 2) % 4), 0.08)
        _road(c, path, 6, straight=False, lanes=0)
    c.height[c.mat != MAT["trees"]] = 0
    rel.append("dense green trees cover the whole area")
    return rel


def _river_scene(c: _Canvas, rng: np.random.Generator, dev: float, scene: str) -> list[str]:
    """A river through grass or fields; bridge: a road crossing it, else maybe boats on it."""
    rel: list[str] = []
    c.mat[:] = MAT["grass"]
    if rng.random() < 0.5:
        _parcels(c, rng)
    path = _river(c, rng, rng.uniform(35, 70) if scene == "river" else rng.uniform(40, 60))
    _trees(c, rng, int(rng.integers(4, 12)), ("grass", "crop"))
    if scene == "bridge":
        i = len(path) // 2 + int(rng.integers(-3, 4))
        t = path[min(i + 1, len(path) - 1)] - path[max(i - 1, 0)]
        n = np.array([-t[1], t[0]]) / (np.linalg.norm(t) + 1e-9)
        a, b = path[i] - n * 1.0, path[i] + n * 1.0
        width = rng.uniform(12, 20)
        # bridge shadow on the water, then the deck
        deck = _rect(path[i][0], path[i][1], 2.0, width * c.per_m, math.atan2(n[1], n[0]))
        c.cast_shadow(deck, 6.0, 0.9)
        _road(c, np.stack([a, b]), width, straight=True)
        _vehicles_along(c, rng, int(rng.integers(0, 4)))
        rel.append("a bridge crosses the river")
    else:
        for _ in range(int(rng.integers(0, 3))):
            p = _place(c, rng, (rng.uniform(20, 40), rng.uniform(6, 10)), ("water",))
            if p is not None:
                c.add_object("ship", p)
                c.overlays.append(("ship", p, int(rng.integers(4))))
        rel.append("a river winds through the land")
    return rel


def _desert(c: _Canvas, rng: np.random.Generator, dev: float, scene: str) -> list[str]:
    """Sand and dunes, maybe bare patches, a road and windmills."""
    rel: list[str] = []
    c.mat[:] = MAT["sand"]
    if rng.random() < 0.4:
        blob = _noise(rng, 3, c.r) > rng.uniform(0.1, 0.4)
        c.mat[blob] = MAT["bare"]
    c.overlays.append(("dunes", rng.uniform(0, math.pi), rng.uniform(8, 16)))
    if rng.random() < 0.3:
        s = int(rng.integers(4))
        _road(c, np.stack([_edge_point(rng, s), _edge_point(rng, (s + 2) % 4)]), 9, straight=True, lanes=1)
    _windmills(c, rng, int(rng.integers(1, 4)) if rng.random() < 0.3 else 0, allowed=("sand", "bare"))
    rel.append("yellow sand dunes stretch across the desert")
    return rel


def _parking(c: _Canvas, rng: np.random.Generator, dev: float, scene: str) -> list[str]:
    """A parking lot with rows of stalls and vehicles, a road and a few buildings."""
    rel: list[str] = []
    ang = rng.choice([0.0, math.pi / 2]) + rng.uniform(-0.1, 0.1)
    lot = _rect(0.5 + rng.uniform(-0.1, 0.1), 0.5 + rng.uniform(-0.1, 0.1), rng.uniform(0.6, 0.85),
                rng.uniform(0.45, 0.7), ang)
    c.fill(lot, "concrete")
    c.rect_lines(lot)
    s = int(rng.integers(4))
    _road(c, np.stack([_edge_point(rng, s, 0.02, 0.12), _edge_point(rng, (s + 2) % 4, 0.02, 0.12)]), 10, straight=True)
    # parking rows
    ctr = lot.mean(0)
    u = np.array([math.cos(ang), math.sin(ang)])
    v = np.array([-math.sin(ang), math.cos(ang)])
    Lw = np.linalg.norm(lot[1] - lot[0])
    Lh = np.linalg.norm(lot[3] - lot[0])
    n_rows = max(1, int(Lh / (14 * c.per_m)))
    fill_p = rng.uniform(0.3, 0.9)
    for i in range(n_rows):
        off = (i - (n_rows - 1) / 2) * 14 * c.per_m
        a, b = ctr + v * off - u * Lw / 2 * 0.95, ctr + v * off + u * Lw / 2 * 0.95
        c.overlays.append(("stall_line", np.stack([a, b])))
        n_slots = int(Lw / (3.2 * c.per_m))
        for j in range(n_slots):
            if rng.random() > fill_p:
                continue
            pos = ctr + v * (off + 4 * c.per_m * (1 if i % 2 else -1)) + u * (-Lw / 2 + (j + 0.5) * 3.2 * c.per_m)
            car = _rect(pos[0], pos[1], 5.2 * c.per_m, 2.3 * c.per_m, ang + math.pi / 2)
            if 0.01 < car.min() and car.max() < 0.99:
                c.add_object("vehicle", car)
                c.overlays.append(("vehicle", car, int(rng.integers(6))))
    for _ in range(int(rng.integers(0, 3))):
        p = _place(c, rng, (rng.uniform(25, 45), rng.uniform(15, 25)), ("urban",), angle=ang)
        if p is not None:
            _building(c, p, rng, rng.uniform(6, 12))
    rel.append("many vehicles are parked in rows in the parking lot")
    return rel


def _playground(c: _Canvas, rng: np.random.Generator, dev: float, scene: str) -> list[str]:
    """A ground track field, tennis courts, buildings and trees."""
    rel: list[str] = []
    if rng.random() < 0.5:
        c.mat[:] = MAT["grass"]
    ground = "grass" if c.mat[0, 0] == MAT["grass"] else "urban"
    ang = rng.choice([0.0, math.pi / 2]) + rng.uniform(-0.2, 0.2)
    p = _place(c, rng, (176, 96), (ground,), angle=ang, region=(0.3, 0.3, 0.7, 0.7), tries=60)
    if p is not None:
        ctr, L, W = p.mean(0), np.linalg.norm(p[1] - p[0]), np.linalg.norm(p[3] - p[0])
        cv2.ellipse(c.mat, tuple(int(v) for v in c.px(ctr)), (int(L / 2 * c.r * 16), int(W / 2 * c.r * 16)),
                    math.degrees(ang), 0, 360, MAT["track"], -1, shift=4)
        c.add_object("groundtrackfield", p)
        c.overlays.append(("track", p, ang))
    for _ in range(int(rng.integers(1, 4))):
        q = _place(c, rng, (36, 18), (ground,), angle=ang + rng.choice([0, math.pi / 2]))
        if q is not None:
            c.fill(q, "court", var=int(rng.integers(2)))
            c.rect_lines(q)
            c.add_object("tenniscourt", q)
            c.overlays.append(("court", q))
    for _ in range(int(rng.integers(1, 5) * dev)):
        q = _place(c, rng, (rng.uniform(30, 60), rng.uniform(15, 25)), (ground,), angle=ang)
        if q is not None:
            _building(c, q, rng, rng.uniform(8, 15))
    _trees(c, rng, 5, (ground,))
    rel.append("a ground track field is surrounded by buildings and trees")
    return rel


# Each scene type's recipe: (canvas, layout rng, development 0.75..1.25 by year, scene) -> relation phrases
SCENE_RECIPES = {
    "airport": _airport,
    "port": _coast,
    "beach": _coast,
    "dense_residential": _dense_residential,
    "sparse_residential": _sparse_residential,
    "industrial": _industrial,
    "farmland": _farmland,
    "forest": _forest,
    "river": _river_scene,
    "bridge": _river_scene,
    "desert": _desert,
    "parking": _parking,
    "playground": _playground,
}


def _recipe(scene: str, c: _Canvas, rng: np.random.Generator, meta: dict) -> list[str]:
    """Draw one scene type (its recipe in :data:`SCENE_RECIPES`); returns relation phrases for the captions."""
    dev = 0.75 + 0.5 * (meta["year"] - 2000) / 24  # later years are more built-up
    if scene in ("dense_residential", "sparse_residential", "industrial", "parking", "playground"):
        c.mat[:] = MAT["urban"] if scene != "sparse_residential" else MAT["grass"]
    return SCENE_RECIPES[scene](c, rng, dev, scene)


def _windmills(c: _Canvas, rng: np.random.Generator, n: int, allowed: Sequence[str] = ("crop", "grass")) -> None:
    for _ in range(n):
        d = 70.0
        p = _place(c, rng, (d, d), allowed, angle=0.0)
        if p is not None:
            c.add_object("windmill", p)
            c.overlays.append(("windmill", p, rng.uniform(0, 2 * math.pi)))


# ----------------------------------------------------------------------------- colour


def season_weights(meta: dict) -> tuple[float, float, float, float]:
    """(greenness, autumn, snow, aridity) in [0, 1] from month, day and latitude."""
    lat = float(meta["latitude"])
    doy = (meta["month"] - 1) * 30.4 + meta["day"]
    if lat < 0:
        doy = (doy + 182.5) % 365
    phase = math.cos(2 * math.pi * (doy - 196) / 365)  # +1 mid July, -1 mid January
    polar = min(1.0, max(0.0, (abs(lat) - 20) / 35))
    green = 0.5 + 0.5 * (phase * polar + (1 - polar) * 1.0)  # tropics stay green
    autumn = polar * max(0.0, math.sin(2 * math.pi * (doy - 196) / 365)) * (1 - abs(phase))
    autumn = min(1.0, 2.2 * autumn)
    snow = max(0.0, -phase - 0.35) / 0.65 * min(1.0, max(0.0, (abs(lat) - 38) / 12))
    aridity = math.exp(-((abs(lat) - 25) / 9) ** 2)  # the subtropical desert belt
    return green, autumn, snow, aridity


def _palette(meta: dict) -> np.ndarray:
    """Material x variant colour table (n_mat, variants, 3) for this image's season and climate."""
    green, autumn, snow, arid = season_weights(meta)
    pal = np.repeat(_MAT_COLOR[:, None, :], _N_VARIANTS, axis=1).copy()
    pal[MAT["roof"]] = _ROOF_COLORS
    pal[MAT["crop"]] = _CROP_COLORS
    pal[MAT["court"], 1] = (58, 92, 138)  # blue hard court
    brown = np.array([150, 128, 92], np.float32)
    orange = np.array([176, 110, 52], np.float32)
    for name, w in (("trees", 0.6), ("grass", 1.0), ("crop", 0.9)):
        i = MAT[name]
        dry = np.clip((1 - green) * w + arid * 0.45, 0, 1)
        pal[i] = pal[i] * (1 - dry) + brown * dry
        pal[i] = pal[i] * (1 - autumn * 0.7) + orange * (autumn * 0.7)
    tint = np.array([1.0 + 0.08 * math.sin(math.radians(meta["longitude"])), 1.0, 1.0 - 0.08 * math.sin(math.radians(meta["longitude"]))], np.float32)
    pal[MAT["bare"]] *= tint
    if snow > 0:
        white = np.array([236, 239, 243], np.float32)
        for name, w in (("grass", 0.95), ("crop", 0.95), ("bare", 0.9), ("trees", 0.55), ("roof", 0.8),
                        ("urban", 0.5), ("sand", 0.7)):
            pal[MAT[name]] = pal[MAT[name]] * (1 - snow * w) + white * (snow * w)
    return pal


def _colourise(c: _Canvas, rng: np.random.Generator, meta: dict) -> np.ndarray:
    pal = _palette(meta).reshape(-1, 3)
    col = pal[c.mat.astype(np.intp) * _N_VARIANTS + c.var]
    fine = _noise(rng, 1, c.r)
    mid = _noise(rng, 0, c.r)
    amp = _MAT_TEXTURE[c.mat]
    col += ((0.6 * fine + 0.4 * mid) * amp)[..., None]
    trees = c.mat == MAT["trees"]
    if trees.any():  # crowns: bright tops, dark gaps
        crowns = _noise(rng, 1, c.r)
        col[trees] *= (0.82 + 0.35 * np.clip(crowns[trees], -0.6, 0.6))[:, None]
    water = np.isin(c.mat, [MAT["water"], MAT["shallow"]])
    if water.any():
        col[water] += (6 * _noise(rng, 2, c.r)[water])[:, None]
    col *= (1.0 + c.shade)[..., None]
    col *= (1.0 - 0.45 * np.clip(c.shadow, 0, 1))[..., None]
    return col


def _draw_overlays(c: _Canvas, col: np.ndarray, rng: np.random.Generator) -> None:
    r = c.r
    for ov in c.overlays:
        kind = ov[0]
        if kind == "lane" and ov[2] > 0:
            dash = max(2.0 / r, 4.0 * c.per_m)
            starts, ends = [], []
            for a, b in zip(ov[1][:-1], ov[1][1:]):
                length = float(np.linalg.norm(b - a))
                t = np.arange(0.0, length, 2 * dash)[:, None] / max(length, 1e-9)
                starts.append(a + (b - a) * t)
                ends.append(a + (b - a) * np.minimum(t + dash / max(length, 1e-9), 1.0))
            p, q = np.concatenate(starts), np.concatenate(ends)
            keep = ((p > -0.02) & (p < 1.02)).all(1) | ((q > -0.02) & (q < 1.02)).all(1)
            dashes = c.px(np.stack([p[keep], q[keep]], 1))
            cv2.polylines(col, list(dashes), False, (222, 220, 205), 1, cv2.LINE_AA, shift=4)
        elif kind == "runway":
            run = ov[1]
            a, b = (run[0] + run[3]) / 2, (run[1] + run[2]) / 2
            d = b - a
            for s in np.arange(0, 1, 0.02)[::2]:
                cv2.line(col, tuple(c.px(a + d * s)), tuple(c.px(a + d * (s + 0.01))), (235, 235, 235), 1, cv2.LINE_AA, shift=4)
            for edge in ((run[0], run[1]), (run[3], run[2])):
                cv2.line(col, tuple(c.px(edge[0])), tuple(c.px(edge[1])), (200, 200, 200), 1, cv2.LINE_AA, shift=4)
        elif kind == "airplane":
            plane, heading = ov[1], ov[2]
            ctr = plane.mean(0)
            L = np.linalg.norm(plane[1] - plane[0])
            span = np.linalg.norm(plane[3] - plane[0])
            f = np.array([math.cos(heading), math.sin(heading)])
            n = np.array([-f[1], f[0]])
            parts = [
                _rect(*(ctr), L, L * 0.13, heading),
                _rect(*(ctr + f * L * 0.05), span * 0.28, span, heading),
                _rect(*(ctr - f * L * 0.42), L * 0.1, span * 0.4, heading),
            ]
            for part in parts:
                sh = part + np.array([0.55, 0.8]) * 3.5 * c.per_m
                cv2.fillPoly(col, [c.px(sh)], (70, 70, 70), cv2.LINE_AA, shift=4)
            for part in parts:
                cv2.fillPoly(col, [c.px(part)], (236, 236, 238), cv2.LINE_AA, shift=4)
                cv2.fillPoly(c.height, [c.px(part)], 4.0, shift=4)
            del n
        elif kind == "ship":
            ship, colour = ov[1], ov[2]
            ctr = ship.mean(0)
            L = np.linalg.norm(ship[1] - ship[0])
            W = np.linalg.norm(ship[3] - ship[0])
            f = (ship[1] - ship[0]) / (L + 1e-9)
            n = (ship[3] - ship[0]) / (W + 1e-9)
            hull = np.stack([ctr - f * L / 2 - n * W / 2, ctr + f * L * 0.3 - n * W / 2, ctr + f * L / 2,
                             ctr + f * L * 0.3 + n * W / 2, ctr - f * L / 2 + n * W / 2])
            shades = [(228, 228, 226), (160, 52, 44), (60, 64, 70), (200, 170, 60)]
            wake = hull - f * L * 0.15
            cv2.fillPoly(col, [c.px(wake)], (90, 120, 130), cv2.LINE_AA, shift=4)
            cv2.fillPoly(col, [c.px(hull)], shades[colour], cv2.LINE_AA, shift=4)
            deck = _rect(*(ctr - f * L * 0.2), L * 0.25, W * 0.6, math.atan2(f[1], f[0]))
            cv2.fillPoly(col, [c.px(deck)], (210, 210, 205), cv2.LINE_AA, shift=4)
            cv2.fillPoly(c.height, [c.px(hull)], 5.0, shift=4)
        elif kind == "vehicle":
            car, colour = ov[1], ov[2]
            shades = [(210, 210, 212), (30, 32, 36), (150, 30, 30), (40, 60, 120), (120, 120, 124), (200, 180, 60)]
            cv2.fillPoly(col, [c.px(car)], shades[colour], cv2.LINE_AA, shift=4)
            cv2.fillPoly(c.height, [c.px(car)], 1.5, shift=4)
        elif kind == "tank":
            p = ov[1]
            ctr = p.mean(0)
            rad = np.linalg.norm(p[1] - p[0]) / 2
            cpx = tuple(int(v) for v in c.px(ctr))
            rp = int(rad * r * 16)
            sh = tuple(int(v) for v in c.px(ctr + np.array([0.55, 0.8]) * 12 * c.per_m))
            cv2.circle(col, sh, rp, (80, 80, 80), -1, cv2.LINE_AA, shift=4)
            cv2.circle(col, cpx, rp, (222, 222, 218), -1, cv2.LINE_AA, shift=4)
            cv2.circle(col, cpx, int(rp * 0.75), (196, 196, 192), 1, cv2.LINE_AA, shift=4)
            cv2.circle(c.height, cpx, rp, 15.0, -1, shift=4)
        elif kind == "track":
            p, ang = ov[1], ov[2]
            ctr = p.mean(0)
            L = np.linalg.norm(p[1] - p[0])
            W = np.linalg.norm(p[3] - p[0])
            axes = (int(L / 2 * r * 16), int(W / 2 * r * 16))
            cc = tuple(int(v) for v in c.px(ctr))
            cv2.ellipse(col, cc, axes, math.degrees(ang), 0, 360, (176, 72, 60), -1, cv2.LINE_AA, shift=4)
            inner = (int(axes[0] * 0.78), int(axes[1] * 0.66))
            cv2.ellipse(col, cc, inner, math.degrees(ang), 0, 360, (70, 140, 70), -1, cv2.LINE_AA, shift=4)
            cv2.ellipse(col, cc, (int(axes[0] * 0.9), int(axes[1] * 0.83)), math.degrees(ang), 0, 360,
                        (230, 230, 230), 1, cv2.LINE_AA, shift=4)
        elif kind == "court":
            q = ov[1]
            inner = q.mean(0) + (q - q.mean(0)) * 0.7
            cv2.polylines(col, [c.px(inner)], True, (235, 235, 235), 1, cv2.LINE_AA, shift=4)
            mid = (inner[0] + inner[1]) / 2, (inner[3] + inner[2]) / 2
            cv2.line(col, tuple(c.px(mid[0])), tuple(c.px(mid[1])), (235, 235, 235), 1, cv2.LINE_AA, shift=4)
        elif kind == "stall_line":
            a, b = ov[1]
            cv2.line(col, tuple(c.px(a)), tuple(c.px(b)), (232, 232, 225), 1, cv2.LINE_AA, shift=4)
        elif kind == "windmill":
            p, rot = ov[1], ov[2]
            ctr = p.mean(0)
            rad = np.linalg.norm(p[1] - p[0]) / 2
            tower_sh = ctr + np.array([0.55, 0.8]) * 60 * c.per_m
            cv2.line(col, tuple(c.px(ctr)), tuple(c.px(tower_sh)), (60, 60, 60), 1, cv2.LINE_AA, shift=4)
            for k in range(3):
                a = rot + k * 2 * math.pi / 3
                tip = ctr + rad * np.array([math.cos(a), math.sin(a)])
                cv2.line(col, tuple(c.px(tower_sh)), tuple(c.px(tower_sh + tip - ctr)), (70, 70, 70), 1, cv2.LINE_AA, shift=4)
                cv2.line(col, tuple(c.px(ctr)), tuple(c.px(tip)), (245, 245, 245), 1, cv2.LINE_AA, shift=4)
            cv2.circle(col, tuple(int(v) for v in c.px(ctr)), 24, (250, 250, 250), -1, cv2.LINE_AA, shift=4)
        elif kind == "foam":
            water = np.isin(c.mat, [MAT["water"], MAT["shallow"]]).astype(np.uint8)
            edge = cv2.dilate(water, np.ones((3, 3), np.uint8)) - cv2.erode(water, np.ones((3, 3), np.uint8))
            col[edge > 0] = col[edge > 0] * 0.4 + 240 * 0.6
        elif kind == "dunes":
            ang, wavelength = ov[1], ov[2]
            ys, xs = np.mgrid[0:r, 0:r].astype(np.float32)
            u = (xs * math.cos(ang) + ys * math.sin(ang)) / (wavelength * c.m)
            warp = 2.0 * _noise(rng, 3, r)
            ripple = np.sin(2 * math.pi * (u + warp))
            sand = c.mat == MAT["sand"]
            col[sand] *= (1.0 + 0.09 * ripple[sand])[:, None]


def _clouds(rng: np.random.Generator, r: int, cover: float, col: np.ndarray, per_m: float) -> np.ndarray:
    """Draw clouds over exactly ``cover`` percent of the pixels; returns the cloud mask (r, r) bool."""
    if cover <= 0:
        return np.zeros((r, r), bool)
    field_ = _noise(rng, 3, r) + 0.35 * _noise(rng, 0, r)
    tau = np.quantile(field_, 1 - cover / 100.0)
    alpha = np.clip(0.5 + (field_ - tau) / 0.12, 0, 1)
    mask = field_ > tau
    # cloud shadows, offset along the sun direction
    shift = (int(0.06 * r), int(0.09 * r))
    shadow = np.roll(alpha, shift, axis=(1, 0))
    col *= (1 - 0.35 * shadow)[..., None]
    bright = 238 + 10 * _noise(rng, 0, r)
    col[:] = col * (1 - alpha[..., None]) + bright[..., None] * alpha[..., None]
    return mask


# ----------------------------------------------------------------------------- condition maps


def _condition_maps(c: _Canvas, clean: np.ndarray, size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    mat = cv2.resize(c.mat, (size, size), interpolation=cv2.INTER_NEAREST)
    labels = _MAT_CLASS[mat]
    road = np.where(mat == MAT["road"], 255, 0).astype(np.uint8)
    depth = cv2.resize(np.sqrt(np.clip(c.height / MAX_DEPTH_M, 0, 1)), (size, size), interpolation=cv2.INTER_AREA)
    depth = (cv2.GaussianBlur(depth, (0, 0), 0.6) * 255).round().astype(np.uint8)
    lum = cv2.cvtColor(clean, cv2.COLOR_RGB2GRAY).astype(np.float32)
    lum = cv2.GaussianBlur(lum, (0, 0), 0.8 * c.r / size)
    mag = cv2.magnitude(cv2.Sobel(lum, cv2.CV_32F, 1, 0), cv2.Sobel(lum, cv2.CV_32F, 0, 1))
    mag = cv2.resize(mag, (size, size), interpolation=cv2.INTER_AREA)
    soft = np.clip(mag / 160.0, 0, 1) ** 0.7
    soft = (cv2.GaussianBlur(soft, (0, 0), 0.7) * 255).round().astype(np.uint8)
    # sketch: boundaries between regions of different material or object
    ident = cv2.resize(c.mat.astype(np.int32) * 256 + c.oid, (size, size), interpolation=cv2.INTER_NEAREST)
    sk = np.zeros((size, size), bool)
    sk[:, 1:] |= ident[:, 1:] != ident[:, :-1]
    sk[1:, :] |= ident[1:, :] != ident[:-1, :]
    sketch = sk.astype(np.uint8) * 255
    lines = np.zeros((size, size), np.uint8)
    for x1, y1, x2, y2 in c.segments:
        p = np.round(np.array([[x1, y1], [x2, y2]]) * size * 16).astype(np.int32)
        cv2.line(lines, tuple(p[0]), tuple(p[1]), 255, 1, cv2.LINE_8, shift=4)
    maps = {"lines": lines, "soft_edges": soft, "sketch": sketch, "road": road, "depth": depth,
            "segmentation": seg_to_rgb(labels)}
    return maps, labels


# ----------------------------------------------------------------------------- captions

def count_phrase(n: int, label: str) -> str:
    """'three airplanes', 'one ship', 'many buildings'."""
    sing, plur = CLASS_PHRASES[label]
    if n == 1:
        return f"one {sing}"
    return f"{NUMBER_WORDS[n]} {plur}" if n <= 10 else f"many {plur}"


def _captions(rng: np.random.Generator, scene: str, objects: list[ObjectAnnotation], rel: list[str],
              meta: dict, season: tuple[float, float, float, float]) -> list[str]:
    sp = SCENE_PHRASES[scene]
    counts: dict[str, list[np.ndarray]] = {}
    for o in objects:
        b = o.bbox
        counts.setdefault(o.label, []).append(np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]))
    main = [k for k in ("airplane", "ship", "storagetank", "groundtrackfield", "tenniscourt", "windmill", "vehicle",
                        "building") if k in counts]
    caps = []
    first = f"this is an aerial image of {sp}" if rng.random() < 0.5 else f"an aerial image of {sp}"
    caps.append(first + ".")
    if main:
        k = main[0]
        pos = position_phrase(*np.mean(counts[k], axis=0))
        caps.append(f"{count_phrase(len(counts[k]), k)} {'is' if len(counts[k]) == 1 else 'are'} {pos} of {sp}.")
        parts = [count_phrase(len(counts[m]), m) for m in main[:3]]
        joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        caps.append(f"there {'is' if joined.startswith('one ') else 'are'} {joined} in {sp}.")
    else:
        caps.append(f"{sp} seen from above." if rng.random() < 0.5 else f"a view of {sp} from above.")
    for r_ in rel:
        caps.append(f"{r_}.")
    green, autumn, snow, arid = season
    if snow > 0.4:
        caps.append(f"snow covers the ground of {sp}.")
    elif autumn > 0.5 and scene in ("forest", "farmland", "sparse_residential", "river"):
        caps.append(f"the trees turn orange in autumn in {sp}.")
    elif green > 0.75 and scene in ("forest", "farmland", "sparse_residential", "river", "playground"):
        caps.append(f"lush green vegetation surrounds {sp}.")
    if meta["cloud_cover"] >= 60:
        caps.append(f"thick clouds cover most of {sp}.")
    elif meta["cloud_cover"] >= 25:
        caps.append(f"some clouds float over {sp}.")
    order = rng.permutation(len(caps) - 1) + 1
    return [caps[0]] + [caps[i] for i in order]


# ----------------------------------------------------------------------------- public API


def sample_metadata(rng: np.random.Generator, scene: str) -> dict[str, float | int]:
    """Draw the 7 metadata fields for one scene (gsd range depends on the scene type)."""
    year = int(rng.integers(2000, 2025))
    month = int(rng.integers(1, 13))
    day = int(rng.integers(1, calendar.monthrange(year, month)[1] + 1))
    lo, hi = GSD_RANGE[scene]
    gsd = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))
    cloud = 0 if rng.random() < 0.5 else int(round(2 + 93 * rng.random() ** 1.5))  # most scenes clear or light
    if scene == "desert":
        lat = float(rng.choice([-1, 1]) * rng.uniform(15, 35))
    else:
        lat = float(rng.uniform(-55, 68))
    lon = float(rng.uniform(-180, 180))
    return {"year": year, "month": month, "day": day, "gsd": round(gsd, 3), "cloud_cover": cloud,
            "latitude": round(lat, 4), "longitude": round(lon, 4)}


def make_scene(seed: int | Sequence[int], size: int = 64, scene: str | None = None, **metadata: float) -> Scene:
    """Draw one scene. ``seed`` fixes everything; ``scene`` and metadata keyword overrides
    (year, month, day, gsd, cloud_cover, latitude, longitude) change only what they control."""
    seq = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
    rng_meta, rng_layout, rng_tex, rng_cloud, rng_cap = (np.random.default_rng(seq + [k]) for k in range(5))
    scene = scene or SCENES[int(rng_meta.integers(len(SCENES)))]
    if scene not in SCENES:
        raise ValueError(f"unknown scene {scene!r}; choose one of {', '.join(SCENES)}")
    meta = sample_metadata(rng_meta, scene)
    unknown = set(metadata) - set(meta)
    if unknown:
        raise ValueError(f"unknown metadata field(s) {sorted(unknown)}; fields: {', '.join(meta)}")
    meta.update(metadata)
    ss = 2 if size <= 128 else 1
    r = size * ss
    c = _Canvas(r, extent_m=NOMINAL_SIZE * float(meta["gsd"]), min_road=MIN_ROAD_PX / size)
    rel = _recipe(scene, c, rng_layout, meta)
    col = _colourise(c, rng_tex, meta)
    _draw_overlays(c, col, rng_tex)
    clean = np.clip(col, 0, 255).astype(np.uint8)
    maps, labels = _condition_maps(c, clean, size)
    cloud_r = _clouds(rng_cloud, r, float(meta["cloud_cover"]), col, c.per_m)
    img = cv2.resize(np.clip(col, 0, 255), (size, size), interpolation=cv2.INTER_AREA)
    img = img + rng_tex.normal(0, 1.5, img.shape).astype(np.float32)
    image = np.clip(img, 0, 255).round().astype(np.uint8)
    cloud = cv2.resize(cloud_r.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
    season = season_weights(meta)
    captions = _captions(rng_cap, scene, c.objects, rel, meta, season)
    return Scene(image, maps, c.objects, captions, meta, scene, labels, cloud, rel)


def _render_index(args: tuple[int, int, int, int]) -> Scene:
    seed, split_id, index, size = args
    return make_scene((seed, split_id, index), size)


def _render_encoded(args: tuple[int, int, int, int]) -> tuple[Scene, bytes, dict[str, bytes]]:
    """Render one scene and encode its image and maps as PNG (in the worker, so writing stays cheap)."""
    s = _render_index(args)
    return s, encode_png(s.image), {k: encode_png(v) for k, v in s.maps.items()}


_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def generate(n: int, size: int = 64, seed: int = 0, split: str = "train", workers: int = 0,
             start: int = 0) -> list[Scene]:
    """Generate scenes ``start .. start+n-1`` of a split (in parallel when workers != 1)."""
    return _map(_render_index, [(seed, _SPLIT_IDS[split], i, size) for i in range(start, start + n)], workers)


def _map(fn, args: list, workers: int) -> list:
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers <= 1 or len(args) < 64:
        return [fn(a) for a in args]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, args, chunksize=32))


MIN_SIZE = 8  # pixels: the smallest image size write_split accepts


def check_split_settings(n: int, size: int, seed: int = 0, split: str = "train", workers: int = 0) -> None:
    """Raise :class:`~rslib.data.records.UsageError` naming the first setting :func:`write_split` cannot use."""
    for name, value, lo in (("n", n, 1), ("size", size, MIN_SIZE), ("seed", seed, 0), ("workers", workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise UsageError(f"{name} must be an integer >= {lo}, got {value!r}")
    if split not in _SPLIT_IDS:
        raise UsageError(f"unknown split {split!r}; choose train, val or test")


def _split_stamp(n: int, size: int, seed: int, split: str) -> dict[str, Any]:
    """What a split's ``synthrs.json`` records: the generator version and the settings it was made with."""
    return {"version": SYNTHRS_VERSION, "n": n, "size": size, "seed": seed, "split": split}


def write_split(out: str | os.PathLike, n: int, size: int = 64, seed: int = 0, split: str = "train",
                workers: int = 0, overwrite: bool = False) -> Path:
    """Write a SynthRS split in the record format (images, six condition maps, content references), with its
    ``synthrs.json`` (what :func:`ensure_synthrs` compares) and the writer's marker file."""
    check_split_settings(n, size, seed, split, workers)
    rendered = _map(_render_encoded, [(seed, _SPLIT_IDS[split], i, size) for i in range(n)], workers)
    scenes = [r[0] for r in rendered]
    names = [f"images/{i:06d}.png" for i in range(n)]
    # content image: another scene of the same type (a seeded choice within the split)
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], 99])
    by_type: dict[str, list[int]] = {}
    for i, s in enumerate(scenes):
        by_type.setdefault(s.scene, []).append(i)
    with DatasetWriter(out, overwrite=overwrite, fmt="synthrs") as w:
        (w.tmp / "synthrs.json").write_text(json.dumps(_split_stamp(n, size, seed, split)))
        for i, s in enumerate(scenes):
            others = [j for j in by_type[s.scene] if j != i]
            rec = Record(names[i], s.captions, dict(s.metadata), list(s.objects), s.scene)
            extra: dict[str, np.ndarray] = {}
            if others:
                rec.conditions[CONTENT] = names[int(others[rng.integers(len(others))])]
            else:  # the only scene of its type here: draw a fresh one of the same type
                extra[CONTENT] = make_scene((seed, _SPLIT_IDS[split], 10**6 + i), size, scene=s.scene).image
            w.add(rec, rendered[i][1], {**rendered[i][2], **extra})
    return Path(out)


def ensure_synthrs(root: str | os.PathLike, sizes: dict[str, int], size: int, seed: int = 0,
                   workers: int = 0) -> Path:
    """Generate the train/val/test splits under ``root`` unless they already exist as asked (same
    generator version, count, size and seed, recorded in each split's ``synthrs.json``)."""
    root = Path(root)
    for split, n in sizes.items():
        info = root / split / "synthrs.json"
        if info.is_file() and json.loads(info.read_text()) == _split_stamp(n, size, seed, split):
            continue
        write_split(root / split, n, size, seed, split, workers, overwrite=True)
    return root
