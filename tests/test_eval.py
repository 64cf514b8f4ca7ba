"""Evaluation models and measures: known answers, losses that fall, exact round trips, the CLI."""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torchvision.models.detection.fcos import FCOSRegressionHead

from rslib.config import get_preset
from rslib.data.synthrs import make_scene
from rslib.eval import detector as D
from rslib.eval import fidelity as Fi
from rslib.eval import segmenter as S
from rslib.eval.data import preset_split
from rslib.eval.metrics import inception_fid, inception_score_metric, kid_from_features
from rslib.models import detector as DM
from rslib.models import segmenter as SM
from rslib.train import augment as A
from rslib.train import detector as DT
from rslib.train import segmenter as ST
from rslib.train.stage import training_info


# ---------------------------------------------------------------------------
# Measures on hand-made tensors


def test_miou_and_per_class_iou_known_answer():
    target = torch.tensor([[[0, 0], [1, 1]]])
    pred = torch.tensor([[[0, 1], [1, 1]]])
    iou = S.per_class_iou(pred, target, 7)
    assert iou[0] == pytest.approx(0.5) and iou[1] == pytest.approx(2 / 3)
    assert torch.isnan(iou[2:]).all()  # absent classes do not count
    assert S.miou(pred, target, 7) == pytest.approx((0.5 + 2 / 3) / 2)
    assert S.miou(target, target, 7) == 1.0


def test_road_iou_from_classes_or_mask():
    road = torch.zeros(1, 4, 4, dtype=torch.bool)
    road[0, 1, :] = True  # 4 road pixels
    classes = torch.zeros(1, 4, 4, dtype=torch.long)
    classes[0, 1, :2] = S.ROAD  # 2 of them found
    classes[0, 2, 0] = S.ROAD  # 1 false positive
    assert S.road_iou(classes, road) == pytest.approx(2 / 5)
    assert S.road_iou(road, road.float() * 255) == 1.0  # bool prediction, 0/255 mask
    assert S.road_iou(classes, road.float()) == pytest.approx(2 / 5)
    assert math.isnan(S.road_iou(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4)))


def _step_image(col: int, size: int = 24) -> torch.Tensor:
    """A dark left half and a bright right half meeting at column ``col``: (1, 3, S, S) in [-1, 1]."""
    im = torch.full((1, 3, size, size), -0.8)
    im[..., col:] = 0.8
    return im


def test_edge_f1_known_answers():
    ref = torch.zeros(1, 24, 24)
    ref[0, 3:21, 12] = 1.0  # the true edge, a vertical line
    assert S.edge_f1(_step_image(12), ref) > 0.8
    assert S.edge_f1(_step_image(4), ref) == 0.0  # an edge 8 px away matches nothing
    soft = torch.zeros(1, 24, 24)
    soft[0, 3:21, 11:14] = 0.7  # a soft, 3-px wide edge is thinned before matching
    assert S.edge_f1(_step_image(12), soft) > 0.8
    s = S.edge_scores(_step_image(12), ref, tolerance=0)
    assert s["f1"] <= S.edge_f1(_step_image(12), ref, tolerance=1)
    assert S.edge_f1(torch.zeros(1, 3, 24, 24), ref) == 0.0  # a blank image has no edges


def test_one_conversion_to_uint8_serves_measures_and_figures():
    from rslib.eval.figures import to_uint8 as for_display
    from rslib.utils import to_uint8

    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0]).reshape(1, 1, 1, 7).expand(2, 3, 1, 7)
    assert to_uint8(x)[0, 0, 0].tolist() == [0, 0, 64, 128, 191, 255, 255]
    assert to_uint8(x).shape == x.shape and to_uint8(x).dtype == torch.uint8
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(to_uint8(pixels), pixels)  # uint8 images pass through
    images = torch.rand(2, 3, 5, 5) * 2 - 1
    assert np.array_equal(for_display(images), to_uint8(images).permute(0, 2, 3, 1).numpy())
    assert np.array_equal(for_display(images.numpy()), for_display(images))


def test_spearman_and_kid():
    x = [1.0, 2.0, 3.0, 4.0]
    assert Fi.spearman(x, [10, 20, 30, 40]) == pytest.approx(1.0)
    assert Fi.spearman(x, [4, 3, 2, 1]) == pytest.approx(-1.0)
    from scipy.stats import spearmanr

    a, b = np.random.default_rng(0).normal(size=(2, 50))
    b[:10] = 0.0  # ties
    assert Fi.spearman(a, b) == pytest.approx(spearmanr(a, b).correlation)
    rng = np.random.default_rng(1)
    for n in (5, 17, 40):  # scipy's own value, to the last bit, ties and non-finite pairs left out
        a, b = rng.normal(size=(2, n)).round(1)
        b[0] = np.nan
        assert Fi.spearman(a, b) == spearmanr(a[1:], b[1:]).statistic
    assert math.isnan(Fi.spearman([1, 1, 1], [1, 2, 3]))
    g = torch.Generator().manual_seed(0)
    real, same, shifted = (torch.randn(200, 8, generator=g) for _ in range(3))
    near, _ = kid_from_features(real, same, subsets=10, subset_size=100)
    far, _ = kid_from_features(real, shifted + 1.0, subsets=10, subset_size=100)
    assert abs(near) < 0.1 * far


def test_on_context_fraction_hand_made():
    seg = torch.full((1, 16, 16), 0, dtype=torch.long)  # background ...
    seg[0, :, :8] = Fi._C["water"]  # ... with water on the left half
    ship, vehicle = Fi.OBJECT_CLASSES.index("ship"), Fi.OBJECT_CLASSES.index("vehicle")
    boxes = torch.tensor([[[0.1, 0.4, 0.3, 0.6], [0.6, 0.4, 0.8, 0.6], [0.6, 0.1, 0.7, 0.2], [0, 0, 0, 0]]])
    labels = torch.tensor([[ship, ship, vehicle, -1]])  # on water, on land, on paved ground, padding
    out = Fi.on_context_fraction(seg, boxes, labels, per_class=True)
    assert out["ship"] == 0.5 and out["vehicle"] == 1.0 and out["all"] == pytest.approx(2 / 3)
    assert math.isnan(Fi.on_context_fraction(seg, torch.zeros(1, 0, 4), torch.zeros(1, 0)))


def test_context_rules_hold_on_real_synthrs():
    data = preset_split(get_preset("smoke"), "train", maps=("segmentation",))
    # 0.90 at 32 px: the centre region of a 2-pixel vehicle often covers the neighbouring land cover; objects
    # placed at random would score far lower (water, roads and industrial ground are small fractions of a scene)
    assert Fi.on_context_fraction(data.maps["segmentation"], data.boxes, data.labels) > 0.85


def test_cloud_fraction_grows_with_cloud_cover():
    covers = (0, 20, 40, 60, 80)
    for seed in (1, 2):
        images = torch.stack([torch.from_numpy(make_scene(seed, 64, scene="forest", cloud_cover=c).image)
                              .permute(2, 0, 1) for c in covers])  # (5, 3, 64, 64) uint8
        frac = Fi.cloud_fraction(images)
        assert (frac[1:] > frac[:-1]).all(), frac
        assert frac[0] < 0.02 and abs(float(frac[-1]) - 0.8) < 0.15
        assert torch.equal(frac, Fi.cloud_fraction(images.float() / 127.5 - 1.0))


def test_cloud_spearman_by_brightness_sees_grey_clouds_only_at_low_thresholds():
    covers = [0, 20, 40, 60, 80] * 2
    images = torch.stack([torch.from_numpy(make_scene(seed, 64, scene="forest", cloud_cover=c).image).permute(2, 0, 1)
                          for seed in (1, 2) for c in covers[:5]]).float() / 127.5 - 1.0
    white = Fi.cloud_spearman_by_brightness(images, covers, brightness=(190, 228))
    assert white[0] > 0.9 and white[1] > 0.9, white
    grey = Fi.cloud_spearman_by_brightness(images * 0.7, covers, brightness=(190, 228))  # clouds at <= 217 of 255
    assert grey[0] > 0.9, grey
    assert not grey[1] > 0.5, grey  # NaN (nothing seen) or low: the calibrated threshold misses grey clouds


def test_season_greenness_follows_the_season():
    summer = make_scene(3, 64, scene="forest", month=7, day=15, latitude=50.0, cloud_cover=0).image
    winter = make_scene(3, 64, scene="forest", month=1, day=15, latitude=50.0, cloud_cover=0).image
    images = torch.from_numpy(np.stack([summer, winter])).permute(0, 3, 1, 2)
    g = Fi.season_greenness(images, mask=torch.ones(2, 64, 64, dtype=torch.bool))
    assert g[0] > g[1]
    want = Fi.expected_greenness([{"month": 7, "day": 15, "latitude": 50.0}, {"month": 1, "day": 15, "latitude": 50.0}])
    assert want[0] > want[1]


def test_missing_inception_file_is_named(tmp_path):
    missing = tmp_path / "pt_inception-2015-12-05.pth"
    for build in (inception_fid, inception_score_metric):
        with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05.pth"):
            build(missing)


def test_dihedral_boxes_follow_the_image():
    img = torch.zeros(1, 16, 16)
    img[0, 2:5, 3:10] = 1  # rows 2..4, columns 3..9
    box = torch.tensor([[3, 2, 10, 5]]) / 16
    for k in range(8):
        ys, xs = torch.nonzero(A.dihedral(img, k)[0], as_tuple=True)
        moved = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]) / 16
        assert torch.allclose(A.dihedral_boxes(box, k), moved), k


# ---------------------------------------------------------------------------
# Training the evaluation models at the smoke preset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A segmenter and a detector trained for a few smoke steps (the segmenter for 60: at 30 its loss
    fall depends on the machine's floating-point path, 0.73x here and 0.86x elsewhere)."""
    root = tmp_path_factory.mktemp("eval_models")
    cfg = get_preset("smoke", **{"seg.steps": 60, "seg.lr": 5e-3, "det.steps": 30, "det.batch_size": 8,
                                 "det.lr": 3e-3})
    seg = ST.train_segmenter(cfg, root / "segmenter", progress=False)
    det = DT.train_detector(cfg, root / "detector", progress=False)
    return cfg, seg, det


def _falls(folder, steps: int) -> tuple[float, float]:
    losses = [h["loss"] for h in training_info(folder)["history"]]
    assert len(losses) == steps
    return float(np.mean(losses[:5])), float(np.mean(losses[-5:]))


def test_segmenter_learns_and_round_trips(trained):
    cfg, folder, _ = trained
    first, last = _falls(folder, cfg.seg.steps)
    assert last < 0.8 * first
    model = SM.load_segmenter(folder)
    saved, ckpt = load_file(str(folder / SM.WEIGHTS_FILE)), load_file(str(folder / "training/checkpoint/model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in ckpt.items())  # the final weights, exactly
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    images = preset_split(cfg, "test", maps=()).pixel_values()
    pred = S.predict_classes(model, images)
    assert pred.shape == (len(images), 32, 32) and pred.dtype == torch.long
    assert torch.equal(pred, S.predict_classes(SM.load_segmenter(folder), images))
    info = ST.segmenter_info(folder)
    assert 0.0 <= info["test"]["miou"] <= 1.0 and "road_iou" in info["test"]
    assert ST.train_segmenter(cfg, folder, progress=False) == folder  # finished: reused, not retrained


def test_detector_learns_and_round_trips(trained):
    cfg, _, folder = trained
    first, last = _falls(folder, cfg.det.steps)
    assert last < 0.9 * first
    model = DM.load_detector(folder)
    saved, ckpt = load_file(str(folder / DM.WEIGHTS_FILE)), load_file(str(folder / "training/checkpoint/model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in ckpt.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    test = preset_split(cfg, "test", maps=())
    a, b = D.detect(model, test.pixel_values()), D.detect(DM.load_detector(folder), test.pixel_values())
    assert len(a) == len(test) and all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a, b))
    scores = D.detection_map(model, test.pixel_values(), test.targets())
    assert {"map50", "map", "map75"} <= set(scores) and 0.0 <= scores["map"] <= scores["map50"] <= 1.0


class _Oracle(nn.Module):
    """A stand-in detector that answers with given detections (pixel boxes), batch after batch."""

    def __init__(self, answers: list[dict[str, torch.Tensor]]):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.answers = list(answers)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out, self.answers = self.answers[:len(images)], self.answers[len(images):]
        return out


def test_evaluation_models_do_not_depend_on_earlier_randomness(tmp_path):
    """Two trainings with the same settings give the same weights, whatever the process drew before."""
    cfg = get_preset("smoke", **{"seg.steps": 2, "det.steps": 2})
    weights = []
    for i, junk in enumerate((0, 5)):
        torch.rand(junk)  # an earlier cell used the global generator, or did not
        seg = ST.train_segmenter(cfg, tmp_path / f"seg{i}", progress=False)
        det = DT.train_detector(cfg, tmp_path / f"det{i}", progress=False)
        weights.append((load_file(str(seg / SM.WEIGHTS_FILE)), load_file(str(det / DM.WEIGHTS_FILE))))
    for a, b in zip(*weights):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_box_activation_of_the_detector():
    """relu reproduces torchvision's FCOS regression head exactly; softplus keeps outputs positive and every
    output trainable (relu gives no gradient where the pre-activation is negative); a bad name is refused."""
    det = get_preset("smoke").det
    torch.manual_seed(0)
    feats = [torch.randn(2, det.fpn_channels, 8, 8), torch.randn(2, det.fpn_channels, 4, 4)]
    ours = DM.build_detector(replace(det, box_activation="relu"), 32).head.regression_head
    groups = ours.conv[1].num_groups
    theirs = FCOSRegressionHead(det.fpn_channels, 1, det.head_convs, norm_layer=lambda c: nn.GroupNorm(groups, c))
    theirs.load_state_dict(ours.state_dict())
    for a, b in zip(ours(feats), theirs(feats)):
        assert torch.equal(a, b)
    head = DM.build_detector(det, 32).head.regression_head  # softplus by default
    with torch.no_grad():
        head.bbox_reg.bias.fill_(-5.0)  # pre-activations negative everywhere: relu would be dead
    reg, _ = head(feats)
    assert reg.shape == (2, 80, 4) and (reg > 0).all()
    reg.sum().backward()
    assert head.bbox_reg.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="box_activation"):
        DM.build_detector(replace(det, box_activation="tanh"), 32)


def test_detection_map_perfect_and_empty():
    data = preset_split(get_preset("smoke"), "test", maps=())
    targets, size = data.targets(), data.size
    # COCO mAP counts at most 100 detections per image (a SynthRS parking lot can hold more vehicles)
    keep = [i for i, t in enumerate(targets) if len(t["labels"]) <= 100]
    targets = [targets[i] for i in keep]
    perfect = [{"boxes": t["boxes"] * size, "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}
               for t in targets]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
             for _ in targets]
    images = data.pixel_values(keep)
    best = D.detection_map(_Oracle(perfect), images, targets, min_box_px=0.0)
    assert best["map50"] == pytest.approx(1.0) and best["map"] == pytest.approx(1.0)
    worst = D.detection_map(_Oracle(empty), images, targets, min_box_px=0.0)
    assert worst["map50"] == 0.0 and worst["map"] == 0.0
    # boxes under min_box_px are ignore regions: missing them costs nothing
    small = D.box_sizes(torch.cat([t["boxes"] for t in targets]), size) < 2.0
    assert small.any()
    only_big = [{"boxes": p["boxes"][D.box_sizes(t["boxes"], size) >= 2.0],
                 "labels": p["labels"][D.box_sizes(t["boxes"], size) >= 2.0],
                 "scores": p["scores"][D.box_sizes(t["boxes"], size) >= 2.0]} for p, t in zip(perfect, targets)]
    assert D.detection_map(_Oracle(only_big), images, targets, min_box_px=2.0)["map50"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------
# The command line


def test_cli_writes_the_expected_keys(trained, tmp_path):
    from transformers import CLIPModel

    from rslib.eval.evaluate import main
    from rslib.models.text import clip_tokenizer, rs_clip_config

    cfg, seg, det = trained
    torch.manual_seed(0)
    clip_dir = tmp_path / "clip"
    CLIPModel(rs_clip_config(cfg)).save_pretrained(clip_dir)
    clip_tokenizer(cfg.clip.max_length).save_pretrained(clip_dir)
    out = tmp_path / "results.json"
    root = cfg.synthrs_dir()
    main(["--generated", str(root / "test"), "--real", str(root / "val"), "--out", str(out), "--clip", str(clip_dir),
          "--segmenter", str(seg), "--detector", str(det)])
    res = json.loads(out.read_text())
    expected = {"fid_rsclip", "kid_rsclip_mean", "kid_rsclip_std", "clip_score", "miou", "road_iou", "edge_f1",
                "edge_f1_lines", "map50", "map", "map75", "cloud_spearman", "cloud_mae", "season_spearman",
                "context_coherence", "real", "skipped", "n_generated", "n_real"}
    assert expected <= set(res), expected - set(res)
    assert {"miou", "map50", "edge_f1", "cloud_spearman"} <= set(res["real"])
    assert "fid_inception" in res["skipped"] and res["n_generated"] == cfg.data.n_test
    with pytest.raises(SystemExit):
        main(["--generated", str(tmp_path), "--real", str(root / "val"), "--out", str(out)])


def test_layouts_of_replaces_slivers_and_drops_empty_boxes():
    """Objects clipped to a zero-area oriented box at the border still make a valid pipeline layout."""
    from types import SimpleNamespace

    from rslib.data.formats import ObjectAnnotation
    from rslib.eval.layout import layouts_of, polygon_area

    sliver = ObjectAnnotation("ship", [0.0, 0.2, 0.1, 0.3], [0.0, 0.2, 0.0, 0.3, 0.0, 0.3, 0.0, 0.2])
    empty = ObjectAnnotation("ship", [0.5, 0.5, 0.5, 0.6], [0.5, 0.5, 0.5, 0.6, 0.5, 0.6, 0.5, 0.5])
    good = ObjectAnnotation("airplane", [0.4, 0.4, 0.8, 0.8], [0.4, 0.4, 0.8, 0.4, 0.8, 0.8, 0.4, 0.8])
    data = SimpleNamespace(records=[SimpleNamespace(objects=[sliver, empty, good])], classes=("ship", "airplane"))
    (lay,) = layouts_of(data, 1)
    assert [o["label"] for o in lay] == ["airplane", "ship"]  # largest first, the empty box left out
    assert lay[0]["obb"] == good.obb
    assert lay[1]["obb"] == [0.0, 0.2, 0.1, 0.2, 0.1, 0.3, 0.0, 0.3]  # the sliver's axis-aligned box
    assert all(polygon_area(o["obb"]) > 0 for o in lay)


def test_low_data_preset_scales_only_the_trainability_models_steps():
    """The data-engine experiments train on a twentieth of the training split, for a fraction of the steps of the
    scoring detector and segmenter; nothing else in the preset changes, and a bad fraction is refused."""
    from rslib.eval import engine

    cfg = get_preset("cpu")
    low = engine.low_data_preset(cfg, 0.5)
    assert (low.det.steps, low.seg.steps) == (round(cfg.det.steps / 2), round(cfg.seg.steps / 2))
    assert replace(low, det=cfg.det, seg=cfg.seg) == cfg
    assert replace(low.det, steps=cfg.det.steps) == cfg.det and replace(low.seg, steps=cfg.seg.steps) == cfg.seg
    assert engine.low_data_preset(cfg, 1.0) == cfg
    assert engine.default_real(cfg) == cfg.data.n_train // 20 and engine.default_real(get_preset("smoke")) == 8
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="steps_fraction"):
            engine.low_data_preset(cfg, bad)
    # the model with generated images trains the same number of epochs: 200 real + 100 generated = 1.5x the steps
    longer = engine.low_data_preset(cfg, 0.5, engine._epochs_of(200, 100))
    assert (longer.det.steps, longer.seg.steps) == (round(cfg.det.steps * 0.75), round(cfg.seg.steps * 0.75))
    with pytest.raises(ValueError, match="epochs_of"):
        engine.low_data_preset(cfg, 0.5, 0.5)
    with pytest.raises(ValueError, match="n_real=0"):
        engine._epochs_of(0, 10)


def _layout_case(trained):
    """The test split's layouts, their images, the trained segmenter, and per image the perfect detections (pixel
    boxes, as a detector answers) and none."""
    from rslib.eval import layout

    cfg, seg_dir, _ = trained
    data = preset_split(cfg, "test", maps=())
    lays = layout.layouts_of(data, len(data), cfg.cc.max_instances)
    targets = layout.targets_of(lays, data.classes)
    perfect = [{"boxes": t["boxes"] * data.size, "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}
               for t in targets]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
             for _ in targets]
    return data, lays, targets, data.pixel_values(), SM.load_segmenter(seg_dir), perfect, empty


def test_paired_bootstrap_of_two_variants(trained):
    """The same images twice differ by exactly nothing; perfect detections against none differ by 100 mAP50
    points in every draw; the observed difference is torchmetrics' mAP50; mismatched inputs are refused."""
    from rslib.eval import layout

    data, lays, targets, images, segmenter, perfect, empty = _layout_case(trained)

    def stats(answers):
        return layout.layout_stats(images, lays, data.classes, _Oracle(answers), segmenter)

    found, missed = stats(perfect), stats(empty)
    same = layout.paired_bootstrap(found, stats(perfect), n_boot=20)
    for k in ("map50", "context"):
        assert same[k] == {"difference": 0.0, "low": 0.0, "high": 0.0, "a_wins": 0.0}
    apart = layout.paired_bootstrap(found, missed, n_boot=20)["map50"]
    assert apart["difference"] == pytest.approx(100.0) and apart["low"] == pytest.approx(100.0)
    assert apart["a_wins"] == 1.0
    half = [p if i % 2 else e for i, (p, e) in enumerate(zip(perfect, empty))]  # every other image found
    normalised = [{**p, "boxes": p["boxes"] / data.size} for p in half]
    full = D.score_detections(normalised, targets, data.size)["map50"]  # the COCO evaluation of torchmetrics
    some = layout.paired_bootstrap(stats(half), missed, n_boot=20)["map50"]
    assert 0.2 < full < 0.8 and some["difference"] == pytest.approx(100 * full)
    assert some["low"] < 100 * full < some["high"]
    fewer = layout.layout_stats(images[:-1], lays[:-1], data.classes, _Oracle(perfect[:-1]), segmenter)
    with pytest.raises(ValueError, match="one image of each variant per layout"):
        layout.paired_bootstrap(found, fewer)
    with pytest.raises(ValueError, match="one image per layout"):
        layout.layout_stats(images[:-1], lays, data.classes, _Oracle(perfect), segmenter)


def test_layout_intervals_of_one_variant(trained):
    """Perfect detections give mAP50 100 in every redraw, none give 0; half of the images found give an interval
    around the COCO value that draws vary; context coherence's interval holds its value on all layouts."""
    from rslib.eval import layout

    data, lays, targets, images, segmenter, perfect, empty = _layout_case(trained)
    assert layout.layout_intervals(images, lays, data.classes, _Oracle(perfect), segmenter,
                                   n_boot=20)["map50"] == [100.0, 100.0]
    assert layout.layout_intervals(images, lays, data.classes, _Oracle(empty), segmenter,
                                   n_boot=20)["map50"] == [0.0, 0.0]
    half = [p if i % 2 else e for i, (p, e) in enumerate(zip(perfect, empty))]
    full = 100 * D.score_detections([{**h, "boxes": h["boxes"] / data.size} for h in half], targets,
                                    data.size)["map50"]
    ci = layout.layout_intervals(images, lays, data.classes, _Oracle(half), segmenter, n_boot=200)
    assert ci["map50"][0] < full < ci["map50"][1]
    context = layout.on_context_fraction(layout.predict_classes(segmenter, images), [t["boxes"] for t in targets],
                                         [t["labels"] for t in targets], data.classes)
    assert ci["context"][0] <= context <= ci["context"][1]
    with pytest.raises(ValueError, match="one image per layout"):
        layout.layout_intervals(images[:-1], lays, data.classes, _Oracle(perfect), segmenter)


def test_fidelity_intervals_hold_the_measure_and_shrink_to_it(trained):
    """The bootstrap intervals of road IoU and mIoU over the items contain the pooled value; with every item
    alike (one image repeated) they close on it."""
    from rslib.eval import control
    from rslib.data.datasets import load_split_tensors, split_dataset

    cfg, seg_dir, _ = trained
    segmenter = SM.load_segmenter(seg_dir)
    test = load_split_tensors(split_dataset(cfg, "test"))
    n = len(test["pixel_values"])
    target = control.targets(test, n)
    images = test["pixel_values"][:n]
    predict_classes = lambda x: S.predict_classes(segmenter, x)  # noqa: E731
    value = control.fidelity(images, target, segmenter, ci_seed=0)
    ci = control.fidelity_intervals(predict_classes(images), target, n_boot=200)
    assert value["ci"] == control.fidelity_intervals(predict_classes(images), target, seed=0)  # one segmentation
    for k in ("road_iou", "miou"):
        assert ci[k][0] <= value[k] <= ci[k][1], k
    one = {k: v[:1].repeat(n, *[1] * (v.dim() - 1)) for k, v in target.items()}
    same = control.fidelity_intervals(predict_classes(images[:1].repeat(n, 1, 1, 1)), one, n_boot=50)
    assert same["miou"][0] == pytest.approx(same["miou"][1])


def test_measures_table_reads_value_and_interval():
    from rslib.eval.tables import measures_table

    table = measures_table([{"method": "a", "map50": 13.456, "fid": 2.0, "ci": {"map50": [10.0, 17.25]}},
                            {"method": "b", "map50": 1.0, "fid": 3.0}], "method", digits=2)
    assert table.loc["a", "map50"] == "13.46 [10.00, 17.25]" and table.loc["b", "map50"] == "1.00"
    assert table.loc["a", "fid"] == 2.0 and "ci" not in table.columns


def test_content_margin_is_positive_for_own_content_and_negative_against_it():
    """An image given back as its own content image is closer to it than to the others' (margin > 0); images
    paired with another item's content are not (mean margin < 0 for distinct images)."""
    from transformers import CLIPModel

    from rslib.eval import control
    from rslib.models.text import rs_clip_config

    from rslib.models.text import encode_images

    torch.manual_seed(0)
    clip = CLIPModel(rs_clip_config(get_preset("smoke"))).eval()
    encode = lambda x: encode_images(clip, x)  # noqa: E731
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    own = control.content_margin_of(images, images, clip)
    assert own.shape == (6,) and bool((own > 0).all())
    assert float(control.content_margin_of(images, images.roll(1, 0), clip).mean()) < 0
    groups = torch.tensor([0, 0, 0, 1, 1, 2])  # the last image has no other of its group: NaN
    within = control.content_margin_of(images, images, clip, groups)
    assert bool((within[:5] > 0).all()) and bool(within[5].isnan())
    assert float(within[0]) == pytest.approx(float((encode(images[:1]) @ encode(images[:3]).T)[0, 0]
                                                   - (encode(images[:1]) @ encode(images[1:3]).T).mean()), abs=1e-5)
    with pytest.raises(ValueError, match="n >= 2"):
        control.content_margin_of(images[:1], images[:1], clip)


def test_map50_is_the_mean_of_the_per_class_ap50(trained):
    """The mAP50 notebook 04 reports is the mean of the AP50 of the classes present in the layouts, each given by
    name (its per-class table); a class found in every other image scores between none and all."""
    data, lays, targets, images, segmenter, perfect, empty = _layout_case(trained)
    half = [p if i % 2 else e for i, (p, e) in enumerate(zip(perfect, empty))]
    scores = D.score_detections([{**h, "boxes": h["boxes"] / data.size} for h in half], targets, data.size,
                                classes=data.classes)
    per_class = scores["map50_per_class"]
    present = {data.classes[int(c)] for t in targets for c in t["labels"]}
    assert set(per_class) == present
    assert np.mean(list(per_class.values())) == pytest.approx(scores["map50"])
    assert 0.0 < scores["map50"] < 1.0
