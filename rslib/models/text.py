"""Text side of the models: the CLIP BPE tokenizer (built offline from open_clip's merges) and RS-CLIP.

RS-CLIP is a ``transformers.CLIPModel`` sized by ``cfg.clip``: trained contrastively on RS captions at the small
presets (:func:`rslib.train.text_encoder.train_text_encoder`), read from a local transformers CLIP folder at the
paper preset. Its image features serve the content embedding, CLIPScore and the FID feature space.
"""
from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)

from rslib.config import Preset, resolve_path
from rslib.utils import atomic_write_dir

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
_N_MERGES = 49152 - 256 - 2  # 48894 merges: lines 1..48894 of the open_clip file
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def cache_dir() -> Path:
    """Root of rslib's cache: ``$RSLIB_CACHE`` if set, else ``~/.cache/rslib``."""
    env = os.environ.get("RSLIB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rslib"


def _bpe_merges_path() -> Path:
    """The gzipped BPE merges file that open_clip_torch ships."""
    try:
        from open_clip.tokenizer import default_bpe

        return Path(default_bpe())
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "The CLIP tokenizer is built from open_clip_torch's BPE file: "
            "install open_clip_torch (pip install open_clip_torch)."
        ) from err


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_and_merges(bpe_path: str | os.PathLike | None = None) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (token -> id, 49408 entries) and its 48894 merges, as OpenAI builds them."""
    bpe_path = Path(bpe_path) if bpe_path is not None else _bpe_merges_path()
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]  # line 0 is a version header
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges] + [_BOS, _EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE or vocab[_BOS] != CLIP_BOS_ID or vocab[_EOS] != CLIP_EOS_ID:
        raise RuntimeError(f"{bpe_path} does not give the 49408-token CLIP vocabulary (got {len(vocab)})")
    return vocab, merges


def clip_tokenizer_dir() -> Path:
    """Folder holding ``vocab.json`` and ``merges.txt``; written once (atomically) and reused."""
    folder = cache_dir() / "clip_tokenizer"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    vocab, merges = clip_vocab_and_merges()
    with atomic_write_dir(folder, overwrite=False) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The OpenAI CLIP tokenizer (ids 49406 start, 49407 end and pad), built offline."""
    return CLIPTokenizer.from_pretrained(
        str(clip_tokenizer_dir()),
        model_max_length=max_length,
        pad_token=_EOS,
    )


def tokenize(tokenizer: CLIPTokenizer, texts: str | Sequence[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids (B, max_length), padded with the pad token and truncated (end token kept)."""
    if isinstance(texts, str):
        texts = [texts]
    max_length = max_length or tokenizer.model_max_length
    enc = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return enc.input_ids.long()  # (B, max_length)


# ---------------------------------------------------------------------------
# RS-CLIP: a CLIPModel trained contrastively on RS captions (or a local CLIP folder)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def rs_clip_config(cfg: Preset) -> CLIPConfig:
    """The transformers CLIPConfig of the preset's RS-CLIP (text and vision towers from ``cfg.clip``)."""
    c = cfg.clip
    text = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=c.hidden, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        intermediate_size=4 * c.hidden, max_position_embeddings=c.max_length, projection_dim=c.projection_dim,
        bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID, pad_token_id=CLIP_EOS_ID,
    )
    vision = CLIPVisionConfig(
        image_size=cfg.data.image_size, patch_size=c.patch, hidden_size=c.vision_hidden,
        num_hidden_layers=c.vision_layers, num_attention_heads=c.vision_heads,
        intermediate_size=4 * c.vision_hidden, projection_dim=c.projection_dim,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=c.projection_dim)


def load_clip_folder(path: str | os.PathLike) -> CLIPModel:
    """A CLIPModel from a local transformers folder (``config.json`` + weights); nothing is downloaded.

    Only transformers folders are read (e.g. ``openai/clip-vit-large-patch14`` as saved by
    ``CLIPModel.save_pretrained``); an open_clip checkpoint file must be converted to one first.
    """
    from rslib.models.base import require_local_dir

    root = require_local_dir(path, "CLIP weights", "clip.pretrained")
    if root.is_file():
        raise ValueError(
            f"{root} is a file: clip.pretrained must be a transformers CLIP folder (config.json + weights), e.g. "
            f"one written by CLIPModel.save_pretrained; open_clip checkpoint files are not read directly")
    if not (root / "config.json").is_file():
        raise FileNotFoundError(
            f"{root} has no config.json: clip.pretrained must be a full transformers CLIP folder (text and "
            f"vision towers, e.g. clip-vit-large-patch14), not a Stable Diffusion folder")
    return CLIPModel.from_pretrained(root, local_files_only=True)


def build_rs_clip(cfg: Preset) -> CLIPModel:
    """A fresh RS-CLIP for the preset, or the local CLIP folder ``cfg.clip.pretrained`` (paper preset)."""
    if cfg.clip.pretrained:
        return load_clip_folder(cfg.clip.pretrained)
    return CLIPModel(rs_clip_config(cfg))


def load_rs_clip(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CLIPModel, CLIPTokenizer]:
    """A saved RS-CLIP folder (from ``train_text_encoder``) as (model in eval mode, its tokenizer)."""
    model = load_clip_folder(path).to(device).eval()
    root = resolve_path(path)
    if (root / "vocab.json").is_file() or (root / "tokenizer.json").is_file():
        tok = CLIPTokenizer.from_pretrained(str(root), local_files_only=True)
    else:
        tok = clip_tokenizer(model.config.text_config.max_position_embeddings)
    return model, tok


def normalised_pixels(images: torch.Tensor, size: int, mean: Sequence[float] | torch.Tensor,
                      std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> an image encoder's input (B, 3, size, size): [0, 1], resized (bicubic,
    antialiased) when needed, then normalised by the per-channel ``mean`` and ``std``."""
    x = (images.float() + 1.0) / 2.0  # [0, 1]
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                                            antialias=True).clamp(0, 1)
    mean = torch.as_tensor(mean, device=x.device, dtype=x.dtype).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, device=x.device, dtype=x.dtype).reshape(1, -1, 1, 1)
    return (x - mean) / std


def clip_image_inputs(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> CLIP vision input (B, 3, size, size), CLIP mean/std normalised."""
    return normalised_pixels(images, size, CLIP_MEAN, CLIP_STD)


@torch.no_grad()
def content_embeddings(image_encoder: CLIPVisionModelWithProjection, images: torch.Tensor,
                       batch_size: int = 256, device: torch.device | None = None) -> torch.Tensor:
    """L2-normalised CLIP image embeddings (B, D) of content images in [-1, 1] (B, 3, H, W), computed on ``device``
    (default: where the encoder's weights are)."""
    size = image_encoder.config.image_size
    dev = device if device is not None else next(image_encoder.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        px = clip_image_inputs(images[i:i + batch_size].to(dev), size).to(image_encoder.dtype)
        emb = image_encoder(pixel_values=px).image_embeds  # (b, D)
        out.append(torch.nn.functional.normalize(emb.float(), dim=-1))
    return torch.cat(out)


def text_features(clip: CLIPModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Projected, unnormalised text features (B, D) of token ids (B, L) (with gradients)."""
    pooled = clip.text_model(input_ids=input_ids).pooler_output  # (B, hidden) at the end token
    return clip.text_projection(pooled)  # (B, D)


def image_features(clip: CLIPModel, images: torch.Tensor) -> torch.Tensor:
    """Projected, unnormalised image features (B, D) of images in [-1, 1] (B, 3, H, W) (with gradients)."""
    size = clip.config.vision_config.image_size
    pooled = clip.vision_model(pixel_values=clip_image_inputs(images, size)).pooler_output  # (B, hidden)
    return clip.visual_projection(pooled)  # (B, D)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def encode_text(clip: CLIPModel, tokenizer: CLIPTokenizer, texts: str | Sequence[str],
                batch_size: int = 256) -> torch.Tensor:
    """L2-normalised projected text features (B, D), computed in batches without gradients."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    max_length = min(tokenizer.model_max_length, clip.config.text_config.max_position_embeddings)
    was_training, dev = clip.training, _device_of(clip)
    clip.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        ids = tokenize(tokenizer, texts[i:i + batch_size], max_length).to(dev)  # (b, L)
        out.append(torch.nn.functional.normalize(text_features(clip, ids).float(), dim=-1).cpu())
    clip.train(was_training)
    dim = clip.config.projection_dim
    return torch.cat(out) if out else torch.zeros(0, dim)


@torch.no_grad()
def encode_images(clip: CLIPModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised projected image features (B, D) of images in [-1, 1] (B, 3, H, W), batched, no gradients."""
    was_training, dev = clip.training, _device_of(clip)
    clip.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(dev)
        out.append(torch.nn.functional.normalize(image_features(clip, x).float(), dim=-1).cpu())
    clip.train(was_training)
    dim = clip.config.projection_dim
    return torch.cat(out) if out else torch.zeros(0, dim)
