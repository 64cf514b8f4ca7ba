"""The Stable Diffusion parts: VAE, UNet and noise schedulers, built from a preset or loaded from local folders.

At small presets the parts are built from configs (and trained in notebooks 01-02); at the paper preset they
are read from a local Stable Diffusion 1.x diffusers folder (``unet/``, ``vae/``, ``text_encoder/`` ...).
Nothing is ever downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel

from rslib.config import Preset, resolve_path

# The Stable Diffusion 1.x noise schedule: T = 1000, betas 0.00085 .. 0.012 on a sqrt ("scaled_linear") scale.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def require_local_dir(path: str | os.PathLike, what: str, parameter: str) -> Path:
    """A local folder that must exist, or a clear error naming the parameter to set."""
    p = resolve_path(path)
    if not str(path) or not p.exists():
        raise FileNotFoundError(
            f"{what} not found at {p}: pass a local folder with `{parameter}=...` "
            f"(nothing is downloaded; see README.md, 'local weights')")
    return p


def latent_size(cfg: Preset) -> int:
    """Side of the latent grid for the preset's image size."""
    return cfg.data.image_size // vae_scale_factor(cfg)


def vae_scale_factor(cfg: Preset) -> int:
    """Spatial down-sampling of the autoencoder (2 ** (levels - 1))."""
    return 2 ** (len(cfg.vae.block_out_channels) - 1)


def build_vae(cfg: Preset) -> AutoencoderKL:
    """A fresh AutoencoderKL for the preset (or SD's VAE from the local folder when ``vae.pretrained`` is set)."""
    v = cfg.vae
    if v.pretrained:
        root = require_local_dir(v.pretrained, "autoencoder weights", "vae.pretrained")
        sub = "vae" if (root / "vae").is_dir() else None
        return AutoencoderKL.from_pretrained(root, subfolder=sub, local_files_only=True)
    n = len(v.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=v.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(v.block_out_channels), layers_per_block=v.layers_per_block,
        norm_num_groups=v.norm_groups, sample_size=cfg.data.image_size,
    )


def build_unet(cfg: Preset, cross_attention_dim: int) -> UNet2DConditionModel:
    """A fresh UNet2DConditionModel for the preset (or SD's UNet from the local folder when ``unet.pretrained``)."""
    u = cfg.unet
    if u.pretrained:
        root = require_local_dir(u.pretrained, "Stable Diffusion weights", "unet.pretrained")
        return UNet2DConditionModel.from_pretrained(root, subfolder="unet", local_files_only=True)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention_levels))
    return UNet2DConditionModel(
        sample_size=latent_size(cfg), in_channels=cfg.vae.latent_channels, out_channels=cfg.vae.latent_channels,
        block_out_channels=tuple(u.block_out_channels), layers_per_block=u.layers_per_block,
        down_block_types=down, up_block_types=up, cross_attention_dim=cross_attention_dim,
        attention_head_dim=u.heads, norm_num_groups=u.norm_groups,
    )


def build_noise_scheduler() -> DDPMScheduler:
    """The training noise scheduler (SD 1.x schedule, epsilon prediction)."""
    return DDPMScheduler(**SD_SCHEDULE, prediction_type="epsilon", clip_sample=False)


SAMPLERS = ("ddim", "euler")


def build_sampler(kind: str = "ddim") -> DDIMScheduler | EulerDiscreteScheduler:
    """A sampler with SD 1.x's schedule: "ddim" (steps_offset 1, no clipping, as CRS-Diff samples) or "euler"
    (``EulerDiscreteScheduler`` as SD 1.4's folder configures it, as CC-Diff samples)."""
    if kind == "ddim":
        return DDIMScheduler(**SD_SCHEDULE, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
                             steps_offset=1)
    if kind == "euler":
        return EulerDiscreteScheduler(**SD_SCHEDULE, prediction_type="epsilon", steps_offset=1)
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, not {kind!r} (cc.sampler)")
