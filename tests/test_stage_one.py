"""Stage one: the loss falls, resuming is exact, the folder is a Stable Diffusion pipeline, caption dropout, errors."""
from __future__ import annotations

import logging
import logging.handlers
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPModel

from rslib.config import get_preset
from rslib.models.base import build_vae
from rslib.models.text import clip_tokenizer, rs_clip_config, tokenize
from rslib.pipelines.stage_one import load_stage_one, renoise_stage_one, sample_stage_one
from rslib.train.stage import is_finished, read_history, training_info
from rslib.train.stage_one import StageOneLoss, StageOneModel, drop_captions, train_stage_one

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny untrained RS-CLIP (with tokenizer) and VAE, saved as the stages before this one would save them."""
    root = tmp_path_factory.mktemp("stage_one_inputs")
    cfg = get_preset("smoke")
    torch.manual_seed(0)
    CLIPModel(rs_clip_config(cfg)).save_pretrained(root / "text_encoder")
    clip_tokenizer(cfg.clip.max_length).save_pretrained(root / "text_encoder")
    build_vae(cfg).save_pretrained(root / "autoencoder")
    return root / "text_encoder", root / "autoencoder"


def _cfg(**unet):
    return get_preset("smoke", **{f"unet.{k}": v for k, v in unet.items()})


@pytest.fixture(scope="module")
def resumed(inputs, tmp_path_factory):
    """One run of 6 steps straight through, one stopped after 3 steps and resumed; both with EMA."""
    te, ae = inputs
    root = tmp_path_factory.mktemp("stage_one_runs")
    cfg = _cfg(steps=6, batch_size=4, ema_decay=0.8, caption_dropout=0.3)
    straight = train_stage_one(cfg, te, ae, root / "straight", progress=False)
    stopped = train_stage_one(cfg, te, ae, root / "resumed", stop_after=3, progress=False)
    assert not is_finished(stopped) and len(read_history(stopped)) == 3
    resumed = train_stage_one(cfg, te, ae, root / "resumed", progress=False)
    return cfg, straight, resumed


def test_loss_falls(inputs, tmp_path):
    te, ae = inputs
    cfg = _cfg(steps=40, batch_size=8, lr=2e-3, ema_decay=None)
    out = train_stage_one(cfg, te, ae, tmp_path / "s1", progress=False)
    losses = [h["loss"] for h in read_history(out)]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])


def test_exact_resume(resumed):
    _, straight, again = resumed
    a, b = load_file(str(straight / UNET_FILE)), load_file(str(again / UNET_FILE))  # EMA weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(str(p / "training/checkpoint/model.safetensors")) for p in (straight, again))  # raw weights
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in read_history(straight)] == [h["loss"] for h in read_history(again)]


def test_folder_is_a_stable_diffusion_pipeline(resumed):
    cfg, out, _ = resumed
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    s = cfg.data.image_size
    res = pipe("an aerial image of a river.", height=s, width=s, num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert res.images.shape == (1, s, s, 3) and np.isfinite(res.images).all()
    # the saved UNet holds the EMA weights, not the last raw ones
    ema = load_file(str(out / "training/checkpoint/ema.safetensors"))
    unet = load_file(str(out / UNET_FILE))
    assert all(torch.equal(unet[k], ema[f"unet.{k}"]) for k in unet)


def test_sampling_is_seeded_per_image(resumed):
    cfg, out, _ = resumed
    pipe = load_stage_one(out, "cpu")
    prompts = ["an aerial image of a river.", "an aerial image of a port.", "an aerial image of a forest."]
    all3 = sample_stage_one(pipe, prompts, cfg, seed=5, steps=2, batch_size=3)
    one_by_one = sample_stage_one(pipe, prompts, cfg, seed=5, steps=2, batch_size=1)
    assert all3.shape == (3, cfg.data.image_size, cfg.data.image_size, 3) and all3.dtype == np.uint8
    assert np.abs(all3.astype(int) - one_by_one.astype(int)).max() <= 1  # image i depends on seed + i only
    assert not np.array_equal(all3, sample_stage_one(pipe, prompts, cfg, seed=6, steps=2, batch_size=3))


def test_finished_folder_is_reused(resumed, inputs):
    cfg, out, _ = resumed
    before = (out / UNET_FILE).stat().st_mtime_ns
    assert train_stage_one(cfg, *inputs, out, progress=False) == out
    assert (out / UNET_FILE).stat().st_mtime_ns == before


def test_retraining_an_input_in_place_makes_stage_one_train_again(inputs, tmp_path):
    """Reuse needs the same training of the text encoder and autoencoder, not only the same folders."""
    import shutil

    from rslib.train.stage import input_stamp

    te, ae = inputs
    ae_copy = shutil.copytree(ae, tmp_path / "autoencoder")
    cfg = _cfg(steps=2, batch_size=4)
    out = train_stage_one(cfg, te, ae_copy, tmp_path / "s1", progress=False)
    first = (out / UNET_FILE).stat().st_mtime_ns
    assert train_stage_one(cfg, te, ae_copy, out, progress=False) == out
    assert (out / UNET_FILE).stat().st_mtime_ns == first  # nothing changed: reused
    before = input_stamp(ae_copy)
    (ae_copy / "training.json").write_text('{"stamp": {}, "seconds": 1.0}')  # the autoencoder trained again
    assert input_stamp(ae_copy)["digest"] != before["digest"] and input_stamp(ae_copy)["path"] == str(ae_copy)
    assert not is_finished(out, training_info(out)["stamp"] | {"autoencoder": input_stamp(ae_copy)})
    train_stage_one(cfg, te, ae_copy, out, progress=False)
    assert (out / UNET_FILE).stat().st_mtime_ns != first
    assert training_info(out)["stamp"]["autoencoder"] == input_stamp(ae_copy)


def test_caption_dropout_rate():
    caps = [f"caption {i}" for i in range(4000)]
    out = drop_captions(caps, 0.25, torch.Generator().manual_seed(0))
    rate = sum(c == "" for c in out) / len(caps)
    assert 0.22 < rate < 0.28
    assert all(o in ("", c) for o, c in zip(out, caps))
    assert out == drop_captions(caps, 0.25, torch.Generator().manual_seed(0))  # seeded
    assert out != drop_captions(caps, 0.25, torch.Generator().manual_seed(1))
    assert "" not in drop_captions(caps, 0.0, torch.Generator().manual_seed(0))
    assert set(drop_captions(caps, 1.0, torch.Generator().manual_seed(0))) == {""}


class _RecordingText(torch.nn.Module):
    """A stand-in text tower that records the token ids it receives."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim, self.seen = dim, []
        self.w = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, input_ids):
        self.seen.append(input_ids)
        return type("Out", (), {"last_hidden_state": torch.zeros(*input_ids.shape, self.dim)})()


def test_loss_sends_empty_captions_at_the_configured_rate():
    from rslib.models.base import build_unet

    cfg = _cfg()
    tok = clip_tokenizer()
    text = _RecordingText(16)
    model = StageOneModel(build_unet(cfg, 16), text)
    n, h = 64, 8
    batch = {"mean": torch.zeros(n, 4, h, h), "std": torch.ones(n, 4, h, h),
             "captions": [["a river.", "a port."] for _ in range(n)]}
    empty = tokenize(tok, [""])[0]
    rates = []
    for p in (0.0, 0.5, 1.0):
        StageOneLoss(tok, 0.5, p)(model, batch, torch.Generator().manual_seed(0))
        ids = text.seen[-1]
        rates.append(float((ids == empty).all(1).float().mean()))
    assert rates[0] == 0.0 and rates[2] == 1.0 and 0.3 < rates[1] < 0.7


def test_loss_weighting_scales_each_sample_by_its_clamped_inverse_snr():
    """Above 1, x0_weight_max multiplies each sample's noise MSE by clamp(1/SNR(t), 1, x0_weight_max)."""
    from rslib.models.base import build_unet

    cfg = _cfg()
    tok = clip_tokenizer()
    torch.manual_seed(0)
    model = StageOneModel(build_unet(cfg, 16), _RecordingText(16))
    n, h = 16, 8
    batch = {"mean": torch.randn(n, 4, h, h), "std": torch.ones(n, 4, h, h) * 0.1, "captions": [["a river."]] * n}
    losses = {w: StageOneLoss(tok, 0.5, 0.0, x0_weight_max=w)(model, batch, torch.Generator().manual_seed(3))
              for w in (1.0, 5.0)}
    # same generator, same draws: only the weights differ (1 <= weight <= 5, above 1 at the noisy steps)
    assert losses[5.0] > losses[1.0]
    assert losses[5.0] <= 5.0 * losses[1.0]


def test_missing_sd_folder_at_paper_preset(inputs, tmp_path):
    cfg = get_preset("paper", **{"unet.pretrained": str(tmp_path / "no-such-sd")})
    with pytest.raises(FileNotFoundError, match="unet.pretrained"):
        train_stage_one(cfg, *inputs, tmp_path / "out", progress=False)


def test_missing_inputs_name_the_notebook(tmp_path):
    cfg = get_preset("smoke", runs_dir=str(tmp_path / "runs"))
    with pytest.raises(FileNotFoundError, match="notebook 01"):
        train_stage_one(cfg, out_dir=tmp_path / "out", progress=False)


def test_work_dir_keeps_only_work_started_with_the_same_stamp(tmp_path):
    """Every stage resumes only a checkpoint of its own settings and inputs."""
    from rslib.train.stage import prepare_work_dir as fresh_work_dir

    work = tmp_path / "training"
    fresh_work_dir(work, {"steps": 4})
    (work / "checkpoint").mkdir()
    fresh_work_dir(work, {"steps": 4})
    assert (work / "checkpoint").is_dir()  # same settings: the interrupted run resumes
    fresh_work_dir(work, {"steps": 4}, force=True)
    assert not (work / "checkpoint").exists()
    (work / "checkpoint").mkdir()
    fresh_work_dir(work, {"steps": 8})
    assert not (work / "checkpoint").exists()  # other settings: start afresh
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "checkpoint").mkdir()  # a work folder that recorded no stamp
    fresh_work_dir(tmp_path / "old", {"steps": 8})
    assert not (tmp_path / "old" / "checkpoint").exists()


def test_renoising_keeps_more_of_the_image_at_lower_strength(resumed):
    cfg, out, _ = resumed
    pipe = load_stage_one(out, "cpu")
    torch.nn.init.zeros_(pipe.unet.conv_out.weight)  # predicts no noise: DDIM then only rescales what it is given
    torch.nn.init.zeros_(pipe.unet.conv_out.bias)
    c = pipe.vae.config.latent_channels  # an encoder as sure of its latents as a trained one (posterior std ~ 0)
    pipe.vae.quant_conv.bias.data[c:] = -30.0
    images = torch.rand(3, 3, cfg.data.image_size, cfg.data.image_size) * 2 - 1
    prompts = ["an aerial image of a river."] * 3
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mode()
        recon = pipe.vae.decode(latents).sample.clamp(-1, 1)
    pipe.vae.register_to_config(scaling_factor=1.0 / float(latents.std()))  # unit variance, as train_autoencoder sets
    recon = ((recon + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    err = {}
    logged = logging.handlers.BufferingHandler(10_000)  # what diffusers logs (it does not propagate to pytest's)
    logging.getLogger("diffusers").addHandler(logged)
    try:
        runs = {s: renoise_stage_one(pipe, images, prompts, cfg, strength=s, seed=3, steps=10) for s in (0.1, 1.0)}
    finally:
        logging.getLogger("diffusers").removeHandler(logged)
    # diffusers' licence warning, at every call without requires_safety_checker=False
    assert not [r for r in logged.buffer if "safety checker" in r.getMessage()]
    for s, a in runs.items():
        assert a.shape == (3, cfg.data.image_size, cfg.data.image_size, 3) and a.dtype == np.uint8
        assert np.array_equal(a, renoise_stage_one(pipe, images, prompts, cfg, strength=s, seed=3, steps=10))
        err[s] = np.abs(a - recon).mean()
    assert err[0.1] < 0.5 * err[1.0]  # a little noise barely moves the reconstruction; pure noise replaces it
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="strength"):
            renoise_stage_one(pipe, images, prompts, cfg, strength=bad, seed=3)
    with pytest.raises(ValueError, match="one prompt per image"):
        renoise_stage_one(pipe, images, prompts[:2], cfg, strength=0.5, seed=3)
