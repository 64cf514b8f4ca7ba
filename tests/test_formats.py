"""The record format and the readers of RSICD, fMoW, DIOR(-R), DIOR-RSVG and DOTA."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

import fixtures_real as fx
from rslib.data.__main__ import main
from rslib.data.formats import (
    CCDIFF_INSTANCES,
    METADATA_FIELDS,
    DataFormatError,
    ObjectAnnotation,
    Record,
    convert,
    dataset_info,
    dior_scene,
    layout_caption,
    layout_sentence,
    obb_direction,
    position_phrase,
    read_records,
    tile_origins,
    write_ccdiff_metadata,
    write_ccdiff_split,
)


def by_name(split_dir: Path) -> dict[str, Record]:
    """Records of a converted split by image name, after checking every file exists."""
    return {Path(r.file_name).name: r for r in read_records(split_dir, check_files=True)}


def approx_list(values: list[float]):
    return pytest.approx(values, abs=1e-5)


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary folders left beside the output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------ RSICD

@pytest.mark.parametrize("images_dir", ["RSICD_images", "images"])
def test_rsicd(tmp_path, images_dir):
    src = fx.make_rsicd(tmp_path, images_dir)
    out = tmp_path / "out"
    paths = convert("rsicd", src, out)
    assert paths == [out / "train", out / "val", out / "test"]
    train, val, test = (by_name(p) for p in paths)
    assert sorted(train) == ["00004.jpg", "airport_1.jpg", "denseresidential_12.jpg"]
    assert list(val) == ["beach_3.jpg"] and list(test) == ["parking_7.jpg"]
    rec = train["airport_1.jpg"]
    assert rec.file_name == "images/airport_1.jpg"
    assert rec.captions == [s.strip() for s in fx.rsicd_sentences("airport_1.jpg")]
    assert len(rec.captions) == 5
    assert rec.metadata == {k: None for k in METADATA_FIELDS}
    assert rec.objects == [] and rec.conditions == {}
    scenes = {name: scene for name, _, scene in fx.RSICD_ENTRIES}
    for split in (train, val, test):
        for name, r in split.items():
            assert r.scene == scenes[name]
    # images are copied as they are
    assert (out / "train/images/airport_1.jpg").read_bytes() == (src / images_dir / "airport_1.jpg").read_bytes()


# ------------------------------------------------------------------------------------- fMoW

def test_fmow(tmp_path):
    out = tmp_path / "out"
    paths = convert("fmow", fx.make_fmow(tmp_path), out)
    assert [p.name for p in paths] == ["train", "val", "test"]
    train, val = by_name(out / "train"), by_name(out / "val")
    airport = train["airport_0_0_rgb.jpg"]
    assert airport.scene == "airport"
    assert airport.captions == ["a satellite image of an airport"]
    assert airport.metadata["year"] == 2015 and airport.metadata["month"] == 3 and airport.metadata["day"] == 12
    assert airport.metadata["gsd"] == 0.5 and airport.metadata["cloud_cover"] == 10.0
    assert airport.metadata["latitude"] == pytest.approx(20.2)  # mean of the 4 distinct vertices
    assert airport.metadata["longitude"] == pytest.approx(10.1)
    [obj] = airport.objects  # box [x, y, w, h] = [4, 2, 10, 8] on a 40 x 20 image
    assert obj.label == "airport" and obj.bbox == approx_list([0.1, 0.1, 0.35, 0.5])
    assert obj.obb == approx_list([0.1, 0.1, 0.35, 0.1, 0.35, 0.5, 0.1, 0.5])

    res = train["multi-unit_residential_3_1_rgb.jpg"]
    assert res.captions == ["a satellite image of a multi-unit residential"]
    assert (res.metadata["year"], res.metadata["month"], res.metadata["day"]) == (2016, 11, 30)
    assert [o.label for o in res.objects] == ["multi-unit_residential"]  # the false detection is dropped
    lake = val["lake_or_pond_5_0_rgb.jpg"]
    assert lake.objects[0].bbox == approx_list([25 / 30, 25 / 30, 1.0, 1.0])  # clipped to the image
    assert lake.captions == ["a satellite image of a lake or pond"]
    assert [r.scene for r in read_records(out / "test")] == ["port"]


# ------------------------------------------------------------------------------------- DIOR

def test_dior_with_oriented_boxes(tmp_path):
    out = tmp_path / "out"
    convert("dior", fx.make_dior(tmp_path), out)
    train, val, test = by_name(out / "train"), by_name(out / "val"), by_name(out / "test")
    assert sorted(train) == ["00001.jpg", "00002.jpg"]
    assert list(val) == ["00003.jpg"] and list(test) == ["00004.jpg"]
    r1 = train["00001.jpg"]
    assert [o.label for o in r1.objects] == ["airplane", "airplane", "vehicle"]  # 'Airplane' accepted
    assert r1.objects[0].bbox == approx_list([0.1, 0.1, 0.3, 0.3])
    assert r1.objects[0].obb == approx_list([v / 40 for v in (5, 4, 12, 5, 11, 12, 4, 11)])
    assert r1.captions == ["an aerial image with 2 airplanes and 1 vehicle"]
    assert r1.scene is None and r1.metadata == {k: None for k in METADATA_FIELDS}
    r2 = train["00002.jpg"]  # oriented objects listed in another order: matched by label and overlap
    assert [o.label for o in r2.objects] == ["Expressway-Service-area", "storagetank"]
    assert r2.objects[0].obb == approx_list([v / 40 for v in (10, 0, 20, 10, 10, 20, 0, 10)])
    assert r2.objects[1].obb == approx_list([v / 40 for v in (28, 24, 32, 28, 28, 32, 24, 28)])
    assert r2.captions == ["an aerial image with 1 expressway service area and 1 storage tank"]
    r3 = val["00003.jpg"]  # no <size>: read from the image; no oriented file: the bbox corners
    assert r3.objects[0].bbox == approx_list([0.2, 0.25, 1.0, 0.5])
    assert r3.objects[0].obb == approx_list([0.2, 0.25, 1.0, 0.25, 1.0, 0.5, 0.2, 0.5])


def test_dior_single_image_folder_without_oriented(tmp_path):
    out = tmp_path / "out"
    convert("dior", fx.make_dior(tmp_path, oriented=False, single_folder=True), out)
    obj = by_name(out / "train")["00001.jpg"].objects[0]
    assert obj.obb == ObjectAnnotation.from_bbox(obj.label, obj.bbox).obb
    assert list(by_name(out / "test")) == ["00004.jpg"]


# -------------------------------------------------------------------------------- DIOR-RSVG

def test_dior_rsvg_object_index_splits(tmp_path):
    out = tmp_path / "out"
    convert("dior-rsvg", fx.make_dior_rsvg(tmp_path), out)
    train, val, test = by_name(out / "train"), by_name(out / "val"), by_name(out / "test")
    # 00002 has object 2 in train and object 3 in test: the image goes to test only
    assert list(train) == ["00001.jpg"] and list(val) == ["00003.jpg"]
    assert sorted(test) == ["00002.jpg", "00004.jpg"]
    # CC-Diff's global caption first (no DIOR-R here: the boxes' own corners), then the referring expressions
    assert train["00001.jpg"].captions == [
        "This is an aerial image of a remote sensing scene. There is one vehicle oriented east-west at the top left "
        "and one vehicle oriented east-west at the top right.", "the vehicle on the left", "the vehicle on the right"]
    assert train["00001.jpg"].objects[1].bbox == approx_list([0.75, 0.05, 0.9, 0.2])
    ship = test["00002.jpg"]
    assert ship.captions == ["This is an aerial image of a remote sensing scene. There is one ship oriented "
                             "east-west in the center.", "a ship in the harbor", "the large ship"]
    assert [o.label for o in ship.objects] == ["ship"]  # the same box twice is one object
    assert "dior_r" not in dataset_info(out)


RSVG_JOINED = {  # image -> global caption with DIOR-R's oriented boxes joined
    "00001.jpg": "This is an aerial image of a remote sensing scene. There is one vehicle oriented north-south at "
                 "the top left and one vehicle oriented northeast-southwest at the top right.",
    "00002.jpg": "This is an aerial image of a remote sensing scene. There is one ship oriented northwest-southeast "
                 "in the center.",
    "00003.jpg": "This is an aerial image of a remote sensing scene. There is one stadium oriented east-west in the "
                 "center.",
}


def _rsvg_records(out: Path) -> dict[str, Record]:
    return {name: rec for split in ("train", "val", "test") for name, rec in by_name(out / split).items()}


@pytest.mark.parametrize("where", ["--dior-r", "inside --src"])
def test_dior_rsvg_joins_dior_r_oriented_boxes_by_image_id(tmp_path, capsys, where):
    out = tmp_path / "out"
    if where == "--dior-r":
        argv = ["--src", str(fx.make_dior_rsvg(tmp_path)), "--dior-r", str(fx.make_dior_r(tmp_path))]
    else:
        argv = ["--src", str(fx.make_dior_rsvg(tmp_path, dior_r_inside=True))]
    assert main(["convert", "--format", "dior-rsvg", *argv, "--out", str(out)]) == 0
    assert "joined 3 of 5 boxes to DIOR-R oriented boxes from" in capsys.readouterr().out
    records = _rsvg_records(out)
    # matched by class and overlap, not by order: DIOR-R lists 00001's vehicles the other way round
    left, right = records["00001.jpg"].objects
    assert left.obb == approx_list([v / 40 for v in fx.RSVG_DIOR_R["00001"][1][1]])
    assert right.obb == approx_list([v / 40 for v in fx.RSVG_DIOR_R["00001"][0][1]])
    assert left.bbox == approx_list([0.05, 0.05, 0.2, 0.2])  # the DIOR-RSVG box stays
    [ship] = records["00002.jpg"].objects  # DIOR-R's airplane is not one of DIOR-RSVG's objects
    assert ship.obb == approx_list([v / 40 for v in fx.RSVG_DIOR_R["00002"][1][1]])
    stadium = records["00003.jpg"].objects[0]  # no DIOR-R file for this image: its box's corners
    assert stadium.obb == ObjectAnnotation.from_bbox("stadium", stadium.bbox).obb
    for name, caption in RSVG_JOINED.items():
        assert records[name].captions[0] == caption
    assert dataset_info(out)["dior_r"]["boxes"] == 5 and dataset_info(out)["dior_r"]["joined"] == 3


def test_dior_r_folder_without_xml_is_refused(tmp_path, capsys):
    empty = tmp_path / "DIOR-R" / "Annotations" / "Oriented Bounding Boxes"
    empty.mkdir(parents=True)
    argv = ["convert", "--format", "dior-rsvg", "--src", str(fx.make_dior_rsvg(tmp_path)),
            "--dior-r", str(tmp_path / "DIOR-R"), "--out", str(tmp_path / "out")]
    assert main(argv) == 1
    assert "Oriented Bounding Boxes: no DIOR-R oriented-box XML files here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------- CC-Diff's captions

def _obj(label: str, cx: float, cy: float, w: float = 0.04, h: float = 0.02) -> ObjectAnnotation:
    return ObjectAnnotation.from_bbox(label, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


@pytest.mark.parametrize("x, y, phrase", [
    (0.1, 0.1, "at the top left"), (0.3, 0.1, "at the top"), (0.74, 0.2, "at the top"), (0.8, 0.1, "at the top right"),
    (0.2, 0.4, "on the left"), (0.26, 0.26, "in the center"), (0.74, 0.74, "in the center"),
    (0.9, 0.6, "on the right"), (0.1, 0.9, "at the bottom left"), (0.5, 0.8, "at the bottom"),
    (0.99, 0.99, "at the bottom right"), (1.0, 1.0, "at the bottom right"),
])
def test_position_on_the_4x4_grid(x, y, phrase):
    assert position_phrase(x, y, grid=4) == phrase


def test_position_grid_3_is_synthrs_nine_cells():
    assert position_phrase(0.3, 0.3) == "at the top left" and position_phrase(0.3, 0.3, grid=4) == "in the center"
    assert position_phrase(0.5, 0.5) == "in the center" and position_phrase(0.7, 0.5) == "on the right"


@pytest.mark.parametrize("obb, direction", [
    ([0.1, 0.1, 0.5, 0.1, 0.5, 0.2, 0.1, 0.2], "east-west"),  # long side horizontal
    ([0.1, 0.1, 0.2, 0.1, 0.2, 0.5, 0.1, 0.5], "north-south"),  # long side vertical (the second side)
    ([0.1, 0.5, 0.5, 0.1, 0.55, 0.15, 0.15, 0.55], "northeast-southwest"),  # rising to the right
    ([0.1, 0.1, 0.5, 0.5, 0.45, 0.55, 0.05, 0.15], "northwest-southeast"),  # falling to the right
    ([0.1, 0.3, 0.5, 0.25, 0.51, 0.3, 0.11, 0.35], "east-west"),  # 7 degrees off: still east-west
    ([0.1, 0.5, 0.2, 0.1, 0.25, 0.12, 0.15, 0.52], "north-south"),  # 76 degrees on a square image ...
    ([0.2, 0.2, 0.4, 0.2, 0.4, 0.4, 0.2, 0.4], "east-west"),  # a square: its first side
])
def test_obb_direction_bins(obb, direction):
    assert obb_direction(obb) == direction


def test_obb_direction_uses_the_image_aspect():
    obb = [0.1, 0.5, 0.2, 0.1, 0.25, 0.12, 0.15, 0.52]  # ... and 63 degrees once the image is twice as wide
    assert obb_direction(obb, width=2, height=1) == "northeast-southwest"


def test_layout_sentence_counts_groups_and_words():
    planes = [_obj("airplane", 0.1, 0.1), _obj("airplane", 0.15, 0.2), _obj("airplane", 0.2, 0.1)]
    tall = _obj("vehicle", 0.5, 0.5, w=0.01, h=0.05)
    assert layout_sentence(planes) == "There are three airplanes oriented east-west at the top left."
    assert layout_sentence([tall, *planes, _obj("vehicle", 0.5, 0.45, w=0.01, h=0.05)]) == (
        "There are two vehicles oriented north-south in the center and three airplanes oriented east-west at the top "
        "left.")
    assert layout_sentence([tall, _obj("vehicle", 0.9, 0.9)]) == (
        "There is one vehicle oriented north-south in the center and one vehicle oriented east-west at the bottom "
        "right.")
    ten, twelve = [_obj("ship", 0.5, 0.9)] * 10, [_obj("ship", 0.5, 0.9)] * 12
    assert layout_sentence(ten) == "There are ten ships oriented east-west at the bottom."
    assert layout_sentence(twelve) == "There are 12 ships oriented east-west at the bottom."
    assert layout_sentence([_obj("storagetank", 0.9, 0.4)], lambda c: "storage tank") == (
        "There is one storage tank oriented east-west on the right.")
    assert layout_sentence([]) == ""


def test_layout_caption_and_dior_scene():
    ship = _obj("ship", 0.5, 0.5)
    assert layout_caption("harbor", [ship]) == (
        "This is an aerial image of harbor. There is one ship oriented east-west in the center.")
    assert layout_caption("a remote sensing scene", []) == "This is an aerial image of a remote sensing scene."
    assert dior_scene(["ship", "harbor", "airport"]) == "harbor"  # the first object that names a scene
    assert dior_scene(["vehicle", "golffield"]) == "golffield" and dior_scene(["airport"]) == "airport"
    assert dior_scene(["Expressway-toll-station"]) == "freeway" and dior_scene(["Expressway-Service-area"]) == "freeway"
    assert dior_scene(["vehicle"]) == "a remote sensing scene" and dior_scene([]) == "a remote sensing scene"
    assert dior_scene(["vehicle"], fallback="airport") == "airport"


def test_dior_rsvg_image_id_splits(tmp_path):
    out = tmp_path / "out"
    convert("dior-rsvg", fx.make_dior_rsvg(tmp_path, by="images"), out)
    assert list(by_name(out / "train")) == ["00001.jpg"]
    assert list(by_name(out / "val")) == ["00003.jpg"]
    assert sorted(by_name(out / "test")) == ["00002.jpg", "00004.jpg"]


# ------------------------------------------------------------------------------------- DOTA

def test_dota(tmp_path):
    out = tmp_path / "out"
    paths = convert("dota", fx.make_dota(tmp_path), out)
    assert [p.name for p in paths] == ["train", "val", "test"]
    train, val, test = by_name(out / "train"), by_name(out / "val"), by_name(out / "test")
    p0 = train["P0000.png"]  # 100 x 50
    assert p0.metadata["gsd"] == pytest.approx(0.146343590398)
    plane, car = p0.objects
    assert plane.label == "plane" and plane.obb == approx_list([0.1, 0.1, 0.3, 0.1, 0.3, 0.3, 0.1, 0.3])
    assert plane.bbox == approx_list([0.1, 0.1, 0.3, 0.3])
    assert car.label == "small-vehicle" and car.bbox == approx_list([0.9, 0.8, 1.0, 1.0])  # clipped
    assert p0.captions == ["an aerial image with 1 plane and 1 small vehicle"]
    p1 = train["P0001.png"]
    assert p1.metadata["gsd"] is None and p1.captions == ["an aerial image with 3 ships"]
    harbor = val["P0002.png"].objects[0]
    assert harbor.obb == approx_list([0.5, 0, 1, 0.5, 0.5, 1, 0, 0.5]) and harbor.bbox == approx_list([0, 0, 1, 1])
    unlabeled = test["P0003.png"]
    assert unlabeled.objects == [] and unlabeled.metadata["gsd"] is None


def test_dota_v15_label_folder(tmp_path):
    extra = {("train", "P0009"): "imagesource:GoogleEarth\ngsd:0.3\n0 0 10 0 10 10 0 10 container-crane 0\n"}
    out = tmp_path / "out"
    convert("dota", fx.make_dota(tmp_path, label_folder="labelTxt-v1.5", extra=extra), out)
    assert [o.label for o in by_name(out / "train")["P0009.png"].objects] == ["container-crane"]


def test_dota_nested_archive_folders(tmp_path):
    src = fx.make_dota(tmp_path, label_folder="labelTxt-v1.0/labelTxt")  # as the v1.0 label archive extracts
    nested = src / "val" / "images" / "images"
    nested.mkdir()
    (src / "val" / "images" / "P0002.png").rename(nested / "P0002.png")  # as the image archives extract
    out = tmp_path / "out"
    convert("dota", src, out)
    assert [o.label for o in by_name(out / "val")["P0002.png"].objects] == ["harbor"]


def test_dota_v10_rejects_v15_class(tmp_path):
    extra = {("train", "P0009"): "imagesource:GoogleEarth\ngsd:0.3\n0 0 10 0 10 10 0 10 container-crane 0\n"}
    src = fx.make_dota(tmp_path, label_folder="labelTxt-v1.0", extra=extra)
    with pytest.raises(DataFormatError, match=r"P0009\.txt, line 3: unknown class 'container-crane'"):
        convert("dota", src, tmp_path / "out")


# ------------------------------------------------------------------------------- DOTA tiles

@pytest.mark.parametrize("length, tile, stride, starts", [
    (1000, 512, 412, [0, 412, 488]),  # the last tile shifted to end at the border
    (924, 512, 412, [0, 412]), (925, 512, 412, [0, 412, 413]),
    (512, 512, 412, [0]), (300, 512, 412, [0]),  # not longer than a tile: one tile
    (100, 40, 30, [0, 30, 60]), (50, 40, 30, [0, 10]),
])
def test_tile_origins(length, tile, stride, starts):
    assert tile_origins(length, tile, stride) == starts


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _noise_image(path: Path, size: tuple[int, int]) -> None:
    """Replace an image by random pixels, so that every tile's content tells where it was cut."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_dota_tiles_names_pixels_and_border_tiles(tmp_path):
    src, out = fx.make_dota(tmp_path), tmp_path / "out"
    _noise_image(src / "train/images/P0000.png", (100, 50))
    convert("dota", src, out, tile=40, gap=10)
    train = by_name(out / "train")
    names = {f"{p}__40__{x}___{y}.png" for p in ("P0000", "P0001") for x in (0, 30, 60) for y in (0, 10)}
    assert set(train) == names  # every tile, those without objects too
    source = _pixels(src / "train/images/P0000.png")
    for x in (0, 30, 60):
        for y in (0, 10):  # the last row and column end at the border (y 10..50, x 60..100)
            assert (_pixels(out / "train/images" / f"P0000__40__{x}___{y}.png") == source[y:y + 40, x:x + 40]).all()
    plane = train["P0000__40__0___0.png"]
    assert plane.objects[0].obb == approx_list([v / 40 for v in (10, 5, 30, 5, 30, 15, 10, 15)])
    assert plane.captions == ["an aerial image with 1 plane"] and plane.metadata["gsd"] == pytest.approx(0.1463435904)
    car = train["P0000__40__60___10.png"].objects[0]  # clipped to the image before: (90, 40, 100, 50)
    assert car.label == "small-vehicle" and car.bbox == approx_list([0.75, 0.75, 1.0, 1.0])
    # the plane (y 5..15) shows half in the tiles at y 10: dropped there
    assert train["P0000__40__0___10.png"].objects == [] and train["P0000__40__0___10.png"].captions == [
        "an aerial image"]
    assert [len(train[f"P0001__40__{x}___0.png"].objects) for x in (0, 30, 60)] == [1, 1, 1]
    assert dataset_info(out)["tiles"] == {"tile": 40, "gap": 10, "min_visible": 0.7}


def test_dota_tiles_at_cc_diff_size(tmp_path):
    extra = {("train", "P0009"): "gsd:0.5\n350 300 550 300 550 340 350 340 large-vehicle 0\n"}
    src, out = fx.make_dota(tmp_path, extra=extra, sizes={"P0009": (924, 600)}), tmp_path / "out"
    convert("dota", src, out, tile=512, gap=100)
    train = by_name(out / "train")
    names = {n for n in train if n.startswith("P0009")}
    assert names == {"P0009__512__0___0.png", "P0009__512__0___88.png", "P0009__512__412___0.png",
                     "P0009__512__412___88.png"}  # stride 412; the last row starts at 600 - 512
    truck = train["P0009__512__0___88.png"].objects[0]  # x 350..550: 162 of 200 px in the tile at x 0
    assert truck.bbox == approx_list([350 / 512, 212 / 512, 1.0, 252 / 512])
    assert train["P0009__512__0___0.png"].objects[0].bbox == approx_list([350 / 512, 300 / 512, 1.0, 340 / 512])
    assert train["P0009__512__412___88.png"].objects == []  # 138 of 200 px at x 412: less than 0.7


def test_dota_tiles_keep_objects_by_visible_area(tmp_path):
    # tiles of 40 px every 30 px on a 70 x 40 image start at x 0 and x 30
    labels = ("gsd:0.5\n"
              "20 0 45 0 45 10 20 10 ship 0\n"  # 0.8 visible at x 0, 0.6 at x 30
              "25 20 37 20 37 30 25 30 harbor 0\n"  # wholly in the tile at x 0, 7 of 12 px at x 30
              "50 20 60 20 60 30 50 30 plane 0\n")  # only in the tile at x 30
    src, out = fx.make_dota(tmp_path, extra={("train", "P0010"): labels}, sizes={"P0010": (70, 40)}), tmp_path / "out"
    convert("dota", src, out, tile=40, gap=10)
    train = by_name(out / "train")
    left, right = train["P0010__40__0___0.png"], train["P0010__40__30___0.png"]
    assert [o.label for o in left.objects] == ["ship", "harbor"]
    ship = left.objects[0]
    assert ship.bbox == approx_list([0.5, 0, 1, 0.25])  # clipped to the tile
    assert sorted(zip(ship.obb[0::2], ship.obb[1::2])) == [pytest.approx(p, abs=1e-5) for p in
                                                            [(0.5, 0), (0.5, 0.25), (1, 0), (1, 0.25)]]
    assert [o.label for o in right.objects] == ["plane"]  # 0.6 and 0.58 of the others visible: left out
    assert right.objects[0].bbox == approx_list([0.5, 0.5, 0.75, 0.75])
    assert right.captions == ["an aerial image with 1 plane"]


def test_dota_tiles_of_a_rotated_object(tmp_path):
    src, out = fx.make_dota(tmp_path), tmp_path / "out"
    convert("dota", src, out, tile=30, gap=10)  # the val image: a 40 x 40 diamond, 3/4 of it in each tile
    val = by_name(out / "val")
    assert set(val) == {f"P0002__30__{x}___{y}.png" for x in (0, 10) for y in (0, 10)}
    for rec in val.values():
        [harbor] = rec.objects
        assert harbor.bbox == approx_list([0, 0, 1, 1])
        assert all(0 <= v <= 1 for v in harbor.obb)
        assert harbor.obb != ObjectAnnotation.from_bbox("harbor", [0, 0, 1, 1]).obb  # a rotated rectangle


def test_dota_image_smaller_than_a_tile_is_padded(tmp_path):
    src, out = fx.make_dota(tmp_path), tmp_path / "out"
    _noise_image(src / "val/images/P0002.png", (40, 40))
    convert("dota", src, out, tile=64, gap=16)
    [(name, harbor)] = by_name(out / "val").items()
    assert name == "P0002__64__0___0.png"
    pixels = _pixels(out / "val/images" / name)
    assert pixels.shape == (64, 64, 3) and (pixels[:40, :40] == _pixels(src / "val/images/P0002.png")).all()
    assert (pixels[40:] == 0).all() and (pixels[:, 40:] == 0).all()  # black at the right and bottom
    assert harbor.objects[0].obb == approx_list([v / 64 for v in (20, 0, 40, 20, 20, 40, 0, 20)])


# -------------------------------------------------------------------- loading and the CLI

@pytest.mark.parametrize("fmt, make", [
    ("rsicd", fx.make_rsicd), ("fmow", fx.make_fmow), ("dior", fx.make_dior), ("dior-rsvg", fx.make_dior_rsvg),
    ("dota", lambda root: fx.make_dota(root, test_labels=True)),
])
def test_load_dataset_imagefolder(tmp_path, monkeypatch, fmt, make):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    paths = convert(fmt, make(tmp_path), out)
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "cache"))
    hf_name = {"train": "train", "val": "validation", "test": "test"}  # `datasets` names val/ 'validation'
    assert sorted(ds) == sorted(hf_name[p.name] for p in paths)
    for path in paths:
        split = hf_name[path.name]
        records = read_records(path)
        assert ds[split].num_rows == len(records)
        row = ds[split][0]
        assert row["image"].size[0] > 0 and row["captions"] == records[0].captions
        assert [o["label"] for o in row["objects"]] == [o.label for o in records[0].objects]
        assert set(row["metadata"]) == set(METADATA_FIELDS)


def test_load_dataset_unlabeled_dota_test_split(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    convert("dota", fx.make_dota(tmp_path), out)
    ds = datasets.load_dataset("imagefolder", data_dir=str(out / "test"), cache_dir=str(tmp_path / "cache"))
    assert ds["train"][0]["objects"] == []


def test_cli_convert(tmp_path, capsys):
    src, out = fx.make_rsicd(tmp_path), tmp_path / "out"
    assert main(["convert", "--format", "rsicd", "--src", str(src), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert len(read_records(out / "train")) == 3
    assert main(["convert", "--format", "rsicd", "--src", str(src), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    (out / "stale").mkdir()
    assert main(["convert", "--format", "rsicd", "--src", str(src), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale").exists() and leftovers(tmp_path) == []


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="rsicd, fmow, dior, dior-rsvg, dota"):
        convert("coco", tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------- bad input

def _truncate(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def _rsicd_missing_image(root: Path) -> Path:
    src = fx.make_rsicd(root)
    (src / "RSICD_images" / "parking_7.jpg").unlink()
    return src


def _rsicd_truncated(root: Path) -> Path:
    src = fx.make_rsicd(root)
    _truncate(src / "dataset_rsicd.json")
    return src


def _fmow_truncated(root: Path) -> Path:
    src = fx.make_fmow(root)
    _truncate(src / "val/lake_or_pond/lake_or_pond_5/lake_or_pond_5_0_rgb.json")
    return src


def _fmow_missing_image(root: Path) -> Path:
    src = fx.make_fmow(root)
    (src / "test/port/port_9/port_9_0_rgb.jpg").unlink()
    return src


def _fmow_unknown_class(root: Path) -> Path:
    src = fx.make_fmow(root)
    fx.fmow_sample(src, "val", "park", 7, 0, fx.fmow_json(20, 20, [{"box": [1, 1, 2, 2], "category": "castle"}]))
    return src


def _fmow_bad_timestamp(root: Path) -> Path:
    src = fx.make_fmow(root)
    fx.fmow_sample(src, "val", "park", 7, 0, fx.fmow_json(20, 20, [], timestamp="yesterday"))
    return src


def _dior_missing_split(root: Path) -> Path:
    src = fx.make_dior(root)
    (src / "ImageSets/Main/val.txt").unlink()
    return src


def _dior_bad_xml(root: Path) -> Path:
    src = fx.make_dior(root)
    path = src / "Annotations/Horizontal Bounding Boxes/00004.xml"
    path.write_text(path.read_text().replace("</bndbox>", "</bnbox>"))
    return src


def _dior_unknown_class(root: Path) -> Path:
    src = fx.make_dior(root)
    path = src / "Annotations/Horizontal Bounding Boxes/00004.xml"
    path.write_text(path.read_text().replace("<name>ship</name>", "<name>submarine</name>"))
    return src


def _dior_missing_image(root: Path) -> Path:
    src = fx.make_dior(root)
    (src / "ImageSets/Main/test.txt").write_text("00004\n00005\n")
    return src


def _dior_bad_number(root: Path) -> Path:
    src = fx.make_dior(root)
    path = src / "Annotations/Horizontal Bounding Boxes/00003.xml"
    path.write_text(path.read_text().replace("<xmax>40</xmax>", "<xmax>4O</xmax>"))
    return src


def _rsvg_index_out_of_range(root: Path) -> Path:
    src = fx.make_dior_rsvg(root)
    (src / "val.txt").write_text("4\n60\n")
    return src


def _rsvg_missing_split(root: Path) -> Path:
    src = fx.make_dior_rsvg(root)
    (src / "test.txt").unlink()
    return src


def _dota_with(split: str, ident: str, text: str):
    def make(root: Path) -> Path:
        return fx.make_dota(root, extra={(split, ident): text})
    return make


def _dota_missing_image(root: Path) -> Path:
    src = fx.make_dota(root)
    (src / "val/labelTxt/P0007.txt").write_text("gsd:0.5\n")
    return src


BAD_INPUTS = {  # name -> (builder, pieces the message must contain)
    "rsicd image missing": (_rsicd_missing_image, ["dataset_rsicd.json", "parking_7.jpg", "missing"]),
    "rsicd truncated json": (_rsicd_truncated, ["dataset_rsicd.json, line 1", "invalid JSON"]),
    "fmow truncated json": (_fmow_truncated, ["lake_or_pond_5_0_rgb.json, line", "invalid JSON"]),
    "fmow image missing": (_fmow_missing_image, ["port_9_0_rgb.json", "port_9_0_rgb.jpg missing"]),
    "fmow unknown class": (_fmow_unknown_class, ["park_7_0_rgb.json", "unknown category 'castle'"]),
    "fmow bad timestamp": (_fmow_bad_timestamp, ["park_7_0_rgb.json", "'timestamp'"]),
    "dior split file missing": (_dior_missing_split, ["val.txt", "split file missing"]),
    "dior xml does not parse": (_dior_bad_xml, ["00004.xml, line 20", "XML does not parse"]),
    "dior unknown class": (_dior_unknown_class, ["00004.xml, line 13", "unknown class 'submarine'"]),
    "dior image missing": (_dior_missing_image, ["test.txt, line 2", "'00005' listed but missing"]),
    "dior bad number": (_dior_bad_number, ["00003.xml, line 13", "<xmax> is not a number"]),
    "rsvg index out of range": (_rsvg_index_out_of_range, ["val.txt, line 2", "object index 60 out of range"]),
    "rsvg split file missing": (_rsvg_missing_split, ["test.txt", "split file missing"]),
    "dota field count": (_dota_with("val", "P0005", "gsd:0.5\n1 1 5 1 5 5 1 5 ship 0\n1 1 5 1 5 5 ship 0\n"),
                         ["P0005.txt, line 3", "got 8"]),
    "dota coordinate": (_dota_with("val", "P0005", "imagesource:x\ngsd:0.5\n1 1 5 1 5 five 1 5 ship 0\n"),
                        ["P0005.txt, line 3", "coordinate 'five' is not a number"]),
    "dota unknown class": (_dota_with("val", "P0005", "1 1 5 1 5 5 1 5 submarine 0\n"),
                           ["P0005.txt, line 1", "unknown class 'submarine'"]),
    "dota bad gsd": (_dota_with("val", "P0005", "imagesource:x\ngsd:fine\n"), ["P0005.txt, line 2", "gsd 'fine'"]),
    "dota label without image": (_dota_missing_image, ["P0007.txt", "no image"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path, case):
    make, pieces = BAD_INPUTS[case]
    fmt = case.split()[0].replace("rsvg", "dior-rsvg")
    src = make(tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(DataFormatError) as err:
        convert(fmt, src, out)
    for piece in pieces:
        assert piece in str(err.value)
    assert not out.exists() and leftovers(tmp_path) == []


def test_dota_wrong_field_count_message(tmp_path):
    src = _dota_with("val", "P0005", "gsd:0.5\n1 1 5 1 5 5 1 5 ship 0\n1 1 5 1 5 5 ship 0\n")(tmp_path)
    with pytest.raises(DataFormatError, match=r"P0005\.txt, line 3: expected 10 fields .* got 8"):
        convert("dota", src, tmp_path / "out")


def test_failure_while_copying_a_later_split_leaves_nothing(tmp_path, monkeypatch):
    src, out = fx.make_dota(tmp_path), tmp_path / "out"
    import rslib.data.formats as formats

    real_add = formats.DatasetWriter.add

    def add(self, record, image, conditions=None):
        if self.out.name == "val":
            raise OSError("disk full")
        return real_add(self, record, image, conditions)

    monkeypatch.setattr(formats.DatasetWriter, "add", add)
    with pytest.raises(OSError, match="disk full"):
        convert("dota", src, out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_failed_overwrite_keeps_previous_output(tmp_path):
    src, out = fx.make_rsicd(tmp_path), tmp_path / "out"
    convert("rsicd", src, out)
    _truncate(src / "dataset_rsicd.json")
    with pytest.raises(DataFormatError):
        convert("rsicd", src, out, overwrite=True)
    assert len(read_records(out / "train", check_files=True)) == 3 and leftovers(tmp_path) == []


# --------------------------------------------------------------------- CC-Diff metadata

def _record(n_objects: int, captions: list[str] | None = None) -> Record:
    objs = [ObjectAnnotation.from_obb(f"c{i}", [0.1, 0.1, 0.2, 0.1, 0.2, 0.3, 0.1, 0.3]) for i in range(n_objects)]
    return Record(f"images/{n_objects}.png", ["first caption", "second"] if captions is None else captions,
                  objects=objs)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ccdiff_metadata_pads_and_truncates(tmp_path):
    path = tmp_path / "cc" / "metadata.jsonl"
    write_ccdiff_metadata([_record(2), _record(8), _record(0, captions=[])], path, max_instances=6)
    short, long, empty = _read_jsonl(path)
    assert list(short) == ["file_name", "caption", "bndboxes", "obboxes"]
    assert short["caption"] == ["first caption", "c0", "c1", "", "", "", ""]
    assert short["bndboxes"][0] == approx_list([0.1, 0.1, 0.2, 0.3]) and short["bndboxes"][2:] == [[0.0] * 4] * 4
    assert short["obboxes"][1] == approx_list([0.1, 0.1, 0.2, 0.1, 0.2, 0.3, 0.1, 0.3])
    assert short["obboxes"][2:] == [[0.0] * 8] * 4
    assert long["caption"] == ["first caption"] + [f"c{i}" for i in range(6)]
    assert len(long["bndboxes"]) == 6 and len(long["obboxes"]) == 6
    assert empty["caption"] == [""] * 7 and empty["bndboxes"] == [[0.0] * 4] * 6


def test_ccdiff_metadata_without_limit_keeps_all(tmp_path):
    path = tmp_path / "metadata.jsonl"
    write_ccdiff_metadata([_record(8), _record(0)], path, max_instances=None)
    many, none = _read_jsonl(path)
    assert len(many["caption"]) == 9 and len(many["bndboxes"]) == 8 and len(many["obboxes"]) == 8
    assert none == {"file_name": "images/0.png", "caption": ["first caption"], "bndboxes": [], "obboxes": []}


def test_ccdiff_metadata_pads_without_truncating(tmp_path):
    """DOTA as upstream writes it: padded to 6, never truncated."""
    path = tmp_path / "metadata.jsonl"
    write_ccdiff_metadata([_record(9), _record(2)], path, max_instances=None, pad_to=6)
    many, few = _read_jsonl(path)
    assert many["caption"] == ["first caption"] + [f"c{i}" for i in range(9)] and len(many["obboxes"]) == 9
    assert few["caption"] == ["first caption", "c0", "c1", "", "", "", ""] and len(few["bndboxes"]) == 6
    with pytest.raises(ValueError, match="pad_to must be >= 0 or None, got -1"):
        write_ccdiff_metadata([], path, pad_to=-1)


def test_ccdiff_split_uses_upstream_counts_per_format(tmp_path):
    extra = {("train", "P0011"): "gsd:0.5\n" + "".join(f"{x} 1 {x + 3} 1 {x + 3} 4 {x} 4 small-vehicle 0\n"
                                                        for x in range(0, 36, 4))}  # 9 vehicles
    convert("dota", fx.make_dota(tmp_path, extra=extra), tmp_path / "dota")
    assert write_ccdiff_split(tmp_path / "dota" / "train", tmp_path / "cc_dota.jsonl") == (None, 6)
    rows = {row["file_name"]: row for row in _read_jsonl(tmp_path / "cc_dota.jsonl")}
    assert len(rows["images/P0011.png"]["caption"]) == 10  # all 9 kept
    assert rows["images/P0000.png"]["caption"][1:] == ["plane", "small-vehicle", "", "", "", ""]
    convert("dior-rsvg", fx.make_dior_rsvg(tmp_path), tmp_path / "rsvg")
    assert write_ccdiff_split(tmp_path / "rsvg" / "train", tmp_path / "cc_rsvg.jsonl") == (6, 6)
    [row] = _read_jsonl(tmp_path / "cc_rsvg.jsonl")
    assert row["caption"][0].startswith("This is an aerial image of") and row["caption"][1:] == [
        "vehicle", "vehicle", "", "", "", ""]
    assert CCDIFF_INSTANCES == {"dior": (6, 6), "dior-rsvg": (6, 6), "dota": (None, 6)}


def test_ccdiff_metadata_from_converted_set(tmp_path):
    out = tmp_path / "out"
    convert("dior", fx.make_dior(tmp_path), out)
    write_ccdiff_metadata(read_records(out / "train"), out / "train" / "ccdiff.jsonl", max_instances=2)
    row = _read_jsonl(out / "train" / "ccdiff.jsonl")[0]
    assert row["caption"] == ["an aerial image with 2 airplanes and 1 vehicle", "airplane", "airplane"]


# ------------------------------------------------------------------------------ round trip

def test_record_json_round_trip(tmp_path):
    rec = Record("images/a.png", ["one", "two"], {"year": 2015, "month": 3, "gsd": 0.5},
                 [ObjectAnnotation.from_obb("ship", [0.1, 0.2, 0.3, 0.2, 0.3, 0.4, 0.1, 0.4]),
                  ObjectAnnotation.from_bbox("plane", [0.5, 0.5, 0.75, 1.0])],
                 scene="port", conditions={"depth": "conditions/depth/a.png"})
    obj = json.loads(json.dumps(rec.to_json()))
    back = Record.from_json(obj, "metadata.jsonl", 1)
    assert back.to_json() == rec.to_json()
    assert back.metadata == {k: {"year": 2015, "month": 3, "gsd": 0.5}.get(k) for k in METADATA_FIELDS}
    assert back.objects[0].bbox == approx_list([0.1, 0.2, 0.3, 0.4]) and back.scene == "port"
    assert obj["depth_file_name"] == "conditions/depth/a.png"


def test_converted_records_round_trip(tmp_path):
    out = tmp_path / "out"
    convert("dota", fx.make_dota(tmp_path), out)
    for line in (out / "train" / "metadata.jsonl").read_text().splitlines():
        obj = json.loads(line)
        assert Record.from_json(obj, "metadata.jsonl").to_json() == obj


def test_formats_is_one_import_for_users_and_rslib_imports_the_owning_modules():
    """``rslib.data.formats`` re-exports every name it lists; inside rslib each name comes from the module that owns
    it (records, captions, ccdiff_metadata, converters), never through formats."""
    import rslib.data.formats as formats

    namespace: dict = {}
    exec("from rslib.data.formats import *", namespace)
    assert set(formats.__all__) <= set(namespace) and "convert" in namespace and "Record" in namespace
    root = Path(formats.__file__).resolve().parents[1]
    through_formats = [str(p.relative_to(root)) for p in sorted(root.rglob("*.py")) if p.name != "formats.py"
                       and ("rslib.data.formats import" in p.read_text() or "rslib.data import formats" in p.read_text())]
    assert through_formats == []
