"""``CCDiffPipeline``: caption + layout (labelled boxes or oriented boxes) -> RS images (CC-Diff).

Components: the frozen stage-one parts (``vae``, ``text_encoder``, ``tokenizer``, ``unet``, DDIM ``scheduler``),
the trained ``adapter`` (:class:`rslib.models.cc_diff.CCDiffAdapter`: box net, dual resampler with the context
bridge, fusion modules installed as attention processors) and the ``references`` bank
(:class:`rslib.models.references.ReferenceBank`: class list, instance reference tokens, the background retrieval
pool). ``save_pretrained`` / ``from_pretrained`` round-trip every part (safetensors).

A layout is a list of objects, each ``{"label": "ship", "bbox": [x0, y0, x1, y1]}`` or
``{"label": "ship", "obb": [x1, y1, ..., x4, y4]}`` (normalised to [0, 1]); pass one layout for all prompts or
one per prompt. Each instance's reference is the bank crop of its class whose aspect ratio is closest to the
box; the background reference is the training scene the caption retrieves (top-1 CLIP text -> image).

Classifier-free guidance: the unconditional branch drops the caption (negative prompt, default "") and every
instance and reference: it is the plain stage-one UNet, as upstream. With a fresh (zero-initialised) adapter
and an empty layout the pipeline therefore reproduces the stage-one ``StableDiffusionPipeline`` exactly.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from rslib.models.cc_diff import (
    CCDiffAdapter,
    CCDiffContext,
    boxes_to_obb,
    concat_contexts,
    install_processors,
    obb_to_boxes,
)
from rslib.models.references import ReferenceBank
from rslib.pipelines.common import check_output_type, decode_latents, load_pipeline_folder

Layout = Sequence[Mapping[str, Any]]


def _numbers(value: Any, n: int, where: str) -> list[float]:
    """``value`` as n finite floats in [0, 1] (a small tolerance is clamped), or a ValueError naming ``where``."""
    try:
        vals = [float(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be {n} numbers, got {value!r}") from None
    if len(vals) != n:
        raise ValueError(f"{where} must be {n} numbers, got {len(vals)}: {value!r}")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{where} must be finite numbers, got {value!r}")
    if any(v < -1e-3 or v > 1 + 1e-3 for v in vals):
        raise ValueError(f"{where} must be normalised to [0, 1] (divide pixel coordinates by the image size), "
                         f"got {value!r}")
    return [min(1.0, max(0.0, v)) for v in vals]


def layout_tensors(layouts: Sequence[Layout], references: ReferenceBank) -> dict[str, torch.Tensor]:
    """Per-image layouts -> ``boxes`` (B, N, 4), ``obb`` (B, N, 8), ``labels`` (B, N) (-1 = padding), ``valid``
    (B, N); N is the largest object count (at least 1). Errors name the offending field, e.g. ``layout[1][0]['bbox']``."""
    b = len(layouts)
    n = max(1, max((len(lay) for lay in layouts), default=0))  # an empty layout: one padded (invalid) instance
    boxes, obb = torch.zeros(b, n, 4), torch.zeros(b, n, 8)
    labels = torch.full((b, n), -1, dtype=torch.long)
    valid = torch.zeros(b, n, dtype=torch.bool)
    for i, lay in enumerate(layouts):
        for k, obj in enumerate(lay):
            where = f"layout[{i}][{k}]"
            if not isinstance(obj, Mapping):
                raise ValueError(f"{where} must be a dict with 'label' and 'bbox' or 'obb', got {obj!r}")
            unknown = set(obj) - {"label", "bbox", "obb"}
            if unknown:
                raise ValueError(f"{where} has unknown field(s) {sorted(unknown)}: use 'label', 'bbox', 'obb'")
            if "label" not in obj:
                raise ValueError(f"{where} has no 'label'")
            labels[i, k] = references.class_index(obj["label"], f"{where}['label']")
            o = box = None
            if obj.get("obb") is not None:
                o = torch.tensor(_numbers(obj["obb"], 8, f"{where}['obb']"))
                pts = o.view(4, 2)
                nxt = pts.roll(-1, 0)
                if 0.5 * abs(float((pts[:, 0] * nxt[:, 1] - nxt[:, 0] * pts[:, 1]).sum())) <= 0:
                    raise ValueError(f"{where}['obb'] has zero area: give the 4 corners x1, y1, ..., x4, y4 in order")
            if obj.get("bbox") is not None:
                box = torch.tensor(_numbers(obj["bbox"], 4, f"{where}['bbox']"))
                if not (box[2] > box[0] and box[3] > box[1]):
                    raise ValueError(f"{where}['bbox'] must satisfy x0 < x1 and y0 < y1, got {box.tolist()}")
            if o is None and box is None:
                raise ValueError(f"{where} needs a 'bbox' [x0, y0, x1, y1] or an 'obb' [x1, y1, ..., x4, y4]")
            obb[i, k] = o if o is not None else boxes_to_obb(box[None])[0]
            box = box if box is not None else obb_to_boxes(o[None])[0]
            boxes[i, k] = box
            valid[i, k] = True
    return {"boxes": boxes, "obb": obb, "labels": labels, "valid": valid}


def _per_image_layouts(layout: Any, b: int) -> list[list[Mapping[str, Any]]]:
    """None, one layout (a list of dicts) for every prompt, or one layout per prompt -> B layouts."""
    if layout is None:
        return [[] for _ in range(b)]
    if isinstance(layout, Mapping):
        return [[layout] for _ in range(b)]
    layout = list(layout)
    if not layout or isinstance(layout[0], Mapping):
        return [list(layout) for _ in range(b)]
    if len(layout) != b:
        raise ValueError(f"layout gives {len(layout)} per-image layouts for {b} prompts")
    for i, lay in enumerate(layout):
        if isinstance(lay, Mapping) or not isinstance(lay, Sequence):
            raise ValueError(f"layout[{i}] must be a list of dicts (one layout per prompt), got {type(lay).__name__}")
    return [list(lay) for lay in layout]


class CCDiffPipeline(DiffusionPipeline):
    """CC-Diff generation: prompt + layout (+ retrieved references); DDIM + classifier-free guidance."""

    model_cpu_offload_seq = "text_encoder->adapter->unet->vae"

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: DDIMScheduler, adapter: CCDiffAdapter,
                 references: ReferenceBank):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler, adapter=adapter, references=references)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        install_processors(self.unet, self.adapter)

    @property
    def classes(self) -> list[str]:
        """The labels a layout may use."""
        return self.references.classes

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text states (B, L, D) and pooled outputs (B, D) of the frozen text tower (padded to the tokenizer's
        length, as stage one was trained)."""
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        out = self.text_encoder(ids.to(self.device))
        return out[0].to(self.unet.dtype), out[1]

    @torch.no_grad()
    def retrieve(self, prompt: str | Sequence[str]) -> torch.Tensor:
        """Retrieval-pool indices (B,) of the background scene each prompt retrieves (top-1 text -> image)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        _, pooled = self.encode_text(prompts)
        return self.references.retrieve(self.references.query_embeddings(pooled))[:, 0]

    def _background(self, background: Any, pooled: torch.Tensor, b: int) -> torch.Tensor:
        """Background tokens (B, Tb, D_img): retrieved by the prompt, a pool index (or one per image), or tokens."""
        refs = self.references
        if background is None:
            idx = refs.retrieve(refs.query_embeddings(pooled))[:, 0]
        elif torch.is_tensor(background) and background.is_floating_point():
            tok = background.to(self.device, torch.float32)
            tok = tok[None].expand(b, -1, -1) if tok.ndim == 2 else tok
            if tok.ndim != 3 or tok.shape[0] != b or tok.shape[-1] != refs.config.image_dim:
                raise ValueError(f"background tokens must be (T, {refs.config.image_dim}) or (B={b}, T, "
                                 f"{refs.config.image_dim}), got {tuple(background.shape)}")
            return tok
        else:
            idx = torch.as_tensor(background, dtype=torch.long).reshape(-1)
            idx = idx.expand(b) if idx.numel() == 1 else idx
            if idx.numel() != b or (idx < 0).any() or (idx >= refs.bg_tokens.shape[0]).any():
                raise ValueError(f"background must be a pool index in 0..{refs.bg_tokens.shape[0] - 1} (or one per "
                                 f"image), got {background!r}")
        return refs.bg(idx.to(refs.bg_tokens.device)).to(self.device)

    @torch.no_grad()
    def context(self, layouts: Sequence[Layout], text_pooled: torch.Tensor, latent_hw: tuple[int, int],
                background: Any = None, fg_refs: torch.Tensor | None = None) -> CCDiffContext:
        """The conditional UNet context of B layouts (references picked, resampled and box-embedded once)."""
        b = len(layouts)
        lay = {k: v.to(self.device) for k, v in layout_tensors(layouts, self.references).items()}
        n = lay["labels"].shape[1]
        phrases = self.references.phrases
        ph_hidden, ph_pooled = self.encode_text(phrases)  # (C, L, D), (C, D)
        lab = lay["labels"].clamp_min(0)  # padding reads class 0's phrase and is masked out by ``valid``
        phrase_hidden, phrase_pooled = ph_hidden[lab], ph_pooled[lab].to(self.unet.dtype)  # (B, N, L, D), (B, N, D)
        kwargs: dict[str, Any] = {}
        if self.adapter.mode == "cc_diff":
            if not self.references.has_tokens:
                raise ValueError("this pipeline's reference bank holds no tokens: CC-Diff needs references")
            if fg_refs is None:
                fg_refs = self.references.fg(self.references.pick_by_aspect(lay["labels"], lay["boxes"]))
            fg_refs = fg_refs.to(self.device, self.adapter.dtype)
            if fg_refs.shape[:2] != (b, n):
                raise ValueError(f"fg_refs must be (B={b}, N={n}, T, D_img), got {tuple(fg_refs.shape)}")
            kwargs = {"fg_refs": fg_refs,
                      "bg_ref": self._background(background, text_pooled, b).to(self.adapter.dtype)}
        return self.adapter.encode(lay["obb"].to(self.adapter.dtype), lay["valid"], phrase_hidden, phrase_pooled,
                                   text_pooled.to(self.unet.dtype), latent_hw, boxes=lay["boxes"], **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        layout: Any = None,
        guidance_scale: float = 4.0,
        num_inference_steps: int = 20,
        generator: torch.Generator | list[torch.Generator] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        background: Any = None,
        fg_refs: torch.Tensor | None = None,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate images.

        ``layout``: a list of ``{"label", "bbox": [x0, y0, x1, y1]}`` / ``{"label", "obb": [8 numbers]}`` dicts
        (normalised) for every prompt, or one such list per prompt; None or [] = caption only. ``background``:
        None (the scene the prompt retrieves), a retrieval-pool index (or one per image), or tokens (T, D_img).
        ``fg_refs`` (B, N, T, D_img) overrides the instance references. ``output_type``: "np" (B, H, W, 3) in
        [0, 1], "pt" (B, 3, H, W) in [0, 1], "pil" or "latent".
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        b = len(prompts)
        layouts = _per_image_layouts(layout, b)
        size = height or width or self.unet.config.sample_size * self.vae_scale_factor
        if (height or size) != (width or size):
            raise ValueError("CCDiffPipeline generates square images: give height == width")
        check_output_type(output_type)
        device, dtype = self.device, self.unet.dtype
        do_cfg = guidance_scale > 1.0
        hw = (size // self.vae_scale_factor, size // self.vae_scale_factor)

        text, pooled = self.encode_text(prompts)  # (B, L, D), (B, D)
        ctx = self.context(layouts, pooled, hw, background, fg_refs)
        if do_cfg:
            neg = negative_prompt if negative_prompt is not None else ""
            negs = [neg] * b if isinstance(neg, str) else list(neg)
            if len(negs) != b:
                raise ValueError(f"{len(negs)} negative prompts for {b} prompts")
            text = torch.cat([self.encode_text(negs)[0], text])  # (2B, L, D): [uncond, cond]
            off = CCDiffContext(**{k: getattr(ctx, k) for k in ("boxes", "obb", "valid", "phrase_hidden",
                                                                  "phrase_pooled", "fg_tokens", "box_tokens",
                                                                  "bg_tokens", "global_pooled", "grounding_tokens")},
                                latent_hw=ctx.latent_hw, peak_normalise=ctx.peak_normalise,
                                active=torch.zeros(b, dtype=torch.bool, device=device))
            on = CCDiffContext(**{**off.__dict__, "_cache": {},
                                  "active": torch.ones(b, dtype=torch.bool, device=device)})
            ctx = concat_contexts([off, on])  # the unconditional rows run the plain UNet

        shape = (b, self.unet.config.in_channels, *hw)
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
            eps = self.unet(x, t, encoder_hidden_states=text, cross_attention_kwargs={"cc": ctx},
                            return_dict=False)[0]
            if do_cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            latents = self.scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]

        images = decode_latents(self, latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def load_cc_diff(path: str | os.PathLike, device: str | torch.device | None = None) -> CCDiffPipeline:
    """A saved CC-Diff folder (from ``train_cc_diff``) as a pipeline on ``device``, progress bar off."""
    return load_pipeline_folder(CCDiffPipeline, path, device, f"{path} is not a CC-Diff folder: run notebook 04 "
                                f"(rslib.train.cc_diff.train_cc_diff(cfg)) first")


__all__ = ["CCDiffPipeline", "layout_tensors", "load_cc_diff"]
