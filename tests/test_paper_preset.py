"""The paper preset is each paper's setup: every setting that the papers and their code state, checked value by
value with where it is stated, and the code paths those settings switch on (no learned nulls, the unconditional
branch's contents, the sampler, CC-Diff's own base model, weight decay, the caption)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from rslib.config import get_preset
from rslib.data.datasets import ConditionDropout
from rslib.models.base import build_noise_scheduler, build_sampler
from rslib.models.crs_diff import zero_dropped
from rslib.train.cc_diff import cc_train_config, prepare_base_model, resolve_base_model
from rslib.train.crs_diff import CRSDiffLoss, crs_train_config

CRS_NEGATIVE = "Low resolution, cropped, worst quality, low quality"
CC_NEGATIVE = "worst quality, low quality, bad anatomy, watermark, text, blurry"

# (dotted setting, the paper's value, where the reference says so)
PAPER_SETTINGS = [
    # both papers: plain epsilon-MSE on SD 1.x's noise, constant learning rate, no EMA
    ("lr_decay", "constant", "CRS-Diff (Uni-ControlNet template), CC-Diff: constant, no warm-up"),
    ("unet.noise_offset", 0.0, "SD's Gaussian noise in both; no offset noise"),
    ("unet.x0_weight_max", 1.0, "epsilon-MSE, no loss weighting"),
    ("unet.ema_decay", None, "no EMA"),
    ("unet.lr", 1e-5, "CRS-Diff: lr 1e-5 (template default; UNVERIFIED)"),
    ("unet.batch_size", 4, "CRS-Diff: batch 4 (template default; UNVERIFIED)"),
    ("unet.steps", 50000, "CRS-Diff: '5w' stage-one checkpoint (UNVERIFIED reading)"),
    # CRS-Diff stage two
    ("crs.timestep_sampling", "uniform", "CRS-Diff: DDPM uniform timesteps"),
    ("crs.x0_weight_max", 1.0, "CRS-Diff: epsilon-MSE"),
    ("crs.road_loss_weight", 1.0, "CRS-Diff: every latent cell alike"),
    ("crs.lr", 1e-5, "CRS-Diff: lr 1e-5 (template default; UNVERIFIED)"),
    ("crs.batch_size", 4, "CRS-Diff: batch 4 (UNVERIFIED)"),
    ("crs.steps", 100000, "CRS-Diff: 1e5 steps (UNVERIFIED)"),
    ("crs.warmup_steps", 0, "CRS-Diff: no warm-up"),
    ("crs.checkpoint_every", 500, "CRS-Diff: a checkpoint every 500 steps"),
    ("crs.metadata_dim", 320, "CRS-Diff: 320-d sinusoid per metadata field"),
    ("crs.metadata_to_adapter", False, "CRS-Diff: the adapter gets no metadata; it enters the UNet only"),
    ("crs.content_source", "self", "Uni-ControlNet's data layout: one global vector per training image, its own"),
    ("crs.null_conditions", "zero", "CRS-Diff: no learned null for dropped content or metadata"),
    ("crs.map_guidance", False, "CRS-Diff: the unconditional branch keeps the local maps"),
    ("crs.guidance_keeps_metadata", True, "CRS-Diff: the unconditional branch keeps the metadata"),
    ("crs.negative_prompt", CRS_NEGATIVE, "CRS-Diff: the negative prompt"),
    ("crs.sample_steps", 50, "CRS-Diff: DDIM, 50 steps"),
    ("crs.guidance_scale", 7.5, "CRS-Diff: CFG s = 7.5"),
    ("crs.condition_maps", ("lines", "soft_edges", "sketch", "road", "depth", "segmentation"), "all six maps"),
    # CC-Diff
    ("cc.base_model", "weights/stable-diffusion-v1-4", "CC-Diff: frozen SD v1.4, not a fine-tuned stage one"),
    ("cc.batch_size", 1, "CC-Diff: --train_batch_size=1"),
    ("cc.grad_accum", 40, "CC-Diff: --gradient_accumulation_steps=40"),
    ("cc.lr", 1e-4, "CC-Diff: --learning_rate=1e-4 constant"),
    ("cc.warmup_steps", 0, "CC-Diff: no warm-up"),
    ("cc.weight_decay", 1e-2, "CC-Diff: AdamW wd=1e-2"),
    ("cc.checkpoint_every", 300, "CC-Diff: --checkpointing_steps=300"),
    ("cc.timestep_sampling", "uniform", "CC-Diff: DDPMScheduler epsilon-MSE"),
    ("cc.x0_weight_max", 1.0, "CC-Diff: epsilon-MSE"),
    ("cc.object_loss_weight", 1.0, "CC-Diff: epsilon-MSE over the whole latent"),
    ("cc.caption", "first", "CC-Diff: the global caption 'This is an aerial image of <scene>. ' + layout"),
    ("cc.caption_dropout", 0.0, "CC-Diff: no condition dropout"),
    ("cc.instance_dropout", 0.0, "CC-Diff: no condition dropout"),
    ("cc.max_instances", 6, "CC-Diff: N <= 6"),
    ("cc.num_fg_queries", 16, "CC-Diff: Qf = 16"),
    ("cc.num_bg_queries", 8, "CC-Diff: Qb = 8"),
    ("cc.num_bridge_queries", 8, "CC-Diff: Qc = 8"),
    ("cc.fusion_heads", 8, "CC-Diff: MIFusion heads=8"),
    ("cc.fusion_dim_head", 160, "CC-Diff: MIFusion dim_head=160"),
    ("cc.fusion_blocks", ("mid_block", "up_blocks.1"), "CC-Diff: 4 fusion processors, at C = 1280"),
    ("cc.image_encoder", "dinov2", "CC-Diff: D_img = 1024 (DINOv2-large)"),
    ("cc.sam_checkpoint", "weights/sam_vit_h_4b8939.pth", "CC-Diff: SAM ViT-H masks the reference crops"),
    ("cc.sampler", "euler", "CC-Diff: EulerDiscreteScheduler"),
    ("cc.sample_steps", 50, "CC-Diff: 50 steps"),
    ("cc.guidance_scale", 7.5, "CC-Diff: CFG 7.5"),
    ("cc.negative_prompt", CC_NEGATIVE, "CC-Diff: the negative prompt"),
    ("data.image_size", 512, "both: 512 px"),
]


def setting(cfg, dotted: str):
    value = cfg
    for key in dotted.split("."):
        value = getattr(value, key)
    return value


@pytest.mark.parametrize("dotted, expected, where", PAPER_SETTINGS, ids=[s[0] for s in PAPER_SETTINGS])
def test_the_paper_preset_has_each_papers_setting(dotted, expected, where):
    assert setting(get_preset("paper"), dotted) == expected, where


def test_crs_diffs_condition_dropout_is_the_papers():
    """CRS-Diff: caption 0.5; keep all 0.1, drop all 0.1, each map 0.6 (lines) and 0.5."""
    d = ConditionDropout()
    assert (d.drop_caption, d.keep_all, d.drop_all) == (0.5, 0.1, 0.1)
    assert d.drop_each == (0.6, 0.5, 0.5, 0.5, 0.5, 0.5)


def test_the_loop_settings_follow_the_preset():
    cfg = get_preset("paper")
    cc = cc_train_config(cfg)
    assert (cc.batch_size, cc.grad_accum, cc.lr, cc.weight_decay, cc.warmup_steps, cc.max_grad_norm) == \
        (1, 40, 1e-4, 1e-2, 0, 1.0)  # CC-Diff: max_grad_norm 1
    assert cc.lr_decay == "constant" and cc.ema_decay is None
    crs = crs_train_config(cfg)
    assert (crs.batch_size, crs.lr, crs.warmup_steps, crs.ema_decay) == (4, 1e-5, 0, None)
    assert cc_train_config(get_preset("cpu")).weight_decay == 0.0


def test_samplers_and_the_training_schedule_are_sd_1x():
    """CRS-Diff: DDIM scaled_linear 0.00085-0.012, steps_offset 1, no clipping, set_alpha_to_one False;
    CC-Diff: EulerDiscreteScheduler; both train on SD's DDPM schedule."""
    ddim = build_sampler("ddim")
    assert isinstance(ddim, DDIMScheduler) and build_sampler().config == ddim.config
    c = ddim.config
    assert (c.beta_schedule, c.beta_start, c.beta_end, c.num_train_timesteps) == ("scaled_linear", 0.00085, 0.012,
                                                                                  1000)
    assert (c.steps_offset, c.clip_sample, c.set_alpha_to_one, c.prediction_type) == (1, False, False, "epsilon")
    ddim.set_timesteps(50)
    assert ddim.timesteps.tolist() == list(range(981, 0, -20))  # t = 981, 961, ..., 1 (CRS-Diff)
    euler = build_sampler("euler")
    assert isinstance(euler, EulerDiscreteScheduler)
    assert (euler.config.beta_schedule, euler.config.beta_start, euler.config.beta_end) == ("scaled_linear",
                                                                                            0.00085, 0.012)
    train = build_noise_scheduler().config
    assert (train.beta_schedule, train.prediction_type) == ("scaled_linear", "epsilon")
    with pytest.raises(ValueError, match=r"sampler must be one of ddim, euler, not 'pndm' \(cc.sampler\)"):
        build_sampler("pndm")


def test_zero_dropped_puts_zeros_through_the_encoders():
    content = torch.ones(3, 4)
    values, keep = zero_dropped(content, torch.tensor([True, False, True]))
    assert values[1].eq(0).all() and values[[0, 2]].eq(1).all() and keep.all() and keep.dtype == torch.bool
    meta = torch.full((2, 7), 0.5)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 3] = True
    values, keep = zero_dropped(meta, mask)
    assert values.sum() == 0.5 and values[0, 3] == 0.5 and keep.shape == (2, 7) and keep.all()


class _SpyCRS(torch.nn.Module):
    """Stands for CRSDiffModel in CRSDiffLoss: records the content and metadata it is given."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def forward(self, noisy, t, text, conditions, content, content_keep, metadata, metadata_keep):
        self.seen = {"content": content, "content_keep": content_keep, "metadata": metadata,
                     "metadata_keep": metadata_keep}
        return torch.zeros_like(noisy)


@pytest.mark.parametrize("null_conditions", ["learned", "zero"])
def test_crs_diff_training_drops_conditions_as_configured(null_conditions):
    """"learned": dropped rows keep=False (the learned nulls); "zero": zeros, every row kept (CRS-Diff's)."""
    from rslib.models.text import clip_tokenizer

    class TextTower(torch.nn.Module):
        def forward(self, input_ids):
            return type("Out", (), {"last_hidden_state": torch.zeros(input_ids.shape[0], 4, 8)})()

    model = torch.nn.Module()
    model.crs, model.text_encoder = _SpyCRS(), TextTower()
    b = 64
    batch = {"mean": torch.zeros(b, 4, 2, 2), "std": torch.zeros(b, 4, 2, 2),
             "conditions": torch.zeros(b, 18, 8, 8, dtype=torch.uint8), "captions": [["a farmland."]] * b,
             "content": torch.ones(b, 5), "has_content": torch.ones(b, dtype=torch.bool),
             "metadata": torch.full((b, 7), 0.5), "metadata_valid": torch.ones(b, 7, dtype=torch.bool)}
    loss = CRSDiffLoss(clip_tokenizer(4), 0.18, road_loss_weight=1.0, null_conditions=null_conditions)
    loss(model, batch, torch.Generator().manual_seed(0))
    seen = model.crs.seen
    dropped = seen["content"].eq(0).all(1) if null_conditions == "zero" else ~seen["content_keep"]
    assert 0 < int(dropped.sum()) < b  # some rows dropped, some kept
    if null_conditions == "zero":
        assert seen["content_keep"].all() and seen["metadata_keep"].all()
        assert seen["content"][~dropped].eq(1).all() and seen["metadata"].eq(0).any()
    else:
        assert seen["content"].eq(1).all() and not seen["metadata_keep"].all()
    with pytest.raises(ValueError, match="null_conditions must be one of learned, zero"):
        CRSDiffLoss(clip_tokenizer(4), 0.18, null_conditions="nulls")


def test_cc_diff_trains_on_its_own_base_model_never_on_stage_one(tmp_path, monkeypatch):
    """CC-Diff: the paper's base is SD 1.4 as it is; with cc.base_model set stage one is neither read nor
    trained; a missing folder is named with its setting and the two ways on."""
    sd = tmp_path / "sd14"
    cfg = get_preset("paper", **{"cc.base_model": str(sd), "runs_dir": str(tmp_path / "runs")})
    with pytest.raises(FileNotFoundError, match=r"cc.base_model: no Stable Diffusion folder \(model_index.json\) at"):
        resolve_base_model(cfg)
    sd.mkdir()
    (sd / "model_index.json").write_text("{}")
    import rslib.train.stage_one as stage_one

    monkeypatch.setattr(stage_one, "train_stage_one", lambda *a, **k: pytest.fail("stage one trained"))
    assert resolve_base_model(cfg) == sd and prepare_base_model(cfg) == sd
    with pytest.raises(FileNotFoundError, match="no stage-one model at"):  # an explicit folder wins
        resolve_base_model(cfg, tmp_path / "other")
    small = get_preset("smoke", **{"runs_dir": str(tmp_path / "runs")})
    with pytest.raises(FileNotFoundError, match="no stage-one model at .*run notebook 02"):
        resolve_base_model(small)  # the small presets' base is their stage one


class _Stop(Exception):
    pass


@pytest.mark.parametrize("caption", ["any", "first"])
def test_cc_diff_training_reads_the_caption_as_configured(caption, monkeypatch):
    """"first": the global caption only (the paper); "any": one of the record's captions, drawn per step."""
    import rslib.train.cc_diff as train_cc
    from rslib.train.cc_diff import CCDiffLoss

    seen = []

    def spy(tokenizer, captions):
        seen.extend(captions)
        raise _Stop

    monkeypatch.setattr(train_cc, "tokenize", spy)
    b = 64
    batch = {"mean": torch.zeros(b, 4, 2, 2), "std": torch.zeros(b, 4, 2, 2),
             "captions": [["This is an aerial image of a harbor. ", "the ship on the left", "a white ship"]] * b}
    with pytest.raises(_Stop):
        CCDiffLoss(None, 0.18, caption_dropout=0.0, caption=caption)(None, batch, torch.Generator().manual_seed(0))
    if caption == "first":
        assert set(seen) == {"This is an aerial image of a harbor. "}
    else:
        assert len(set(seen)) == 3
    with pytest.raises(ValueError, match="cc.caption must be one of any, first, not 'global'"):
        CCDiffLoss(None, 0.18, caption="global")


def test_each_stage_reads_its_own_data_set():
    """Stage one trains on data.root (RSICD in CRS-Diff), CRS-Diff on crs.data_root and CC-Diff on cc.data_root
    (DIOR-RSVG); the stage's training settings leave the root to the data stamp, and each data set gets its own
    instruments."""
    from rslib.train.stage import training_settings

    cfg = get_preset("paper", **{"data.root": "data/rsicd", "crs.data_root": "data/fmow",
                                 "cc.data_root": "data/dior-rsvg"})
    crs, cc = cfg.stage_data("crs"), cfg.stage_data("cc")
    assert (crs.data.root, cc.data.root, cfg.data.root) == ("data/fmow", "data/dior-rsvg", "data/rsicd")
    assert crs.crs == cfg.crs and crs.unet == cfg.unet and crs.stage_data("crs") == crs
    assert "data_root" not in training_settings(cfg.crs) and "data_root" not in training_settings(cfg.cc)
    assert crs.data_run_dir("segmenter").name == "segmenter_fmow"
    assert cc.data_run_dir("detector").name == "detector_dior-rsvg"
    plain = get_preset("cpu")
    assert plain.stage_data("crs") is plain and plain.stage_data("cc") is plain
    assert plain.data_run_dir("segmenter") == plain.run_dir("segmenter")
