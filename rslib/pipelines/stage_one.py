"""Loading and sampling the stage-one model: a plain diffusers ``StableDiffusionPipeline`` folder."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from rslib.config import Preset
from rslib.pipelines.common import seeded_batches
from rslib.utils import pick_device


def load_stage_one(path: str | os.PathLike, device: str | torch.device | None = None) -> StableDiffusionPipeline:
    """The stage-one folder as a StableDiffusionPipeline (no safety checker, progress bar off), on ``device``."""
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{path} is not a finished stage-one folder: run notebook 02 "
                                f"(rslib.train.stage_one.train_stage_one(cfg)) first")
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(pick_device(str(device)) if device is not None else pick_device("auto"))


def prompt_for(phrase: str) -> str:
    """The prompt template of the notebooks: "an aerial image of <phrase>."."""
    return f"an aerial image of {phrase}."


@torch.no_grad()
def sample_stage_one(pipe: StableDiffusionPipeline, prompts: Sequence[str], cfg: Preset, seed: int,
                     guidance_scale: float | None = None, steps: int | None = None, batch_size: int = 64,
                     negative_prompt: str | None = None) -> np.ndarray:
    """Images (N, S, S, 3) uint8 for ``prompts``; image i starts from noise seeded by ``seed + i``.

    The initial noise of an image depends only on (seed, its index), not on the batch size, so a sweep over
    guidance scales or steps with one seed compares like with like. DDIM (eta 0) adds no other randomness.
    """
    prompts = list(prompts)
    size = cfg.data.image_size
    guidance = cfg.unet.guidance_scale if guidance_scale is None else float(guidance_scale)
    n_steps = steps or cfg.unet.sample_steps
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)

    def run(i: int, j: int, generators: list[torch.Generator]) -> np.ndarray:
        return pipe(prompts[i:j], height=size, width=size, num_inference_steps=n_steps, guidance_scale=guidance,
                    generator=generators, output_type="np",
                    negative_prompt=negative[i:j] if negative else None).images

    return _uint8_batches(run, len(prompts), seed, batch_size, pipe._execution_device, size)


@torch.no_grad()
def renoise_stage_one(pipe: StableDiffusionPipeline, images: torch.Tensor, prompts: Sequence[str], cfg: Preset,
                      strength: float, seed: int, guidance_scale: float | None = None, steps: int | None = None,
                      batch_size: int = 64) -> np.ndarray:
    """Real images noised to step ``strength * 1000`` and denoised back with their prompts (SDEdit, diffusers'
    ``StableDiffusionImg2ImgPipeline`` on the same components); (N, S, S, 3) uint8.

    ``images``: (N, 3, S, S) in [-1, 1], as the data sets give them. ``strength`` in (0, 1]: near 0 the result
    is the autoencoder's reconstruction, at 1 a fresh sample; in between, the model keeps what the noise has not
    yet hidden and draws the rest, which shows at which noise level each kind of detail is decided. Image i's
    noise is seeded by ``seed + i``, as in :func:`sample_stage_one`; ``steps`` is the full schedule's length, of
    which the last ``strength`` fraction runs.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1] (the fraction of the noise schedule to run), not {strength}")
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
    # no safety checker, as in the pipeline itself (else diffusers warns about it at every call)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    guidance = cfg.unet.guidance_scale if guidance_scale is None else float(guidance_scale)
    n_steps = steps or cfg.unet.sample_steps
    if int(n_steps * strength) < 1:
        raise ValueError(f"strength {strength} of a {n_steps}-step schedule runs no step: raise the strength to at "
                         f"least {1 / n_steps:.3g} or the steps")
    pixels = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()  # (N, S, S, 3) in [0, 1]

    def run(i: int, j: int, generators: list[torch.Generator]) -> np.ndarray:
        return img2img(prompts[i:j], image=pixels[i:j], strength=strength, num_inference_steps=n_steps,
                       guidance_scale=guidance, generator=generators, output_type="np").images

    return _uint8_batches(run, len(prompts), seed, batch_size, pipe._execution_device, images.shape[-1])


def _uint8_batches(run: Callable[[int, int, list[torch.Generator]], np.ndarray], n: int, seed: int,
                   batch_size: int, device: torch.device, size: int) -> np.ndarray:
    """:func:`seeded_batches` of ``run``'s float images in [0, 1], as (n, S, S, 3) uint8."""
    out = seeded_batches(lambda i, j, g: (np.clip(run(i, j, g), 0, 1) * 255).round().astype(np.uint8), n, seed,
                         batch_size, device)
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)


def as_pixel_values(images: np.ndarray) -> torch.Tensor:
    """Samples (N, S, S, 3) uint8, as :func:`sample_stage_one` returns them, as float (N, 3, S, S) in [-1, 1]:
    the form of the data sets' ``pixel_values`` that the measures take."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
