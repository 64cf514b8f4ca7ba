"""Notebooks 02-05 end to end at the paper preset on real-format data, as a researcher runs them: RSICD for stage
one (``data.root``), fMoW with its computed maps for CRS-Diff (``crs.data_root``) and DIOR-RSVG for CC-Diff
(``cc.data_root``), each converted from its published layout and given condition maps by ``python -m rslib.data``,
on stand-in weights in the real formats (tests/standins.py) and the papers' instruments (stand-in files).

Slow (a few minutes on 2 cores): ``make test-paper`` runs it alone."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

import fixtures_real as fx
import standins
from rslib.config import get_preset
from rslib.data.__main__ import main
from rslib.data.formats import read_records
from rslib.notebooks import run_notebooks
from test_conditions import save_script

pytestmark = pytest.mark.slow
SIZE = 64
RSICD_SCENES = ("airport", "parking", "beach", "denseresidential")
FMOW_CATEGORIES = ("airport", "port", "multi-unit_residential", "lake_or_pond")
RSVG_CLASSES = ("ship", "airplane", "vehicle", "storagetank")


def make_rsicd(src: Path, counts: dict[str, int]) -> Path:
    """``dataset_rsicd.json`` and its images (SIZE x SIZE, textured), five sentences per image."""
    src = src / "RSICD"
    entries, imgid = [], 0
    for split, n in counts.items():
        for _ in range(n):
            name = f"{RSICD_SCENES[imgid % len(RSICD_SCENES)]}_{imgid}.jpg"
            fx.write_image(src / "RSICD_images" / name, (SIZE, SIZE), (25 * imgid % 250, 100, 50), textured=True)
            sentences = [{"tokens": raw.split()[:-1], "raw": raw, "imgid": imgid, "sentid": 5 * imgid + k}
                         for k, raw in enumerate(fx.rsicd_sentences(name))]
            entries.append({"filename": name, "imgid": imgid, "sentences": sentences, "split": split,
                            "sentids": [s["sentid"] for s in sentences]})
            imgid += 1
    (src / "dataset_rsicd.json").write_text(json.dumps({"images": entries, "dataset": "rsicd"}))
    return src


def make_fmow(src: Path, counts: dict[str, int]) -> Path:
    """fMoW-rgb samples (SIZE x SIZE) over four categories, dates and cloud covers."""
    src = src / "fmow-rgb"
    ident = 0
    for split, n in counts.items():
        for _ in range(n):
            category = FMOW_CATEGORIES[ident % len(FMOW_CATEGORIES)]
            box = [{"box": [8, 8, 32, 24], "category": category, "ID": ident}]
            meta = fx.fmow_json(SIZE, SIZE, box, timestamp=f"20{10 + ident % 8}-{1 + ident % 12:02d}-15T10:00:00Z",
                                cloud_cover=(17 * ident) % 100)
            fx.fmow_sample(src, split, category, ident, 0, meta, textured=True)
            ident += 1
    return src


def make_dior_rsvg(src: Path, counts: dict[str, int]) -> Path:
    """DIOR-RSVG (SIZE x SIZE) with three described objects per image; the split files list object indexes."""
    src = src / "DIOR_RSVG"
    lists: dict[str, list[str]] = {split: [] for split in counts}
    obj = image = 0
    for split, n in counts.items():
        for _ in range(n):
            ident = f"{image:05d}"
            fx.write_image(src / "JPEGImages" / f"{ident}.jpg", (SIZE, SIZE), (40, 60 + 10 * image % 150, 90),
                           textured=True)
            objects = [(RSVG_CLASSES[(image + k) % len(RSVG_CLASSES)], (4 + 20 * k, 6 + 4 * k, 18 + 20 * k, 26 + 4 * k))
                       for k in range(3)]
            descriptions = [f"the {name} on the {side}" for (name, _), side in zip(objects, ("left", "middle", "right"))]
            ann = src / "Annotations" / f"{ident}.xml"
            ann.parent.mkdir(parents=True, exist_ok=True)
            ann.write_text(fx.voc_xml(f"{ident}.jpg", objects, (SIZE, SIZE), descriptions))
            lists[split] += [str(obj + k) for k in range(len(objects))]
            obj += len(objects)
            image += 1
    for split, items in lists.items():
        (src / f"{split}.txt").write_text("\n".join(items) + "\n")
    return src


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Stand-in weights, instruments and condition models; the three data sets converted with their maps."""
    root = tmp_path_factory.mktemp("paper_notebooks")
    torch.manual_seed(0)
    standins.paper_weights(root, SIZE)
    standins.open_clip_checkpoint(root / "instruments" / "open_clip")
    standins.inception_weights(root / "instruments" / "pt_inception-2015-12-05-6726825d.pth")
    models = [a for kind in ("road", "depth", "segmentation") for a in (f"--{kind}-model", save_script(root, kind))]
    sources = {"rsicd": make_rsicd(root / "src", {"train": 8, "val": 4, "test": 8}),
               "fmow": make_fmow(root / "src", {"train": 8, "val": 4, "test": 16}),
               "dior-rsvg": make_dior_rsvg(root / "src", {"train": 8, "val": 2, "test": 6})}
    for fmt, src in sources.items():
        out = root / "data" / fmt
        assert main(["convert", "--format", fmt, "--src", str(src), "--out", str(out)]) == 0
        assert main(["conditions", "--root", str(out), *models]) == 0
    return root


def overrides(root: Path) -> dict:
    """The paper preset on the stand-ins and the three converted data sets, with tiny instruments and steps."""
    return {
        **standins.paper_overrides(root, SIZE),
        "data.root": str(root / "data" / "rsicd"), "crs.data_root": str(root / "data" / "fmow"),
        "cc.data_root": str(root / "data" / "dior-rsvg"),
        "eval.clip_score_folder": str(root / "clip"),
        "eval.open_clip_checkpoint": str(root / "instruments" / "open_clip" / "open_clip_pytorch_model.bin"),
        "eval.open_clip_model": str(root / "instruments" / "open_clip" / f"{standins.TINY_OPEN_CLIP}.json"),
        "eval.inception_weights": str(root / "instruments" / "pt_inception-2015-12-05-6726825d.pth"),
        "eval.yolo_weights": "",  # no ultralytics here: the project's detector, labelled as such
        "seg.channels": (8, 16), "seg.steps": 2, "seg.batch_size": 2,
        "det.backbone_weights": "", "det.input_size": SIZE, "det.steps": 2, "det.batch_size": 2,
    }


def test_notebooks_02_to_05_at_the_paper_preset(root):
    settings = overrides(root)
    timings = run_notebooks("paper", only=["02", "03", "04", "05"], overrides=settings,
                            parameters={"eval_images": 4, "engine_real": 4, "engine_generated": 2,
                                        "ablation_steps": 1, "guidance_sweep": [1.0, 7.5],
                                        "renoise_strengths": [0.5, 1.0]})
    assert sorted(timings) >= ["02_stage_one", "03_crs_diff", "04_cc_diff", "05_tables_and_figures"]
    cfg = get_preset("paper", **settings)
    runs = cfg.run_dir("")

    s1 = json.loads((runs / "stage_one" / "eval.json").read_text())
    assert s1["data"] == settings["data.root"] and "scene_agreement" not in s1  # RSICD: captions, no scene labels
    assert {"fid_inception", "inception_score", "clip_score_clip"} <= set(s1)  # the papers' instruments

    crs = json.loads((runs / "crs_diff" / "eval.json").read_text())
    assert crs["data"] == settings["crs.data_root"]  # CRS-Diff measured on fMoW, with its maps and content
    crs_stamp = json.loads((runs / "crs_diff" / "training.json").read_text())["stamp"]
    assert crs_stamp["data"]["root"] == settings["crs.data_root"]
    assert (runs / "segmenter_fmow").is_dir() and (runs / "detector_dior-rsvg").is_dir()  # one per data set

    ccd = json.loads((runs / "cc_diff" / "eval.json").read_text())
    assert ccd["data"] == settings["cc.data_root"]
    classes = sorted({o.label for r in read_records(root / "data" / "dior-rsvg" / "train") for o in r.objects})
    assert classes == sorted(RSVG_CLASSES)

    tables = cfg.figures_dir() / "tables"
    for name in ("a_crs_diff_text_to_image", "b_crs_diff_conditions", "c_cc_diff_main_dior_rsvg",
                 "d_trainability_detector", "d_trainability_road"):
        assert (tables / f"{name}.md").is_file(), name
    assert len(list(cfg.figures_dir().glob("0[2-5]_*.png"))) >= 10
