"""Text side of the models: the CLIP BPE tokenizer, built offline from open_clip's merges."""
from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from transformers import CLIPTokenizer

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
