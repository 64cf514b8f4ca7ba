"""What the CRS-Diff and CC-Diff pipelines share: diffusers' pipeline contract (prompts and their embeddings, the
checks made before any compute, latents, the guided denoising loop with its step callbacks, decoding), loading a
saved folder, and sampling in seeded batches.

The contract is diffusers' ``StableDiffusionPipeline``'s: ``encode_prompt`` with its signature, ``prompt_embeds``
/ ``negative_prompt_embeds``, ``num_images_per_prompt``, ``generator`` (one, or one per image) reaching every
scheduler that draws noise, any ``height`` / ``width`` that the autoencoder divides, ``callback_on_step_end``,
``cross_attention_kwargs``, ``output_type`` "pil" by default, and tensors on ``_execution_device`` so that
``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload`` work. Bad input is a ``ValueError`` naming the
argument, raised before the first UNet call.
"""
from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

OUTPUT_TYPES = ("np", "pt", "pil", "latent")
IMAGE_PROCESSOR = VaeImageProcessor()  # diffusers' postprocessing of decoded images ([-1, 1] -> "pt", "np", "pil")
T = TypeVar("T")


# ---------------------------------------------------------------------------
# Checks


def check_output_type(output_type: str) -> None:
    """Raise before any work when ``output_type`` is not one the pipelines return."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'np', 'pt', 'pil' or 'latent', not {output_type!r}")


def check_finite(name: str, value: Any) -> None:
    """A ValueError naming ``name`` when ``value`` (a number, a sequence of numbers or a tensor) holds NaN or inf."""
    t = value if torch.is_tensor(value) else torch.as_tensor(np.asarray(value, dtype=np.float64))
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite numbers: it holds NaN or inf")


def prompt_list(prompt: Any) -> list[str]:
    """``prompt`` (a string or a non-empty list of strings) as a list, or a ValueError naming it."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, not {prompt!r}")
    return list(prompts)


def one_per_prompt(items: Sequence[T], batch: int, name: str) -> list[T]:
    """``items`` as ``batch`` entries: one entry stands for every prompt; else there must be one per prompt."""
    items = list(items)
    if len(items) == 1:
        return items * batch
    if len(items) != batch:
        raise ValueError(f"{name} gives {len(items)} entries for {batch} prompts: give one for all, or one per prompt")
    return items


def rows_per_prompt(t: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """A tensor whose first dimension is 1 (expanded to ``batch``) or ``batch``, else a ValueError naming it."""
    if t.shape[0] == 1 and batch > 1:
        return t.expand(batch, *t.shape[1:])
    if t.shape[0] != batch:
        raise ValueError(f"{name} has {t.shape[0]} rows for {batch} prompts: give one for all, or one per prompt")
    return t


def check_generator(generator: Any, batch: int) -> None:
    """A list of generators must hold one per image."""
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"generator is a list of {len(generator)} generators for {batch} images: pass one "
                         f"generator, or one per image (batch size x num_images_per_prompt)")


# ---------------------------------------------------------------------------
# Decoding and loading


def decode_latents(pipe: Any, latents: torch.Tensor, output_type: str) -> Any:
    """Final latents -> "latent" (as they are), "pt" (B, 3, H, W) in [0, 1], "np" (B, H, W, 3) or "pil"."""
    if output_type == "latent":
        return latents
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]  # (B, 3, H, W)
    return IMAGE_PROCESSOR.postprocess(images.float(), output_type=output_type)  # [-1, 1] -> [0, 1], then the type


def load_pipeline_folder(cls: Any, path: str | os.PathLike, device: str | torch.device | None, missing: str) -> Any:
    """``cls.from_pretrained(path)`` on ``device`` (auto when None), progress bar off; ``missing`` is the error
    raised when ``path`` holds no pipeline."""
    from rslib.utils import pick_device

    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(missing)
    pipe = cls.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(pick_device(str(device)) if device is not None else pick_device("auto"))


# ---------------------------------------------------------------------------
# Sampling many images


def seeded_batches(run: Callable[[int, int, list[torch.Generator]], T], n: int, seed: int, batch_size: int,
                   device: torch.device, same_noise: bool = False) -> list[T]:
    """``run(i, j, generators)`` over the batches [i, j) of n images, image k's generator seeded by ``seed + k``
    (by ``seed`` for every image with ``same_noise``, for sweeps of one knob): an image's noise depends on its
    index only, never on the batch size. Returns the batches' results in order."""
    gen_device = "cpu" if device.type == "mps" else device
    out = []
    for i in range(0, n, batch_size):
        j = min(n, i + batch_size)
        generators = [torch.Generator(device=gen_device).manual_seed(seed + (0 if same_noise else k))
                      for k in range(i, j)]
        out.append(run(i, j, generators))
    return out


# ---------------------------------------------------------------------------
# The pipeline contract


class RSPipeline(DiffusionPipeline):
    """The diffusers pipeline contract that CRSDiffPipeline and CCDiffPipeline share (after StableDiffusionPipeline).

    Subclasses give ``__call__`` its conditions; this class encodes prompts, checks the common arguments,
    draws the latents and runs the guided denoising loop.
    """

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    DEFAULT_GUIDANCE_SCALE = 4.0
    DEFAULT_STEPS = 20
    # the state of the running call (see start_call), read by the properties below
    _guidance_scale: float = 1.0
    _cross_attention_kwargs: dict[str, Any] | None = None
    _interrupt: bool = False
    _num_timesteps: int = 0

    @property
    def vae_scale_factor(self) -> int:
        """How much smaller the latents are than the images (8 when the pipeline has no autoencoder)."""
        vae = getattr(self, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8

    @property
    def guidance_scale(self) -> float:
        """The guidance scale of the running call (a step callback may change it)."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the running call guides (guidance scale above 1)."""
        return self._guidance_scale > 1.0

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        """The ``cross_attention_kwargs`` of the running call."""
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        """The number of denoising steps of the running call."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set to True (e.g. from a step callback) to skip the remaining steps."""
        return self._interrupt

    def sampling_defaults(self, guidance_scale: float | None, num_inference_steps: int | None) -> tuple[float, int]:
        """The given guidance scale and steps, else those saved in the pipeline's config (the preset that trained
        it), else the class defaults."""
        if guidance_scale is None:
            guidance_scale = self.config.get("guidance_scale")
        if num_inference_steps is None:
            num_inference_steps = self.config.get("num_inference_steps")
        return (self.DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale,
                self.DEFAULT_STEPS if num_inference_steps is None else num_inference_steps)

    # -- prompts -------------------------------------------------------------------------------------------

    def _text_dtype(self) -> torch.dtype:
        for name in ("text_encoder", "unet"):
            module = getattr(self, name, None)
            if module is not None:
                return module.dtype
        return torch.float32

    def text_states(self, texts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Text states (B, L, D) and pooled outputs (B, D) of the frozen text tower, padded to the tokenizer's
        length as stage one was trained."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text_encoder/tokenizer: pass prompt_embeds instead of a prompt")
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        out = self.text_encoder(ids.to(device))
        return out[0].to(device=device, dtype=self._text_dtype()), out[1].to(device)

    @torch.no_grad()
    def _encode_prompt(self, prompt: Any, device: torch.device, num_images_per_prompt: int,
                       do_classifier_free_guidance: bool, negative_prompt: Any = None,
                       prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                       pooled_prompt_embeds: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds), each repeated per image (see
        ``encode_prompt``); the pooled output is None when ``prompt_embeds`` came without it."""
        if prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds = self.text_states(prompt_list(prompt), device)
        prompt_embeds = prompt_embeds.to(device=device, dtype=self._text_dtype())
        batch = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negs = [negative_prompt] if negative_prompt is None or isinstance(negative_prompt, str) else negative_prompt
            default = self.config.get("negative_prompt") or ""  # the preset's that trained it, else ""
            negs = one_per_prompt([default if n is None else n for n in negs], batch, "negative_prompt")
            negative_prompt_embeds = self.text_states(negs, device)[0]
        if not do_classifier_free_guidance:
            negative_prompt_embeds = None
        n = num_images_per_prompt

        def per_image(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device).repeat_interleave(n, dim=0)

        return per_image(prompt_embeds), per_image(negative_prompt_embeds), per_image(pooled_prompt_embeds)

    # -- checks ------------------------------------------------------------------------------------------------

    def prompt_batch(self, prompt: Any, prompt_embeds: torch.Tensor | None) -> int:
        """The number of prompts, from ``prompt`` or ``prompt_embeds`` (exactly one of them)."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        if prompt_embeds is not None:
            if prompt_embeds.ndim != 3:
                raise ValueError(f"prompt_embeds must be (B, L, D), got {tuple(prompt_embeds.shape)}")
            check_finite("prompt_embeds", prompt_embeds)
            return prompt_embeds.shape[0]
        if prompt is None:
            raise ValueError("pass a prompt (a string or a list of strings) or prompt_embeds")
        return len(prompt_list(prompt))

    def check_common_inputs(self, batch: int, height: int, width: int, num_inference_steps: int,
                            guidance_scale: float, eta: float, num_images_per_prompt: int, generator: Any,
                            latents: torch.Tensor | None, output_type: str, negative_prompt: Any,
                            prompt_embeds: torch.Tensor | None, negative_prompt_embeds: torch.Tensor | None,
                            callback_on_step_end: Callable | None,
                            callback_on_step_end_tensor_inputs: Sequence[str],
                            cross_attention_kwargs: dict[str, Any] | None) -> None:
        """Every check of the arguments diffusers' pipelines share; a ValueError naming the argument."""
        f = self.vae_scale_factor
        for name, side in (("height", height), ("width", width)):
            if not isinstance(side, (int, np.integer)) or side <= 0 or side % f:
                raise ValueError(f"{name} must be a positive multiple of {f} (the autoencoder's scale), not {side!r}")
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, not {num_inference_steps!r}")
        if not isinstance(num_images_per_prompt, (int, np.integer)) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, not {num_images_per_prompt!r}")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, not {guidance_scale!r}")
        if not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a number >= 0 (0 = deterministic DDIM), not {eta!r}")
        check_output_type(output_type)
        check_generator(generator, batch * num_images_per_prompt)
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        if negative_prompt_embeds is not None:
            check_finite("negative_prompt_embeds", negative_prompt_embeds)
            if prompt_embeds is None or negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must come with "
                                 f"prompt_embeds of the same shape")
        if latents is not None:
            shape = (batch * num_images_per_prompt, self.unet.config.in_channels, height // f, width // f)
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must be {shape} for {batch * num_images_per_prompt} images of "
                                 f"{height} x {width}, got {tuple(latents.shape)}")
            check_finite("latents", latents)
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError("callback_on_step_end must be callable(pipe, step, timestep, callback_kwargs)")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not among "
                             f"{self._callback_tensor_inputs}")
        if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, dict):
            raise ValueError(f"cross_attention_kwargs must be a dict, not {type(cross_attention_kwargs).__name__}")

    # -- sampling ----------------------------------------------------------------------------------------------

    def prepare_extra_step_kwargs(self, generator: Any, eta: float) -> dict[str, Any]:
        """``eta`` and ``generator`` for ``scheduler.step``, for each that the scheduler accepts (as diffusers does)."""
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}

    def prepare_latents(self, batch: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
                        generator: Any, latents: torch.Tensor | None) -> torch.Tensor:
        """Initial latents (B, C, H / f, W / f): drawn from ``generator``, or the given ones, scaled by the
        scheduler's initial sigma (call after ``scheduler.set_timesteps``)."""
        f = self.vae_scale_factor
        shape = (batch, self.unet.config.in_channels, height // f, width // f)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device, dtype)
        return latents * self.scheduler.init_noise_sigma

    def denoise(self, latents: torch.Tensor, predict_noise: Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor],
                prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None,
                extra_step_kwargs: dict[str, Any], callback_on_step_end: Callable | None,
                callback_on_step_end_tensor_inputs: Sequence[str]) -> torch.Tensor:
        """The guided denoising loop over ``scheduler.timesteps``.

        ``predict_noise(x, t, prompt_embeds)`` gives the noise of the model input x (2B rows [unconditional ;
        conditional] while guiding, else B); ``prompt_embeds`` are the text states as they enter the model, in the
        same row order. After each step ``callback_on_step_end(pipe, i, t, {name: tensor})`` receives the tensors
        named in ``callback_on_step_end_tensor_inputs``; the ``latents`` and ``prompt_embeds`` it returns replace
        the running ones, and it may change ``pipe._guidance_scale`` or set ``pipe._interrupt``.
        """
        guiding = self.do_classifier_free_guidance
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            x = torch.cat([latents] * 2) if guiding else latents
            x = self.scheduler.scale_model_input(x, t)
            eps = predict_noise(x, t, prompt_embeds)
            if guiding:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + self.guidance_scale * (eps_c - eps_u)
            latents = self.scheduler.step(eps, t, latents, **extra_step_kwargs, return_dict=False)[0]
            if callback_on_step_end is not None:
                named = {"latents": latents, "prompt_embeds": prompt_embeds,
                         "negative_prompt_embeds": negative_prompt_embeds}
                out = callback_on_step_end(self, i, t, {k: named[k] for k in callback_on_step_end_tensor_inputs})
                latents = out.pop("latents", latents)
                prompt_embeds = out.pop("prompt_embeds", prompt_embeds)
        return latents

    def start_call(self, guidance_scale: float, cross_attention_kwargs: dict[str, Any] | None) -> None:
        """Reset the per-call state that the properties read."""
        self._guidance_scale = guidance_scale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        self._num_timesteps = 0

    def finish_call(self, latents: torch.Tensor, output_type: str, return_dict: bool) -> ImagePipelineOutput | tuple:
        """The final latents as the call's output (decoded as ``output_type`` asks), offload hooks released."""
        images = decode_latents(self, latents, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
