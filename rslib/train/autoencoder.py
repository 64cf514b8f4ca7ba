"""The autoencoder: a diffusers AutoencoderKL trained on RS images, and its latent scaling factor.

Stable Diffusion runs in the latent space of a KL-regularised autoencoder (CRS-Diff uses SD's own). At the small
presets we train one (``build_vae(cfg)``) on the SynthRS training images with

    L = |x - D(z)|_1 + w_mse |x - D(z)|_2^2 + w_kl KL(q(z|x) || N(0, I)) + w_edge |grad x - grad D(z)|_1,
    z ~ q(z|x) = N(mu(x), sigma(x)^2)

(means over pixel values; the KL per latent value is divided by the number of pixel values, as Stable
Diffusion's loss weighs it). Being fully convolutional, the model can train on random crops, which is several
times cheaper per step. After training, the latents of the training images are scaled to unit standard
deviation by ``scaling_factor = 1 / std(z)``, stored in the model config as diffusers pipelines expect.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn

from rslib.config import Preset, resolve_path
from rslib.models.base import build_vae, require_local_dir
from rslib.data.datasets import collate
from rslib.train.loop import train_loop
from rslib.train.stage import (begin, finish, is_finished, seed_initial_weights, stage_dataset, stage_stamp,
                               stage_train_config)


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random size x size crop per image: (B, C, H, W) -> (B, C, size, size)."""
    b, _, h, w = images.shape
    if size <= 0 or (size >= h and size >= w):
        return images
    ys = torch.randint(h - size + 1, (b,), generator=generator, device=generator.device).tolist()
    xs = torch.randint(w - size + 1, (b,), generator=generator, device=generator.device).tolist()
    return torch.stack([img[:, y:y + size, x:x + size] for img, y, x in zip(images, ys, xs)])


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical differences of neighbouring pixels: (B, C, H, W) -> (B, C, H, W-1), (B, C, H-1, W)."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def pair_maxima(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The larger value of each pair of neighbouring pixels, in the layout of :func:`image_gradients`."""
    return torch.maximum(x[..., :, 1:], x[..., :, :-1]), torch.maximum(x[..., 1:, :], x[..., :-1, :])


def box_cover(boxes: torch.Tensor, valid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 1, h, w): 1 at the pixels whose centre lies in one of the valid boxes (B, N, 4; x1, y1, x2, y2 in [0, 1]),
    else 0."""
    ys = (torch.arange(h, dtype=boxes.dtype, device=boxes.device) + 0.5) / h
    xs = (torch.arange(w, dtype=boxes.dtype, device=boxes.device) + 0.5) / w
    in_x = (xs >= boxes[..., 0, None]) & (xs <= boxes[..., 2, None])  # (B, N, w)
    in_y = (ys >= boxes[..., 1, None]) & (ys <= boxes[..., 3, None]) & valid.bool()[..., None]  # (B, N, h)
    boxes_at = torch.einsum("bnh,bnw->bhw", in_y.to(boxes.dtype), in_x.to(boxes.dtype))  # boxes over each pixel
    return (boxes_at > 0)[:, None].to(boxes.dtype)


def vae_loss_fn(kl_weight: float, mse_weight: float = 1.0, crop_size: int = 0, edge_weight: float = 0.0,
                object_weight: float = 1.0):
    """``loss_fn(model, batch, generator)`` for train_loop: L1 (+ MSE) reconstruction + weighted KL, plus
    ``edge_weight`` times the L1 of the image gradients (the mean of the horizontal and vertical terms); with
    ``object_weight`` > 1 the reconstruction and edge terms weigh the pixels inside object boxes that much more
    (each term then divided by its mean weight)."""
    if object_weight < 1.0:
        raise ValueError(f"vae.object_weight must be >= 1 (1 = every pixel alike), not {object_weight}")

    def weighted_mean(err: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return err.mean() if weight is None else (err * weight).sum() / (weight.sum() * err.shape[1])

    def loss_fn(model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        images = batch["pixel_values"]
        if object_weight == 1.0:
            x, weight = random_crops(images, crop_size, generator), None  # (B, 3, s, s)
        else:  # the weights cropped with the images (one draw of crops for both)
            cover = box_cover(batch["boxes"], batch["valid"], *images.shape[-2:])
            both = random_crops(torch.cat([images, cover], dim=1), crop_size, generator)
            x, weight = both[:, :3], 1.0 + (object_weight - 1.0) * both[:, 3:]
        posterior = model.encode(x).latent_dist
        z = posterior.sample(generator=generator)  # (B, C, s/f, s/f)
        rec = model.decode(z).sample  # (B, 3, s, s)
        l1 = weighted_mean((rec - x).abs(), weight)
        mse = weighted_mean((rec - x).pow(2), weight)
        plain_mse = mse.detach() if weight is None else (rec - x).detach().pow(2).mean()  # what the PSNR reports
        kl = posterior.kl().mean() / x[0].numel()
        edge_weights = (None, None) if weight is None else pair_maxima(weight)
        edge = sum(weighted_mean((a - b).abs(), ew) for a, b, ew in
                   zip(image_gradients(rec), image_gradients(x), edge_weights)) / 2
        loss = l1 + mse_weight * mse + kl_weight * kl + edge_weight * edge
        return {"loss": loss, "l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach(), "edge": edge.detach(),
                "psnr": 10 * torch.log10(4.0 / plain_mse.clamp_min(1e-10))}

    return loss_fn


def _image_batches(images: torch.Tensor | Any, batch_size: int):
    """Image tensors (b, 3, H, W) from a tensor or from a data set of items with ``pixel_values``."""
    if isinstance(images, torch.Tensor):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
    else:
        for i in range(0, len(images), batch_size):
            yield torch.stack([images[j]["pixel_values"] for j in range(i, min(i + batch_size, len(images)))])


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor | Any, batch_size: int = 64,
                          seed: int = 0, max_images: int = 2048) -> float:
    """``1 / std`` of sampled latents of (up to ``max_images``) images (a tensor in [-1, 1] or a data set)."""
    dev = next(vae.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    was_training = vae.training
    vae.eval()
    n, s1, s2 = 0, 0.0, 0.0
    for x in _image_batches(images[:max_images] if isinstance(images, torch.Tensor) else
                            torch.utils.data.Subset(images, range(min(len(images), max_images))), batch_size):
        z = vae.encode(x.to(dev)).latent_dist.sample(generator=g).double()  # (b, C, h, w)
        n, s1, s2 = n + z.numel(), s1 + float(z.sum()), s2 + float(z.pow(2).sum())
    vae.train(was_training)
    var = s2 / n - (s1 / n) ** 2
    return float(1.0 / max(var, 1e-12) ** 0.5)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64, scaled: bool = True) -> torch.Tensor:
    """Latent means (B, C, H/f, W/f) of images in [-1, 1], times ``scaling_factor`` when ``scaled``."""
    dev = next(vae.parameters()).device
    out = [vae.encode(x.to(dev)).latent_dist.mode().cpu() for x in _image_batches(images, batch_size)]
    z = torch.cat(out)
    return z * vae.config.scaling_factor if scaled else z


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, batch_size: int = 64, scaled: bool = True) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] from latents (divided by ``scaling_factor`` first when ``scaled``)."""
    dev = next(vae.parameters()).device
    z = latents / vae.config.scaling_factor if scaled else latents
    return torch.cat([vae.decode(x.to(dev)).sample.clamp(-1, 1).cpu() for x in _image_batches(z, batch_size)])


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Deterministic reconstructions (latent mean, no sampling) of images in [-1, 1], clamped to [-1, 1]."""
    was_training = vae.training
    vae.eval()
    out = decode_latents(vae, encode_latents(vae, images, batch_size, scaled=False), batch_size, scaled=False)
    vae.train(was_training)
    return out


def train_autoencoder(cfg: Preset, out_dir: str | Path | None = None, *, force: bool = False,
                      progress: bool = True) -> Path:
    """Train the preset's AutoencoderKL, store its latent scaling factor and save it to ``runs/<preset>/autoencoder``.

    A folder holding a finished run with the same settings is returned as it is (``force=True`` retrains);
    at the paper preset (``vae.pretrained`` set) the local VAE folder (``<sd>/vae`` or the folder) is returned.
    """
    if cfg.vae.pretrained:
        root = require_local_dir(cfg.vae.pretrained, "autoencoder weights", "vae.pretrained")
        return root / "vae" if (root / "vae").is_dir() else root
    out_dir = resolve_path(out_dir) if out_dir is not None else cfg.run_dir("autoencoder")
    stamp = stage_stamp(cfg, "vae")
    if not force and is_finished(out_dir, stamp):
        return out_dir
    work = begin(out_dir, stamp, force)
    t0 = time.perf_counter()
    dataset = stage_dataset(cfg, "train")
    seed_initial_weights(cfg)
    vae = build_vae(cfg)
    v = cfg.vae
    tcfg = stage_train_config(cfg, v.mixed_precision, steps=v.steps, batch_size=v.batch_size, lr=v.lr,
                              warmup_steps=min(v.warmup_steps, v.steps // 5), num_workers=cfg.num_workers,
                              checkpoint_every=v.checkpoint_every)
    loss_fn = vae_loss_fn(v.kl_weight, v.mse_weight, v.crop_size, v.edge_weight, v.object_weight)
    result = train_loop(vae, loss_fn, dataset, tcfg, work, collate_fn=collate, progress=progress)
    factor = latent_scaling_factor(vae, dataset, seed=cfg.seed)
    vae.register_to_config(scaling_factor=factor)
    vae.to("cpu").eval()
    vae.save_pretrained(out_dir)
    finish(out_dir, stamp, result, t0, images=len(dataset), scaling_factor=factor)
    return out_dir
