"""``CRSDiffPipeline``: text + metadata + content image + any subset of the six condition maps -> RS images.

Components: the frozen stage-one parts (``vae``, ``text_encoder``, ``tokenizer``, ``unet`` with an identity class
embedding, DDIM ``scheduler``), the trained condition branch (``adapter`` with its feature extractor,
``metadata_encoder``, ``content_tokenizer``) and the RS-CLIP image tower (``image_encoder``) that embeds content
images. ``save_pretrained`` / ``from_pretrained`` round-trip every part (safetensors).

Classifier-free guidance: the unconditional branch has the negative (default empty) prompt, the learned null
content tokens and the learned null metadata; the condition maps are the same in both branches (as upstream).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from rslib.data.datasets import normalise_metadata
from rslib.data.formats import CONDITION_NAMES, METADATA_FIELDS
from rslib.models.crs_diff import (
    N_METADATA,
    ContentTokenizer,
    CRSDiffModel,
    CRSLocalAdapter,
    MetadataEncoder,
    _scales,
)
from rslib.pipelines.common import check_output_type, decode_latents, load_pipeline_folder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

def map_to_tensor(m: np.ndarray | torch.Tensor, size: int | None = None) -> torch.Tensor:
    """One condition map -> (3, H, W) float in [0, 1]: uint8 or float, (H, W), (H, W, 3) or (3, H, W)."""
    t = torch.as_tensor(np.asarray(m) if not torch.is_tensor(m) else m)
    floating = t.is_floating_point()
    t = t.float() if floating else t.float() / 255.0
    if t.ndim == 2:
        t = t[None].expand(3, -1, -1)
    elif t.ndim == 3 and t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3):
        t = t.permute(2, 0, 1)  # HWC -> CHW
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"a condition map must be (H, W), (H, W, 3) or (3, H, W), got {tuple(t.shape)}")
    if size is not None and t.shape[-1] != size:
        t = torch.nn.functional.interpolate(t[None], size=(size, size), mode="nearest")[0]
    return t.contiguous()


def conditions_from_maps(maps: Mapping[str, Any], size: int) -> torch.Tensor:
    """A dict of some of the six maps by name -> the (18, size, size) stack, missing maps zero (= dropped)."""
    unknown = set(maps) - set(CONDITION_NAMES)
    if unknown:
        raise ValueError(f"unknown condition map(s) {sorted(unknown)}; names: {', '.join(CONDITION_NAMES)}")
    out = torch.zeros(3 * len(CONDITION_NAMES), size, size)
    for i, name in enumerate(CONDITION_NAMES):
        if maps.get(name) is not None:
            out[3 * i:3 * i + 3] = map_to_tensor(maps[name], size)
    return out


def keep_only(conditions: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """Zero every map of a (B, 18, H, W) stack except ``names`` (the dropout policy's "drop" is a zero map)."""
    unknown = set(names) - set(CONDITION_NAMES)
    if unknown:
        raise ValueError(f"unknown condition map(s) {sorted(unknown)}; names: {', '.join(CONDITION_NAMES)}")
    keep = torch.tensor([n in names for n in CONDITION_NAMES], dtype=conditions.dtype, device=conditions.device)
    return conditions * keep.repeat_interleave(3)[None, :, None, None]


def metadata_tensors(metadata: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Metadata as given -> (values (B, 7) in [0, 1], keep (B, 7) bool).

    Accepts a dict of raw fields (missing fields = unknown, learned null), a list of such dicts (one per
    image), a (B, 7) / (7,) tensor already normalised, or a (values, valid) pair of tensors.
    """
    if isinstance(metadata, Mapping):
        unknown = set(metadata) - set(METADATA_FIELDS)
        if unknown:
            raise ValueError(f"unknown metadata field(s) {sorted(unknown)}; fields: {', '.join(METADATA_FIELDS)}")
        v, k = normalise_metadata(dict(metadata))
        return torch.from_numpy(v)[None].expand(batch, -1), torch.from_numpy(k)[None].expand(batch, -1)
    if isinstance(metadata, (list, tuple)) and metadata and isinstance(metadata[0], Mapping):
        pairs = [metadata_tensors(m, 1) for m in metadata]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    if isinstance(metadata, (list, tuple)) and len(metadata) == 2 and torch.is_tensor(metadata[0]):
        values, keep = metadata
    else:
        values = torch.as_tensor(metadata, dtype=torch.float32)
        keep = torch.ones_like(values, dtype=torch.bool)
    values, keep = values.float(), keep.bool()
    if values.ndim == 1:
        values, keep = values[None].expand(batch, -1), keep[None].expand(batch, -1)
    if values.shape[-1] != N_METADATA:
        raise ValueError(f"metadata needs {N_METADATA} fields ({', '.join(METADATA_FIELDS)}), got {values.shape}")
    return values, keep


def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> CLIP vision input (B, 3, size, size), CLIP mean/std normalised."""
    x = (images.float() + 1.0) / 2.0
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                                            antialias=True).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device)[None, :, None, None]
    std = torch.tensor(CLIP_STD, device=x.device)[None, :, None, None]
    return (x - mean) / std


@torch.no_grad()
def content_embeddings(image_encoder: CLIPVisionModelWithProjection, images: torch.Tensor,
                       batch_size: int = 256) -> torch.Tensor:
    """L2-normalised CLIP image embeddings (B, D) of content images in [-1, 1] (B, 3, H, W)."""
    size = image_encoder.config.image_size
    dev = next(image_encoder.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        px = clip_pixels(images[i:i + batch_size].to(dev), size).to(image_encoder.dtype)
        emb = image_encoder(pixel_values=px).image_embeds  # (b, D)
        out.append(torch.nn.functional.normalize(emb.float(), dim=-1))
    return torch.cat(out)


class CRSDiffPipeline(DiffusionPipeline):
    """CRS-Diff generation: prompt, six condition maps (any subset), metadata, content image; DDIM + CFG."""

    model_cpu_offload_seq = "text_encoder->image_encoder->adapter->unet->vae"
    _optional_components = ["metadata_encoder", "content_tokenizer", "image_encoder"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: DDIMScheduler, adapter: CRSLocalAdapter,
                 metadata_encoder: MetadataEncoder | None = None, content_tokenizer: ContentTokenizer | None = None,
                 image_encoder: CLIPVisionModelWithProjection | None = None, map_guidance: bool = False,
                 condition_maps: Sequence[str] | None = None):
        super().__init__()
        if unet.config.class_embed_type != "identity":
            raise ValueError("CRSDiffPipeline needs the UNet with class_embed_type='identity' "
                             "(rslib.models.crs_diff.load_frozen_unet / with_identity_class_embedding)")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler, adapter=adapter, metadata_encoder=metadata_encoder,
                              content_tokenizer=content_tokenizer, image_encoder=image_encoder)
        self.register_to_config(map_guidance=bool(map_guidance))  # the default of __call__, saved with the folder
        # the maps the adapter was trained on (crs.condition_maps; None: all six): the others are always zero
        self.register_to_config(condition_maps=None if condition_maps is None else list(condition_maps))
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def denoiser(self) -> CRSDiffModel:
        """The conditional denoiser over this pipeline's parts (shares their weights)."""
        return CRSDiffModel(self.unet, self.adapter, self.metadata_encoder, self.content_tokenizer)

    @torch.no_grad()
    def encode_prompt(self, prompt: Sequence[str]) -> torch.Tensor:
        """Text states (B, L, D): the last hidden state of the text tower, padded to the tokenizer's length."""
        ids = self.tokenizer(list(prompt), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0].to(self.unet.dtype)

    @torch.no_grad()
    def encode_content(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings (B, D) of content images in [-1, 1] (B, 3, H, W)."""
        if self.image_encoder is None:
            raise ValueError("this pipeline has no image_encoder: pass content_embeds= instead of content_image=")
        return content_embeddings(self.image_encoder, images)

    def _conditions(self, conditions: Any, batch: int, size: int) -> torch.Tensor:
        """Conditions as given -> (B, 18, size, size) on the pipeline's device."""
        if conditions is None:
            c = torch.zeros(batch, 3 * len(CONDITION_NAMES), size, size)
        elif isinstance(conditions, Mapping):
            c = conditions_from_maps(conditions, size)[None].expand(batch, -1, -1, -1)
        elif isinstance(conditions, (list, tuple)):
            c = torch.stack([conditions_from_maps(m, size) if isinstance(m, Mapping) else torch.as_tensor(m).float()
                             for m in conditions])
        else:
            c = torch.as_tensor(conditions).float()
            if c.ndim == 3:
                c = c[None].expand(batch, -1, -1, -1)
            if c.shape[-1] != size:
                c = torch.nn.functional.interpolate(c, size=(size, size), mode="nearest")
        if c.shape[0] != batch or c.shape[1] != 3 * len(CONDITION_NAMES):
            raise ValueError(f"conditions must give (B={batch}, 18, H, W), got {tuple(c.shape)}")
        trained = self.config.get("condition_maps")
        if trained is not None and set(trained) != set(CONDITION_NAMES):
            c = keep_only(c, trained)
        return c.to(self.device, self.unet.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        conditions: Any = None,
        metadata: Any = None,
        content_image: torch.Tensor | None = None,
        content_embeds: torch.Tensor | None = None,
        control_scale: float | Sequence[float] = 1.0,
        global_strength: float = 1.0,
        guidance_scale: float = 4.0,
        num_inference_steps: int = 25,
        generator: torch.Generator | list[torch.Generator] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        text_only: bool = False,
        map_guidance: bool | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate images.

        ``conditions``: None, a dict of maps by name (``lines``, ``soft_edges``, ``sketch``, ``road``, ``depth``,
        ``segmentation``; arrays (H, W) / (H, W, 3) uint8 or tensors in [0, 1]), a list of such dicts, or the
        (B, 18, H, W) stack; absent maps are zero, which is how training drops them. ``metadata``: a dict of raw
        fields (e.g. ``{"cloud_cover": 60, "month": 7}``; absent fields use the learned null), a list of dicts,
        or normalised (B, 7) values. ``content_image`` in [-1, 1] (or ``content_embeds``); None = learned null.
        ``control_scale`` scales the adapter's residuals (0 = none; a list gives one scale per residual).
        ``text_only=True`` runs the frozen stage-one UNet alone (no residuals, metadata or content).
        ``map_guidance``: the unconditional branch of classifier-free guidance sees no maps (all zero, the
        "drop all" case of training), so the guidance scale amplifies the maps as it amplifies the prompt; off
        (CRS-Diff's own choice) both branches see the same maps. None: the pipeline's ``config.map_guidance``
        (``crs.map_guidance`` of the preset it was trained at).
        ``output_type``: "np" (B, H, W, 3) in [0, 1], "pt" (B, 3, H, W) in [0, 1], "pil" or "latent".
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        b = len(prompts)
        size = height or width or self.unet.config.sample_size * self.vae_scale_factor
        if (height or size) != (width or size):
            raise ValueError("CRSDiffPipeline generates square images: give height == width")
        device, dtype = self.device, self.unet.dtype
        check_output_type(output_type)
        do_cfg = guidance_scale > 1.0
        if map_guidance is None:
            map_guidance = bool(self.config.get("map_guidance", False))
        model = self.denoiser()

        text = self.encode_prompt(prompts)  # (B, L, D)
        if do_cfg:
            neg = negative_prompt if negative_prompt is not None else ""
            negs = [neg] * b if isinstance(neg, str) else list(neg)
            text = torch.cat([self.encode_prompt(negs), text])  # (2B, L, D): [uncond, cond]

        if text_only:
            ctx = text
            meta = torch.zeros(text.shape[0], self.unet.config.time_embedding_dim
                               or 4 * self.unet.config.block_out_channels[0], device=device, dtype=dtype)
            scales = [0.0]
        else:
            # content tokens: the image's (cond branch) vs the learned null (uncond branch)
            if content_embeds is None and content_image is not None and self.content_tokenizer is not None:
                img = torch.as_tensor(content_image)
                content_embeds = self.encode_content(img[None] if img.ndim == 3 else img)
            if content_embeds is not None:
                content_embeds = content_embeds.to(device)
                if content_embeds.shape[0] == 1 and b > 1:
                    content_embeds = content_embeds.expand(b, -1)
            keep_c = torch.full((b,), content_embeds is not None, dtype=torch.bool, device=device)
            if content_embeds is None:
                e_dim = self.content_tokenizer.config.in_dim if self.content_tokenizer is not None else 1
                content_embeds = torch.zeros(b, e_dim, device=device)
            if do_cfg:
                content_embeds = torch.cat([content_embeds, content_embeds])
                keep_c = torch.cat([torch.zeros_like(keep_c), keep_c])
            ctx = model.context(text, content_embeds, keep_c, global_strength)  # (2B, L + K, D)

            if metadata is not None:
                values, keep_m = metadata_tensors(metadata, b)
            else:
                values = torch.zeros(b, N_METADATA)
                keep_m = torch.zeros(b, N_METADATA, dtype=torch.bool)
            values, keep_m = values.to(device), keep_m.to(device)
            if do_cfg:
                values = torch.cat([values, values])
                keep_m = torch.cat([torch.zeros_like(keep_m), keep_m])
            meta = model.metadata_embedding(text, values, keep_m).to(dtype)  # (2B, E)
            scales = _scales(control_scale, self.adapter.num_residuals)

        use_adapter = any(s != 0.0 for s in scales)
        feats = None
        if use_adapter:
            cond = self._conditions(conditions, b, size)  # (B, 18, S, S)
            feats = self.adapter.extractor(cond)  # once: the maps do not change over the steps
            if do_cfg:
                uncond = self.adapter.extractor(torch.zeros_like(cond)) if map_guidance else feats
                feats = [torch.cat([u, f]) for u, f in zip(uncond, feats)]

        shape = (b, self.unet.config.in_channels, size // self.vae_scale_factor, size // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device, dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = {"eta": eta, "generator": generator} if isinstance(self.scheduler, DDIMScheduler) else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            x = torch.cat([latents] * 2) if do_cfg else latents
            x = self.scheduler.scale_model_input(x, t)
            down, mid = (self.adapter(x, t, ctx, None, meta, scales, features=feats) if use_adapter
                         else (None, None))
            eps = self.unet(x, t, encoder_hidden_states=ctx, class_labels=meta, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid, return_dict=False)[0]
            if do_cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            latents = self.scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]

        images = decode_latents(self, latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def load_crs_diff(path: str | os.PathLike, device: str | torch.device | None = None) -> CRSDiffPipeline:
    """A saved CRS-Diff folder (from ``train_crs_diff``) as a pipeline on ``device``, progress bar off."""
    return load_pipeline_folder(CRSDiffPipeline, path, device, f"{path} is not a CRS-Diff folder: run notebook 03 "
                                f"(rslib.train.crs_diff.train_crs_diff(cfg)) first")


@torch.no_grad()
def sample_crs_diff(pipe: CRSDiffPipeline, prompts: Sequence[str], seed: int, *, conditions: torch.Tensor | None = None,
                    maps: Sequence[str] | None = CONDITION_NAMES, metadata: Any = None,
                    content_images: torch.Tensor | None = None, control_scale: float = 1.0,
                    guidance_scale: float = 4.0, steps: int = 20, batch_size: int = 64,
                    same_noise: bool = False, map_guidance: bool | None = None) -> torch.Tensor:
    """Images (N, 3, S, S) in [-1, 1] for N prompts; image i starts from noise seeded by ``seed + i``
    (by ``seed`` for every image with ``same_noise``, for sweeps of one knob).

    ``conditions``: the (N, 18, S, S) stack (uint8 or [0, 1]) of which only ``maps`` are kept (the others are
    zero, as training drops them); ``maps=None`` runs the frozen stage-one model (text only). ``metadata``: one
    dict for all images, a list of dicts, or None (learned null). ``content_images`` (N, 3, S, S) in [-1, 1] or
    None (learned null). Like ``sample_stage_one``, an image's noise depends only on (seed, index).
    """
    prompts = list(prompts)
    n = len(prompts)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    gen_device = "cpu" if pipe.device.type == "mps" else pipe.device
    out = []
    for i in range(0, n, batch_size):
        sl = slice(i, min(i + batch_size, n))
        b = sl.stop - sl.start
        gens = [torch.Generator(device=gen_device).manual_seed(seed + (0 if same_noise else k))
                for k in range(sl.start, sl.stop)]
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
        res = pipe(prompts[sl], conditions=cond if cond is not None else torch.zeros(b, 18, size, size),
                   metadata=meta, content_image=content, control_scale=control_scale,
                   guidance_scale=guidance_scale, num_inference_steps=steps, generator=gens, output_type="pt",
                   text_only=maps is None, map_guidance=map_guidance)
        out.append(res.images.cpu() * 2 - 1)
    return torch.cat(out) if out else torch.zeros(0, 3, size, size)
