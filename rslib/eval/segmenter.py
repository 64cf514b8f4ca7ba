"""Condition fidelity: the segmenter's predictions and the measures they serve (mIoU, road IoU, edge F1).

CRS-Diff is asked to draw an image that follows a segmentation map, a road mask or an edge map. Whether it
did is measured the way the papers' downstream checks do it: a segmenter trained on *real* images labels
the *generated* ones, and its prediction is scored against the map the image was generated from
(mIoU over the 7 LoveDA classes, IoU of the road class). The same segmenter on real held-out images gives
the ceiling a generator can reach. Edge fidelity needs no network: edges found in the generated image by
a Canny detector are matched to the requested edge map with a 1-px tolerance (:func:`edge_f1`).

The segmenter itself is :mod:`rslib.models.segmenter`, trained by :mod:`rslib.train.segmenter`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rslib.data.conditions import LOVEDA_CLASSES, sketch
from rslib.eval.data import EvalSet
from rslib.eval.metrics import confusion_matrix
from rslib.models.segmenter import NUM_CLASSES, ROAD
from rslib.utils import to_uint8


# ---------------------------------------------------------------------------
# Prediction


@torch.no_grad()
def predict_classes(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """LoveDA class per pixel (B, H, W) long, on CPU, of images in [-1, 1] (B, 3, H, W) (uint8 0..255 accepted)."""
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1.0
    model.eval()
    device = next(model.parameters()).device
    out = [model(images[i:i + batch_size].to(device).float()).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, *images.shape[-2:], dtype=torch.long)


# ---------------------------------------------------------------------------
# Measures


def per_class_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """IoU per class (num_classes,) over all pixels of all images; NaN where a class is in neither."""
    pred, target = torch.as_tensor(pred).long().flatten(), torch.as_tensor(target).long().flatten()
    if pred.shape != target.shape:
        raise ValueError(f"prediction and target differ in size: {pred.numel()} vs {target.numel()} pixels")
    return iou_from_confusion(confusion_matrix(pred, target, num_classes))


def iou_from_confusion(cm: torch.Tensor) -> torch.Tensor:
    """IoU per class (C,) of a confusion matrix (C, C) (rows = target, columns = prediction); NaN where a class is
    in neither."""
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))


def mean_iou(iou: torch.Tensor) -> float:
    """The mean of per-class IoUs over the classes present (not NaN); NaN when none is."""
    return float(iou.nanmean()) if bool((~iou.isnan()).any()) else float("nan")


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES) -> float:
    """Mean IoU over the classes present in the prediction or the target (pixels pooled over images)."""
    return mean_iou(per_class_iou(pred, target, num_classes))


def _as_mask(x: torch.Tensor, road_class: int | None) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dtype == torch.bool:
        return x
    if x.is_floating_point():
        return x > 0.5
    return x == road_class if road_class is not None else x > 0


def road_iou(pred_classes_or_mask: torch.Tensor, road_mask: torch.Tensor) -> float:
    """IoU of the road class: prediction = class indices (road = LoveDA 'road') or a bool / [0, 1] mask;
    ``road_mask`` = bool, [0, 1] float (> 0.5) or integer (> 0). Pixels pooled; NaN if neither has road."""
    pred = _as_mask(pred_classes_or_mask, ROAD)
    road = _as_mask(road_mask, None)
    if pred.shape != road.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and road mask {tuple(road.shape)} differ in shape")
    union = int((pred | road).sum())
    return float((pred & road).sum()) / union if union else float("nan")


def detect_edges(images: torch.Tensor) -> torch.Tensor:
    """Thin binary edges (B, H, W) bool of images in [-1, 1] (B, 3, H, W): Canny with automatic thresholds."""
    return torch.from_numpy(np.stack([sketch(im) > 0 for im in to_uint8(images).permute(0, 2, 3, 1).numpy()]))


def binarise_edges(edge_map: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """A soft edge or line map (B, H, W), (B, 1|3, H, W) in [0, 1] -> thin binary edges (B, H, W) bool."""
    from skimage.morphology import thin

    m = torch.as_tensor(edge_map)
    if m.ndim == 4:
        m = m[:, 0]
    m = m.float() / 255.0 if m.dtype == torch.uint8 else m.float()
    binary = (m > threshold).cpu().numpy()
    return torch.from_numpy(np.stack([thin(b) for b in binary]))


def edge_scores(images: torch.Tensor, reference_edge_map: torch.Tensor, tolerance: int = 1,
                threshold: float = 0.5) -> dict[str, float]:
    """Precision, recall and F1 of the edges detected in ``images`` against the binarised, thinned reference;
    an edge pixel counts as matched when one of the other set lies within ``tolerance`` pixels (Chebyshev)."""
    pred = detect_edges(images).float()[:, None]  # (B, 1, H, W)
    ref = binarise_edges(reference_edge_map, threshold).float()[:, None]
    if pred.shape != ref.shape:
        raise ValueError(f"images give edges of shape {tuple(pred.shape)}, the reference {tuple(ref.shape)}")
    k = 2 * int(tolerance) + 1
    grow = lambda m: F.max_pool2d(m, k, 1, int(tolerance)) if tolerance > 0 else m  # noqa: E731
    n_pred, n_ref = float(pred.sum()), float(ref.sum())
    precision = float((pred * grow(ref)).sum()) / n_pred if n_pred else float("nan")
    recall = float((ref * grow(pred)).sum()) / n_ref if n_ref else float("nan")
    if n_pred == 0 and n_ref == 0:
        f1 = float("nan")
    elif n_pred == 0 or n_ref == 0 or precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


def edge_f1(images: torch.Tensor, reference_edge_map: torch.Tensor, tolerance: int = 1,
            threshold: float = 0.5) -> float:
    """F1 of Canny edges of ``images`` (B, 3, H, W) in [-1, 1] against the reference soft-edge / line map
    (B, H, W) in [0, 1], binarised at ``threshold`` and thinned, with a ``tolerance``-pixel match radius."""
    return edge_scores(images, reference_edge_map, tolerance, threshold)["f1"]


def segmentation_scores(model: nn.Module, data: EvalSet, images: torch.Tensor | None = None) -> dict[str, Any]:
    """mIoU, per-class IoU and road IoU of the segmenter on ``images`` (default: the set's own) against the
    set's segmentation maps (and road masks, when loaded)."""
    pred = predict_classes(model, data.pixel_values() if images is None else images)
    target = data.maps["segmentation"]
    iou = per_class_iou(pred, target)
    out: dict[str, Any] = {"miou": miou(pred, target), "pixel_accuracy": float((pred == target).float().mean()),
                           "iou_per_class": {c: float(v) for c, v in zip(LOVEDA_CLASSES, iou)}}
    out["road_iou"] = road_iou(pred, data.maps["road"] if "road" in data.maps else target == ROAD)
    return out
