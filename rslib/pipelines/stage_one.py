"""Loading and sampling the stage-one model: a plain diffusers ``StableDiffusionPipeline`` folder."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from rslib.config import Preset
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
    gen_device = "cpu" if pipe.device.type == "mps" else pipe.device
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        gens = [torch.Generator(device=gen_device).manual_seed(seed + i + k) for k in range(len(chunk))]
        res = pipe(chunk, height=size, width=size, num_inference_steps=n_steps, guidance_scale=guidance,
                   generator=gens, output_type="np",
                   negative_prompt=[negative_prompt] * len(chunk) if negative_prompt is not None else None)
        out.append((np.clip(res.images, 0, 1) * 255).round().astype(np.uint8))  # (b, S, S, 3)
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)


def as_pixel_values(images: np.ndarray) -> torch.Tensor:
    """Samples (N, S, S, 3) uint8, as :func:`sample_stage_one` returns them, as float (N, 3, S, S) in [-1, 1]:
    the form of the data sets' ``pixel_values`` that the measures take."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
