"""CC-Diff training, references and pipeline: the loss falls, resuming is exact, the saved pipeline round-trips,
a fresh adapter reproduces stage one, retrieval never returns the query, the reference bank is seeded."""
from __future__ import annotations

import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPModel, Dinov2Config, Dinov2Model

from rslib.config import get_preset, with_overrides
from rslib.data.datasets import collate
from rslib.models.base import build_sampler, build_unet, build_vae
from rslib.models.cc_diff import CCDiffAdapter
from rslib.models.references import (
    ImageTokenEncoder,
    ReferenceBank,
    crop_objects,
    load_dinov2,
    load_sam_predictor,
    masked_crops,
    phrase_for,
    pool_tokens,
    select_bank,
)
from rslib.models.text import clip_tokenizer, rs_clip_config
from rslib.pipelines.cc_diff import CCDiffPipeline, layout_tensors, load_cc_diff
from rslib.train.cc_diff import (
    LATENTS_CACHE,
    REFERENCES_CACHE,
    CCDiffLoss,
    CCTrainModel,
    build_adapter,
    build_references,
    cached_references,
    cached_training_data,
    references_stamp,
    train_cc_diff,
    train_split,
)
from rslib.train.stage import is_finished, load_stage_one_parts, read_history, training_info, training_settings
from rslib.train.stage_one import load_text_tower, save_pipeline

ADAPTER_FILE = "adapter/diffusion_pytorch_model.safetensors"
LAYOUT = [{"label": "ship", "bbox": [0.1, 0.1, 0.5, 0.4]},
          {"label": "vehicle", "obb": [0.6, 0.6, 0.9, 0.62, 0.88, 0.8, 0.58, 0.78]}]


def _cfg(lr_decay: str = "cosine", **cc):
    return get_preset("smoke", lr_decay=lr_decay, **{f"cc.{k}": v for k, v in cc.items()})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny RS-CLIP and a stage-one pipeline folder (random UNet whose output depends on everything)."""
    root = tmp_path_factory.mktemp("cc_inputs")
    cfg = get_preset("smoke")
    torch.manual_seed(0)
    CLIPModel(rs_clip_config(cfg)).save_pretrained(root / "text_encoder")
    clip_tokenizer(cfg.clip.max_length).save_pretrained(root / "text_encoder")
    text, tok = load_text_tower(root / "text_encoder")
    unet = build_unet(cfg, text.config.hidden_size)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_pipeline(root / "stage_one", unet, build_vae(cfg), text, tok)
    return root / "stage_one", root / "text_encoder"


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    """One 4-step run straight through, one stopped after 2 steps and resumed (same cache of references)."""
    s1, clip = inputs
    root = tmp_path_factory.mktemp("cc_runs")
    cfg = _cfg(steps=4, batch_size=4, checkpoint_every=0, instance_dropout=0.3, caption_dropout=0.3)
    straight = train_cc_diff(cfg, s1, clip, root / "straight", progress=False)
    stopped = train_cc_diff(cfg, s1, clip, root / "resumed", stop_after=2, progress=False)
    assert not is_finished(stopped) and len(read_history(stopped)) == 2
    resumed = train_cc_diff(cfg, s1, clip, root / "resumed", progress=False)
    return cfg, straight, resumed


def _fixed_loss(cfg, s1, clip, root, adapter) -> float:
    """The loss of the whole (tiny) training set with one fixed draw of noise, timesteps and references."""
    parts = load_stage_one_parts(s1)
    ds = train_split(cfg)
    data = cached_training_data(cfg, ds, s1, parts["vae"], root / LATENTS_CACHE)
    bank, data.retrieved = cached_references(cfg, ds, s1, clip, parts, root / REFERENCES_CACHE)
    model = CCTrainModel(parts["unet"], parts["text_encoder"], parts["tokenizer"], adapter, bank.phrases)
    loss_fn = CCDiffLoss(parts["tokenizer"], parts["vae"].config.scaling_factor, bank, 0.0, 0.0)
    with torch.no_grad():
        return float(loss_fn(model, collate([data[i] for i in range(len(data))]),
                             torch.Generator().manual_seed(0))["loss"])


def test_loss_falls(inputs, tmp_path):
    s1, clip = inputs
    cfg = _cfg(steps=24, batch_size=8, lr=1e-2, warmup_steps=0, checkpoint_every=0, lr_decay="constant")
    out = train_cc_diff(cfg, s1, clip, tmp_path / "cc", progress=False)
    losses = [h["loss"] for h in read_history(out)]
    assert len(losses) == 24 and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < np.mean(losses[:8]), losses
    info = training_info(out)
    assert info["mode"] == "cc_diff" and info["parameters"]["total"] > 0 and info["bank_entries"] > 0
    torch.manual_seed(cfg.seed)
    fresh = build_adapter(cfg, load_stage_one_parts(s1)["unet"], info["image_dim"])
    before = _fixed_loss(cfg, s1, clip, tmp_path, fresh)
    after = _fixed_loss(cfg, s1, clip, tmp_path, CCDiffAdapter.from_pretrained(out / "adapter"))
    # the adapter can explain only about a tenth of this random UNet's loss (0.89x after 24 or 48 steps)
    assert after < 0.95 * before, (before, after)


def test_exact_resume(runs):
    _, straight, resumed = runs
    a, b = load_file(str(straight / ADAPTER_FILE)), load_file(str(resumed / ADAPTER_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in read_history(straight)] == [h["loss"] for h in read_history(resumed)]
    assert any(a[k].abs().sum() > 0 for k in a if "to_out" in k)  # the zero-initialised outputs moved


def test_sampling_settings_do_not_retrain(inputs, runs):
    """Changing how a trained adapter is sampled or evaluated reuses it, and the reused folder samples as the
    preset now says; changing how it trains does not."""
    (s1, clip), (cfg, straight, _) = inputs, runs
    before = (straight / "training.json").stat().st_mtime_ns
    sampling = replace(cfg, cc=replace(cfg.cc, guidance_scale=9.0, sample_steps=7, eval_images=99,
                                       negative_prompt="blurry", sampler="euler"))
    assert train_cc_diff(sampling, s1, clip, straight, progress=False) == straight
    assert (straight / "training.json").stat().st_mtime_ns == before  # reused, not retrained
    pipe = load_cc_diff(straight, "cpu")
    assert (pipe.config.guidance_scale, pipe.config.num_inference_steps) == (9.0, 7)
    assert pipe.config.negative_prompt == "blurry" and isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert train_cc_diff(cfg, s1, clip, straight, progress=False) == straight  # and back
    back = load_cc_diff(straight, "cpu")
    assert back.config.guidance_scale == cfg.cc.guidance_scale and isinstance(back.scheduler, DDIMScheduler)
    assert not list(straight.glob("*.tmp-*"))
    assert (straight / "training.json").stat().st_mtime_ns == before
    assert training_settings(sampling.cc) == training_settings(cfg.cc)
    assert training_settings(replace(cfg.cc, lr=cfg.cc.lr / 2)) != training_settings(cfg.cc)


def test_pipeline_round_trip(runs, tmp_path):
    cfg, out, _ = runs
    pipe = load_cc_diff(out, "cpu")
    # the preset's sampling defaults travel with the folder: from_pretrained(...)(prompt) samples as notebook 04 does
    assert (pipe.config.guidance_scale, pipe.config.num_inference_steps, pipe.config.max_instances) == (
        cfg.cc.guidance_scale, cfg.cc.sample_steps, cfg.cc.max_instances)
    args = dict(prompt=["an aerial image of a port.", "a river."], layout=LAYOUT, num_inference_steps=2,
                guidance_scale=3.0, output_type="np")
    a = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    s = cfg.data.image_size
    assert a.shape == (2, s, s, 3) and np.isfinite(a).all()
    pipe.save_pretrained(tmp_path / "again", safe_serialization=True)
    again = CCDiffPipeline.from_pretrained(tmp_path / "again", local_files_only=True)
    again.set_progress_bar_config(disable=True)
    b = again(**args, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(a, b)
    assert torch.equal(pipe.references.fg_tokens, again.references.fg_tokens) and pipe.references.fg_tokens.abs().sum() > 0
    # per-image layouts, and a layout does change the image
    c = pipe(**{**args, "layout": [LAYOUT, []]}, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(c[0], a[0], atol=1e-5)
    d = pipe(**{**args, "layout": None}, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(d[0] - a[0]).max() > 1e-4


def test_fresh_adapter_equals_stage_one(inputs, runs):
    s1, _ = inputs
    cfg, out, _ = runs
    sd = StableDiffusionPipeline.from_pretrained(s1, safety_checker=None, requires_safety_checker=False,
                                                 local_files_only=True)
    sd.set_progress_bar_config(disable=True)
    trained = load_cc_diff(out, "cpu")
    args = dict(prompt=["an aerial image of a port.", "a forest."], num_inference_steps=3, guidance_scale=3.0,
                output_type="np")
    ref = sd(**args, generator=torch.Generator().manual_seed(1)).images
    for mode in ("cc_diff", "gligen"):
        torch.manual_seed(0)
        adapter = build_adapter(with_overrides(cfg, {"cc.mode": mode}), sd.unet, trained.references.config.image_dim)
        pipe = CCDiffPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                              scheduler=build_sampler(), adapter=adapter, references=trained.references)
        pipe.set_progress_bar_config(disable=True)
        got = pipe(**args, layout=[], generator=torch.Generator().manual_seed(1)).images
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    # GLIGEN's gates start closed: an identity even with instances
    got = pipe(**args, layout=LAYOUT, generator=torch.Generator().manual_seed(1)).images
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


def test_layout_errors_name_the_field(runs):
    _, out, _ = runs
    refs = load_cc_diff(out, "cpu").references
    with pytest.raises(ValueError, match=r"layout\[0\]\[0\]\['label'\].*unknown label 'submarine'"):
        layout_tensors([[{"label": "submarine", "bbox": [0, 0, 0.5, 0.5]}]], refs)
    with pytest.raises(ValueError, match=r"layout\[0\]\[1\]\['bbox'\].*x0 < x1"):
        layout_tensors([[LAYOUT[0], {"label": "ship", "bbox": [0.5, 0.1, 0.2, 0.4]}]], refs)
    with pytest.raises(ValueError, match=r"layout\[1\]\[0\]\['bbox'\] must be 4 numbers"):
        layout_tensors([[], [{"label": "ship", "bbox": [0.1, 0.2, 0.3]}]], refs)
    with pytest.raises(ValueError, match=r"\['obb'\] must be normalised"):
        layout_tensors([[{"label": "ship", "obb": [10, 10, 20, 10, 20, 20, 10, 20]}]], refs)
    with pytest.raises(ValueError, match=r"needs a 'bbox'"):
        layout_tensors([[{"label": "ship"}]], refs)
    lay = layout_tensors([LAYOUT, LAYOUT[:1]], refs)
    assert lay["valid"].tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(lay["boxes"][0, 1], torch.tensor([0.58, 0.6, 0.9, 0.8]))


# ---------------------------------------------------------------------------- references


def _bank(pool_owner: list[int], embeds: torch.Tensor) -> ReferenceBank:
    m = len(pool_owner)
    fg_labels = torch.tensor([0, 0, 0, 1])
    return ReferenceBank.build(
        ["ship", "vehicle"], torch.arange(4.0)[:, None, None].expand(4, 2, 3), fg_labels,
        torch.tensor([0, 0, 1, 2]), torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.randn(m, 3, 3), embeds,
        torch.tensor(pool_owner), torch.eye(4))


def test_retrieval_never_returns_the_query():
    torch.manual_seed(0)
    embeds = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    bank = _bank(list(range(6)), embeds)
    top = bank.retrieve(embeds)[:, 0]
    assert top.tolist() == list(range(6))  # without exclusion each image retrieves itself
    top = bank.retrieve(embeds, exclude_images=torch.arange(6))[:, 0]
    assert all(t != i for i, t in enumerate(top.tolist()))
    sims = embeds @ embeds.T - 10 * torch.eye(6)
    assert top.tolist() == sims.argmax(1).tolist()  # the best other scene


def test_training_reference_is_another_instance():
    bank = _bank([0], torch.zeros(1, 4))
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([[0, 1, -1]]).expand(64, -1)
    pick = bank.pick_for_training(labels, torch.zeros(64, dtype=torch.long), g)
    assert set(pick[:, 0].tolist()) == {2}  # image 0 owns entries 0 and 1: only entry 2 is another image's
    assert set(pick[:, 1].tolist()) == {3} and set(pick[:, 2].tolist()) == {-1}
    pick = bank.pick_for_training(labels[:, :1], torch.full((64,), 5), g)
    assert set(pick[:, 0].tolist()) == {0, 1, 2}  # any ship crop for an image outside the bank
    one = ReferenceBank.build(["ship"], torch.ones(2, 1, 3), torch.tensor([0, 0]), torch.tensor([4, 4]),
                              torch.ones(2), torch.zeros(1, 1, 3), torch.zeros(1, 4), torch.tensor([0]), torch.eye(4))
    assert set(one.pick_for_training(torch.zeros(32, 1, dtype=torch.long), torch.full((32,), 4), g)[:, 0].tolist()) \
        == {0, 1}  # only the image's own crops: fall back to them
    a = bank.pick_for_training(labels, torch.full((64,), 5), torch.Generator().manual_seed(3))
    assert torch.equal(a, bank.pick_for_training(labels, torch.full((64,), 5), torch.Generator().manual_seed(3)))
    by_aspect = bank.pick_by_aspect(torch.tensor([[0, 0, 1]]), torch.tensor([[[0, 0, .4, .2], [0, 0, .1, .2],
                                                                               [0, 0, .3, .3]]]))
    assert by_aspect.tolist() == [[1, 2, 3]]  # nearest aspect ratio within the class
    assert torch.equal(bank.fg(torch.tensor([-1, 3])), torch.stack([torch.zeros(2, 3), torch.full((2, 3), 3.0)]))


def test_reference_bank_is_seeded(inputs):
    _, clip_dir = inputs
    cfg = get_preset("smoke")
    ds = train_split(cfg)
    clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True)
    text, tok = load_text_tower(clip_dir)
    bank1, ret1 = build_references(cfg, ds, clip, text, tok)
    bank2, ret2 = build_references(cfg, ds, clip, text, tok)
    assert torch.equal(bank1.fg_tokens, bank2.fg_tokens) and torch.equal(bank1.fg_image, bank2.fg_image)
    assert ret1 == ret2
    assert all(bank1.bg_image[r].item() != i for i, rs in enumerate(ret1) for r in rs)  # never the image itself
    lab, area = [0] * 20 + [1] * 20, torch.rand(40, generator=torch.Generator().manual_seed(0)).tolist()
    chosen = select_bank(lab, area, 2, 4, seed=1)
    assert torch.equal(chosen, select_bank(lab, area, 2, 4, seed=1))
    assert not torch.equal(chosen, select_bank(lab, area, 2, 4, seed=2))
    largest = set(np.argsort(area[:20])[-12:].tolist()) | {20 + i for i in np.argsort(area[20:])[-12:].tolist()}
    assert set(chosen.tolist()) <= largest and len(chosen) == 8
    labels = bank1.fg_labels.tolist()
    assert labels == sorted(labels)  # grouped by class
    assert all(labels.count(c) <= cfg.cc.bank_per_class for c in set(labels))


def test_crops_pooling_phrases_and_dinov2(tmp_path):
    img = torch.zeros(1, 3, 32, 32)
    img[:, :, 8:16, 4:20] = 1.0  # a bright 16 x 8 object
    crop = crop_objects(img, torch.tensor([0]), torch.tensor([[4 / 32, 8 / 32, 20 / 32, 16 / 32]]), 16)
    assert crop.shape == (1, 3, 16, 16) and crop[:, :, 2:-2, 2:-2].min() > 0.99  # the whole box, stretched
    tokens = torch.randn(2, 1 + 16, 5)
    pooled = pool_tokens(tokens, 2)
    assert pooled.shape == (2, 5, 5) and torch.equal(pooled[:, 0], tokens[:, 0])
    torch.testing.assert_close(pooled[:, 1], tokens[:, [1, 2, 5, 6]].mean(1))
    assert phrase_for("ship") == "a ship" and phrase_for("storagetank") == "a storage tank"
    assert phrase_for("airplane") == "an airplane" and phrase_for("Expressway-toll-station") == \
        "an expressway toll station"
    with pytest.raises(FileNotFoundError, match="cc.dino_path"):
        load_dinov2(tmp_path / "missing")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=28)).save_pretrained(tmp_path / "dino")
    enc = ImageTokenEncoder.from_dinov2(load_dinov2(tmp_path / "dino"), input_size=28)
    out = enc(torch.rand(3, 3, 40, 40) * 2 - 1)
    assert out.shape == (3, 5, 32) and enc.dim == 32  # CLS + 2 x 2 patches


class FakeSam:
    """A stand-in with segment_anything's SamPredictor interface: the mask of a box prompt is the box's left half."""

    def __init__(self):
        self.images, self.prompts = [], []

    def set_image(self, image: np.ndarray) -> None:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3  # RGB, H x W x 3
        self.images.append(image.copy())

    def predict(self, box=None, multimask_output=True):
        assert not multimask_output  # one mask per prompt, as upstream
        self.prompts.append(np.asarray(box, dtype=float))
        h, w = self.images[-1].shape[:2]
        x1, y1, x2, y2 = np.round(box).astype(int)
        mask = np.zeros((1, h, w), bool)
        mask[0, y1:y2, x1:(x1 + x2) // 2] = True
        return mask, np.ones(1, np.float32), np.zeros((1, 256, 256), np.float32)


def test_sam_masked_crops_are_black_outside_the_mask():
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    owner = torch.tensor([0, 1, 0])
    boxes = torch.tensor([[4, 8, 20, 24], [8, 8, 24, 24], [16, 0, 32, 16]]) / 32  # 16 x 16 px: 1 px per column
    sam = FakeSam()
    crops = masked_crops(images, owner, boxes, 16, sam)
    plain = crop_objects(images, owner, boxes, 16)
    assert crops.shape == plain.shape == (3, 3, 16, 16)
    assert torch.equal(crops[..., :8], plain[..., :8])  # inside the mask: the crop as it is
    assert (crops[..., 8:] == -1).all()  # outside: black
    assert len(sam.images) == 2  # each image once, as 0-255 RGB
    expected = ((images[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert (sam.images[0] == expected).all()
    np.testing.assert_allclose(np.stack(sam.prompts), [[4, 8, 20, 24], [16, 0, 32, 16], [8, 8, 24, 24]])


def test_reference_bank_with_sam(inputs, monkeypatch):
    import rslib.train.cc_diff as cc

    _, clip_dir = inputs
    clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True)
    text, tok = load_text_tower(clip_dir)

    def no_sam(*_):
        raise AssertionError("SAM is off: no predictor is loaded")

    monkeypatch.setattr(cc, "load_sam_predictor", no_sam)
    cfg = _cfg()
    ds = train_split(cfg)
    plain, retrieved = build_references(cfg, ds, clip, text, tok)
    sam, loaded = FakeSam(), []
    monkeypatch.setattr(cc, "load_sam_predictor", lambda path, device: loaded.append(path) or sam)
    masked, retrieved_sam = build_references(_cfg(sam_checkpoint="weights/sam_vit_b_01ec64.pth"), ds, clip, text, tok)
    assert loaded == ["weights/sam_vit_b_01ec64.pth"]
    assert len(sam.prompts) == len(masked.fg_labels) > 0  # one prompt per bank crop
    assert len(sam.images) == len(set(masked.fg_image.tolist()))  # each of their images once
    assert torch.equal(masked.fg_image, plain.fg_image)  # the same objects, ...
    assert not torch.equal(masked.fg_tokens, plain.fg_tokens)  # ... masked
    assert torch.equal(masked.bg_tokens, plain.bg_tokens) and retrieved_sam == retrieved  # scenes are not masked
    s1 = inputs[0]
    assert "sam_checkpoint" not in references_stamp(cfg, s1, clip_dir)["cc"]  # caches made without SAM stay valid
    stamp = references_stamp(_cfg(sam_checkpoint="weights/sam_vit_b_01ec64.pth"), s1, clip_dir)
    assert stamp["cc"]["sam_checkpoint"].endswith("weights/sam_vit_b_01ec64.pth")


def test_sam_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SAM checkpoint at .*missing.pth: set cc.sam_checkpoint"):
        load_sam_predictor(tmp_path / "missing.pth")
    (tmp_path / "model.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="model.pth: the file name does not say the SAM model type"):
        load_sam_predictor(tmp_path / "model.pth")
    try:
        import segment_anything  # noqa: F401
    except ImportError:
        (tmp_path / "sam_vit_b_01ec64.pth").write_bytes(b"")
        with pytest.raises(ImportError, match=r"pip install 'rslib\[sam\]'"):
            load_sam_predictor(tmp_path / "sam_vit_b_01ec64.pth")


def test_object_loss_weight_weights_only_the_cells_boxes_cover():
    """cc.object_loss_weight w: latent cells inside a kept box count w times, the others once; padding and
    dropped instances change nothing; w = 1 is the plain loss."""
    from rslib.models.base import build_noise_scheduler
    from rslib.train.objective import AdapterTimesteps
    from rslib.models.cc_diff import CCDiffContext

    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])  # top-left quarter; a padded slot
    obb = torch.stack([boxes[..., i] for i in (0, 1, 2, 1, 2, 3, 0, 3)], -1)
    ctx = CCDiffContext(boxes=boxes, obb=obb, valid=torch.tensor([[True, False]]), latent_hw=(8, 8))
    weights = CCDiffLoss(clip_tokenizer(), 1.0, object_loss_weight=4.0).object_weights(ctx, (8, 8))
    assert weights.shape == (1, 1, 8, 8)
    assert torch.allclose(weights[0, 0, :4, :4], torch.full((4, 4), 4.0))
    assert torch.equal(weights[0, 0, 4:, :], torch.ones(4, 8)) and torch.equal(weights[0, 0, :, 4:], torch.ones(8, 4))
    assert CCDiffLoss(clip_tokenizer(), 1.0).object_weights(ctx, (8, 8)) is None
    with pytest.raises(ValueError, match="object_loss_weight"):
        CCDiffLoss(clip_tokenizer(), 1.0, object_loss_weight=0.5)

    steps = AdapterTimesteps(build_noise_scheduler())
    pred, noise, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([10])
    err = (pred - noise).pow(2)
    loss, plain = steps.loss(pred, noise, t, weights)
    assert torch.allclose(plain, err.mean())
    assert torch.allclose(loss, (err * weights).mean())
    assert torch.allclose(steps.loss(pred, noise, t)[0], err.mean())


def test_evaluate_variants_rows_and_kept_statistics(runs, inputs, tmp_path):
    """evaluate_variants gives the real images' row, the autoencoder's (the real images through the pipeline's
    VAE) and one row per pipeline; the statistics it keeps are those of its images, so a paired bootstrap from
    them equals one from a fresh detection and segmentation of the images."""
    from rslib.eval import layout
    from rslib.eval.data import preset_split
    from rslib.models.detector import load_detector
    from rslib.models.segmenter import load_segmenter
    from rslib.models.text import load_rs_clip
    from rslib.train.autoencoder import reconstruct
    from rslib.train.detector import train_detector
    from rslib.train.segmenter import train_segmenter

    cfg, out, _ = runs
    detector = load_detector(train_detector(cfg, tmp_path / "det", progress=False))
    segmenter = load_segmenter(train_segmenter(cfg, tmp_path / "seg", progress=False))
    clip, tok = load_rs_clip(inputs[1])
    data, pipe = preset_split(cfg, "test"), load_cc_diff(out, "cpu")
    args = (data, clip, tok, detector, segmenter, 3, 0, cfg.cc.max_instances)
    rows, images, stats = layout.evaluate_variants({"a": pipe, "b": pipe}, *args, steps=2)
    assert [r["method"] for r in rows] == ["real test images", layout.AUTOENCODER_ROW, "a", "b"]
    lays, real = layout.layouts_of(data, 3, cfg.cc.max_instances), data.pixel_values(slice(0, 3))
    prompts = [r.captions[0] for r in data.records[:3]]
    rec = reconstruct(pipe.vae, real)
    expected = layout.layout_scores(rec, real, prompts, lays, data.classes, clip, tok, detector, segmenter, ci_seed=0)
    assert {k: rows[1][k] for k in expected} == expected
    fresh, of_real = (layout.layout_stats(x, lays, data.classes, detector, segmenter) for x in (images["a"], real))
    np.testing.assert_array_equal(stats["a"].hits, fresh.hits)
    assert layout.paired_bootstrap(stats["a"], of_real, n_boot=50) == layout.paired_bootstrap(fresh, of_real,
                                                                                              n_boot=50)
    assert [r["method"] for r in layout.evaluate_variants({"a": pipe}, *args, autoencoder_row=False, steps=2)[0]] == [
        "real test images", "a"]
