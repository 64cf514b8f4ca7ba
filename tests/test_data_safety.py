"""The converters and the data command line turned against their user: hostile names, invalid values, --overwrite.

Each bad source is converted through ``python -m rslib.data convert`` and must give the documented exit status and
a one-line message naming the file (and the line or entry), and leave the file system exactly as it was: nothing
outside ``--out``, no half-written output, no leftover.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

import fixtures_real as fx
from rslib.data.__main__ import main
from rslib.data import formats
from rslib.data.converters import dota_tiling
from rslib.data.formats import DataFormatError, Record, convert, read_records

REPO = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, bytes | str]:
    """Every path under ``root`` (hidden ones included) with its content, or its link target, or 'dir'."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[key] = "dir"
        else:
            out[key] = p.read_bytes()
    return out


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``python -m rslib.data`` (argparse's exit included)."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def outside_image(root: Path) -> Path:
    """A valid image outside the source folder, for symbolic links to point at."""
    return fx.write_image(root / "elsewhere" / "secret.jpg")


def link_out(path: Path, root: Path) -> None:
    """Replace ``path`` by a symbolic link to a file outside the source folder."""
    path.unlink()
    path.symlink_to(outside_image(root))


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def line_of(path: Path, text: str, start: int = 1) -> int:
    """The number of the first line at or after ``start`` holding ``text``."""
    lines = path.read_text().splitlines()
    return next(i for i, s in enumerate(lines, start=1) if i >= start and text in s)


# ------------------------------------------------------------------------------ the bad sources
# Each builder writes a source under ``root`` and returns (source folder, pieces the message must contain).

Builder = Callable[[Path], tuple[Path, list[str]]]


def _rsicd_entry(root: Path, name: str) -> tuple[Path, list[str]]:
    src = fx.make_rsicd(root / "a")
    ann = src / "dataset_rsicd.json"
    data = json.loads(ann.read_text())
    data["images"][0]["filename"] = name
    ann.write_text(json.dumps(data))
    return src, ["dataset_rsicd.json", "images[0]", repr(name)]


def rsicd_traversal(root: Path) -> tuple[Path, list[str]]:
    fx.write_image(root / "x" / "evil.jpg")  # what it reaches from a/RSICD/RSICD_images/; written unchecked, it
    src, pieces = _rsicd_entry(root, "../../../x/evil.jpg")  # would land beside --out, outside it
    return src, pieces + ["'..' component"]


def rsicd_absolute(root: Path) -> tuple[Path, list[str]]:
    src, pieces = _rsicd_entry(root, str(outside_image(root)))
    return src, pieces + ["absolute path"]


def rsicd_symlink(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_rsicd(root)
    link_out(src / "RSICD_images" / "beach_3.jpg", root)
    return src, ["dataset_rsicd.json", "images[3] (beach_3.jpg)", "secret.jpg", "outside"]


def rsicd_empty_image(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_rsicd(root)
    (src / "RSICD_images" / "beach_3.jpg").write_bytes(b"")
    return src, ["beach_3.jpg", "image does not decode"]


def rsicd_not_utf8(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_rsicd(root)
    ann = src / "dataset_rsicd.json"
    ann.write_bytes(ann.read_bytes().replace(b"sentence 2 about beach_3", b"sentence 2 about b\xe9ach_3", 1))
    return src, ["dataset_rsicd.json, line 1", "not UTF-8", "0xe9"]


def _fmow_airport(root: Path, **changes) -> tuple[Path, Path]:
    src = fx.make_fmow(root)
    js = src / "train/airport/airport_0/airport_0_0_rgb.json"
    data = json.loads(js.read_text())
    for key, value in changes.items():
        if key == "box":
            data["bounding_boxes"][0]["box"] = value
        else:
            data[key] = value
    js.write_text(json.dumps(data, indent=2))
    return src, js


def fmow_negative_width(root: Path) -> tuple[Path, list[str]]:
    src, _ = _fmow_airport(root, box=[14, 2, -10, 8])
    return src, ["airport_0_0_rgb.json", "bounding_boxes[0]", "inverted box", "[14, 2, -10, 8]"]


def fmow_huge_coordinate(root: Path) -> tuple[Path, list[str]]:
    src, _ = _fmow_airport(root, box=[4, 2, 1e308, 8])
    return src, ["airport_0_0_rgb.json", "bounding_boxes[0]", "coordinate far outside the image", "1e+308"]


def fmow_nan_coordinate(root: Path) -> tuple[Path, list[str]]:
    src, js = _fmow_airport(root)
    edit(js, "4,\n", "NaN,\n")  # the first number of the first box
    return src, ["airport_0_0_rgb.json", "bounding_boxes[0]", "coordinate is not finite", "[nan, 2, 10, 8]"]


def fmow_cloud_cover(root: Path) -> tuple[Path, list[str]]:
    src, _ = _fmow_airport(root, cloud_cover=1e9)
    return src, ["airport_0_0_rgb.json", "'cloud_cover' is outside [0, 100]", "1000000000.0"]


def fmow_gsd(root: Path) -> tuple[Path, list[str]]:
    src, _ = _fmow_airport(root, gsd=1e308)
    return src, ["airport_0_0_rgb.json", "'gsd' is outside (0, 1000]", "1e+308"]


def fmow_symlink(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_fmow(root)
    link_out(src / "val/lake_or_pond/lake_or_pond_5/lake_or_pond_5_0_rgb.jpg", root)
    return src, ["lake_or_pond_5_0_rgb.jpg", "secret.jpg", "outside"]


def fmow_empty_image(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_fmow(root)
    (src / "test/port/port_9/port_9_0_rgb.jpg").write_bytes(b"")
    return src, ["port_9_0_rgb.jpg", "image does not decode"]


def fmow_not_utf8(root: Path) -> tuple[Path, list[str]]:
    src, js = _fmow_airport(root)
    line = line_of(js, "country_code")
    js.write_bytes(js.read_bytes().replace(b'"ITA"', b'"IT\xc0"'))
    return src, ["airport_0_0_rgb.json", f"line {line}", "not UTF-8", "0xc0"]


def _dior_xml(src: Path, ident: str) -> Path:
    return src / "Annotations" / "Horizontal Bounding Boxes" / f"{ident}.xml"


def dior_inverted_box(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dior(root)
    xml = _dior_xml(src, "00004")
    edit(xml, "<xmin>10</xmin>", "<xmin>30</xmin>")  # xmax is 20
    return src, ["00004.xml", f"line {line_of(xml, '<object>')}", "inverted box", "ship box [30, 10, 20, 30]"]


def dior_huge_coordinate(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dior(root)
    xml = _dior_xml(src, "00004")
    edit(xml, "<ymax>30</ymax>", "<ymax>1e308</ymax>")
    return src, ["00004.xml", f"line {line_of(xml, '<object>')}", "coordinate far outside the image", "1e+308"]


def dior_nan_coordinate(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dior(root)
    xml = _dior_xml(src, "00004")
    edit(xml, "<ymax>30</ymax>", "<ymax>nan</ymax>")
    return src, ["00004.xml", f"line {line_of(xml, '<object>')}", "coordinate is not finite", "nan"]


def dior_box_outside(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dior(root)
    xml = _dior_xml(src, "00004")
    edit(xml, "<xmin>10</xmin>", "<xmin>45</xmin>")
    edit(xml, "<xmax>20</xmax>", "<xmax>60</xmax>")  # right of the 40 x 40 image
    return src, ["00004.xml", f"line {line_of(xml, '<object>')}", "box outside the image", "on a 40 x 40 image"]


def dior_latin1(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dior(root)
    xml = _dior_xml(src, "00004")
    line = line_of(xml, "<database>")
    xml.write_bytes(xml.read_bytes().replace(b"<database>DIOR</database>", b"<database>DIOR \xe9t\xe9</database>"))
    return src, ["00004.xml", f"line {line}", "not UTF-8", "0xe9"]


def dior_truncated_xml(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dior(root)
    xml = _dior_xml(src, "00002")
    xml.write_bytes(xml.read_bytes()[:200])
    return src, ["00002.xml, line", "XML does not parse", "truncated"]


def dior_truncated_image(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dior(root)
    image = src / "JPEGImages-trainval" / "00002.jpg"
    image.write_bytes(image.read_bytes()[:300])
    return src, ["00002.jpg", "image does not decode", "Truncated"]


def dior_symlink(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dior(root)
    link_out(src / "JPEGImages-test" / "00004.jpg", root)
    return src, ["00004.jpg", "secret.jpg", "outside"]


def rsvg_huge_coordinate(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dior_rsvg(root)
    xml = src / "Annotations" / "00003.xml"
    edit(xml, "<xmax>40</xmax>", "<xmax>1e308</xmax>")
    return src, ["00003.xml", f"line {line_of(xml, '<object>')}", "coordinate far outside the image"]


def rsvg_degenerate_box(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dior_rsvg(root)
    xml = src / "Annotations" / "00004.xml"
    edit(xml, "<ymax>25</ymax>", "<ymax>15</ymax>")  # ymin is 15
    return src, ["00004.xml", f"line {line_of(xml, '<object>')}", "degenerate box", "[5, 15, 35, 15]"]


def rsvg_bad_token(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dior_rsvg(root)
    (src / "train.txt").write_text("0\nzero\n2\n")
    return src, ["train.txt, line 2", "'zero' is not an object index"]


def rsvg_not_utf8(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dior_rsvg(root)
    (src / "val.txt").write_bytes(b"4\n\xff\n")
    return src, ["val.txt, line 2", "not UTF-8", "0xff"]


def rsvg_symlink(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dior_rsvg(root)
    xml = src / "Annotations" / "00004.xml"
    target = root / "elsewhere" / "00004.xml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(xml.read_text())
    xml.unlink()
    xml.symlink_to(target)
    return src, ["00004.xml", "outside"]


def _dota(text: str) -> Builder:
    def make(root: Path) -> tuple[Path, list[str]]:
        src = fx.make_dota(root, extra={("val", "P0005"): text})
        label = src / "val" / "labelTxt" / "P0005.txt"
        return src, [f"P0005.txt, line {len(text.splitlines())}"]
    return make


def _dota_case(text: str, *pieces: str) -> Builder:
    def make(root: Path) -> tuple[Path, list[str]]:
        src, first = _dota(text)(root)
        return src, first + list(pieces)
    return make


dota_huge = _dota_case("gsd:0.5\n1 1 5 1 5 1e308 1 5 ship 0\n", "coordinate far outside the image", "1e+308")
dota_nan = _dota_case("gsd:0.5\n1 1 5 1 5 nan 1 5 ship 0\n", "coordinate is not finite")
dota_outside = _dota_case("gsd:0.5\n-30 -30 -20 -30 -20 -20 -30 -20 ship 0\n", "box outside the image")
dota_degenerate = _dota_case("gsd:0.5\n5 1 5 1 5 9 5 9 ship 0\n", "degenerate box")
dota_gsd = _dota_case("imagesource:x\ngsd:1e308\n", "gsd is outside (0, 1000]", "1e308")


def dota_not_utf8(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dota(root, extra={("val", "P0005"): "imagesource:x\ngsd:0.5\n"})
    label = src / "val" / "labelTxt" / "P0005.txt"
    label.write_bytes(b"imagesource:G\xf6ogle\ngsd:0.5\n")
    return src, ["P0005.txt, line 1", "not UTF-8", "0xf6"]


def dota_empty_image(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dota(root)
    (src / "test" / "images" / "P0003.png").write_bytes(b"")
    return src, ["P0003.png", "image does not decode"]


def dota_truncated_image(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dota(root)
    image = src / "test" / "images" / "P0003.png"
    image.write_bytes(image.read_bytes()[:60])
    return src, ["P0003.png", "image does not decode"]


def dota_symlink(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dota(root)
    link_out(src / "test" / "images" / "P0003.png", root)
    return src, ["P0003.png", "secret.jpg", "outside"]


def dota_looping_images(root: Path) -> tuple[Path, list[str]]:
    src = fx.make_dota(root)
    images = src / "test" / "images"
    for p in images.iterdir():
        p.unlink()
    images.rmdir()
    images.symlink_to("images")  # a link to itself
    return src, [str(Path("test") / "images"), "leads nowhere", "loop"]


BAD_SOURCES: dict[str, tuple[str, Builder]] = {
    "rsicd traversal": ("rsicd", rsicd_traversal),
    "rsicd absolute name": ("rsicd", rsicd_absolute),
    "rsicd symlink": ("rsicd", rsicd_symlink),
    "rsicd 0-byte image": ("rsicd", rsicd_empty_image),
    "rsicd not utf-8": ("rsicd", rsicd_not_utf8),
    "fmow negative width": ("fmow", fmow_negative_width),
    "fmow huge coordinate": ("fmow", fmow_huge_coordinate),
    "fmow nan coordinate": ("fmow", fmow_nan_coordinate),
    "fmow cloud cover 1e9": ("fmow", fmow_cloud_cover),
    "fmow gsd 1e308": ("fmow", fmow_gsd),
    "fmow symlink": ("fmow", fmow_symlink),
    "fmow 0-byte image": ("fmow", fmow_empty_image),
    "fmow not utf-8": ("fmow", fmow_not_utf8),
    "dior inverted box": ("dior", dior_inverted_box),
    "dior huge coordinate": ("dior", dior_huge_coordinate),
    "dior nan coordinate": ("dior", dior_nan_coordinate),
    "dior box outside": ("dior", dior_box_outside),
    "dior latin-1 xml": ("dior", dior_latin1),
    "dior truncated xml": ("dior", dior_truncated_xml),
    "dior truncated image": ("dior", dior_truncated_image),
    "dior symlink": ("dior", dior_symlink),
    "rsvg huge coordinate": ("dior-rsvg", rsvg_huge_coordinate),
    "rsvg degenerate box": ("dior-rsvg", rsvg_degenerate_box),
    "rsvg bad token on line 2": ("dior-rsvg", rsvg_bad_token),
    "rsvg not utf-8": ("dior-rsvg", rsvg_not_utf8),
    "rsvg symlink": ("dior-rsvg", rsvg_symlink),
    "dota huge coordinate": ("dota", dota_huge),
    "dota nan coordinate": ("dota", dota_nan),
    "dota box outside": ("dota", dota_outside),
    "dota degenerate box": ("dota", dota_degenerate),
    "dota gsd 1e308": ("dota", dota_gsd),
    "dota not utf-8": ("dota", dota_not_utf8),
    "dota 0-byte image": ("dota", dota_empty_image),
    "dota truncated image": ("dota", dota_truncated_image),
    "dota symlink": ("dota", dota_symlink),
    "dota looping test/images": ("dota", dota_looping_images),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_is_refused_in_one_line_and_changes_nothing(tmp_path, capsys, case):
    fmt, build = BAD_SOURCES[case]
    src, pieces = build(tmp_path / "root")
    out = tmp_path / "out"
    before = tree(tmp_path)
    rc, stdout, stderr = run(["convert", "--format", fmt, "--src", str(src), "--out", str(out)], capsys)
    assert rc == 1, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr and stdout == ""
    for piece in pieces:
        assert piece in stderr, (piece, stderr)
    assert tree(tmp_path) == before  # nothing written anywhere: no output, no leftover, nothing outside --out


# Invalid values (not hostile names or broken files) may be dropped instead: (case, what is dropped, reason)
SKIPPABLE = [
    ("fmow negative width", "object", "inverted box"),
    ("fmow huge coordinate", "object", "coordinate far outside the image"),
    ("fmow cloud cover 1e9", "record", "'cloud_cover' is outside [0, 100]"),
    ("fmow gsd 1e308", "record", "'gsd' is outside (0, 1000]"),
    ("rsicd 0-byte image", "record", "image does not decode"),
    ("dior inverted box", "object", "inverted box"),
    ("dior nan coordinate", "object", "coordinate is not finite"),
    ("dior box outside", "object", "box outside the image"),
    ("dior truncated image", "record", "image does not decode"),
    ("rsvg degenerate box", "object", "degenerate box (zero width or height)"),
    ("dota huge coordinate", "object", "coordinate far outside the image"),
    ("dota box outside", "object", "box outside the image"),
    ("dota gsd 1e308", "record", "gsd is outside (0, 1000]"),
    ("dota 0-byte image", "record", "image does not decode"),
]


@pytest.mark.parametrize("case,dropped,reason", SKIPPABLE)
def test_skip_invalid_drops_and_counts(tmp_path, capsys, case, dropped, reason):
    fmt, build = BAD_SOURCES[case]
    src, _ = build(tmp_path / "root")
    good = tmp_path / "good"
    assert convert(fmt, fx.__dict__[f"make_{fmt.replace('-', '_')}"](tmp_path / "clean"), good)
    out = tmp_path / "out"
    rc, stdout, stderr = run(["convert", "--format", fmt, "--src", str(src), "--out", str(out), "--skip-invalid"],
                             capsys)
    assert rc == 0, stderr
    assert f"skipped 1 {dropped}: {reason}" in stdout
    assert formats.dataset_info(out)["skipped"] == [{"dropped": dropped, "reason": reason, "count": 1}]
    records = [r for split in ("train", "val", "test") if (out / split).is_dir()
               for r in read_records(out / split, check_files=True)]
    assert records and all(o.bbox[0] < o.bbox[2] and o.bbox[1] < o.bbox[3] for r in records for o in r.objects)
    if dropped == "record":
        clean = [r for split in ("train", "val", "test") if (good / split).is_dir() for r in read_records(good / split)]
        n_extra = 1 if fmt == "dota" and "gsd" in case else 0  # the extra label file's image
        assert len(records) == len(clean) + n_extra - 1


def test_legitimate_layouts_still_convert(tmp_path):
    """Subfolders in file names, a symbolic link to the image folder, and links that stay inside are fine."""
    src = fx.make_rsicd(tmp_path)
    shared = tmp_path / "disk" / "RSICD_images"
    shared.parent.mkdir()
    (src / "RSICD_images").rename(shared)
    (src / "RSICD_images").symlink_to(shared)
    (shared / "sub").mkdir()
    (shared / "airport_1.jpg").rename(shared / "sub" / "airport_1.jpg")
    (shared / "beach_copy.jpg").symlink_to("beach_3.jpg")  # a link that stays in the folder
    ann = src / "dataset_rsicd.json"
    data = json.loads(ann.read_text())
    data["images"][0]["filename"] = "sub/airport_1.jpg"
    data["images"][3]["filename"] = "beach_copy.jpg"
    ann.write_text(json.dumps(data))
    out = tmp_path / "out"
    convert("rsicd", src, out)
    names = {r.file_name for r in read_records(out / "train", check_files=True)}
    assert "images/sub/airport_1.jpg" in names
    assert [r.file_name for r in read_records(out / "val", check_files=True)] == ["images/beach_copy.jpg"]


# ------------------------------------------------------------------------------ DOTA tiles

TILES = ["--tile", "32", "--gap", "8"]


@pytest.mark.parametrize("case", [case for case in BAD_SOURCES if case.startswith("dota")])
def test_tiling_refuses_the_same_bad_sources(tmp_path, capsys, case):
    fmt, build = BAD_SOURCES[case]
    src, pieces = build(tmp_path / "root")
    before = tree(tmp_path)
    rc, stdout, stderr = run(["convert", "--format", fmt, "--src", str(src), "--out", str(tmp_path / "out"), *TILES],
                             capsys)
    assert rc == 1 and stderr.count("\n") == 1 and stdout == ""
    assert all(piece in stderr for piece in pieces), stderr
    assert tree(tmp_path) == before


def _spoil_pixels(path: Path) -> None:
    """Spoil a PNG's compressed pixels but keep every chunk's CRC right: the chunk checks pass, decoding fails."""
    import zlib

    data, pos = bytearray(path.read_bytes()), 8
    while pos < len(data):
        length, body = int.from_bytes(data[pos:pos + 4], "big"), pos + 8
        if data[pos + 4:body] == b"IDAT":
            data[body + 2:body + length] = b"\xff" * (length - 2)  # after the zlib header: an invalid block
            data[body + length:body + length + 4] = zlib.crc32(bytes(data[pos + 4:body + length])).to_bytes(4, "big")
        pos += 12 + length
    path.write_bytes(bytes(data))


def test_tiling_an_image_that_does_not_decode(tmp_path, capsys):
    src, out = fx.make_dota(tmp_path / "root"), tmp_path / "out"
    _spoil_pixels(src / "test" / "images" / "P0003.png")
    assert formats.image_problem(src / "test" / "images" / "P0003.png") is None  # only tiling decodes it
    before = tree(tmp_path)
    argv = ["convert", "--format", "dota", "--src", str(src), "--out", str(out), *TILES]
    rc, _, stderr = run(argv, capsys)
    assert rc == 1 and "P0003.png: image does not decode: broken data stream" in stderr
    assert tree(tmp_path) == before  # nothing written, nothing left
    rc, stdout, stderr = run(argv + ["--skip-invalid"], capsys)
    assert rc == 0, stderr
    assert "skipped 1 record: image does not decode" in stdout
    assert not (out / "test").exists()  # its only image is left out
    assert formats.dataset_info(out)["splits"] == ["train", "val"]
    assert {r.file_name for r in read_records(out / "val", check_files=True)} == {
        f"images/P0002__32__{x}___{y}.png" for x in (0, 8) for y in (0, 8)}
    assert formats.dataset_info(out)["tiles"]["tile"] == 32


def test_failure_while_tiling_leaves_nothing(tmp_path, monkeypatch):
    src, out = fx.make_dota(tmp_path / "root"), tmp_path / "out"
    before = tree(tmp_path)
    real_encode, calls = formats.encode_png, []

    def encode(pixels):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return real_encode(pixels)

    monkeypatch.setattr(dota_tiling, "encode_png", encode)  # where the tiles are encoded
    with pytest.raises(OSError, match="disk full"):
        convert("dota", src, out, tile=32, gap=8)
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------ metadata.jsonl

def _split_with(tmp_path: Path, **changes) -> Path:
    split = tmp_path / "split"
    fx.write_image(split / "images" / "a.png")
    row = {"file_name": "images/a.png", "captions": ["x"], "metadata": {}, "objects": [], "conditions": {}}
    row.update(changes)
    (split / "metadata.jsonl").write_text(json.dumps({"file_name": "images/a.png", "captions": ["ok"]}) + "\n"
                                          + json.dumps(row) + "\n")
    return split


@pytest.mark.parametrize("changes,pieces", [
    ({"file_name": "../a.png"}, ["'file_name'", "'..' component"]),
    ({"file_name": "/etc/passwd"}, ["'file_name'", "absolute path"]),
    ({"conditions": {"road": "../../road.png"}}, ["conditions['road']", "'..' component"]),
    ({"metadata": {"gsd": float("nan")}}, ["'gsd' is not finite"]),
    ({"metadata": {"year": True}}, ["'year' is not a number"]),
    ({"metadata": {"cloud_cover": 1e9}}, ["'cloud_cover' is outside [0, 100]"]),
    ({"objects": [{"label": "ship", "bbox": [0.5, 0.1, 1e308, 0.2]}]}, ["objects[0].bbox"]),
    ({"objects": [{"label": "ship", "bbox": [0.5, 0.1, 0.2, 0.2]}]}, ["objects[0].bbox"]),
])
def test_metadata_jsonl_refuses_unsafe_names_and_invalid_values(tmp_path, changes, pieces):
    split = _split_with(tmp_path, **changes)
    with pytest.raises(DataFormatError) as err:
        read_records(split)
    for piece in ["metadata.jsonl, line 2", *pieces]:
        assert piece in str(err.value)


def test_rsdataset_refuses_nan_metadata(tmp_path):
    from rslib.data.datasets import RSDataset

    split = _split_with(tmp_path, metadata={"gsd": float("nan")})
    with pytest.raises(DataFormatError, match=r"metadata.jsonl, line 2: metadata field 'gsd' is not finite"):
        RSDataset(split, size=16)


def test_record_files_must_stay_in_the_split_folder(tmp_path):
    split = _split_with(tmp_path)
    (split / "images" / "a.png").unlink()
    (split / "images" / "a.png").symlink_to(outside_image(tmp_path))
    read_records(split)  # the names themselves are fine
    with pytest.raises(DataFormatError, match=r"line 1: file: 'a.png' leads to .*secret.jpg, outside"):
        read_records(split, check_files=True)
    with pytest.raises(DataFormatError, match="absolute path"):
        Record.from_json({"file_name": "C:\\data\\a.png"}, "metadata.jsonl", 3)


# ------------------------------------------------------------------------------ --overwrite

def _users_folder(root: Path) -> Path:
    folder = root / "mine"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "thesis.txt").write_text("three years of work")
    return folder


@pytest.mark.parametrize("command", ["convert", "synthrs"])
def test_overwrite_refuses_a_folder_it_did_not_write(tmp_path, capsys, command):
    folder = _users_folder(tmp_path)
    before = tree(tmp_path)
    if command == "convert":
        argv = ["convert", "--format", "rsicd", "--src", str(fx.make_rsicd(tmp_path / "src")), "--out", str(folder)]
        before = tree(tmp_path)
    else:
        argv = ["synthrs", "--out", str(folder), "--n", "2", "--size", "16", "--workers", "1"]
    rc, _, stderr = run([*argv, "--overwrite"], capsys)
    assert rc == 2 and stderr.count("\n") == 1
    assert "was not written by python -m rslib.data" in stderr and "choose another output folder" in stderr
    assert tree(tmp_path) == before
    assert (folder / "notes" / "thesis.txt").read_text() == "three years of work"


def test_overwrite_replaces_what_it_wrote_and_an_empty_folder_is_fine(tmp_path, capsys):
    out = tmp_path / "split"
    out.mkdir()  # an empty folder holds nothing to lose
    assert run(["synthrs", "--out", str(out), "--n", "2", "--size", "16", "--workers", "1"], capsys)[0] == 0
    assert json.loads((out / formats.DATASET_MARKER).read_text())["format"] == "synthrs"
    (out / "scratch.txt").write_text("made inside a data set")
    assert run(["synthrs", "--out", str(out), "--n", "3", "--size", "16", "--workers", "1"], capsys)[0] == 2
    assert run(["synthrs", "--out", str(out), "--n", "3", "--size", "16", "--workers", "1", "--overwrite"],
               capsys)[0] == 0
    assert len(read_records(out)) == 3 and not (out / "scratch.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]


def test_synthrs_splits_written_before_the_marker_are_still_regenerated(tmp_path):
    from rslib.data.synthrs import ensure_synthrs

    ensure_synthrs(tmp_path, {"train": 3}, size=16, workers=1)
    (tmp_path / "train" / formats.DATASET_MARKER).unlink()  # as an earlier version wrote it: synthrs.json only
    ensure_synthrs(tmp_path, {"train": 4}, size=16, workers=1)
    assert len(read_records(tmp_path / "train")) == 4


# ------------------------------------------------------------------------------ command-line arguments

@pytest.mark.parametrize("argv,piece", [
    (["synthrs", "--out", "{tmp}/s", "--n", "-3"], "--n: must be at least 1, got -3"),
    (["synthrs", "--out", "{tmp}/s", "--n", "3", "--size", "0"], "--size: must be at least 8, got 0"),
    (["synthrs", "--out", "{tmp}/s", "--n", "three"], "--n: expected an integer, got 'three'"),
    (["synthrs", "--out", "{tmp}/s", "--n", "3", "--workers", "-1"], "--workers: must be at least 0"),
    (["convert", "--format", "coco", "--src", "{tmp}", "--out", "{tmp}/o"], "invalid choice: 'coco'"),
    (["convert", "--format", "dota", "--src", "{tmp}/missing", "--out", "{tmp}/o"], "source folder does not exist"),
    (["convert", "--format", "rsicd", "--src", "{tmp}", "--out", "{tmp}/o", "--split", "val"],
     "a split is named only for a single DOTA split folder"),
    (["convert", "--format", "dota", "--src", "{tmp}", "--out", "{tmp}/o", "--tile", "40", "--gap", "40"],
     "the gap at least 0 and smaller than the tile"),
    (["convert", "--format", "dota", "--src", "{tmp}", "--out", "{tmp}/o", "--gap", "10"], "--gap needs --tile"),
    (["convert", "--format", "dota", "--src", "{tmp}", "--out", "{tmp}/o", "--tile", "0"],
     "--tile: must be at least 1, got 0"),
    (["convert", "--format", "dota", "--src", "{tmp}", "--out", "{tmp}/o", "--tile", "40", "--gap", "-1"],
     "--gap: must be at least 0, got -1"),
    (["convert", "--format", "rsicd", "--src", "{tmp}", "--out", "{tmp}/o", "--tile", "512"],
     "tiles (--tile, --gap) are cut only from DOTA images"),
    (["convert", "--format", "dior", "--src", "{tmp}", "--out", "{tmp}/o", "--dior-r", "{tmp}"],
     "a DIOR-R folder is joined only to DIOR-RSVG"),
    (["convert", "--format", "dior-rsvg", "--src", "{tmp}", "--out", "{tmp}/o", "--dior-r", "{tmp}/missing"],
     "DIOR-R folder does not exist"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, piece):
    before = tree(tmp_path)
    rc, stdout, stderr = run([a.format(tmp=tmp_path) for a in argv], capsys)
    assert rc == 2 and stdout == "" and piece in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr and "usage" not in stderr
    assert tree(tmp_path) == before


def test_write_split_refuses_bad_settings(tmp_path):
    from rslib.data.synthrs import write_split

    with pytest.raises(ValueError, match="n must be an integer >= 1, got -3"):
        write_split(tmp_path / "s", n=-3)
    with pytest.raises(ValueError, match="size must be an integer >= 8, got 0"):
        write_split(tmp_path / "s", n=3, size=0)
    assert list(tmp_path.iterdir()) == []


def test_xml_with_a_declared_encoding_is_read(tmp_path):
    src = fx.make_dior(tmp_path)
    xml = _dior_xml(src, "00004")
    text = xml.read_text().replace("<database>DIOR</database>", "<database>DIOR été</database>")
    xml.write_bytes(b"<?xml version='1.0' encoding='ISO-8859-1'?>\n" + text.encode("latin-1"))
    convert("dior", src, tmp_path / "out")
    assert len(read_records(tmp_path / "out" / "test")) == 1


# ------------------------------------------------------------------------------ DOTA as users have it

def test_dota_single_split_folder(tmp_path, capsys):
    """DOTA_devkit's image splitter writes one folder with images/ and labelTxt/."""
    full = fx.make_dota(tmp_path / "full")
    single = tmp_path / "trainsplit"
    (full / "train").rename(single)
    rc, stdout, _ = run(["convert", "--format", "dota", "--src", str(single), "--out", str(tmp_path / "a")], capsys)
    assert rc == 0 and stdout.strip() == f"wrote {tmp_path / 'a' / 'train'}"
    assert sorted(by.file_name for by in read_records(tmp_path / "a" / "train", check_files=True)) == [
        "images/P0000.png", "images/P0001.png"]
    assert run(["convert", "--format", "dota", "--src", str(single), "--out", str(tmp_path / "b"), "--split", "val"],
               capsys)[0] == 0
    assert len(read_records(tmp_path / "b" / "val")) == 2
    assert run(["convert", "--format", "dota", "--src", str(full), "--out", str(tmp_path / "c"), "--split", "val"],
               capsys)[0] == 2  # --split is only for a single split folder


@pytest.mark.parametrize("folder,classes_ok", [
    ("labelTxt-v1.5/DOTA-v1.5_train", True),
    ("labelTxt-v1.0/labelTxt", False),
    ("labelTxt-v1.0", False),
])
def test_dota_official_label_folder_names(tmp_path, folder, classes_ok):
    src = fx.make_dota(tmp_path, label_folder=folder.replace("_train", "_{split}"),
                       extra={("val", "P0009"): "1 1 9 1 9 9 1 9 container-crane 0\n"})
    for split in ("train", "val"):  # the archive's folder is named after its split
        for p in list((src / split).glob("labelTxt-*/DOTA-v1.5_{split}")):
            p.rename(p.with_name(f"DOTA-v1.5_{split}"))
    if classes_ok:
        convert("dota", src, tmp_path / "out")
        assert [o.label for r in read_records(tmp_path / "out" / "val") for o in r.objects
                if r.file_name.endswith("P0009.png")] == ["container-crane"]
    else:  # v1.0 has no container-crane: read from the v1.0 folder, the class is refused
        with pytest.raises(DataFormatError, match="P0009.txt, line 1: unknown class 'container-crane'"):
            convert("dota", src, tmp_path / "out")


# ------------------------------------------------------------------------------ kills and leftovers

KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from rslib.data.formats import convert
out = Path(sys.argv[3])
real_replace = os.replace
def replace(src, dst, *a, **k):  # SIGKILL at the chosen rename: no clean-up code runs
    if sys.argv[4] == "between-renames" and Path(dst) == out and Path(src).name.startswith(".out."):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **k)
os.replace = replace
if sys.argv[4] == "while-copying":
    import shutil
    real_copy = shutil.copyfile
    def copy(a, b, **k):
        real_copy(a, b, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    shutil.copyfile = copy
convert(sys.argv[1], sys.argv[2], out, overwrite=True)
"""


def _killed_convert(src: Path, out: Path, when: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, "rsicd", str(src), str(out), when], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_kill_between_the_renames_of_overwrite_is_recovered(tmp_path, capsys):
    src, out = fx.make_rsicd(tmp_path / "src"), tmp_path / "out"
    convert("rsicd", src, out)
    first = tree(out)
    _killed_convert(src, out, "between-renames")
    assert not out.exists() and any(p.name.startswith(".out.") for p in tmp_path.iterdir())
    # the next run of the command puts the old data set back before anything else
    rc, _, stderr = run(["convert", "--format", "rsicd", "--src", str(src), "--out", str(out)], capsys)
    assert rc == 2 and "exists; pass --overwrite" in stderr
    assert tree(out) == first and sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_leftovers_of_a_killed_conversion_are_cleaned_by_the_next_run(tmp_path, capsys):
    src, out = fx.make_rsicd(tmp_path / "src"), tmp_path / "out"
    _killed_convert(src, out, "while-copying")
    assert not out.exists() and [p.name[:5] for p in tmp_path.iterdir() if p.name != "src"] == [".out."]
    assert run(["convert", "--format", "rsicd", "--src", str(src), "--out", str(out)], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_leftovers_of_earlier_versions_are_cleaned_and_a_lost_folder_restored(tmp_path):
    from rslib.utils import recover_dir

    out = tmp_path / "out"
    (tmp_path / ".out.old-abc12345").mkdir()  # an earlier version killed between its renames:
    (tmp_path / ".out.old-abc12345" / "metadata.jsonl").write_text("the only copy\n")
    (tmp_path / ".out.tmp-zz9_x1yq").mkdir()  # the old folder aside, its new one not yet in place
    recover_dir(out)
    assert (out / "metadata.jsonl").read_text() == "the only copy\n" and [p.name for p in tmp_path.iterdir()] == ["out"]


# ------------------------------------------------------------------------------ permissions

def _modes(root: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", p.stat().st_mode & 0o777) for p in [root, *root.rglob("*")]}


def test_outputs_follow_the_umask(tmp_path):
    from rslib.data.formats import write_ccdiff_metadata
    from rslib.data.synthrs import write_split

    old = os.umask(0o022)
    try:
        convert("dota", fx.make_dota(tmp_path / "src"), tmp_path / "dota")
        write_split(tmp_path / "synthrs", n=2, size=16, workers=1)
        write_ccdiff_metadata(read_records(tmp_path / "dota" / "train"), tmp_path / "cc" / "metadata.jsonl")
    finally:
        os.umask(old)
    for folder in ("dota", "synthrs", "cc"):
        assert _modes(tmp_path / folder) <= {("dir", 0o755), ("file", 0o644)}, folder
