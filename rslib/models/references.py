"""CC-Diff's references: instance crops of each class, and a background scene retrieved by the caption.

CC-Diff conditions each instance on the image tokens of a *reference crop* of its class and the background on
the tokens of a *retrieved training scene* (CC-Diff §3; upstream: SAM-masked crops and a CLIP text->image top-1
retrieval, both encoded by DINOv2 ViT-L/14 into 257 tokens). Here:

* :class:`ImageTokenEncoder`: images -> tokens (B, T, D_img). At the small presets it is the RS-CLIP vision tower
  (its last hidden state after the final LayerNorm); at the paper preset a local ``transformers.Dinov2Model``
  folder (ImageNet normalisation, applied once). ``grid > 0`` keeps CLS plus a ``grid x grid`` average pooling
  of the patch tokens (1 + grid^2 tokens), which keeps the small presets cheap.
* :func:`crop_objects`: box crops (grown by a margin, never centre-cropped) resized to the encoder's input. With a
  local SAM checkpoint (``cc.sam_checkpoint``), :func:`masked_crops` blackens everything outside each object's SAM
  mask, as upstream's reference crops (box prompts, one mask each); without one the crops are plain box crops.
* :class:`ReferenceBank` (a diffusers ``ModelMixin``, saved inside the pipeline): per class a seeded choice of
  training-object crops as tokens, the retrieval pool's scene tokens and CLIP image embeddings, and the CLIP text
  projection that turns the text tower's pooled output into a retrieval query.

Training picks, for each object, a *different* instance of its class (one from another image whenever the bank
has one; a fresh seeded draw each step), and the background scene retrieved by the caption with the query image
itself excluded (upstream fed the ground truth back). Inference picks the crop whose aspect ratio is closest to
the box (as upstream) and the top-1 scene of the prompt.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from rslib.models.text import CLIP_MEAN, CLIP_STD, normalised_pixels
from rslib.utils import to_uint8

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_KINDS = ("rs_clip", "dinov2")
_KEY = 2**32  # class * _KEY + image: one sortable key per bank entry


def phrase_for(label: str) -> str:
    """The instance phrase of a class label: "ship" -> "a ship", "storagetank" -> "a storage tank"."""
    try:
        from rslib.data.synthrs import CLASS_PHRASES

        words = CLASS_PHRASES[label][0]
    except KeyError:
        words = label.replace("-", " ").replace("_", " ").lower()
    return ("an " if words[:1] in "aeiou" and words else "a ") + words


# ---------------------------------------------------------------------------
# Image tokens


def pool_tokens(tokens: torch.Tensor, grid: int, prefix: int = 1) -> torch.Tensor:
    """(B, prefix + g*g, D) -> (B, prefix + grid*grid, D): the patch grid average-pooled (grid <= 0: unchanged)."""
    if grid <= 0:
        return tokens
    b, n, d = tokens.shape
    g = int(round((n - prefix) ** 0.5))
    if g * g != n - prefix:
        raise ValueError(f"{n - prefix} patch tokens do not form a square grid")
    if grid >= g:
        return tokens
    patches = tokens[:, prefix:].transpose(1, 2).reshape(b, d, g, g)  # (B, D, g, g)
    pooled = F.adaptive_avg_pool2d(patches, grid).flatten(2).transpose(1, 2)  # (B, grid^2, D)
    return torch.cat([tokens[:, :prefix], pooled], dim=1)


class ImageTokenEncoder(nn.Module):
    """A frozen vision tower that turns images in [-1, 1] (B, 3, H, W) into tokens (B, T, D_img)."""

    def __init__(self, model: nn.Module, kind: str, input_size: int):
        super().__init__()
        if kind not in ENCODER_KINDS:
            raise ValueError(f"image encoder kind must be one of {ENCODER_KINDS}, not {kind!r}")
        self.model = model.requires_grad_(False).eval()
        self.kind = kind
        self.input_size = int(input_size)
        mean, std = (CLIP_MEAN, CLIP_STD) if kind == "rs_clip" else (IMAGENET_MEAN, IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean)[None, :, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(std)[None, :, None, None], persistent=False)

    @classmethod
    def from_clip(cls, clip: nn.Module) -> "ImageTokenEncoder":
        """The vision tower of a ``transformers.CLIPModel`` (RS-CLIP)."""
        return cls(clip.vision_model, "rs_clip", clip.config.vision_config.image_size)

    @classmethod
    def from_dinov2(cls, model: nn.Module, input_size: int = 224) -> "ImageTokenEncoder":
        """A ``transformers.Dinov2Model`` (patch 14: 224 px -> CLS + 16 x 16 patch tokens)."""
        return cls(model, "dinov2", input_size)

    @property
    def dim(self) -> int:
        """Token width D_img."""
        return int(self.model.config.hidden_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> normalised encoder input (B, 3, S, S); normalised once."""
        return normalised_pixels(images, self.input_size, self.mean, self.std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: int = 0) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> tokens (B, 1 + P, D) (CLS first), pooled to 1 + grid^2 if grid > 0."""
        px = self.preprocess(images).to(next(self.model.parameters()).dtype)
        if self.kind == "rs_clip":
            out = self.model(pixel_values=px)
            tokens = self.model.post_layernorm(out.last_hidden_state)  # (B, 1 + P, D)
        else:
            tokens = self.model(pixel_values=px).last_hidden_state  # (B, 1 + P, D), already layer-normed
        return pool_tokens(tokens.float(), grid)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, grid: int = 0, batch_size: int = 256) -> torch.Tensor:
        """Batched :meth:`forward` on the encoder's device; tokens returned on CPU (N, T, D)."""
        dev = next(self.model.parameters()).device
        out = [self(images[i:i + batch_size].to(dev), grid).cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, 1, self.dim)


def load_dinov2(path: str | os.PathLike) -> nn.Module:
    """A local ``transformers.Dinov2Model`` folder (e.g. dinov2-large); nothing is downloaded."""
    from transformers import Dinov2Model

    from rslib.config import resolve_path

    root = resolve_path(path) if str(path) else Path("")
    if not str(path) or not (root / "config.json").is_file():
        raise FileNotFoundError(
            f"no DINOv2 folder at {root}: set cc.dino_path to a local transformers Dinov2Model folder "
            f"(config.json + weights, e.g. dinov2-large saved with Dinov2Model.save_pretrained), or use "
            f"cc.image_encoder='rs_clip'")
    return Dinov2Model.from_pretrained(root, local_files_only=True).eval()


# ---------------------------------------------------------------------------
# Crops


def crop_boxes(boxes: torch.Tensor, image_size: int, margin: float = 0.0, min_px: float = 3.0) -> torch.Tensor:
    """Normalised boxes (K, 4) -> pixel crop windows (K, 4): grown by ``margin`` of the box size on each side and
    to at least ``min_px`` pixels a side, about the box centre."""
    b = boxes.float() * image_size
    c = (b[:, :2] + b[:, 2:]) / 2
    wh = (b[:, 2:] - b[:, :2]) * (1 + 2 * margin)
    wh = wh.clamp_min(min_px)
    return torch.cat([c - wh / 2, c + wh / 2], dim=1)


def crop_objects(images: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor, size: int,
                 margin: float = 0.0, min_px: float = 3.0) -> torch.Tensor:
    """Crops (K, 3, size, size) of images (B, 3, H, W) at normalised boxes (K, 4) of images ``image_index`` (K,).

    Bilinear sampling (area-averaged when shrinking) of the box grown by ``margin``; the whole box is kept and
    stretched to a square (no centre crop that would cut elongated objects); outside the image is zero.
    """
    from torchvision.ops import roi_align

    if len(boxes) == 0:
        return images.new_zeros(0, images.shape[1], size, size)
    win = crop_boxes(boxes, images.shape[-1], margin, min_px)
    rois = torch.cat([image_index.float()[:, None], win], dim=1).to(images)  # (K, 5)
    return roi_align(images.float(), rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True)


SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b")  # segment_anything's model types, named in its checkpoint files


def load_sam_predictor(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """A ``segment_anything.SamPredictor`` for a local SAM checkpoint (e.g. ``sam_vit_h_4b8939.pth``; the model
    type is read from the file name); nothing is downloaded. Needs the optional ``segment_anything`` package."""
    from rslib.config import resolve_path

    path = resolve_path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"no SAM checkpoint at {path}: set cc.sam_checkpoint to a local SAM file (e.g. "
                                f"sam_vit_h_4b8939.pth), or to '' for plain box crops")
    kind = next((k for k in SAM_MODEL_TYPES if k in path.name), None)
    if kind is None:
        raise ValueError(f"{path}: the file name does not say the SAM model type; keep the published name "
                         f"(it holds one of {', '.join(SAM_MODEL_TYPES)}, e.g. sam_vit_h_4b8939.pth)")
    try:
        from segment_anything import SamPredictor, sam_model_registry
    except ImportError:
        raise ImportError("cc.sam_checkpoint needs the segment_anything package: pip install 'rslib[sam]' (or "
                          "pip install segment-anything), or set cc.sam_checkpoint='' for plain box crops") from None
    return SamPredictor(sam_model_registry[kind](checkpoint=str(path)).to(device).eval())


def sam_masks(predictor: Any, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """SAM's mask (K, H, W) bool of each object at normalised boxes (K, 4) of one image (3, H, W) in [-1, 1]: one
    box prompt per object, ``multimask_output=False`` (as upstream)."""
    h, w = image.shape[-2:]
    rgb = to_uint8(image).permute(1, 2, 0).numpy()
    predictor.set_image(rgb)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    masks = []
    for box in boxes.detach().cpu().float() * scale:
        out, _, _ = predictor.predict(box=box.numpy(), multimask_output=False)
        masks.append(torch.from_numpy(np.asarray(out[0], dtype=bool)))
    return torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool)


def masked_crops(images: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor, size: int, predictor: Any,
                 margin: float = 0.0, min_px: float = 3.0) -> torch.Tensor:
    """:func:`crop_objects` with everything outside each object's SAM mask (:func:`sam_masks`) black: the masked
    crops on black of upstream's reference bank. (K, 3, size, size) in [-1, 1]."""
    crops = crop_objects(images, image_index, boxes, size, margin, min_px)
    for i in image_index.unique().tolist():
        sel = (image_index == i).nonzero().flatten()
        masks = sam_masks(predictor, images[i], boxes[sel]).to(crops)  # (k, H, W)
        inside = crop_objects(masks[:, None], torch.arange(len(sel), device=crops.device), boxes[sel], size, margin,
                              min_px)  # (k, 1, size, size): the mask cropped like the image
        crops[sel.to(crops.device)] = crops[sel.to(crops.device)] * inside - (1 - inside)
    return crops


def select_bank(labels: Sequence[int], areas: Sequence[float], num_classes: int, per_class: int,
                seed: int = 0, candidates: int = 3) -> torch.Tensor:
    """Indices of the objects that make the reference bank: per class ``per_class`` of its
    ``candidates * per_class`` largest objects, drawn with a generator seeded by ``seed``; grouped by class."""
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    areas_t = torch.as_tensor(list(areas), dtype=torch.float64)
    g = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in range(num_classes):
        idx = (labels_t == c).nonzero().flatten()
        if len(idx) == 0:
            continue
        order = idx[torch.argsort(-areas_t[idx], stable=True)][: max(1, candidates * per_class)]
        pick = order[torch.randperm(len(order), generator=g)[:per_class]]
        chosen.append(pick.sort().values)
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)


# ---------------------------------------------------------------------------
# The bank


class ReferenceBank(ModelMixin, ConfigMixin):
    """Reference tokens and the retrieval index, saved with the pipeline (safetensors; sizes in the config).

    Buffers: ``fg_tokens`` (M, Tf, D_img) instance crops grouped by class, ``fg_labels`` (M,), ``fg_image`` (M,)
    source image, ``fg_aspect`` (M,) box width / height; ``bg_tokens`` (P, Tb, D_img) scenes of the retrieval
    pool, ``bg_embeds`` (P, E) their L2-normalised CLIP image embeddings, ``bg_image`` (P,) their index in the
    training split; ``text_projection`` (E, D_text) the CLIP text projection for retrieval queries.
    """

    @register_to_config
    def __init__(self, classes: Sequence[str] = (), phrases: Sequence[str] | None = None, image_dim: int = 1,
                 num_fg: int = 0, fg_tokens_per_ref: int = 1, num_bg: int = 0, bg_tokens_per_ref: int = 1,
                 embed_dim: int = 1, text_dim: int = 1, fg_grid: int = 0, bg_grid: int = 0,
                 encoder: str = "rs_clip", encoder_input_size: int = 224, token_dtype: str = "float32"):
        super().__init__()
        classes = list(classes)
        if phrases is not None and len(phrases) != len(classes):
            raise ValueError(f"{len(phrases)} phrases for {len(classes)} classes")
        dt = getattr(torch, token_dtype)
        self.register_buffer("fg_tokens", torch.zeros(num_fg, fg_tokens_per_ref, image_dim, dtype=dt))
        self.register_buffer("fg_labels", torch.zeros(num_fg, dtype=torch.long))
        self.register_buffer("fg_image", torch.zeros(num_fg, dtype=torch.long))
        self.register_buffer("fg_aspect", torch.ones(num_fg))
        self.register_buffer("bg_tokens", torch.zeros(num_bg, bg_tokens_per_ref, image_dim, dtype=dt))
        self.register_buffer("bg_embeds", torch.zeros(num_bg, embed_dim))
        self.register_buffer("bg_image", torch.zeros(num_bg, dtype=torch.long))
        self.register_buffer("text_projection", torch.zeros(embed_dim, text_dim))

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, classes: Sequence[str], fg_tokens: torch.Tensor, fg_labels: torch.Tensor, fg_image: torch.Tensor,
              fg_aspect: torch.Tensor, bg_tokens: torch.Tensor, bg_embeds: torch.Tensor, bg_image: torch.Tensor,
              text_projection: torch.Tensor, fg_grid: int = 0, bg_grid: int = 0, encoder: str = "rs_clip",
              encoder_input_size: int = 224, token_dtype: str = "float32",
              phrases: Sequence[str] | None = None) -> "ReferenceBank":
        """A bank holding the given tensors (see the class docstring for shapes)."""
        image_dim = int(fg_tokens.shape[-1] if fg_tokens.numel() else bg_tokens.shape[-1] if bg_tokens.numel() else 1)
        bank = cls(classes=list(classes), phrases=list(phrases) if phrases is not None else [phrase_for(c) for c in classes],
                   image_dim=image_dim, num_fg=len(fg_tokens),
                   fg_tokens_per_ref=int(fg_tokens.shape[1]) if fg_tokens.ndim == 3 else 1, num_bg=len(bg_tokens),
                   bg_tokens_per_ref=int(bg_tokens.shape[1]) if bg_tokens.ndim == 3 else 1,
                   embed_dim=int(text_projection.shape[0]), text_dim=int(text_projection.shape[1]),
                   fg_grid=fg_grid, bg_grid=bg_grid, encoder=encoder, encoder_input_size=encoder_input_size,
                   token_dtype=token_dtype)
        with torch.no_grad():
            for name, value in dict(fg_tokens=fg_tokens, fg_labels=fg_labels, fg_image=fg_image, fg_aspect=fg_aspect,
                                    bg_tokens=bg_tokens, bg_embeds=bg_embeds, bg_image=bg_image,
                                    text_projection=text_projection).items():
                buf = getattr(bank, name)
                if value.numel():
                    buf.copy_(value.reshape(buf.shape).to(buf.dtype))
        return bank.eval()

    # -- classes -----------------------------------------------------------------------------------------------

    @property
    def classes(self) -> list[str]:
        """Class labels, in the order of the label indices."""
        return list(self.config.classes)

    @property
    def phrases(self) -> list[str]:
        """The instance phrase of each class ("a ship")."""
        return list(self.config.phrases)

    def class_index(self, label: str | int, where: str = "label") -> int:
        """Index of a class label (or pass an index through), with a clear error for unknown labels."""
        if isinstance(label, (int,)) and not isinstance(label, bool):
            if not 0 <= label < len(self.classes):
                raise ValueError(f"{where}: class index {label} out of range 0..{len(self.classes) - 1}")
            return int(label)
        try:
            return self.classes.index(str(label))
        except ValueError:
            raise ValueError(f"{where}: unknown label {label!r}; known classes: {', '.join(self.classes)}") from None

    @property
    def has_tokens(self) -> bool:
        """False for a bank without references (the GLIGEN-style mode needs none)."""
        return self.fg_tokens.shape[0] > 0 and self.bg_tokens.shape[0] > 0

    # -- foreground ----------------------------------------------------------------------------------------------

    def _sorted_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank entries ordered by (class, source image): the order and the sorted keys class * 2^32 + image."""
        keys = self.fg_labels.cpu() * _KEY + self.fg_image.cpu()
        order = torch.argsort(keys, stable=True)
        return order, keys[order]

    def pick_for_training(self, labels: torch.Tensor, image_index: torch.Tensor,
                          generator: torch.Generator) -> torch.Tensor:
        """Bank entries (B, N) for objects of classes ``labels`` (B, N) in training images ``image_index`` (B,):
        a uniform seeded draw among the class's entries from *other* images (among all of the class's entries
        when only the object's own image has some); -1 for padding (label < 0) and classes without entries."""
        labels = labels.cpu().long()
        img = image_index.cpu().long()[:, None].expand_as(labels)
        order, keys = self._sorted_keys()
        lab = labels.clamp_min(0)
        start = torch.searchsorted(keys, lab * _KEY)
        end = torch.searchsorted(keys, (lab + 1) * _KEY)
        own_s = torch.searchsorted(keys, lab * _KEY + img)
        own_e = torch.searchsorted(keys, lab * _KEY + img, right=True)
        cnt, own = end - start, own_e - own_s
        other = cnt - own
        u = torch.rand(labels.shape, generator=generator, dtype=torch.float64)
        k_other = (u * other).long().clamp_max((other - 1).clamp_min(0))
        pos_other = start + k_other + (k_other >= own_s - start).long() * own  # skip the own image's block
        pos_any = start + (u * cnt).long().clamp_max((cnt - 1).clamp_min(0))
        pos = torch.where(other > 0, pos_other, pos_any).clamp(0, max(0, len(order) - 1))
        pick = order[pos] if len(order) else torch.zeros_like(pos)
        return torch.where((labels >= 0) & (cnt > 0), pick, torch.full_like(pick, -1))

    def pick_by_aspect(self, labels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Bank entries (B, N): per object the crop of its class whose aspect ratio is closest to the box's
        (|r_i / r - 1| as upstream; first on ties); -1 for padding (label < 0) and classes without entries."""
        labels = labels.cpu().long()
        boxes = boxes.cpu().float()
        r = ((boxes[..., 2] - boxes[..., 0]).clamp_min(1e-6) / (boxes[..., 3] - boxes[..., 1]).clamp_min(1e-6))
        cost = (self.fg_aspect.cpu()[None, None, :] / r[..., None] - 1).abs()  # (B, N, M)
        same = self.fg_labels.cpu()[None, None, :] == labels[..., None]
        cost = torch.where(same, cost, torch.full_like(cost, float("inf")))
        if cost.shape[-1] == 0:
            return torch.full(labels.shape, -1, dtype=torch.long)
        pick = cost.argmin(-1)
        return torch.where(same.any(-1) & (labels >= 0), pick, torch.full_like(pick, -1))

    def fg(self, index: torch.Tensor) -> torch.Tensor:
        """Reference tokens (…, Tf, D_img) of bank entries ``index`` (…); -1 gives zeros."""
        idx = index.to(self.fg_tokens.device).long()
        if self.fg_tokens.shape[0] == 0:
            return torch.zeros(*idx.shape, *self.fg_tokens.shape[1:], device=idx.device)
        tok = self.fg_tokens[idx.clamp_min(0)].float()
        return tok * (idx >= 0)[..., None, None].to(tok.dtype)

    # -- background ----------------------------------------------------------------------------------------------

    def query_embeddings(self, pooled_text: torch.Tensor) -> torch.Tensor:
        """Retrieval queries (B, E): the CLIP text projection of the text tower's pooled output (B, D_text),
        L2-normalised."""
        proj = self.text_projection.to(pooled_text.device, torch.float32)
        return F.normalize(pooled_text.float() @ proj.T, dim=-1)

    def retrieve(self, queries: torch.Tensor, exclude_images: torch.Tensor | None = None, k: int = 1) -> torch.Tensor:
        """Pool indices (B, k) of the scenes most similar (cosine) to queries (B, E); pool scenes whose training
        image is ``exclude_images`` (B,) (e.g. the query image itself) are never returned."""
        if self.bg_embeds.shape[0] == 0:
            raise ValueError("this reference bank has no retrieval pool (a GLIGEN-mode bank)")
        sim = queries.float() @ self.bg_embeds.to(queries.device, torch.float32).T  # (B, P)
        if exclude_images is not None:
            same = self.bg_image.to(queries.device)[None, :] == exclude_images.to(queries.device).long()[:, None]
            sim = sim.masked_fill(same, float("-inf"))
        return sim.topk(min(k, sim.shape[1]), dim=-1).indices

    def bg(self, index: torch.Tensor) -> torch.Tensor:
        """Scene tokens (B, Tb, D_img) of pool entries ``index`` (B,)."""
        return self.bg_tokens[index.to(self.bg_tokens.device).long()].float()


@torch.no_grad()
def retrieval_table(bank: ReferenceBank, queries: torch.Tensor, owners: torch.Tensor,
                    batch_size: int = 1024) -> torch.Tensor:
    """Top-1 pool index (Q,) for each retrieval query (Q, E), never a scene of the query's own image ``owners``."""
    out = [bank.retrieve(queries[i:i + batch_size], owners[i:i + batch_size])[:, 0].cpu()
           for i in range(0, len(queries), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


__all__ = ["SAM_MODEL_TYPES", "ImageTokenEncoder", "ReferenceBank", "crop_boxes", "crop_objects", "load_dinov2",
           "load_sam_predictor", "masked_crops", "phrase_for", "pool_tokens", "retrieval_table", "sam_masks",
           "select_bank"]
