"""Stage two of CRS-Diff: train the condition branch around the frozen stage-one model (CRS-Diff §3.2-3.4).

Frozen: the VAE, the text tower and the stage-one UNet (loaded with an identity class embedding). Trained:
the adapter (encoder copy + FF/AFF fusion + zero convs), its feature extractor, the metadata encoder and the
content tokenizer, with the noise-prediction MSE

    L = E_{z, eps, t, c} || eps - eps_theta(z_t, t, text, content, metadata, maps) ||^2

and CRS-Diff's condition-dropout policy (:class:`rslib.data.datasets.ConditionDropout`): captions dropped with
0.5; the six maps kept all (0.1), dropped all (0.1) or dropped each (0.6 for lines, 0.5 for the others);
content and metadata likewise, a dropped one replaced by its learned null.

Every training image is pre-encoded once: VAE posterior mean/std (a latent is drawn each step), the content
image's CLIP embedding, the condition maps as uint8 and the normalised metadata.

Output folder ``runs/<preset>/crs_diff/`` (``crs_diff_<variant>`` for ablations, set by ``crs.fusion``,
``crs.use_metadata`` and ``crs.use_content``)::

    model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, adapter/, metadata_encoder/,
    content_tokenizer/, image_encoder/      <- CRSDiffPipeline.from_pretrained
    training.json, training/                <- what produced it, the loop's resumable state (rslib.train.stage)
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

from rslib.config import Preset, get_preset, resolve_path, with_overrides
from rslib.data.datasets import (ConditionDropout, RSDataset, collate, load_split_tensors, maps_as_uint8,
                                 pick_captions, split_dataset)
from rslib.data.records import CONDITION_NAMES
from rslib.models.base import build_noise_scheduler, build_sampler
from rslib.models.crs_diff import (ContentTokenizer, CRSDiffModel, CRSLocalAdapter, MetadataEncoder,
                                   check_null_conditions, zero_dropped)
from rslib.models.text import content_embeddings, tokenize
from rslib.pipelines.crs_diff import CRSDiffPipeline, keep_only
from rslib.train.loop import TrainConfig, cpu_generator, train_loop
from rslib.train.objective import AdapterTimesteps
from rslib.train.stage import (begin, data_stamp, finish, input_stamp, is_finished, load_stage_one_parts,
                               refresh_sampling_defaults, resolve_clip_dir, resolve_stage_one, save_pipeline_folder,
                               seed_initial_weights, stage_stamp, stage_train_config)
from rslib.train.stage_one import encode_latents
from rslib.utils import pick_device, read_tensor_cache, write_tensor_cache

LATENTS_CACHE = "crs_diff_latents"  # under runs/<preset>/: the encoded training split, shared by every variant
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "adapter", "metadata_encoder",
         "content_tokenizer", "image_encoder")


# ---------------------------------------------------------------------------
# Inputs


def image_encoder_from_clip(clip: CLIPModel) -> CLIPVisionModelWithProjection:
    """The image tower + projection of a CLIPModel as a standalone CLIPVisionModelWithProjection (same weights)."""
    vc = clip.config.vision_config.to_dict()
    vc["projection_dim"] = clip.config.projection_dim
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**vc))
    enc.vision_model.load_state_dict(clip.vision_model.state_dict())
    enc.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return enc.eval()


def load_image_encoder(clip_dir: str | os.PathLike) -> CLIPVisionModelWithProjection:
    """The image tower of a saved CLIP folder."""
    return image_encoder_from_clip(CLIPModel.from_pretrained(clip_dir, local_files_only=True))


# ---------------------------------------------------------------------------
# Pre-encoded training data


# The training split's condition maps stay in memory (uint8) up to this size. Beyond it, e.g. the gpu preset's
# data (20000 x 18 x 256 x 256 bytes = 24 GB) or the paper's (10000 images at 512 px: 47 GB), each step reads its
# items' maps from disk instead.
MAPS_IN_MEMORY_BYTES = 4 * 2**30


def maps_fit_in_memory(ds: RSDataset) -> bool:
    """True when the split's condition maps (uint8) take at most :data:`MAPS_IN_MEMORY_BYTES`."""
    return len(ds) * 3 * len(CONDITION_NAMES) * ds.size ** 2 <= MAPS_IN_MEMORY_BYTES


class CRSTrainingData(torch.utils.data.Dataset):
    """Pre-encoded stage-two samples.

    Item: ``mean``/``std`` (C, h, w) VAE posterior, ``conditions`` (18, S, S) uint8, ``content`` (D,) CLIP
    embedding, ``has_content`` bool, ``metadata`` (7,) in [0, 1], ``metadata_valid`` (7,) bool, ``captions``.
    ``conditions`` is either the (N, 18, S, S) uint8 stack or the split itself (an :class:`RSDataset`), whose
    maps are then read item by item.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, conditions: torch.Tensor | RSDataset,
                 content: torch.Tensor, has_content: torch.Tensor, metadata: torch.Tensor,
                 metadata_valid: torch.Tensor, captions: list[list[str]]):
        n = len(mean)
        if not all(len(x) == n for x in (std, conditions, content, has_content, metadata, metadata_valid, captions)):
            raise ValueError("all pre-encoded tensors need the same length")
        self.mean, self.std, self.conditions, self.content = mean, std, conditions, content
        self.has_content, self.metadata, self.metadata_valid = has_content, metadata, metadata_valid
        self.captions = [list(c) or [""] for c in captions]

    def __len__(self) -> int:
        return len(self.mean)

    def maps(self, i: int) -> torch.Tensor:
        """Item i's condition maps (18, S, S) uint8."""
        if isinstance(self.conditions, torch.Tensor):
            return self.conditions[i]
        return maps_as_uint8(self.conditions[i]["conditions"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"mean": self.mean[i], "std": self.std[i], "conditions": self.maps(i),
                "content": self.content[i], "has_content": self.has_content[i], "metadata": self.metadata[i],
                "metadata_valid": self.metadata_valid[i], "captions": self.captions[i]}


def check_condition_maps(names: Sequence[str]) -> tuple[str, ...]:
    """``crs.condition_maps`` checked: known map names, each once."""
    names = tuple(names)
    unknown = [n for n in names if n not in CONDITION_NAMES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"crs.condition_maps {names} must name each map at most once, from "
                         f"{', '.join(CONDITION_NAMES)}")
    return names


def required_conditions(cfg: Preset, use_content: bool) -> tuple[str, ...]:
    """What every training record must name: the maps of ``crs.condition_maps`` and, with content read from the
    records (``crs.content_source="record"``), its content image."""
    from_records = use_content and cfg.crs.content_source == "record"
    return check_condition_maps(cfg.crs.condition_maps) + (("content",) if from_records else ())


@torch.no_grad()
def encode_training_data(ds: RSDataset, vae: AutoencoderKL, image_encoder: CLIPVisionModelWithProjection | None,
                         batch_size: int = 64, device: str | torch.device = "cpu",
                         maps_in_memory: bool | None = None) -> CRSTrainingData:
    """Pre-encode a split once, ``batch_size`` items at a time (never the whole split's images in memory): VAE
    posterior (mean, std), CLIP content embeddings, metadata, captions, and the condition maps as uint8 when
    ``maps_in_memory`` (default: when they fit in :data:`MAPS_IN_MEMORY_BYTES`), else read from ``ds`` per item."""
    n = len(ds)
    maps_in_memory = maps_fit_in_memory(ds) if maps_in_memory is None else maps_in_memory
    if image_encoder is not None:
        image_encoder = image_encoder.to(device)
    parts: dict[str, list[Any]] = {k: [] for k in ("mean", "std", "conditions", "content", "has_content", "metadata",
                                                   "metadata_valid", "captions")}
    for start in range(0, n, batch_size):
        chunk = load_split_tensors(torch.utils.data.Subset(ds, range(start, min(start + batch_size, n))))
        mean, std = encode_latents(vae, chunk["pixel_values"], batch_size, device)  # (b, C, h, w)
        parts["mean"].append(mean)
        parts["std"].append(std)
        if image_encoder is not None:
            parts["content"].append(content_embeddings(image_encoder, chunk["content"], batch_size).cpu())  # (b, D)
        else:
            parts["content"].append(torch.zeros(len(chunk["captions"]), 1))
        if maps_in_memory:
            parts["conditions"].append(chunk["conditions"])
        for k in ("has_content", "metadata", "metadata_valid"):
            parts[k].append(chunk[k])
        parts["captions"].extend(chunk["captions"])
    return CRSTrainingData(*(torch.cat(parts[k]) for k in ("mean", "std")),
                           torch.cat(parts["conditions"]) if maps_in_memory else ds,
                           *(torch.cat(parts[k]) for k in ("content", "has_content", "metadata", "metadata_valid")),
                           parts["captions"])


def cached_training_data(cfg: Preset, ds: RSDataset, stage_one: Path, vae: AutoencoderKL,
                         image_encoder: CLIPVisionModelWithProjection | None, clip_dir: Path | None,
                         device: str | torch.device = "cpu") -> CRSTrainingData:
    """:func:`encode_training_data` through a cache in ``runs/<preset>/crs_diff_latents`` (keyed by the data, the
    stage-one folder and the RS-CLIP folder), so CRS-Diff and its ablation variants encode the split once."""
    maps_in_memory = maps_fit_in_memory(ds)
    stamp = json.loads(json.dumps({"preset": cfg.name, "data": data_stamp(cfg), "stage_one": input_stamp(stage_one),
                                   "clip": input_stamp(clip_dir) if image_encoder is not None else None,
                                   "maps_in_memory": maps_in_memory, "content_from": ds.content_from}))
    t = read_tensor_cache(cfg.run_dir(LATENTS_CACHE), stamp)
    if t is not None and len(t["mean"]) == len(ds):
        return CRSTrainingData(t["mean"], t["std"], t["conditions"] if maps_in_memory else ds, t["content"],
                               t["has_content"].bool(), t["metadata"], t["metadata_valid"].bool(),
                               [r.captions for r in ds.records])
    data = encode_training_data(ds, vae, image_encoder, device=device, maps_in_memory=maps_in_memory)
    tensors = {"mean": data.mean, "std": data.std, "content": data.content,
               "has_content": data.has_content.to(torch.uint8), "metadata": data.metadata,
               "metadata_valid": data.metadata_valid.to(torch.uint8)}
    if maps_in_memory:
        tensors["conditions"] = data.conditions
    write_tensor_cache(cfg.run_dir(LATENTS_CACHE), stamp, tensors)
    return data


# ---------------------------------------------------------------------------
# Model and objective


def build_crs_model(cfg: Preset, unet: UNet2DConditionModel, vae_scale_factor: int,
                    image_dim: int | None) -> CRSDiffModel:
    """Fresh trainable parts around ``unet`` (frozen, identity class embedding), sized and switched by ``cfg.crs``
    (``fusion``, ``use_metadata``, ``use_content``)."""
    c = cfg.crs
    levels = len(unet.config.block_out_channels)
    if len(c.inject_channels) != levels:
        raise ValueError(f"crs.inject_channels {c.inject_channels} needs one entry per UNet level ({levels}): the "
                         f"stage-one UNet does not match preset {cfg.name!r}")
    adapter = CRSLocalAdapter.from_unet(unet, stem_channels=c.stem_channels, inject_channels=c.inject_channels,
                                        downscale=vae_scale_factor, fusion=c.fusion,
                                        metadata_to_adapter=c.metadata_to_adapter)
    e = unet.config.time_embedding_dim or 4 * unet.config.block_out_channels[0]
    meta = MetadataEncoder(embed_dim=c.metadata_dim, out_dim=e) if c.use_metadata else None
    content = None
    if c.use_content:
        if image_dim is None:
            raise ValueError("use_content needs an image encoder (RS-CLIP) to embed content images")
        content = ContentTokenizer(in_dim=image_dim, context_dim=unet.config.cross_attention_dim,
                                   num_tokens=c.content_tokens)
    unet.requires_grad_(False)
    return CRSDiffModel(unet, adapter, meta, content)


class CRSTrainModel(nn.Module):
    """What the loop trains: the denoiser (frozen UNet + trainable parts) beside the frozen text tower."""

    def __init__(self, crs: CRSDiffModel, text_encoder: CLIPTextModel):
        super().__init__()
        self.crs = crs
        self.text_encoder = text_encoder.requires_grad_(False).eval()


class CRSDiffLoss:
    """``loss_fn(model, batch, generator)``: noise-prediction MSE under CRS-Diff's condition dropout."""

    def __init__(self, tokenizer: CLIPTokenizer, scaling_factor: float, dropout: ConditionDropout | None = None,
                 noise_scheduler: DDPMScheduler | None = None, timestep_sampling: str = "uniform",
                 x0_weight_max: float = 1.0, road_loss_weight: float = 1.0,
                 noise_offset: float = 0.0, condition_maps: Sequence[str] = CONDITION_NAMES,
                 null_conditions: str = "learned"):
        if road_loss_weight < 1.0:
            raise ValueError(f"road_loss_weight must be >= 1 (1 = every latent cell alike), not {road_loss_weight}")
        self.road_loss_weight = float(road_loss_weight)
        self.tokenizer = tokenizer
        self.scaling_factor = float(scaling_factor)
        self.dropout = dropout or ConditionDropout()
        self.noise_scheduler = noise_scheduler or build_noise_scheduler()
        self.steps = AdapterTimesteps(self.noise_scheduler, timestep_sampling, x0_weight_max, noise_offset)
        self.condition_maps = check_condition_maps(condition_maps)
        self.null_conditions = check_null_conditions(null_conditions)

    def __call__(self, model: CRSTrainModel, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """The loss of one batch; every random draw comes from ``generator``."""
        mean, std = batch["mean"], batch["std"]  # (B, C, h, w)
        dev, b = mean.device, mean.shape[0]
        g = cpu_generator(generator)
        keep = self.dropout.sample(b, g)  # local (B, 6), global (B, 2), caption (B,)
        z = torch.randn(mean.shape, generator=g).to(dev)
        latents = (mean + std * z) * self.scaling_factor
        maps = batch["conditions"]  # (B, 18, H, W) uint8
        if set(self.condition_maps) != set(CONDITION_NAMES):
            maps = keep_only(maps, self.condition_maps)  # the maps outside crs.condition_maps are zero
        conditions = ConditionDropout.apply_local(maps.float() / 255.0, keep["local"].to(dev))
        captions = ConditionDropout.apply_captions(pick_captions(batch["captions"], g), keep["caption"])
        ids = tokenize(self.tokenizer, captions).to(dev)  # (B, L)
        with torch.no_grad():
            text = model.text_encoder(input_ids=ids).last_hidden_state  # (B, L, D)
        content_keep = keep["global"][:, 0].to(dev) & batch["has_content"].bool()
        meta_keep = keep["global"][:, 1:2].to(dev) & batch["metadata_valid"].bool()  # (B, 7)
        noise = self.steps.noise(tuple(latents.shape), g).to(dev)
        t = self.steps.sample(b, g).to(dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        content, metadata = (batch["content"], content_keep), (batch["metadata"], meta_keep)
        if self.null_conditions == "zero":  # dropped ones are zeros through the encoders, no learned nulls
            content, metadata = zero_dropped(*content), zero_dropped(*metadata)
        pred = model.crs(noisy, t, text, conditions, *content, *metadata)
        loss, noise_mse = self.steps.loss(pred, noise, t, self.road_weights(maps, tuple(latents.shape[-2:])))
        return {"loss": loss, "noise_mse": noise_mse, "maps_kept": keep["local"].float().mean()}

    def road_weights(self, conditions: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor | None:
        """(B, 1, h, w) loss weights 1 + (road_loss_weight - 1) * (share of the cell the road map covers), from
        the item's road map (B, 18, H, W) uint8 whether or not the map was dropped, or None at weight 1."""
        if self.road_loss_weight == 1.0:
            return None
        m = 3 * CONDITION_NAMES.index("road")
        road = conditions[:, m:m + 1].float() / 255.0  # (B, 1, H, W) in [0, 1]
        return 1.0 + (self.road_loss_weight - 1.0) * F.adaptive_avg_pool2d(road, hw)


# ---------------------------------------------------------------------------
# The stage


def variant_name(cfg: Preset) -> str:
    """Folder name of a run: ``crs_diff`` with the named preset's switches, else ``crs_diff_<fusion>[_nometa]
    [_nocontent]`` from ``crs.fusion``, ``crs.use_metadata`` and ``crs.use_content``."""
    c, own = cfg.crs, get_preset(cfg.name).crs
    if (c.fusion, c.use_metadata, c.use_content) == (own.fusion, own.use_metadata, own.use_content):
        return "crs_diff"
    return "crs_diff_" + c.fusion + ("" if c.use_metadata else "_nometa") + ("" if c.use_content else "_nocontent")


def crs_train_config(cfg: Preset) -> TrainConfig:
    """The loop settings of stage two for a preset."""
    c = cfg.crs
    return stage_train_config(cfg, c.mixed_precision, steps=c.steps, batch_size=c.batch_size, lr=c.lr,
                              warmup_steps=min(c.warmup_steps, c.steps), ema_decay=None,
                              checkpoint_every=c.checkpoint_every, log_every=10, num_workers=0, channels_last=True)


def sampling_defaults(cfg: Preset) -> dict[str, Any]:
    """How ``from_pretrained(...)(prompt)`` samples a trained folder by default: as the preset says."""
    c = cfg.crs
    return {"map_guidance": c.map_guidance, "guidance_scale": c.guidance_scale, "num_inference_steps": c.sample_steps,
            "negative_prompt": c.negative_prompt, "guidance_keeps_metadata": c.guidance_keeps_metadata}


def train_crs_diff(cfg: Preset, stage_one_dir: str | os.PathLike | None = None,
                   out_dir: str | os.PathLike | None = None, force: bool = False, *,
                   clip_dir: str | os.PathLike | None = None, stop_after: int | None = None,
                   progress: bool = True) -> Path:
    """Train CRS-Diff's condition branch on the frozen stage-one model; returns the saved pipeline folder.

    The ablations are settings: ``crs.fusion`` ("aff" | "ff" | "sum"), ``crs.use_metadata`` and
    ``crs.use_content``; a variant saves to ``runs/<preset>/crs_diff_<variant>`` (:func:`variant_name`). A finished
    folder with the same training settings is reused unless ``force`` (with the preset's sampling defaults); an
    interrupted run resumes from its checkpoint. The data set is ``crs.data_root``, else ``data.root``.
    """
    cfg = cfg.stage_data("crs")
    c = cfg.crs
    s1 = resolve_stage_one(cfg, stage_one_dir)
    out_dir = resolve_path(out_dir) if out_dir else cfg.run_dir(variant_name(cfg))
    tcfg = crs_train_config(cfg)
    stamp = stage_stamp(cfg, "crs", stage_one=input_stamp(s1))
    if not force and is_finished(out_dir, stamp):
        refresh_sampling_defaults(out_dir, **sampling_defaults(cfg))
        return out_dir
    train = split_dataset(cfg, "train", content_from=c.content_source)
    train.require_conditions(required_conditions(cfg, c.use_content))  # never train on zeros in their place
    work = begin(out_dir, stamp, force)
    t0 = time.perf_counter()
    parts = load_stage_one_parts(s1, class_embed_type="identity")  # metadata enters through class_labels
    clip_path = resolve_clip_dir(cfg, clip_dir) if c.use_content else None
    image_encoder = load_image_encoder(clip_path) if c.use_content else None
    device = pick_device(cfg.device)
    data = cached_training_data(cfg, train, s1, parts["vae"], image_encoder, clip_path, device)
    encode_s = time.perf_counter() - t0

    seed_initial_weights(cfg)
    vae_factor = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    image_dim = image_encoder.config.projection_dim if image_encoder is not None else None
    crs = build_crs_model(cfg, parts["unet"], vae_factor, image_dim)
    model = CRSTrainModel(crs, parts["text_encoder"])
    loss_fn = CRSDiffLoss(parts["tokenizer"], parts["vae"].config.scaling_factor,
                          timestep_sampling=c.timestep_sampling, x0_weight_max=c.x0_weight_max,
                          road_loss_weight=c.road_loss_weight, noise_offset=cfg.unet.noise_offset,
                          condition_maps=c.condition_maps, null_conditions=c.null_conditions)
    result = train_loop(model, loss_fn, data, tcfg, work, collate_fn=collate, stop_after=stop_after,
                        progress=progress)
    if result.steps < tcfg.steps:
        return out_dir
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in
              (("adapter", crs.adapter), ("metadata_encoder", crs.metadata_encoder),
               ("content_tokenizer", crs.content_tokenizer)) if m is not None}
    pipe = CRSDiffPipeline(vae=parts["vae"].cpu(), text_encoder=parts["text_encoder"].cpu(),
                           tokenizer=parts["tokenizer"], unet=crs.unet.cpu(), scheduler=build_sampler(),
                           adapter=crs.adapter.cpu(), metadata_encoder=_cpu(crs.metadata_encoder),
                           content_tokenizer=_cpu(crs.content_tokenizer), image_encoder=_cpu(image_encoder),
                           condition_maps=c.condition_maps, null_conditions=c.null_conditions,
                           **sampling_defaults(cfg))
    save_pipeline_folder(pipe, out_dir, PARTS)
    finish(out_dir, stamp, result, t0, preset=cfg.name, fusion=c.fusion, use_metadata=c.use_metadata,
           use_content=c.use_content, condition_maps=list(c.condition_maps), encode_seconds=round(encode_s, 2),
           n_train=len(data), parameters=counts, stage_one_dir=str(s1), train=asdict(tcfg))
    return out_dir


ABLATION_DIVISOR = 6  # the fusion ablation's variants train crs.steps // this (notebook 05, table (b))


def fusion_ablation_steps(cfg: Preset) -> int:
    """Training steps of each fusion-ablation variant by default (at least 1)."""
    return max(1, cfg.crs.steps // ABLATION_DIVISOR)


def fusion_ablation(cfg: Preset, fusion: str, steps: int = 0) -> Preset:
    """The settings of one variant of the fusion ablation: ``crs.fusion`` ("aff" | "ff" | "sum") and ``crs.steps``
    (0: :func:`fusion_ablation_steps`), the same for every variant."""
    return with_overrides(cfg, {"crs.fusion": fusion, "crs.steps": steps or fusion_ablation_steps(cfg)})


def train_fusion_ablation(cfg: Preset, force: bool = False) -> Path:
    """Train a fusion-ablation variant (:func:`fusion_ablation`) into ``runs/<preset>/ablation/crs_diff_<fusion>_<steps>``,
    beside the model notebook 03 trained."""
    out_dir = cfg.run_dir("ablation") / f"crs_diff_{cfg.crs.fusion}_{cfg.crs.steps}"
    return train_crs_diff(cfg, out_dir=out_dir, force=force)


def _cpu(m: nn.Module | None) -> nn.Module | None:
    return m.cpu() if m is not None else None


__all__ = ["ABLATION_DIVISOR", "CRSDiffLoss", "CRSTrainModel", "CRSTrainingData", "build_crs_model",
           "cached_training_data", "check_condition_maps", "crs_train_config", "encode_training_data",
           "fusion_ablation", "fusion_ablation_steps", "image_encoder_from_clip", "load_image_encoder",
           "maps_fit_in_memory", "required_conditions", "train_crs_diff",
           "train_fusion_ablation", "variant_name"]
