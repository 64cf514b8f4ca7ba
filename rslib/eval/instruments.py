"""The papers' own measuring instruments, each from a local file the user supplies (``cfg.eval``).

At the small presets the notebooks measure with models trained here (RS-CLIP, the project's detector); at the
paper preset with the instruments the papers used:

==================  =========================================================  ==============================
measure             instrument                                                 file (``cfg.eval`` field)
==================  =========================================================  ==============================
FID, IS             InceptionV3 of torch-fidelity, through torchmetrics        ``inception_weights``
                    (:func:`rslib.eval.metrics.inception_scores`)
CLIPScore (CRS)     transformers CLIP ViT-L/14; 100 x cosine, the mean clamped  ``clip_score_folder``
                    at 0 (torchmetrics' CLIPScore)
CLIPScore (CC)      open_clip ViT-L-14 laion2b_s32b_b82k; raw 100 x cosine,    ``open_clip_checkpoint``
                    global (caption vs image) and local (each instance's box
                    crop vs its class name, averaged per image, then over images)
YOLOScore           ultralytics YOLOv8 when installed (the ``yolo`` extra),    ``yolo_weights``
                    else the project's detector, labelled as such
trainability        torchvision Faster R-CNN R50-FPN (``det.kind``)            ``det.backbone_weights``
==================  =========================================================  ==============================

A missing file is an error naming it and what it should hold; nothing is downloaded.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from rslib.config import Preset, resolve_path
from rslib.utils import to_uint8

Layout = Sequence[dict[str, Any]]  # one image's objects: {"label", "bbox": normalised x1, y1, x2, y2, ...}
Target = dict[str, torch.Tensor]

OPEN_CLIP_HINT = ("the open_clip ViT-L-14 laion2b_s32b_b82k weights, open_clip_pytorch_model.bin of "
                  "laion/CLIP-ViT-L-14-laion2B-s32B-b82K (download it once on a machine with network access)")
CLIP_FOLDER_HINT = ("a transformers CLIP folder (config.json, the weights, preprocessor_config.json and the "
                    "tokenizer files), e.g. openai/clip-vit-large-patch14 saved with save_pretrained")
YOLO_HINT = "an ultralytics YOLOv8 model file (.pt) trained on the real training split (CC-Diff: imgsz 800, 50 epochs)"


def _local_file(path: str | os.PathLike, what: str, hint: str) -> Path:
    """The local file ``path`` (relative to the repository root), or a FileNotFoundError naming it."""
    p = resolve_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} not found: it should hold {hint}")
    return p


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image in [-1, 1] (3, H, W) -> RGB PIL image."""
    return Image.fromarray(to_uint8(image[None])[0].permute(1, 2, 0).numpy())


# ---------------------------------------------------------------------------
# CC-Diff's CLIPScore: open_clip, raw cosine


def hbb_crop(image: Image.Image, bbox: Sequence[float]) -> Image.Image:
    """The pixels of a normalised box x1, y1, x2, y2 (outward to whole pixels, at least one) of a PIL image."""
    w, h = image.size
    x1, y1 = math.floor(bbox[0] * w), math.floor(bbox[1] * h)
    x2, y2 = max(math.ceil(bbox[2] * w), x1 + 1), max(math.ceil(bbox[3] * h), y1 + 1)
    return image.crop((max(0, x1), max(0, y1), min(w, x2), min(h, y2)))


class OpenClipScore:
    """CC-Diff's CLIPScore with an open_clip model: 100 x cosine of image and text features, not clamped."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable[[Image.Image], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], device: str | torch.device = "cpu"):
        self.model, self.preprocess, self.tokenizer = model.eval().to(device), preprocess, tokenizer
        self.device = torch.device(device)

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, model_name: str = "ViT-L-14",
             device: str | torch.device = "cpu") -> "OpenClipScore":
        """open_clip ``model_name`` (a name open_clip ships, or the path of a model config JSON file, which is
        registered and named by its stem) with the weights of a local checkpoint file, and its evaluation
        transform."""
        import open_clip

        if str(model_name).endswith(".json"):
            config = _local_file(model_name, "open_clip model config (eval.open_clip_model)",
                                 "an open_clip model config JSON (embed_dim, vision_cfg, text_cfg)")
            open_clip.add_model_config(config)
            model_name = config.stem
        path = _local_file(checkpoint, "open_clip checkpoint (eval.open_clip_checkpoint)", OPEN_CLIP_HINT)
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(path),
                                                                      device=device)
        return cls(model, preprocess, open_clip.get_tokenizer(model_name), device)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised features (N, D) of PIL images, each through the model's evaluation transform."""
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.stack([self.preprocess(im) for im in images[i:i + batch_size]]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised features (N, D) of texts."""
        out = []
        for i in range(0, len(texts), batch_size):
            ids = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_text(ids).float(), dim=-1).cpu())
        return torch.cat(out)

    def pair_scores(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """100 x cosine (N,) of each image with its text, not clamped."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        return 100.0 * (self.image_features(images) * self.text_features(texts)).sum(-1)

    def global_score(self, images: torch.Tensor, captions: Sequence[str]) -> float:
        """CLIPScore global: mean over images (in [-1, 1], (B, 3, H, W)) of 100 x cos(image, caption)."""
        return float(self.pair_scores([to_pil(im) for im in images], captions).mean())

    def local_scores(self, images: torch.Tensor, layouts: Sequence[Layout]) -> list[float]:
        """Per image, the mean over its instances of 100 x cos(box crop, class name) (NaN without instances)."""
        if len(images) != len(layouts):
            raise ValueError(f"{len(images)} images but {len(layouts)} layouts")
        crops, texts, owner = [], [], []
        for i, (img, lay) in enumerate(zip(images, layouts)):
            pil = to_pil(img)
            for o in lay:
                crops.append(hbb_crop(pil, o["bbox"]))
                texts.append(o["label"])
                owner.append(i)
        per_image = [[] for _ in layouts]
        for i, s in zip(owner, self.pair_scores(crops, texts).tolist() if crops else []):
            per_image[i].append(s)
        return [float(np.mean(s)) if s else float("nan") for s in per_image]

    def local_score(self, images: torch.Tensor, layouts: Sequence[Layout]) -> float:
        """CLIPScore local: :meth:`local_scores` averaged over the images that have instances."""
        scores = [s for s in self.local_scores(images, layouts) if not math.isnan(s)]
        return float(np.mean(scores)) if scores else float("nan")


# ---------------------------------------------------------------------------
# CRS-Diff's CLIPScore: a transformers CLIP folder, torchmetrics' definition


class ClipFolderScore:
    """CLIPScore as torchmetrics computes it (the folder's CLIPProcessor, 100 x cosine, the mean clamped at 0)
    with a local transformers CLIP folder, e.g. clip-vit-large-patch14."""

    def __init__(self, model: Any, processor: Any, device: str | torch.device = "cpu"):
        self.model, self.processor, self.device = model.eval().to(device), processor, torch.device(device)

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> "ClipFolderScore":
        """The CLIP model and processor of a local folder."""
        from transformers import CLIPModel, CLIPProcessor

        path = resolve_path(folder)
        processor = ("preprocessor_config.json", "processor_config.json")  # older / newer transformers name it
        if not (path / "config.json").is_file() or not any((path / name).is_file() for name in processor):
            raise FileNotFoundError(f"CLIP folder {path} (eval.clip_score_folder) not found or incomplete: it "
                                    f"should hold {CLIP_FOLDER_HINT}")
        return cls(CLIPModel.from_pretrained(path, local_files_only=True),
                   CLIPProcessor.from_pretrained(path, local_files_only=True), device)

    @torch.no_grad()
    def pair_scores(self, images: torch.Tensor, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """100 x cosine (N,) of each image (in [-1, 1], (N, 3, H, W)) with its text."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        m, out = self.model, []
        limit = m.config.text_config.max_position_embeddings
        for i in range(0, len(images), batch_size):
            pix = self.processor(images=list(to_uint8(images[i:i + batch_size])), return_tensors="pt")
            tok = self.processor(text=list(texts[i:i + batch_size]), return_tensors="pt", padding=True)
            ids, mask = tok["input_ids"][:, :limit], tok["attention_mask"][:, :limit]
            img = m.visual_projection(m.vision_model(pixel_values=pix["pixel_values"].to(self.device)).pooler_output)
            txt = m.text_projection(m.text_model(input_ids=ids.to(self.device),
                                                 attention_mask=mask.to(self.device)).pooler_output)
            cos = (torch.nn.functional.normalize(img.float(), dim=-1)
                   * torch.nn.functional.normalize(txt.float(), dim=-1)).sum(-1)
            out.append(100.0 * cos.cpu())
        return torch.cat(out)

    def score(self, images: torch.Tensor, captions: Sequence[str]) -> float:
        """max(mean over images of 100 x cos(image, caption), 0)."""
        return max(float(self.pair_scores(images, captions).mean()), 0.0)


def crs_diff_clip_score(cfg: Preset, device: str | torch.device = "cpu") -> ClipFolderScore | None:
    """CRS-Diff's CLIPScore instrument of a preset: the CLIP folder ``eval.clip_score_folder``, or None (RS-CLIP,
    the small presets')."""
    return ClipFolderScore.load(cfg.eval.clip_score_folder, device) if cfg.eval.clip_score_folder else None


def cc_diff_clip_score(cfg: Preset, device: str | torch.device = "cpu") -> OpenClipScore | None:
    """CC-Diff's CLIPScore instrument of a preset: open_clip from ``eval.open_clip_checkpoint``, or None (RS-CLIP,
    the small presets')."""
    if not cfg.eval.open_clip_checkpoint:
        return None
    return OpenClipScore.load(cfg.eval.open_clip_checkpoint, cfg.eval.open_clip_model, device)


def crs_diff_paper_scorer(cfg: Preset, device: str | torch.device = "cpu",
                          ) -> Callable[[torch.Tensor, torch.Tensor, Sequence[str]], dict[str, float]] | None:
    """CRS-Diff's text-to-image measures with the papers' instruments a preset names (``cfg.eval``), as a
    function of (real images, generated images, their captions), images in [-1, 1]: Inception ``fid_inception``
    and ``inception_score`` (``eval.inception_weights``) and ``clip_score_clip``, CLIPScore with the CLIP folder
    (``eval.clip_score_folder``). None at the small presets; a named file that is missing is an error now."""
    from rslib.eval.metrics import inception_scores, inception_weights_file

    clip = crs_diff_clip_score(cfg, device)
    inception = inception_weights_file(cfg.eval.inception_weights) if cfg.eval.inception_weights else None
    if clip is None and inception is None:
        return None

    def score(real: torch.Tensor, generated: torch.Tensor, captions: Sequence[str]) -> dict[str, float]:
        out = inception_scores(real, generated, inception) if inception is not None else {}
        if clip is not None:
            out["clip_score_clip"] = clip.score(generated, captions)
        return out

    return score


# ---------------------------------------------------------------------------
# YOLOScore: ultralytics YOLOv8 when installed, else the project's detector


@dataclass
class LayoutDetector:
    """What scores YOLOScore: ``detect(images) -> [{"boxes" (K, 4) normalised, "scores", "labels"}]`` with labels
    indexing ``classes``, and the label the table row carries."""

    detect: Callable[[torch.Tensor], list[Target]]
    classes: tuple[str, ...]
    label: str
    min_box_px: float = 0.0


def yolo_detections(results: Sequence[Any], names: dict[int, str], classes: Sequence[str]) -> list[Target]:
    """ultralytics Results -> detections with normalised boxes, labels re-indexed by class name into
    ``classes`` (detections of other classes are left out)."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for r in results:
        b = r.boxes
        cls = [names[int(c)] for c in b.cls.tolist()]
        keep = torch.tensor([c in index for c in cls], dtype=torch.bool)
        out.append({"boxes": b.xyxyn.float().cpu().reshape(-1, 4)[keep],
                    "scores": b.conf.float().cpu().reshape(-1)[keep],
                    "labels": torch.tensor([index[c] for c in cls if c in index], dtype=torch.long)})
    return out


def ultralytics_detector(weights: str | os.PathLike, classes: Sequence[str], imgsz: int = 800,
                         device: str | None = None) -> LayoutDetector:
    """A YOLOv8 model file as a :class:`LayoutDetector` (ultralytics validation settings: conf 0.001, IoU 0.7)."""
    from ultralytics import YOLO

    path = _local_file(weights, "YOLOv8 model (eval.yolo_weights)", YOLO_HINT)
    model = YOLO(str(path))
    names = {int(k): v for k, v in dict(model.names).items()}
    unknown = sorted(set(classes) - set(names.values()))
    if unknown:
        raise ValueError(f"the YOLOv8 model {path} knows no class {unknown}: it was trained on other labels "
                         f"(it knows {sorted(names.values())})")

    def detect(images: torch.Tensor) -> list[Target]:
        bgr = [np.ascontiguousarray(x.permute(1, 2, 0).numpy()[..., ::-1]) for x in to_uint8(images)]
        results = model.predict(bgr, imgsz=imgsz, conf=0.001, iou=0.7, verbose=False, device=device)
        return yolo_detections(results, names, classes)

    return LayoutDetector(detect, tuple(classes), f"YOLOv8 ({path.name})")


def ultralytics_installed() -> bool:
    """True when the optional ``ultralytics`` package can be imported."""
    try:
        import ultralytics  # noqa: F401
    except ImportError:
        return False
    return True


def project_detector(model: torch.nn.Module, kind: str, reason: str = "") -> LayoutDetector:
    """The project's trained detector (:func:`rslib.models.detector.load_detector`) as a :class:`LayoutDetector`."""
    from rslib.eval.detector import detect

    label = f"project detector ({kind}{'; ' + reason if reason else ''})"
    return LayoutDetector(lambda images: detect(model, images), tuple(getattr(model, "classes", ())), label,
                          float(getattr(model, "min_box_px", 0.0)))


def yolo_score_detector(cfg: Preset, classes: Sequence[str], detector_dir: str | os.PathLike | None = None
                        ) -> LayoutDetector:
    """The preset's YOLOScore detector: YOLOv8 from ``eval.yolo_weights`` when it is set and ultralytics is
    installed; else the project's detector trained at ``detector_dir`` (default ``runs/<preset>/detector``),
    labelled with why."""
    from rslib.models.detector import load_detector

    reason = ""
    if cfg.eval.yolo_weights:
        if ultralytics_installed():
            return ultralytics_detector(cfg.eval.yolo_weights, classes, imgsz=cfg.det.input_size or 800)
        reason = "ultralytics not installed: pip install 'rslib[yolo]' for YOLOv8"
    model = load_detector(detector_dir if detector_dir is not None else cfg.data_run_dir("detector"))
    return project_detector(model, cfg.det.kind, reason)


def yolo_score(detector: LayoutDetector, images: torch.Tensor, targets: Sequence[Target]) -> dict[str, Any]:
    """YOLOScore of images (in [-1, 1]) against the layouts they were generated from (``targets`` indexing
    ``detector.classes``): COCO ``map50``, ``map`` (50:95), ``map75`` and the instrument's ``label``."""
    from rslib.eval.detector import score_detections

    scores = score_detections(detector.detect(images), targets, int(images.shape[-1]), detector.min_box_px,
                              detector.classes)
    return {**scores, "instrument": detector.label}


# ---------------------------------------------------------------------------
# CC-Diff's table: the papers' instruments beside the project's


@dataclass
class CCDiffInstruments:
    """The papers' CC-Diff instruments a preset names (``cfg.eval``), each None where it names none: open_clip
    CLIPScore, YOLOv8 (the project's detector scores every table anyway) and Inception FID."""

    clip: OpenClipScore | None = None
    yolo: LayoutDetector | None = None
    inception_weights: Path | None = None

    def names(self) -> dict[str, str]:
        """Which instrument gave each paper column, for the table's caption."""
        out = {}
        if self.clip is not None:
            out["clip_global_openclip"] = out["clip_local_openclip"] = "open_clip ViT-L-14 (eval.open_clip_checkpoint)"
        if self.yolo is not None:
            out["map50_yolo"] = out["map50_95_yolo"] = self.yolo.label
        if self.inception_weights is not None:
            out["fid_inception"] = f"InceptionV3 ({self.inception_weights.name})"
        return out


def cc_diff_instruments(cfg: Preset, classes: Sequence[str], device: str | torch.device = "cpu"
                        ) -> CCDiffInstruments:
    """CC-Diff's paper instruments of a preset (none at the small presets): each file named in ``cfg.eval`` is
    loaded, a missing one is an error naming it. YOLOv8 also needs the optional ``ultralytics`` package: without
    it, a warning and no YOLOv8 column."""
    from rslib.eval.metrics import inception_weights_file

    yolo = None
    if cfg.eval.yolo_weights:
        if ultralytics_installed():
            yolo = ultralytics_detector(cfg.eval.yolo_weights, classes, imgsz=cfg.det.input_size or 800)
        else:
            warnings.warn("eval.yolo_weights is set but ultralytics is not installed (pip install 'rslib[yolo]'): "
                          "YOLOScore is the project's detector only", stacklevel=2)
    inception = Path(inception_weights_file(cfg.eval.inception_weights)) if cfg.eval.inception_weights else None
    return CCDiffInstruments(cc_diff_clip_score(cfg, device), yolo, inception)


__all__ = ["CCDiffInstruments", "ClipFolderScore", "LayoutDetector", "OpenClipScore", "cc_diff_clip_score",
           "cc_diff_instruments", "crs_diff_clip_score", "crs_diff_paper_scorer", "hbb_crop", "project_detector", "ultralytics_detector",
           "ultralytics_installed", "yolo_detections", "yolo_score", "yolo_score_detector"]
