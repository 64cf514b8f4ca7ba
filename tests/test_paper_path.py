"""The paper preset end to end on tiny stand-in weights: a local CLIP folder, a Stable Diffusion 1.x folder and a
DINOv2 folder in the real formats (built from configs, nothing downloaded). Every stage trains 2 steps from them
and its saved pipeline reloads and samples."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPModel

from rslib.config import get_preset
from rslib.data.datasets import load_split_tensors, split_dataset, split_dir
from rslib.data.synthrs import ensure_synthrs
from rslib.eval.data import load_folder
from rslib.eval.layout import layouts_of, sample_cc_diff
from rslib.pipelines.cc_diff import load_cc_diff
from rslib.pipelines.crs_diff import load_crs_diff, sample_crs_diff
from rslib.pipelines.stage_one import load_stage_one, sample_stage_one
from rslib.train.autoencoder import train_autoencoder
from rslib.train.cc_diff import train_cc_diff
from rslib.train.crs_diff import train_crs_diff
from rslib.train.stage import read_history, training_info
from rslib.train.stage_one import train_stage_one
from rslib.train.text_encoder import train_text_encoder
from standins import TEXT_DIM, UNET_FILE, paper_overrides, paper_weights

SIZE = 64  # image side; SD's autoencoder (f = 8) gives 8 x 8 latents


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Tiny stand-ins of the local weights (clip/, sd/, dino/) and a tiny SynthRS (data/)."""
    root = tmp_path_factory.mktemp("paper")
    torch.manual_seed(0)
    paper_weights(root, SIZE)
    # the data: SynthRS written into tmp (data.root), never over the repository's data/synthrs/64px_seed0
    ensure_synthrs(root / "data", {"train": 16, "val": 4, "test": 4}, SIZE, seed=0)
    return root


@pytest.fixture(scope="module")
def cfg(root):
    """The paper preset pointed at the stand-ins, with tiny module sizes and 2 training steps per stage."""
    return get_preset("paper", **paper_overrides(root, SIZE), **{
        "data.root": str(root / "data"), "data.n_train": 16, "data.n_val": 4, "data.n_test": 4})


@pytest.fixture(scope="module")
def stage_one(cfg, root):
    assert train_text_encoder(cfg) == root / "clip"  # the local CLIP folder, unchanged
    assert train_autoencoder(cfg) == root / "sd" / "vae"  # SD's autoencoder
    # a CLIP left in runs/ by an earlier training must not replace clip.pretrained (CRS-Diff and CC-Diff read that)
    torch.manual_seed(1)
    CLIPModel(CLIPModel.config_class.from_pretrained(root / "clip")).save_pretrained(cfg.run_dir("text_encoder"))
    return train_stage_one(cfg, progress=False)


def _finite_images(x: torch.Tensor | np.ndarray, shape: tuple[int, ...]) -> None:
    x = torch.as_tensor(x)
    assert tuple(x.shape) == shape and torch.isfinite(x).all()


def test_preset_keeps_the_paper_settings(cfg):  # every value: tests/test_paper_preset.py
    assert cfg.name == "paper" and cfg.lr_decay == "constant" and cfg.unet.ema_decay is None
    assert cfg.unet.x0_weight_max == cfg.crs.x0_weight_max == cfg.cc.x0_weight_max == 1.0
    assert not cfg.crs.map_guidance and cfg.cc.timestep_sampling == "uniform" and cfg.cc.image_encoder == "dinov2"
    assert cfg.crs.null_conditions == "zero" and cfg.cc.sampler == "euler"


def test_stage_one_fine_tunes_the_sd_unet(cfg, root, stage_one):
    assert stage_one == cfg.run_dir("stage_one") and len(read_history(stage_one)) == 2
    sd = load_file(str(root / "sd" / UNET_FILE))
    tuned = load_file(str(stage_one / UNET_FILE))
    assert sd.keys() == tuned.keys()
    moved = max(float((sd[k] - tuned[k]).abs().max()) for k in sd)
    assert 0 < moved < 1e-3  # lr 1e-5, 2 Adam steps: it trained, from SD's weights
    torch.manual_seed(cfg.data.seed)
    fresh = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "sd", subfolder="unet"))
    assert max(float((v - tuned[k]).abs().max()) for k, v in fresh.state_dict().items()) > 0.1

    pipe = StableDiffusionPipeline.from_pretrained(stage_one, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.scaling_factor == 0.18215 and pipe.unet.config.cross_attention_dim == TEXT_DIM
    clip_text = CLIPModel.from_pretrained(root / "clip", local_files_only=True).text_model.state_dict()
    assert all(torch.equal(v, clip_text[k]) for k, v in pipe.text_encoder.state_dict().items())  # CLIP's, frozen
    image = pipe("an aerial image of a port.", num_inference_steps=2, guidance_scale=cfg.unet.guidance_scale,
                 height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(0), output_type="np").images
    _finite_images(image, (1, SIZE, SIZE, 3))
    images = sample_stage_one(load_stage_one(stage_one, "cpu"), ["a river."], cfg, seed=0)  # notebook 02's way
    assert images.shape == (1, SIZE, SIZE, 3) and images.dtype == np.uint8


def test_crs_diff_on_the_sd_unet(cfg, stage_one):
    out = train_crs_diff(cfg, progress=False)
    assert out == cfg.run_dir("crs_diff") and len(read_history(out)) == 2
    assert all(np.isfinite(h["loss"]) for h in read_history(out))
    pipe = load_crs_diff(out, "cpu")
    assert pipe.config.map_guidance is False  # the paper's guidance: both CFG branches see the maps
    assert pipe.config.guidance_keeps_metadata is True and pipe.config.null_conditions == "zero"  # ... the metadata
    assert pipe.config.negative_prompt == cfg.crs.negative_prompt and not pipe.adapter.config.metadata_to_adapter
    assert (pipe.config.guidance_scale, pipe.config.num_inference_steps) == (cfg.crs.guidance_scale,
                                                                             cfg.crs.sample_steps)
    tuned = load_file(str(stage_one / UNET_FILE))
    assert all(torch.equal(v, tuned[k]) for k, v in pipe.unet.state_dict().items())  # stage one, frozen
    assert torch.allclose(pipe.adapter.conv_in.weight, tuned["conv_in.weight"], atol=1e-3)  # its encoder copy
    test = load_split_tensors(split_dataset(cfg, "test"))
    images = sample_crs_diff(pipe, [test["captions"][0][0]], 0, conditions=test["conditions"][:1],
                             metadata=(test["metadata"][:1], test["metadata_valid"][:1]),
                             content_images=test["content"][:1], guidance_scale=cfg.crs.guidance_scale,
                             steps=cfg.crs.sample_steps)
    _finite_images(images, (1, 3, SIZE, SIZE))
    assert images.min() >= -1 and images.max() <= 1


def test_cc_diff_with_dinov2_references(cfg, root, stage_one):
    before = load_file(str(stage_one / UNET_FILE))
    out = train_cc_diff(cfg, progress=False)
    assert out == cfg.run_dir("cc_diff") and len(read_history(out)) == 2
    assert all(np.isfinite(h["loss"]) for h in read_history(out))
    info = training_info(out)
    assert info["image_dim"] == 24 and info["bank_entries"] > 0  # DINOv2 tokens, not the CLIP vision tower's
    pipe = load_cc_diff(out, "cpu")
    sd = load_file(str(root / "sd" / UNET_FILE))
    assert all(torch.equal(v, sd[k]) for k, v in pipe.unet.state_dict().items())  # SD itself (cc.base_model), frozen
    after = load_file(str(stage_one / UNET_FILE))
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # stage one untouched
    assert any(not torch.equal(v, sd[k]) for k, v in after.items())  # (and it is not SD's)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and pipe.config.negative_prompt == cfg.cc.negative_prompt
    bank = pipe.references
    assert bank.config.encoder == "dinov2" and bank.fg_tokens.shape[1:] == (1 + 2 * 2, 24)  # CLS + 2 x 2 patches
    test = load_folder(split_dir(cfg, "test"), SIZE, maps=(), classes=pipe.classes)
    layouts = layouts_of(test, len(test), cfg.cc.max_instances)
    i = next(k for k, lay in enumerate(layouts) if lay)
    images = sample_cc_diff(pipe, [test.captions[i]], [layouts[i]], 0, guidance_scale=cfg.cc.guidance_scale,
                            steps=cfg.cc.sample_steps)
    _finite_images(images, (1, 3, SIZE, SIZE))
