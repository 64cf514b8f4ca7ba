"""Evaluate a folder of generated images against a folder of real ones: every measure that applies.

Both folders are in the record format (``metadata.jsonl`` + images, as :mod:`rslib.data.records` writes):
a generated record keeps the captions, metadata, objects and condition maps it was generated *from*.

==========================  ===========================================================  ===================
key                         measure                                                      needs
==========================  ===========================================================  ===================
fid_rsclip, kid_rsclip_*    FID / KID in the RS-CLIP image-feature space                 ``clip``
clip_score                  CLIPScore of each image with its first caption               ``clip``
fid_inception, inception_*  FID and Inception Score with InceptionV3 (torchmetrics)      ``inception`` file
miou, road_iou, iou_*       segmenter on generated images vs the requested maps          ``segmenter`` + maps
edge_f1, edge_f1_lines      Canny edges vs the requested soft-edge / line maps (1 px)    maps
map50, map, map75           YOLOScore: detector on generated images vs their layouts     ``detector`` + boxes
cloud_spearman, cloud_mae   estimated cloud share vs the requested cloud cover           metadata
season_spearman             greenness of vegetation vs SynthRS's green factor            metadata
context_coherence           share of objects on the land cover they belong on            ``segmenter`` + boxes
==========================  ===========================================================  ===================

``real`` holds the same image measures on the real folder (the ceiling a generator can reach) and
``skipped`` says why a measure is missing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rslib.eval.data import EvalSet, load_folder
from rslib.eval.fidelity import (
    cloud_fraction,
    expected_greenness,
    on_context_fraction,
    season_greenness,
    spearman,
    vegetation_mask,
)


def _finite(v: Any) -> Any:
    """NaN / inf -> None (JSON has no NaN), recursively."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def image_measures(data: EvalSet, segmenter: torch.nn.Module | None = None, detector: torch.nn.Module | None = None,
                   skipped: dict[str, str] | None = None) -> dict[str, Any]:
    """The measures of one folder that need no second folder: condition fidelity, YOLOScore, metadata
    adherence and context coherence (whatever the folder's records and the given models allow)."""
    from rslib.eval.detector import detection_map
    from rslib.eval.segmenter import edge_scores, per_class_iou, predict_classes, road_iou
    from rslib.data.conditions import LOVEDA_CLASSES

    skipped = {} if skipped is None else skipped
    out: dict[str, Any] = {}
    images = data.pixel_values()
    pred = predict_classes(segmenter, images) if segmenter is not None else None
    if "segmentation" in data.maps and pred is not None:
        iou = per_class_iou(pred, data.maps["segmentation"])
        out["miou"] = float(iou.nanmean())
        out["iou_per_class"] = {c: float(v) for c, v in zip(LOVEDA_CLASSES, iou)}
    elif "segmentation" not in data.maps:
        skipped["miou"] = "the records have no segmentation maps"
    else:
        skipped["miou"] = "no segmenter given (--segmenter)"
    if pred is not None and ("road" in data.maps or "segmentation" in data.maps):
        road = data.maps["road"] if "road" in data.maps else data.maps["segmentation"] == LOVEDA_CLASSES.index("road")
        out["road_iou"] = road_iou(pred, road)
    if "soft_edges" in data.maps:
        s = edge_scores(images, data.maps["soft_edges"])
        out.update(edge_f1=s["f1"], edge_precision=s["precision"], edge_recall=s["recall"])
    else:
        skipped["edge_f1"] = "the records have no soft_edges maps"
    if "lines" in data.maps:
        out["edge_f1_lines"] = edge_scores(images, data.maps["lines"])["f1"]
    if data.has_objects and detector is not None:
        out.update(detection_map(detector, images, data.targets(), classes=data.classes))
    elif not data.has_objects:
        skipped["map50"] = "the records have no objects"
    else:
        skipped["map50"] = "no detector given (--detector)"
    if data.has_objects and pred is not None:
        ctx = on_context_fraction(pred, data.boxes, data.labels, data.classes, per_class=True)
        out["context_coherence"] = ctx.pop("all")
        out["context_per_class"] = ctx
    elif data.has_objects:
        skipped["context_coherence"] = "no segmenter given (--segmenter)"
    meta = data.metadata
    cover = [m.get("cloud_cover") for m in meta]
    if sum(c is not None for c in cover) >= 2:
        est = cloud_fraction(images)
        want = torch.tensor([float("nan") if c is None else float(c) / 100 for c in cover])
        ok = ~want.isnan()
        out["cloud_spearman"] = spearman(est[ok], want[ok])
        out["cloud_mae"] = float((est[ok] - want[ok]).abs().mean())
    else:
        skipped["cloud_spearman"] = "the records have no cloud_cover"
    green_want = expected_greenness(meta)
    if int((~green_want.isnan()).sum()) >= 2:
        if "segmentation" in data.maps:
            mask = vegetation_mask(data.maps["segmentation"])  # where vegetation was asked for
        elif pred is not None:
            mask = vegetation_mask(pred)
        else:
            mask = None
        out["season_spearman"] = spearman(season_greenness(images, mask), green_want)
    else:
        skipped["season_spearman"] = "the records have no month, day and latitude"
    return out


def evaluate_folders(generated: str | os.PathLike, real: str | os.PathLike, clip: str | os.PathLike | None = None,
                     segmenter: str | os.PathLike | None = None, detector: str | os.PathLike | None = None,
                     inception: str | os.PathLike | None = None, size: int | None = None,
                     limit: int | None = None, kid_subset_size: int = 1000) -> dict[str, Any]:
    """Every measure that applies to ``generated`` against ``real`` (see the module docstring for the keys)."""
    t0 = time.perf_counter()
    gen = load_folder(generated, size, limit=limit)
    ref = load_folder(real, gen.size, limit=limit)
    results: dict[str, Any] = {"generated": str(gen.root), "real": str(ref.root), "n_generated": len(gen),
                               "n_real": len(ref), "image_size": gen.size}
    skipped: dict[str, str] = {}
    gen_images, real_images = gen.pixel_values(), ref.pixel_values()
    if clip is not None:
        from rslib.eval.metrics import clip_score, fid_from_features, kid_from_features
        from rslib.models.text import encode_images, load_rs_clip

        model, tokenizer = load_rs_clip(clip)
        fg, fr = encode_images(model, gen_images), encode_images(model, real_images)
        results["fid_rsclip"] = fid_from_features(fr, fg)
        results["kid_rsclip_mean"], results["kid_rsclip_std"] = kid_from_features(fr, fg, subset_size=kid_subset_size)
        if any(gen.captions):
            results["clip_score"] = clip_score(model, tokenizer, gen_images, gen.captions)
        else:
            skipped["clip_score"] = "the generated records have no captions"
        real_clip = clip_score(model, tokenizer, real_images, ref.captions) if any(ref.captions) else None
    else:
        skipped["fid_rsclip"] = skipped["clip_score"] = "no RS-CLIP folder given (--clip)"
        real_clip = None
    if inception is not None:
        from rslib.eval.metrics import inception_scores

        results.update(inception_scores(real_images, gen_images, inception))
    else:
        skipped["fid_inception"] = "no InceptionV3 weights file given (--inception)"
    seg_model = det_model = None
    if segmenter is not None:
        from rslib.models.segmenter import load_segmenter

        seg_model = load_segmenter(segmenter)
    if detector is not None:
        from rslib.models.detector import load_detector

        det_model = load_detector(detector)
    results.update(image_measures(gen, seg_model, det_model, skipped))
    results["real"] = image_measures(ref, seg_model, det_model, {})
    if real_clip is not None:
        results["real"]["clip_score"] = real_clip
    results["skipped"] = {k: v for k, v in skipped.items() if k not in results}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    return _finite(results)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m rslib.eval --generated DIR --real DIR --out results.json [...]``: evaluate and write JSON."""
    p = argparse.ArgumentParser(prog="python -m rslib.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--generated", required=True, help="folder of generated images (record format)")
    p.add_argument("--real", required=True, help="folder of real images (record format)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--clip", help="RS-CLIP folder (FID/KID in its feature space, CLIPScore)")
    p.add_argument("--segmenter", help="trained segmenter folder (mIoU, road IoU, context coherence)")
    p.add_argument("--detector", help="trained detector folder (YOLOScore mAP)")
    p.add_argument("--inception", help="local InceptionV3 weights file (FID and Inception Score, torchmetrics)")
    p.add_argument("--size", type=int, help="resize images to this side (default: the generated images' size)")
    p.add_argument("--limit", type=int, help="use only the first N records of each folder")
    args = p.parse_args(argv)
    for name in ("generated", "real"):
        folder = Path(getattr(args, name))
        if not (folder / "metadata.jsonl").is_file():
            p.error(f"--{name} {folder}: no metadata.jsonl there (a folder in the record format is needed)")
    results = evaluate_folders(args.generated, args.real, args.clip, args.segmenter, args.detector, args.inception,
                               args.size, args.limit)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}: " + ", ".join(f"{k}={v:.4g}" for k, v in results.items()
                                       if isinstance(v, float) and k != "seconds"), file=sys.stderr)
    return results
