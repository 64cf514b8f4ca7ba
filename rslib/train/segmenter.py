"""Training the segmenter (:mod:`rslib.models.segmenter`) on the preset's real training split.

:func:`train_segmenter` trains it with the shared loop (cross-entropy on random crops under random flips and
rotations) and saves ``runs/<preset>/segmenter/`` (``model.safetensors`` + ``segmenter.json`` with the scores on
the real test split, beside the training record of :mod:`rslib.train.stage`); a finished folder is reused.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from rslib.config import Preset, resolve_path
from rslib.data.conditions import LOVEDA_CLASSES
from rslib.eval.data import preset_split
from rslib.eval.segmenter import segmentation_scores
from rslib.models.segmenter import CONFIG_FILE, WEIGHTS_FILE, build_segmenter
from rslib.train.augment import dihedral
from rslib.train.loop import train_loop
from rslib.train.stage import (begin, finish, is_finished, seed_initial_weights, stage_stamp, stage_train_config,
                               training_info)
from rslib.utils import to_uint8


class _Pairs(torch.utils.data.Dataset):
    """(image uint8 (3, S, S), classes uint8 (S, S)) pairs held in memory."""

    def __init__(self, images: torch.Tensor, classes: torch.Tensor):
        self.images, self.classes = images, classes.to(torch.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "classes": self.classes[i]}


def random_crops(x: torch.Tensor, y: torch.Tensor, crop: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random ``crop`` x ``crop`` window of each image (B, C, S, S) and its labels (B, S, S)."""
    s = x.shape[-1]
    if crop <= 0 or crop >= s:
        return x, y
    off = torch.randint(s - crop + 1, (x.shape[0], 2), generator=generator, device=generator.device).tolist()
    x = torch.stack([xi[:, i:i + crop, j:j + crop] for xi, (i, j) in zip(x, off)])
    y = torch.stack([yi[i:i + crop, j:j + crop] for yi, (i, j) in zip(y, off)])
    return x, y


def segmentation_loss_fn(crop_size: int = 0):
    """``loss_fn(model, batch, generator)``: cross-entropy of the class logits on a random crop (0 = whole
    image) under a random flip/rotation per image, all drawn from ``generator``."""

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict:
        x = batch["image"].float() / 127.5 - 1.0  # (B, 3, S, S)
        y = batch["classes"].long()  # (B, S, S)
        x, y = random_crops(x, y, crop_size, generator)  # (B, 3, s, s), (B, s, s)
        ks = torch.randint(8, (x.shape[0],), generator=generator, device=generator.device).tolist()
        x = torch.stack([dihedral(xi, k) for xi, k in zip(x, ks)])
        y = torch.stack([dihedral(yi, k) for yi, k in zip(y, ks)])
        logits = model(x)  # (B, C, s, s)
        loss = F.cross_entropy(logits, y)
        acc = (logits.detach().argmax(1) == y).float().mean()
        return {"loss": loss, "pixel_acc": acc}

    return loss_fn


def train_segmenter(cfg: Preset, out_dir: str | os.PathLike | None = None, force: bool = False,
                    progress: bool = True, real_limit: int | None = None,
                    extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> Path:
    """Train the segmenter on the real training split and save it to ``runs/<preset>/segmenter``.

    The folder holds ``model.safetensors`` and ``segmenter.json`` (architecture, classes, the scores on the
    real test split: the ceiling for generated images). A folder finished with the same settings is reused
    unless ``force``. For the trainability experiment, ``real_limit`` keeps the first real training images
    only and ``extra`` = (images (N, 3, S, S) in [-1, 1] or uint8, class maps (N, S, S) long) adds generated ones.
    """
    out_dir = resolve_path(out_dir) if out_dir is not None else cfg.data_run_dir("segmenter")
    stamp = {**stage_stamp(cfg, "seg"), "real_limit": real_limit,
             "extra": None if extra is None else [len(extra[0]), float(extra[0].float().sum()), int(extra[1].sum())]}
    if not force and is_finished(out_dir, stamp):
        return out_dir
    work = begin(out_dir, stamp, force)
    t0 = time.perf_counter()
    train = preset_split(cfg, "train", maps=("segmentation",))
    if "segmentation" not in train.maps:
        raise FileNotFoundError(f"{train.root} has no segmentation maps: the segmenter needs a data set with them "
                                f"(SynthRS has them; for real data extract them with rslib.data.conditions)")
    images, targets = train.images, train.maps["segmentation"]
    if real_limit is not None:
        images, targets = images[:real_limit], targets[:real_limit]
    if extra is not None:
        images, targets = torch.cat([images, to_uint8(extra[0])]), torch.cat([targets, extra[1].long()])
    seed_initial_weights(cfg)
    model = build_segmenter(cfg)
    s = cfg.seg
    tcfg = stage_train_config(cfg, s.mixed_precision, steps=s.steps, batch_size=s.batch_size, lr=s.lr, weight_decay=1e-4,
                              warmup_steps=min(20, s.steps // 10), checkpoint_every=max(0, s.steps // 2),
                              log_every=10, num_workers=0, channels_last=True)
    result = train_loop(model, segmentation_loss_fn(s.crop_size), _Pairs(images, targets), tcfg, work,
                        progress=progress)
    model.to("cpu").eval()
    info: dict[str, Any] = {"channels": list(model.channels), "num_classes": model.num_classes, "norm": model.norm,
                            "patch": model.patch,
                            "classes": list(LOVEDA_CLASSES), "image_size": cfg.data.image_size}
    test = preset_split(cfg, "test", maps=("segmentation", "road"))
    scores = segmentation_scores(model, test) if "segmentation" in test.maps else {}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps({**info, "test": scores}, indent=1))
    finish(out_dir, stamp, result, t0, images=len(images), test=scores)
    return out_dir


def segmenter_info(path: str | os.PathLike) -> dict[str, Any]:
    """What a trained segmenter folder records: architecture, test scores, training time and loss history."""
    path = resolve_path(path)
    info = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
    return {**training_info(path), **info}
