"""``CCDiffPipeline``: caption + layout (labelled boxes or oriented boxes) -> RS images (CC-Diff).

Components: the frozen stage-one parts (``vae``, ``text_encoder``, ``tokenizer``, ``unet``, DDIM ``scheduler``),
the trained ``adapter`` (:class:`rslib.models.cc_diff.CCDiffAdapter`: box net, dual resampler with the context
bridge, fusion modules) and the ``references`` bank (:class:`rslib.models.references.ReferenceBank`: class list,
instance reference tokens, the background retrieval pool). ``save_pretrained`` / ``from_pretrained`` round-trip
every part (safetensors) and the sampling defaults (``guidance_scale``, ``num_inference_steps``,
``max_instances``) of the preset that trained it.

A layout is a list of objects, each ``{"label": "ship", "bbox": [x0, y0, x1, y1]}`` or
``{"label": "ship", "obb": [x1, y1, ..., x4, y4]}`` (normalised to [0, 1]); pass one layout for all prompts or
one per prompt. Each instance's reference is the bank crop of its class whose aspect ratio is closest to the
box; the background reference is the training scene the caption retrieves (top-1 CLIP text -> image). A layout
with more objects than the model was trained with (``max_instances``) keeps its largest objects, with a warning.

The adapter's fusion modules join the UNet's fused cross-attention layers as forward hooks for the duration of a
call only (:func:`rslib.models.cc_diff.fusion_hooks`): the UNet and its attention processors are left as found,
so diffusers' attention tools (``enable_attention_slicing``, ``set_attn_processor``, xFormers) work inside
CC-Diff's fusion, and a ``StableDiffusionPipeline`` sharing the UNet is unaffected. It follows diffusers' pipeline
contract (:mod:`rslib.pipelines.common`).

Classifier-free guidance: the unconditional branch drops the caption (negative prompt, default "") and every
instance and reference: it is the plain stage-one UNet, as upstream. With a fresh (zero-initialised) adapter
and an empty layout the pipeline therefore reproduces the stage-one ``StableDiffusionPipeline`` exactly.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, ImagePipelineOutput, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from rslib.models.cc_diff import (
    CCDiffAdapter,
    CCDiffContext,
    boxes_to_obb,
    concat_contexts,
    fusion_hooks,
    obb_to_boxes,
)
from rslib.models.references import ReferenceBank
from rslib.pipelines.common import (
    RSPipeline,
    check_finite,
    load_pipeline_folder,
    rows_per_prompt,
    seeded_batches,
)
from rslib.utils import finite_numbers

Layout = Sequence[Mapping[str, Any]]
BOX_AGREEMENT = 0.01  # how far (normalised) an object's 'bbox' may lie from its 'obb''s enclosing box
logger = logging.getLogger(__name__)


def _numbers(value: Any, n: int, where: str) -> list[float]:
    """``value`` as n finite floats in [0, 1] (a small tolerance is clamped), or a ValueError naming ``where``."""
    vals = finite_numbers(value, n, where)
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
            if o is not None and box is not None:
                enclosing = obb_to_boxes(o[None])[0]
                if float((enclosing - box).abs().max()) > BOX_AGREEMENT:
                    raise ValueError(f"{where}: 'bbox' {box.tolist()} and 'obb' disagree (the obb's enclosing box is "
                                     f"{[round(v, 4) for v in enclosing.tolist()]}): give one of them, or both "
                                     f"describing the same object")
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
        raise ValueError(f"layout gives {len(layout)} per-image layouts for {b} prompts: give one layout for all "
                         f"prompts, or one per prompt")
    for i, lay in enumerate(layout):
        if isinstance(lay, Mapping) or not isinstance(lay, Sequence):
            raise ValueError(f"layout[{i}] must be a list of dicts (one layout per prompt), got {type(lay).__name__}")
    return [list(lay) for lay in layout]


def keep_largest(lay: dict[str, torch.Tensor], limit: int | None, fg_refs: torch.Tensor | None = None
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Layout tensors (see :func:`layout_tensors`) with at most ``limit`` objects per image: the largest boxes, in
    their given order (a warning names each layout that loses objects); ``fg_refs`` (B, N, T, D) follow."""
    valid = lay["valid"]
    if limit is None or valid.shape[1] <= limit:
        return lay, fg_refs
    boxes = lay["boxes"]
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).masked_fill(~valid, -1.0)
    keep = area.argsort(dim=1, descending=True, stable=True)[:, :limit].sort(dim=1).values  # (B, limit)
    for i, count in enumerate(valid.sum(1).tolist()):
        if count > limit:
            logger.warning(f"layout[{i}] has {count} objects, more than the {limit} this model was trained with "
                           f"(cc.max_instances): the {limit} largest are kept")
    rows = torch.arange(len(keep))[:, None]
    lay = {k: v[rows, keep] for k, v in lay.items()}
    return lay, (fg_refs[rows, keep] if fg_refs is not None else None)


class CCDiffPipeline(RSPipeline):
    """CC-Diff generation: prompt + layout (+ retrieved references); DDIM + classifier-free guidance."""

    # Modules run once per call, in order; the adapter's fusion modules run inside the UNet at every step, so the
    # adapter is offloaded on its own (as diffusers' ControlNet pipelines do theirs) and stays on the device for
    # the whole loop. The reference bank is a table of tokens, read where it lies (its rows are moved).
    model_cpu_offload_seq = "text_encoder->unet->vae"
    DEFAULT_STEPS = 20

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: DDIMScheduler, adapter: CCDiffAdapter,
                 references: ReferenceBank, max_instances: int | None = None, guidance_scale: float | None = None,
                 num_inference_steps: int | None = None, negative_prompt: str | None = None):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler, adapter=adapter, references=references)
        # the defaults of __call__, saved with the folder (train_cc_diff stores its preset's)
        self.register_to_config(max_instances=max_instances, guidance_scale=guidance_scale,
                                num_inference_steps=num_inference_steps, negative_prompt=negative_prompt)

    @property
    def classes(self) -> list[str]:
        """The labels a layout may use."""
        return self.references.classes

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str] | None, device: torch.device, num_images_per_prompt: int,
                      do_classifier_free_guidance: bool, negative_prompt: str | list[str] | None = None,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      pooled_prompt_embeds: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(prompt_embeds (B n, L, D), negative_prompt_embeds (B n, L, D) or None without guidance,
        pooled_prompt_embeds (B n, D)), as diffusers' ``encode_prompt`` with SDXL's pooled output: CC-Diff's
        retrieval and background attention read the prompt's pooled state. Needs only ``tokenizer`` and
        ``text_encoder``; given embeddings are used as they are."""
        return self._encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                                   negative_prompt, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds)

    @torch.no_grad()
    def retrieve(self, prompt: str | Sequence[str]) -> torch.Tensor:
        """Retrieval-pool indices (B,) of the background scene each prompt retrieves (top-1 text -> image)."""
        _, pooled = self.text_states([prompt] if isinstance(prompt, str) else list(prompt), self._execution_device)
        return self.references.retrieve(self.references.query_embeddings(pooled))[:, 0]

    def _uses_references(self) -> bool:
        return self.adapter.mode == "cc_diff"

    def _background(self, background: Any, batch: int) -> torch.Tensor | None:
        """The background as given, checked before any compute: None (the scene the prompt retrieves), pool indices
        (B,) or tokens (B, T, D_img); one entry stands for every prompt."""
        if background is None or not self._uses_references():
            return None
        refs = self.references
        if torch.is_tensor(background) and background.is_floating_point():
            d = refs.config.image_dim
            tok = background[None] if background.ndim == 2 else background
            if tok.ndim != 3 or tok.shape[-1] != d:
                raise ValueError(f"background tokens must be (T, {d}) or (B, T, {d}), got {tuple(background.shape)}")
            check_finite("background", tok)
            return rows_per_prompt(tok, batch, "background")
        idx = np.asarray(background.cpu() if torch.is_tensor(background) else background).reshape(-1)
        pool = refs.bg_tokens.shape[0]
        if idx.dtype.kind not in "iu" or (idx < 0).any() or (idx >= pool).any():
            raise ValueError(f"background must be a retrieval-pool index in 0..{pool - 1} (or one per prompt), or "
                             f"tokens (T, {refs.config.image_dim}); got {background!r}")
        return rows_per_prompt(torch.as_tensor(idx, dtype=torch.long), batch, "background")

    def _fg_refs(self, fg_refs: torch.Tensor | None, batch: int, n_objects: int) -> torch.Tensor | None:
        """The given instance references (1 or B, N, T, D_img), checked before any compute."""
        if fg_refs is None or not self._uses_references():
            return None
        d = self.references.config.image_dim
        if fg_refs.ndim != 4 or fg_refs.shape[1] != n_objects or fg_refs.shape[-1] != d:
            raise ValueError(f"fg_refs must be (B, N={n_objects}, T, {d}) for this layout, got {tuple(fg_refs.shape)}")
        check_finite("fg_refs", fg_refs)
        return rows_per_prompt(fg_refs, batch, "fg_refs")

    def _context(self, lay: dict[str, torch.Tensor], text_pooled: torch.Tensor, latent_hw: tuple[int, int],
                 background: torch.Tensor | None, fg_refs: torch.Tensor | None) -> CCDiffContext:
        """The conditional UNet context of B layouts (references picked, resampled and box-embedded once)."""
        device, dtype = self._execution_device, self.unet.dtype
        refs = self.references
        lay = {k: v.to(device) for k, v in lay.items()}
        ph_hidden, ph_pooled = self.text_states(refs.phrases, device)  # (C, L, D), (C, D)
        lab = lay["labels"].clamp_min(0)  # padding reads class 0's phrase and is masked out by ``valid``
        phrase_hidden, phrase_pooled = ph_hidden[lab].to(dtype), ph_pooled[lab].to(dtype)  # (B, N, L, D), (B, N, D)
        kwargs: dict[str, Any] = {}
        if self._uses_references():
            if fg_refs is None:
                fg_refs = refs.fg(refs.pick_by_aspect(lay["labels"], lay["boxes"]))
            if background is None:
                background = refs.retrieve(refs.query_embeddings(text_pooled))[:, 0]
            bg = background if background.is_floating_point() else refs.bg(background.to(refs.bg_tokens.device))
            kwargs = {"fg_refs": fg_refs.to(device, self.adapter.dtype),
                      "bg_ref": bg.to(device, torch.float32).to(self.adapter.dtype)}
        return self.adapter.encode(lay["obb"].to(self.adapter.dtype), lay["valid"], phrase_hidden, phrase_pooled,
                                   text_pooled.to(dtype), latent_hw, boxes=lay["boxes"], **kwargs)

    @staticmethod
    def _with_unconditional_rows(ctx: CCDiffContext) -> CCDiffContext:
        """[unconditional ; conditional] rows of a context: the unconditional rows run the plain UNet."""
        b = ctx.valid.shape[0]
        off = CCDiffContext(**{k: getattr(ctx, k) for k in ("boxes", "obb", "valid", "phrase_hidden", "phrase_pooled",
                                                            "fg_tokens", "box_tokens", "bg_tokens", "global_pooled",
                                                            "grounding_tokens")},
                            latent_hw=ctx.latent_hw, peak_normalise=ctx.peak_normalise,
                            active=torch.zeros(b, dtype=torch.bool, device=ctx.valid.device))
        on = CCDiffContext(**{**off.__dict__, "_cache": {},
                              "active": torch.ones(b, dtype=torch.bool, device=ctx.valid.device)})
        return concat_contexts([off, on])

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        layout: Any = None,
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
        pooled_prompt_embeds: torch.Tensor | None = None,
        background: Any = None,
        fg_refs: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        """Generate images (diffusers' arguments as in ``StableDiffusionPipeline``, plus CC-Diff's layout).

        ``layout``: a list of ``{"label", "bbox": [x0, y0, x1, y1]}`` / ``{"label", "obb": [8 numbers]}`` dicts
        (normalised; an object may give both when they agree) for every prompt, or one such list per prompt; None
        or [] = caption only. More objects than the model's ``max_instances``: the largest are kept, with a
        warning. ``background``: None (the scene the prompt retrieves), a retrieval-pool index (or one per
        prompt), or tokens (T, D_img) / (B, T, D_img). ``fg_refs`` (B, N, T, D_img) overrides the instance
        references. ``prompt_embeds`` come with ``pooled_prompt_embeds`` (as ``encode_prompt`` returns them).
        ``guidance_scale``, ``num_inference_steps`` and ``negative_prompt`` default to the pipeline's config (the
        preset that trained it). ``output_type``: "pil" (default), "np" (B, H, W, 3) in [0, 1], "pt" (B, 3, H, W) in [0, 1] or
        "latent".
        """
        guidance_scale, num_inference_steps = self.sampling_defaults(guidance_scale, num_inference_steps)
        side = self.unet.config.sample_size * self.vae_scale_factor
        height, width = side if height is None else height, side if width is None else width
        batch = self.prompt_batch(prompt, prompt_embeds)
        self.check_common_inputs(batch, height, width, num_inference_steps, guidance_scale, eta,
                                 num_images_per_prompt, generator, latents, output_type, negative_prompt,
                                 prompt_embeds, negative_prompt_embeds, callback_on_step_end,
                                 callback_on_step_end_tensor_inputs, cross_attention_kwargs)
        if prompt_embeds is not None:
            if pooled_prompt_embeds is None:
                raise ValueError("prompt_embeds need pooled_prompt_embeds too (CC-Diff retrieves the background and "
                                 "attends to it with the pooled prompt): take all three from encode_prompt")
            if pooled_prompt_embeds.shape != (batch, prompt_embeds.shape[-1]):
                raise ValueError(f"pooled_prompt_embeds must be (B={batch}, {prompt_embeds.shape[-1]}), got "
                                 f"{tuple(pooled_prompt_embeds.shape)}")
            check_finite("pooled_prompt_embeds", pooled_prompt_embeds)
        # the layout and the references parsed and checked before any compute
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("CC-Diff needs its text_encoder and tokenizer (they encode each instance's phrase), "
                             "also when given prompt_embeds")
        if self._uses_references() and not self.references.has_tokens:
            raise ValueError("this pipeline's reference bank holds no tokens: CC-Diff needs references")
        lay = layout_tensors(_per_image_layouts(layout, batch), self.references)
        fg_refs = self._fg_refs(fg_refs, batch, lay["valid"].shape[1])
        lay, fg_refs = keep_largest(lay, self.config.get("max_instances"), fg_refs)
        background = self._background(background, batch)

        device, dtype = self._execution_device, self.unet.dtype
        self.start_call(guidance_scale, cross_attention_kwargs)
        guiding = self.do_classifier_free_guidance
        n = num_images_per_prompt
        prompt_embeds, negative_prompt_embeds, pooled = self.encode_prompt(
            prompt, device, n, guiding, negative_prompt, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds)
        text = torch.cat([negative_prompt_embeds, prompt_embeds]) if guiding else prompt_embeds  # [uncond ; cond]
        text = text.to(dtype)

        def per_image(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat_interleave(n, dim=0)

        f = self.vae_scale_factor
        ctx = self._context({k: per_image(v) for k, v in lay.items()}, pooled, (height // f, width // f),
                            per_image(background), per_image(fg_refs))
        if guiding:
            ctx = self._with_unconditional_rows(ctx)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(batch * n, height, width, dtype, device, generator, latents)

        def predict_noise(x: torch.Tensor, t: Any, text_states: torch.Tensor) -> torch.Tensor:
            return self.unet(x, t, encoder_hidden_states=text_states,
                             cross_attention_kwargs=self.cross_attention_kwargs, return_dict=False)[0]

        with fusion_hooks(self.unet, self.adapter, ctx):
            latents = self.denoise(latents, predict_noise, text, negative_prompt_embeds,
                                   self.prepare_extra_step_kwargs(generator, eta), callback_on_step_end,
                                   callback_on_step_end_tensor_inputs)
        return self.finish_call(latents, output_type, return_dict)


def load_cc_diff(path: str | os.PathLike, device: str | torch.device | None = None) -> CCDiffPipeline:
    """A saved CC-Diff folder (from ``train_cc_diff``) as a pipeline on ``device``, progress bar off."""
    return load_pipeline_folder(CCDiffPipeline, path, device, f"{path} is not a CC-Diff folder: run notebook 04 "
                                f"(rslib.train.cc_diff.train_cc_diff(cfg)) first")


@torch.no_grad()
def sample_cc_diff(pipe: CCDiffPipeline, prompts: Sequence[str], layouts: Sequence[Sequence[Mapping[str, Any]]],
                   seed: int, guidance_scale: float | None = None, steps: int | None = None, batch_size: int = 32,
                   same_noise: bool = False) -> torch.Tensor:
    """Images (N, 3, S, S) in [-1, 1] of N prompts and their layouts; image i starts from noise seeded by
    ``seed + i`` (``seed`` if same_noise). An object with an ``obb`` is drawn from it (its ``bbox`` left out).
    ``guidance_scale`` / ``steps``: None = the pipeline's defaults."""
    prompts = list(prompts)
    layouts = [[{k: v for k, v in o.items() if k != "bbox" or "obb" not in o} for o in lay] for lay in layouts]
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def run(i: int, j: int, generators: list[torch.Generator]) -> torch.Tensor:
        res = pipe(prompts[i:j], layout=layouts[i:j], guidance_scale=guidance_scale, num_inference_steps=steps,
                   generator=generators, output_type="pt")
        return res.images.cpu() * 2 - 1

    out = seeded_batches(run, len(prompts), seed, batch_size, pipe._execution_device, same_noise)
    return torch.cat(out) if out else torch.zeros(0, 3, size, size)


__all__ = ["CCDiffPipeline", "keep_largest", "layout_tensors", "load_cc_diff", "sample_cc_diff"]
