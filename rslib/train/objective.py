"""The training objective of the diffusion stages (stage one, CRS-Diff, CC-Diff): which steps a batch is noised to,
the noise itself, and how each sample's noise-prediction error is weighted."""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler


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
