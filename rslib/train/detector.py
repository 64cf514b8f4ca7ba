"""Training the object detector (:mod:`rslib.models.detector`) on real images, plus generated ones for the
trainability experiment.

Boxes under ``det.min_box_px`` pixels are dropped from training (and scored as ignore regions,
:mod:`rslib.eval.detector`). Each image is flipped/rotated at random (:mod:`rslib.train.augment`); the shared loop
(:mod:`rslib.train.loop`) trains, and the folder follows the stage protocol (:mod:`rslib.train.stage`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from rslib.config import Preset, resolve_path
from rslib.eval.data import preset_split
from rslib.eval.detector import box_sizes, detection_map
from rslib.models.detector import CONFIG_FILE, WEIGHTS_FILE, Target, build_detector
from rslib.train.augment import dihedral, dihedral_boxes
from rslib.train.loop import train_loop
from rslib.train.stage import (begin, finish, is_finished, seed_initial_weights, stage_stamp, stage_train_config,
                               training_info)
from rslib.utils import to_uint8


def _clean(boxes: torch.Tensor, labels: torch.Tensor, image_size: int, min_box_px: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop boxes under ``min_box_px`` and degenerate ones; clamp to the image."""
    boxes = boxes.reshape(-1, 4).float().clamp(0, 1)
    keep = (box_sizes(boxes, image_size) >= max(min_box_px, 1e-6)) & (boxes[:, 2:] > boxes[:, :2]).all(1)
    return boxes[keep], labels.reshape(-1).long()[keep]


class _Detections(torch.utils.data.Dataset):
    """(image uint8 (3, S, S), boxes (K, 4) normalised, labels (K,)) held in memory."""

    def __init__(self, images: torch.Tensor, boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]):
        self.images, self.boxes, self.labels = images, list(boxes), list(labels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "boxes": self.boxes[i], "labels": self.labels[i]}


def collate_detections(items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Stack the images; keep the per-image boxes and labels as lists."""
    return {"images": torch.stack([it["image"] for it in items]), "boxes": [it["boxes"] for it in items],
            "labels": [it["labels"] for it in items]}


def detection_loss(model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The detector's losses (FCOS: focal classification + GIoU regression + centre-ness; Faster R-CNN: the RPN's
    and the box head's) under a random flip/rotation per image."""
    images = batch["images"].float() / 255.0  # (B, 3, S, S) in [0, 1], as torchvision detectors take them
    s = images.shape[-1]
    ks = torch.randint(8, (images.shape[0],), generator=generator, device=generator.device).tolist()
    ims, targets = [], []
    for im, boxes, labels, k in zip(images, batch["boxes"], batch["labels"], ks):
        ims.append(dihedral(im, k))
        targets.append({"boxes": dihedral_boxes(boxes.float(), k) * s, "labels": labels})
    losses = model(ims, targets)
    out = {"loss": sum(losses.values())}
    out.update({k.replace("bbox_", ""): v.detach() for k, v in losses.items()})
    return out


def _extra_digest(extra: tuple[torch.Tensor, Sequence[Target]] | None) -> str | None:
    """A short hash of the generated training set (so a finished run is reused only for the same one)."""
    if extra is None:
        return None
    h = hashlib.sha1()
    h.update(to_uint8(extra[0]).numpy().tobytes())
    for t in extra[1]:
        h.update(t["boxes"].float().numpy().tobytes())
        h.update(t["labels"].long().numpy().tobytes())
    return h.hexdigest()[:16]


def train_detector(cfg: Preset, out_dir: str | os.PathLike | None = None,
                   extra: tuple[torch.Tensor, Sequence[Target]] | None = None, force: bool = False,
                   progress: bool = True, real_limit: int | None = None) -> Path:
    """Train the detector on the real training split (plus ``extra`` generated images) and save it.

    ``extra`` = (images (N, 3, S, S) in [-1, 1] or uint8, targets: per image ``{"boxes": (K, 4) normalised xyxy,
    "labels": (K,)}``), added to the real images for the trainability experiment; the number of steps stays
    ``det.steps``. The default folder is ``runs/<preset>/detector`` (``detector_extra`` with ``extra``); it
    holds ``model.safetensors`` and ``detector.json`` with the mAP on the real test split. A folder finished
    with the same settings (and the same extra set) is reused unless ``force``.
    """
    default = "detector" if extra is None else "detector_extra"
    out_dir = resolve_path(out_dir) if out_dir is not None else cfg.data_run_dir(default)
    stamp = {**stage_stamp(cfg, "det"), "extra": _extra_digest(extra), "real_limit": real_limit}
    if not force and is_finished(out_dir, stamp):
        return out_dir
    work = begin(out_dir, stamp, force)
    t0 = time.perf_counter()
    d, size = cfg.det, cfg.data.image_size
    train = preset_split(cfg, "train", maps=())
    images, boxes, labels = train.images, list(train.boxes), list(train.labels)
    if real_limit is not None:  # the low-data regime of the trainability experiment: the first real_limit images
        images, boxes, labels = images[:real_limit], boxes[:real_limit], labels[:real_limit]
    if extra is not None:
        ex_images, ex_targets = to_uint8(extra[0]), list(extra[1])
        if len(ex_images) != len(ex_targets):
            raise ValueError(f"extra holds {len(ex_images)} images but {len(ex_targets)} targets")
        if ex_images.shape[1:] != images.shape[1:]:
            ex_images = nn.functional.interpolate(ex_images.float(), size=images.shape[-2:], mode="bilinear",
                                                  antialias=True).round().clamp(0, 255).to(torch.uint8)
        images = torch.cat([images, ex_images])
        boxes += [t["boxes"] for t in ex_targets]
        labels += [t["labels"] for t in ex_targets]
    cleaned = [_clean(b, lab, size, d.min_box_px) for b, lab in zip(boxes, labels)]
    dataset = _Detections(images, [c[0] for c in cleaned], [c[1] for c in cleaned])
    seed_initial_weights(cfg)
    model = build_detector(d, size, len(train.classes))
    tcfg = stage_train_config(cfg, steps=d.steps, batch_size=d.batch_size, lr=d.lr, weight_decay=d.weight_decay,
                              warmup_steps=min(d.warmup_steps, d.steps // 5), max_grad_norm=5.0,
                              checkpoint_every=max(0, d.steps // 2), log_every=10, num_workers=0)
    result = train_loop(model, detection_loss, dataset, tcfg, work, collate_fn=collate_detections,
                        progress=progress)
    model.to("cpu").eval()
    test = preset_split(cfg, "test", maps=())
    scores = detection_map(model, test.images, test.targets(), min_box_px=d.min_box_px, classes=test.classes)
    info = {"det": json.loads(json.dumps(asdict(d))), "image_size": size, "classes": list(train.classes),
            "test": scores}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(info, indent=1))
    finish(out_dir, stamp, result, t0, images=len(dataset), extra_images=0 if extra is None else len(extra[1]),
           test=scores)
    return out_dir


def detector_info(path: str | os.PathLike) -> dict[str, Any]:
    """What a trained detector folder records: config, test mAP, training time and loss history."""
    path = resolve_path(path)
    info = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
    return {**training_info(path), **info}
