"""The paper preset end to end on real-format data: tiny copies of RSICD, fMoW, DIOR (+ DIOR-R), DIOR-RSVG and
DOTA in their published layouts are converted and given condition maps by ``python -m rslib.data`` (stand-in
TorchScript road, depth and segmentation models); then, on stand-in weights in the real formats
(tests/standins.py), stage one trains on RSICD, CRS-Diff on fMoW with its computed maps and content images, and
CC-Diff on DIOR-RSVG (with DIOR-R's oriented boxes), each sampled with the paper's sampler and measured with the
papers' instruments (stand-in files)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from PIL import Image
from safetensors.torch import load_file

import fixtures_real as fx
import standins
from rslib.config import get_preset
from rslib.data.__main__ import main
from rslib.data.datasets import load_split_tensors, split_dataset
from rslib.data.formats import CONDITION_NAMES, METADATA_FIELDS, dataset_info, read_records
from rslib.eval.data import load_folder
from rslib.eval.instruments import cc_diff_clip_score, crs_diff_clip_score
from rslib.eval.layout import layouts_of, sample_cc_diff
from rslib.eval.metrics import inception_scores
from rslib.models.crs_diff import CRSLocalAdapter
from rslib.pipelines.cc_diff import load_cc_diff
from rslib.pipelines.crs_diff import load_crs_diff, sample_crs_diff
from rslib.pipelines.stage_one import load_stage_one, sample_stage_one
from rslib.train import cc_diff as cc_train
from rslib.train import crs_diff as crs_train
from rslib.train.crs_diff import train_crs_diff
from rslib.train import stage_one as stage_one_train
from rslib.train.stage import read_history, stage_stamp, training_info
from rslib.train.stage_one import train_stage_one
from standins import DINO_DIM, UNET_FILE
from test_conditions import save_script

SIZE = 64  # image side of the training data and of the stand-in SD's latents (8 x 8)
FORMATS = ("rsicd", "fmow", "dior", "dior-rsvg", "dota")


def make_fmow_64(root: Path) -> Path:
    """fMoW-rgb at the training size (so the maps reach training unresized): two airports (each the other's
    content image) and a residential sample in train, a lake in val, a port in test."""
    src = root / "fmow-rgb"
    box = [{"box": [8, 8, 32, 24], "category": "airport", "ID": 0}]
    fx.fmow_sample(src, "train", "airport", 0, 0, fx.fmow_json(SIZE, SIZE, box), textured=True)
    fx.fmow_sample(src, "train", "airport", 1, 0, fx.fmow_json(SIZE, SIZE, box, cloud_cover=40), textured=True)
    fx.fmow_sample(src, "train", "multi-unit_residential", 3, 1,
                   fx.fmow_json(SIZE, SIZE, [{"box": [0, 0, 64, 64], "category": "multi-unit_residential", "ID": 3}],
                                timestamp="2016-11-30T08:00:00.250Z", gsd=1.25, cloud_cover=0), textured=True)
    fx.fmow_sample(src, "val", "lake_or_pond", 5, 0,
                   fx.fmow_json(SIZE, SIZE, [{"box": [20, 20, 10, 10], "category": "lake_or_pond", "ID": 5}]),
                   textured=True)
    fx.fmow_sample(src, "test", "port", 9, 0,
                   fx.fmow_json(SIZE, SIZE, [{"box": [3, 3, 6, 6], "category": "port", "ID": 9}]), textured=True)
    return src


def sources(src: Path) -> dict[str, list[str]]:
    """Each data set in its published layout (textured images), as ``convert`` arguments."""
    return {
        "rsicd": ["--src", str(fx.make_rsicd(src, textured=True))],
        "fmow": ["--src", str(make_fmow_64(src))],
        "dior": ["--src", str(fx.make_dior(src, textured=True))],
        "dior-rsvg": ["--src", str(fx.make_dior_rsvg(src, textured=True)), "--dior-r", str(fx.make_dior_r(src))],
        "dota": ["--src", str(fx.make_dota(src, textured=True)), "--tile", "32", "--gap", "8"],
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Stand-in weights (clip/, sd/, dino/, instruments/, condition models) and the five data sets converted
    (data/<format>/) with their condition maps, each through the command line."""
    root = tmp_path_factory.mktemp("paper_real")
    torch.manual_seed(0)
    standins.paper_weights(root, SIZE)
    standins.open_clip_checkpoint(root / "instruments" / "open_clip")
    standins.inception_weights(root / "instruments" / "pt_inception-2015-12-05-6726825d.pth")
    models = [a for kind in ("road", "depth", "segmentation")
              for a in (f"--{kind}-model", save_script(root, kind))]
    for fmt, args in sources(root / "src").items():
        out = root / "data" / fmt
        assert main(["convert", "--format", fmt, *args, "--out", str(out)]) == 0
        assert main(["conditions", "--root", str(out), *models]) == 0
    return root


@pytest.fixture(scope="module")
def cfg(root):
    """The paper preset pointed at the stand-ins (tiny module sizes, 2 training and 2 sampling steps per stage) and
    at one data set per paper's stage, as a user sets them: RSICD for stage one (``data.root``), fMoW for CRS-Diff
    (``crs.data_root``), DIOR-RSVG for CC-Diff (``cc.data_root``)."""
    return get_preset("paper", **{
        **standins.paper_overrides(root, SIZE),
        "data.root": str(root / "data" / "rsicd"), "crs.data_root": str(root / "data" / "fmow"),
        "cc.data_root": str(root / "data" / "dior-rsvg"),
        "eval.clip_score_folder": str(root / "clip"),
        "eval.open_clip_checkpoint": str(root / "instruments" / "open_clip" / "open_clip_pytorch_model.bin"),
        "eval.open_clip_model": standins.TINY_OPEN_CLIP,
        "eval.inception_weights": str(root / "instruments" / "pt_inception-2015-12-05-6726825d.pth"),
    })


@pytest.fixture(scope="module")
def stage_one(cfg, root):
    """Stage one trained on the converted RSICD, with the captions it was trained on."""
    trained_on = []
    latent_dataset = stage_one_train.latent_dataset

    def spy(*args, **kwargs):
        data = latent_dataset(*args, **kwargs)
        trained_on.extend(data.captions)
        return data

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage_one_train, "latent_dataset", spy)
        out = train_stage_one(cfg, progress=False)  # data.root: RSICD
    return out, trained_on


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def file_maps(split: Path, rec) -> np.ndarray:
    """A record's six maps as the files under conditions/ hold them: (18, H, W) uint8."""
    out = []
    for name in CONDITION_NAMES:
        with Image.open(split / rec.conditions[name]) as im:
            arr = np.asarray(im.convert("RGB" if name == "segmentation" else "L"))
        out.append(arr.transpose(2, 0, 1) if arr.ndim == 3 else np.repeat(arr[None], 3, 0))
    return np.concatenate(out)


@dataclass
class Sampled:
    images: torch.Tensor  # (1, 3, SIZE, SIZE) in [-1, 1]
    objects: list[dict]  # the layout they were sampled from


def sample_a_layout(pipe, cfg, data: Path) -> tuple[str, Sampled]:
    """The first training layout with objects (the test splits hold classes the tiny training splits lack), sampled
    with the pipeline's own sampler; checks the images and returns the caption and what was sampled."""
    train = load_folder(data / "train", SIZE, maps=(), classes=pipe.classes)
    layouts = layouts_of(train, len(train), cfg.cc.max_instances)
    i = next(k for k, lay in enumerate(layouts) if lay)
    images = sample_cc_diff(pipe, [train.captions[i]], [layouts[i]], 0, guidance_scale=cfg.cc.guidance_scale,
                            steps=cfg.cc.sample_steps)
    finite_images(images, 1)
    return train.captions[i], Sampled(images, layouts[i])


def finite_images(x: torch.Tensor, n: int) -> None:
    assert tuple(x.shape) == (n, 3, SIZE, SIZE) and torch.isfinite(x).all()
    assert x.min() >= -1 and x.max() <= 1


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_converted_split_has_all_maps_and_content(root, fmt):
    for split in ("train", "val", "test"):
        folder = root / "data" / fmt / split
        if not (folder / "metadata.jsonl").is_file():
            continue
        records = read_records(folder, check_files=True)
        assert records, (fmt, split)
        for rec in records:
            assert set(rec.conditions) == {*CONDITION_NAMES, "content"}
    train = root / "data" / fmt / "train"
    maps = np.stack([file_maps(train, r) for r in read_records(train)])  # (N, 18, H, W)
    assert all(maps[:, 3 * k:3 * k + 3].max() > 0 for k in range(len(CONDITION_NAMES))), fmt  # none is empty


def test_dota_is_tiled(root):
    train = root / "data" / "dota" / "train"
    names = [r.file_name for r in read_records(train)]
    assert len(names) > 2 and all(image_size(train / n) == (32, 32) for n in names)  # 100 x 50 and 40 x 40 cut


def test_stage_one_on_rsicd(cfg, root, stage_one):
    out, trained_on = stage_one
    assert len(read_history(out)) == 2
    train = [name for name, split, _ in fx.RSICD_ENTRIES if split == "train"]
    assert sorted(trained_on) == sorted([s.strip() for s in fx.rsicd_sentences(n)] for n in train)  # five each
    sd = load_file(str(root / "sd" / UNET_FILE))
    tuned = load_file(str(out / UNET_FILE))
    assert 0 < max(float((sd[k] - tuned[k]).abs().max()) for k in sd) < 1e-3  # fine-tuned from SD
    images = sample_stage_one(load_stage_one(out, "cpu"), ["an aerial image of an airport."], cfg, seed=0)
    assert images.shape == (1, SIZE, SIZE, 3) and images.dtype == np.uint8


def test_crs_diff_trains_on_the_fmow_maps_and_content(cfg, root, stage_one, monkeypatch):
    stage_one, _ = stage_one
    fmow = cfg.stage_data("crs")  # what CRS-Diff reads: crs.data_root
    assert fmow.data.root == str(root / "data" / "fmow") and cfg.data.root.endswith("rsicd")
    train = root / "data" / "fmow" / "train"
    records = read_records(train)
    expected = [torch.from_numpy(file_maps(train, r)) for r in records]
    seen_maps, data = [], {}
    features = CRSLocalAdapter.features

    def spy_features(self, conditions):
        seen_maps.append(conditions.detach().clone())
        return features(self, conditions)

    cached = crs_train.cached_training_data

    def spy_cached(*args, **kwargs):
        data["train"] = cached(*args, **kwargs)
        return data["train"]

    monkeypatch.setattr(CRSLocalAdapter, "features", spy_features)
    monkeypatch.setattr(crs_train, "cached_training_data", spy_cached)
    out = train_crs_diff(cfg, progress=False)  # the preset as the user gives it: data.root is stage one's
    assert training_info(out)["stamp"]["data"]["root"] == fmow.data.root

    # content: the other airport's image for each airport, its own for the residential sample; all embedded
    content = {Path(r.file_name).name: Path(r.conditions["content"]).name for r in records}
    airports = sorted(n for n in content if n.startswith("airport"))
    assert content[airports[0]] == airports[1] and content[airports[1]] == airports[0]
    d = data["train"]
    assert bool(d.has_content.all()) and bool((d.content.abs().sum(1) > 0).all())
    assert all(torch.equal(d.conditions[i], expected[i]) for i in range(len(records)))
    assert bool(d.metadata_valid.all()) and len(set(d.metadata[:, METADATA_FIELDS.index("cloud_cover")].tolist())) > 1

    # what reached the adapter: per item each map is the extracted file or zeros (dropped), and some are not zero
    assert len(seen_maps) == 2
    kept = 0
    for batch in seen_maps:
        for item in (batch * 255).round().to(torch.uint8):
            maps = item.view(len(CONDITION_NAMES), 3, SIZE, SIZE)
            match = [e.view(len(CONDITION_NAMES), 3, SIZE, SIZE) for e in expected
                     if all(torch.equal(m, f) or not m.any() for m, f in zip(maps, e.view_as(maps)))]
            assert match, "a training item's maps are neither the extracted ones nor zeros"
            kept += sum(bool(m.any()) for m in maps)
    assert kept > 0

    pipe = load_crs_diff(out, "cpu")
    assert isinstance(pipe.scheduler, DDIMScheduler)  # the paper's sampler
    test = load_split_tensors(split_dataset(fmow, "test"))
    assert bool(test["has_content"].all())
    images = sample_crs_diff(pipe, [test["captions"][0][0]], 0, conditions=test["conditions"][:1],
                             metadata=(test["metadata"][:1], test["metadata_valid"][:1]),
                             content_images=test["content"][:1], guidance_scale=fmow.crs.guidance_scale,
                             steps=fmow.crs.sample_steps)
    finite_images(images, 1)
    score = crs_diff_clip_score(fmow)
    assert score is not None and 0 <= score.score(images, [test["captions"][0][0]]) <= 100
    fid = inception_scores(test["pixel_values"][:1].repeat(2, 1, 1, 1), images.repeat(2, 1, 1, 1),
                           fmow.eval.inception_weights, splits=1, feature=64)
    assert fid["fid_inception"] >= 0 and np.isfinite(fid["fid_inception"]) and np.isfinite(fid["inception_score"])


def test_cc_diff_trains_on_dior_rsvg_global_captions(cfg, root, stage_one, monkeypatch):
    stage_one, _ = stage_one
    rsvg = cfg.stage_data("cc")  # what CC-Diff reads: cc.data_root
    before = load_file(str(stage_one / UNET_FILE))
    tokenized, in_loss = [], []
    tokenize, loss_call = cc_train.tokenize, cc_train.CCDiffLoss.__call__

    def spy_tokenize(tokenizer, texts, *args, **kwargs):
        tokenized.append(list(texts))
        return tokenize(tokenizer, texts, *args, **kwargs)

    def spy_loss(self, model, batch, generator):
        start = len(tokenized)
        result = loss_call(self, model, batch, generator)
        in_loss.extend(t for texts in tokenized[start:] for t in texts)
        return result

    monkeypatch.setattr(cc_train, "tokenize", spy_tokenize)
    monkeypatch.setattr(cc_train.CCDiffLoss, "__call__", spy_loss)
    out = cc_train.train_cc_diff(cfg, progress=False)
    assert training_info(out)["stamp"]["data"]["root"] == rsvg.data.root

    assert dataset_info(root / "data" / "dior-rsvg")["dior_r"]["joined"] > 0  # DIOR-R's oriented boxes
    globals_ = {r.captions[0] for r in read_records(root / "data" / "dior-rsvg" / "train")}
    assert all(c.startswith("This is an aerial image of ") for c in globals_)
    assert len(in_loss) == 2 * 2 * 2 and set(in_loss) <= globals_  # steps x grad_accum x batch, all global

    pipe = load_cc_diff(out, "cpu")
    sd = load_file(str(root / "sd" / UNET_FILE))
    assert all(torch.equal(v, sd[k]) for k, v in pipe.unet.state_dict().items())  # SD itself, frozen
    after = load_file(str(stage_one / UNET_FILE))
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # stage one untouched
    info = training_info(out)
    assert info["image_dim"] == DINO_DIM and info["bank_entries"] > 0  # DINOv2 tokens of the DIOR-RSVG crops
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)  # the paper's sampler

    caption, layout = sample_a_layout(pipe, rsvg, root / "data" / "dior-rsvg")
    clip = cc_diff_clip_score(rsvg)
    assert np.isfinite(clip.global_score(layout.images, [caption]))
    assert np.isfinite(clip.local_score(layout.images, [layout.objects]))


def test_cc_diff_trains_on_dota_tiles(cfg, root):
    dota = replace(cfg, cc=replace(cfg.cc, data_root=str(root / "data" / "dota"))).stage_data("cc")
    out = cc_train.train_cc_diff(dota, out_dir=cfg.run_dir("cc_diff_dota"), progress=False)
    pipe = load_cc_diff(out, "cpu")
    assert pipe.classes == sorted({o.label for r in read_records(root / "data" / "dota" / "train")
                                   for o in r.objects})
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    sample_a_layout(pipe, dota, root / "data" / "dota")


def test_another_data_set_converted_into_the_same_folder_is_other_data(tmp_path):
    """A finished stage and the cached latents count for the data set converted into ``data.root``: converting
    another one there (``--overwrite``) makes them stale, converting the same one again does not."""
    out = tmp_path / "real"
    rsicd, fmow = fx.make_rsicd(tmp_path / "src"), fx.make_fmow(tmp_path / "src")

    def convert_into_root(fmt: str, src: Path) -> dict:
        assert main(["convert", "--format", fmt, "--src", str(src), "--out", str(out), "--overwrite"]) == 0
        return stage_stamp(get_preset("paper", **{"data.root": str(out)}), "unet")

    first = convert_into_root("rsicd", rsicd)
    assert convert_into_root("rsicd", rsicd) == first
    assert convert_into_root("fmow", fmow) != first
