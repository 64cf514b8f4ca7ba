"""The bootstrap's fast COCO AP50 (per-image matching + pooling) equals torchmetrics' MeanAveragePrecision."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision

from rslib.eval.coco_ap import average_precision, match_images


def _random_images(seed: int, n: int = 24, classes: int = 4) -> tuple[list[dict], list[dict]]:
    """Targets (some crowd) and detections near them or anywhere, with duplicates, misses and wrong classes."""
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(n):
        k = int(torch.randint(0, 6, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * 50
        gt = torch.cat([xy, xy + 2 + torch.rand(k, 2, generator=g) * 12], 1)
        labels = torch.randint(0, classes, (k,), generator=g)
        crowd = torch.rand(k, generator=g) < 0.2
        near = gt[torch.randint(0, max(k, 1), (2 * k,), generator=g)] if k else torch.zeros(0, 4)
        near = near + torch.randn(near.shape, generator=g) * 1.5
        m = int(torch.randint(0, 4, (1,), generator=g))
        xy = torch.rand(m, 2, generator=g) * 50
        anywhere = torch.cat([xy, xy + 2 + torch.rand(m, 2, generator=g) * 12], 1)
        boxes = torch.cat([near, anywhere])
        boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 0.5)], 1)
        det_labels = torch.cat([labels[torch.randint(0, max(k, 1), (2 * k,), generator=g)] if k else
                                torch.zeros(0, dtype=torch.long), torch.randint(0, classes, (m,), generator=g)])
        flip = torch.rand(len(det_labels), generator=g) < 0.15
        det_labels = torch.where(flip, torch.randint(0, classes, det_labels.shape, generator=g), det_labels)
        preds.append({"boxes": boxes, "scores": torch.rand(len(boxes), generator=g), "labels": det_labels})
        targets.append({"boxes": gt, "labels": labels, "iscrowd": crowd.long()})
    return preds, targets


def _torchmetrics_ap50(preds: list[dict], targets: list[dict]) -> float:
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5])
    metric.update(preds, targets)
    return float(metric.compute()["map"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap50_equals_torchmetrics_on_all_images_and_on_redrawn_ones(seed):
    preds, targets = _random_images(seed)
    matches = match_images(preds, targets, num_classes=4)
    assert average_precision(matches) == pytest.approx(_torchmetrics_ap50(preds, targets), abs=1e-6)
    idx = np.random.default_rng(seed).integers(0, len(preds), len(preds))  # a bootstrap draw, repeats included
    expected = _torchmetrics_ap50([preds[i] for i in idx], [targets[i] for i in idx])
    assert average_precision(matches, idx) == pytest.approx(expected, abs=1e-6)


def test_ap50_known_answers():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    one = {"labels": torch.tensor([0])}
    target = {"boxes": box, **one}
    hit = {"boxes": box, "scores": torch.tensor([0.9]), **one}
    miss = {"boxes": box + 30, "scores": torch.tensor([0.9]), **one}
    assert average_precision(match_images([hit], [target], 1)) == pytest.approx(1.0)
    assert average_precision(match_images([miss], [target], 1)) == 0.0
    # a detection on a crowd box is neither a hit nor a false positive; a crowd-only image has no AP at all
    crowd = {"boxes": box + 30, "labels": torch.tensor([0]), "iscrowd": torch.tensor([1])}
    two = {"boxes": torch.cat([box, box + 30]), "labels": torch.tensor([0, 0]), "iscrowd": torch.tensor([0, 1])}
    both = {"boxes": torch.cat([box + 30, box]), "scores": torch.tensor([0.9, 0.5]), "labels": torch.tensor([0, 0])}
    assert average_precision(match_images([both], [two], 1)) == pytest.approx(1.0)
    assert average_precision(match_images([miss], [crowd], 1)) == -1.0
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        match_images([hit, hit], [target], 1)
