"""Measures that only SynthRS allows: metadata adherence and context coherence of generated images.

SynthRS draws every metadata field with a visible effect and places every object where it belongs, so a
generated image can be checked against what it was asked for:

* **cloud cover** (CRS-Diff metadata): :func:`cloud_fraction` estimates the cloud-covered share of each
  image (SynthRS clouds are bright and colourless); its Spearman correlation with the requested
  ``cloud_cover`` is the adherence score. Calibrated on real SynthRS images (:func:`calibrate_cloud`).
* **season** (month, day and latitude): :func:`season_greenness` is the mean excess green
  ``(2G - R - B) / (R + G + B)`` over vegetation pixels; it should follow the green factor that SynthRS
  derives from the date and latitude (:func:`expected_greenness`).
* **context coherence** (CC-Diff): :func:`on_context_fraction` is the share of generated objects whose box
  centre lies on the land cover SynthRS puts them on (ships on water, vehicles on roads or paved ground,
  airplanes on runways or aprons, ...), read from the segmenter's prediction of the generated image.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rslib.data.conditions import LOVEDA_CLASSES
from rslib.data.synthrs import OBJECT_CLASSES, season_weights

_C = {name: i for i, name in enumerate(LOVEDA_CLASSES)}

# Where SynthRS places each class (the LoveDA class under the centre of its box), from synthrs._recipe:
# ships on water; vehicles on roads and parking concrete (background); airplanes on the runway (road) or the
# apron (background); storage tanks are drawn as "tank" material (building) on urban or bare ground; buildings
# are roofs; courts and tracks are their own paved material (background); windmills stand on crops, grass
# (forest class) or desert (barren).
CONTEXT_RULES: dict[str, tuple[str, ...]] = {
    "airplane": ("road", "background"),
    "ship": ("water",),
    "storagetank": ("building", "background", "barren"),
    "vehicle": ("road", "background"),
    "tenniscourt": ("background",),
    "groundtrackfield": ("background",),
    "building": ("building",),
    "windmill": ("agriculture", "forest", "barren"),
}

# Cloud pixels: every channel above CLOUD_BRIGHTNESS and max - min channel below CLOUD_CHROMA (0..255 scale).
# Calibrated with calibrate_cloud on 4000 real SynthRS training images (64 px): Spearman 0.97 with the cover.
CLOUD_BRIGHTNESS = 228.0
CLOUD_CHROMA = 30.0
# brightness thresholds of the adherence diagnostic (cloud_spearman_by_brightness), around the calibrated one
CLOUD_BRIGHTNESS_SWEEP = (150, 170, 190, 210, 228, 240)


def _uint8_scale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] or uint8 -> float 0..255."""
    if images.dtype == torch.uint8:
        return images.float()
    return (images.float().clamp(-1, 1) + 1.0) * 127.5


def spearman(x: Sequence[float] | torch.Tensor | np.ndarray, y: Sequence[float] | torch.Tensor | np.ndarray) -> float:
    """Spearman rank correlation (scipy's; ties get average ranks) over the pairs where both are finite; NaN when
    either side is constant or shorter than 2."""
    from scipy.stats import spearmanr

    a = np.asarray(torch.as_tensor(x).double().cpu() if isinstance(x, torch.Tensor) else x, dtype=float).reshape(-1)
    b = np.asarray(torch.as_tensor(y).double().cpu() if isinstance(y, torch.Tensor) else y, dtype=float).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"spearman needs two sequences of the same length, got {a.size} and {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


# ---------------------------------------------------------------------------
# Cloud cover


def cloud_mask(images: torch.Tensor, brightness: float = CLOUD_BRIGHTNESS, chroma: float = CLOUD_CHROMA) -> torch.Tensor:
    """Cloud-like pixels (B, H, W) bool of images in [-1, 1] (B, 3, H, W): bright in every channel, colourless."""
    x = _uint8_scale(images)
    lo, hi = x.min(1).values, x.max(1).values  # (B, H, W)
    return (lo > brightness) & (hi - lo < chroma)


def cloud_fraction(images: torch.Tensor, brightness: float = CLOUD_BRIGHTNESS, chroma: float = CLOUD_CHROMA
                   ) -> torch.Tensor:
    """Estimated cloud-covered share (B,) in [0, 1] of images in [-1, 1] (B, 3, H, W)."""
    return cloud_mask(images, brightness, chroma).float().mean((1, 2))


def calibrate_cloud(images: torch.Tensor, cloud_cover: Sequence[float] | torch.Tensor,
                    brightness: Sequence[float] = (200, 210, 220, 228, 236),
                    chroma: Sequence[float] = (12, 20, 30, 45)) -> dict[str, float]:
    """Grid-search the cloud thresholds on real images with known ``cloud_cover`` (percent, 0..100).

    Picks the pair with the highest Spearman correlation (ties: lower mean absolute error of the fraction);
    returns ``{"brightness", "chroma", "spearman", "mae"}``.
    """
    cover = torch.as_tensor(cloud_cover, dtype=torch.float32) / 100.0
    x = _uint8_scale(images)
    lo, hi = x.min(1).values, x.max(1).values
    best: tuple[float, float, float, float] | None = None
    for b in brightness:
        for c in chroma:
            f = ((lo > b) & (hi - lo < c)).float().mean((1, 2))
            rho, mae = spearman(f, cover), float((f - cover).abs().mean())
            key = (round(rho, 3), -mae)
            if best is None or key > (round(best[2], 3), -best[3]):
                best = (float(b), float(c), rho, mae)
    assert best is not None
    return {"brightness": best[0], "chroma": best[1], "spearman": best[2], "mae": best[3]}


def cloud_spearman_by_brightness(images: torch.Tensor, cloud_cover: Sequence[float] | torch.Tensor,
                                 brightness: Sequence[float] = CLOUD_BRIGHTNESS_SWEEP,
                                 chroma: float = CLOUD_CHROMA) -> list[float]:
    """Spearman of :func:`cloud_fraction` with ``cloud_cover`` at each brightness threshold (chroma fixed).

    A diagnostic for the adherence score: real SynthRS clouds are near white, so the calibrated threshold
    (CLOUD_BRIGHTNESS) is high; a generator whose clouds come out grey keeps a high Spearman only at lower
    thresholds, where real images show how much bright ground (snow, sand, concrete) starts to count as cloud.
    """
    return [spearman(cloud_cover, cloud_fraction(images, float(b), chroma)) for b in brightness]


# ---------------------------------------------------------------------------
# Season


VEGETATION = (_C["forest"], _C["agriculture"])


def vegetation_mask(classes: torch.Tensor) -> torch.Tensor:
    """Pixels of the LoveDA vegetation classes (forest, agriculture) in a class map (B, H, W)."""
    return (classes == VEGETATION[0]) | (classes == VEGETATION[1])


def season_greenness(images: torch.Tensor, mask: torch.Tensor | None = None, min_pixels: int = 16) -> torch.Tensor:
    """Mean excess green ``(2G - R - B) / (R + G + B)`` (B,) over vegetation pixels of images in [-1, 1].

    ``mask`` (B, H, W) marks the vegetation pixels: the requested segmentation map's forest/agriculture
    classes or the segmenter's (see :func:`vegetation_mask`). Without one, greenish non-cloud pixels are
    used (a weaker proxy: brown winter fields are then missed). Cloud pixels are always left out; images
    with fewer than ``min_pixels`` vegetation pixels get NaN.
    """
    x = _uint8_scale(images)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    exg = (2 * g - r - b) / (r + g + b + 1e-6)  # (B, H, W)
    keep = ~cloud_mask(images)
    if mask is None:
        keep &= (g > b) & (x.max(1).values - x.min(1).values > 12)
    else:
        keep &= torch.as_tensor(mask, dtype=torch.bool, device=keep.device)
    n = keep.sum((1, 2))
    mean = (exg * keep).sum((1, 2)) / n.clamp_min(1)
    return torch.where(n >= min_pixels, mean, torch.full_like(mean, float("nan")))


def expected_greenness(metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """SynthRS's green factor (B,) in [0, 1] for each metadata dict (month, day, latitude; NaN if missing)."""
    out = []
    for m in metadata:
        if any(m.get(k) is None for k in ("month", "day", "latitude")):
            out.append(float("nan"))
        else:
            out.append(season_weights({"month": float(m["month"]), "day": float(m["day"]),
                                "latitude": float(m["latitude"])})[0])
    return torch.tensor(out, dtype=torch.float32)


# ---------------------------------------------------------------------------
# Context coherence


def centre_class(seg: torch.Tensor, box: torch.Tensor, shrink: float = 0.5) -> int:
    """The most frequent class of ``seg`` (H, W) in the central ``shrink`` part of a normalised box (at least
    the centre pixel)."""
    h, w = seg.shape[-2:]
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * shrink / 2, (y2 - y1) * shrink / 2
    c0, c1 = int(np.floor((cx - hw) * w)), int(np.ceil((cx + hw) * w))
    r0, r1 = int(np.floor((cy - hh) * h)), int(np.ceil((cy + hh) * h))
    ci, ri = min(max(int(cx * w), 0), w - 1), min(max(int(cy * h), 0), h - 1)
    c0, c1 = max(0, min(c0, ci)), min(w, max(c1, ci + 1))
    r0, r1 = max(0, min(r0, ri)), min(h, max(r1, ri + 1))
    return int(torch.bincount(seg[r0:r1, c0:c1].reshape(-1).long()).argmax())


def context_hits(seg_pred: torch.Tensor, boxes: Sequence[torch.Tensor] | torch.Tensor,
                 labels: Sequence[torch.Tensor] | torch.Tensor, classes: Sequence[str] = OBJECT_CLASSES,
                 rules: Mapping[str, Sequence[str]] = CONTEXT_RULES) -> dict[str, list[bool]]:
    """Per object class, whether each object's box centre region has an allowed land-cover class."""
    allowed = {c: {_C[n] for n in rules[c]} for c in rules}
    out: dict[str, list[bool]] = {}
    for seg, bxs, lbs in zip(seg_pred, boxes, labels):
        for box, lab in zip(torch.as_tensor(bxs).reshape(-1, 4), torch.as_tensor(lbs).reshape(-1)):
            lab = int(lab)
            if lab < 0 or lab >= len(classes) or classes[lab] not in allowed:
                continue  # padding or a class without a rule
            out.setdefault(classes[lab], []).append(centre_class(seg, box) in allowed[classes[lab]])
    return out


def on_context_fraction(seg_pred: torch.Tensor, boxes: Sequence[torch.Tensor] | torch.Tensor,
                        labels: Sequence[torch.Tensor] | torch.Tensor, classes: Sequence[str] = OBJECT_CLASSES,
                        per_class: bool = False) -> float | dict[str, float]:
    """Context coherence: share of objects whose box centre the segmentation (B, H, W) puts on the land cover
    SynthRS places that class on (:data:`CONTEXT_RULES`). ``boxes`` per image (K, 4) normalised xyxy (or padded
    (B, M, 4) with label -1 as padding). NaN without objects; ``per_class=True`` adds one share per class and
    ``"all"``."""
    hits = context_hits(seg_pred, boxes, labels, classes)
    flat = [h for v in hits.values() for h in v]
    total = float(np.mean(flat)) if flat else float("nan")
    if not per_class:
        return total
    return {"all": total, **{c: float(np.mean(v)) for c, v in hits.items()}}
