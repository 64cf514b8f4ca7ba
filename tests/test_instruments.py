"""The papers' instruments at the paper preset, each from a local file, on stand-in weights built from configs:
CC-Diff's open_clip CLIPScore (raw cosine, global and local), CRS-Diff's CLIPScore (torchmetrics' definition),
YOLOScore with YOLOv8 or the project's detector, Inception FID through torchmetrics, and trainability with
torchvision's Faster R-CNN R50-FPN."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import fixtures_real as fx
import standins
from rslib.config import get_preset, resolve_path
from rslib.data.formats import convert, read_records
from rslib.eval import detector as D
from rslib.eval import engine
from rslib.eval import instruments as I
from rslib.eval.data import preset_split
from rslib.models import detector as DM
from rslib.train import detector as DT
from rslib.utils import to_uint8

TINY_OPEN_CLIP = standins.TINY_OPEN_CLIP


# ---------------------------------------------------------------------------
# CC-Diff's CLIPScore with open_clip


@pytest.fixture(scope="module")
def open_clip_checkpoint(tmp_path_factory) -> Path:
    """A tiny open_clip model config (the ViT-L-14 layout at toy widths), its random weights saved as a checkpoint."""
    torch.manual_seed(0)
    return standins.open_clip_checkpoint(tmp_path_factory.mktemp("open_clip"))


def images_in_range(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_open_clip_score_is_the_raw_cosine(open_clip_checkpoint):
    scorer = I.OpenClipScore.load(open_clip_checkpoint, TINY_OPEN_CLIP)
    images = images_in_range(6)
    captions = [f"an aerial image of {w}." for w in ("a port", "a farm", "a river", "roads", "a city", "sand")]
    # the loaded weights are the checkpoint's, the features open_clip's own
    saved = torch.load(open_clip_checkpoint, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in scorer.model.state_dict().items())
    pil = [I.to_pil(im) for im in images]
    with torch.no_grad():
        img = torch.nn.functional.normalize(scorer.model.encode_image(torch.stack([scorer.preprocess(p) for p in pil])),
                                            dim=-1)
        txt = torch.nn.functional.normalize(scorer.model.encode_text(scorer.tokenizer(captions)), dim=-1)
    pairs = 100 * (img * txt).sum(-1)
    assert torch.allclose(scorer.pair_scores(pil, captions), pairs, atol=1e-4)
    assert scorer.global_score(images, captions) == pytest.approx(float(pairs.mean()), abs=1e-4)
    negative = int(pairs.argmin())
    assert pairs[negative] < 0  # a random model: some pairs point apart, and the score says so (no clamp at 0)
    assert scorer.global_score(images[negative:negative + 1], [captions[negative]]) == pytest.approx(
        float(pairs[negative]), abs=1e-4)


def test_local_clip_score_crops_each_instance_box(open_clip_checkpoint):
    scorer = I.OpenClipScore.load(open_clip_checkpoint, TINY_OPEN_CLIP)
    images = images_in_range(3, size=40)
    layouts = [[{"label": "ship", "bbox": [0.1, 0.2, 0.4, 0.5]}, {"label": "harbor", "bbox": [0.5, 0.0, 1.0, 0.25]}],
               [],  # no instance: not in the average
               [{"label": "airplane", "bbox": [0.25, 0.25, 0.75, 0.75]}]]
    seen = []
    preprocess = scorer.preprocess
    scorer.preprocess = lambda im: (seen.append(np.asarray(im)), preprocess(im))[1]
    per_image = scorer.local_scores(images, layouts)
    pixels = [to_uint8(im[None])[0].permute(1, 2, 0).numpy() for im in images]
    want = [pixels[0][8:20, 4:16], pixels[0][0:10, 20:40], pixels[2][10:30, 10:30]]  # rows y1:y2, columns x1:x2
    assert len(seen) == 3 and all(np.array_equal(a, b) for a, b in zip(seen, want))
    scorer.preprocess = preprocess
    pairs = scorer.pair_scores([Image.fromarray(w) for w in want], ["ship", "harbor", "airplane"])
    assert per_image[0] == pytest.approx(float(pairs[:2].mean()), abs=1e-4) and np.isnan(per_image[1])
    assert per_image[2] == pytest.approx(float(pairs[2]), abs=1e-4)
    # averaged per image, then over images: not over instances
    assert scorer.local_score(images, layouts) == pytest.approx((per_image[0] + per_image[2]) / 2, abs=1e-5)
    assert I.hbb_crop(Image.new("RGB", (40, 40)), [0.0, 0.0, 0.001, 0.001]).size == (1, 1)


def test_open_clip_model_from_a_config_file(open_clip_checkpoint, tmp_path):
    """A model open_clip does not ship is named by its config file: registered there, the same network results."""
    config = tmp_path / "my-remote-sensing-clip.json"
    config.write_text((open_clip_checkpoint.parent / f"{TINY_OPEN_CLIP}.json").read_text())
    from_file = I.OpenClipScore.load(open_clip_checkpoint, str(config))
    registered = I.OpenClipScore.load(open_clip_checkpoint, TINY_OPEN_CLIP)
    images = images_in_range(2)
    assert torch.equal(from_file.image_features([I.to_pil(x) for x in images]),
                       registered.image_features([I.to_pil(x) for x in images]))
    with pytest.raises(FileNotFoundError, match="open_clip model config"):
        I.OpenClipScore.load(open_clip_checkpoint, str(tmp_path / "missing.json"))


def test_missing_open_clip_checkpoint_is_named(tmp_path):
    missing = tmp_path / "open_clip_pytorch_model.bin"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        I.OpenClipScore.load(missing)


# ---------------------------------------------------------------------------
# CRS-Diff's CLIPScore with a transformers CLIP folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

    from rslib.models.text import clip_tokenizer

    folder = tmp_path_factory.mktemp("clip-vit-large-patch14")
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        text_config=CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   max_position_embeddings=77).to_dict(),
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64).to_dict(),
        projection_dim=16)).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=clip_tokenizer()).save_pretrained(folder)
    return folder


class _Features(torch.nn.Module):
    """A CLIPModel whose feature methods return tensors, as torchmetrics expects (transformers 5 returns outputs)."""

    def __init__(self, clip):
        super().__init__()
        self.clip, self.config = clip, clip.config

    def get_image_features(self, pixel_values):
        return self.clip.visual_projection(self.clip.vision_model(pixel_values=pixel_values).pooler_output)

    def get_text_features(self, input_ids, attention_mask):
        out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.clip.text_projection(out.pooler_output)


def test_clip_folder_score_is_torchmetrics_clip_score(clip_folder):
    from torchmetrics.multimodal.clip_score import CLIPScore

    scorer = I.ClipFolderScore.load(clip_folder)
    images = images_in_range(4)
    captions = ["a port.", "a farm with fields.", "a river.", "an airport with two airplanes."]
    metric = CLIPScore(model_name_or_path=lambda: (_Features(scorer.model), scorer.processor))
    metric.update(list(to_uint8(images)), captions)
    assert scorer.score(images, captions) == pytest.approx(float(metric.compute()), abs=1e-4)
    pairs = scorer.pair_scores(images, captions)
    assert scorer.score(images, captions) == pytest.approx(max(float(pairs.mean()), 0.0), abs=1e-6)
    negative = int(pairs.argmin())
    if pairs[negative] < 0:  # clamped at 0, unlike CC-Diff's raw cosine
        assert scorer.score(images[negative:negative + 1], [captions[negative]]) == 0.0


def test_missing_clip_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "clip-vit-large-patch14")):
        I.ClipFolderScore.load(tmp_path / "clip-vit-large-patch14")


# ---------------------------------------------------------------------------
# YOLOScore


class _Boxes:
    """The part of ultralytics' Boxes that YOLOScore reads."""

    def __init__(self, xyxyn, cls, conf):
        self.xyxyn, self.cls, self.conf = torch.tensor(xyxyn).reshape(-1, 4), torch.tensor(cls), torch.tensor(conf)


def fake_ultralytics(monkeypatch, names: dict[int, str], answer: list[_Boxes]) -> list:
    """An ``ultralytics`` module whose YOLO answers with ``answer`` and records what it was given."""
    calls = []

    class YOLO:
        def __init__(self, path: str):
            self.names = names
            calls.append(("load", path))

        def predict(self, images, **kw):
            calls.append(("predict", [im.copy() for im in images], kw))
            return [types.SimpleNamespace(boxes=b) for b in answer[:len(images)]]

    monkeypatch.setitem(sys.modules, "ultralytics", types.SimpleNamespace(YOLO=YOLO))
    return calls


def test_yolo_score_with_yolov8_maps_its_classes_by_name(monkeypatch, tmp_path):
    weights = tmp_path / "yolov8n-dior-rsvg.pt"
    weights.write_bytes(b"stand-in")
    classes = ("airplane", "ship", "vehicle")
    # YOLO numbers classes alphabetically over its own label set; ours are another order
    answer = [_Boxes([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9], [0, 0, 0.1, 0.1]], [2.0, 0.0, 1.0], [0.9, 0.8, 0.7]),
              _Boxes([], [], [])]
    calls = fake_ultralytics(monkeypatch, {0: "airplane", 1: "bridge", 2: "ship", 3: "vehicle"}, answer)
    cfg = get_preset("paper", **{"eval.yolo_weights": str(weights)})
    det = I.yolo_score_detector(cfg, classes)
    assert det.label == "YOLOv8 (yolov8n-dior-rsvg.pt)" and calls[0] == ("load", str(weights))
    images = images_in_range(2, size=16)
    targets = [{"boxes": torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9]]), "labels": torch.tensor([1, 0])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    scores = I.yolo_score(det, images, targets)
    assert scores["instrument"] == det.label and scores["map50"] == pytest.approx(1.0)  # the bridge is left out
    _, given, kw = calls[1]
    rgb = to_uint8(images)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(given[0], rgb[..., ::-1]) and kw["imgsz"] == 800  # BGR, as ultralytics reads arrays
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        I.yolo_score_detector(get_preset("paper", **{"eval.yolo_weights": str(tmp_path / "missing.pt")}), classes)


@pytest.fixture(scope="module")
def smoke_detector(tmp_path_factory):
    cfg = get_preset("smoke", **{"runs_dir": str(tmp_path_factory.mktemp("runs")), "det.steps": 2})
    return cfg, DT.train_detector(cfg, progress=False)


def test_yolo_score_without_ultralytics_uses_the_project_detector_labelled(monkeypatch, smoke_detector):
    cfg, folder = smoke_detector
    monkeypatch.setattr(I, "ultralytics_installed", lambda: False)
    test = preset_split(cfg, "test", maps=())
    asked = I.yolo_score_detector(replace_eval(cfg, yolo_weights="weights/yolov8n.pt"), test.classes)
    assert asked.label == "project detector (fcos_tiny; ultralytics not installed: pip install 'rslib[yolo]' for YOLOv8)"
    small = I.yolo_score_detector(cfg, test.classes)  # the small presets: the project's detector, as before
    assert small.label == "project detector (fcos_tiny)"
    scores = I.yolo_score(small, test.pixel_values(), test.targets())
    assert {k: scores[k] for k in ("map50", "map", "map75")} == {
        k: v for k, v in D.detection_map(DM.load_detector(folder), test.pixel_values(), test.targets()).items()
        if k in ("map50", "map", "map75")}


def replace_eval(cfg, **fields):
    from dataclasses import replace

    return replace(cfg, eval=replace(cfg.eval, **fields))


# ---------------------------------------------------------------------------
# Inception FID through torchmetrics with a local weights file


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """Random weights in the layout of torch-fidelity's FID InceptionV3 (built without downloading anything)."""
    pytest.importorskip("torch_fidelity")
    torch.manual_seed(0)
    return standins.inception_weights(tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth")


def test_inception_fid_reads_the_local_weights_file(inception_weights):
    from rslib.eval.metrics import inception_fid, inception_scores

    real, fake = images_in_range(2, 32, seed=1), images_in_range(2, 32, seed=2) * 0.3
    # 64-d features: the 2048-d FID's matrix square root alone takes a minute on 2 cores; the path is the same
    scores = inception_scores(real, fake, inception_weights, splits=1, feature=64)
    assert scores["fid_inception"] > 0 and np.isfinite(scores["inception_score"])
    saved = torch.load(inception_weights, weights_only=False)
    net = inception_fid(inception_weights).inception
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())


def test_paper_preset_names_every_instrument_file():
    cfg = get_preset("paper")
    for load, path in ((I.crs_diff_clip_score, cfg.eval.clip_score_folder),
                       (I.cc_diff_clip_score, cfg.eval.open_clip_checkpoint)):
        if not resolve_path(path).exists():  # where the user has not placed the file, the error names it
            with pytest.raises(FileNotFoundError, match=str(resolve_path(path))):
                load(cfg)
    assert I.crs_diff_clip_score(get_preset("cpu")) is None and I.cc_diff_clip_score(get_preset("cpu")) is None
    assert cfg.det.kind == "faster_rcnn_r50_fpn" and cfg.det.backbone_weights.startswith("weights/")
    e = cfg.eval
    assert all(v.startswith("weights/") for v in (e.inception_weights, e.clip_score_folder,
                                                   e.open_clip_checkpoint, e.yolo_weights))
    assert e.open_clip_model == "ViT-L-14"
    for name in ("smoke", "cpu", "gpu"):  # the small presets keep today's instruments
        small = get_preset(name)
        assert small.det.kind == "fcos_tiny" and not small.det.backbone_weights
        assert not any((small.eval.inception_weights, small.eval.clip_score_folder, small.eval.open_clip_checkpoint,
                        small.eval.yolo_weights))


# ---------------------------------------------------------------------------
# CC-Diff's table: the papers' instruments beside the project's


def test_cc_diff_instruments_of_a_preset(monkeypatch, tmp_path, open_clip_checkpoint, inception_weights):
    classes = ("airplane", "ship")
    none = I.cc_diff_instruments(get_preset("cpu"), classes)  # the small presets: none
    assert (none.clip, none.yolo, none.inception_weights) == (None, None, None) and none.names() == {}
    cfg = replace_eval(get_preset("paper"), open_clip_checkpoint=str(open_clip_checkpoint),
                       open_clip_model=TINY_OPEN_CLIP, inception_weights=str(inception_weights),
                       yolo_weights=str(tmp_path / "yolo.pt"))
    monkeypatch.setattr(I, "ultralytics_installed", lambda: False)
    with pytest.warns(UserWarning, match="ultralytics is not installed"):
        inst = I.cc_diff_instruments(cfg, classes)
    assert isinstance(inst.clip, I.OpenClipScore) and inst.yolo is None and inst.inception_weights == inception_weights
    assert set(inst.names()) == {"clip_global_openclip", "clip_local_openclip", "fid_inception"}
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        I.cc_diff_instruments(replace_eval(cfg, inception_weights=str(tmp_path / "missing.pth"), yolo_weights=""),
                              classes)


def test_paper_layout_scores_and_the_table_take_the_papers_instruments(monkeypatch, open_clip_checkpoint):
    from rslib.eval.layout import paper_layout_scores
    from rslib.eval.tables import cc_diff_main_rows

    images = images_in_range(2, size=32)
    layouts = [[{"label": "ship", "bbox": [0.1, 0.1, 0.5, 0.5]}], []]
    prompts = ["a port.", "a farm."]
    clip = I.OpenClipScore.load(open_clip_checkpoint, TINY_OPEN_CLIP)
    truth = [{"boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5]]), "scores": torch.tensor([0.9]),
              "labels": torch.tensor([1])}, {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                             "labels": torch.zeros(0, dtype=torch.long)}]
    yolo = I.LayoutDetector(lambda x: truth[:len(x)], ("airplane", "ship"), "YOLOv8 (stand-in)")
    scores = paper_layout_scores(I.CCDiffInstruments(clip, yolo), images, None, prompts, layouts)
    assert scores["clip_global_openclip"] == pytest.approx(clip.global_score(images, prompts))
    assert scores["clip_local_openclip"] == pytest.approx(clip.local_score(images, layouts))
    assert scores["map50_yolo"] == pytest.approx(100.0)  # the detections are the layout (mAP in %)
    assert paper_layout_scores(I.CCDiffInstruments(), images, None, prompts, layouts) == {}

    project = {"clip_local": 20.0, "clip_global": 25.0, "fid_rsclip": 3.0, "map50": 50.0, "map50_95": 20.0,
               "context": 0.6}
    small = {"rows": [{"method": "cc_diff", **project}]}
    table, note = cc_diff_main_rows(small)
    assert table.iloc[0].to_dict() == {"method": "CC-Diff", "clip_local": 20.0, "clip_global": 25.0, "fid": 3.0,
                                       "map50": 50.0, "map50_95": 20.0, "context": 0.6}
    assert "RS-CLIP" in note and "the project's detector" in note
    paper = {"rows": [{"method": "cc_diff", **project, **scores, "fid_inception": 70.0, "map50_95_yolo": 40.0}],
             "instruments": {**I.CCDiffInstruments(clip, yolo).names(), "fid_inception": "InceptionV3 (w.pth)"}}
    table, note = cc_diff_main_rows(paper)
    row = table.iloc[0].to_dict()
    assert row["clip_global"] == pytest.approx(scores["clip_global_openclip"]) and row["fid"] == 70.0
    assert row["map50"] == pytest.approx(100.0) and row["map50_95"] == pytest.approx(40.0)
    assert "open_clip ViT-L-14" in note and "YOLOv8 (stand-in)" in note and "InceptionV3 (w.pth)" in note
    assert "RS-CLIP" not in note


# ---------------------------------------------------------------------------
# Trainability with Faster R-CNN R50-FPN


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory) -> Path:
    """torchvision ResNet-50 weights (random here) saved as the ImageNet weights file would be."""
    import torchvision

    path = tmp_path_factory.mktemp("weights") / "resnet50-0676ba61.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return path


def test_faster_rcnn_reads_its_backbone_from_the_local_file(resnet50_file, tmp_path):
    det = get_preset("paper", **{"det.backbone_weights": str(resnet50_file), "det.input_size": 64}).det
    model = DM.build_detector(det, 64, num_classes=3)
    assert isinstance(model, DM.FasterRCNNDetector) and model.model.roi_heads.box_predictor.cls_score.out_features == 4
    saved = torch.load(resnet50_file, weights_only=True)
    body = model.model.backbone.body.state_dict()
    assert all(torch.equal(body[k], saved[k]) for k in body)
    assert not model.model.backbone.body.conv1.weight.requires_grad and model.model.backbone.body.layer4[0].conv1.weight.requires_grad
    with pytest.raises(FileNotFoundError, match="nothing-here.pth"):
        DM.build_detector(get_preset("paper", **{"det.backbone_weights": str(tmp_path / "nothing-here.pth")}).det, 64, 3)
    with pytest.raises(ValueError, match="det.kind"):
        DM.build_detector(get_preset("smoke", **{"det.kind": "yolo"}).det, 32, 3)


@pytest.fixture(scope="module")
def dior_paper(tmp_path_factory, resnet50_file):
    """The paper preset on a converted DIOR fixture: Faster R-CNN from the stand-in backbone, 2 steps at 64 px."""
    root = tmp_path_factory.mktemp("dior")
    convert("dior", fx.make_dior(root / "src"), root / "records")
    return get_preset("paper", **{
        "data.root": str(root / "records"), "data.image_size": 64, "runs_dir": str(root / "runs"), "device": "cpu",
        "mixed_precision": "no", "num_workers": 0, "det.backbone_weights": str(resnet50_file),
        "det.input_size": 64, "det.steps": 2, "det.batch_size": 1, "det.warmup_steps": 0})


@pytest.mark.slow
def test_faster_rcnn_trainability_on_real_format_data(dior_paper):
    cfg = dior_paper
    assert engine.default_real(cfg) == len(read_records(cfg.data_dir() / "train")) == 2  # the data set's own size
    train = preset_split(cfg, "train", maps=())
    labels = {o.label for r in train.records for o in r.objects}
    assert train.classes == tuple(sorted(labels)) and len(labels) == 4  # DIOR's labels, not SynthRS's
    assert sum(len(b) for b in train.boxes) == 5  # so every object is counted

    # the trainability detector (engine.detector_trainability trains three of these): 2 steps of R50-FPN
    folder = DT.train_detector(cfg, cfg.run_dir("engine") / "detector_real", progress=False, real_limit=2)
    info = DT.detector_info(folder)
    assert info["det"]["kind"] == "faster_rcnn_r50_fpn" and len(info["history"]) == 2
    assert {"map", "map50", "map75"} <= set(info["test"]) and all(0.0 <= info["test"][k] <= 1.0
                                                                  for k in ("map", "map50", "map75"))
    model = DM.load_detector(folder)  # rebuilt from the saved weights, not from the backbone file
    assert isinstance(model, DM.FasterRCNNDetector) and model.classes == tuple(train.classes)
    saved = load_file(str(folder / DM.WEIGHTS_FILE))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    test = preset_split(cfg, "test", maps=())
    out = D.detect(model, test.pixel_values())
    assert len(out) == len(test) and all(bool((d["labels"] >= 0).all()) for d in out)


def test_crs_diff_paper_scorer_and_its_table(clip_folder, inception_weights, monkeypatch):
    from rslib.eval import metrics
    from rslib.eval.tables import crs_diff_text_rows

    assert I.crs_diff_paper_scorer(get_preset("cpu")) is None  # the small presets: RS-CLIP only
    cfg = replace_eval(get_preset("paper"), clip_score_folder=str(clip_folder), inception_weights=str(inception_weights))
    # the Inception path itself is checked above; here its 2048-d matrix square root would take a minute
    monkeypatch.setattr(metrics, "inception_scores", lambda real, gen, path: {"fid_inception": 50.0,
                                                                              "inception_score": 2.0})
    score = I.crs_diff_paper_scorer(cfg)
    real, gen = images_in_range(2, 32, seed=1), images_in_range(2, 32, seed=2)
    out = score(real, gen, ["a port.", "a farm."])
    assert out["fid_inception"] == 50.0 and out["inception_score"] == 2.0
    assert out["clip_score_clip"] == pytest.approx(I.ClipFolderScore.load(clip_folder).score(gen, ["a port.",
                                                                                                  "a farm."]))
    small_s1 = {"fid_rsclip": 3.0, "clip_score": 20.0, "scene_agreement": 0.8, "fid_rsclip_real_val": 1.0,
                "clip_score_real": 22.0, "scene_agreement_real": 0.9}
    small_crs = {"settings": [{"setting": "all + metadata + content", "fid_rsclip": 2.0, "clip_score": 21.0}]}
    table, note = crs_diff_text_rows(small_s1, small_crs)
    assert list(table["fid"]) == [3.0, 2.0, 1.0] and "inception_score" not in table and "RS-CLIP" in note
    table, note = crs_diff_text_rows({**small_s1, **out}, {"settings": [{**small_crs["settings"][0], **out}]})
    assert list(table["fid"][:2]) == [50.0, 50.0] and list(table["inception_score"][:2]) == [2.0, 2.0]
    assert np.isnan(table["fid"][2]) and "InceptionV3" in note and "CLIP ViT-L/14" in note
