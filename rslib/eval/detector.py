"""The object detector of YOLOScore and of the trainability experiment.

CC-Diff scores layout fidelity with *YOLOScore*: a detector trained on real images runs on the generated
ones, and its detections are scored (COCO mAP) against the layouts the images were generated from. Its
*trainability* experiment trains the same detector on real images plus generated ones and scores it on
real held-out images. CC-Diff uses ultralytics YOLOv8 and mmdetection's Faster R-CNN R50-FPN; here one
torchvision detector built from the preset (``det.kind``) plays both roles (the paper preset's YOLOScore can
use YOLOv8 itself: :mod:`rslib.eval.instruments`). At the small presets, ``fcos_tiny``, trained from scratch:

    torchvision FCOS (anchor-free, one location per FPN cell)
      backbone: conv stages at ``det.strides`` of the input (stride-2 convs), channels ``det.channels``
      torchvision FeaturePyramidNetwork -> ``det.fpn_channels`` per level
      FCOS head with ``det.head_convs`` conv layers per branch (GroupNorm), focal + GIoU + centre-ness losses

SynthRS objects at 64 px are small (buildings ~5 px, vehicles ~1.3 px), so the finest level sits at stride 2
and boxes under ``det.min_box_px`` pixels are *ignore regions*: not learned, and scored as COCO "crowd"
boxes (a detection on one is neither a hit nor a false positive). At the paper preset, ``faster_rcnn_r50_fpn``:
torchvision's Faster R-CNN with a ResNet-50 FPN backbone, as the paper's mmdetection detector, its backbone from
a local ImageNet weights file (``det.backbone_weights``). Boxes are normalised ``x1, y1, x2, y2`` in [0, 1]
everywhere in this module's API, as in the record format.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d

from rslib.config import DetectorConfig, Preset, resolve_path
from rslib.data.synthrs import OBJECT_CLASSES
from rslib.eval.data import preset_split
from rslib.eval.segmenter import dihedral
from rslib.train.loop import train_loop
from rslib.train.stage import (begin, finish, is_finished, seed_initial_weights, stage_stamp, stage_train_config,
                               training_info)
from rslib.utils import to_uint8

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "detector.json"
Target = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------
# The network


def _groups(c: int) -> int:
    return next(g for g in (16, 8, 4, 2, 1) if c % g == 0)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(_groups(cout), cout),
                         nn.ReLU(inplace=True))


class TinyBackbone(nn.Module):
    """Conv stages at ``strides`` of the input, merged by an FPN: (B, 3, H, W) -> {level: (B, F, H/s, W/s)}."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], fpn_channels: int):
        super().__init__()
        channels, strides = [int(c) for c in channels], [int(s) for s in strides]
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"need one channel count per stride, got channels {channels} and strides {strides}")
        if strides[0] < 2 or any(b != 2 * a for a, b in zip(strides, strides[1:])) or strides[0] & (strides[0] - 1):
            raise ValueError(f"strides must be doubling powers of two from 2 on, e.g. (2, 4, 8); got {strides}")
        stem: list[nn.Module] = []
        cin = 3
        for _ in range(strides[0].bit_length() - 1):  # log2(strides[0]) stride-2 convs
            stem.append(_conv(cin, channels[0], 2))
            cin = channels[0]
        stem.append(_conv(channels[0], channels[0]))
        self.stem = nn.Sequential(*stem)
        self.stages = nn.ModuleList(nn.Sequential(_conv(a, b, 2), _conv(b, b)) for a, b in zip(channels, channels[1:]))
        self.fpn = FeaturePyramidNetwork(channels, fpn_channels)
        self.out_channels = int(fpn_channels)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """FPN features by level name, finest first."""
        feats = [self.stem(x)]  # (B, c0, H / s0, W / s0)
        for stage in self.stages:
            feats.append(stage(feats[-1]))  # each level halves the resolution
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


BOX_ACTIVATIONS = {"relu": nn.functional.relu, "softplus": nn.functional.softplus}


class _RegressionHead(FCOSRegressionHead):
    """FCOSRegressionHead with a chosen activation of the box distances (torchvision's is relu: an output that
    turns negative everywhere gets no gradient again, and every box keeps zero size)."""

    def __init__(self, channels: int, num_convs: int, norm_layer: Any, activation: str):
        super().__init__(channels, 1, num_convs, norm_layer=norm_layer)
        if activation not in BOX_ACTIVATIONS:
            raise ValueError(f"det.box_activation must be one of {sorted(BOX_ACTIVATIONS)}, got {activation!r}")
        self.activation = BOX_ACTIVATIONS[activation]

    def forward(self, x: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per level features (N, C, H, W) -> box distances (N, sum HW, 4) and centerness logits (N, sum HW, 1)."""
        regression, ctrness = [], []
        for features in x:
            h = self.conv(features)
            regression.append(self.activation(self.bbox_reg(h)).permute(0, 2, 3, 1).flatten(1, 2))  # one anchor
            ctrness.append(self.bbox_ctrness(h).permute(0, 2, 3, 1).flatten(1, 2))
        return torch.cat(regression, dim=1), torch.cat(ctrness, dim=1)


class _Head(FCOSHead):
    """FCOSHead whose GroupNorm fits any channel count (torchvision's fixes 32 groups)."""

    def __init__(self, channels: int, num_classes: int, num_convs: int, norm_layer: Any, box_activation: str):
        nn.Module.__init__(self)
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(channels, 1, num_classes, num_convs, norm_layer=norm_layer)
        self.regression_head = _RegressionHead(channels, num_convs, norm_layer, box_activation)


DETECTOR_KINDS = ("fcos_tiny", "faster_rcnn_r50_fpn")
RESNET50_HINT = ("torchvision's ResNet-50 ImageNet weights, resnet50-0676ba61.pth (ResNet50_Weights.IMAGENET1K_V1; "
                 "download it once on a machine with network access), or det.backbone_weights='' to train from "
                 "scratch")


class FasterRCNNDetector(nn.Module):
    """torchvision's Faster R-CNN behind the FCOS interface: class labels 0..K-1 in and out (Faster R-CNN
    itself keeps 0 for the background)."""

    def __init__(self, model: FasterRCNN):
        super().__init__()
        self.model = model

    def forward(self, images: list[torch.Tensor], targets: list[Target] | None = None) -> Any:
        """Losses (training, with targets) or detections per image (eval)."""
        if self.training:
            return self.model(images, [{**t, "labels": t["labels"] + 1} for t in targets or []])
        return [{**d, "labels": d["labels"] - 1} for d in self.model(images)]


def _resnet50_fpn(weights_file: str, load: bool = True) -> nn.Module:
    """The ResNet-50 FPN backbone. From a local ImageNet weights file (read unless ``load`` is False): frozen
    batch norms and first stage, mmdetection's and torchvision's choice for a pretrained backbone; without one,
    from scratch with every layer trained, as torchvision builds it."""
    if not weights_file:
        return resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5)
    path = resolve_path(weights_file)
    if load and not path.is_file():
        raise FileNotFoundError(f"ResNet-50 weights file {path} (det.backbone_weights) not found: it should hold "
                                f"{RESNET50_HINT}")
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    if load:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, _ = backbone.body.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")},
                                                   strict=False)
        if missing:
            raise ValueError(f"{path} is no ResNet-50 state dict: it lacks {len(missing)} weights, e.g. "
                             f"{missing[:3]}")
    return backbone


def build_faster_rcnn(det: DetectorConfig, image_size: int, num_classes: int,
                      load_backbone: bool = True) -> FasterRCNNDetector:
    """A fresh Faster R-CNN R50-FPN (torchvision.models.detection's fasterrcnn_resnet50_fpn, its backbone from
    ``det.backbone_weights`` unless ``load_backbone`` is False) for images resized inside to ``det.input_size``."""
    side = int(det.input_size or image_size)
    backbone = _resnet50_fpn(det.backbone_weights, load_backbone)
    model = FasterRCNN(backbone, num_classes + 1, min_size=side, max_size=side, box_score_thresh=det.score_thresh,
                       box_nms_thresh=det.nms_thresh, box_detections_per_img=det.detections_per_img)
    return FasterRCNNDetector(model)


def build_detector(det: DetectorConfig, image_size: int, num_classes: int = len(OBJECT_CLASSES),
                   load_backbone: bool = True) -> nn.Module:
    """A fresh detector of ``det.kind`` for images of ``image_size`` (resized inside to ``det.input_size`` when
    set); ``load_backbone`` False skips reading pretrained backbone weights (a saved detector replaces them)."""
    if det.kind == "faster_rcnn_r50_fpn":
        return build_faster_rcnn(det, image_size, num_classes, load_backbone)
    if det.kind != "fcos_tiny":
        raise ValueError(f"det.kind must be one of {', '.join(DETECTOR_KINDS)}, got {det.kind!r}")
    backbone = TinyBackbone(det.channels, det.strides, det.fpn_channels)
    f = det.fpn_channels
    norm = partial(nn.GroupNorm, _groups(f))
    head = _Head(f, num_classes, det.head_convs, norm, det.box_activation)
    side = int(det.input_size or image_size)
    anchors = AnchorGenerator(tuple((int(s),) for s in det.strides), ((1.0,),) * len(det.strides))
    return FCOS(backbone, num_classes, min_size=side, max_size=side, image_mean=[0.5, 0.5, 0.5],
                image_std=[0.5, 0.5, 0.5], anchor_generator=anchors, head=head, score_thresh=det.score_thresh,
                nms_thresh=det.nms_thresh, detections_per_img=det.detections_per_img, topk_candidates=1000)


# ---------------------------------------------------------------------------
# Boxes


def box_sizes(boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """sqrt(area) in pixels (K,) of normalised boxes (K, 4) on an image of ``image_size``."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(0) * image_size
    return (wh[:, 0] * wh[:, 1]).sqrt()


def dihedral_boxes(boxes: torch.Tensor, k: int) -> torch.Tensor:
    """Normalised boxes (K, 4) moved as :func:`rslib.eval.segmenter.dihedral` moves the image (k in 0..7)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    if k & 4:  # horizontal flip
        x1, x2 = 1 - x2, 1 - x1
    for _ in range(k & 3):  # rot90 counter-clockwise: (x, y) -> (y, 1 - x)
        x1, y1, x2, y2 = y1, 1 - x2, y2, 1 - x1
    return torch.stack([x1, y1, x2, y2], -1)


def _clean(boxes: torch.Tensor, labels: torch.Tensor, image_size: int, min_box_px: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop boxes under ``min_box_px`` and degenerate ones; clamp to the image."""
    boxes = boxes.reshape(-1, 4).float().clamp(0, 1)
    keep = (box_sizes(boxes, image_size) >= max(min_box_px, 1e-6)) & (boxes[:, 2:] > boxes[:, :2]).all(1)
    return boxes[keep], labels.reshape(-1).long()[keep]


# ---------------------------------------------------------------------------
# Training


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
    out_dir = resolve_path(out_dir) if out_dir is not None else cfg.run_dir(default)
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


def load_detector(path: str | os.PathLike) -> nn.Module:
    """A trained detector from its folder (``model.safetensors`` + ``detector.json``), in eval mode on CPU."""
    path = resolve_path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no trained detector at {path} (needs {CONFIG_FILE} and {WEIGHTS_FILE}): run "
                                f"rslib.eval.detector.train_detector(cfg) first")
    info = json.loads((path / CONFIG_FILE).read_text())
    d = {"box_activation": "relu", **info["det"]}  # folders from before the setting existed used relu
    det = DetectorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    model = build_detector(det, info["image_size"], len(info["classes"]), load_backbone=False)
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
    model.classes = tuple(info["classes"])  # type: ignore[attr-defined]
    model.min_box_px = float(det.min_box_px)  # type: ignore[attr-defined]
    return model.eval()


def detector_info(path: str | os.PathLike) -> dict[str, Any]:
    """What a trained detector folder records: config, test mAP, training time and loss history."""
    path = resolve_path(path)
    info = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
    return {**training_info(path), **info}


# ---------------------------------------------------------------------------
# Inference and mAP


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
