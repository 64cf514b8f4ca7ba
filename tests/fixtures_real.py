"""Tiny copies of real remote-sensing data sets in their published layouts, for the reader tests.

Each ``make_*`` builder writes a few small images and real-looking annotation
files under ``root`` and returns the data set folder (what ``--src`` points at).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def textured_pixels(size: tuple[int, int], color: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 3) uint8: a dark ground of ``color``, a bright block and a grey bar, so that every condition map
    computed from the pixels (lines, soft edges, sketch) and by brightness has content."""
    w, h = size
    img = np.empty((h, w, 3), np.uint8)
    img[:] = np.asarray(color, np.uint8) // 3
    img[h // 4:3 * h // 4, w // 5:3 * w // 5] = 230
    img[:, 4 * w // 5:4 * w // 5 + max(1, w // 12)] = 150
    return img


def write_image(path: Path, size: tuple[int, int] = (16, 12), color: tuple[int, int, int] = (90, 120, 60),
                textured: bool = False) -> Path:
    """A small solid (or :func:`textured_pixels`) image; the format follows the suffix (.jpg or .png)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(textured_pixels(size, color)) if textured else Image.new("RGB", size, color)
    image.save(path)
    return path


# ------------------------------------------------------------------------------------ RSICD

RSICD_ENTRIES = [  # (file name, split, scene)
    ("airport_1.jpg", "train", "airport"),
    ("denseresidential_12.jpg", "train", "denseresidential"),
    ("00004.jpg", "train", None),
    ("beach_3.jpg", "val", "beach"),
    ("parking_7.jpg", "test", "parking"),
]


def rsicd_sentences(name: str) -> list[str]:
    """Five raw sentences as RSICD stores them (with stray spaces and the final ' .')."""
    stem = name.split(".")[0]
    return [f"  sentence {k} about {stem} . " for k in range(5)]


def make_rsicd(root: Path, images_dir: str = "RSICD_images", textured: bool = False) -> Path:
    """``dataset_rsicd.json`` plus the images in ``RSICD_images/`` (or ``images/``); ``textured``: see
    :func:`textured_pixels`."""
    src = root / "RSICD"
    entries = []
    for imgid, (name, split, _) in enumerate(RSICD_ENTRIES):
        write_image(src / images_dir / name, color=(10 * imgid, 100, 50), textured=textured)
        sentences = [{"tokens": raw.split()[:-1], "raw": raw, "imgid": imgid, "sentid": 5 * imgid + k}
                     for k, raw in enumerate(rsicd_sentences(name))]
        entries.append({"filename": name, "imgid": imgid, "sentences": sentences, "split": split,
                        "sentids": [s["sentid"] for s in sentences]})
    (src / "dataset_rsicd.json").write_text(json.dumps({"images": entries, "dataset": "rsicd"}))
    return src


# ------------------------------------------------------------------------------------- fMoW

def fmow_json(width: int, height: int, boxes: list[dict], timestamp: str = "2015-03-12T10:12:43Z",
              gsd: float = 0.5, cloud_cover: int = 10,
              location: str = "POLYGON ((10.0 20.0, 10.2 20.0, 10.2 20.4, 10.0 20.4, 10.0 20.0))") -> dict:
    """A per-image fMoW-rgb JSON with the published fields."""
    return {"img_filename": "", "gsd": gsd, "img_width": width, "img_height": height,
            "mean_pixel_height": 0.5, "mean_pixel_width": 0.5, "utm": "32T", "country_code": "ITA",
            "cloud_cover": cloud_cover, "timestamp": timestamp, "scan_direction": "FORWARD",
            "raw_location": location, "bounding_boxes": boxes}


def fmow_sample(src: Path, split: str, category: str, ident: int, n: int, meta: dict, textured: bool = False) -> Path:
    """Write ``{split}/<category>/<category>_<id>/<category>_<id>_<n>_rgb.{jpg,json}``; returns the JSON."""
    stem = f"{category}_{ident}_{n}_rgb"
    folder = src / split / category / f"{category}_{ident}"
    write_image(folder / f"{stem}.jpg", size=(meta["img_width"], meta["img_height"]), textured=textured)
    meta = dict(meta, img_filename=f"{stem}.jpg")
    (folder / f"{stem}.json").write_text(json.dumps(meta, indent=2))
    return folder / f"{stem}.json"


def make_fmow(root: Path, textured: bool = False) -> Path:
    """fMoW-rgb with an airport and a residential sample in train, a lake in val and a port in test."""
    src = root / "fmow-rgb"
    fmow_sample(src, "train", "airport", 0, 0,
                fmow_json(40, 20, [{"box": [4, 2, 10, 8], "category": "airport", "ID": 0}]), textured)
    fmow_sample(src, "train", "multi-unit_residential", 3, 1,
                fmow_json(20, 20, [{"box": [0, 0, 20, 20], "category": "multi-unit_residential", "ID": 3},
                                   {"box": [2, 2, 4, 4], "category": "false_detection", "ID": 4}],
                          timestamp="2016-11-30T08:00:00.250Z", gsd=1.25, cloud_cover=0), textured)
    fmow_sample(src, "val", "lake_or_pond", 5, 0,
                fmow_json(30, 30, [{"box": [25, 25, 10, 10], "category": "lake_or_pond", "ID": 5}],
                          timestamp="2017-07-04T00:00:00Z"), textured)
    fmow_sample(src, "test", "port", 9, 0,
                fmow_json(30, 30, [{"box": [3, 3, 6, 6], "category": "port", "ID": 9}]), textured)
    return src


# ------------------------------------------------------------------------------------- DIOR

def voc_xml(file_name: str, objects: list[tuple[str, tuple[int, int, int, int]]], size: tuple[int, int] | None,
            descriptions: list[str] | None = None) -> str:
    """A Pascal-VOC annotation as DIOR (and DIOR-RSVG, with <description>) write it."""
    lines = ["<annotation>", f"  <filename>{file_name}</filename>",
             "  <source>", "    <database>DIOR</database>", "  </source>"]
    if size is not None:
        lines += ["  <size>", f"    <width>{size[0]}</width>", f"    <height>{size[1]}</height>",
                  "    <depth>3</depth>", "  </size>"]
    lines.append("  <segmented>0</segmented>")
    for k, (name, (x1, y1, x2, y2)) in enumerate(objects):
        lines += ["  <object>", f"    <name>{name}</name>", "    <pose>Unspecified</pose>",
                  "    <bndbox>", f"      <xmin>{x1}</xmin>", f"      <ymin>{y1}</ymin>",
                  f"      <xmax>{x2}</xmax>", f"      <ymax>{y2}</ymax>", "    </bndbox>"]
        if descriptions is not None:
            lines.append(f"    <description>{descriptions[k]}</description>")
        lines.append("  </object>")
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def dior_obb_xml(file_name: str, objects: list[tuple[str, tuple[float, ...]]]) -> str:
    """A DIOR-R oriented annotation: <robndbox> with the four named corners."""
    tags = ("x_left_top", "y_left_top", "x_right_top", "y_right_top",
            "x_right_bottom", "y_right_bottom", "x_left_bottom", "y_left_bottom")
    lines = ["<annotation>", f"  <filename>{file_name}</filename>",
             "  <size><width>40</width><height>40</height><depth>3</depth></size>"]
    for name, pts in objects:
        lines += ["  <object>", f"    <name>{name}</name>", "    <type>robndbox</type>", "    <robndbox>"]
        lines += [f"      <{t}>{v}</{t}>" for t, v in zip(tags, pts)]
        lines += ["    </robndbox>", "    <angle>30</angle>", "  </object>"]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


DIOR_OBJECTS = {  # 40 x 40 images
    "00001": [("Airplane", (4, 4, 12, 12)), ("airplane", (20, 4, 28, 12)), ("vehicle", (30, 30, 34, 38))],
    "00002": [("Expressway-Service-area", (0, 0, 20, 20)), ("storagetank", (24, 24, 32, 32))],
    "00003": [("bridge", (8, 10, 40, 20))],
    "00004": [("ship", (10, 10, 20, 30))],
}
DIOR_OBB = {
    "00001": [("airplane", (5, 4, 12, 5, 11, 12, 4, 11)), ("airplane", (21, 4, 28, 5, 27, 12, 20, 11)),
              ("vehicle", (30, 30, 34, 30, 34, 38, 30, 38))],
    # listed in another order than the horizontal file: matched by label and overlap
    "00002": [("storagetank", (28, 24, 32, 28, 28, 32, 24, 28)),
              ("Expressway-Service-area", (10, 0, 20, 10, 10, 20, 0, 10))],
}


def make_dior(root: Path, oriented: bool = True, single_folder: bool = False, textured: bool = False) -> Path:
    """DIOR (with DIOR-R oriented boxes): train 00001 00002, val 00003 (no <size>), test 00004; ``textured``: see
    :func:`textured_pixels`."""
    src = root / "DIOR"
    for ident, objects in DIOR_OBJECTS.items():
        folder = "JPEGImages-test" if ident == "00004" else "JPEGImages-trainval"
        if single_folder:
            folder = "JPEGImages"
        write_image(src / folder / f"{ident}.jpg", size=(40, 40), textured=textured)
        size = None if ident == "00003" else (40, 40)
        hbb = src / "Annotations" / "Horizontal Bounding Boxes" / f"{ident}.xml"
        hbb.parent.mkdir(parents=True, exist_ok=True)
        hbb.write_text(voc_xml(f"{ident}.jpg", objects, size))
        if oriented and ident in DIOR_OBB:
            obb = src / "Annotations" / "Oriented Bounding Boxes" / f"{ident}.xml"
            obb.parent.mkdir(parents=True, exist_ok=True)
            obb.write_text(dior_obb_xml(f"{ident}.jpg", DIOR_OBB[ident]))
    sets = src / "ImageSets" / "Main"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("00001\n00002\n")
    (sets / "val.txt").write_text("00003\n")
    (sets / "test.txt").write_text("00004\n\n")
    return src


# -------------------------------------------------------------------------------- DIOR-RSVG

RSVG_OBJECTS = {  # image id -> [(class, box, description)]; object indexes run 0..5 in this order
    "00001": [("vehicle", (2, 2, 8, 8), "the vehicle on the left"),
              ("vehicle", (30, 2, 36, 8), "the vehicle on the right")],
    "00002": [("ship", (10, 10, 30, 20), "a ship in the harbor"),
              ("ship", (10, 10, 30, 20), "the large ship")],
    "00003": [("stadium", (0, 0, 40, 40), "the stadium")],
    "00004": [("bridge", (5, 15, 35, 25), "a bridge over the river")],
}


# DIOR-R's oriented boxes of the DIOR-RSVG images: for 00001 listed in the other order than the DIOR-RSVG boxes
# (right vehicle northeast-southwest, left one north-south), for 00002 with an airplane DIOR-RSVG does not refer
# to; 00003 and 00004 have none
RSVG_DIOR_R = {
    "00001": [("vehicle", (30, 7, 35, 2, 36, 3, 31, 8)), ("vehicle", (3, 2, 7, 2, 7, 8, 3, 8))],
    "00002": [("airplane", (2, 30, 8, 30, 8, 36, 2, 36)), ("ship", (10, 10, 26, 20, 29, 16, 13, 6))],
}


def write_dior_r(folder: Path, objects: dict[str, list[tuple[str, tuple[float, ...]]]]) -> Path:
    """DIOR-R oriented-box XML files ``<id>.xml`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for ident, objs in objects.items():
        (folder / f"{ident}.xml").write_text(dior_obb_xml(f"{ident}.jpg", objs))
    return folder


def make_dior_r(root: Path) -> Path:
    """A DIOR-R folder (``Annotations/Oriented Bounding Boxes/``) for the images of :func:`make_dior_rsvg`."""
    write_dior_r(root / "DIOR-R" / "Annotations" / "Oriented Bounding Boxes", RSVG_DIOR_R)
    return root / "DIOR-R"


def make_dior_rsvg(root: Path, by: str = "objects", dior_r_inside: bool = False, textured: bool = False) -> Path:
    """DIOR-RSVG; split files list object indexes (published form) or, with ``by='images'``, image ids;
    ``dior_r_inside`` adds DIOR-R's boxes as ``Annotations/Oriented Bounding Boxes/``; ``textured``: see
    :func:`textured_pixels`."""
    src = root / "DIOR_RSVG"
    if dior_r_inside:
        write_dior_r(src / "Annotations" / "Oriented Bounding Boxes", RSVG_DIOR_R)
    for ident, objects in RSVG_OBJECTS.items():
        write_image(src / "JPEGImages" / f"{ident}.jpg", size=(40, 40), textured=textured)
        ann = src / "Annotations" / f"{ident}.xml"
        ann.parent.mkdir(parents=True, exist_ok=True)
        boxes, descriptions = [(c, b) for c, b, _ in objects], [d for *_, d in objects]
        ann.write_text(voc_xml(f"{ident}.jpg", boxes, (40, 40), descriptions))
    if by == "objects":  # object 3 (second ship of 00002) is in test: the whole image goes to test
        lists = {"train": "0\n1\n2\n", "val": "4\n", "test": "5\n3\n"}
    else:
        lists = {"train": "00001.jpg\n", "val": "00003\n", "test": "00002.jpg\n00004\n"}
    for split, text in lists.items():
        (src / f"{split}.txt").write_text(text)
    return src


# ------------------------------------------------------------------------------------- DOTA

DOTA_LABELS = {
    # image 100 x 50: a plane, and a small vehicle reaching past the lower right corner
    ("train", "P0000"): "imagesource:GoogleEarth\ngsd:0.146343590398\n"
                        "10 5 30 5 30 15 10 15 plane 0\n90 40 110 40 110 60 90 60 small-vehicle 1\n",
    # image 100 x 50: three ships, gsd unknown
    ("train", "P0001"): "imagesource:GoogleEarth\ngsd:null\n"
                        "0 0 20 0 20 20 0 20 ship 0\n30 0 50 0 50 20 30 20 ship 0\n"
                        "60 0 80 0 80 20 60 20 ship 0\n",
    # image 40 x 40: a rotated harbor (a diamond)
    ("val", "P0002"): "imagesource:GF2\ngsd:0.8\n20 0 40 20 20 40 0 20 harbor 0\n",
    ("test", "P0003"): "imagesource:GoogleEarth\ngsd:0.5\n1 1 9 1 9 9 1 9 bridge 0\n",
}
DOTA_SIZES = {"P0000": (100, 50), "P0001": (100, 50), "P0002": (40, 40), "P0003": (40, 40)}


def make_dota(root: Path, label_folder: str = "labelTxt", test_labels: bool = False,
              extra: dict[tuple[str, str], str] | None = None, sizes: dict[str, tuple[int, int]] | None = None,
              textured: bool = False) -> Path:
    """DOTA: ``{train,val,test}/images/*.png``, ``{train,val}/<label_folder>/*.txt``; test unlabeled by default.
    ``extra`` adds label files, ``sizes`` gives their images' sizes (default 40 x 40); ``textured``: see
    :func:`textured_pixels`."""
    src = root / "DOTA"
    labels = {**DOTA_LABELS, **(extra or {})}
    sizes = {**DOTA_SIZES, **(sizes or {})}
    for (split, ident), text in labels.items():
        write_image(src / split / "images" / f"{ident}.png", size=sizes.get(ident, (40, 40)), textured=textured)
        if split != "test" or test_labels:
            path = src / split / label_folder / f"{ident}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return src
