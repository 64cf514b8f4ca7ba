"""A small segmentation network for condition fidelity, and the measures it serves.

CRS-Diff is asked to draw an image that follows a segmentation map, a road mask or an edge map. Whether it
did is measured the way the papers' downstream checks do it: a segmenter trained on *real* images labels
the *generated* ones, and its prediction is scored against the map the image was generated from
(mIoU over the 7 LoveDA classes, IoU of the road class). The same segmenter on real held-out images gives
the ceiling a generator can reach. Edge fidelity needs no network: edges found in the generated image by
a Canny detector are matched to the requested edge map with a 1-px tolerance (:func:`edge_f1`).

The network is a plain fully convolutional encoder-decoder (U-Net-like, GroupNorm so that training and
evaluation behave alike and the shared loop's checkpoints hold every tensor)::

    image (B, 3, S, S) in [-1, 1]
      -> stem: 2 conv3x3 at full resolution, channels[0]
      -> per further level: conv3x3 stride 2 + conv3x3, channels[i]        (S / 2^i)
      -> per level back up: bilinear x2, concat the skip, conv3x3          (S / 2^(i-1))
      -> conv1x1 -> logits (B, 7, S, S)

:func:`train_segmenter` trains it on the preset's real training split with the shared loop and saves
``runs/<preset>/segmenter/`` (``model.safetensors`` + ``segmenter.json``, beside the training record of
:mod:`rslib.train.stage`); a finished folder is reused.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from rslib.config import Preset, SegmenterConfig, resolve_path
from rslib.data.conditions import LOVEDA_CLASSES, sketch
from rslib.eval.data import EvalSet, preset_split
from rslib.eval.metrics import confusion_matrix
from rslib.train.loop import train_loop
from rslib.train.stage import (begin, finish, is_finished, seed_initial_weights, stage_stamp, stage_train_config,
                               training_info)
from rslib.utils import pick_device, to_uint8

NUM_CLASSES = len(LOVEDA_CLASSES)
ROAD = LOVEDA_CLASSES.index("road")
WATER = LOVEDA_CLASSES.index("water")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "segmenter.json"


# ---------------------------------------------------------------------------
# The network


def _groups(c: int) -> int:
    """GroupNorm groups for ``c`` channels: 8 where they divide it, else fewer."""
    return next(g for g in (8, 4, 2, 1) if c % g == 0)


def conv_block(cin: int, cout: int, stride: int = 1, norm: bool = False) -> nn.Sequential:
    """conv3x3 (stride) -> [GroupNorm] -> ReLU (no normalisation by default: half the CPU time at small sizes)."""
    if norm:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(_groups(cout), cout),
                             nn.ReLU(inplace=True))
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU(inplace=True))


class Segmenter(nn.Module):
    """Fully convolutional encoder-decoder with skip connections: (B, 3, H, W) in [-1, 1] -> logits (B, C, H, W).

    With ``patch`` p > 1 the image is first folded into p x p pixel blocks (space-to-depth, lossless) and the
    logits are unfolded back at the end, so every layer runs at 1/p of the resolution: p^2 times cheaper.
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 128), num_classes: int = NUM_CLASSES, norm: bool = False,
                 patch: int = 1):
        super().__init__()
        ch = [int(c) for c in channels]
        if not ch or patch < 1:
            raise ValueError(f"the segmenter needs at least one level of channels and patch >= 1, got {ch}, {patch}")
        self.channels, self.num_classes, self.norm, self.patch = tuple(ch), int(num_classes), bool(norm), int(patch)
        cin = 3 * patch * patch
        self.stem = nn.Sequential(conv_block(cin, ch[0], 1, norm), conv_block(ch[0], ch[0], 1, norm))
        self.down = nn.ModuleList(nn.Sequential(conv_block(a, b, 2, norm), conv_block(b, b, 1, norm))
                                  for a, b in zip(ch, ch[1:]))
        self.up = nn.ModuleList(conv_block(b + a, a, 1, norm) for a, b in zip(ch, ch[1:]))
        self.head = nn.Conv2d(ch[0], num_classes * patch * patch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C, H, W) of images in [-1, 1] (B, 3, H, W); H and W divisible by ``patch``."""
        p = self.patch
        if p > 1:
            if x.shape[-1] % p or x.shape[-2] % p:
                raise ValueError(f"image sides {tuple(x.shape[-2:])} must be divisible by the patch size {p}")
            x = F.pixel_unshuffle(x, p)  # (B, 3 p^2, H / p, W / p)
        skips = [self.stem(x)]  # (B, c0, h, w)
        for down in self.down:
            skips.append(down(skips[-1]))  # (B, c_i, h / 2^i, w / 2^i)
        h = skips.pop()
        for up in reversed(self.up):
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = up(torch.cat([h, skip], 1))  # (B, c_{i-1}, ...)
        out = self.head(h)  # (B, C p^2, h, w)
        return F.pixel_shuffle(out, p) if p > 1 else out


def build_segmenter(cfg: Preset | SegmenterConfig) -> Segmenter:
    """A fresh segmenter sized by ``cfg.seg`` (or a SegmenterConfig)."""
    seg = cfg.seg if isinstance(cfg, Preset) else cfg
    return Segmenter(seg.channels, NUM_CLASSES, seg.norm, seg.patch)


# ---------------------------------------------------------------------------
# Training


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of the last two axes (k in 0..7); the same k on image and labels."""
    if k & 4:
        x = x.flip(-1)
    return torch.rot90(x, k & 3, dims=(-2, -1))


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
    out_dir = resolve_path(out_dir) if out_dir is not None else cfg.run_dir("segmenter")
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


def load_segmenter(path: str | os.PathLike) -> Segmenter:
    """A trained segmenter from its folder (``model.safetensors`` + ``segmenter.json``), in eval mode on CPU."""
    path = resolve_path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no trained segmenter at {path} (needs {CONFIG_FILE} and {WEIGHTS_FILE}): run "
                                f"rslib.eval.segmenter.train_segmenter(cfg) first")
    info = json.loads((path / CONFIG_FILE).read_text())
    model = Segmenter(info["channels"], info["num_classes"], info.get("norm", False), info.get("patch", 1))
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
    return model.eval()


def segmenter_info(path: str | os.PathLike) -> dict[str, Any]:
    """What a trained segmenter folder records: architecture, test scores, training time and loss history."""
    path = resolve_path(path)
    info = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
    return {**training_info(path), **info}


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
    cm = confusion_matrix(pred, target, num_classes).double()  # rows = target, columns = prediction
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES) -> float:
    """Mean IoU over the classes present in the prediction or the target (pixels pooled over images)."""
    iou = per_class_iou(pred, target, num_classes)
    return float(iou.nanmean()) if bool((~iou.isnan()).any()) else float("nan")


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
