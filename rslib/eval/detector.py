"""Scoring detections: CC-Diff's YOLOScore and the trainability experiment's mAP.

CC-Diff scores layout fidelity with *YOLOScore*: a detector trained on real images runs on the generated
ones, and its detections are scored (COCO mAP) against the layouts the images were generated from. Its
*trainability* experiment trains the same detector on real images plus generated ones and scores it on
real held-out images. CC-Diff uses ultralytics YOLOv8 and mmdetection's Faster R-CNN R50-FPN; here one
torchvision detector (:mod:`rslib.models.detector`, trained by :mod:`rslib.train.detector`) plays both roles
(the paper preset's YOLOScore can use YOLOv8 itself: :mod:`rslib.eval.instruments`).

Target boxes smaller than the detector's ``min_box_px`` are *ignore regions*, scored as COCO "crowd" boxes
(a detection on one is neither a hit nor a false positive). Boxes are normalised ``x1, y1, x2, y2`` in [0, 1]
everywhere in this module's API, as in the record format.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rslib.models.detector import Target
from rslib.utils import to_uint8


def box_sizes(boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """sqrt(area) in pixels (K,) of normalised boxes (K, 4) on an image of ``image_size``."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(0) * image_size
    return (wh[:, 0] * wh[:, 1]).sqrt()


@torch.no_grad()
def detect(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    """Detections per image ``{"boxes": (K, 4) normalised xyxy, "scores": (K,), "labels": (K,)}`` on CPU, of
    images in [-1, 1] (B, 3, H, W) (uint8 accepted)."""
    model.eval()
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    x = to_uint8(images)
    h, w = x.shape[-2:]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    out = []
    for i in range(0, len(x), batch_size):
        batch = [im.to(device).float() / 255.0 for im in x[i:i + batch_size]]
        for det in model(batch):
            out.append({"boxes": det["boxes"].float().cpu() / scale, "scores": det["scores"].float().cpu(),
                        "labels": det["labels"].long().cpu()})
    return out


def coco_inputs(preds: Sequence[Target], targets: Sequence[Target], image_size: int = 64,
                min_box_px: float = 0.0) -> tuple[list[Target], list[Target]]:
    """Detections and targets with normalised boxes -> pixel boxes as COCO scores them; targets smaller than
    ``min_box_px`` pixels get ``iscrowd`` 1 (ignore regions)."""
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions but {len(targets)} targets")
    s = float(image_size)
    p_list, t_list = [], []
    for p, t in zip(preds, targets):
        tb, tl = t["boxes"].reshape(-1, 4).float(), t["labels"].reshape(-1).long()
        crowd = box_sizes(tb, image_size) < min_box_px
        t_list.append({"boxes": tb * s, "labels": tl, "iscrowd": crowd.long()})
        p_list.append({"boxes": p["boxes"].reshape(-1, 4).float() * s, "labels": p["labels"].reshape(-1).long(),
                       "scores": p.get("scores", torch.ones(len(p["labels"]))).reshape(-1).float()})
    return p_list, t_list


def score_detections(preds: Sequence[Target], targets: Sequence[Target], image_size: int = 64,
                     min_box_px: float = 0.0, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """COCO mAP (torchmetrics MeanAveragePrecision) of detections against targets, both with normalised boxes.

    Targets smaller than ``min_box_px`` pixels (sqrt of area) are crowd regions: ignored. Returns ``map50``,
    ``map`` (IoU 0.50:0.95), ``map75`` and ``map50_per_class`` (by class name when ``classes`` is given);
    0.0 when there is no target box at all.
    """
    from torchmetrics.detection import MeanAveragePrecision

    p_list, t_list = coco_inputs(preds, targets, image_size, min_box_px)
    if not any(len(t["labels"]) and not bool(t["iscrowd"].all()) for t in t_list):
        return {"map50": 0.0, "map": 0.0, "map75": 0.0, "map50_per_class": {}}
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=None, class_metrics=True)
    metric.update(p_list, t_list)
    r = metric.compute()
    per_class = {}
    # the 0.50 AP per class: recompute with that single threshold (class_metrics gives 50:95 per class)
    m50 = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5], class_metrics=True)
    m50.update(p_list, t_list)
    r50 = m50.compute()
    for c, v in zip(r50["classes"].reshape(-1).tolist(), r50["map_per_class"].reshape(-1).tolist()):
        if v >= 0:  # -1: the class has no (non-crowd) target box
            per_class[classes[c] if classes is not None and 0 <= c < len(classes) else str(c)] = float(v)
    clip = lambda v: max(float(v), 0.0)  # noqa: E731  (torchmetrics gives -1 where a value is undefined)
    return {"map50": clip(r["map_50"]), "map": clip(r["map"]), "map75": clip(r["map_75"]), "map50_per_class": per_class}


def detection_map(model: nn.Module, images: torch.Tensor, targets: Sequence[Target], min_box_px: float | None = None,
                  classes: Sequence[str] | None = None) -> dict[str, Any]:
    """YOLOScore: run ``model`` on ``images`` and score its detections against ``targets`` (normalised boxes,
    e.g. the layouts the images were generated from): ``{"map50", "map" (50:95), "map75", "map50_per_class"}``.
    ``min_box_px`` defaults to the one the detector was trained with."""
    if min_box_px is None:
        min_box_px = float(getattr(model, "min_box_px", 0.0))
    classes = classes if classes is not None else getattr(model, "classes", None)
    return score_detections(detect(model, images), targets, int(images.shape[-1]), min_box_px, classes)


def targets_from_batch(boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> list[Target]:
    """Padded layouts of :class:`rslib.data.datasets.RSDataset` (B, M, 4), (B, M), (B, M) -> per-image targets."""
    valid = labels >= 0 if valid is None else valid.bool() & (labels >= 0)
    return [{"boxes": b[v].float(), "labels": lab[v].long()} for b, lab, v in zip(boxes, labels, valid)]
