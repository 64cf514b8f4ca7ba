"""Stage one: the text-to-image RS model (CRS-Diff §3.1), saved as a complete Stable Diffusion pipeline folder.

A ``UNet2DConditionModel`` learns to predict the noise added to VAE latents of RS images, conditioned on the
last hidden state (B, 77, D) of the frozen RS-CLIP text tower. The VAE and the text encoder stay frozen, as in
the paper ("only the denoising model is updated"). At the small presets the UNet is trained from scratch on
SynthRS; at the paper preset it is SD 1.x's UNet from the local folder ``cfg.unet.pretrained``, fine-tuned.

The VAE is frozen, so every training image is encoded once before training: the posterior mean and standard
deviation stay in memory and each step draws ``z = mean + std * eps`` with the step's generator (so resuming
stays exact). Captions are dropped to "" with ``cfg.unet.caption_dropout`` so that classifier-free guidance works.

Output folder ``runs/<preset>/stage_one/``::

    model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/   <- StableDiffusionPipeline.from_pretrained
    training.json, training/               <- what produced it, and the loop's resumable state (rslib.train.stage)
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from rslib.config import Preset, resolve_path
from rslib.data.datasets import RSDataset, collate, pick_captions, split_dir
from rslib.models.base import build_noise_scheduler, build_sampler, build_unet, require_local_dir
from rslib.models.text import clip_tokenizer, tokenize
from rslib.train.loop import EMA_NAME, WEIGHTS_NAME, TrainConfig, train_loop
from rslib.train.objective import AdapterTimesteps
from rslib.train.stage import (begin, finish, input_stamp, is_finished, resolve_clip_dir, save_pipeline_folder,
                               seed_initial_weights, stage_stamp, stage_train_config)
from rslib.utils import pick_device

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


# ---------------------------------------------------------------------------
# Inputs: the frozen text tower, the frozen VAE, the latents of the training split


def resolve_inputs(cfg: Preset, text_encoder_dir: str | os.PathLike | None = None,
                   autoencoder_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The RS-CLIP and autoencoder folders stage one reads, or a clear error naming what makes them.

    A local pretrained folder (``clip.pretrained``, ``vae.pretrained``) wins over a folder trained earlier in
    ``runs/``, as in CRS-Diff's and CC-Diff's training, so every stage reads the same text tower."""
    te = resolve_clip_dir(cfg, text_encoder_dir, "text_encoder_dir")
    if autoencoder_dir:
        ae = resolve_path(autoencoder_dir)
    else:
        ae = resolve_path(cfg.vae.pretrained) if cfg.vae.pretrained else cfg.run_dir("autoencoder")
    if not (ae / "config.json").is_file() and not (ae / "vae" / "config.json").is_file():
        raise FileNotFoundError(
            f"no autoencoder at {ae}: run notebook 01 (or rslib.train.autoencoder.train_autoencoder(cfg)) first, "
            f"or pass autoencoder_dir=<a diffusers AutoencoderKL folder>")
    return te, ae


def load_text_tower(path: str | os.PathLike) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """The text tower of a saved CLIP folder (CLIPModel or CLIPTextModel) and its tokenizer."""
    path = Path(path)
    sub = "text_encoder" if (path / "text_encoder" / "config.json").is_file() else ""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a CLIPModel folder also holds the vision tower: not an error here
    try:
        text = CLIPTextModel.from_pretrained(path, subfolder=sub, local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)
    max_length = text.config.max_position_embeddings
    for tok_dir in (path, path / "tokenizer"):
        if (tok_dir / "vocab.json").is_file() or (tok_dir / "tokenizer.json").is_file():
            tok = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
            tok.model_max_length = max_length
            return text, tok
    return text, clip_tokenizer(max_length)


def load_autoencoder(path: str | os.PathLike) -> AutoencoderKL:
    """A saved AutoencoderKL folder (or the ``vae/`` of a Stable Diffusion folder)."""
    path = Path(path)
    sub = "vae" if (path / "vae" / "config.json").is_file() else None
    return AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (N, C, h, w) of images in [-1, 1] (N, 3, H, W), unscaled, on CPU."""
    vae = vae.to(device).eval()
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(images[i:i + batch_size].to(device)).latent_dist
        means.append(dist.mean.float().cpu())  # (b, C, h, w)
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


class LatentCaptions(torch.utils.data.Dataset):
    """Pre-encoded training pairs: item = {"mean", "std": (C, h, w), "captions": list[str]}."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, captions: Sequence[Sequence[str]]):
        if not len(mean) == len(std) == len(captions):
            raise ValueError(f"{len(mean)} latents, {len(std)} stds and {len(captions)} caption lists")
        self.mean, self.std, self.captions = mean, std, [list(c) or [""] for c in captions]

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"mean": self.mean[i], "std": self.std[i], "captions": self.captions[i]}


def latent_dataset(cfg: Preset, vae: AutoencoderKL, split: str = "train") -> LatentCaptions:
    """Encode one split of the preset's data set with the frozen VAE (SynthRS is generated if missing), a chunk of
    images at a time, so that only the latents of the whole split are held in memory."""
    ds = RSDataset(split_dir(cfg, split), size=cfg.data.image_size, max_objects=1, with_conditions=False)
    device, chunk = pick_device(cfg.device), 256
    means, stds = [], []
    for start in range(0, len(ds), chunk):
        images = torch.stack([ds[i]["pixel_values"] for i in range(start, min(start + chunk, len(ds)))])  # in [-1, 1]
        mean, std = encode_latents(vae, images, device=device)
        means.append(mean)
        stds.append(std)
    return LatentCaptions(torch.cat(means), torch.cat(stds), [r.captions for r in ds.records])


# ---------------------------------------------------------------------------
# The objective


def drop_captions(captions: Sequence[str], p: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by "" with probability ``p`` (one draw per caption from ``generator``)."""
    keep = torch.rand(len(captions), generator=generator, device=generator.device) >= p
    return [c if bool(k) else "" for c, k in zip(captions, keep.tolist())]


class StageOneModel(nn.Module):
    """The trainable UNet beside the frozen text tower (one module, as ``train_loop`` wants)."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder.requires_grad_(False).eval()


class StageOneLoss:
    """``loss_fn(model, batch, generator)``: noise-prediction MSE on VAE latents with caption dropout.

    ``timestep_sampling``, ``x0_weight_max`` and ``noise_offset`` are those of :class:`AdapterTimesteps`
    (defaults: uniform steps, plain noise MSE, Gaussian noise, as Stable Diffusion trains)."""

    def __init__(self, tokenizer: CLIPTokenizer, scaling_factor: float, caption_dropout: float,
                 noise_scheduler: DDPMScheduler | None = None, timestep_sampling: str = "uniform",
                 x0_weight_max: float = 1.0, noise_offset: float = 0.0):
        self.tokenizer = tokenizer
        self.scaling_factor = float(scaling_factor)
        self.caption_dropout = float(caption_dropout)
        self.noise_scheduler = noise_scheduler or build_noise_scheduler()
        self.steps = AdapterTimesteps(self.noise_scheduler, timestep_sampling, x0_weight_max, noise_offset)

    def __call__(self, model: StageOneModel, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """The loss of one batch; every random draw comes from ``generator``."""
        mean, std = batch["mean"], batch["std"]  # (B, C, h, w)
        dev, b = mean.device, mean.shape[0]
        eps_z = torch.randn(mean.shape, generator=generator, device=generator.device).to(dev)
        latents = (mean + std * eps_z) * self.scaling_factor  # a posterior sample, scaled to ~unit variance
        captions = drop_captions(pick_captions(batch["captions"], generator), self.caption_dropout, generator)
        ids = tokenize(self.tokenizer, captions).to(dev)  # (B, 77)
        with torch.no_grad():
            context = model.text_encoder(input_ids=ids).last_hidden_state  # (B, 77, D)
        noise = self.steps.noise(tuple(latents.shape), generator).to(dev)
        t = self.steps.sample(b, generator).to(dev)  # (B,)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = model.unet(noisy, t, encoder_hidden_states=context).sample  # (B, C, h, w)
        return self.steps.loss(pred, noise, t)[0]


# ---------------------------------------------------------------------------
# Training and saving


def stage_one_train_config(cfg: Preset) -> TrainConfig:
    """The loop settings of stage one for a preset (lr, steps, batch, EMA from ``cfg.unet``)."""
    u = cfg.unet
    return stage_train_config(
        cfg, u.mixed_precision, steps=u.steps, batch_size=u.batch_size, lr=u.lr,
        warmup_steps=min(u.warmup_steps, u.steps), ema_decay=u.ema_decay,
        checkpoint_every=min(1000, max(50, u.steps // 5)), log_every=10, num_workers=0, channels_last=True,
    )


def train_stage_one(cfg: Preset, text_encoder_dir: str | os.PathLike | None = None,
                    autoencoder_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                    force: bool = False, *, stop_after: int | None = None, progress: bool = True) -> Path:
    """Train (or fine-tune) the stage-one UNet and save a complete Stable Diffusion pipeline folder; returns it.

    A finished folder trained with the same settings from the same text encoder and autoencoder (the same
    training of them, see ``input_stamp``) is reused unless ``force``; an interrupted run with the same settings
    resumes from its checkpoint. ``stop_after=k`` stops after step k with a checkpoint only (no pipeline is
    written).
    """
    out_dir = resolve_path(out_dir) if out_dir else cfg.run_dir("stage_one")
    t0 = time.perf_counter()
    if cfg.unet.pretrained:  # fail early and clearly when the SD folder is missing
        require_local_dir(cfg.unet.pretrained, "Stable Diffusion weights", "unet.pretrained")
    te_dir, ae_dir = resolve_inputs(cfg, text_encoder_dir, autoencoder_dir)
    stamp = stage_stamp(cfg, "unet", text_encoder=input_stamp(te_dir), autoencoder=input_stamp(ae_dir))
    if not force and is_finished(out_dir, stamp):
        return out_dir
    work = begin(out_dir, stamp, force)
    text_encoder, tokenizer = load_text_tower(te_dir)
    vae = load_autoencoder(ae_dir)
    data = latent_dataset(cfg, vae)
    encode_s = time.perf_counter() - t0

    seed_initial_weights(cfg)
    unet = build_unet(cfg, cross_attention_dim=text_encoder.config.hidden_size)
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ValueError(f"the UNet attends to {unet.config.cross_attention_dim}-d context but the text encoder at "
                         f"{te_dir} gives {text_encoder.config.hidden_size}-d states")
    model = StageOneModel(unet, text_encoder)
    loss_fn = StageOneLoss(tokenizer, vae.config.scaling_factor, cfg.unet.caption_dropout,
                           timestep_sampling=cfg.unet.timestep_sampling, x0_weight_max=cfg.unet.x0_weight_max,
                           noise_offset=cfg.unet.noise_offset)
    tcfg = stage_one_train_config(cfg)
    result = train_loop(model, loss_fn, data, tcfg, work, collate_fn=collate, stop_after=stop_after,
                        progress=progress)
    if result.steps < tcfg.steps:
        return out_dir
    if tcfg.ema_decay is not None and tcfg.steps > 0:  # the saved UNet carries the EMA weights
        ema = load_file(str(result.checkpoint_dir / EMA_NAME))
        model.load_state_dict(ema, strict=False)
    elif tcfg.steps > 0:
        model.load_state_dict(load_file(str(result.checkpoint_dir / WEIGHTS_NAME)), strict=False)
    save_pipeline(out_dir, unet.cpu(), vae.cpu(), text_encoder.cpu(), tokenizer)
    finish(out_dir, stamp, result, t0, preset=cfg.name, encode_seconds=round(encode_s, 2), n_train=len(data),
           ema_decay=tcfg.ema_decay, text_encoder_dir=str(te_dir), autoencoder_dir=str(ae_dir), train=asdict(tcfg),
           unet=asdict(cfg.unet), unet_parameters=sum(p.numel() for p in unet.parameters()))
    return out_dir


def save_pipeline(out_dir: str | os.PathLike, unet: UNet2DConditionModel, vae: AutoencoderKL,
                  text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> Path:
    """Write the parts as a StableDiffusionPipeline folder (DDIM sampler)."""
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=build_sampler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return save_pipeline_folder(pipe, out_dir, PIPELINE_PARTS)
