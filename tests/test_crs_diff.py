"""CRS-Diff stage two: shapes (small and SD 1.5), exact identities at initialisation, control_scale, dropping a
condition, save/load round trip, and a short training run whose loss falls."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

import standins
from rslib.config import get_preset
from rslib.data.datasets import ConditionDropout
from rslib.data.formats import CONDITION_NAMES
from rslib.models.base import build_sampler, build_unet, build_vae
from rslib.models.crs_diff import (
    ContentTokenizer,
    CRSDiffModel,
    CRSLocalAdapter,
    LocalFeatureExtractor,
    MetadataEncoder,
    metadata_sinusoids,
    with_identity_class_embedding,
)
from rslib.models.text import clip_tokenizer
from rslib.pipelines.crs_diff import CRSDiffPipeline, conditions_from_maps, keep_only

TEXT_DIM = 32


@pytest.fixture(scope="module")
def parts():
    """Tiny stage-one parts at the smoke preset (32 px images, 8x8 latents), built from config."""
    cfg = get_preset("smoke")
    torch.manual_seed(0)
    text, image = standins.clip_towers(TEXT_DIM)
    vae = build_vae(cfg).eval()
    unet = build_unet(cfg, TEXT_DIM).eval()
    with torch.no_grad():  # a stage-one UNet whose output depends on everything (fresh out_conv is not zero)
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return {"cfg": cfg, "text_encoder": text, "image_encoder": image, "vae": vae, "unet": unet,
            "tokenizer": clip_tokenizer(77)}


def _pipe(parts, fusion="aff", use_metadata=True, use_content=True, perturb=False) -> CRSDiffPipeline:
    cfg = parts["cfg"]
    unet = with_identity_class_embedding(parts["unet"])
    torch.manual_seed(1)
    adapter = CRSLocalAdapter.from_unet(unet, stem_channels=cfg.crs.stem_channels,
                                        inject_channels=cfg.crs.inject_channels, downscale=4, fusion=fusion)
    meta = MetadataEncoder(embed_dim=cfg.crs.metadata_dim, out_dim=4 * 16) if use_metadata else None
    content = ContentTokenizer(in_dim=TEXT_DIM, context_dim=TEXT_DIM, num_tokens=4) if use_content else None
    if perturb:  # a "trained" branch: every weight moved, zero convs included
        with torch.no_grad():
            for m in (adapter, meta, content):
                for p in (m.parameters() if m is not None else []):
                    p.add_(0.05 * torch.randn_like(p))
    pipe = CRSDiffPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                           unet=unet, scheduler=build_sampler(), adapter=adapter, metadata_encoder=meta,
                           content_tokenizer=content, image_encoder=parts["image_encoder"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _conditions(b: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 18, size, size, generator=g) > 0.7).float()


def _run(pipe, **kw) -> torch.Tensor:
    args = dict(prompt=["an aerial image of a port.", "a farmland."], num_inference_steps=3, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0), output_type="latent")
    args.update(kw)
    return pipe(**args).images


# ---------------------------------------------------------------------------
# Shapes


def test_small_shapes(parts):
    """Residual, feature and token shapes at the smoke configuration, for every fusion."""
    cfg = parts["cfg"]
    unet = with_identity_class_embedding(parts["unet"])
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 77, TEXT_DIM)
    for fusion in ("aff", "ff", "sum"):
        adapter = CRSLocalAdapter.from_unet(unet, stem_channels=(8, 16), inject_channels=(16, 32, 32), downscale=4,
                                            fusion=fusion)
        feats = adapter.extractor(_conditions())
        assert [tuple(f.shape) for f in feats] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
        zeros = [torch.zeros_like(f) for f in adapter.extractor(_conditions())]
        down, mid = adapter(x, t, ctx, _conditions(), features=zeros)
        assert [tuple(d.shape) for d in down] == [(2, 16, 8, 8), (2, 16, 8, 8), (2, 16, 4, 4), (2, 32, 4, 4),
                                                   (2, 32, 2, 2), (2, 32, 2, 2)]
        assert tuple(mid.shape) == (2, 32, 2, 2) and adapter.num_residuals == 7
    meta = MetadataEncoder(embed_dim=cfg.crs.metadata_dim, out_dim=64)
    assert meta(torch.rand(2, 7), torch.ones(2, 7, dtype=torch.bool)).shape == (2, 64)
    tokens = ContentTokenizer(in_dim=TEXT_DIM, context_dim=TEXT_DIM, num_tokens=4)(torch.randn(2, TEXT_DIM))
    assert tokens.shape == (2, 4, TEXT_DIM)


def test_fresh_feature_extractor_carries_the_maps():
    """Kaiming init keeps the maps audible: at the cpu preset's sizes each level's features start with a std of
    0.08-0.2 (PyTorch's default init: 0.02-0.04, a whisper beside unit-variance UNet activations)."""
    torch.manual_seed(0)
    extractor = LocalFeatureExtractor(stem_channels=(16, 32), inject_channels=(32, 64, 128), downscale=4)
    with torch.no_grad():
        feats = extractor(_conditions(b=4, size=64))
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 16, 16), (64, 8, 8), (128, 4, 4)]
    assert all(f.std().item() > 0.06 for f in feats), [round(f.std().item(), 3) for f in feats]
    assert all(torch.count_nonzero(m.bias) == 0 for m in extractor.modules() if isinstance(m, torch.nn.Conv2d))


def test_sd15_shapes_on_meta_device():
    """At SD 1.5 shapes (built on the meta device, no memory): 13 residuals as the reference lists them."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    class_embed_type="identity")
        adapter = CRSLocalAdapter.from_unet(unet, stem_channels=(32, 64, 128), inject_channels=(192, 256, 384, 512),
                                            downscale=8, fusion="aff")
        meta = MetadataEncoder(embed_dim=320, out_dim=1280)
        content = ContentTokenizer(in_dim=768, context_dim=768, num_tokens=4)
        model = CRSDiffModel(unet, adapter, meta, content)
        feats = adapter.extractor(torch.empty(1, 18, 512, 512))
        ctx = model.context(torch.empty(1, 77, 768), torch.empty(1, 768), torch.ones(1, dtype=torch.bool))
        emb = meta(torch.empty(1, 7), torch.ones(1, 7, dtype=torch.bool))
        down, mid = adapter(torch.empty(1, 4, 64, 64), torch.tensor([1]), ctx, None, emb, features=feats)
        eps = model(torch.empty(1, 4, 64, 64), torch.tensor([1]), torch.empty(1, 77, 768), torch.empty(1, 18, 512, 512))
    assert [tuple(f.shape[1:]) for f in feats] == [(192, 64, 64), (256, 32, 32), (384, 16, 16), (512, 8, 8)]
    assert tuple(ctx.shape) == (1, 81, 768) and tuple(emb.shape) == (1, 1280)
    expected = [(320, 64)] * 3 + [(320, 32), (640, 32), (640, 32), (640, 16), (1280, 16), (1280, 16)] + [(1280, 8)] * 3
    assert [(d.shape[1], d.shape[2]) for d in down] == expected
    assert tuple(mid.shape) == (1, 1280, 8, 8) and tuple(eps.shape) == (1, 4, 64, 64)
    n = {k: sum(p.numel() for p in m.parameters()) for k, m in
         (("meta", meta), ("content", content), ("extractor", adapter.extractor))}
    assert 2.8e6 < n["meta"] < 2.9e6 and 47e6 < n["content"] < 47.5e6 and 8.1e6 < n["extractor"] < 8.3e6


# ---------------------------------------------------------------------------
# Exact identities


def test_metadata_sinusoids_vectorised():
    """All fields at once equal one field at a time (interleaved sin/cos of value * 1000)."""
    v = torch.rand(3, 7)
    emb = metadata_sinusoids(v, 16)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(8) / 8)
    for f in range(7):
        arg = v[:, f:f + 1] * 1000 * freqs
        assert torch.allclose(emb[:, f, 0::2], arg.sin()) and torch.allclose(emb[:, f, 1::2], arg.cos())


def test_fresh_adapter_equals_stage_one_pipeline(parts):
    """A fresh branch (zero outputs, zero metadata, no content tokens) gives exactly the stage-one images."""
    pipe = _pipe(parts, use_content=False)
    sd = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                 unet=parts["unet"], scheduler=build_sampler(), safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    ref = sd(["an aerial image of a port.", "a farmland."], num_inference_steps=3, guidance_scale=3.0,
             generator=torch.Generator().manual_seed(0), output_type="latent").images
    out = _run(pipe, conditions=_conditions(), metadata={"cloud_cover": 80, "month": 7})
    assert torch.equal(out, ref)
    assert torch.equal(_run(pipe, text_only=True), ref)


def test_the_pipeline_denoises_with_the_model_training_optimises(parts):
    """One pipeline step predicts the noise that CRSDiffModel.forward (the training objective's model) predicts
    from the same inputs: the pipeline calls the model's encode and denoise, it does not rebuild them."""
    from rslib.pipelines.crs_diff import metadata_tensors

    pipe = _pipe(parts, perturb=True)
    steps = []
    handle = pipe.unet.register_forward_hook(lambda m, args, out: steps.append((args[0], args[1], out[0])))
    embeds = torch.randn(2, TEXT_DIM, generator=torch.Generator().manual_seed(3))
    meta = {"cloud_cover": 30, "month": 4}
    try:
        _run(pipe, conditions=_conditions(), metadata=meta, content_embeds=embeds, guidance_scale=1.0,
             num_inference_steps=1, global_strength=0.7)
    finally:
        handle.remove()
    (x, t, eps), = steps
    text = pipe.encode_prompt(["an aerial image of a port.", "a farmland."], torch.device("cpu"), 1, False)[0]
    values, keep = metadata_tensors(meta, 2)
    with torch.no_grad():
        expected = pipe.denoiser()(x, t, text, _conditions(), embeds, torch.ones(2, dtype=torch.bool), values, keep,
                                   global_strength=0.7)
    assert torch.equal(eps, expected)


def test_control_scale_zero_is_the_frozen_model(parts):
    """With a trained (perturbed) adapter, control_scale=0 leaves exactly the frozen model's output."""
    pipe = _pipe(parts, use_metadata=False, use_content=False, perturb=True)
    frozen = _run(pipe, text_only=True)
    assert torch.equal(_run(pipe, conditions=_conditions(), control_scale=0.0), frozen)
    assert not torch.allclose(_run(pipe, conditions=_conditions(), control_scale=1.0), frozen)
    # the scale really scales: residuals are linear in it
    model, x, t, ctx = pipe.denoiser(), torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.randn(2, 77, TEXT_DIM)
    d1, m1 = model.adapter(x, t, ctx, _conditions(), control_scale=1.0)
    d2, m2 = model.adapter(x, t, ctx, _conditions(), control_scale=0.5)
    assert all(torch.allclose(a * 0.5, b) for a, b in zip(d1, d2)) and torch.allclose(m1 * 0.5, m2)


def test_dropping_a_condition_equals_zeroing_it(parts):
    """Maps left out of the dict give the same images as the 18-channel stack with those maps zeroed,
    and the same stack the dropout policy produces when it drops them."""
    pipe = _pipe(parts, perturb=True)
    full = _conditions(1)[0]
    maps = {n: full[3 * i:3 * i + 3] for i, n in enumerate(CONDITION_NAMES)}
    subset = {n: maps[n] for n in ("road", "segmentation")}
    stack = keep_only(full[None], ["road", "segmentation"])
    keep = torch.tensor([[n in subset for n in CONDITION_NAMES]])
    assert torch.equal(stack, ConditionDropout.apply_local(full[None], keep))
    assert torch.equal(conditions_from_maps(subset, 32), stack[0])
    a = _run(pipe, prompt="a port.", conditions=subset, metadata={"gsd": 0.3})
    b = _run(pipe, prompt="a port.", conditions=stack, metadata={"gsd": 0.3})
    assert torch.equal(a, b)
    assert not torch.equal(a, _run(pipe, prompt="a port.", conditions=full[None], metadata={"gsd": 0.3}))


def test_fresh_fdn_resnet_is_the_copied_resnet(parts):
    """With the zero convs opened to identity and zero features, a fresh adapter's outputs are the UNet
    encoder's own states (FF/AFF with zero features is the copied GroupNorm; the sum adds nothing)."""
    unet = with_identity_class_embedding(parts["unet"])
    for fusion in ("aff", "ff", "sum"):
        adapter = CRSLocalAdapter.from_unet(unet, stem_channels=(8, 16), inject_channels=(16, 32, 32), downscale=4,
                                            fusion=fusion)
        with torch.no_grad():
            for conv in list(adapter.zero_convs) + [adapter.mid_zero_conv]:
                c = conv.weight.shape[0]
                conv.weight.copy_(torch.eye(c)[:, :, None, None])
        x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 77, TEXT_DIM)
        zeros = [torch.zeros_like(f) for f in adapter.extractor(_conditions())]
        down, mid = adapter(x, t, ctx, _conditions(), features=zeros)
        states = []
        emb = unet.time_embedding(unet.time_proj(t))
        h = unet.conv_in(x)
        states.append(h)
        for block in unet.down_blocks:
            kw = {"encoder_hidden_states": ctx} if hasattr(block, "attentions") else {}
            h, res = block(h, emb, **kw)
            states += list(res)
        h = unet.mid_block(h, emb, encoder_hidden_states=ctx)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(down, states)), fusion
        assert torch.allclose(mid, h, atol=1e-5)


def test_save_load_round_trip(parts, tmp_path):
    """save_pretrained / from_pretrained gives bitwise the same images (every part, optional ones included)."""
    pipe = _pipe(parts, perturb=True)
    content = torch.rand(1, 3, 32, 32) * 2 - 1
    kw = dict(conditions=_conditions(), metadata={"cloud_cover": 40}, content_image=content)
    before = _run(pipe, **kw)
    pipe.save_pretrained(tmp_path / "p")
    loaded = CRSDiffPipeline.from_pretrained(tmp_path / "p", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(_run(loaded, **kw), before)
    assert loaded.adapter.config.fusion == "aff" and loaded.unet.config.class_embed_type == "identity"
    # content and metadata reach the output; a missing content image is the learned null
    assert not torch.equal(_run(pipe, **{**kw, "content_image": None}), before)
    assert not torch.equal(_run(pipe, **{**kw, "metadata": {"cloud_cover": 90}}), before)
    without = _pipe(parts, use_metadata=False, use_content=False, perturb=True)
    without.save_pretrained(tmp_path / "q")
    again = CRSDiffPipeline.from_pretrained(tmp_path / "q", local_files_only=True)
    assert again.metadata_encoder is None and again.content_tokenizer is None


def test_metadata_null_and_keep():
    """Dropped fields contribute their learned null; kept fields their linear map."""
    enc = MetadataEncoder(embed_dim=8, out_dim=6)
    with torch.no_grad():
        enc.null.copy_(torch.randn(7, 6))
        enc.weight.add_(torch.randn_like(enc.weight))
    v = torch.rand(2, 7)
    none = torch.zeros(2, 7, dtype=torch.bool)
    assert torch.allclose(enc(v, none), enc.null.sum(0).expand(2, -1))
    keep = none.clone()
    keep[:, 4] = True
    per_field = enc.field_embeddings(v)
    assert torch.allclose(enc(v, keep), enc.null.sum(0) - enc.null[4] + per_field[:, 4], atol=1e-5)


def test_loss_weights_turn_noisy_steps_into_clean_latent_errors():
    from rslib.models.base import build_noise_scheduler
    from rslib.train.objective import AdapterTimesteps

    ns = build_noise_scheduler()
    t = torch.tensor([0, 300, 600, 900, 999])
    assert torch.equal(AdapterTimesteps(ns).weights(t), torch.ones(5))  # default: the plain noise MSE
    weighted = AdapterTimesteps(ns, "cubic", x0_weight_max=20.0)
    w = weighted.weights(t)
    a = ns.alphas_cumprod[t]
    assert torch.allclose(w, ((1 - a) / a).clamp(1, 20))
    assert w[0] == 1 and w[-1] == 20 and torch.all(w[1:] >= w[:-1])  # grows with the noise, clipped both ends
    pred, noise = torch.zeros(5, 4, 2, 2), torch.ones(5, 4, 2, 2)
    loss, mse = weighted.loss(pred, noise, t)
    assert mse == 1 and torch.isclose(loss, w.mean())
    drawn = weighted.sample(4000, torch.Generator().manual_seed(0))  # cubic: most draws at the noisy end
    assert drawn.min() >= 0 and drawn.max() <= 999 and (drawn >= 500).float().mean() > 0.8
    with pytest.raises(ValueError, match="x0_weight_max"):
        AdapterTimesteps(ns, x0_weight_max=0.5)
    with pytest.raises(ValueError, match="timestep_sampling"):
        AdapterTimesteps(ns, "quadratic")


def test_offset_noise_shifts_each_channel_by_one_value():
    """noise_offset o adds o * N(0, 1) per sample and channel; 0 draws exactly torch.randn's values."""
    from rslib.models.base import build_noise_scheduler
    from rslib.train.objective import AdapterTimesteps

    ns = build_noise_scheduler()
    plain = AdapterTimesteps(ns).noise((2, 4, 8, 8), torch.Generator().manual_seed(3))
    assert torch.equal(plain, torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(3)
    offset = AdapterTimesteps(ns, noise_offset=0.5).noise((2000, 4, 8, 8), g)
    g = torch.Generator().manual_seed(3)
    base = torch.randn((2000, 4, 8, 8), generator=g)
    shift = offset - base  # the same Gaussian draws first, then one offset per (sample, channel)
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-5)
    assert abs(float(shift[:, :, 0, 0].std()) - 0.5) < 0.03
    with pytest.raises(ValueError, match="noise_offset"):
        AdapterTimesteps(ns, noise_offset=-0.1)


def test_road_loss_weight_weights_the_cells_the_road_map_covers():
    """crs.road_loss_weight w: a latent cell counts 1 + (w - 1) * (share of it the road map covers)."""
    from rslib.train.crs_diff import CRSDiffLoss

    cond = torch.zeros(2, 18, 16, 16, dtype=torch.uint8)
    m = 3 * CONDITION_NAMES.index("road")
    cond[0, m:m + 3, :, :4] = 255  # item 0: a road along the left quarter; item 1: no road
    cond[1, 3 * CONDITION_NAMES.index("lines")] = 255  # other maps do not count
    weights = CRSDiffLoss(clip_tokenizer(), 1.0, road_loss_weight=3.0).road_weights(cond, (4, 4))
    assert weights.shape == (2, 1, 4, 4)
    assert torch.equal(weights[0, 0, :, 0], torch.full((4,), 3.0))
    assert torch.equal(weights[0, 0, :, 1:], torch.ones(4, 3)) and torch.equal(weights[1], torch.ones(1, 4, 4))
    assert torch.allclose(CRSDiffLoss(clip_tokenizer(), 1.0, road_loss_weight=3.0).road_weights(cond, (8, 8))[0, 0, 0],
                          torch.tensor([3.0, 3.0, 1, 1, 1, 1, 1, 1]))
    assert CRSDiffLoss(clip_tokenizer(), 1.0).road_weights(cond, (4, 4)) is None
    with pytest.raises(ValueError, match="road_loss_weight"):
        CRSDiffLoss(clip_tokenizer(), 1.0, road_loss_weight=0.0)


PIXEL_MAPS = ("lines", "soft_edges", "sketch")


def test_condition_maps_subset_zeroes_the_other_maps_in_training(parts):
    """crs.condition_maps: the loss hands the adapter zeros for the maps outside it (and no road weights)."""
    from types import SimpleNamespace

    from rslib.train.crs_diff import CRSDiffLoss

    seen = []

    def denoiser(noisy, t, text, conditions, *rest):
        seen.append(conditions)
        return torch.zeros_like(noisy)

    g = torch.Generator().manual_seed(0)
    maps = (torch.rand(2, 18, 32, 32, generator=g) * 255).to(torch.uint8)
    batch = {"mean": torch.zeros(2, 4, 8, 8), "std": torch.ones(2, 4, 8, 8), "conditions": maps,
             "captions": [["a port."], ["a farmland."]], "has_content": torch.ones(2, dtype=torch.bool),
             "content": torch.zeros(2, TEXT_DIM), "metadata": torch.zeros(2, 7),
             "metadata_valid": torch.ones(2, 7, dtype=torch.bool)}
    model = SimpleNamespace(text_encoder=parts["text_encoder"], crs=denoiser)
    keep_all = ConditionDropout(keep_all=1.0, drop_all=0.0)
    for names in (CONDITION_NAMES, PIXEL_MAPS):
        loss = CRSDiffLoss(parts["tokenizer"], 1.0, keep_all, road_loss_weight=5.0, condition_maps=names)
        loss(model, batch, torch.Generator().manual_seed(0))
        if names == PIXEL_MAPS:
            assert loss.road_weights(keep_only(maps, names), (8, 8)).eq(1).all()  # the road map is zero
    full, pixel = seen
    assert torch.equal(full, maps.float() / 255)
    assert torch.equal(pixel[:, :9], full[:, :9]) and not pixel[:, 9:].any()
    with pytest.raises(ValueError, match="condition_maps"):
        CRSDiffLoss(parts["tokenizer"], 1.0, condition_maps=("lines", "roads"))


def test_condition_maps_subset_zeroes_the_other_maps_in_sampling(parts, tmp_path):
    """A pipeline trained on a subset of the maps samples as if the others were zero; the subset is saved."""
    pipe = _pipe(parts, use_metadata=False, use_content=False, perturb=True)
    c = _conditions()
    CRSDiffPipeline(**pipe.components, condition_maps=PIXEL_MAPS).save_pretrained(tmp_path / "pixel")
    pixel = CRSDiffPipeline.from_pretrained(tmp_path / "pixel", local_files_only=True)
    pixel.set_progress_bar_config(disable=True)
    assert pixel.config.condition_maps == list(PIXEL_MAPS) and pipe.config.condition_maps is None
    out = _run(pixel, conditions=c, num_inference_steps=1)
    assert torch.equal(out, _run(pipe, conditions=keep_only(c, PIXEL_MAPS), num_inference_steps=1))
    assert not torch.allclose(out, _run(pipe, conditions=c, num_inference_steps=1))


def test_map_guidance_unconditional_branch_sees_no_maps(parts, tmp_path):
    """map_guidance: CFG's unconditional branch gets zero maps (training's "drop all"); saved with the folder."""
    pipe = _pipe(parts, use_metadata=False, use_content=False, perturb=True)
    c = _conditions()
    guided = _run(pipe, conditions=c, map_guidance=True)
    assert not torch.allclose(guided, _run(pipe, conditions=c, map_guidance=False))
    zero = torch.zeros_like(c)  # no maps given: both branches already see none
    assert torch.equal(_run(pipe, conditions=zero, map_guidance=True), _run(pipe, conditions=zero, map_guidance=False))
    no_cfg = dict(conditions=c, guidance_scale=1.0)  # without guidance there is no unconditional branch
    assert torch.equal(_run(pipe, **no_cfg, map_guidance=True), _run(pipe, **no_cfg, map_guidance=False))
    assert pipe.config.map_guidance is False  # the constructor's default follows CRS-Diff
    CRSDiffPipeline(**pipe.components, map_guidance=True).save_pretrained(tmp_path / "g")
    loaded = CRSDiffPipeline.from_pretrained(tmp_path / "g", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.map_guidance is True
    assert torch.equal(_run(loaded, conditions=c), guided)  # None = the saved default


def test_evaluation_rows_include_the_autoencoder_ceiling(parts):
    """evaluate_settings scores the real images, then the real images through the pipeline's autoencoder (what
    any latent model can at best draw), then each setting; the last row is the last setting."""
    from transformers import CLIPModel

    from rslib.eval import control
    from rslib.models.segmenter import build_segmenter
    from rslib.models.text import rs_clip_config
    from rslib.train.autoencoder import reconstruct

    cfg = parts["cfg"]
    torch.manual_seed(0)
    clip = CLIPModel(rs_clip_config(cfg)).eval()
    segmenter = build_segmenter(cfg).eval()
    n = 6
    g = torch.Generator().manual_seed(0)
    test = {"pixel_values": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1,
            "captions": [["an aerial image of a port."]] * n,
            "conditions": (_conditions(n) * 255).to(torch.uint8)}
    settings = {"road": control.SETTINGS["road"], "all six maps": control.SETTINGS["all six maps"]}
    rows, images = control.evaluate_settings(_pipe(parts), test, clip, clip_tokenizer(cfg.clip.max_length),
                                             segmenter, n, 0, settings=settings, steps=2)
    assert [r["setting"] for r in rows] == ["real test images", control.AUTOENCODER_ROW, "road", "all six maps"]
    assert torch.equal(images[control.AUTOENCODER_ROW], reconstruct(parts["vae"], test["pixel_values"]))
    assert rows[0]["fid_rsclip"] == 0.0 and rows[1]["fid_rsclip"] > 0.0  # an untrained autoencoder loses a lot
    assert set(rows[1]) == set(rows[0]) and set(rows[-1]) - set(rows[0]) == {"seconds"}
    assert all(set(r["ci"]) == {"road_iou", "miou"} for r in rows)  # bootstrap intervals in every row
    # without the autoencoder row (the fusion ablation), the same settings give the same images
    rows2, images2 = control.evaluate_settings(_pipe(parts), test, clip, clip_tokenizer(cfg.clip.max_length),
                                               segmenter, n, 0, settings=settings, autoencoder_row=False, steps=2)
    assert [r["setting"] for r in rows2] == ["real test images", "road", "all six maps"]
    assert control.AUTOENCODER_ROW not in images2 and torch.equal(images2["road"], images["road"])


def test_training_data_keeps_the_maps_in_memory_or_reads_them_per_item(parts, tmp_path, monkeypatch):
    """Pre-encoding streams the split in chunks; the maps are kept (uint8) or, past MAPS_IN_MEMORY_BYTES (the gpu and
    paper presets' data sets), read from disk per item: the items are the same either way."""
    from rslib.data.datasets import RSDataset
    from rslib.data.synthrs import ensure_synthrs
    from rslib.data.datasets import load_split_tensors
    from rslib.train import crs_diff as train_crs

    ensure_synthrs(tmp_path, {"train": 5}, 32, seed=0)
    ds = RSDataset(tmp_path / "train", size=32, max_objects=1)
    kept = train_crs.encode_training_data(ds, parts["vae"], parts["image_encoder"], batch_size=2)  # chunks 2, 2, 1
    monkeypatch.setattr(train_crs, "MAPS_IN_MEMORY_BYTES", 0)
    lazy = train_crs.encode_training_data(ds, parts["vae"], parts["image_encoder"], batch_size=2)
    assert isinstance(kept.conditions, torch.Tensor) and kept.conditions.dtype == torch.uint8 and lazy.conditions is ds
    whole = load_split_tensors(ds)
    assert torch.equal(kept.conditions, whole["conditions"])
    with torch.no_grad():
        torch.testing.assert_close(kept.mean, parts["vae"].encode(whole["pixel_values"]).latent_dist.mean)
    for i in range(len(ds)):
        a, b = kept[i], lazy[i]
        assert a["captions"] == b["captions"]
        assert all(torch.equal(a[k], b[k]) for k in a if k != "captions")


def test_training_data_cache_is_reused_and_keyed_by_stage_one(parts, tmp_path, monkeypatch):
    """CRS-Diff and its ablation variants encode the training split once: a second call reads the cache (same
    items); retraining stage one (a new training.json) invalidates it."""
    from rslib.data.datasets import RSDataset
    from rslib.data.synthrs import ensure_synthrs
    from rslib.train import crs_diff as train_crs

    ensure_synthrs(tmp_path / "data", {"train": 3}, 32, seed=0)
    ds = RSDataset(tmp_path / "data" / "train", size=32, max_objects=1)
    cfg = get_preset("smoke", runs_dir=str(tmp_path / "runs"))
    s1, clip_dir = tmp_path / "stage_one", tmp_path / "clip"
    for folder in (s1, clip_dir):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    (s1 / "training.json").write_text('{"run": 1}')
    args = (cfg, ds, s1, parts["vae"], parts["image_encoder"], clip_dir)
    first = train_crs.cached_training_data(*args)
    calls = []
    real_encode = train_crs.encode_training_data
    monkeypatch.setattr(train_crs, "encode_training_data", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    again = train_crs.cached_training_data(*args)
    assert not calls
    for i in range(len(ds)):
        a, b = first[i], again[i]
        assert a["captions"] == b["captions"] and all(torch.equal(a[k], b[k]) for k in a if k != "captions")
    (s1 / "training.json").write_text('{"run": 2}')
    train_crs.cached_training_data(*args)
    assert calls == [1]


def test_fusion_ablation_variants_train_a_sixth_of_the_steps(tmp_path):
    from rslib.train.crs_diff import fusion_ablation, fusion_ablation_steps, train_fusion_ablation

    assert fusion_ablation_steps(get_preset("cpu")) == get_preset("cpu").crs.steps // 6
    assert fusion_ablation_steps(get_preset("smoke", **{"crs.steps": 2})) == 1  # never zero
    with pytest.raises(FileNotFoundError, match="run notebook 02"):  # the stage-one model it trains on is missing
        train_fusion_ablation(fusion_ablation(get_preset("smoke", runs_dir=str(tmp_path)), "ff", steps=1))
    variant = fusion_ablation(get_preset("cpu"), "sum")  # an ablation is settings: crs.fusion and crs.steps
    assert (variant.crs.fusion, variant.crs.steps) == ("sum", fusion_ablation_steps(get_preset("cpu")))
