"""RS-CLIP: contrastive training of a small CLIPModel on remote-sensing images and their captions.

CRS-Diff's stage one conditions Stable Diffusion on a CLIP text encoder tuned on RS captions. At the small
presets we train one from scratch on SynthRS with CLIP's symmetric InfoNCE loss and a learnable temperature:

    L = 1/2 [ CE(s * T V^T, Y) + CE(s * V T^T, Y^T) ],   T, V: L2-normalised text / image features (B, D)

where ``s = exp(logit_scale)`` (clamped at 100) and ``Y`` is the target matrix. SynthRS captions repeat
("an aerial image of a port."), so two images in one batch can share a caption exactly; ``Y`` then spreads each
row's target evenly over the identical captions instead of calling one of them a negative.

The result is a folder that ``CLIPModel.from_pretrained`` and ``CLIPTokenizer.from_pretrained`` both read, beside
the training record every stage keeps (:mod:`rslib.train.stage`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rslib.config import Preset, resolve_path
from rslib.data.datasets import collate, pick_captions
from rslib.models.text import build_rs_clip, clip_tokenizer, image_features, text_features, tokenize
from rslib.train.loop import cpu_generator, train_loop
from rslib.train.stage import (begin, finish, is_finished, seed_initial_weights, stage_dataset, stage_stamp,
                               stage_train_config)


# ---------------------------------------------------------------------------
# The contrastive loss


def colour_jitter(images: torch.Tensor, generator: torch.Generator, strength: float = 0.1) -> torch.Tensor:
    """Per-image brightness and contrast jitter of images in [-1, 1] (B, 3, H, W)."""
    b = images.shape[0]
    u = torch.rand(b, 2, 1, 1, generator=generator, device=generator.device).to(images) * 2 - 1  # (B, 2, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = (images - mean) * (1 + strength * u[:, :1]) + mean + strength * u[:, 1:]
    return out.clamp(-1, 1)


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor,
                     captions: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE of L2-normalised features (B, D); identical captions share the target mass."""
    b = text.shape[0]
    scale = logit_scale.exp().clamp(max=100.0)
    logits = scale * text @ image.T  # (B texts, B images)
    if captions is None:
        same = torch.eye(b, device=text.device)
    else:
        ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        key = torch.tensor([ids[c] for c in captions], device=text.device)
        same = (key[:, None] == key[None, :]).float()  # (B, B), symmetric
    target = same / same.sum(1, keepdim=True)
    loss_t = -(target * logits.log_softmax(1)).sum(1).mean()  # text -> image
    loss_i = -(target * logits.T.log_softmax(1)).sum(1).mean()  # image -> text
    hit = same[torch.arange(b), logits.argmax(1)]  # the best image's caption equals the query
    return {"loss": 0.5 * (loss_t + loss_i), "logit_scale": scale.detach(), "batch_r1": hit.mean()}


def clip_loss_fn(tokenizer: Any, max_length: int, augment: bool = True):
    """``loss_fn(model, batch, generator)`` for train_loop: one caption per image, symmetric InfoNCE."""

    def loss_fn(model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        captions = pick_captions(batch["captions"], cpu_generator(generator))
        ids = tokenize(tokenizer, captions, max_length).to(batch["pixel_values"].device)  # (B, L)
        images = batch["pixel_values"]  # (B, 3, S, S)
        if augment:
            images = colour_jitter(images, generator)
        text = nn.functional.normalize(text_features(model, ids), dim=-1)  # (B, D)
        image = nn.functional.normalize(image_features(model, images), dim=-1)  # (B, D)
        return contrastive_loss(text, image, model.logit_scale, captions)

    return loss_fn


# ---------------------------------------------------------------------------
# The stage


def train_text_encoder(cfg: Preset, out_dir: str | Path | None = None, *, force: bool = False,
                       progress: bool = True) -> Path:
    """Train RS-CLIP on the training split and save it (model + tokenizer) to ``runs/<preset>/text_encoder``.

    A folder holding a finished run with the same settings is returned as it is (``force=True`` retrains);
    at the paper preset (``clip.pretrained`` set) the local CLIP folder is returned unchanged.
    """
    if cfg.clip.pretrained:
        from rslib.models.base import require_local_dir

        return require_local_dir(cfg.clip.pretrained, "CLIP weights", "clip.pretrained")
    out_dir = resolve_path(out_dir) if out_dir is not None else cfg.run_dir("text_encoder")
    stamp = stage_stamp(cfg, "clip")
    if not force and is_finished(out_dir, stamp):
        return out_dir
    work = begin(out_dir, stamp, force)
    t0 = time.perf_counter()
    dataset = stage_dataset(cfg, "train")
    seed_initial_weights(cfg)
    model = build_rs_clip(cfg)
    tokenizer = clip_tokenizer(cfg.clip.max_length)
    c = cfg.clip
    tcfg = stage_train_config(cfg, steps=c.steps, batch_size=c.batch_size, lr=c.lr, weight_decay=c.weight_decay,
                              warmup_steps=min(c.warmup_steps, max(c.steps // 5, 0)), num_workers=cfg.num_workers,
                              checkpoint_every=c.checkpoint_every)
    result = train_loop(model, clip_loss_fn(tokenizer, c.max_length, c.augment), dataset, tcfg, work, collate_fn=collate,
                        progress=progress)
    model.to("cpu").eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    finish(out_dir, stamp, result, t0, images=len(dataset))
    return out_dir
