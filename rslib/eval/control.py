"""How well CRS-Diff follows each control, measured on held-out SynthRS conditions (notebook 03, table (b) of 05).

For a setting (a subset of the six maps, with or without metadata and content image) the test split's
conditions are turned into images, which are then scored against the very conditions they came from:

* **road IoU** and **mIoU**: a segmenter trained on real images (:mod:`rslib.eval.segmenter`) labels the
  generated image; its road class is compared with the road mask given, its 7 LoveDA classes with the
  segmentation map given;
* **edge F1**: Canny edges of the generated image against the soft-edge map given (1-px tolerance);
* **FID** (RS-CLIP image features) against the real test images and **CLIPScore** against the captions.

The same measures on the real test images give the ceiling; on text-only generations (no map at all) they give
the floor, since nothing told the model where the roads are. A latent model can draw no more than its
autoencoder decodes, so the real images passed through the pipeline's autoencoder give the ceiling of any
latent model built on it: at the cpu preset a 4-px road does not survive the autoencoder everywhere.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rslib.data.datasets import segmentation_to_classes
from rslib.data.records import CONDITION_NAMES
from rslib.eval import metrics
from rslib.eval.segmenter import edge_f1, iou_from_confusion, mean_iou, miou, predict_classes, road_iou
from rslib.models.segmenter import NUM_CLASSES, ROAD

ROAD_CHANNEL = 3 * CONDITION_NAMES.index("road")
EDGE_CHANNEL = 3 * CONDITION_NAMES.index("soft_edges")

# name -> (maps kept, metadata given, content image given); maps None = the frozen stage-one model
AUTOENCODER_ROW = "real through the autoencoder"
SETTINGS: dict[str, tuple[tuple[str, ...] | None, bool, bool]] = {
    "text only": (None, False, False),
    **{name: ((name,), False, False) for name in CONDITION_NAMES},
    "all six maps": (CONDITION_NAMES, False, False),
    "all + metadata + content": (CONDITION_NAMES, True, True),
}


def targets(test: Mapping[str, Any], n: int) -> dict[str, torch.Tensor]:
    """What generations are scored against: road mask, segmentation classes, soft edges of the first n items."""
    cond = test["conditions"][:n].float() / 255.0  # (n, 18, S, S)
    return {"road": cond[:, ROAD_CHANNEL] > 0.5, "segmentation": segmentation_to_classes(cond),
            "soft_edges": cond[:, EDGE_CHANNEL]}


def fidelity(images: torch.Tensor, target: Mapping[str, torch.Tensor], segmenter: torch.nn.Module,
             ci_seed: int | None = None) -> dict[str, Any]:
    """Road IoU, mIoU and edge F1 of images (n, 3, S, S) in [-1, 1] against the maps they were asked to follow;
    with ``ci_seed``, also the bootstrap 95% intervals of road IoU and mIoU (``ci``, :func:`fidelity_intervals`)
    from the same segmentation."""
    pred = predict_classes(segmenter, images)
    out: dict[str, Any] = {"road_iou": road_iou(pred, target["road"]), "miou": miou(pred, target["segmentation"]),
                           "edge_f1": edge_f1(images, target["soft_edges"])}
    if ci_seed is not None:
        out["ci"] = fidelity_intervals(pred, target, seed=ci_seed)
    return out


def fidelity_intervals(pred: torch.Tensor, target: Mapping[str, torch.Tensor], n_boot: int = 1000,
                       seed: int = 0) -> dict[str, list[float]]:
    """Bootstrap 95% intervals over the items of :func:`fidelity`'s road IoU and mIoU, from the segmenter's
    classes ``pred`` (n, H, W) (each redraw pools the pixels of its items, as the measures do)."""
    road_pred, road = pred == ROAD, target["road"].bool()
    inter = (road_pred & road).flatten(1).sum(1).double()
    union = (road_pred | road).flatten(1).sum(1).double()
    cms = torch.stack([metrics.confusion_matrix(p.flatten(), t.flatten(), NUM_CLASSES)
                       for p, t in zip(pred, target["segmentation"])])  # (n, C, C)

    def road_iou_of(idx: np.ndarray) -> float:
        u = union[torch.from_numpy(idx)].sum()
        return float(inter[torch.from_numpy(idx)].sum() / u) if u > 0 else float("nan")

    def miou_of(idx: np.ndarray) -> float:
        return mean_iou(iou_from_confusion(cms[torch.from_numpy(idx)].sum(0)))

    n = len(pred)
    return {"road_iou": metrics.bootstrap_interval(road_iou_of, n, resamples=n_boot, seed=seed),
            "miou": metrics.bootstrap_interval(miou_of, n, resamples=n_boot, seed=seed)}


def generate_setting(pipe: Any, test: Mapping[str, Any], setting: tuple[tuple[str, ...] | None, bool, bool],
                     n: int, seed: int, **kw: Any) -> torch.Tensor:
    """Generate the first n test items under one setting: (maps, with metadata, with content image)."""
    from rslib.pipelines.crs_diff import sample_crs_diff

    maps, with_meta, with_content = setting
    prompts = [c[0] for c in test["captions"][:n]]
    meta = (test["metadata"][:n], test["metadata_valid"][:n]) if with_meta else None
    content = test["content"][:n] if with_content else None
    return sample_crs_diff(pipe, prompts, seed, conditions=test["conditions"][:n], maps=maps, metadata=meta,
                           content_images=content, **kw)


def evaluate_settings(pipe: Any, test: Mapping[str, Any], clip: Any, tokenizer: Any, segmenter: torch.nn.Module,
                      n: int, seed: int, settings: Mapping[str, tuple] | None = None, autoencoder_row: bool = True,
                      paper_scores: Callable[[torch.Tensor, torch.Tensor, Sequence[str]], dict[str, float]] | None = None,
                      **kw: Any) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """One row of measures per setting, after the real images' row and (when ``pipe`` has a VAE and
    ``autoencoder_row``) the row of the real images passed through it, each row with the bootstrap 95% intervals
    of its road IoU and mIoU (``ci``); returns (rows, generated images by name).
    The last row is the last setting. ``paper_scores`` (:func:`rslib.eval.instruments.crs_diff_paper_scorer`)
    adds the papers' measures to every generated row."""
    extra = paper_scores or (lambda real, gen, prompts: {})
    settings = SETTINGS if settings is None else settings
    target = targets(test, n)
    real = test["pixel_values"][:n]
    prompts = [c[0] for c in test["captions"][:n]]
    rows = [{"setting": "real test images", **fidelity(real, target, segmenter, ci_seed=seed),
             "fid_rsclip": 0.0, "clip_score": metrics.clip_score(clip, tokenizer, real, prompts)}]
    images = {}
    if autoencoder_row and getattr(pipe, "vae", None) is not None:
        from rslib.train.autoencoder import reconstruct

        rec = reconstruct(pipe.vae, real.to(pipe.device)).cpu()
        images[AUTOENCODER_ROW] = rec
        rows.append({"setting": AUTOENCODER_ROW, **fidelity(rec, target, segmenter, ci_seed=seed),
                     "fid_rsclip": metrics.rs_clip_fid(clip, real, rec),
                     "clip_score": metrics.clip_score(clip, tokenizer, rec, prompts), **extra(real, rec, prompts)})
    for name, setting in settings.items():
        t0 = time.perf_counter()
        gen = generate_setting(pipe, test, setting, n, seed, **kw)
        images[name] = gen
        rows.append({"setting": name, **fidelity(gen, target, segmenter, ci_seed=seed),
                     "fid_rsclip": metrics.rs_clip_fid(clip, real, gen),
                     "clip_score": metrics.clip_score(clip, tokenizer, gen, prompts), **extra(real, gen, prompts),
                     "seconds": round(time.perf_counter() - t0, 1)})
    return rows, images


def content_margin_of(images: torch.Tensor, content: torch.Tensor, clip: Any,
                      groups: Sequence[Any] | torch.Tensor | None = None) -> torch.Tensor:
    """Per image (n,): the RS-CLIP image cosine of ``images[i]`` to ``content[i]`` minus its mean cosine to the
    other items' content images, only those of its own group where ``groups`` is given (e.g. the scene type: a
    content image shows another scene of the item's type, which the caption names too, so across scene types the
    caption alone makes a margin). Above 0: each image is closer to its own content image. NaN for an item with
    no other item in its group."""
    n = len(images)
    if n < 2 or len(content) != n:
        raise ValueError(f"need n >= 2 images and one content image each, got {n} images and {len(content)}")
    from rslib.models.text import encode_images

    cos = encode_images(clip, images) @ encode_images(clip, content).T  # (n, n): image i vs content image j
    keys = [0] * n if groups is None else (groups.tolist() if hasattr(groups, "tolist") else list(groups))[:n]
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    g = torch.tensor([index[k] for k in keys])
    others = (g[:, None] == g[None, :]) & ~torch.eye(n, dtype=torch.bool)  # (n, n)
    count = others.sum(1)
    mean_others = (cos * others).sum(1) / count.clamp_min(1)
    return torch.where(count > 0, cos.diag() - mean_others, torch.full((n,), float("nan")))


def _with_field(records: Sequence[Any], n: int, field: str, values: Sequence[float],
                **fixed: float) -> list[dict[str, Any]]:
    """The first n records' metadata with ``field`` set to ``values[i]`` (and ``fixed`` fields overridden)."""
    return [{**dict(r.metadata), **fixed, field: v} for r, v in zip(records[:n], values)]


def metadata_adherence(pipe: Any, test: Mapping[str, Any], records: Sequence[Any], n: int, seed: int,
                       **kw: Any) -> dict[str, Any]:
    """Cloud cover asked vs cloud fraction seen, and month vs vegetation greenness (both Spearman).

    Each of the first n test items is generated with all its maps and its own metadata, except that the cloud
    cover is set to an evenly spread value in 0..100 (first run) or the month runs through the year at latitude
    50 N without clouds (second run). SynthRS draws clouds over the asked fraction and greens vegetation in the
    northern summer, so a model that reads its metadata reproduces both relations. ``cloud_by_brightness``
    repeats the cloud Spearman at several detector brightness thresholds, for the generated images (asked
    cover) and for the same real test images (their own cover): the calibrated threshold suits white clouds only.
    """
    from rslib.eval import fidelity
    from rslib.pipelines.crs_diff import sample_crs_diff

    g = torch.Generator().manual_seed(seed)
    prompts = [c[0] for c in test["captions"][:n]]
    cloud = (torch.randperm(n, generator=g).float() / max(n - 1, 1) * 100).round().tolist()
    gen_c = sample_crs_diff(pipe, prompts, seed, conditions=test["conditions"][:n], maps=CONDITION_NAMES,
                            metadata=_with_field(records, n, "cloud_cover", cloud), **kw)
    seen = fidelity.cloud_fraction(gen_c)
    months = [int(1 + (i * 12) // n) for i in range(n)]
    months = [months[i] for i in torch.randperm(n, generator=g).tolist()]
    gen_m = sample_crs_diff(pipe, prompts, seed + 1, conditions=test["conditions"][:n], maps=CONDITION_NAMES,
                            metadata=_with_field(records, n, "month", months, latitude=50.0, cloud_cover=0), **kw)
    green = fidelity.season_greenness(gen_m)
    summer = [-torch.cos(torch.tensor(2 * torch.pi * (m - 1) / 12)).item() for m in months]  # 1 in July, -1 in January
    real_cover = [float(r.metadata["cloud_cover"]) for r in records[:n]]
    by_brightness = {"brightness": list(fidelity.CLOUD_BRIGHTNESS_SWEEP),
                     "generated": fidelity.cloud_spearman_by_brightness(gen_c, cloud),
                     "real": fidelity.cloud_spearman_by_brightness(test["pixel_values"][:n], real_cover)}
    seen_, green_, cloud_, summer_ = (np.asarray(v, dtype=float) for v in (seen, green, cloud, summer))
    ci = {"cloud_spearman": metrics.bootstrap_interval(lambda i: fidelity.spearman(cloud_[i], seen_[i]), n, seed=seed),
          "season_spearman": metrics.bootstrap_interval(lambda i: fidelity.spearman(summer_[i], green_[i]), n,
                                                        seed=seed)}
    return {"cloud_asked": cloud, "cloud_seen": [float(x) for x in seen], "ci": ci,
            "cloud_spearman": fidelity.spearman(cloud, seen), "cloud_by_brightness": by_brightness,
            "months": months, "greenness": [float(x) for x in green],
            "season_spearman": fidelity.spearman(summer, green), "images_cloud": gen_c, "images_month": gen_m}
