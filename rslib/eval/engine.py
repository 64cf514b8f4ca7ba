"""Generated images as training data: the data-engine experiments of both papers (notebook 05, table (d)).

In a low-data regime (the first ``n_real`` real training images), a model is trained on the real images alone
and on the real images plus ``n_gen`` generated ones made from the *same* training annotations, then both are
scored on the real test split:

* CC-Diff → object detection: layouts of the real training images → generated images, whose targets are the
  layouts themselves (the paper: one synthetic image per DIOR-RSVG training layout, Faster R-CNN);
* CRS-Diff → road extraction / land cover: the training items' condition maps → generated images, labelled with
  the segmentation map they were generated from (the paper's road-extraction experiment).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from rslib.config import Preset
from rslib.eval.data import preset_split
from rslib.eval.detector import detector_info, train_detector
from rslib.eval.layout import layouts_of, sample_cc_diff, targets_of
from rslib.eval.segmenter import segmenter_info, train_segmenter


STEPS_FRACTION = 0.5  # the low-data models train this fraction of the preset's det.steps / seg.steps


def default_real(cfg: Preset) -> int:
    """Real training images of the low-data regime: a twentieth of the training split (at least 8)."""
    return max(8, cfg.data.n_train // 20)


def low_data_preset(cfg: Preset, steps_fraction: float = STEPS_FRACTION) -> Preset:
    """The preset with the detector's and segmenter's steps scaled for a training set of a few hundred images."""
    if not 0 < steps_fraction <= 1:
        raise ValueError(f"steps_fraction must be in (0, 1], got {steps_fraction}")
    return replace(cfg, det=replace(cfg.det, steps=max(1, round(cfg.det.steps * steps_fraction))),
                   seg=replace(cfg.seg, steps=max(1, round(cfg.seg.steps * steps_fraction))))


def detector_trainability(cfg: Preset, pipe: Any, n_real: int, n_gen: int, seed: int,
                          steps_fraction: float = STEPS_FRACTION) -> list[dict[str, Any]]:
    """mAP, mAP50, mAP75 (%) on the real test split of detectors trained on n_real real images, without and with
    n_gen CC-Diff images generated from the layouts of the first n_gen training images (both trained
    ``steps_fraction`` of ``det.steps``)."""
    low = low_data_preset(cfg, steps_fraction)  # checked before the generation
    train = preset_split(cfg, "train", maps=())
    lays = layouts_of(train, n_gen, cfg.cc.max_instances)
    caps = [r.captions[0] if r.captions else "" for r in train.records[:n_gen]]
    gen = sample_cc_diff(pipe, caps, lays, seed, guidance_scale=cfg.cc.guidance_scale, steps=cfg.cc.sample_steps)
    runs = {"real only": train_detector(low, cfg.run_dir("engine") / "detector_real", real_limit=n_real),
            "real + CC-Diff": train_detector(low, cfg.run_dir("engine") / "detector_real_ccdiff", real_limit=n_real,
                                             extra=(gen, targets_of(lays, train.classes)))}
    rows = []
    for name, path in runs.items():
        test = detector_info(path)["test"]
        rows.append({"method": name, "real_images": n_real, "generated_images": 0 if name == "real only" else n_gen,
                     "map": 100 * test["map"], "map50": 100 * test["map50"], "map75": 100 * test["map75"]})
    return rows


def road_trainability(cfg: Preset, pipe: Any, n_real: int, n_gen: int, seed: int,
                      steps_fraction: float = STEPS_FRACTION) -> list[dict[str, Any]]:
    """Road IoU and mIoU on the real test split of segmenters trained on n_real real images, without and with
    n_gen CRS-Diff images generated from the first n_gen training items' maps (labelled with their segmentation;
    both trained ``steps_fraction`` of ``seg.steps``)."""
    low = low_data_preset(cfg, steps_fraction)  # checked before the generation
    from rslib.pipelines.crs_diff import sample_crs_diff
    from rslib.train.crs_diff import load_split_tensors, split_dataset
    from rslib.data.datasets import segmentation_to_classes
    from rslib.data.formats import CONDITION_NAMES

    ds = split_dataset(cfg, "train")
    items = load_split_tensors(ds, n_gen)
    gen = sample_crs_diff(pipe, [c[0] for c in items["captions"]], seed, conditions=items["conditions"],
                          maps=CONDITION_NAMES, guidance_scale=cfg.crs.guidance_scale, steps=cfg.crs.sample_steps)
    labels = segmentation_to_classes(items["conditions"].float() / 255.0)
    runs = {"real only": train_segmenter(low, cfg.run_dir("engine") / "segmenter_real", real_limit=n_real),
            "real + CRS-Diff": train_segmenter(low, cfg.run_dir("engine") / "segmenter_real_crsdiff",
                                               real_limit=n_real, extra=(gen, labels))}
    rows = []
    for name, path in runs.items():
        test = segmenter_info(path)["test"]
        rows.append({"method": name, "real_images": n_real, "generated_images": 0 if name == "real only" else n_gen,
                     "road_iou": test["road_iou"], "miou": test["miou"]})
    return rows

