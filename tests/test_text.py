"""The offline CLIP tokenizer gives OpenAI CLIP's ids and round-trips through save/load."""
from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from rslib.models import text  # noqa: E402
from rslib.models.text import CLIP_BOS_ID, CLIP_EOS_ID, clip_tokenizer, tokenize  # noqa: E402

SCENES = ["airport", "port", "dense residential", "sparse residential", "industrial area", "farmland",
          "forest", "river", "beach", "desert", "parking lot", "playground", "bridge", "stadium", "harbor"]
OBJECTS = ["airplane", "airplanes", "ship", "ships", "storage tank", "storage tanks", "vehicle", "cars",
           "tennis court", "ground track field", "building", "buildings", "windmill", "runway", "road",
           "roundabout", "overpass", "baseball diamond", "swimming pool", "container yard"]
ADJECTIVES = ["large", "small", "white", "dark green", "bare", "curved", "parallel", "dense", "sparse",
              "rectangular", "circular", "cloudy", "snow-covered", "well-organized", "L-shaped"]
PLACES = ["in the upper left", "at the bottom right", "in the center", "near the river", "on the left side",
          "along the coast", "to the north", "beside the highway", "on the apron", "at the top"]
WORDS = ["Many", "Some", "A FEW", "Several", "Lots of", "There are", "We can see", "It's", "there's", "I'd say"]
EXTRAS = ["", ".", "!", "?", ",", " ;", ":", " (GSD 0.5m)", " - 2019-07-14", " 3.75 km", " #12", " 45%",
          " [cloud cover: 20%]", " lat=34.05, lon=-118.24", " ...", " café São Paulo", "'s", " x2 & x3",
          " \"quoted\"", " a/b", " 1,234", " 99th"]


def _captions(n: int, seed: int = 0) -> list[str]:
    """Varied RS-style captions: words, numbers, punctuation, capitals, odd spacing, long ones."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        parts = [rng.choice(WORDS), str(rng.randint(0, 3000)) if rng.random() < 0.5 else "",
                 rng.choice(ADJECTIVES), rng.choice(OBJECTS), rng.choice(PLACES),
                 "of the", rng.choice(SCENES) + rng.choice(EXTRAS)]
        cap = " ".join(p for p in parts if p)
        if i % 7 == 0:
            cap = cap.upper()
        if i % 11 == 0:
            cap = cap.replace(" ", "   ", 2).replace(" ", "\n", 1) + "\t "
        if i % 5 == 0:  # long: gets truncated at 77 tokens
            cap = " and ".join([cap] + [f"{rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
                                        for _ in range(rng.randint(3, 12))])
        out.append(cap)
    return out + ["", "a", "   ", "12345678901234567890"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private RSLIB_CACHE for this module."""
    root = tmp_path_factory.mktemp("rslib_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RSLIB_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tok(cache):
    """The tokenizer, built once into the private cache."""
    return clip_tokenizer()


def _assert_matches_open_clip(ids: torch.Tensor, ref: torch.Tensor, caps: list[str]) -> int:
    """Same tokens up to the end token; SD pads with the end token where open_clip pads with 0."""
    truncated = 0
    for row, (a, b) in enumerate(zip(ids, ref)):
        end = int((b == CLIP_EOS_ID).nonzero()[0])
        assert torch.equal(a[: end + 1], b[: end + 1]), caps[row]
        assert (a[end + 1 :] == CLIP_EOS_ID).all(), caps[row]
        assert (b[end + 1 :] == 0).all()
        truncated += end == len(b) - 1
    return truncated


def test_ids_match_open_clip(tok):
    caps = _captions(300)
    ids = tokenize(tok, caps, 77)
    assert ids.dtype == torch.long and ids.shape == (len(caps), 77)
    assert (ids[:, 0] == CLIP_BOS_ID).all()
    truncated = _assert_matches_open_clip(ids, open_clip.tokenize(caps, context_length=77), caps)
    assert 20 < truncated < len(caps)  # long captions were cut, keeping the end token


def test_other_length_and_specials(tok):
    caps = _captions(40, seed=1)
    ids = tokenize(tok, caps, max_length=24)
    assert ids.shape == (len(caps), 24)
    _assert_matches_open_clip(ids, open_clip.tokenize(caps, context_length=24), caps)
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77
    assert clip_tokenizer(max_length=32).model_max_length == 32
    assert torch.equal(tokenize(tok, "Three SHIPS in a Harbor"), tokenize(tok, ["three ships in a harbor"]))
    assert tokenize(tok, "a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_save_pretrained_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tokenizer")
    again = type(tok).from_pretrained(tmp_path / "tokenizer")
    assert type(again) is type(tok) and again.model_max_length == 77
    caps = _captions(50, seed=2)
    assert torch.equal(tokenize(again, caps, 77), tokenize(tok, caps, 77))


def test_cache_is_built_once_and_reused(cache, tok, monkeypatch):
    folder = cache / "clip_tokenizer"
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.json"]
    assert [p.name for p in cache.iterdir()] == ["clip_tokenizer"]  # no temp folder left behind
    stamp = (folder / "vocab.json").stat().st_mtime_ns

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("the cached vocabulary was rebuilt")

    monkeypatch.setattr(text, "clip_vocab_and_merges", must_not_rebuild)
    assert clip_tokenizer().convert_tokens_to_ids("ship</w>") == tok.convert_tokens_to_ids("ship</w>")
    assert (folder / "vocab.json").stat().st_mtime_ns == stamp


def test_stable_diffusion_pipeline_accepts_it(tok, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=16))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=4, norm_num_groups=8)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=diffusers.DDPMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    assert type(loaded.tokenizer) is type(tok)
    caps = _captions(20, seed=3)
    assert torch.equal(tokenize(loaded.tokenizer, caps, 77), tokenize(tok, caps, 77))
