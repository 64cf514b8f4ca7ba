"""``CRSDiffPipeline``: text + metadata + content image + any subset of the six condition maps -> RS images.

Components: the frozen stage-one parts (``vae``, ``text_encoder``, ``tokenizer``, ``unet`` with an identity class
embedding, DDIM ``scheduler``), the trained condition branch (``adapter`` with its feature extractor,
``metadata_encoder``, ``content_tokenizer``) and the RS-CLIP image tower (``image_encoder``) that embeds content
images. ``save_pretrained`` / ``from_pretrained`` round-trip every part (safetensors) and the sampling defaults
(``guidance_scale``, ``num_inference_steps``, ``negative_prompt`` and what the unconditional branch sees) of the preset
that trained it.

The denoiser is :class:`rslib.models.crs_diff.CRSDiffModel`, the module training optimises: the pipeline calls its
``encode`` once per call and its ``denoise`` at every step. It follows diffusers' pipeline contract
(:mod:`rslib.pipelines.common`).

Classifier-free guidance: the unconditional branch has the negative prompt (the config's, default empty), no
content (the learned null tokens, or with ``null_conditions="zero"`` a zero content embedding, as CRS-Diff does),
the learned null metadata (or, with ``guidance_keeps_metadata``, the same metadata, as CRS-Diff does) and the same
condition maps (or none, with ``map_guidance``).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, ImagePipelineOutput, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from rslib.data.datasets import METADATA_RANGES, normalise_metadata
from rslib.data.records import CONDITION_NAMES, METADATA_FIELDS
from rslib.models.crs_diff import (
    N_METADATA,
    ContentTokenizer,
    CRSDiffModel,
    CRSLocalAdapter,
    MetadataEncoder,
    check_null_conditions,
    control_scales,
    zero_dropped,
)
from rslib.models.text import content_embeddings
from rslib.pipelines.common import (
    RSPipeline,
    check_finite,
    load_pipeline_folder,
    rows_per_prompt,
    seeded_batches,
)

N_CHANNELS = 3 * len(CONDITION_NAMES)  # the condition stack: three channels per map


# ---------------------------------------------------------------------------
# Inputs in every form diffusers accepts for an image


def _unit_range(t: torch.Tensor, name: str, low: float = 0.0) -> torch.Tensor:
    """uint8 (or bool) -> float in [0, 1]; floats must already lie in [low, 1] (and be finite)."""
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    t = t.float()
    check_finite(name, t)
    if t.numel() and (float(t.min()) < low - 1e-3 or float(t.max()) > 1 + 1e-3):
        raise ValueError(f"{name} must lie in [{low:g}, 1] (or be uint8 in 0..255), got values in "
                         f"[{float(t.min()):.3g}, {float(t.max()):.3g}]")
    return t


def _array_image(image: Any, name: str) -> torch.Tensor:
    """One PIL image or numpy array (H, W, 3) / (B, H, W, 3), in [0, 1] or uint8 -> (B, 3, H, W) in [0, 1]."""
    if isinstance(image, PIL.Image.Image):
        image = np.array(image.convert("RGB"))
    a = torch.from_numpy(np.ascontiguousarray(image))
    if a.dtype == torch.bool:
        a = a.float()
    a = a[None] if a.ndim == 3 else a
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{name}: a numpy image must be (H, W, 3) or (B, H, W, 3) (channels last), "
                         f"got {tuple(image.shape)}")
    return _unit_range(a, name).permute(0, 3, 1, 2)


def image_batch(image: Any, name: str = "content_image") -> torch.Tensor:
    """Images in any of diffusers' forms -> (B, 3, H, W) float in [-1, 1]: a PIL image, a numpy array (H, W, 3) /
    (B, H, W, 3) in [0, 1] or uint8, a list of those, or a tensor (3, H, W) / (B, 3, H, W) in [-1, 1]."""
    if torch.is_tensor(image):
        t = image[None] if image.ndim == 3 else image
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"{name}: a tensor image must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
        return _unit_range(t, name) * 2 - 1 if t.dtype == torch.uint8 else _unit_range(t, name, low=-1.0)
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError(f"{name} is an empty list")
    if not all(isinstance(i, (PIL.Image.Image, np.ndarray)) for i in items):
        raise ValueError(f"{name} must be PIL images, numpy arrays or a tensor, got "
                         f"{sorted({type(i).__name__ for i in items})}")
    parts = [_array_image(i, f"{name}[{k}]" if len(items) > 1 else name) for k, i in enumerate(items)]
    if len({tuple(p.shape[-2:]) for p in parts}) > 1:
        raise ValueError(f"{name}: the images of a list must share one size, got "
                         f"{sorted({tuple(p.shape[-2:]) for p in parts})}")
    return torch.cat(parts) * 2 - 1


def _fit(t: torch.Tensor, hw: tuple[int, int], name: str) -> torch.Tensor:
    """Maps (..., h, w) at the images' size ``hw``: resized (nearest) when only the scale differs; another aspect
    ratio is an error (a map is never stretched)."""
    h, w = t.shape[-2:]
    if (h, w) == tuple(hw):
        return t
    if h * hw[1] != w * hw[0]:
        raise ValueError(f"{name} is {h} x {w} but the images are {hw[0]} x {hw[1]}: crop or pad it to the images' "
                         f"aspect ratio (a map is resized, never stretched)")
    batched = t if t.ndim == 4 else t[None]
    out = torch.nn.functional.interpolate(batched, size=tuple(hw), mode="nearest")
    return out if t.ndim == 4 else out[0]


def map_to_tensor(m: Any, size: int | tuple[int, int] | None = None, name: str = "condition map") -> torch.Tensor:
    """One condition map -> (3, H, W) float in [0, 1]: a PIL image, a numpy array (H, W) / (H, W, 1 or 3)
    (channels last) or a tensor (H, W) / (1 or 3, H, W) (channels first), uint8 or in [0, 1]; resized to
    ``size`` ((H, W) or a side) when given."""
    if isinstance(m, PIL.Image.Image):
        m = np.array(m.convert("RGB"))
    if isinstance(m, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(m))
        if t.ndim == 3:
            if t.shape[-1] not in (1, 3):
                raise ValueError(f"{name}: a numpy map must be (H, W) or (H, W, 3) (channels last), got {m.shape}")
            t = t.permute(2, 0, 1)
    elif torch.is_tensor(m):
        t = m
        if t.ndim == 3 and t.shape[0] not in (1, 3):
            raise ValueError(f"{name}: a tensor map must be (H, W) or (3, H, W) (channels first), "
                             f"got {tuple(t.shape)}")
    else:
        raise ValueError(f"{name} must be a PIL image, a numpy array or a tensor, not {type(m).__name__}")
    if t.ndim not in (2, 3):
        raise ValueError(f"{name} must be (H, W), (H, W, 3) or (3, H, W), got {tuple(t.shape)}")
    t = _unit_range(t.float() if t.dtype == torch.bool else t, name)
    t = t[None] if t.ndim == 2 else t
    t = t.expand(3, -1, -1) if t.shape[0] == 1 else t
    if size is not None:
        t = _fit(t, (size, size) if isinstance(size, int) else size, name)
    return t.contiguous()


def conditions_from_maps(maps: Mapping[str, Any], size: int | tuple[int, int], name: str = "conditions"
                         ) -> torch.Tensor:
    """A dict of some of the six maps by name -> the (18, H, W) stack, missing maps zero (= dropped)."""
    unknown = set(maps) - set(CONDITION_NAMES)
    if unknown:
        raise ValueError(f"unknown condition map(s) {sorted(unknown)} in {name}; names: {', '.join(CONDITION_NAMES)}")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    out = torch.zeros(N_CHANNELS, *hw)
    for i, key in enumerate(CONDITION_NAMES):
        if maps.get(key) is not None:
            out[3 * i:3 * i + 3] = map_to_tensor(maps[key], hw, f"{name}[{key!r}]")
    return out


def condition_stack(conditions: Any, batch: int, hw: tuple[int, int]) -> torch.Tensor:
    """Conditions as given -> (B, 18, H, W) float in [0, 1]: None (no maps), a dict of maps by name, the stack
    (18, H, W) / (B, 18, H, W) (tensor or numpy, uint8 or in [0, 1]) or a list of dicts or stacks, one per prompt."""
    if conditions is None:
        return torch.zeros(batch, N_CHANNELS, *hw)
    if isinstance(conditions, Mapping):
        return rows_per_prompt(conditions_from_maps(conditions, hw)[None], batch, "conditions")
    if isinstance(conditions, (list, tuple)):
        stacks = [conditions_from_maps(c, hw, f"conditions[{k}]") if isinstance(c, Mapping)
                  else _stack(c, hw, f"conditions[{k}]")[0] for k, c in enumerate(conditions)]
        return rows_per_prompt(torch.stack(stacks), batch, "conditions")
    return rows_per_prompt(_stack(conditions, hw, "conditions"), batch, "conditions")


def _stack(c: Any, hw: tuple[int, int], name: str) -> torch.Tensor:
    """One (18, H, W) or (B, 18, H, W) stack, uint8 or in [0, 1] -> (B, 18, H, W) float in [0, 1] of size ``hw``."""
    t = torch.from_numpy(np.ascontiguousarray(c)) if isinstance(c, np.ndarray) else c
    if not torch.is_tensor(t):
        raise ValueError(f"{name} must be a dict of maps or an (18, H, W) / (B, 18, H, W) stack, "
                         f"not {type(c).__name__}")
    t = t[None] if t.ndim == 3 else t
    if t.ndim != 4 or t.shape[1] != N_CHANNELS:
        raise ValueError(f"{name} must be an ({N_CHANNELS}, H, W) or (B, {N_CHANNELS}, H, W) stack (channels first), "
                         f"got {tuple(t.shape)}")
    return _fit(_unit_range(t, name), hw, name)


def keep_only(conditions: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """Zero every map of a (B, 18, H, W) stack except ``names`` (the dropout policy's "drop" is a zero map)."""
    unknown = set(names) - set(CONDITION_NAMES)
    if unknown:
        raise ValueError(f"unknown condition map(s) {sorted(unknown)}; names: {', '.join(CONDITION_NAMES)}")
    keep = torch.tensor([n in names for n in CONDITION_NAMES], dtype=conditions.dtype, device=conditions.device)
    return conditions * keep.repeat_interleave(3)[None, :, None, None]


def _raw_metadata(metadata: Mapping[str, Any], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One dict of raw fields -> normalised values (1, 7) and keep mask (1, 7); unknown fields, NaN and values
    outside the model's range are refused."""
    unknown = set(metadata) - set(METADATA_FIELDS)
    if unknown:
        raise ValueError(f"unknown metadata field(s) {sorted(unknown)} in {name}; fields: {', '.join(METADATA_FIELDS)}")
    for key, v in metadata.items():
        if v is None:
            continue
        lo, hi = METADATA_RANGES[key]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(float(v)):
            raise ValueError(f"{name}[{key!r}] must be a finite number (or None for 'unknown'), not {v!r}")
        if not lo <= float(v) <= hi:
            raise ValueError(f"{name}[{key!r}] = {v!r} is outside the range the model knows, {lo:g}..{hi:g}; "
                             f"leave the field out (or None) for 'unknown'")
    v, k = normalise_metadata(dict(metadata))
    return torch.from_numpy(v)[None], torch.from_numpy(k)[None]


def metadata_tensors(metadata: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Metadata as given -> (values (B, 7) in [0, 1], keep (B, 7) bool).

    Accepts None (every field unknown: the learned nulls), a dict of raw fields (missing fields = unknown), a list
    of such dicts (one per prompt), a (B, 7) / (7,) tensor already normalised, or a (values, valid) pair of
    tensors. Raw fields outside the model's range (``METADATA_RANGES``, e.g. month 99) are refused.
    """
    if metadata is None:
        return torch.zeros(batch, N_METADATA), torch.zeros(batch, N_METADATA, dtype=torch.bool)
    if isinstance(metadata, Mapping):
        values, keep = _raw_metadata(metadata, "metadata")
    elif isinstance(metadata, (list, tuple)) and metadata and isinstance(metadata[0], Mapping):
        pairs = [_raw_metadata(m, f"metadata[{i}]") for i, m in enumerate(metadata)]
        values, keep = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    else:
        if isinstance(metadata, (list, tuple)) and len(metadata) == 2 and torch.is_tensor(metadata[0]):
            values, keep = metadata
        else:
            values = torch.as_tensor(metadata, dtype=torch.float32)
            keep = torch.ones_like(values, dtype=torch.bool)
        values, keep = values.float(), keep.bool()
        values, keep = (values[None], keep[None]) if values.ndim == 1 else (values, keep)
        if values.ndim != 2 or values.shape[-1] != N_METADATA or keep.shape != values.shape:
            raise ValueError(f"metadata needs {N_METADATA} fields ({', '.join(METADATA_FIELDS)}), got "
                             f"{tuple(values.shape)}")
        check_finite("metadata", values)
        if bool(((values < 0) | (values > 1))[keep].any()):
            raise ValueError("normalised metadata must lie in [0, 1] (pass a dict of raw fields to have them "
                             "normalised)")
    return rows_per_prompt(values, batch, "metadata"), rows_per_prompt(keep, batch, "metadata")


# ---------------------------------------------------------------------------
# The pipeline


class CRSDiffPipeline(RSPipeline):
    """CRS-Diff generation: prompt, six condition maps (any subset), metadata, content image; DDIM + CFG."""

    # Modules run once per call, in order; the adapter runs at every step beside the UNet, so it is offloaded on its
    # own (as diffusers' ControlNet pipelines do theirs) and stays on the device for the whole loop.
    model_cpu_offload_seq = "text_encoder->image_encoder->content_tokenizer->metadata_encoder->unet->vae"
    _optional_components = ["metadata_encoder", "content_tokenizer", "image_encoder"]
    DEFAULT_STEPS = 25

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: DDIMScheduler, adapter: CRSLocalAdapter,
                 metadata_encoder: MetadataEncoder | None = None, content_tokenizer: ContentTokenizer | None = None,
                 image_encoder: CLIPVisionModelWithProjection | None = None, map_guidance: bool = False,
                 guidance_scale: float | None = None, num_inference_steps: int | None = None,
                 condition_maps: Sequence[str] | None = None, negative_prompt: str | None = None,
                 guidance_keeps_metadata: bool = False, null_conditions: str = "learned"):
        super().__init__()
        if unet is not None and unet.config.class_embed_type != "identity":
            raise ValueError("CRSDiffPipeline needs the UNet with class_embed_type='identity' "
                             "(rslib.models.crs_diff.load_frozen_unet / with_identity_class_embedding)")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler, adapter=adapter, metadata_encoder=metadata_encoder,
                              content_tokenizer=content_tokenizer, image_encoder=image_encoder)
        # the defaults of __call__, saved with the folder (train_crs_diff stores its preset's)
        check_null_conditions(null_conditions)
        self.register_to_config(map_guidance=bool(map_guidance), guidance_scale=guidance_scale,
                                num_inference_steps=num_inference_steps, negative_prompt=negative_prompt,
                                guidance_keeps_metadata=bool(guidance_keeps_metadata), null_conditions=null_conditions)
        # the maps the adapter was trained on (crs.condition_maps; None: all six): the others are always zero
        self.register_to_config(condition_maps=None if condition_maps is None else list(condition_maps))

    def denoiser(self) -> CRSDiffModel:
        """The conditional denoiser over this pipeline's parts (shares their weights): the module training optimises."""
        return CRSDiffModel(self.unet, self.adapter, self.metadata_encoder, self.content_tokenizer)

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str] | None, device: torch.device, num_images_per_prompt: int,
                      do_classifier_free_guidance: bool, negative_prompt: str | list[str] | None = None,
                      prompt_embeds: torch.Tensor | None = None,
                      negative_prompt_embeds: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds (B n, L, D), negative_prompt_embeds (B n, L, D) or None without guidance), as diffusers'
        ``StableDiffusionPipeline.encode_prompt``: the text tower's last hidden state, padded to the tokenizer's
        length; given embeddings are used as they are; needs only ``tokenizer`` and ``text_encoder``."""
        embeds, negative, _ = self._encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                                                  negative_prompt, prompt_embeds, negative_prompt_embeds)
        return embeds, negative

    @torch.no_grad()
    def encode_content(self, images: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """CLIP image embeddings (B, D) of content images in [-1, 1] (B, 3, H, W)."""
        if self.image_encoder is None:
            raise ValueError("this pipeline has no image_encoder: pass content_embeds= instead of content_image=")
        return content_embeddings(self.image_encoder, images, device=device or self._execution_device)

    def _content(self, content_image: Any, content_embeds: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The content input checked, before any compute: images (1 or B, 3, H, W) in [-1, 1], embeddings
        (1 or B, D), or None (the learned null). Without a content tokenizer the content is not used."""
        if content_image is not None and content_embeds is not None:
            raise ValueError("pass content_image or content_embeds, not both")
        if self.content_tokenizer is None:
            return None
        if content_embeds is not None:
            d = self.content_tokenizer.config.in_dim
            t = content_embeds[None] if content_embeds.ndim == 1 else content_embeds
            if t.ndim != 2 or t.shape[-1] != d:
                raise ValueError(f"content_embeds must be ({d},) or (B, {d}), got {tuple(content_embeds.shape)}")
            check_finite("content_embeds", t)
            rows_per_prompt(t, batch, "content_embeds")
            return t
        if content_image is None:
            return None
        if self.image_encoder is None:
            raise ValueError("this pipeline has no image_encoder: pass content_embeds= instead of content_image=")
        images = image_batch(content_image, "content_image")
        rows_per_prompt(images, batch, "content_image")
        return images

    def _content_embeds(self, content: torch.Tensor | None, batch: int, device: torch.device,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (B, D), keep (B,)): of the given images or embeddings, else zeros that the null replaces."""
        if content is not None and content.ndim == 4:
            content = self.encode_content(content, device)
        keep = torch.full((batch,), content is not None, dtype=torch.bool, device=device)
        if content is None:
            d = self.content_tokenizer.config.in_dim if self.content_tokenizer is not None else 1
            return torch.zeros(batch, d, device=device), keep
        return rows_per_prompt(content.to(device), batch, "content"), keep

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        conditions: Any = None,
        metadata: Any = None,
        content_image: Any = None,
        content_embeds: torch.Tensor | None = None,
        control_scale: float | Sequence[float] = 1.0,
        global_strength: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        text_only: bool = False,
        map_guidance: bool | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        """Generate images (diffusers' arguments as in ``StableDiffusionPipeline``, plus CRS-Diff's conditions).

        ``conditions``: None, a dict of maps by name (``lines``, ``soft_edges``, ``sketch``, ``road``, ``depth``,
        ``segmentation``; each a PIL image, a numpy array (H, W) / (H, W, 3), or a tensor (H, W) / (3, H, W), uint8
        or in [0, 1]), a list of such dicts (one per prompt), or the stack (18, H, W) / (B, 18, H, W) (uint8 or in
        [0, 1]); absent maps are zero, which is how training drops them. A map of another size is resized
        (nearest) when its aspect ratio is the images'; another aspect ratio is refused. ``metadata``: a dict of
        raw fields (e.g. ``{"cloud_cover": 60, "month": 7}``; absent fields use the learned null; values outside
        the model's range are refused), a list of dicts, or normalised (B, 7) values. ``content_image``: a PIL
        image, a numpy array (H, W, 3) / (B, H, W, 3) in [0, 1] or uint8, a list of those, or a tensor in [-1, 1]
        (or ``content_embeds``); None = learned null. Every per-image input gives one entry for all prompts or
        one per prompt. ``control_scale`` scales the adapter's residuals (0 = none; a list gives one scale per
        residual). ``text_only=True`` runs the frozen stage-one UNet alone (no residuals, metadata or content).
        ``map_guidance``: the unconditional branch of classifier-free guidance sees no maps (all zero, the "drop
        all" case of training), so the guidance scale amplifies the maps as it amplifies the prompt; off
        (CRS-Diff's own choice) both branches see the same maps. ``guidance_scale``, ``num_inference_steps``,
        ``negative_prompt`` and ``map_guidance`` default to the pipeline's config (the preset that trained it). ``output_type``: "pil"
        (default), "np" (B, H, W, 3) in [0, 1], "pt" (B, 3, H, W) in [0, 1] or "latent".
        """
        guidance_scale, num_inference_steps = self.sampling_defaults(guidance_scale, num_inference_steps)
        side = self.unet.config.sample_size * self.vae_scale_factor
        height, width = side if height is None else height, side if width is None else width
        batch = self.prompt_batch(prompt, prompt_embeds)
        self.check_common_inputs(batch, height, width, num_inference_steps, guidance_scale, eta,
                                 num_images_per_prompt, generator, latents, output_type, negative_prompt,
                                 prompt_embeds, negative_prompt_embeds, callback_on_step_end,
                                 callback_on_step_end_tensor_inputs, cross_attention_kwargs)
        if map_guidance is None:
            map_guidance = bool(self.config.get("map_guidance", False))
        # every condition converted and checked before any compute
        check_finite("global_strength", global_strength)
        scales = [0.0] if text_only else control_scales(control_scale, self.adapter.num_residuals)
        maps = condition_stack(conditions, batch, (height, width)) if any(s != 0.0 for s in scales) else None
        trained = self.config.get("condition_maps")
        if maps is not None and trained is not None and set(trained) != set(CONDITION_NAMES):
            maps = keep_only(maps, trained)
        values, keep_m = metadata_tensors(metadata, batch)
        content = self._content(content_image, content_embeds, batch)

        device, dtype = self._execution_device, self.unet.dtype
        self.start_call(guidance_scale, cross_attention_kwargs)
        guiding = self.do_classifier_free_guidance
        n = num_images_per_prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, n, guiding, negative_prompt, prompt_embeds, negative_prompt_embeds)
        text = torch.cat([negative_prompt_embeds, prompt_embeds]) if guiding else prompt_embeds  # [uncond ; cond]
        text = text.to(dtype)

        def both_branches(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
            """Per-prompt rows -> per-image rows (n per prompt), [uncond ; cond] while guiding."""
            cond, uncond = cond.repeat_interleave(n, dim=0), uncond.repeat_interleave(n, dim=0)
            return torch.cat([uncond, cond]) if guiding else cond

        if text_only:  # the frozen stage-one UNet: no metadata, content or residuals
            model = CRSDiffModel(self.unet, self.adapter)
            encoded = model.encode(text, control_scale=0.0)
        else:
            model = self.denoiser()
            embeds, keep_c = self._content_embeds(content, batch, device)
            values, keep_m = values.to(device), keep_m.to(device)
            features = None
            if maps is not None:
                cond = maps.to(device, dtype)  # (B, 18, H, W)
                feats = self.adapter.features(cond)  # once: the maps do not change over the steps
                unfeats = self.adapter.features(torch.zeros_like(cond)) if map_guidance and guiding else feats
                features = [both_branches(f, u) for f, u in zip(feats, unfeats)]
            dropped_c = torch.zeros_like(keep_c)  # the unconditional branch has no content
            dropped_m = keep_m if self.config.get("guidance_keeps_metadata", False) else torch.zeros_like(keep_m)
            content_in = (both_branches(embeds, embeds), both_branches(keep_c, dropped_c))
            metadata_in = (both_branches(values, values), both_branches(keep_m, dropped_m))
            if self.config.get("null_conditions", "learned") == "zero":  # zeros through the encoders, no nulls
                content_in, metadata_in = zero_dropped(*content_in), zero_dropped(*metadata_in)
            encoded = model.encode(text, None, *content_in, *metadata_in, scales, global_strength, features=features)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(batch * n, height, width, dtype, device, generator, latents)

        def predict_noise(x: torch.Tensor, t: Any, text_states: torch.Tensor) -> torch.Tensor:
            return model.denoise(x, t, replace(encoded, text=text_states), self.cross_attention_kwargs)

        latents = self.denoise(latents, predict_noise, text, negative_prompt_embeds,
                               self.prepare_extra_step_kwargs(generator, eta), callback_on_step_end,
                               callback_on_step_end_tensor_inputs)
        return self.finish_call(latents, output_type, return_dict)


def load_crs_diff(path: str | os.PathLike, device: str | torch.device | None = None) -> CRSDiffPipeline:
    """A saved CRS-Diff folder (from ``train_crs_diff``) as a pipeline on ``device``, progress bar off."""
    return load_pipeline_folder(CRSDiffPipeline, path, device, f"{path} is not a CRS-Diff folder: run notebook 03 "
                                f"(rslib.train.crs_diff.train_crs_diff(cfg)) first")


@torch.no_grad()
def sample_crs_diff(pipe: CRSDiffPipeline, prompts: Sequence[str], seed: int, *, conditions: torch.Tensor | None = None,
                    maps: Sequence[str] | None = CONDITION_NAMES, metadata: Any = None,
                    content_images: torch.Tensor | None = None, control_scale: float = 1.0,
                    guidance_scale: float | None = None, steps: int | None = None, batch_size: int = 64,
                    same_noise: bool = False, map_guidance: bool | None = None) -> torch.Tensor:
    """Images (N, 3, S, S) in [-1, 1] for N prompts; image i starts from noise seeded by ``seed + i``
    (by ``seed`` for every image with ``same_noise``, for sweeps of one knob).

    ``conditions``: the (N, 18, S, S) stack (uint8 or [0, 1]) of which only ``maps`` are kept (the others are
    zero, as training drops them); ``maps=None`` runs the frozen stage-one model (text only). ``metadata``: one
    dict for all images, a list of dicts, or None (learned null). ``content_images`` (N, 3, S, S) in [-1, 1] or
    None (learned null). ``guidance_scale`` / ``steps``: None = the pipeline's defaults. Like
    ``sample_stage_one``, an image's noise depends only on (seed, index).
    """
    prompts = list(prompts)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def run(i: int, j: int, generators: list[torch.Generator]) -> torch.Tensor:
        sl = slice(i, j)
        cond = None
        if maps is not None and conditions is not None:
            c = conditions[sl]
            c = c.float() / 255.0 if c.dtype == torch.uint8 else c.float()
            cond = keep_only(c, maps)
        if isinstance(metadata, list):
            meta = metadata[sl]
        elif isinstance(metadata, tuple):  # (values (N, 7), keep (N, 7))
            meta = (metadata[0][sl], metadata[1][sl])
        else:
            meta = metadata
        content = content_images[sl] if content_images is not None else None
        res = pipe(prompts[sl], conditions=cond if cond is not None else torch.zeros(j - i, 18, size, size),
                   metadata=meta, content_image=content, control_scale=control_scale,
                   guidance_scale=guidance_scale, num_inference_steps=steps, generator=generators, output_type="pt",
                   text_only=maps is None, map_guidance=map_guidance)
        return res.images.cpu() * 2 - 1

    out = seeded_batches(run, len(prompts), seed, batch_size, pipe._execution_device, same_noise)
    return torch.cat(out) if out else torch.zeros(0, 3, size, size)


__all__ = ["CRSDiffPipeline", "condition_stack", "conditions_from_maps", "image_batch",
           "keep_only", "load_crs_diff", "map_to_tensor", "metadata_tensors", "sample_crs_diff"]
