"""``python -m rslib.data conditions``: condition maps and content images for converted real data sets, resumable,
and CRS-Diff's refusal to train on records that lack the maps it asks for."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fixtures_real as fx
from rslib.config import get_preset
from rslib.data import condition_maps as cm
from rslib.data.__main__ import main
from rslib.data.datasets import MissingConditionsError, RSDataset, load_image, split_dataset
from rslib.data.formats import CONDITION_NAMES, Record, convert, read_records
from rslib.train.crs_diff import required_conditions, train_crs_diff
from test_conditions import save_script

PIXEL = ("lines", "soft_edges", "sketch")


def textured(path: Path, seed: int, size: int = 48) -> None:
    """Replace a fixture image (solid colour) by one with a bright block and a bar, so every map has content."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 40, np.uint8)
    y0, x0 = rng.integers(4, 14, size=2)
    img[y0:y0 + 20, x0:x0 + 24] = 230
    img[:, size - 12:size - 8] = 150
    Image.fromarray(img).save(path)


def converted(tmp_path: Path, fmt: str = "dior") -> Path:
    """A tiny data set in its published layout, converted, with textured images."""
    make = {"dior": fx.make_dior, "rsicd": fx.make_rsicd}[fmt]
    out = tmp_path / f"{fmt}_records"
    convert(fmt, make(tmp_path / "src"), out)
    for k, (_, split) in enumerate(cm.split_dirs(out)):
        for i, rec in enumerate(read_records(split)):
            textured(split / rec.file_name, 10 * k + i)
    return out


@pytest.fixture()
def models(tmp_path) -> dict[str, str]:
    """Stand-in TorchScript road, depth and segmentation models saved to files."""
    return {kind: save_script(tmp_path, kind) for kind in ("road", "depth", "segmentation")}


def model_flags(models: dict[str, str]) -> list[str]:
    return [a for kind, path in models.items() for a in (f"--{kind}-model", path)]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path (to show what a command did or did not touch)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class Counting:
    """A road model as a callable that counts its calls and can stop the run after ``stop_after`` calls."""

    def __init__(self, stop_after: int | None = None):
        self.calls, self.stop_after = 0, stop_after

    def __call__(self, x):
        import torch

        self.calls += 1
        if self.stop_after is not None and self.calls > self.stop_after:
            raise KeyboardInterrupt  # as Ctrl-C or a kill arrives in the middle of the data set
        return torch.cat([1 - x[:, :1], x[:, :1]], 1)  # (B, 2, H, W): road where red is bright


# ---------------------------------------------------------------------------
# The command


def test_command_writes_six_maps_and_content_that_rsdataset_returns(tmp_path, models, capsys):
    root = converted(tmp_path)
    train = root / "train"
    with open(train / "metadata.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    rows[0]["extra_field"] = "kept"  # a field this command does not know survives the rewrite
    (train / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    assert main(["conditions", "--root", str(root), *model_flags(models)]) == 0
    assert "train: 2 records with lines, soft_edges, sketch, road, depth, segmentation and content" in \
        capsys.readouterr().out
    for split, folder in cm.split_dirs(root):
        records = read_records(folder, check_files=True)  # every named file exists
        summary = json.loads((folder / cm.SUMMARY_NAME).read_text())
        assert summary["maps"] == list(CONDITION_NAMES) and summary["missing"] == {}
        assert not list(folder.rglob("*.tmp"))
        ds = RSDataset(folder, size=32)
        for i, rec in enumerate(records):
            assert set(rec.conditions) == {*CONDITION_NAMES, "content"}
            assert rec.conditions["content"] == rec.file_name  # DIOR has no scene labels: its own image
            for name in CONDITION_NAMES:
                assert rec.conditions[name] == f"conditions/{name}/{Path(rec.file_name).stem}.png"
            item = ds[i]
            assert item["has_content"]
            maps = item["conditions"].reshape(6, 3, 32, 32)
            assert all(float(maps[k].max()) > 0 for k in range(6)), split  # every map has content
    row = json.loads((train / "metadata.jsonl").read_text().splitlines()[0])
    assert row["extra_field"] == "kept" and row["road_file_name"] == row["conditions"]["road"]

    # the maps RSDataset returns are the extracted ones
    rec = read_records(train)[0]
    from rslib.data.conditions import ConditionModel, soft_edges

    image = load_image(train / rec.file_name).copy()
    assert np.array_equal(load_image(train / rec.conditions["soft_edges"], mode="L"), soft_edges(image))
    road = ConditionModel.load("road", models["road"])(image)
    assert np.array_equal(load_image(train / rec.conditions["road"], mode="L"), road) and road.max() == 255


def test_content_is_another_image_of_the_same_scene():
    records = [Record(f"images/{i}.png", ["c"], scene=s) for i, s in enumerate(["a", "a", "a", "b", None])]
    content = cm.content_files(records, "train", seed=0)
    assert content == cm.content_files(records, "train", seed=0)  # seeded
    for rec, c in zip(records[:3], content):
        assert c != rec.file_name and c in {r.file_name for r in records[:3]}
    assert content[3:] == ["images/3.png", "images/4.png"]  # alone in its scene, no scene: its own image


def test_rsicd_records_keep_their_maps_after_a_rerun(tmp_path, models):
    root = converted(tmp_path, "rsicd")
    main(["conditions", "--root", str(root), *model_flags(models)])
    before = snapshot(root)
    main(["conditions", "--root", str(root), *model_flags(models)])  # nothing left to do
    assert snapshot(root) == before


def test_synthrs_keeps_its_own_maps_and_content(tmp_path):
    from rslib.data.synthrs import write_split

    split = write_split(tmp_path / "synthrs" / "train", n=4, size=32)
    before = snapshot(split)
    main(["conditions", "--root", str(split.parent), "--skip-missing"])
    after = snapshot(split)
    assert after.pop(cm.SUMMARY_NAME) and after == before  # the metadata byte for byte, no map recomputed


def test_missing_models_are_refused_naming_each_flag(tmp_path, models, capsys):
    root = converted(tmp_path)
    before = snapshot(root)
    assert main(["conditions", "--root", str(root), "--road-model", models["road"]]) == 2
    msg = capsys.readouterr().err
    assert "--depth-model" in msg and "--segmentation-model" in msg and "--skip-missing" in msg
    assert "--road-model" not in msg and len(msg.strip().splitlines()) == 1
    assert snapshot(root) == before  # refused before any work
    assert main(["conditions", "--root", str(root), "--skip-missing", "--road-model",
                 str(tmp_path / "nothing.pt")]) == 2
    assert "nothing.pt" in capsys.readouterr().err
    assert snapshot(root) == before


def test_skip_missing_leaves_the_model_maps_out_and_records_them(tmp_path):
    root = converted(tmp_path)
    main(["conditions", "--root", str(root), "--skip-missing"])
    for _, folder in cm.split_dirs(root):
        summary = json.loads((folder / cm.SUMMARY_NAME).read_text())
        assert summary["maps"] == list(PIXEL) and sorted(summary["missing"]) == ["depth", "road", "segmentation"]
        for rec in read_records(folder, check_files=True):
            assert set(rec.conditions) == {*PIXEL, "content"}
        assert not (folder / "conditions" / "road").exists()


def test_resume_after_an_interruption_redoes_no_finished_record(tmp_path, models):
    root = converted(tmp_path)  # train: 2 records, val: 1, test: 1
    val = root / "val"
    metadata_before = (val / "metadata.jsonl").read_bytes()
    stopping = Counting(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        cm.compute_condition_maps(root, stopping, models["depth"], models["segmentation"], progress=False)
    # train finished and was recorded; val was stopped at its road map: metadata as before, its edge maps on disk
    assert all("road" in r.conditions for r in read_records(root / "train"))
    assert (val / "metadata.jsonl").read_bytes() == metadata_before
    rec = read_records(val)[0]
    assert cm.is_complete_png(val / cm.map_file(rec, "lines")) and not (val / cm.map_file(rec, "road")).exists()
    # a map cut short by a kill (a foreign tool, a full disk) does not count as done
    sketch = val / cm.map_file(rec, "sketch")
    sketch.write_bytes(sketch.read_bytes()[:40])
    assert not cm.is_complete_png(sketch)
    train_files = {p: p.stat().st_mtime_ns for p in (root / "train" / "conditions").rglob("*.png")}

    resumed = Counting()
    cm.compute_condition_maps(root, resumed, models["depth"], models["segmentation"], progress=False)
    assert resumed.calls == 2  # val and test only
    assert {p: p.stat().st_mtime_ns for p in (root / "train" / "conditions").rglob("*.png")} == train_files
    assert cm.is_complete_png(sketch)
    for _, folder in cm.split_dirs(root):
        assert all(set(r.conditions) == {*CONDITION_NAMES, "content"} for r in read_records(folder, check_files=True))


def test_write_atomically_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "metadata.jsonl"
    target.write_text("old\n")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        cm.write_atomically(target, b"new\n")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metadata.jsonl"]


def test_workers_compute_the_same_maps(tmp_path, models):
    one, two = tmp_path / "one", tmp_path / "two"
    root = converted(one)
    root2 = two / root.name
    import shutil

    shutil.copytree(root, root2)
    cm.compute_condition_maps(root, **{f"{k}_model": v for k, v in models.items()}, workers=1, progress=False)
    cm.compute_condition_maps(root2, **{f"{k}_model": v for k, v in models.items()}, workers=2, progress=False)
    assert snapshot(root) == snapshot(root2)
    with pytest.raises(ValueError, match="workers > 1"):
        cm.compute_condition_maps(root, Counting(), skip_missing=True, workers=2, progress=False)


# ---------------------------------------------------------------------------
# CRS-Diff refuses records without the maps it trains on


def real_data_preset(root: Path, tmp_path: Path, **overrides):
    return get_preset("smoke", **{"data.root": str(root), "runs_dir": str(tmp_path / "runs"), **overrides})


def test_training_refuses_records_without_the_maps_naming_them_and_the_command(tmp_path):
    root = converted(tmp_path)
    stage_one = tmp_path / "stage_one"  # training refuses before it reads the stage-one model
    stage_one.mkdir()
    (stage_one / "model_index.json").write_text("{}")
    cfg = real_data_preset(root, tmp_path, **{"crs.content_source": "record"})  # content images from the records
    with pytest.raises(MissingConditionsError) as e:
        train_crs_diff(cfg, stage_one_dir=stage_one, progress=False)
    msg = str(e.value)
    first = read_records(root / "train")[0].file_name
    assert all(n in msg for n in (*CONDITION_NAMES, "content")) and repr(first) in msg
    own = real_data_preset(root, tmp_path)  # the default: each image is its own content, no content file needed
    assert own.crs.content_source == "self" and required_conditions(own, True) == tuple(CONDITION_NAMES)
    assert f"python -m rslib.data conditions --root {root}" in msg
    assert not (cfg.run_dir("crs_diff") / "training").exists()  # refused before anything is written

    main(["conditions", "--root", str(root), "--skip-missing"])  # the three pixel maps and the content images
    with pytest.raises(MissingConditionsError, match="road, depth, segmentation but 2 of 2 records"):
        train_crs_diff(cfg, stage_one_dir=stage_one, progress=False)
    pixel_only = real_data_preset(root, tmp_path, **{"crs.condition_maps": PIXEL})
    split_dataset(pixel_only, "train").require_conditions(required_conditions(pixel_only, use_content=True))
    with pytest.raises(ValueError, match="crs.condition_maps"):
        required_conditions(real_data_preset(root, tmp_path, **{"crs.condition_maps": ("roads",)}), True)


def test_road_trainability_refuses_records_without_segmentation_maps(tmp_path):
    from rslib.eval import engine

    root = converted(tmp_path)
    main(["conditions", "--root", str(root), "--skip-missing"])
    with pytest.raises(MissingConditionsError, match="segmentation"):
        engine.road_trainability(real_data_preset(root, tmp_path), pipe=None, n_real=2, n_gen=2, seed=0)
