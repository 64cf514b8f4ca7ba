"""The gpu preset's models build from their configs and run one training step on CPU.

No other test builds the gpu preset's models (256 px SynthRS, 100M-parameter UNet), so a config inconsistency
(GroupNorm groups, attention heads, crs.inject_channels against the UNet levels, CC-Diff fusion blocks the UNet
lacks, detector strides against its levels...) would surface only on a GPU after hours of earlier stages. Each
model is built by the builder its training calls, and one batch goes through the loss function its training uses
(forward and backward, batch 1 where the loss allows it), at a small spatial size where the modules allow it:
64 px images / 8 x 8 latents. RS-CLIP's vision tower and the detector resize their inputs to the preset's 256 px
inside, as they do in training. Output shapes, finite losses and finite gradients are asserted.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPModel

from rslib.config import get_preset, with_overrides
from rslib.data.formats import ObjectAnnotation
from rslib.data.synthrs import OBJECT_CLASSES
from rslib.models.base import build_unet, build_vae, latent_size, vae_scale_factor
from rslib.models.cc_diff import boxes_to_obb, fused_layers, fusion_hooks, fusion_layer_names
from rslib.models.crs_diff import with_identity_class_embedding
from rslib.models.text import build_rs_clip, clip_tokenizer, image_features, text_features, tokenize

IMAGE = 64  # image side of the forward passes (the preset's is 256)
CAPTION = "an aerial image of a port with 2 ships."


@pytest.fixture(scope="module")
def cfg():
    return get_preset("gpu")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int, size: int = IMAGE, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=_gen(seed)) * 2 - 1  # in [-1, 1]


def _check_grads(module: torch.nn.Module, what: str) -> None:
    """Every trainable parameter got a finite gradient (an unused one would also stop DDP without
    find_unused_parameters)."""
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert trainable, f"{what}: nothing trainable"
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"{what}: no gradient for {missing[:5]} ({len(missing)} parameters)"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f"{what}: non-finite gradients in {bad[:5]}"
    assert any(p.grad.abs().sum() > 0 for _, p in trainable), f"{what}: every gradient is zero"


def _free_grads(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


# ---------------------------------------------------------------------------
# RS-CLIP (notebook 01), saved and read back as the later stages read it


@pytest.fixture(scope="module")
def clip_dir(cfg, tmp_path_factory):
    """A fresh RS-CLIP of the preset saved as train_text_encoder saves it (model + tokenizer)."""
    torch.manual_seed(0)
    model = build_rs_clip(cfg).eval()
    out = tmp_path_factory.mktemp("gpu_rs_clip")
    model.save_pretrained(out)
    clip_tokenizer(cfg.clip.max_length).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def text_tower(clip_dir):
    """(CLIPTextModel, tokenizer) as stage one and stage two load them."""
    from rslib.train.stage_one import load_text_tower

    text, tok = load_text_tower(clip_dir)
    return text.eval().requires_grad_(False), tok


def test_rs_clip_trains_one_step(cfg):
    from rslib.train.text_encoder import clip_loss_fn

    c = cfg.clip
    torch.manual_seed(0)
    model = build_rs_clip(cfg).train()
    vc = model.config.vision_config
    assert (vc.image_size, vc.patch_size) == (cfg.data.image_size, c.patch)
    assert cfg.data.image_size % c.patch == 0
    tok = clip_tokenizer(c.max_length)
    # small images: clip_image_inputs resizes them to the tower's 256 px (its position embeddings are fixed)
    batch = {"pixel_values": _images(2, 32), "captions": [[CAPTION], ["an aerial image of a farmland."]]}
    out = clip_loss_fn(tok, c.max_length, c.augment)(model, batch, _gen())  # contrastive: needs two pairs
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    out["loss"].backward()
    _check_grads(model, "RS-CLIP")
    with torch.no_grad():
        ids = tokenize(tok, [CAPTION], c.max_length)
        assert ids.shape == (1, c.max_length)
        assert text_features(model, ids).shape == (1, c.projection_dim)
        assert image_features(model, _images(1, 32)).shape == (1, c.projection_dim)
        hidden = model.text_model(input_ids=ids).last_hidden_state
    assert hidden.shape == (1, c.max_length, c.hidden)


# ---------------------------------------------------------------------------
# The autoencoder (notebook 01)


def test_autoencoder_trains_one_step(cfg):
    from rslib.train.autoencoder import vae_loss_fn

    v = cfg.vae
    f = vae_scale_factor(cfg)
    assert f == 8 and latent_size(cfg) == cfg.data.image_size // 8
    torch.manual_seed(0)
    vae = build_vae(cfg).train()
    out = vae_loss_fn(v.kl_weight, v.mse_weight, v.crop_size)(vae, {"pixel_values": _images(1)}, _gen())
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    _check_grads(vae, "autoencoder")
    vae.eval()
    with torch.no_grad():
        dist = vae.encode(_images(1)).latent_dist
        assert dist.mean.shape == (1, v.latent_channels, IMAGE // f, IMAGE // f)
        rec = vae.decode(dist.mean).sample
    assert rec.shape == (1, 3, IMAGE, IMAGE) and torch.isfinite(rec).all()


# ---------------------------------------------------------------------------
# Stage one (notebook 02)


@pytest.fixture(scope="module")
def unet(cfg, text_tower):
    """The stage-one UNet, sized as train_stage_one sizes it (cross-attention to the RS-CLIP text states)."""
    text, _ = text_tower
    torch.manual_seed(0)
    net = build_unet(cfg, cross_attention_dim=text.config.hidden_size)
    assert net.config.cross_attention_dim == text.config.hidden_size == cfg.clip.hidden
    return net


def _latent_batch(cfg, b: int = 1, seed: int = 0) -> dict:
    h = IMAGE // vae_scale_factor(cfg)
    g = _gen(seed)
    return {"mean": torch.randn(b, cfg.vae.latent_channels, h, h, generator=g),
            "std": 0.1 * torch.rand(b, cfg.vae.latent_channels, h, h, generator=g), "captions": [[CAPTION]] * b}


def test_stage_one_unet_trains_one_step(cfg, unet, text_tower):
    from rslib.train.stage_one import StageOneLoss, StageOneModel

    text, tok = text_tower
    u = cfg.unet
    assert len(u.attention_levels) == len(u.block_out_channels)
    assert all(c % u.norm_groups == 0 for c in u.block_out_channels)
    model = StageOneModel(unet, text).train()
    loss_fn = StageOneLoss(tok, 0.18215, u.caption_dropout, timestep_sampling=u.timestep_sampling,
                           x0_weight_max=u.x0_weight_max)
    try:
        loss = loss_fn(model, _latent_batch(cfg), _gen())
        assert torch.isfinite(loss)
        loss.backward()
        _check_grads(model.unet, "stage-one UNet")
    finally:
        _free_grads(unet)
    unet.eval()
    h = IMAGE // vae_scale_factor(cfg)
    with torch.no_grad():
        ctx = text(input_ids=tokenize(tok, [CAPTION])).last_hidden_state
        eps = unet(torch.randn(1, cfg.vae.latent_channels, h, h), torch.tensor([500]), encoder_hidden_states=ctx).sample
    assert eps.shape == (1, cfg.vae.latent_channels, h, h) and torch.isfinite(eps).all()


# ---------------------------------------------------------------------------
# CRS-Diff (notebook 03)


@pytest.fixture(scope="module")
def crs_unet(unet):
    """The frozen stage-one UNet with the identity class embedding, as load_frozen_unet gives it."""
    return with_identity_class_embedding(unet).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def image_encoder(clip_dir):
    """RS-CLIP's image tower, as train_crs_diff loads it for the content embeddings."""
    from rslib.train.crs_diff import load_image_encoder

    return load_image_encoder(clip_dir)


def _crs_batch(cfg, content: torch.Tensor) -> dict:
    """One pre-encoded CRS-Diff training item, collated: latents, 18 condition maps (uint8), content, metadata."""
    maps = (torch.rand(1, 18, IMAGE, IMAGE, generator=_gen(2)) > 0.7).to(torch.uint8) * 255
    return {**_latent_batch(cfg), "conditions": maps, "content": content, "has_content": torch.tensor([True]),
            "metadata": torch.rand(1, 7, generator=_gen(3)), "metadata_valid": torch.ones(1, 7, dtype=torch.bool)}


def _crs_loss(cfg, crs, text_tower, batch: dict) -> dict:
    """CRS-Diff's training loss of one batch, as train_crs_diff computes it."""
    from rslib.train.crs_diff import CRSDiffLoss, CRSTrainModel

    text, tok = text_tower
    c = cfg.crs
    model = CRSTrainModel(crs, text).train()
    loss_fn = CRSDiffLoss(tok, 0.18215, timestep_sampling=c.timestep_sampling, x0_weight_max=c.x0_weight_max,
                          road_loss_weight=c.road_loss_weight)
    return loss_fn(model, batch, _gen())


@pytest.mark.parametrize("fusion", ["aff", "ff", "sum"])
def test_crs_diff_trains_one_step(cfg, crs_unet, text_tower, image_encoder, fusion):
    from rslib.models.text import content_embeddings
    from rslib.train.crs_diff import build_crs_model

    text, tok = text_tower
    c = cfg.crs
    f = vae_scale_factor(cfg)
    h = IMAGE // f
    image_dim = image_encoder.config.projection_dim
    torch.manual_seed(0)
    crs = build_crs_model(with_overrides(cfg, {"crs.fusion": fusion}), crs_unet, f, image_dim)
    assert crs.adapter.config.fusion == fusion and crs.adapter.config.downscale == f
    with torch.no_grad():
        content = content_embeddings(image_encoder, _images(1, seed=1))  # (1, D): resized to 256 px inside
        feats = crs.adapter.extractor(torch.zeros(1, 18, IMAGE, IMAGE))
    assert content.shape == (1, image_dim)
    assert [tuple(x.shape) for x in feats] == [(1, ch, h >> i, h >> i) for i, ch in enumerate(c.inject_channels)]

    batch = _crs_batch(cfg, content)
    out = _crs_loss(cfg, crs, text_tower, batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    _check_grads(crs, f"CRS-Diff ({fusion})")
    assert all(p.grad is None for p in crs.unet.parameters())  # the stage-one UNet stays frozen

    crs.eval()
    with torch.no_grad():
        ctx = text(input_ids=tokenize(tok, [CAPTION])).last_hidden_state
        x, t = torch.randn(1, cfg.vae.latent_channels, h, h), torch.tensor([500])
        meta = crs.metadata_embedding(x, batch["metadata"], batch["metadata_valid"])
        maps = batch["conditions"].float() / 255
        down, mid = crs.adapter(x, t, crs.context(ctx, content, torch.tensor([True])), maps, meta)
        eps = crs(x, t, ctx, maps, content, torch.tensor([True]), batch["metadata"], batch["metadata_valid"])
    levels = len(cfg.unet.block_out_channels)
    assert len(down) == crs.adapter.num_residuals - 1 == 1 + levels * cfg.unet.layers_per_block + levels - 1
    bottom = h >> (levels - 1)
    assert mid.shape == (1, cfg.unet.block_out_channels[-1], bottom, bottom)
    assert eps.shape == x.shape and torch.isfinite(eps).all()


# ---------------------------------------------------------------------------
# CC-Diff (notebook 04)


class _TinySplit:
    """What build_references reads of a training split: records, classes, items' pixel_values."""

    def __init__(self, images: torch.Tensor, objects: list[list[ObjectAnnotation]]):
        self.images = images
        self.classes = list(OBJECT_CLASSES)
        self.records = [SimpleNamespace(objects=objs, captions=[CAPTION]) for objs in objects]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i]}


BOXES = [[0.10, 0.15, 0.45, 0.40], [0.55, 0.50, 0.90, 0.95]]  # a ship, a storage tank


def _objects(boxes: list[list[float]], labels: list[str]) -> list[ObjectAnnotation]:
    return [ObjectAnnotation(label=lab, bbox=b, obb=boxes_to_obb(torch.tensor(b)).tolist())
            for b, lab in zip(boxes, labels)]


@pytest.fixture(scope="module")
def cc_references(cfg, clip_dir, text_tower):
    """The reference bank of a three-image split, built by build_references with the RS-CLIP image tokens."""
    from rslib.train.cc_diff import build_references

    text, tok = text_tower
    clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    labels = ["ship", "storagetank"]
    split = _TinySplit(_images(3, seed=4), [_objects(BOXES, labels)] * 3)
    bank, retrieved = build_references(cfg, split, clip, text, tok)
    return bank, retrieved


def test_cc_reference_tokens_at_the_gpu_preset(cfg, cc_references):
    bank, retrieved = cc_references
    c = cfg.cc
    patches = cfg.data.image_size // cfg.clip.patch  # 16 x 16 patch tokens: the grids pool them
    assert c.fg_ref_grid <= patches and c.bg_ref_grid <= patches
    assert bank.fg_tokens.shape == (6, 1 + c.fg_ref_grid ** 2, cfg.clip.vision_hidden)
    assert bank.bg_tokens.shape == (3, 1 + c.bg_ref_grid ** 2, cfg.clip.vision_hidden)
    assert bank.fg_tokens.dtype == getattr(torch, c.ref_dtype) and torch.isfinite(bank.fg_tokens.float()).all()
    assert bank.config.image_dim == cfg.clip.vision_hidden
    assert [len(r) for r in retrieved] == [1, 1, 1] and all(r[0] != i for i, r in enumerate(retrieved))


def _cc_batch(cfg, retrieved: list[int]) -> dict:
    """One pre-encoded CC-Diff training item, collated: latents, cc.max_instances padded slots with two objects."""
    n = cfg.cc.max_instances
    boxes = torch.zeros(1, n, 4)
    boxes[0, :2] = torch.tensor(BOXES)
    labels = torch.full((1, n), -1, dtype=torch.long)
    labels[0, :2] = torch.tensor([OBJECT_CLASSES.index("ship"), OBJECT_CLASSES.index("storagetank")])
    return {**_latent_batch(cfg), "boxes": boxes, "obb": boxes_to_obb(boxes), "labels": labels, "valid": labels >= 0,
            "index": torch.tensor([0]), "retrieved": [retrieved]}


def _cc_loss(cfg, model, text_tower, bank, batch: dict) -> dict:
    """CC-Diff's training loss of one batch, as train_cc_diff computes it."""
    from rslib.train.cc_diff import CCDiffLoss

    _, tok = text_tower
    c = cfg.cc
    loss_fn = CCDiffLoss(tok, 0.18215, bank, c.caption_dropout, c.instance_dropout,
                         timestep_sampling=c.timestep_sampling, x0_weight_max=c.x0_weight_max,
                         object_loss_weight=c.object_loss_weight)
    return loss_fn(model, batch, _gen(5))


@pytest.mark.parametrize("mode", ["cc_diff", "no_bridge", "gligen"])
def test_cc_diff_trains_one_step(cfg, unet, text_tower, cc_references, mode):
    from rslib.train.cc_diff import CCTrainModel, build_adapter, empty_bank

    text, tok = text_tower
    c = cfg.cc
    h = IMAGE // vae_scale_factor(cfg)
    if mode == "gligen":
        bank, image_dim = empty_bank(list(OBJECT_CLASSES), text.config.hidden_size), 1
    else:
        bank = cc_references[0]
        image_dim = bank.config.image_dim
    names = fusion_layer_names(unet, c.fusion_blocks)
    assert {n.split(".attentions")[0] for n in names} == set(c.fusion_blocks), names
    torch.manual_seed(0)
    adapter = build_adapter(with_overrides(cfg, {"cc.mode": mode}), unet, image_dim)
    assert set(adapter.config.layer_channels) == set(names)
    try:
        model = CCTrainModel(unet, text, tok, adapter, bank.phrases)
        assert len(fused_layers(unet, adapter)) == len(names)
        batch = _cc_batch(cfg, cc_references[1][0])
        boxes, labels, valid = batch["boxes"], batch["labels"], batch["valid"]
        out = _cc_loss(cfg, model, text_tower, bank, batch)
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
        if mode == "cc_diff":
            _check_grads(adapter, "CC-Diff adapter")
        else:  # the ablations leave parts without gradient (their training sets find_unused_parameters)
            grads = [p.grad for p in adapter.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)
        assert all(p.grad is None for p in unet.parameters())

        adapter.eval()
        with torch.no_grad():
            o = text(input_ids=tokenize(tok, [CAPTION]))
            lab = labels[:, :2]
            refs = {}
            if mode != "gligen":
                refs = {"fg_refs": bank.fg(bank.pick_by_aspect(lab, boxes[:, :2])),
                        "bg_ref": bank.bg(torch.tensor([0]))}
            ctx = adapter.encode(batch["obb"][:, :2], valid[:, :2], model.phrase_hidden[lab], model.phrase_pooled[lab],
                                 o.pooler_output, (h, h), boxes=boxes[:, :2], **refs)
            if mode != "gligen":
                assert ctx.fg_tokens.shape == (1, 2, c.num_fg_queries, text.config.hidden_size)
                assert ctx.bg_tokens.shape == (1, c.num_bg_queries + c.num_bridge_queries, text.config.hidden_size)
            x = torch.randn(1, cfg.vae.latent_channels, h, h)
            with fusion_hooks(unet, adapter, ctx):
                eps = unet(x, torch.tensor([500]), encoder_hidden_states=o.last_hidden_state).sample
        assert eps.shape == x.shape and torch.isfinite(eps).all()
    finally:
        _free_grads(adapter)


def test_stage_two_losses_run_under_bf16_autocast(cfg, unet, crs_unet, text_tower, image_encoder, cc_references):
    """The gpu preset trains under bf16 autocast (accelerate's mixed_precision): the stage-two losses, whose
    modules mix float32 masks and tokens with autocast outputs, run under CPU bf16 autocast (an approximation of
    CUDA's: its op lists differ)."""
    from rslib.models.text import content_embeddings
    from rslib.train.cc_diff import CCTrainModel, build_adapter
    from rslib.train.crs_diff import build_crs_model

    assert cfg.mixed_precision == "bf16"
    text, tok = text_tower
    torch.manual_seed(0)
    crs = build_crs_model(cfg, crs_unet, vae_scale_factor(cfg), image_encoder.config.projection_dim)
    with torch.no_grad():
        batch = _crs_batch(cfg, content_embeddings(image_encoder, _images(1, seed=1)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _crs_loss(cfg, crs, text_tower, batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    _check_grads(crs, "CRS-Diff under bf16 autocast")
    del crs

    bank, retrieved = cc_references
    adapter = build_adapter(cfg, unet, bank.config.image_dim)
    model = CCTrainModel(unet, text, tok, adapter, bank.phrases)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _cc_loss(cfg, model, text_tower, bank, _cc_batch(cfg, retrieved[0]))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in adapter.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------
# The evaluation networks (notebook 05 and the fidelity measures)


def test_segmenter_trains_one_step(cfg):
    from rslib.eval.segmenter import predict_classes
    from rslib.models.segmenter import NUM_CLASSES, build_segmenter
    from rslib.train.segmenter import segmentation_loss_fn

    levels = len(cfg.seg.channels)
    assert IMAGE % (cfg.seg.patch * 2 ** (levels - 1)) == 0
    torch.manual_seed(0)
    model = build_segmenter(cfg).train()
    batch = {"image": ((_images(1) + 1) * 127.5).to(torch.uint8),
             "classes": torch.randint(NUM_CLASSES, (1, IMAGE, IMAGE), generator=_gen()).to(torch.uint8)}
    out = segmentation_loss_fn(cfg.seg.crop_size)(model, batch, _gen())
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    _check_grads(model, "segmenter")
    model.eval()
    with torch.no_grad():
        logits = model(_images(1))
    assert logits.shape == (1, NUM_CLASSES, IMAGE, IMAGE) and torch.isfinite(logits).all()
    assert predict_classes(model, _images(1)).shape == (1, IMAGE, IMAGE)


def test_detector_trains_one_step_and_detects(cfg):
    from rslib.eval.detector import detect
    from rslib.models.detector import build_detector
    from rslib.train.detector import detection_loss

    d, size = cfg.det, cfg.data.image_size  # FCOS resizes every input to its min_size: the preset's side
    torch.manual_seed(0)
    model = build_detector(d, size, len(OBJECT_CLASSES)).train()
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, size, size))
    assert [tuple(f.shape) for f in feats.values()] == [(1, d.fpn_channels, size // s, size // s) for s in d.strides]
    image = ((_images(1, size) + 1) * 127.5).to(torch.uint8)
    batch = {"images": image, "boxes": [torch.tensor([[0.2, 0.3, 0.4, 0.45]])], "labels": [torch.tensor([1])]}
    out = detection_loss(model, batch, _gen())
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    _check_grads(model, "detector")
    dets = detect(model, image)
    assert len(dets) == 1 and dets[0]["boxes"].shape[-1] == 4
    assert torch.isfinite(dets[0]["boxes"]).all() and len(dets[0]["boxes"]) <= d.detections_per_img
