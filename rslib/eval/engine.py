"""Generated images as training data: the data-engine experiments of both papers (notebook 05, table (d)).

In a low-data regime (the first ``n_real`` real training images), a model is trained on the real images alone
and on the real images plus ``n_gen`` generated ones made from the *same* training annotations, then scored on
the real test split:

* CC-Diff → object detection: layouts of the real training images → generated images, whose targets are the
  layouts themselves (the paper: one synthetic image per DIOR-RSVG training layout, Faster R-CNN);
* CRS-Diff → road extraction / land cover: the training items' condition maps → generated images, labelled with
  the segmentation map they were generated from (the paper's road-extraction experiment).

Three models per experiment, because the paper's protocol mixes two effects. The paper trains every model the
same number of epochs (a 1x schedule), so the model with generated images also takes (n_real + n_gen) / n_real
times the steps. A third model, trained on the real images alone for that many steps, tells the generated
images' effect apart from the longer training's.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from rslib.config import Preset
from rslib.data.datasets import split_dir
from rslib.data.records import read_records
from rslib.eval.data import preset_split
from rslib.train.detector import detector_info, train_detector
from rslib.eval.layout import layouts_of, targets_of
from rslib.train.segmenter import segmenter_info, train_segmenter
from rslib.pipelines.cc_diff import sample_cc_diff


STEPS_FRACTION = 0.25  # the real-only low-data model trains this fraction of the preset's det.steps / seg.steps


def default_real(cfg: Preset) -> int:
    """Real training images of the experiments: on SynthRS the low-data regime, a twentieth of the training split
    (at least 8); on a real data set whose size is its own (``data.n_train`` 0, the paper preset), every record of
    its training split, as the paper trains on every real image."""
    if cfg.data.n_train > 0:
        return max(8, cfg.data.n_train // 20)
    return len(read_records(split_dir(cfg, "train")))


def low_data_preset(cfg: Preset, steps_fraction: float = STEPS_FRACTION, epochs_of: float = 1.0) -> Preset:
    """The preset with the detector's and segmenter's steps scaled for a training set of a few hundred images.

    ``epochs_of``: how many times larger than the real set the training set is; the steps grow by that factor,
    so that every model of the experiment trains the same number of epochs."""
    if not 0 < steps_fraction <= 1:
        raise ValueError(f"steps_fraction must be in (0, 1], got {steps_fraction}")
    if epochs_of < 1:
        raise ValueError(f"epochs_of must be at least 1 (the real set alone), got {epochs_of}")
    f = steps_fraction * epochs_of
    return replace(cfg, det=replace(cfg.det, steps=max(1, round(cfg.det.steps * f))),
                   seg=replace(cfg.seg, steps=max(1, round(cfg.seg.steps * f))))


def _epochs_of(n_real: int, n_gen: int) -> float:
    """How many times larger than the real set the combined training set is."""
    if n_real < 1 or n_gen < 0:
        raise ValueError(f"the data-engine experiments need at least one real image and no negative number of "
                         f"generated ones, got n_real={n_real}, n_gen={n_gen}")
    return (n_real + n_gen) / n_real


def _presets(cfg: Preset, n_real: int, n_gen: int, steps_fraction: float) -> tuple[Preset, Preset]:
    """The real-only model's preset and the longer one (the same epochs over real + generated images); both
    checked before any image is generated."""
    return low_data_preset(cfg, steps_fraction), low_data_preset(cfg, steps_fraction, _epochs_of(n_real, n_gen))


def _runs(short: Preset, long: Preset, n_real: int, n_gen: int, generator: str, train: Callable[..., Path],
          section: str, extra: tuple[Any, Any]) -> list[tuple[str, int, int, Path]]:
    """The experiment's three models: (row name, generated images, steps, folder); ``section`` is "det" (the
    detector) or "seg" (the segmenter)."""
    folder = short.run_dir("engine")
    stem = {"det": "detector", "seg": "segmenter"}[section]
    steps = lambda p: getattr(p, section).steps  # noqa: E731
    return [
        ("real only", 0, steps(short), train(short, folder / f"{stem}_real", real_limit=n_real)),
        (f"real + {generator} (same epochs)", n_gen, steps(long),
         train(long, folder / f"{stem}_real_{generator.lower().replace('-', '')}", real_limit=n_real, extra=extra)),
        (f"real only (as many steps as + {generator})", 0, steps(long),
         train(long, folder / f"{stem}_real_long", real_limit=n_real)),
    ]


def detector_trainability(cfg: Preset, pipe: Any, n_real: int, n_gen: int, seed: int,
                          steps_fraction: float = STEPS_FRACTION) -> list[dict[str, Any]]:
    """mAP, mAP50, mAP75 (%) on the real test split of three detectors: trained on n_real real images
    (``steps_fraction`` of ``det.steps``), on them plus n_gen CC-Diff images generated from the layouts of the
    first n_gen training images (the same number of epochs), and on the real images for as many steps."""
    cfg = cfg.stage_data("cc")
    short, long = _presets(cfg, n_real, n_gen, steps_fraction)
    train = preset_split(cfg, "train", maps=())
    lays = layouts_of(train, n_gen, cfg.cc.max_instances)
    caps = [r.captions[0] if r.captions else "" for r in train.records[:n_gen]]
    gen = sample_cc_diff(pipe, caps, lays, seed, guidance_scale=cfg.cc.guidance_scale, steps=cfg.cc.sample_steps)
    rows = []
    for name, n_extra, steps, path in _runs(short, long, n_real, n_gen, "CC-Diff", train_detector, "det",
                                            (gen, targets_of(lays, train.classes))):
        test = detector_info(path)["test"]
        rows.append({"method": name, "real_images": n_real, "generated_images": n_extra, "steps": steps,
                     "map": 100 * test["map"], "map50": 100 * test["map50"], "map75": 100 * test["map75"]})
    return rows


def road_trainability(cfg: Preset, pipe: Any, n_real: int, n_gen: int, seed: int,
                      steps_fraction: float = STEPS_FRACTION) -> list[dict[str, Any]]:
    """Road IoU and mIoU on the real test split of three segmenters: trained on n_real real images
    (``steps_fraction`` of ``seg.steps``), on them plus n_gen CRS-Diff images generated from the first n_gen
    training items' maps (labelled with their segmentation; the same number of epochs), and on the real images
    for as many steps."""
    cfg = cfg.stage_data("crs")
    short, long = _presets(cfg, n_real, n_gen, steps_fraction)
    from rslib.pipelines.crs_diff import sample_crs_diff
    from rslib.data.datasets import load_split_tensors, split_dataset
    from rslib.data.datasets import segmentation_to_classes
    from rslib.data.records import CONDITION_NAMES

    ds = split_dataset(cfg, "train")
    ds.require_conditions(("segmentation",))  # the labels of the generated images: never all-zero maps
    items = load_split_tensors(ds, n_gen)
    gen = sample_crs_diff(pipe, [c[0] for c in items["captions"]], seed, conditions=items["conditions"],
                          maps=CONDITION_NAMES, guidance_scale=cfg.crs.guidance_scale, steps=cfg.crs.sample_steps)
    labels = segmentation_to_classes(items["conditions"].float() / 255.0)
    rows = []
    for name, n_extra, steps, path in _runs(short, long, n_real, n_gen, "CRS-Diff", train_segmenter, "seg",
                                            (gen, labels)):
        test = segmenter_info(path)["test"]
        rows.append({"method": name, "real_images": n_real, "generated_images": n_extra, "steps": steps,
                     "road_iou": test["road_iou"], "miou": test["miou"]})
    return rows
