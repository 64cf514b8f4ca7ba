"""SynthRS: determinism, captions, metadata effects, objects in context, condition maps, the split writer."""
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from rslib.data.conditions import rgb_to_seg
from rslib.data.formats import CONDITION_NAMES, read_records
from rslib.data.synthrs import MIN_ROAD_PX, OBJECT_CLASSES, SCENES, make_scene, write_split


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = write_split(tmp_path / "a", n=12, size=32, seed=3, workers=1)
    b = write_split(tmp_path / "b", n=12, size=32, seed=3, workers=1)
    c = write_split(tmp_path / "c", n=12, size=32, seed=4, workers=1)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_every_scene_type_renders_with_maps_and_captions():
    for k, scene in enumerate(SCENES):
        s = make_scene((0, k), 64, scene=scene)
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.image.std() > 5, f"{scene} looks flat"
        assert list(s.maps) == list(CONDITION_NAMES)
        for name, m in s.maps.items():
            assert m.dtype == np.uint8 and m.shape[:2] == (64, 64), name
        assert s.maps["segmentation"].shape == (64, 64, 3)
        assert len(s.captions) >= 3 and len(set(s.captions)) == len(s.captions)
        assert any(w in s.captions[0] for w in scene.replace("_", " ").split()), (scene, s.captions[0])
        assert set(s.metadata) == {"year", "month", "day", "gsd", "cloud_cover", "latitude", "longitude"}


def test_boxes_are_normalised_and_enclose_the_oriented_box():
    n = 0
    for i in range(40):
        s = make_scene((1, i), 64)
        for o in s.objects:
            assert o.label in OBJECT_CLASSES
            pts = np.array(o.obb).reshape(4, 2)
            assert (pts >= 0).all() and (pts <= 1).all()
            assert np.allclose(o.bbox, [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()], atol=1e-6)
            n += 1
    assert n > 50


@pytest.mark.parametrize("label,scenes,allowed", [
    ("ship", ("port", "river"), {3}),                # on water
    ("airplane", ("airport",), {0, 2}),              # on apron (background) or runway (road class)
    ("vehicle", ("parking", "dense_residential"), {0, 2}),  # on parking lots or roads
    ("storagetank", ("industrial",), {1}),           # tanks stand on their own (building class) footprint
])
def test_objects_stand_where_they_belong(label, scenes, allowed):
    seen = 0
    for scene in scenes:
        for i in range(15):
            s = make_scene((2, i), 64, scene=scene, cloud_cover=0)
            for o in s.objects:
                if o.label != label:
                    continue
                cx, cy = (o.bbox[0] + o.bbox[2]) / 2, (o.bbox[1] + o.bbox[3]) / 2
                cls = int(s.labels[min(63, int(cy * 64)), min(63, int(cx * 64))])
                assert cls in allowed, f"{label} in {scene} stands on class {cls}"
                seen += 1
    assert seen >= 5


def test_cloud_cover_draws_exactly_that_fraction():
    for cover in (0, 10, 35, 70, 95):
        s = make_scene(5, 64, scene="farmland", cloud_cover=cover)
        assert abs(s.cloud_mask.mean() * 100 - cover) < 2.5
    clear, cloudy = make_scene(5, 64, scene="forest", cloud_cover=0), make_scene(5, 64, scene="forest", cloud_cover=80)
    assert cloudy.image.mean() > clear.image.mean() + 40  # clouds are bright


def test_gsd_sets_object_scale():
    def mean_len(gsd):
        s = make_scene(7, 64, scene="parking", gsd=gsd, cloud_cover=0)
        return np.mean([o.bbox[2] - o.bbox[0] + o.bbox[3] - o.bbox[1] for o in s.objects if o.label == "vehicle"])
    assert mean_len(0.25) / mean_len(0.5) == pytest.approx(2.0, rel=0.15)


def test_month_and_latitude_set_the_season():
    def img(month, lat):
        return make_scene(11, 64, scene="farmland", month=month, day=15, latitude=lat, cloud_cover=0).image.astype(float)
    summer, winter = img(7, 55), img(1, 55)
    assert winter.mean() > summer.mean() + 30  # snow in a northern winter
    southern_january = img(1, -55)  # summer in the south
    assert southern_january[..., 1].mean() - southern_january[..., 0].mean() > winter[..., 1].mean() - winter[..., 0].mean()
    tropics = img(1, 5)
    assert tropics[..., 1].mean() > tropics[..., 0].mean()  # green all year


def test_condition_maps_agree_with_the_ground_truth():
    s = make_scene(3, 64, scene="dense_residential", cloud_cover=0)
    assert set(np.unique(s.maps["road"])) <= {0, 255}
    road = s.maps["road"] > 0
    assert road.mean() > 0.05
    assert (s.labels[road] == 2).mean() > 0.9  # road pixels are road class in the segmentation
    assert (rgb_to_seg(s.maps["segmentation"]) == s.labels).all()
    assert set(np.unique(s.maps["sketch"])) <= {0, 255} and set(np.unique(s.maps["lines"])) <= {0, 255}
    buildings = s.labels == 1
    assert s.maps["depth"][buildings].mean() > s.maps["depth"][road].mean() + 30  # buildings stand taller
    assert s.maps["soft_edges"][s.maps["sketch"] > 0].mean() > s.maps["soft_edges"][s.maps["sketch"] == 0].mean()


@pytest.mark.parametrize("scene", ["sparse_residential", "farmland", "bridge"])
def test_roads_are_at_least_min_road_px_wide(scene):
    """Narrow lanes (6-10 m) at a coarse GSD would be 1-2 px; they are drawn MIN_ROAD_PX wide, so a square of that
    side fits inside nearly every road pixel's neighbourhood (a morphological opening keeps the road)."""
    k = np.ones((MIN_ROAD_PX, MIN_ROAD_PX), np.uint8)
    kept = []
    for seed in range(4):
        road = make_scene(seed, 64, scene=scene, gsd=0.7, cloud_cover=0).maps["road"]
        if (road > 0).sum() > 20:
            kept.append((cv2.morphologyEx(road, cv2.MORPH_OPEN, k) > 0).sum() / (road > 0).sum())
    assert kept and min(kept) > 0.9, kept


def test_split_writer_and_cli(tmp_path, monkeypatch):
    from rslib.data.__main__ import main
    assert main(["synthrs", "--out", str(tmp_path / "val"), "--n", "10", "--size", "32", "--seed", "1",
                 "--split", "val", "--workers", "1"]) == 0
    recs = read_records(tmp_path / "val", check_files=True)
    assert len(recs) == 10
    for r in recs:
        assert set(CONDITION_NAMES) <= set(r.conditions) and "content" in r.conditions
        assert r.conditions["content"] != r.file_name  # another scene, never the image itself
    with pytest.raises(FileExistsError):
        write_split(tmp_path / "val", n=2, size=32, workers=1)


def test_imagefolder_loads_a_split(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    write_split(tmp_path / "data" / "train", n=6, size=32, seed=0, workers=1)
    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    row = ds["train"][0]
    assert row["image"].size == (32, 32)
    assert row["road"].size == (32, 32) and len(row["captions"]) >= 3
    assert set(row["metadata"]) >= {"year", "gsd", "cloud_cover"}


def test_png_encoding_is_lossless():
    import io

    from PIL import Image

    from rslib.data.formats import encode_png
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    grey = rgb[..., 0].copy()
    assert (np.asarray(Image.open(io.BytesIO(encode_png(rgb)))) == rgb).all()
    assert (np.asarray(Image.open(io.BytesIO(encode_png(grey)))) == grey).all()


def test_ensure_synthrs_regenerates_only_when_asked_for_something_else(tmp_path):
    from rslib.data.synthrs import ensure_synthrs
    root = ensure_synthrs(tmp_path, {"train": 5, "val": 3}, size=32, seed=0, workers=1)
    before = (root / "train" / "metadata.jsonl").stat().st_mtime_ns
    ensure_synthrs(tmp_path, {"train": 5, "val": 3}, size=32, seed=0, workers=1)
    assert (root / "train" / "metadata.jsonl").stat().st_mtime_ns == before  # cached
    ensure_synthrs(tmp_path, {"train": 5}, size=32, seed=1, workers=1)
    assert (root / "train" / "metadata.jsonl").stat().st_mtime_ns != before  # another seed: regenerated
