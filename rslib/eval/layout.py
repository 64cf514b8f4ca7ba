"""How well CC-Diff follows a layout, and whether its objects sit in a fitting context (notebook 04, table (c)).

Held-out SynthRS layouts (the test split's objects, as labelled oriented boxes, with the captions) are turned
into images, which are scored against the layouts they came from:

* **YOLOScore**: a detector trained on real images (:mod:`rslib.eval.detector`) runs on the generated images;
  torchmetrics mAP50 and mAP50-95 against the input boxes (CC-Diff §4, after GLIGEN/LayoutDiffusion);
* **CLIPScore** global (image vs caption) and local (each box crop vs "an aerial image of a {class}."), with
  RS-CLIP, on torchmetrics' scale (100 x cosine, at least 0);
* **FID** with RS-CLIP image features against the real test images;
* **context coherence** (SynthRS only): the share of objects whose box centre the segmenter puts on the land
  cover the class belongs on (ships on water, vehicles on roads or urban ground, airplanes on airport ground...).

On a few dozen layouts two variants' scores can differ by chance: :func:`paired_bootstrap` redraws the layouts
(the same draw for both variants) and gives an interval for the difference. Redraws need only each variant's
:class:`LayoutStats` (its detections matched per image, its objects on fitting land cover per image), which
:func:`evaluate_variants` keeps from its one detection and segmentation of each variant's images.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rslib.eval import metrics
from rslib.eval.data import EvalSet
from rslib.eval.coco_ap import average_precision, match_images
from rslib.eval.control import AUTOENCODER_ROW
from rslib.eval.detector import coco_inputs, detect, score_detections
from rslib.eval.fidelity import context_hits, on_context_fraction
from rslib.eval.instruments import CCDiffInstruments, yolo_score
from rslib.eval.segmenter import predict_classes
from rslib.models.text import encode_images, encode_text
from rslib.pipelines.cc_diff import sample_cc_diff
from rslib.train.autoencoder import reconstruct


def polygon_area(points: Sequence[float]) -> float:
    """Area of a polygon given as x1, y1, x2, y2, ... (shoelace formula)."""
    xs, ys = points[0::2], points[1::2]
    return 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))


def layouts_of(data: EvalSet, n: int, max_objects: int | None = None) -> list[list[dict[str, Any]]]:
    """The first n records' objects as pipeline layouts ``[{"label", "obb", "bbox"}]`` (largest first, at most
    max_objects). Objects with an empty box are left out; an oriented box of zero area (a sliver clipped at the
    image border) is replaced by its axis-aligned box."""
    out = []
    for rec in data.records[:n]:
        objs = [o for o in rec.objects if o.label in data.classes and o.bbox[2] > o.bbox[0] and o.bbox[3] > o.bbox[1]]
        objs.sort(key=lambda o: -(o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1]))
        lay = []
        for o in objs[:max_objects]:
            x0, y0, x1, y1 = o.bbox
            obb = list(o.obb) if polygon_area(list(o.obb)) > 0 else [x0, y0, x1, y0, x1, y1, x0, y1]
            lay.append({"label": o.label, "obb": obb, "bbox": list(o.bbox)})
        out.append(lay)
    return out


def targets_of(layouts: Sequence[Sequence[dict[str, Any]]], classes: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    """Layouts as detection targets: normalised xyxy boxes and class indices per image."""
    index = {c: i for i, c in enumerate(classes)}
    return [{"boxes": torch.tensor([o["bbox"] for o in lay], dtype=torch.float32).reshape(-1, 4),
             "labels": torch.tensor([index[o["label"]] for o in lay], dtype=torch.long)} for lay in layouts]


def box_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, min_px: float = 8.0) -> torch.Tensor:
    """Crops (K, 3, size, size) of the normalised xyxy boxes (K, 4) of one image (3, S, S), each widened to at
    least ``min_px`` pixels around its centre so that the smallest objects keep some context."""
    s = images.shape[-1]
    out = []
    for x1, y1, x2, y2 in (boxes * s).tolist():
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        w, h = max(x2 - x1, min_px), max(y2 - y1, min_px)
        c0, c1 = int(max(0, cx - w / 2)), int(min(s, cx + w / 2 + 0.999))
        r0, r1 = int(max(0, cy - h / 2)), int(min(s, cy + h / 2 + 0.999))
        crop = images[:, r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)]
        out.append(torch.nn.functional.interpolate(crop[None], size=(size, size), mode="bilinear",
                                                    align_corners=False)[0])
    return torch.stack(out) if out else torch.zeros(0, 3, size, size)


def local_clip_score(clip: Any, tokenizer: Any, images: torch.Tensor,
                     layouts: Sequence[Sequence[dict[str, Any]]]) -> float:
    """Mean over boxes of 100 x max(cos(crop, "an aerial image of a {class}."), 0) (CC-Diff's local CLIPScore)."""
    size = clip.config.vision_config.image_size
    crops, texts = [], []
    for img, lay in zip(images, layouts):
        if lay:
            crops.append(box_crops(img, torch.tensor([o["bbox"] for o in lay]), size))
            texts += [f"an aerial image of a {o['label']}." for o in lay]
    if not texts:
        return float("nan")
    cos = (encode_images(clip, torch.cat(crops)) * encode_text(clip, tokenizer, texts)).sum(-1)
    return float((100 * cos).clamp_min(0).mean())


@dataclass
class LayoutStats:
    """What a redraw of the layouts needs of one variant's images: its detections matched per image (mAP50) and,
    per image, (objects on fitting land cover, objects) (context coherence)."""
    matches: Any
    hits: np.ndarray

    def redrawn(self, idx: np.ndarray) -> dict[str, float]:
        """mAP50 (%) and context coherence of the images ``idx`` (a draw of layout indices)."""
        return {"map50": 100 * max(average_precision(self.matches, idx), 0.0),
                "context": float(self.hits[idx, 0].sum() / max(self.hits[idx, 1].sum(), 1.0))}

    def __len__(self) -> int:
        return len(self.hits)


def layout_scores(images: torch.Tensor, real: torch.Tensor, prompts: Sequence[str],
                  layouts: Sequence[Sequence[dict[str, Any]]], classes: Sequence[str], clip: Any, tokenizer: Any,
                  detector: torch.nn.Module, segmenter: torch.nn.Module, ci_seed: int | None = None) -> dict[str, Any]:
    """YOLOScore (mAP50, mAP50-95, in %), each class's AP50 (``map50_per_class``, in %; mAP50 is their mean),
    CLIPScore global and local, RS-CLIP FID and context coherence of images; with ``ci_seed``, also their
    bootstrap 95% intervals over the layouts (``ci``, :func:`layout_intervals`), from the same detections and land
    cover."""
    return _scores_and_stats(images, real, prompts, layouts, classes, clip, tokenizer, detector, segmenter,
                             ci_seed)[0]


def _scores_and_stats(images: torch.Tensor, real: torch.Tensor, prompts: Sequence[str],
                      layouts: Sequence[Sequence[dict[str, Any]]], classes: Sequence[str], clip: Any, tokenizer: Any,
                      detector: torch.nn.Module, segmenter: torch.nn.Module,
                      ci_seed: int | None) -> tuple[dict[str, Any], LayoutStats]:
    """:func:`layout_scores` and the :class:`LayoutStats` of the same detections and land cover."""
    targets = targets_of(layouts, classes)
    preds, seg = detect(detector, images), predict_classes(segmenter, images)
    size, min_box = int(images.shape[-1]), float(getattr(detector, "min_box_px", 0.0))
    det = score_detections(preds, targets, size, min_box, getattr(detector, "classes", None))
    out: dict[str, Any] = {
        "map50": 100 * det["map50"], "map50_95": 100 * det["map"],
        "clip_global": metrics.clip_score(clip, tokenizer, images, prompts),
        "clip_local": local_clip_score(clip, tokenizer, images, layouts),
        "fid_rsclip": metrics.rs_clip_fid(clip, real, images),
        "context": on_context_fraction(seg, [t["boxes"] for t in targets], [t["labels"] for t in targets], classes),
        "map50_per_class": {c: 100 * v for c, v in det["map50_per_class"].items()}}
    stats = _per_image_stats(preds, seg, targets, classes, size, min_box)
    if ci_seed is not None:
        out["ci"] = _intervals(stats, seed=ci_seed)
    return out, stats


def paper_layout_scores(instruments: CCDiffInstruments, images: torch.Tensor, real: torch.Tensor | None,
                        prompts: Sequence[str], layouts: Sequence[Sequence[dict[str, Any]]]) -> dict[str, float]:
    """The papers' measures of images by the instruments a preset names (none: {}): open_clip CLIPScore global
    and local (``clip_global_openclip``, ``clip_local_openclip``), YOLOv8's ``map50_yolo`` and ``map50_95_yolo``
    (in %, as ``map50``), and Inception FID against ``real`` (``fid_inception``; 0 when ``real`` is None:
    the real images themselves)."""
    out: dict[str, float] = {}
    if instruments.clip is not None:
        out["clip_global_openclip"] = instruments.clip.global_score(images, prompts)
        out["clip_local_openclip"] = instruments.clip.local_score(images, layouts)
    if instruments.yolo is not None:
        scores = yolo_score(instruments.yolo, images, targets_of(layouts, instruments.yolo.classes))
        out["map50_yolo"], out["map50_95_yolo"] = 100 * scores["map50"], 100 * scores["map"]
    if instruments.inception_weights is not None:
        out["fid_inception"] = 0.0 if real is None else metrics.inception_scores(
            real, images, instruments.inception_weights)["fid_inception"]
    return out


def evaluate_variants(pipes: dict[str, Any], data: EvalSet, clip: Any, tokenizer: Any, detector: torch.nn.Module,
                      segmenter: torch.nn.Module, n: int, seed: int, max_objects: int | None = None,
                      instruments: CCDiffInstruments | None = None, autoencoder_row: bool = True,
                      **kw: Any) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], dict[str, LayoutStats]]:
    """One row of :func:`layout_scores` per pipeline, after the real images' row and (when the pipelines have a
    VAE and ``autoencoder_row``) the row of the real images passed through it, the ceiling of any model that draws
    in its latent space; each with the papers' measures of ``instruments``
    (:func:`rslib.eval.instruments.cc_diff_instruments`) beside them and the bootstrap 95% intervals of mAP50 and
    context coherence (``ci``, :func:`layout_intervals`); returns (rows, images, stats): each pipeline's images
    and :class:`LayoutStats` (for :func:`paired_bootstrap`) by its name."""
    instruments = instruments or CCDiffInstruments()
    layouts = layouts_of(data, n, max_objects)
    prompts = [r.captions[0] if r.captions else "" for r in data.records[:n]]
    real = data.pixel_values(slice(0, n))

    def row(method: str, images: torch.Tensor, against: torch.Tensor | None) -> tuple[dict[str, Any], LayoutStats]:
        """A row of measures of images (the papers' FID ``against`` real images; None: the real images)."""
        scores, stats = _scores_and_stats(images, real, prompts, layouts, data.classes, clip, tokenizer, detector,
                                          segmenter, ci_seed=seed)
        return {"method": method, **scores, **paper_layout_scores(instruments, images, against, prompts,
                                                                   layouts)}, stats

    rows = [row("real test images", real, None)[0]]
    rows[0]["fid_rsclip"] = 0.0
    vae = next((p.vae for p in pipes.values() if getattr(p, "vae", None) is not None), None)
    if autoencoder_row and vae is not None:
        rows.append(row(AUTOENCODER_ROW, reconstruct(vae, real.to(next(vae.parameters()).device)).cpu(), real)[0])
    images, stats = {}, {}
    for name, pipe in pipes.items():
        t0 = time.perf_counter()
        images[name] = sample_cc_diff(pipe, prompts, layouts, seed, **kw)
        scores, stats[name] = row(name, images[name], real)
        rows.append({**scores, "seconds": round(time.perf_counter() - t0, 1)})
    return rows, images, stats


def _per_image_stats(preds: Sequence[dict[str, torch.Tensor]], seg: torch.Tensor,
                     targets: Sequence[dict[str, torch.Tensor]], classes: Sequence[str], size: int,
                     min_box: float) -> LayoutStats:
    """The :class:`LayoutStats` of one variant's detections (normalised boxes) and predicted land cover."""
    p_list, t_list = coco_inputs(preds, targets, size, min_box)
    per = [[h for v in context_hits(seg[i:i + 1], [t["boxes"]], [t["labels"]], classes).values() for h in v]
           for i, t in enumerate(targets)]
    return LayoutStats(match_images(p_list, t_list, len(classes)),
                       np.array([[sum(h), len(h)] for h in per], dtype=float))


def layout_stats(images: torch.Tensor, layouts: Sequence[Sequence[dict[str, Any]]], classes: Sequence[str],
                 detector: torch.nn.Module, segmenter: torch.nn.Module) -> LayoutStats:
    """The :class:`LayoutStats` of images of the layouts (one image per layout), through the detector and the
    segmenter."""
    if len(images) != len(layouts):
        raise ValueError(f"need one image per layout, got {len(images)} images for {len(layouts)} layouts")
    return _per_image_stats(detect(detector, images), predict_classes(segmenter, images),
                            targets_of(layouts, classes), classes, int(images.shape[-1]),
                            float(getattr(detector, "min_box_px", 0.0)))


def _intervals(stats: LayoutStats, **kwargs: Any) -> dict[str, list[float]]:
    """Bootstrap 95% intervals of mAP50 (%) and context coherence over the layouts."""
    return {k: metrics.bootstrap_interval(lambda idx, k=k: stats.redrawn(idx)[k], len(stats), **kwargs)
            for k in ("map50", "context")}


def layout_intervals(images: torch.Tensor, layouts: Sequence[Sequence[dict[str, Any]]], classes: Sequence[str],
                     detector: torch.nn.Module, segmenter: torch.nn.Module, n_boot: int = 1000,
                     seed: int = 0) -> dict[str, list[float]]:
    """Bootstrap 95% intervals over the layouts of one variant's mAP50 (%) and context coherence:
    ``{"map50": [low, high], "context": [low, high]}``."""
    return _intervals(layout_stats(images, layouts, classes, detector, segmenter), resamples=n_boot, seed=seed)


def paired_bootstrap(a: LayoutStats, b: LayoutStats, n_boot: int = 1000,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """How sure a difference between two variants is, from their images of the *same* layouts (their
    :class:`LayoutStats`: :func:`evaluate_variants` returns them, :func:`layout_stats` makes them of images).

    The layouts are drawn with replacement ``n_boot`` times and both variants are scored on each draw. Returns,
    for ``map50`` (YOLOScore, %) and ``context`` (share of objects on fitting land cover): the difference a - b
    on all layouts, the 2.5 and 97.5 percentiles of the redrawn differences, and the share of draws a wins.
    """
    if len(a) != len(b):
        raise ValueError(f"need one image of each variant per layout, got the statistics of {len(a)} and "
                         f"{len(b)} images")

    def difference(idx: np.ndarray) -> dict[str, float]:
        ra, rb = a.redrawn(idx), b.redrawn(idx)
        return {k: ra[k] - rb[k] for k in ra}

    n = len(a)
    rng = np.random.default_rng(seed)
    draws = [difference(rng.integers(0, n, n)) for _ in range(n_boot)]
    observed = difference(np.arange(n))
    out = {}
    for k in ("map50", "context"):
        d = np.array([x[k] for x in draws])
        out[k] = {"difference": float(observed[k]), "low": float(np.percentile(d, 2.5)),
                  "high": float(np.percentile(d, 97.5)), "a_wins": float((d > 0).mean())}
    return out
