"""The record format and the readers of RSICD, fMoW, DIOR(-R), DIOR-RSVG and DOTA."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

import fixtures_real as fx
from rslib.data.__main__ import main
from rslib.data.formats import (
    METADATA_FIELDS,
    DataFormatError,
    ObjectAnnotation,
    Record,
    convert,
    read_records,
    write_ccdiff_metadata,
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
    assert train["00001.jpg"].captions == ["the vehicle on the left", "the vehicle on the right"]
    assert train["00001.jpg"].objects[1].bbox == approx_list([0.75, 0.05, 0.9, 0.2])
    ship = test["00002.jpg"]
    assert ship.captions == ["a ship in the harbor", "the large ship"]
    assert [o.label for o in ship.objects] == ["ship"]  # the same box twice is one object


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
