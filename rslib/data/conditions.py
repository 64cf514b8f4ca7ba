"""Condition maps: the six CRS-Diff spatial conditions and their conventions.

Every map is an ``uint8`` array of the image's height and width:

============  =========================================================
name          content
============  =========================================================
lines         1-px white straight line segments on black (MLSD-like)
soft_edges    soft edge strength, 0..255, white = edge (HED-like)
sketch        thin binary edges {0, 255}, white on black (sketch-like)
road          binary road mask {0, 255}
depth         height map, 0..255, brighter = higher (closer to the sensor)
segmentation  H x W x 3 colours of the LoveDA 7-class palette
============  =========================================================

The model input stacks them in :data:`~rslib.data.records.CONDITION_NAMES`
order as 3 channels each (18 channels, values in [0, 1]), as CRS-Diff does.

For real images, :func:`line_segments`, :func:`soft_edges` and :func:`sketch`
are computed with OpenCV / scikit-image (no weights); road, depth and
segmentation come from a model given by local path or as a callable
(:class:`ConditionModel`). :func:`extract_conditions` makes all six and
:func:`stack_conditions` builds the model input (a missing map is zeros).
"""
from __future__ import annotations

import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

import cv2
import numpy as np

from rslib.data.records import CONDITION_NAMES

if TYPE_CHECKING:
    import torch

LOVEDA_CLASSES = ("background", "building", "road", "water", "barren", "forest", "agriculture")
LOVEDA_PALETTE = np.array(
    [(255, 255, 255), (255, 0, 0), (255, 255, 0), (0, 0, 255), (159, 129, 183), (0, 255, 0), (255, 195, 128)],
    dtype=np.uint8,
)


def seg_to_rgb(labels: np.ndarray) -> np.ndarray:
    """LoveDA class indices (H, W) -> palette colours (H, W, 3)."""
    return LOVEDA_PALETTE[labels]


def rgb_to_seg(rgb: np.ndarray) -> np.ndarray:
    """Palette colours (H, W, 3) -> class indices (H, W), nearest palette colour."""
    d = ((rgb[..., None, :].astype(np.int32) - LOVEDA_PALETTE.astype(np.int32)) ** 2).sum(-1)
    return d.argmin(-1).astype(np.uint8)


# ---------------------------------------------------------------------------
# Condition maps for real images
# ---------------------------------------------------------------------------
#
# The three edge-like maps (lines, soft_edges, sketch) are computed with
# OpenCV / scikit-image and need no weights. Road, depth and segmentation come
# from a model the user supplies by local path (or a Python callable), wrapped
# by :class:`ConditionModel`.

MODEL_KINDS = ("road", "depth", "segmentation")
# maps whose values are labels (binary or class colours): resized with nearest
BINARY_MAPS = ("lines", "sketch", "road")
LABEL_MAPS = BINARY_MAPS + ("segmentation",)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

ModelLike = Union["ConditionModel", Callable[..., Any], str, Path, None]


def _check_image(image: np.ndarray) -> np.ndarray:
    """Validate an RGB uint8 image (H, W, 3) and return it contiguous."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image (values 0..255), got dtype {image.dtype}; convert with "
                         "(np.clip(x, 0, 1) * 255).round().astype(np.uint8) for float images in [0, 1]")
    return np.ascontiguousarray(image)


def _luminance(image: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> grey uint8 (H, W)."""
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def _default_sigma(shape: tuple[int, ...]) -> float:
    """Smoothing scale that grows with the image: 1 px up to 256 px, 2 px at 512 px."""
    return max(1.0, min(shape[:2]) / 256.0)


def soft_edges(image: np.ndarray, sigma: float | None = None, scales: Sequence[float] = (1.0, 2.0, 4.0),
               percentile: float = 99.0, min_contrast: float = 24.0) -> np.ndarray:
    """HED-like soft edge map (H, W) uint8 from multi-scale colour gradient magnitude."""
    image = _check_image(image)
    sigma = _default_sigma(image.shape) if sigma is None else float(sigma)
    x = image.astype(np.float32)
    total = np.zeros(image.shape[:2], np.float32)
    for s in scales:
        s = sigma * float(s)
        blur = cv2.GaussianBlur(x, (0, 0), sigmaX=s, sigmaY=s, borderType=cv2.BORDER_REFLECT)
        # Sobel 3x3 has a gain of 8 on a unit ramp; /8 gives grey levels per pixel
        gx = cv2.Sobel(blur, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT) / 8.0
        gy = cv2.Sobel(blur, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT) / 8.0
        gx *= gx
        gx += gy * gy  # squared magnitude per colour channel, (H, W, 3)
        sq = np.maximum(np.maximum(gx[..., 0], gx[..., 1]), gx[..., 2])  # strongest channel, (H, W)
        total += np.sqrt(sq) * s  # scale-normalised: a step edge answers alike at every scale
    total /= len(scales)
    # a step of contrast c peaks at c / sqrt(2 pi) per scale; below min_contrast stays grey
    floor = min_contrast / np.sqrt(2.0 * np.pi)
    step = max(1, int(np.sqrt(total.size / 65536)))  # percentile of a subsample on large images
    norm = max(float(np.percentile(total[::step, ::step], percentile)), floor)
    return (np.clip(total / norm, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def sketch(image: np.ndarray, sigma: float | None = None, ratio: float = 3.0, min_threshold: float = 40.0,
           thin: bool = True) -> np.ndarray:
    """Thin binary edges {0, 255} (H, W): Canny with thresholds from the median gradient."""
    image = _check_image(image)
    sigma = _default_sigma(image.shape) if sigma is None else float(sigma)
    grey = cv2.GaussianBlur(_luminance(image), (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    dx = cv2.Sobel(grey, cv2.CV_16S, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT)
    dy = cv2.Sobel(grey, cv2.CV_16S, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT)
    mag = np.hypot(dx.astype(np.float32), dy.astype(np.float32))
    # auto-Canny: texture sets the median; an edge stands `ratio` times above it
    high = max(ratio * float(np.median(mag)), min_threshold)
    edges = cv2.Canny(dx, dy, 0.4 * high, high, L2gradient=True)
    if thin:
        from skimage.morphology import thin as _thin

        # Canny is 1 px wide but for staircase corners; one thinning pass removes those
        edges = _thin(edges > 0, max_num_iter=1).astype(np.uint8) * 255
    return edges


def draw_segments(segments: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Draw segments (N, 4) as x1, y1, x2, y2 pixels into a 1-px white-on-black map of size (H, W)."""
    h, w = int(size[0]), int(size[1])
    out = np.zeros((h, w), np.uint8)
    segs = np.asarray(segments, dtype=np.float64).reshape(-1, 4)
    for x1, y1, x2, y2 in np.rint(segs).astype(np.int64):
        cv2.line(out, (int(x1), int(y1)), (int(x2), int(y2)), 255, thickness=1, lineType=cv2.LINE_8)
    return out


def _segments_lsd(grey: np.ndarray) -> np.ndarray:
    """Line Segment Detector on a grey uint8 image -> (N, 4) float x1, y1, x2, y2."""
    lsd = cv2.createLineSegmentDetector(cv2.LSD_REFINE_STD)
    lines = lsd.detect(grey)[0]
    return np.zeros((0, 4), np.float32) if lines is None else lines.reshape(-1, 4)


def _segments_hough(grey: np.ndarray, min_length: float, sigma: float) -> np.ndarray:
    """Probabilistic Hough transform on the sketch's Canny edges -> (N, 4) float x1, y1, x2, y2."""
    from skimage.transform import probabilistic_hough_line

    edges = sketch(np.repeat(grey[..., None], 3, axis=2), sigma=sigma, thin=False) > 0
    found = probabilistic_hough_line(edges, threshold=10, line_length=max(2, int(round(min_length))),
                                     line_gap=2, rng=0)
    if not found:
        return np.zeros((0, 4), np.float32)
    return np.asarray([(p0[0], p0[1], p1[0], p1[1]) for p0, p1 in found], np.float32)


def detect_segments(image: np.ndarray, min_length: float = 0.08, method: str = "auto",
                    min_contrast: float = 16.0) -> np.ndarray:
    """Straight segments (N, 4) x1, y1, x2, y2 in pixels, at least `min_length` x min(H, W) long."""
    image = _check_image(image)
    if method not in ("auto", "lsd", "hough"):
        raise ValueError(f"unknown line method {method!r}; choose 'auto', 'lsd' or 'hough'")
    grey = _luminance(image)
    min_len = float(min_length) * min(image.shape[:2]) if min_length < 1 else float(min_length)
    has_lsd = hasattr(cv2, "createLineSegmentDetector")
    if method == "lsd" and not has_lsd:
        raise RuntimeError(f"this OpenCV ({cv2.__version__}) has no createLineSegmentDetector; use method='hough'")
    if method == "lsd" or (method == "auto" and has_lsd):
        segs = _segments_lsd(grey)
    else:
        segs = _segments_hough(grey, min_len, sigma=_default_sigma(image.shape))
    if len(segs) == 0:
        return segs.astype(np.float32)
    length = np.hypot(segs[:, 2] - segs[:, 0], segs[:, 3] - segs[:, 1])
    keep = length >= min_len
    if min_contrast > 0 and keep.any():
        # drop segments along faint structure (a smooth ramp, texture): the median grey
        # difference across the line, 1 px to either side, at 5 points along it
        s = segs[keep]
        d = (s[:, 2:] - s[:, :2]) / np.maximum(length[keep, None], 1e-6)
        normal = np.stack([-d[:, 1], d[:, 0]], axis=1)  # (M, 2)
        t = np.linspace(0.1, 0.9, 5, dtype=np.float32)[None, :, None]
        pts = s[:, None, :2] + t * (s[:, None, 2:] - s[:, None, :2])  # (M, 5, 2)

        def sample(p: np.ndarray) -> np.ndarray:
            x = np.clip(np.rint(p[..., 0]), 0, grey.shape[1] - 1).astype(np.intp)
            y = np.clip(np.rint(p[..., 1]), 0, grey.shape[0] - 1).astype(np.intp)
            return grey[y, x].astype(np.float32)

        diff = np.abs(sample(pts + normal[:, None]) - sample(pts - normal[:, None]))  # (M, 5)
        keep[np.flatnonzero(keep)[np.median(diff, axis=1) < min_contrast]] = False
    return segs[keep].astype(np.float32)


def line_segments(image: np.ndarray, min_length: float = 0.08, method: str = "auto") -> np.ndarray:
    """MLSD-like map (H, W) uint8: straight segments as 1-px white lines on black."""
    image = _check_image(image)
    return draw_segments(detect_segments(image, min_length=min_length, method=method), image.shape[:2])


# ---------------------------------------------------------------------------
# Model-based maps: road, depth, segmentation
# ---------------------------------------------------------------------------

_MODEL_NEEDS = {
    "road": ("road maps need a road-extraction model", "a transformers semantic-segmentation model"),
    "depth": ("depth maps need a depth-estimation model (e.g. DPT/MiDaS)", "a transformers depth-estimation model"),
    "segmentation": ("segmentation maps need a land-cover segmentation model (LoveDA classes, or pass label_map)",
                     "a transformers semantic-segmentation model"),
}


def _check_kind(kind: str) -> None:
    """Raise ValueError for a kind that is not one of :data:`MODEL_KINDS`."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown condition model kind {kind!r}; the kinds are {', '.join(MODEL_KINDS)}")


def _missing_model_error(kind: str, path: Any = None, reason: str = "", skip_hint: bool = False) -> FileNotFoundError:
    """The error for an absent model: names the condition, the path and the fix."""
    need, folder = _MODEL_NEEDS[kind]
    where = "no model was given" if path is None else f"nothing usable at {str(path)!r}"
    if reason:
        where += f" ({reason})"
    fix = (f"pass {kind}_model=<local folder with {folder} or a TorchScript file (.pt/.ts)>, "
           f"e.g. ConditionModel.load({kind!r}, path)")
    if skip_hint:
        fix += f", or skip_missing=True to leave the {kind} map out"
    return FileNotFoundError(f"{need}, but {where}: {fix}; see data/README.md")


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, or {} when the file is absent."""
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _processor_size(pre: dict, config: Any, kind: str) -> tuple[int, int] | None:
    """Fixed model input size (H, W) from a preprocessor config, else None (native size)."""
    size = pre.get("size")
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    image_size = getattr(config, "image_size", None)
    if kind == "depth" and isinstance(image_size, int):  # ViT-based DPT wants its square size
        return image_size, image_size
    return None


def _load_transformers(kind: str, path: Path, device: str) -> tuple[Callable[..., Any], dict]:
    """A transformers model folder -> (fn mapping (B,3,H,W) [0,1] to raw outputs, ConditionModel kwargs)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForDepthEstimation, AutoModelForSemanticSegmentation

    auto = AutoModelForDepthEstimation if kind == "depth" else AutoModelForSemanticSegmentation
    try:
        model = auto.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not load {path} as {_MODEL_NEEDS[kind][1]} for {kind} maps: {first}") from e
    model = model.to(device).eval()
    pre = _read_json(path / "preprocessor_config.json")
    # without a preprocessor config: the transformers defaults (DPT 0.5 / 0.5, segmenters ImageNet)
    default_mean, default_std = ((0.5,) * 3, (0.5,) * 3) if kind == "depth" else (_IMAGENET_MEAN, _IMAGENET_STD)
    normalize = pre.get("do_normalize", True)
    mean = pre.get("image_mean", default_mean) if normalize else (0.0,) * 3
    std = pre.get("image_std", default_std) if normalize else (1.0,) * 3
    mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    size = _processor_size(pre, model.config, kind)
    keep_aspect = bool(pre.get("keep_aspect_ratio", False))
    multiple = int(pre.get("ensure_multiple_of", 1) or 1)

    def forward(x: "torch.Tensor") -> "torch.Tensor":
        if size is not None:  # (B, 3, H, W) -> (B, 3, h, w)
            sh, sw = size[0] / x.shape[-2], size[1] / x.shape[-1]
            if keep_aspect:  # DPT: keep the scale closer to 1 for both sides
                sh = sw = sw if abs(1 - sw) < abs(1 - sh) else sh
            h = max(multiple, int(round(x.shape[-2] * sh / multiple)) * multiple)
            w = max(multiple, int(round(x.shape[-1] * sw / multiple)) * multiple)
            if (h, w) != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        out = model(pixel_values=(x - mean) / std)
        return out.predicted_depth if kind == "depth" else out.logits  # (B, h', w') or (B, C, h', w')

    extra: dict = {}
    id2label = {int(k): str(v).lower() for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    if kind == "road":
        road = [i for i, name in id2label.items() if "road" in name]
        if len(road) == 1:
            extra["road_channel"] = road[0]
    elif kind == "segmentation" and id2label and all(n in LOVEDA_CLASSES for n in id2label.values()):
        extra["label_map"] = {i: LOVEDA_CLASSES.index(n) for i, n in id2label.items()}
    return forward, extra


def _label_lut(label_map: Mapping[int, int | str] | Sequence[int | str] | np.ndarray) -> np.ndarray:
    """Model class id -> LoveDA id lookup table; LoveDA ids may be given by name."""
    items = label_map.items() if isinstance(label_map, Mapping) else enumerate(list(np.asarray(label_map).tolist()))
    pairs = []
    for k, v in items:
        if isinstance(v, str):
            if v.lower() not in LOVEDA_CLASSES:
                raise ValueError(f"label_map names {v!r}, not a LoveDA class; the classes are {LOVEDA_CLASSES}")
            v = LOVEDA_CLASSES.index(v.lower())
        if not 0 <= int(v) < len(LOVEDA_CLASSES) or int(k) < 0:
            raise ValueError(f"label_map entry {k}: {v} is out of range; LoveDA ids are 0..{len(LOVEDA_CLASSES) - 1}")
        pairs.append((int(k), int(v)))
    lut = np.zeros(max((k for k, _ in pairs), default=-1) + 1, np.uint8)  # unmapped ids -> background
    for k, v in pairs:
        lut[k] = v
    return lut


def _as_tensor(out: Any) -> "torch.Tensor":
    """A model's output (tensor, array, ModelOutput, tuple) -> float tensor."""
    import torch

    for attr in ("predicted_depth", "logits"):
        if hasattr(out, attr) and getattr(out, attr) is not None:
            out = getattr(out, attr)
            break
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"a condition model must return a tensor or array, got {type(out).__name__}")
    return out.float()


class ConditionModel:
    """A road, depth or segmentation model that turns an RGB image into its condition map.

    ``fn`` maps a float batch (B, 3, H, W) in [0, 1] to logits (B, C, H', W') or depth
    (B, 1, H', W') / (B, H', W'); outputs are resized back to the image size. Road: with
    C >= 2 the mask is ``argmax == road_channel``; with C == 1 the channel is a probability
    when it lies in [0, 1], else a logit, thresholded at ``threshold``. Depth: min-max
    normalised, brighter = closer (``invert_depth=True`` for models that predict distance).
    Segmentation: argmax, mapped to LoveDA ids by ``label_map`` (identity by default).
    """

    def __init__(self, kind: str, fn: Callable[..., Any], *, label_map: Any = None, road_channel: int = 1,
                 threshold: float = 0.5, invert_depth: bool = False, device: str = "cpu") -> None:
        """Wrap a callable (TorchScript module, nn.Module, function) as the `kind` condition model."""
        _check_kind(kind)
        if not callable(fn):
            raise TypeError(f"ConditionModel({kind!r}, fn) needs a callable, got {type(fn).__name__}; "
                            f"to load from a path use ConditionModel.load({kind!r}, path)")
        self.kind = kind
        self.fn = fn
        self.label_map = None if label_map is None else _label_lut(label_map)
        self.road_channel = int(road_channel)
        self.threshold = float(threshold)
        self.invert_depth = bool(invert_depth)
        self.device = device

    def __repr__(self) -> str:
        return f"ConditionModel(kind={self.kind!r}, fn={type(self.fn).__name__})"

    @classmethod
    def load(cls, kind: str, path: str | Path | None, *, device: str = "cpu", **kwargs: Any) -> "ConditionModel":
        """Load a transformers model folder or a TorchScript file from a local path."""
        _check_kind(kind)
        if path is None or str(path).strip() == "":
            raise _missing_model_error(kind, None)
        p = Path(path).expanduser()
        if not p.exists():
            raise _missing_model_error(kind, p, "the path does not exist")
        if p.is_dir():
            if not any(p.iterdir()):
                raise _missing_model_error(kind, p, "the folder is empty")
            if not (p / "config.json").is_file():
                raise _missing_model_error(kind, p, "the folder has no config.json, so it is no transformers model")
            fn, extra = _load_transformers(kind, p, device)
            return cls(kind, fn, device=device, **{**extra, **kwargs})
        if p.stat().st_size == 0:
            raise _missing_model_error(kind, p, "the file is empty")
        import torch

        try:
            with warnings.catch_warnings():  # TorchScript is deprecated in recent torch, still a valid format
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(p), map_location=device)
        except (RuntimeError, ValueError) as e:
            raise ValueError(
                f"{p} is no TorchScript file, so it cannot serve {kind} maps (a plain state dict needs its model "
                "class: build the model, then save torch.jit.script(model) or torch.jit.trace(model, x))") from e
        module.eval()
        return cls(kind, module, device=device, **kwargs)

    def raw(self, image: np.ndarray) -> "torch.Tensor":
        """The model's output for one image, resized to it: (C, H, W) float tensor on CPU."""
        import torch
        import torch.nn.functional as F

        image = _check_image(image)
        h, w = image.shape[:2]
        x = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].float().div_(255.0)  # (1, 3, H, W)
        with torch.inference_mode():
            out = _as_tensor(self.fn(x))
        if out.ndim == 3:  # (B, H', W') depth
            out = out[:, None]
        if out.ndim != 4 or out.shape[0] != 1:
            raise ValueError(f"the {self.kind} model returned shape {tuple(out.shape)}; expected (1, C, H', W') "
                             "for a (1, 3, H, W) input")
        if tuple(out.shape[-2:]) != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return out[0].cpu()  # (C, H, W)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The condition map of an RGB uint8 image in this module's conventions."""
        import torch

        out = self.raw(image)  # (C, H, W)
        c = out.shape[0]
        if self.kind == "road":
            if c == 1:
                v = out[0]
                prob = v if bool(((v >= 0) & (v <= 1)).all()) else torch.sigmoid(v)
                mask = prob > self.threshold
            else:
                if not 0 <= self.road_channel < c:
                    raise ValueError(f"road_channel={self.road_channel} but the road model has {c} channels")
                mask = out.argmax(0) == self.road_channel
            return mask.numpy().astype(np.uint8) * 255
        if self.kind == "depth":
            if c != 1:
                raise ValueError(f"the depth model returned {c} channels; expected 1")
            d = (-out[0] if self.invert_depth else out[0]).numpy().astype(np.float64)
            lo, hi = float(d.min()), float(d.max())
            if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo <= 1e-5 * max(1.0, abs(lo), abs(hi)):
                return np.zeros(d.shape, np.uint8)
            return ((d - lo) / (hi - lo) * 255.0 + 0.5).astype(np.uint8)
        # segmentation
        if c < 2:
            raise ValueError(f"the segmentation model returned {c} channel; expected one logit channel per class")
        ids = out.argmax(0).numpy()
        if self.label_map is None:
            if c > len(LOVEDA_CLASSES):
                raise ValueError(f"the segmentation model predicts {c} classes but LoveDA has {len(LOVEDA_CLASSES)}: "
                                 "pass label_map={model class id: LoveDA id or name}")
            labels = ids.astype(np.uint8)
        else:
            lut = np.concatenate([self.label_map, np.zeros(max(0, c - len(self.label_map)), np.uint8)])
            labels = lut[ids]
        return seg_to_rgb(labels)


@lru_cache(maxsize=6)
def _load_cached(kind: str, path: str, mtime_ns: int) -> ConditionModel:
    """ConditionModel.load, cached per (kind, path, modification time)."""
    return ConditionModel.load(kind, path)


def as_condition_model(kind: str, model: ModelLike) -> ConditionModel:
    """A ConditionModel, a callable or a local path -> ConditionModel of `kind` (paths are cached)."""
    _check_kind(kind)
    if model is None:
        raise _missing_model_error(kind, None, skip_hint=True)
    if isinstance(model, ConditionModel):
        if model.kind != kind:
            raise ValueError(f"a {model.kind!r} ConditionModel was passed as {kind}_model")
        return model
    if isinstance(model, (str, Path)):
        p = Path(model).expanduser()
        if str(model).strip() == "" or not p.exists():
            raise _missing_model_error(kind, model, "the path does not exist" if str(model).strip() else "",
                                       skip_hint=True)
        return _load_cached(kind, str(p.resolve()), p.stat().st_mtime_ns)
    if callable(model):
        return ConditionModel(kind, model)
    raise TypeError(f"{kind}_model must be a ConditionModel, a callable or a local path, got {type(model).__name__}")


def extract_conditions(image: np.ndarray, road_model: ModelLike = None, depth_model: ModelLike = None,
                       segmentation_model: ModelLike = None, skip_missing: bool = False) -> dict[str, np.ndarray]:
    """All six condition maps of an RGB uint8 image, by name in CONDITION_NAMES order."""
    image = _check_image(image)
    given = {"road": road_model, "depth": depth_model, "segmentation": segmentation_model}
    # resolve the models first so that a missing one fails before any work is done
    models = {k: as_condition_model(k, m) for k, m in given.items() if m is not None or not skip_missing}
    maps = {"lines": line_segments(image), "soft_edges": soft_edges(image), "sketch": sketch(image)}
    maps.update({k: m(image) for k, m in models.items()})
    return {name: maps[name] for name in CONDITION_NAMES if name in maps}


# ---------------------------------------------------------------------------
# Model input
# ---------------------------------------------------------------------------


def _resize_map(m: np.ndarray, name: str, size: tuple[int, int]) -> np.ndarray:
    """Resize one map to (H, W): nearest for labels, area/linear for soft maps; thin lines survive shrinking."""
    h, w = size
    if m.shape[:2] == (h, w):
        return m
    shrink = h * w < m.shape[0] * m.shape[1]
    if name in ("lines", "sketch") and shrink:  # keep 1-px lines: any line pixel in the cell -> line
        return np.where(cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0,
                        m.max(), 0).astype(m.dtype)
    if name in LABEL_MAPS or (name not in ("soft_edges", "depth") and m.ndim == 3):
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(m, (w, h), interpolation=interp)


def stack_conditions(maps: Mapping[str, np.ndarray | None], names: Sequence[str] = CONDITION_NAMES,
                     size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Condition maps -> model input (3 * len(names), H, W) float32 in [0, 1]; a missing map is zeros."""
    present = {n: np.asarray(maps[n]) for n in names if maps.get(n) is not None}
    if size is not None:
        hw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    elif present:
        shapes = {n: m.shape[:2] for n, m in present.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"condition maps differ in size {shapes}; pass size=(H, W) to resize them")
        hw = next(iter(shapes.values()))
    else:
        raise ValueError("no condition map is present, so the size is unknown: pass size=(H, W)")
    out = np.zeros((3 * len(names), *hw), np.float32)  # (3N, H, W)
    for i, name in enumerate(names):
        if name not in present:
            continue
        m = present[name]
        if m.ndim == 3 and m.shape[2] == 1:
            m = m[..., 0]
        if not (m.ndim == 2 or (m.ndim == 3 and m.shape[2] == 3)):
            raise ValueError(f"condition map {name!r} has shape {m.shape}; expected (H, W) or (H, W, 3)")
        if m.dtype == bool:
            m = m.astype(np.uint8) * 255
        m = _resize_map(m, name, hw)
        x = m.astype(np.float32) / 255.0 if m.dtype == np.uint8 else np.clip(m.astype(np.float32), 0.0, 1.0)
        out[3 * i:3 * i + 3] = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)  # (3, H, W)
    return out
