"""COCO average precision at one IoU threshold, split into per-image matching and a cheap accumulation.

COCO AP matches every image's detections to its targets once per class (greedy, highest score first), then
pools the matches of all images into one precision-recall curve per class. The matching of an image does not
depend on the other images, so a bootstrap that redraws images only needs to redo the pooling:
:func:`match_images` runs once, :func:`average_precision` once per draw (milliseconds instead of a COCO
evaluation each). Both follow ``pycocotools.COCOeval`` (the backend of torchmetrics' MeanAveragePrecision):

* per image and class, at most ``max_detections`` detections, in score order;
* a detection takes the unmatched non-crowd target of highest IoU >= the threshold, else a crowd target
  (IoU against a crowd box is intersection / detection area), which makes it ignored, neither hit nor miss;
* per class, precision made non-increasing, read at torchmetrics' 101 recall points; classes without a non-crowd
  target are left out of the mean. A test checks equality with torchmetrics on random detections.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# torchmetrics' 101 recall points are float32 (0.6 becomes 0.60000002): a recall of exactly 3/5 misses that point
RECALL_POINTS = torch.linspace(0.0, 1.0, 101).double().numpy()


@dataclass
class ImageMatches:
    """One image's matched detections: ``labels``, ``scores``, ``hit`` (matched a target), ``ignored``
    (matched a crowd target), all (D,); and ``targets`` (C,): non-crowd targets per class."""

    labels: np.ndarray
    scores: np.ndarray
    hit: np.ndarray
    ignored: np.ndarray
    targets: np.ndarray


def _iou(det: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """(D, 4) x (G, 4) xywh boxes -> (D, G) IoU; against a crowd target, intersection / detection area."""
    lt = np.maximum(det[:, None, :2], gt[None, :, :2])
    rb = np.minimum(det[:, None, :2] + det[:, None, 2:], gt[None, :, :2] + gt[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_d = np.prod(det[:, 2:], axis=-1)[:, None]
    area_g = np.prod(gt[:, 2:], axis=-1)[None, :]
    union = np.where(crowd[None, :], area_d, area_d + area_g - inter)
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_image(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, gt_boxes: np.ndarray,
                gt_labels: np.ndarray, gt_crowd: np.ndarray, num_classes: int, iou_threshold: float = 0.5,
                max_detections: int = 100) -> ImageMatches:
    """Greedy COCO matching of one image's detections to its targets, class by class (xywh boxes)."""
    out_l, out_s, out_h, out_i = [], [], [], []
    for c in np.unique(labels):
        d = np.flatnonzero(labels == c)
        d = d[np.argsort(-scores[d], kind="mergesort")][:max_detections]
        g = np.flatnonzero(gt_labels == c)
        g = g[np.argsort(gt_crowd[g], kind="mergesort")]  # non-crowd targets first, as COCOeval orders them
        crowd = gt_crowd[g]
        ious = _iou(boxes[d], gt_boxes[g], crowd) if len(g) else np.zeros((len(d), 0))
        taken = np.zeros(len(g), dtype=bool)
        hit, ignored = np.zeros(len(d), dtype=bool), np.zeros(len(d), dtype=bool)
        for k in range(len(d)):
            best, m = min(iou_threshold, 1 - 1e-10), -1
            for j in range(len(g)):
                if taken[j] and not crowd[j]:
                    continue
                if m > -1 and not crowd[m] and crowd[j]:
                    break  # a non-crowd match beats any crowd one
                if ious[k, j] < best:
                    continue
                best, m = ious[k, j], j
            if m > -1:
                hit[k], ignored[k] = True, bool(crowd[m])
                taken[m] = True
        out_l.append(np.full(len(d), c)), out_s.append(scores[d]), out_h.append(hit), out_i.append(ignored)
    targets = np.bincount(gt_labels[~gt_crowd], minlength=num_classes)[:num_classes]
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return ImageMatches(cat(out_l, np.int64), cat(out_s, np.float64), cat(out_h, bool), cat(out_i, bool), targets)


def match_images(preds: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]],
                 num_classes: int, iou_threshold: float = 0.5) -> list[ImageMatches]:
    """:func:`match_image` for every image: ``preds`` with boxes, scores, labels; ``targets`` with boxes,
    labels and an optional boolean ``iscrowd``; boxes xyxy in one unit (pixels, as COCO scores them)."""
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions but {len(targets)} targets")
    out = []
    for p, t in zip(preds, targets):
        gl = t["labels"].reshape(-1).long().numpy()
        crowd = t.get("iscrowd", torch.zeros(len(gl))).reshape(-1).bool().numpy()
        out.append(match_image(_xywh(p["boxes"]), p["scores"].reshape(-1).double().numpy(),
                               p["labels"].reshape(-1).long().numpy(), _xywh(t["boxes"]), gl, crowd, num_classes,
                               iou_threshold))
    return out


def _xywh(boxes: torch.Tensor) -> np.ndarray:
    """xyxy -> xywh in float32 (as torchmetrics hands boxes to COCOeval, which then works in float64)."""
    b = boxes.reshape(-1, 4).float()
    return torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], 1).double().numpy()


def average_precision(matches: Sequence[ImageMatches], index: Sequence[int] | np.ndarray | None = None) -> float:
    """COCO AP (0-1) of the images ``index`` picks (repeats allowed; default all), -1 when no class has a
    non-crowd target (COCOeval's value for "undefined")."""
    index = np.arange(len(matches)) if index is None else np.asarray(index)
    chosen = [matches[i] for i in index]
    if not chosen:
        return -1.0
    labels = np.concatenate([m.labels for m in chosen])
    scores = np.concatenate([m.scores for m in chosen])
    hit = np.concatenate([m.hit for m in chosen])
    ignored = np.concatenate([m.ignored for m in chosen])
    n_targets = np.sum([m.targets for m in chosen], axis=0)
    aps = []
    for c in np.flatnonzero(n_targets):
        d = np.flatnonzero(labels == c)
        d = d[np.argsort(-scores[d], kind="mergesort")]
        keep = ~ignored[d]
        tp = np.cumsum(hit[d] & keep).astype(float)
        fp = np.cumsum(~hit[d] & keep).astype(float)
        recall = tp / n_targets[c]
        precision = tp / (tp + fp + np.spacing(1))
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # the best precision at this recall or above
        at = np.searchsorted(recall, RECALL_POINTS, side="left")
        q = np.zeros(len(RECALL_POINTS))
        ok = at < len(precision)
        q[ok] = precision[at[ok]]
        aps.append(q.mean())
    return float(np.mean(aps)) if aps else -1.0
