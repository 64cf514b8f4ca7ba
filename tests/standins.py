"""Tiny stand-ins of the paper preset's local weights, saved in the real formats and built from configs (nothing
downloaded): a transformers CLIP folder, a Stable Diffusion 1.x diffusers folder, a DINOv2 folder, and the
instruments' files (an open_clip checkpoint, torch-fidelity's InceptionV3 weights)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPTextModel,
                          CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model)

from rslib.models.text import clip_tokenizer

TEXT_DIM = 32  # the CLIP text tower's width = the UNet's cross-attention width (768 for SD 1.x)
CLIP_IMAGE = 32  # the CLIP vision tower's input side
DINO_PATCH = 14
DINO_DIM = 24
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
TINY_OPEN_CLIP = "rslib-test-tiny-clip"


def clip_towers(text_dim: int = TEXT_DIM) -> tuple[CLIPTextModel, CLIPVisionModelWithProjection]:
    """A one-layer CLIP text tower of width ``text_dim`` and a 32-px vision tower projecting to it, in eval mode
    (drawn from torch's global generator: seed it first)."""
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=text_dim, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=77,
                                        projection_dim=text_dim)).eval()
    image = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32,
                                                           num_hidden_layers=1, num_attention_heads=2,
                                                           intermediate_size=64, projection_dim=text_dim)).eval()
    return text, image


def clip_folder(path: Path) -> CLIPModel:
    """A CLIP ViT-L/14-style folder (model, tokenizer, image processor) with tiny widths; returns the model."""
    clip = CLIPModel(CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_DIM, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=77).to_dict(),
        vision_config=CLIPVisionConfig(image_size=CLIP_IMAGE, patch_size=16, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64).to_dict(),
        projection_dim=16))
    clip.save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE},
                                                     crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE}),
                  tokenizer=clip_tokenizer()).save_pretrained(path)
    return clip


def sd_folder(path: Path, clip: CLIPModel, size: int) -> None:
    """A Stable Diffusion 1.x folder (SD's block types, scaling factor and scheduler) with tiny channels, for
    ``size`` px images (f = 8 latents); its text encoder is ``clip``'s text tower."""
    unet = UNet2DConditionModel(
        sample_size=size // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=4, attention_head_dim=2, cross_attention_dim=TEXT_DIM,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    with torch.no_grad():  # "pretrained" weights, far from a fresh initialisation
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        norm_num_groups=4, sample_size=size, scaling_factor=0.18215)
    text = CLIPTextModel(clip.config.text_config)  # SD 1.x's text encoder is CLIP ViT-L/14's text tower
    text.load_state_dict(clip.text_model.state_dict())
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", set_alpha_to_one=False, skip_prk_steps=True,
                              steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)


def dino_folder(path: Path) -> None:
    """A DINOv2 folder whose position embeddings are for a larger input than it is read at (as dinov2-large's,
    518 px, read at 224 px)."""
    Dinov2Model(Dinov2Config(hidden_size=DINO_DIM, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                             patch_size=DINO_PATCH, image_size=4 * DINO_PATCH)).save_pretrained(path)


def paper_weights(root: Path, size: int) -> None:
    """The three local model folders of the paper preset under ``root``: clip/, sd/ (its CLIP text tower) and
    dino/."""
    clip = clip_folder(root / "clip")
    sd_folder(root / "sd", clip, size)
    dino_folder(root / "dino")


def paper_overrides(root: Path, size: int) -> dict:
    """The paper preset's settings pointed at the stand-ins of :func:`paper_weights` under ``root``: tiny module
    sizes, 2 training and 2 sampling steps per stage, on CPU in float32."""
    return {
        "runs_dir": str(root / "runs"), "device": "cpu", "mixed_precision": "no", "data.image_size": size,
        "clip.pretrained": str(root / "clip"), "vae.pretrained": str(root / "sd"),
        "unet.pretrained": str(root / "sd"), "unet.steps": 2, "unet.batch_size": 2, "unet.sample_steps": 2,
        "crs.stem_channels": (4, 8, 8), "crs.inject_channels": (8, 8, 16, 16), "crs.metadata_dim": 16,
        "crs.steps": 2, "crs.batch_size": 2, "crs.sample_steps": 2,
        "cc.dino_path": str(root / "dino"), "cc.dino_size": 2 * DINO_PATCH, "cc.resampler_dim": 16,
        "cc.resampler_heads": 2, "cc.resampler_dim_head": 8, "cc.fusion_heads": 2, "cc.fusion_dim_head": 8,
        "cc.box_hidden": 16, "cc.steps": 2, "cc.batch_size": 2, "cc.grad_accum": 2, "cc.sample_steps": 2,
        "cc.base_model": str(root / "sd"), "cc.sam_checkpoint": "",  # box crops: no SAM stand-in
    }


def open_clip_checkpoint(root: Path) -> Path:
    """A tiny open_clip model config (the ViT-L-14 layout at toy widths, registered as :data:`TINY_OPEN_CLIP`) and
    its random weights saved as a checkpoint file under ``root``."""
    import open_clip

    root.mkdir(parents=True, exist_ok=True)
    (root / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(root)
    model = open_clip.create_model(TINY_OPEN_CLIP)
    torch.save(model.state_dict(), root / "open_clip_pytorch_model.bin")
    return root / "open_clip_pytorch_model.bin"


def inception_weights(path: Path) -> Path:
    """Random weights in the layout of torch-fidelity's FID InceptionV3 (built without downloading anything)."""
    import pytest
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as mp:  # build the network, skip its download of the real weights
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():  # activations that keep their scale through 90 layers (no vanishing features)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
