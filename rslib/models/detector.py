"""The object detector of YOLOScore and of the trainability experiment: the network and its saved folder.

One torchvision detector built from the preset (``det.kind``) plays both of CC-Diff's detector roles
(:mod:`rslib.eval.detector` says how it is scored, :mod:`rslib.train.detector` how it is trained). At the
small presets, ``fcos_tiny``, trained from scratch:

    torchvision FCOS (anchor-free, one location per FPN cell)
      backbone: conv stages at ``det.strides`` of the input (stride-2 convs), channels ``det.channels``
      torchvision FeaturePyramidNetwork -> ``det.fpn_channels`` per level
      FCOS head with ``det.head_convs`` conv layers per branch (GroupNorm), focal + GIoU + centre-ness losses

SynthRS objects at 64 px are small (buildings ~5 px, vehicles ~1.3 px), so the finest level sits at stride 2.
At the paper preset, ``faster_rcnn_r50_fpn``: torchvision's Faster R-CNN with a ResNet-50 FPN backbone, as the
paper's mmdetection detector, its backbone from a local ImageNet weights file (``det.backbone_weights``).
A trained detector's folder holds ``model.safetensors`` and ``detector.json`` (:func:`load_detector`).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d

from rslib.config import DetectorConfig, resolve_path
from rslib.data.synthrs import OBJECT_CLASSES

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
# A trained detector's folder


def load_detector(path: str | os.PathLike) -> nn.Module:
    """A trained detector from its folder (``model.safetensors`` + ``detector.json``), in eval mode on CPU."""
    path = resolve_path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no trained detector at {path} (needs {CONFIG_FILE} and {WEIGHTS_FILE}): run "
                                f"rslib.train.detector.train_detector(cfg) first")
    info = json.loads((path / CONFIG_FILE).read_text())
    d = {"box_activation": "relu", **info["det"]}  # folders from before the setting existed used relu
    det = DetectorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    model = build_detector(det, info["image_size"], len(info["classes"]), load_backbone=False)
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
    model.classes = tuple(info["classes"])  # type: ignore[attr-defined]
    model.min_box_px = float(det.min_box_px)  # type: ignore[attr-defined]
    return model.eval()
