"""What the CRS-Diff and CC-Diff pipelines share: output types, decoding, loading a saved folder."""
from __future__ import annotations

import os
from typing import Any

import torch

OUTPUT_TYPES = ("np", "pt", "pil", "latent")


def check_output_type(output_type: str) -> None:
    """Raise before any work when ``output_type`` is not one the pipelines return."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'np', 'pt', 'pil' or 'latent', not {output_type!r}")


def decode_latents(pipe: Any, latents: torch.Tensor, output_type: str) -> Any:
    """Final latents -> "latent" (as they are), "pt" (B, 3, H, W) in [0, 1], "np" (B, H, W, 3) or "pil"."""
    if output_type == "latent":
        return latents
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    images = (images / 2 + 0.5).clamp(0, 1).float()  # (B, 3, S, S) in [0, 1]
    if output_type in ("np", "pil"):
        images = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "pil":
            images = pipe.numpy_to_pil(images)
    return images


def load_pipeline_folder(cls: Any, path: str | os.PathLike, device: str | torch.device | None, missing: str) -> Any:
    """``cls.from_pretrained(path)`` on ``device`` (auto when None), progress bar off; ``missing`` is the error
    raised when ``path`` holds no pipeline."""
    from rslib.utils import pick_device

    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(missing)
    pipe = cls.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(pick_device(str(device)) if device is not None else pick_device("auto"))
