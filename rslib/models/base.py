"""The Stable Diffusion parts: VAE, UNet and noise schedulers, built from a preset or loaded from local folders.

At small presets the parts are built from configs (and trained in notebooks 01-02); at the paper preset they
are read from a local Stable Diffusion 1.x diffusers folder (``unet/``, ``vae/``, ``text_encoder/`` ...).
Nothing is ever downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
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


class AdapterTimesteps:
    """How the adapters of stage two (CRS-Diff, CC-Diff) draw training steps and weight their losses.

    ``sampling``: "uniform", or "cubic" t = (1 - u^3) T, which favours the noisy steps where the layout of the
    image is decided (T2I-Adapter's non-uniform sampling). ``x0_weight_max``: each sample's noise MSE is
    multiplied by clamp(1/SNR(t), 1, x0_weight_max). The noise MSE at step t equals SNR(t) times the error of
    the clean latent it implies, so at the noisy steps a wrong layout costs almost nothing (SNR(900) = 0.014);
    the weight makes those samples' loss a clean-latent error. 1 = the plain noise MSE.

    ``noise_offset``: the training noise gets ``noise_offset * N(0, 1)`` added per sample and channel (the same
    value over the whole latent; "offset noise"). Stable Diffusion's schedule never destroys a latent's mean:
    at its noisiest training step sqrt(alpha_bar) = 0.07 of the clean latent survives, and a model learns to
    read an image's overall brightness from it. Sampling starts from pure noise, whose mean carries nothing, so
    such a model draws every image at middling brightness: white clouds come out grey. Offset noise hides the
    leaked mean under a larger random one, so the model learns the brightness from the prompt and conditions.
    0 = plain Gaussian noise (Stable Diffusion).
    """

    def __init__(self, noise_scheduler: DDPMScheduler, sampling: str = "uniform", x0_weight_max: float = 1.0,
                 noise_offset: float = 0.0):
        if sampling not in ("uniform", "cubic"):
            raise ValueError(f"timestep_sampling must be 'uniform' or 'cubic', not {sampling!r}")
        if x0_weight_max < 1.0:
            raise ValueError(f"x0_weight_max must be >= 1 (1 = plain noise MSE), not {x0_weight_max}")
        if noise_offset < 0.0:
            raise ValueError(f"noise_offset must be >= 0 (0 = plain Gaussian noise), not {noise_offset}")
        self.noise_scheduler, self.sampling, self.x0_weight_max = noise_scheduler, sampling, float(x0_weight_max)
        self.noise_offset = float(noise_offset)

    def noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Training noise (B, C, h, w) drawn with ``generator`` on its device: N(0, 1) per value, plus the
        per-sample, per-channel offset when ``noise_offset`` > 0."""
        dev = generator.device
        noise = torch.randn(shape, generator=generator, device=dev)
        if self.noise_offset > 0:
            noise = noise + self.noise_offset * torch.randn((*shape[:2], 1, 1), generator=generator, device=dev)
        return noise

    def sample(self, b: int, generator: torch.Generator) -> torch.Tensor:
        """(B,) training timesteps drawn with ``generator``, on its device."""
        n, dev = self.noise_scheduler.config.num_train_timesteps, generator.device
        if self.sampling == "uniform":
            return torch.randint(0, n, (b,), generator=generator, device=dev)
        u = torch.rand(b, generator=generator, device=dev)
        return ((1 - u ** 3) * n).long().clamp(0, n - 1)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) loss weights clamp(1/SNR(t), 1, x0_weight_max)."""
        a = self.noise_scheduler.alphas_cumprod.to(t.device)[t]
        return ((1 - a) / a).clamp(1.0, self.x0_weight_max)

    def loss(self, pred: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
             pixel_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted loss, plain noise MSE) of predictions (B, C, h, w) at steps t (B,); ``pixel_weight``
        (B, 1, h, w), if given, also weights each latent cell (e.g. more on the objects of a layout)."""
        err = (pred.float() - noise.float()).pow(2)
        plain = err.flatten(1).mean(1)  # (B,)
        per_sample = plain if pixel_weight is None else (err * pixel_weight.float()).flatten(1).mean(1)
        return (self.weights(t) * per_sample).mean(), plain.mean().detach()


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
