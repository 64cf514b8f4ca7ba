"""Metrics of the text encoder, the autoencoder and the generators.

* retrieval and zero-shot scene classification with RS-CLIP,
* PSNR of reconstructions,
* the Fréchet distance between two feature sets (FID), with RS-CLIP image features at the small presets,
* CLIPScore (100 x cosine of image and caption features, clamped at 0, as torchmetrics computes it),
* the kernel distance (KID) between two feature sets,
* at the paper preset, FID and Inception Score with InceptionV3 from a local weights file (torchmetrics).

Images are tensors in [-1, 1] of shape (B, 3, H, W) throughout.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import CLIPModel, CLIPTokenizer

from rslib.data.synthrs import SCENE_PHRASES
from rslib.models.text import encode_images, encode_text

ZERO_SHOT_TEMPLATE = "an aerial image of {}."


# ---------------------------------------------------------------------------
# Retrieval and zero-shot classification


def similarity_ranks(text_feats: torch.Tensor, image_feats: torch.Tensor,
                     text_to_image: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """Rank (0 = best) of each text's matching image among all images, by cosine similarity (ties count in favour)."""
    t = torch.nn.functional.normalize(text_feats.float(), dim=-1)
    v = torch.nn.functional.normalize(image_feats.float(), dim=-1)
    target = (torch.arange(len(t)) if text_to_image is None
              else torch.as_tensor(text_to_image, dtype=torch.long)).to(t.device)
    if len(target) != len(t) or (len(target) and int(target.max()) >= len(v)):
        raise ValueError(f"{len(t)} texts, {len(v)} images: text_to_image must map every text to an image index")
    sim = t @ v.T  # (T, I)
    true = sim.gather(1, target[:, None])  # (T, 1)
    return (sim > true).sum(1)  # (T,)


def retrieval_recall(text_feats: torch.Tensor, image_feats: torch.Tensor, ks: Sequence[int] = (1, 5),
                     text_to_image: torch.Tensor | Sequence[int] | None = None) -> dict[str, float]:
    """Text -> image recall at k: the share of texts whose image is among the k most similar.

    The i-th text matches the i-th image, or image ``text_to_image[i]`` when given (several captions per image).
    Returns ``{"R@1": ..., "R@5": ...}`` as fractions in [0, 1].
    """
    ranks = similarity_ranks(text_feats, image_feats, text_to_image)
    return {f"R@{k}": float((ranks < k).float().mean()) for k in ks}


def top_k_images(text_feats: torch.Tensor, image_feats: torch.Tensor, k: int = 4) -> torch.Tensor:
    """Indices (T, k) of the k images most similar to each text, best first."""
    t = torch.nn.functional.normalize(text_feats.float(), dim=-1)
    v = torch.nn.functional.normalize(image_feats.float(), dim=-1)
    return (t @ v.T).topk(min(k, len(v)), dim=1).indices


def scene_prompts(scene_names: Sequence[str], template: str = ZERO_SHOT_TEMPLATE) -> list[str]:
    """One prompt per scene: SynthRS names use their caption wording ("a parking lot"), others the name itself."""
    return [template.format(SCENE_PHRASES.get(n, n.replace("_", " "))) for n in scene_names]


@torch.no_grad()
def zero_shot_predict(clip: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor, scene_names: Sequence[str],
                      template: str = ZERO_SHOT_TEMPLATE, batch_size: int = 256) -> torch.Tensor:
    """Scene index (B,) whose prompt is most similar to each image (images in [-1, 1])."""
    text = encode_text(clip, tokenizer, scene_prompts(scene_names, template))  # (S, D)
    image = encode_images(clip, images, batch_size=batch_size)  # (B, D)
    return (image @ text.T).argmax(1)  # (B,)


def zero_shot_scene_accuracy(clip: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor,
                             scene_ids: torch.Tensor | Sequence[int], scene_names: Sequence[str],
                             template: str = ZERO_SHOT_TEMPLATE) -> float:
    """Share of images whose zero-shot scene prediction equals ``scene_ids`` (fraction in [0, 1])."""
    pred = zero_shot_predict(clip, tokenizer, images, scene_names, template)
    target = torch.as_tensor(scene_ids, dtype=torch.long)
    return float((pred == target).float().mean())


def confusion_matrix(pred: torch.Tensor | Sequence[int], target: torch.Tensor | Sequence[int],
                     num_classes: int) -> torch.Tensor:
    """Counts (num_classes, num_classes): row = true class, column = predicted class."""
    pred = torch.as_tensor(pred, dtype=torch.long)
    target = torch.as_tensor(target, dtype=torch.long)
    idx = target * num_classes + pred
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


# ---------------------------------------------------------------------------
# Reconstruction


def psnr_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB (B,) of images in [-1, 1] (clamped to it; peak-to-peak range 2)."""
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    d = x.float().clamp(-1, 1) - y.float().clamp(-1, 1)
    mse = d.pow(2).flatten(1).mean(1).clamp_min(1e-10)  # (B,)
    return 10.0 * torch.log10(4.0 / mse)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over images of the per-image PSNR in dB (images in [-1, 1])."""
    return float(psnr_per_image(x, y).mean())


# ---------------------------------------------------------------------------
# Fréchet distance (FID) and CLIPScore


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (N, D) and (M, D).

    ``|mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2))``, in float64; the trace of the matrix square root is
    the sum of the square roots of the eigenvalues of ``S_r S_f`` (as torchmetrics computes it).
    """
    real, fake = real.detach().double().cpu(), fake.detach().double().cpu()
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need two (N, D) feature sets with the same D, got {tuple(real.shape)}, {tuple(fake.shape)}")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("need at least two samples per set to fit a covariance")
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = torch.cov(real.T), torch.cov(fake.T)  # (D, D), unbiased as torchmetrics
    tr_sqrt = torch.linalg.eigvals(cov_r @ cov_f).sqrt().real.sum()
    fid = (mu_r - mu_f).pow(2).sum() + cov_r.trace() + cov_f.trace() - 2.0 * tr_sqrt
    return float(fid.clamp_min(0.0))


def rs_clip_fid(clip: CLIPModel, real_images: torch.Tensor, fake_images: torch.Tensor) -> float:
    """FID in the RS-CLIP image-feature space (L2-normalised projected features) of two image sets in [-1, 1]."""
    return fid_from_features(encode_images(clip, real_images), encode_images(clip, fake_images))


def clip_scores(clip: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """100 x max(cos(image_i, text_i), 0) per pair (B,) (images in [-1, 1])."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    cos = (encode_images(clip, images) * encode_text(clip, tokenizer, list(texts))).sum(-1)  # (B,)
    return (100.0 * cos).clamp_min(0.0)


def clip_score(clip: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor, texts: Sequence[str]) -> float:
    """CLIPScore: the mean over pairs of :func:`clip_scores`."""
    return float(clip_scores(clip, tokenizer, images, texts).mean())



# ---------------------------------------------------------------------------
# Kernel Inception Distance (in any feature space) and the Inception-network metrics of the paper preset


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                      degree: int = 3, gamma: float | None = None, coef: float = 1.0, seed: int = 0
                      ) -> tuple[float, float]:
    """Kernel distance (KID) between feature sets (N, D) and (M, D): mean and std over random subsets.

    The unbiased MMD^2 with the polynomial kernel ``k(x, y) = (gamma x.y + coef)^degree`` (gamma = 1/D),
    as torchmetrics' KernelInceptionDistance computes it; ``subset_size`` is capped at the smaller set.
    """
    real, fake = real.detach().double().cpu(), fake.detach().double().cpu()
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need two (N, D) feature sets with the same D, got {tuple(real.shape)}, {tuple(fake.shape)}")
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError("need at least two samples per set for the kernel distance")
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    g = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=g)[:m]]
        y = fake[torch.randperm(len(fake), generator=g)[:m]]
        k_xx, k_yy, k_xy = ((gamma * a @ b.T + coef) ** degree for a, b in ((x, x), (y, y), (x, y)))
        mmd = (k_xx.sum() - k_xx.diag().sum() + k_yy.sum() - k_yy.diag().sum()) / (m * (m - 1)) - 2 * k_xy.mean()
        scores.append(mmd)
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))


def rs_clip_kid(clip: CLIPModel, real_images: torch.Tensor, fake_images: torch.Tensor, **kwargs: float
                ) -> tuple[float, float]:
    """KID (mean, std) in the RS-CLIP image-feature space of two image sets in [-1, 1]."""
    return kid_from_features(encode_images(clip, real_images), encode_images(clip, fake_images), **kwargs)


INCEPTION_WEIGHTS_HINT = ("the FID InceptionV3 weights of torch-fidelity, pt_inception-2015-12-05-6726825d.pth "
                          "(download it once on a machine with network access and give its local path)")


def inception_weights_file(path: str | os.PathLike) -> str:
    """The local InceptionV3 weights file, or a FileNotFoundError naming it; torch-fidelity must be installed."""
    from rslib.config import resolve_path

    p = resolve_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"InceptionV3 weights file {p} not found: it should hold {INCEPTION_WEIGHTS_HINT}")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as e:
        raise ImportError("the Inception metrics (FID, IS) need torch-fidelity: pip install torch-fidelity (the "
                          "optional 'paper' extra of this project)") from e
    return str(p)


def inception_fid(feature_extractor_weights_path: str | os.PathLike, feature: int = 2048, **kwargs: Any):
    """torchmetrics FrechetInceptionDistance with InceptionV3 from a local weights file (images in [0, 1], as
    ``normalize=True``); a missing file raises FileNotFoundError naming it."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    path = inception_weights_file(feature_extractor_weights_path)
    return FrechetInceptionDistance(feature=feature, normalize=True, feature_extractor_weights_path=path, **kwargs)


def inception_score_metric(feature_extractor_weights_path: str | os.PathLike, splits: int = 10, **kwargs: Any):
    """torchmetrics InceptionScore on the logits of InceptionV3 from a local weights file (images in [0, 1])."""
    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchmetrics.image.inception import InceptionScore

    path = inception_weights_file(feature_extractor_weights_path)
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                             feature_extractor_weights_path=path)
    return InceptionScore(feature=net, splits=splits, normalize=True, **kwargs)


@torch.no_grad()
def inception_scores(real_images: torch.Tensor, fake_images: torch.Tensor,
                     feature_extractor_weights_path: str | os.PathLike, batch_size: int = 64,
                     splits: int = 10, feature: int = 2048) -> dict[str, float]:
    """FID (on the 2048-d InceptionV3 pool features, as the papers; 64, 192 or 768: earlier layers) and Inception
    Score of images in [-1, 1], from a local weights file."""
    fid = inception_fid(feature_extractor_weights_path, feature)
    iscore = inception_score_metric(feature_extractor_weights_path, splits=min(splits, max(1, len(fake_images))))
    to01 = lambda x: ((x.float().clamp(-1, 1) + 1) / 2)  # noqa: E731
    for i in range(0, len(real_images), batch_size):
        fid.update(to01(real_images[i:i + batch_size]), real=True)
    for i in range(0, len(fake_images), batch_size):
        batch = to01(fake_images[i:i + batch_size])
        fid.update(batch, real=False)
        iscore.update(batch)
    is_mean, is_std = iscore.compute()
    return {"fid_inception": float(fid.compute()), "inception_score": float(is_mean),
            "inception_score_std": float(is_std)}


def mean_interval(values: Sequence[float] | torch.Tensor | np.ndarray, **kwargs: Any) -> list[float]:
    """:func:`bootstrap_interval` of the mean of per-item values."""
    v = torch.as_tensor(values).double().cpu().numpy()
    return bootstrap_interval(lambda idx: float(v[idx].mean()), len(v), **kwargs)


def bootstrap_interval(statistic: Callable[[np.ndarray], float], n: int, resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval ``[low, high]`` of a measure over n items: ``statistic(indices)`` on
    ``resamples`` draws of n item indices with replacement (draws where it is undefined, NaN, are left out)."""
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)], dtype=float)
    draws = draws[np.isfinite(draws)]
    if n < 1 or not len(draws):
        return [float("nan"), float("nan")]
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]
