"""CC-Diff training: the layout adapter around the frozen stage-one model (CC-Diff §3; reference notes §3).

Frozen: the VAE, the text tower and the stage-one UNet (a plain ``StableDiffusionPipeline`` folder). Trained:
only the :class:`rslib.models.cc_diff.CCDiffAdapter` (box net, dual resampler with the context bridge, one
fusion module per cross-attention of ``cfg.cc.fusion_blocks``), with the noise-prediction MSE

    L = E_{z, eps, t} || eps - eps_theta(z_t, t, caption, layout, instance references, background reference) ||^2

Instance phrases are the class names encoded by the frozen text tower ("a ship"). For classifier-free guidance
the caption is dropped to "" with ``cfg.cc.caption_dropout`` and all instances of a sample with
``cfg.cc.instance_dropout`` (upstream used neither; the paper preset sets both to 0).

Everything frozen is computed once before training, so a step costs one UNet forward/backward plus the adapter:
the VAE posterior of every training image, the reference bank (seeded crops per class, RS-CLIP or DINOv2
tokens), the scene tokens and CLIP embeddings of the retrieval pool, and for every caption the scene it retrieves
(top-1, never its own image). The latents and the bank are cached in ``runs/<preset>/cc_diff_latents`` and
``runs/<preset>/cc_diff_references`` and shared by the variants. Each step draws, per object, a reference crop of the same class from another image (seeded by the
step, so resuming stays exact).

Output folder ``runs/<preset>/cc_diff/`` (``cc_diff_<mode>`` for the ablations, ``cc.mode`` ``no_bridge`` and
``gligen``)::

    model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, adapter/, references/
                                        <- CCDiffPipeline.from_pretrained
    training.json, training/            <- what produced it, the loop's resumable state (rslib.train.stage)
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from rslib.config import Preset, resolve_path
from rslib.data.datasets import RSDataset, collate, split_dir
from rslib.models.base import build_noise_scheduler, build_sampler
from rslib.models.cc_diff import ARCHITECTURE_VERSION, CCDiffAdapter, CCDiffModel, trainable_parameter_counts
from rslib.models.references import (
    ImageTokenEncoder,
    ReferenceBank,
    crop_objects,
    load_dinov2,
    load_sam_predictor,
    masked_crops,
    phrase_for,
    retrieval_table,
    select_bank,
)
from rslib.models.text import tokenize
from rslib.pipelines.cc_diff import CCDiffPipeline
from rslib.train.loop import TrainConfig, cpu_generator, train_loop
from rslib.train.objective import AdapterTimesteps
from rslib.train.stage import (begin, data_stamp, finish, input_stamp, is_finished, load_stage_one_parts,
                               refresh_sampling_defaults, refresh_scheduler, resolve_clip_dir, resolve_stage_one, save_pipeline_folder,
                               seed_initial_weights, stage_stamp, stage_train_config)
from rslib.utils import atomic_write_dir, pick_device, read_tensor_cache, write_tensor_cache

REFERENCES_CACHE = "cc_diff_references"
LATENTS_CACHE = "cc_diff_latents"
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "adapter", "references")
CAPTION_CHOICES = ("any", "first")  # cc.caption


# ---------------------------------------------------------------------------
# Inputs


def resolve_base_model(cfg: Preset, stage_one_dir: str | os.PathLike | None = None) -> Path:
    """The frozen model CC-Diff trains on: ``stage_one_dir`` if given, else ``cc.base_model`` (a local Stable
    Diffusion folder, used as it is: the paper's SD 1.4), else this preset's stage one (notebook 02)."""
    if stage_one_dir or not cfg.cc.base_model:
        return resolve_stage_one(cfg, stage_one_dir)
    path = resolve_path(cfg.cc.base_model)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"cc.base_model: no Stable Diffusion folder (model_index.json) at {path}: put a local "
                                f"diffusers copy of stable-diffusion-v1-4 there, or set cc.base_model=\"\" to train on "
                                f"this preset's stage one")
    return path


def prepare_base_model(cfg: Preset) -> Path:
    """The base model of :func:`resolve_base_model`; this preset's stage one is trained first if it is the base
    (``cc.base_model`` empty). A base model from ``cc.base_model`` is never trained here."""
    if not cfg.cc.base_model:
        from rslib.train.stage_one import train_stage_one

        return train_stage_one(cfg)
    return resolve_base_model(cfg)


def dataset_classes(cfg: Preset) -> list[str]:
    """The object classes: SynthRS's eight, or the sorted labels of a real data set's training split."""
    if not cfg.data.root:
        from rslib.data.synthrs import OBJECT_CLASSES

        return list(OBJECT_CLASSES)
    from rslib.data.records import read_records

    return sorted({o.label for r in read_records(cfg.data_dir() / "train") for o in r.objects})


def train_split(cfg: Preset) -> RSDataset:
    """The training split with up to ``cfg.cc.max_instances`` objects per image (SynthRS is generated first)."""
    folder = split_dir(cfg, "train")
    return RSDataset(folder, size=cfg.data.image_size, max_objects=cfg.cc.max_instances,
                     classes=dataset_classes(cfg), with_conditions=False)


def image_token_encoder(cfg: Preset, clip: CLIPModel | None) -> ImageTokenEncoder:
    """The frozen tower that gives reference tokens: RS-CLIP's vision tower, or DINOv2 from ``cc.dino_path``."""
    kind = cfg.cc.image_encoder
    if kind == "dinov2":
        return ImageTokenEncoder.from_dinov2(load_dinov2(cfg.cc.dino_path), cfg.cc.dino_size)
    if kind != "rs_clip":
        raise ValueError(f"cc.image_encoder must be 'rs_clip' or 'dinov2', not {kind!r}")
    if clip is None:
        raise ValueError("the rs_clip image encoder needs the RS-CLIP model")
    return ImageTokenEncoder.from_clip(clip)


# ---------------------------------------------------------------------------
# Pre-encoded training data


class CCTrainingData(torch.utils.data.Dataset):
    """Pre-encoded CC-Diff samples.

    Item: ``mean``/``std`` (C, h, w) VAE posterior, ``boxes`` (N, 4), ``obb`` (N, 8), ``labels`` (N,) (-1 =
    padding), ``valid`` (N,), ``index`` the image's index in the split, ``captions`` (list of str) and
    ``retrieved`` (one retrieval-pool index per caption; empty without references).
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, boxes: torch.Tensor, obb: torch.Tensor,
                 labels: torch.Tensor, valid: torch.Tensor, captions: list[list[str]],
                 retrieved: list[list[int]] | None = None):
        n = len(mean)
        if not all(len(x) == n for x in (std, boxes, obb, labels, valid, captions)):
            raise ValueError("all pre-encoded tensors need the same length")
        self.mean, self.std, self.boxes, self.obb, self.labels, self.valid = mean, std, boxes, obb, labels, valid
        self.captions = [list(c) or [""] for c in captions]
        self.retrieved = retrieved if retrieved is not None else [[] for _ in range(n)]

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"mean": self.mean[i], "std": self.std[i], "boxes": self.boxes[i], "obb": self.obb[i],
                "labels": self.labels[i], "valid": self.valid[i], "index": i, "captions": self.captions[i],
                "retrieved": self.retrieved[i]}


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield range(i, min(n, i + size))


@torch.no_grad()
def encode_training_data(ds: RSDataset, vae: AutoencoderKL, device: str | torch.device = "cpu",
                         batch_size: int = 128) -> CCTrainingData:
    """VAE posterior mean/std of every training image and its padded layout (no retrieval yet)."""
    vae = vae.to(device)
    means, stds, items = [], [], []
    for chunk in _chunks(len(ds), batch_size):
        its = [ds[i] for i in chunk]
        images = torch.stack([it["pixel_values"] for it in its]).to(device)
        dist = vae.encode(images).latent_dist
        means.append(dist.mean.float().cpu())  # (b, C, h, w)
        stds.append(dist.std.float().cpu())
        items += [{k: it[k] for k in ("boxes", "obb", "labels", "valid")} for it in its]
    return CCTrainingData(torch.cat(means), torch.cat(stds), torch.stack([it["boxes"] for it in items]),
                          torch.stack([it["obb"] for it in items]), torch.stack([it["labels"] for it in items]),
                          torch.stack([it["valid"] for it in items]), [r.captions for r in ds.records])


def _token_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"cc.ref_dtype must be float32, float16 or bfloat16, not {name!r}")
    return getattr(torch, name)


@torch.no_grad()
def build_references(cfg: Preset, ds: RSDataset, clip: CLIPModel, text_encoder: CLIPTextModel,
                     tokenizer: CLIPTokenizer, device: str | torch.device = "cpu",
                     batch_size: int = 128) -> tuple[ReferenceBank, list[list[int]]]:
    """The reference bank of a training split, and for every caption of every image the pool index of the scene
    it retrieves (top-1 RS-CLIP text -> image, the image itself excluded). Instance crops are SAM-masked when
    ``cfg.cc.sam_checkpoint`` names a local SAM checkpoint, plain box crops otherwise."""
    c = cfg.cc
    classes = ds.classes
    encoder = image_token_encoder(cfg, clip).to(device)
    sam = load_sam_predictor(c.sam_checkpoint, device) if c.sam_checkpoint else None
    clip = clip.to(device).eval()
    dt = _token_dtype(c.ref_dtype)
    # which objects make the bank (from the records: no image is read)
    owner, labels, boxes = [], [], []
    for i, rec in enumerate(ds.records):
        for o in rec.objects:
            if o.label in classes:
                owner.append(i)
                labels.append(classes.index(o.label))
                boxes.append(o.bbox)
    boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    areas = ((boxes_t[:, 2] - boxes_t[:, 0]) * (boxes_t[:, 3] - boxes_t[:, 1])).tolist()
    chosen = select_bank(labels, areas, len(classes), c.bank_per_class, seed=cfg.data.seed)  # grouped by class
    owner_t, labels_t = torch.tensor(owner, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
    # the retrieval pool: every training image, or a seeded subset
    n = len(ds)
    if 0 < c.retrieval_pool < n:
        g = torch.Generator().manual_seed(cfg.data.seed + 1)
        pool = torch.randperm(n, generator=g)[: c.retrieval_pool].sort().values
    else:
        pool = torch.arange(n)
    in_pool = torch.full((n,), -1, dtype=torch.long)
    in_pool[pool] = torch.arange(len(pool))

    fg_tokens: dict[int, torch.Tensor] = {}
    bg_tokens, bg_embeds = [None] * len(pool), [None] * len(pool)
    chosen_owner = owner_t[chosen]
    for chunk in _chunks(n, batch_size):
        lo, hi = chunk.start, chunk.stop
        sel = ((chosen_owner >= lo) & (chosen_owner < hi)).nonzero().flatten()  # bank entries in this chunk
        pooled_here = [i for i in chunk if in_pool[i] >= 0]
        if len(sel) == 0 and not pooled_here:
            continue
        images = torch.stack([ds[i]["pixel_values"] for i in chunk]).to(device)  # (b, 3, S, S) in [-1, 1]
        if len(sel):
            objs = chosen[sel]
            where = (images, owner_t[objs].to(device) - lo, boxes_t[objs].to(device), encoder.input_size)
            crops = (crop_objects(*where, margin=c.crop_margin) if sam is None
                     else masked_crops(*where, sam, margin=c.crop_margin))
            for k, tok in zip(sel.tolist(), encoder(crops, c.fg_ref_grid).cpu()):
                fg_tokens[k] = tok.to(dt)
        if pooled_here:
            sub = images[torch.tensor(pooled_here, device=device) - lo]
            tok = encoder(sub, c.bg_ref_grid)  # (p, Tb, D)
            if encoder.kind == "rs_clip":  # CLS after the final LayerNorm is CLIP's pooled output
                emb = clip.visual_projection(tok[:, 0].to(clip.dtype))
            else:
                from rslib.models.text import image_features

                emb = image_features(clip, sub)
            emb = nn.functional.normalize(emb.float(), dim=-1).cpu()
            for j, i in enumerate(pooled_here):
                bg_tokens[int(in_pool[i])] = tok[j].cpu().to(dt)
                bg_embeds[int(in_pool[i])] = emb[j]
    dim = encoder.dim
    fg = torch.stack([fg_tokens[k] for k in range(len(chosen))]) if len(chosen) else torch.zeros(0, 1, dim)
    bw = boxes_t[chosen, 2] - boxes_t[chosen, 0]
    bh = boxes_t[chosen, 3] - boxes_t[chosen, 1]
    bank = ReferenceBank.build(
        classes, fg, labels_t[chosen], owner_t[chosen], bw.clamp_min(1e-6) / bh.clamp_min(1e-6),
        torch.stack(bg_tokens), torch.stack(bg_embeds), pool, clip.text_projection.weight.detach().cpu().float(),
        fg_grid=c.fg_ref_grid, bg_grid=c.bg_ref_grid, encoder=encoder.kind, encoder_input_size=encoder.input_size,
        token_dtype=c.ref_dtype)
    # every caption's retrieval, with the frozen text tower the pipeline uses (pooled output at the end token;
    # the tower is causal, so padding to the longest caption gives the same pooled output as padding to 77)
    text_encoder = text_encoder.to(device).eval()
    caps = [(i, cap) for i, rec in enumerate(ds.records) for cap in (list(rec.captions) or [""])]
    queries = []
    for chunk in _chunks(len(caps), 512):
        ids = tokenizer([caps[j][1] for j in chunk], padding="longest", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
        queries.append(bank.query_embeddings(text_encoder(ids).pooler_output.float()).cpu())
    owners = torch.tensor([i for i, _ in caps], dtype=torch.long)
    table = retrieval_table(bank, torch.cat(queries), owners).tolist()
    retrieved: list[list[int]] = [[] for _ in range(n)]
    for (i, _), r in zip(caps, table):
        retrieved[i].append(int(r))
    return bank, retrieved


def references_stamp(cfg: Preset, stage_one: Path, clip_dir: Path) -> dict[str, Any]:
    """What a cached reference bank depends on (data, inputs and the reference settings)."""
    c = cfg.cc
    keys = ("image_encoder", "dino_path", "dino_size", "bank_per_class", "crop_margin", "fg_ref_grid",
            "bg_ref_grid", "retrieval_pool", "ref_dtype", "max_instances")
    stamp = {"preset": cfg.name, "data": data_stamp(cfg), "stage_one": input_stamp(stage_one),
             "clip": input_stamp(clip_dir), "cc": {k: getattr(c, k) for k in keys}}
    if c.sam_checkpoint:  # only then: banks cached without SAM stay valid
        stamp["cc"]["sam_checkpoint"] = str(resolve_path(c.sam_checkpoint))
    return json.loads(json.dumps(stamp))


def cached_references(cfg: Preset, ds: RSDataset, stage_one: Path, clip_dir: Path, parts: dict[str, Any],
                      cache_dir: Path, device: str | torch.device = "cpu") -> tuple[ReferenceBank, list[list[int]]]:
    """The reference bank and retrieval table from ``cache_dir`` when its stamp matches, else built and cached."""
    stamp = references_stamp(cfg, stage_one, clip_dir)
    stamp_file = cache_dir / "stamp.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        bank = ReferenceBank.from_pretrained(cache_dir / "bank", low_cpu_mem_usage=False).eval()
        retrieved = json.loads((cache_dir / "retrieved.json").read_text())
        if len(retrieved) == len(ds):
            return bank, retrieved
    clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    bank, retrieved = build_references(cfg, ds, clip, parts["text_encoder"], parts["tokenizer"], device)
    parts["text_encoder"].cpu()
    with atomic_write_dir(cache_dir) as tmp:
        bank.save_pretrained(tmp / "bank", safe_serialization=True)
        (tmp / "retrieved.json").write_text(json.dumps(retrieved))
        (tmp / "stamp.json").write_text(json.dumps(stamp, indent=1))
    return bank, retrieved


def cached_training_data(cfg: Preset, ds: RSDataset, stage_one: Path, vae: AutoencoderKL, cache_dir: Path,
                         device: str | torch.device = "cpu") -> CCTrainingData:
    """:func:`encode_training_data` through a cache in ``cache_dir`` (keyed by data, stage one and layout size), so
    the variants of notebook 04 encode the split once."""
    stamp = json.loads(json.dumps({"preset": cfg.name, "data": data_stamp(cfg), "stage_one": input_stamp(stage_one),
                                   "max_instances": cfg.cc.max_instances, "classes": ds.classes}))
    t = read_tensor_cache(cache_dir, stamp)
    if t is not None and len(t["mean"]) == len(ds):
        return CCTrainingData(t["mean"], t["std"], t["boxes"], t["obb"], t["labels"], t["valid"].bool(),
                              [r.captions for r in ds.records])
    data = encode_training_data(ds, vae, device)
    write_tensor_cache(cache_dir, stamp, {"mean": data.mean, "std": data.std, "boxes": data.boxes, "obb": data.obb,
                                          "labels": data.labels, "valid": data.valid.to(torch.uint8)})
    return data


def empty_bank(classes: list[str], text_dim: int) -> ReferenceBank:
    """A bank with the class list only (the GLIGEN-style mode needs no references)."""
    z = torch.zeros(0)
    return ReferenceBank.build(classes, torch.zeros(0, 1, 1), z.long(), z.long(), z, torch.zeros(0, 1, 1),
                               torch.zeros(0, 1), z.long(), torch.zeros(1, text_dim))


# ---------------------------------------------------------------------------
# Model and objective


def build_adapter(cfg: Preset, unet: UNet2DConditionModel, image_dim: int) -> CCDiffAdapter:
    """A fresh adapter for ``unet`` sized by ``cfg.cc``, of the variant ``cc.mode`` (cc_diff | no_bridge |
    gligen)."""
    c = cfg.cc
    return CCDiffAdapter.from_unet(
        unet, c.fusion_blocks, image_dim=image_dim, mode="gligen" if c.mode == "gligen" else "cc_diff",
        use_bridge=c.mode != "no_bridge", use_layout_attention=c.use_layout_attention, resampler_dim=c.resampler_dim,
        resampler_depth=c.resampler_depth, resampler_heads=c.resampler_heads,
        resampler_dim_head=c.resampler_dim_head, num_fg_queries=c.num_fg_queries, num_bg_queries=c.num_bg_queries,
        num_bridge_queries=c.num_bridge_queries, ff_mult=c.ff_mult, fusion_heads=c.fusion_heads,
        fusion_dim_head=c.fusion_dim_head, box_hidden=c.box_hidden)


class CCTrainModel(nn.Module):
    """What the loop trains: the frozen UNet + text tower with the trainable adapter (``net``), and the phrase
    states of every class (computed once by the frozen text tower; ``phrases`` in class order)."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 adapter: CCDiffAdapter, phrases: list[str]):
        super().__init__()
        self.net = CCDiffModel(unet, text_encoder, adapter)
        with torch.no_grad():
            ids = tokenize(tokenizer, phrases)  # (C, L)
            out = text_encoder(input_ids=ids.to(text_encoder.device))
        self.register_buffer("phrase_hidden", out.last_hidden_state.detach().float(), persistent=False)  # (C, L, D)
        self.register_buffer("phrase_pooled", out.pooler_output.detach().float(), persistent=False)  # (C, D)


class CCDiffLoss:
    """``loss_fn(model, batch, generator)``: noise-prediction MSE with caption and instance dropout.

    The reference bank lives here, not in the model: it is frozen data (moved once to the batch's device), so
    distributed training neither broadcasts nor checkpoints it.
    """

    def __init__(self, tokenizer: CLIPTokenizer, scaling_factor: float, references: ReferenceBank | None = None,
                 caption_dropout: float = 0.1, instance_dropout: float = 0.1,
                 noise_scheduler: DDPMScheduler | None = None, timestep_sampling: str = "uniform",
                 x0_weight_max: float = 1.0, object_loss_weight: float = 1.0,
                 noise_offset: float = 0.0, caption: str = "any"):
        if caption not in CAPTION_CHOICES:
            raise ValueError(f"cc.caption must be one of {', '.join(CAPTION_CHOICES)}, not {caption!r}")
        self.first_caption = caption == "first"
        if object_loss_weight < 1.0:
            raise ValueError(f"object_loss_weight must be >= 1 (1 = every latent cell alike), not {object_loss_weight}")
        self.object_loss_weight = float(object_loss_weight)
        self.tokenizer = tokenizer
        self.references = references
        self.scaling_factor = float(scaling_factor)
        self.caption_dropout = float(caption_dropout)
        self.instance_dropout = float(instance_dropout)
        self.noise_scheduler = noise_scheduler or build_noise_scheduler()
        self.steps = AdapterTimesteps(self.noise_scheduler, timestep_sampling, x0_weight_max, noise_offset)

    def __call__(self, model: CCTrainModel, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """The loss of one batch; every random draw comes from ``generator``."""
        mean, std = batch["mean"], batch["std"]  # (B, C, h, w)
        dev, b = mean.device, mean.shape[0]
        g = cpu_generator(generator)
        z = torch.randn(mean.shape, generator=g).to(dev)
        latents = (mean + std * z) * self.scaling_factor
        cap_idx = [int(torch.randint(len(c), (1,), generator=g)) for c in batch["captions"]]
        if self.first_caption:  # drawn all the same, so that both choices see the same noise
            cap_idx = [0] * len(cap_idx)
        keep_cap = torch.rand(b, generator=g) >= self.caption_dropout
        captions = [c[i] if bool(k) else "" for c, i, k in zip(batch["captions"], cap_idx, keep_cap)]
        keep_inst = (torch.rand(b, generator=g) >= self.instance_dropout).to(dev)
        ids = tokenize(self.tokenizer, captions).to(dev)  # (B, L)
        with torch.no_grad():
            out = model.net.text_encoder(input_ids=ids)
        text, pooled = out.last_hidden_state, out.pooler_output  # (B, L, D), (B, D)

        # instances: trim the padding every sample shares (padding changes nothing), drop per sample
        valid = batch["valid"].bool() & keep_inst[:, None]
        n = max(1, int(batch["valid"].sum(1).max()))
        valid, labels = valid[:, :n], batch["labels"][:, :n]
        lab = labels.clamp_min(0)
        refs: dict[str, torch.Tensor] = {}
        adapter = model.net.adapter
        if adapter.mode == "cc_diff":
            if self.references is None:
                raise ValueError("CC-Diff training needs a reference bank (CCDiffLoss(references=...))")
            if self.references.fg_tokens.device != dev:
                self.references = self.references.to(dev)
            bank = self.references
            pick = bank.pick_for_training(labels, batch["index"], g)  # (B, N): another instance of the class
            bg_idx = torch.tensor([r[i] for r, i in zip(batch["retrieved"], cap_idx)], dtype=torch.long)
            refs = {"fg_refs": bank.fg(pick).to(dev), "bg_ref": bank.bg(bg_idx).to(dev)}
        ctx = adapter.encode(batch["obb"][:, :n], valid, model.phrase_hidden[lab].to(text.dtype),
                             model.phrase_pooled[lab].to(text.dtype), pooled, tuple(mean.shape[-2:]),
                             boxes=batch["boxes"][:, :n], **refs)
        noise = self.steps.noise(tuple(latents.shape), g).to(dev)
        t = self.steps.sample(b, g).to(dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = model.net(noisy, t, text, ctx)
        loss, noise_mse = self.steps.loss(pred, noise, t, self.object_weights(ctx, tuple(latents.shape[-2:])))
        return {"loss": loss, "noise_mse": noise_mse, "instances": valid.sum(1).float().mean()}

    def object_weights(self, ctx: Any, hw: tuple[int, int]) -> torch.Tensor | None:
        """(B, 1, h, w) loss weights 1 + (object_loss_weight - 1) * (area the kept instances cover), or None."""
        if self.object_loss_weight == 1.0:
            return None
        covered = 1.0 - ctx.regions(hw)[1]  # (B, h, w): 0 where no (kept) instance lies
        return (1.0 + (self.object_loss_weight - 1.0) * covered)[:, None]


# ---------------------------------------------------------------------------
# The stage


def variant_name(cfg: Preset) -> str:
    """Folder name of a run: ``cc_diff``, ``cc_diff_no_bridge``, ``cc_diff_gligen`` after ``cc.mode`` (+ ``_nolayout``
    when the layout self-attention is switched off)."""
    mode = cfg.cc.mode
    name = "cc_diff" if mode == "cc_diff" else f"cc_diff_{mode}"
    return name + ("" if cfg.cc.use_layout_attention or mode == "gligen" else "_nolayout")


def cc_train_config(cfg: Preset) -> TrainConfig:
    """The loop settings of CC-Diff training for a preset (DDP looks for unused parameters in the ablations,
    whose bridge or box MLP gets no gradient)."""
    c = cfg.cc
    return stage_train_config(cfg, c.mixed_precision, steps=c.steps, batch_size=c.batch_size,
                              grad_accum=c.grad_accum, lr=c.lr, weight_decay=c.weight_decay,
                              warmup_steps=min(c.warmup_steps, c.steps),
                              ema_decay=None, checkpoint_every=c.checkpoint_every, log_every=10, num_workers=0,
                              find_unused_parameters=c.mode != "cc_diff")


def sampling_defaults(cfg: Preset) -> dict[str, Any]:
    """How ``from_pretrained(...)(prompt)`` samples a trained folder by default: as the preset says."""
    c = cfg.cc
    return {"max_instances": c.max_instances, "guidance_scale": c.guidance_scale, "num_inference_steps": c.sample_steps,
            "negative_prompt": c.negative_prompt}


def train_cc_diff(cfg: Preset, stage_one_dir: str | os.PathLike | None = None,
                  clip_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                  force: bool = False, *, stop_after: int | None = None, progress: bool = True) -> Path:
    """Train the CC-Diff adapter on its frozen base model (:func:`resolve_base_model`); returns the pipeline folder.

    ``cc.mode`` ("cc_diff" | "no_bridge" | "gligen") picks the variant; an ablation saves to
    ``runs/<preset>/cc_diff_<mode>`` (:func:`variant_name`). A finished folder with the same training settings is
    reused unless ``force`` (with the preset's sampling defaults); an interrupted run resumes from its checkpoint;
    ``stop_after=k`` stops after step k (checkpoint only). The data set is ``cc.data_root``, else ``data.root``.
    """
    cfg = cfg.stage_data("cc")
    c = cfg.cc
    s1 = resolve_base_model(cfg, stage_one_dir)
    needs_refs = c.mode != "gligen"
    clip_path = resolve_clip_dir(cfg, clip_dir) if needs_refs else None
    out_dir = resolve_path(out_dir) if out_dir else cfg.run_dir(variant_name(cfg))
    tcfg = cc_train_config(cfg)
    stamp = stage_stamp(cfg, "cc", stage_one=input_stamp(s1), clip=input_stamp(clip_path) if clip_path else None,
                        architecture=ARCHITECTURE_VERSION)
    if not force and is_finished(out_dir, stamp):
        refresh_sampling_defaults(out_dir, **sampling_defaults(cfg))
        refresh_scheduler(out_dir, build_sampler(cfg.cc.sampler))
        return out_dir
    work = begin(out_dir, stamp, force)
    t0 = time.perf_counter()
    parts = load_stage_one_parts(s1)
    device = pick_device(cfg.device)
    ds = train_split(cfg)
    data = cached_training_data(cfg, ds, s1, parts["vae"], out_dir.parent / LATENTS_CACHE, device)
    parts["vae"].cpu()
    text_dim = parts["text_encoder"].config.hidden_size
    if needs_refs:
        bank, data.retrieved = cached_references(cfg, ds, s1, clip_path, parts, out_dir.parent / REFERENCES_CACHE,
                                                 device)
        image_dim = bank.config.image_dim
    else:
        bank, image_dim = empty_bank(ds.classes, text_dim), 1
    encode_s = time.perf_counter() - t0

    seed_initial_weights(cfg)
    adapter = build_adapter(cfg, parts["unet"], image_dim)
    model = CCTrainModel(parts["unet"], parts["text_encoder"], parts["tokenizer"], adapter, bank.phrases)
    loss_fn = CCDiffLoss(parts["tokenizer"], parts["vae"].config.scaling_factor, bank, c.caption_dropout,
                         c.instance_dropout, timestep_sampling=c.timestep_sampling, x0_weight_max=c.x0_weight_max,
                         object_loss_weight=c.object_loss_weight,
                         noise_offset=0.0 if c.base_model else cfg.unet.noise_offset,  # the base's noise
                         caption=c.caption)
    result = train_loop(model, loss_fn, data, tcfg, work, collate_fn=collate, stop_after=stop_after,
                        progress=progress)
    if result.steps < tcfg.steps:
        return out_dir
    pipe = CCDiffPipeline(vae=parts["vae"].cpu(), text_encoder=parts["text_encoder"].cpu(),
                          tokenizer=parts["tokenizer"], unet=parts["unet"].cpu(), scheduler=build_sampler(c.sampler),
                          adapter=adapter.cpu(), references=bank.cpu(), **sampling_defaults(cfg))
    save_pipeline_folder(pipe, out_dir, PARTS)
    finish(out_dir, stamp, result, t0, preset=cfg.name, mode=c.mode, encode_seconds=round(encode_s, 2),
           n_train=len(data), parameters=trainable_parameter_counts(adapter), image_dim=image_dim,
           bank_entries=int(bank.fg_tokens.shape[0]), retrieval_pool=int(bank.bg_tokens.shape[0]),
           stage_one_dir=str(s1), clip_dir=str(clip_path), train=asdict(tcfg))
    return out_dir


__all__ = ["CCDiffLoss", "CCTrainModel", "CCTrainingData", "build_adapter", "build_references",
           "cached_references", "cc_train_config", "dataset_classes", "empty_bank", "encode_training_data",
           "phrase_for", "prepare_base_model", "resolve_base_model", "train_cc_diff", "train_split", "variant_name"]
