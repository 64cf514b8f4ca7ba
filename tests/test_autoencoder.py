"""The autoencoder's loss and its training stage at the smoke preset."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from rslib.config import get_preset
from rslib.data import synthrs
from rslib.models.base import build_vae
from rslib.train.autoencoder import (box_cover, image_gradients, pair_maxima, random_crops, train_autoencoder,
                                    vae_loss_fn)
from rslib.train.stage_one import load_autoencoder


def test_vae_loss_is_l1_plus_weighted_mse_and_kl():
    cfg = get_preset("smoke")
    torch.manual_seed(0)
    vae = build_vae(cfg)
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1}
    p = vae_loss_fn(kl_weight=1e-3, mse_weight=2.0)(vae, batch, torch.Generator().manual_seed(0))
    assert p["l1"] > 0 and p["mse"] > 0 and p["kl"] > 0
    assert torch.allclose(p["loss"], p["l1"] + 2.0 * p["mse"] + 1e-3 * p["kl"])
    assert torch.isclose(p["psnr"], 10 * torch.log10(4.0 / p["mse"]))
    e = vae_loss_fn(kl_weight=1e-3, mse_weight=2.0, edge_weight=3.0)(vae, batch, torch.Generator().manual_seed(0))
    assert e["edge"] > 0 and torch.allclose(e["loss"], p["loss"] + 3.0 * e["edge"])


def test_box_cover_marks_the_pixels_inside_valid_boxes():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0]]])
    cover = box_cover(boxes, torch.tensor([[True, False]]), 4, 4)  # the second box is padding
    expected = torch.zeros(1, 1, 4, 4)
    expected[..., 0, :2] = 1
    assert torch.equal(cover, expected)
    a, b = pair_maxima(torch.tensor([[0.0, 2.0, 1.0]]))
    assert torch.equal(a, torch.tensor([[2.0, 2.0]])) and b.shape == (0, 3)


def test_the_object_weight_makes_errors_inside_boxes_count_more():
    cfg = get_preset("smoke")
    torch.manual_seed(0)
    vae = build_vae(cfg)
    boxes = torch.tensor([[[0.0, 0.0, 0.25, 0.25]], [[0.5, 0.5, 1.0, 1.0]]])
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "boxes": boxes, "valid": torch.ones(2, 1, dtype=torch.bool)}
    plain = vae_loss_fn(1e-3, edge_weight=3.0)(vae, batch, torch.Generator().manual_seed(0))
    same = vae_loss_fn(1e-3, edge_weight=3.0, object_weight=1.0)(vae, batch, torch.Generator().manual_seed(0))
    assert torch.equal(plain["loss"], same["loss"])  # weight 1: the plain loss, bit for bit
    weighted = vae_loss_fn(1e-3, edge_weight=3.0, object_weight=5.0)(vae, batch, torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same terms by hand: inside-box pixels 5x, each term divided by its mean weight
        x = batch["pixel_values"]
        z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
        err = (vae.decode(z).sample - x).abs()
    w = 1.0 + 4.0 * box_cover(boxes, batch["valid"], 32, 32)
    assert torch.isclose(weighted["l1"], (err * w).sum() / (3 * w.sum()), rtol=1e-4)
    assert not torch.isclose(weighted["l1"], plain["l1"])
    assert torch.isclose(weighted["psnr"], plain["psnr"])  # PSNR stays the plain one
    with pytest.raises(ValueError, match="object_weight"):
        vae_loss_fn(1e-3, object_weight=0.5)


def test_image_gradients_are_neighbour_differences():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)  # rows differ by 4, columns by 1
    dx, dy = image_gradients(x)
    assert dx.shape == (1, 1, 3, 3) and dy.shape == (1, 1, 2, 4)
    assert torch.equal(dx, torch.ones_like(dx)) and torch.equal(dy, torch.full_like(dy, 4.0))


def test_random_crops_are_seeded_windows_of_the_images():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    a = random_crops(x, 4, torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, 4, 4)
    assert torch.equal(a, random_crops(x, 4, torch.Generator().manual_seed(0)))
    for img, crop in zip(x, a):  # each crop is a contiguous window of its own image
        y, xx = divmod(int(crop[0, 0, 0] - img[0, 0, 0]), 8)
        assert torch.equal(crop, img[:, y:y + 4, xx:xx + 4])
    assert random_crops(x, 0, torch.Generator()) is x  # 0 = whole images


def test_train_autoencoder_sets_the_scaling_factor_and_reuses_a_finished_folder(tmp_path):
    cfg = get_preset("smoke")
    out = train_autoencoder(cfg, tmp_path / "ae", progress=False)
    factor = load_autoencoder(out).config.scaling_factor
    assert factor > 0 and factor != 1.0  # measured on the training latents, not the diffusers default
    mtime = (out / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert train_autoencoder(cfg, tmp_path / "ae", progress=False) == out
    assert (out / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime


def test_a_stage_precision_overrides_the_presets_and_counts_as_a_new_training(tmp_path, monkeypatch):
    from rslib.train.stage import stage_stamp, stage_train_config

    cfg = get_preset("smoke")
    assert stage_train_config(cfg, steps=1, batch_size=1).mixed_precision == cfg.mixed_precision
    assert stage_train_config(cfg, "bf16", steps=1, batch_size=1).mixed_precision == "bf16"
    bf16 = get_preset("smoke", **{"vae.mixed_precision": "bf16"})
    assert stage_stamp(bf16, "vae") != stage_stamp(cfg, "vae")  # a finished fp32 folder is not reused
    current = stage_stamp(cfg, "vae")
    with monkeypatch.context() as m:  # nor is one trained on images of another SynthRS version
        m.setattr(synthrs, "SYNTHRS_VERSION", "0.0")
        assert stage_stamp(cfg, "vae") != current
    out = train_autoencoder(bf16, tmp_path / "ae", progress=False)  # CPU bf16 autocast trains and saves fp32 weights
    vae = load_autoencoder(out)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in vae.parameters())
