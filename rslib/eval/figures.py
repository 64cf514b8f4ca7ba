"""Figures the notebooks show and save: image grids, boxes, condition maps, statistics."""
from __future__ import annotations

import os
import textwrap
from collections import Counter
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rslib.data.formats import CONDITION_NAMES, ObjectAnnotation, Record  # noqa: E402

CLASS_COLOURS = {
    "airplane": "#ff3b30", "ship": "#ffcc00", "storagetank": "#34c759", "vehicle": "#00c7be",
    "tenniscourt": "#5856d6", "groundtrackfield": "#ff9500", "building": "#af52de", "windmill": "#ffffff",
}
MAP_TITLES = {"lines": "lines (MLSD)", "soft_edges": "soft edges (HED)", "sketch": "sketch", "road": "road",
              "depth": "depth", "segmentation": "segmentation", "content": "content image"}


def save_figure(fig: plt.Figure, folder: str | os.PathLike, name: str, dpi: int = 110) -> Path:
    """Save a figure as PNG under ``folder`` and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _as_display(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):  # CHW -> HWC
        img = img.transpose(1, 2, 0)
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 1) if img.min() >= 0 else np.clip((img + 1) / 2, 0, 1)
    return img.squeeze()


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, ncols: int = 6,
               cell: float = 1.9, suptitle: str | None = None, wrap: int = 28,
               row_labels: Sequence[str] | None = None) -> plt.Figure:
    """Show images (uint8 HWC, or float CHW/HWC in [0,1] or [-1,1]) in a grid with optional titles."""
    n = len(images)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, cell * nrows + (0.35 if suptitle else 0)),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= n:
            ax.axis("off")
            continue
        img = _as_display(images[k])
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255 if img.dtype == np.uint8 else 1,
                  interpolation="nearest")
        if titles is not None and k < len(titles) and titles[k]:
            ax.set_title("\n".join(textwrap.wrap(titles[k], wrap)), fontsize=7)
        if row_labels is not None and k % ncols == 0 and k // ncols < len(row_labels):
            ax.set_ylabel(row_labels[k // ncols], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def draw_boxes(ax: plt.Axes, objects: Sequence[ObjectAnnotation], size: int, oriented: bool = True,
               labels: bool = False) -> None:
    """Draw horizontal (dashed) and oriented (solid) boxes of objects on an axis showing a size x size image."""
    for o in objects:
        colour = CLASS_COLOURS.get(o.label, "#ff2d55")
        x1, y1, x2, y2 = (np.array(o.bbox) * size - 0.5).tolist()
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=colour, lw=0.6, ls="--"))
        if oriented:
            pts = np.array(o.obb).reshape(4, 2) * size - 0.5
            ax.add_patch(plt.Polygon(pts, closed=True, fill=False, ec=colour, lw=0.9))
        if labels:
            ax.text(x1, y1 - 0.5, o.label, color=colour, fontsize=5, va="bottom")


def boxes_figure(images: Sequence[np.ndarray], objects: Sequence[Sequence[ObjectAnnotation]],
                 titles: Sequence[str] | None = None, ncols: int = 4, cell: float = 2.6) -> plt.Figure:
    """Images with their objects' boxes (dashed) and oriented boxes (solid), coloured by class."""
    fig = image_grid(images, titles, ncols=ncols, cell=cell)
    for ax, img, objs in zip(fig.axes, images, objects):
        draw_boxes(ax, objs, _as_display(img).shape[0])
    handles = [plt.Line2D([], [], color=c, lw=2, label=k) for k, c in CLASS_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, -0.03), facecolor="grey")
    return fig


def conditions_figure(rows: Sequence[tuple[np.ndarray, dict[str, np.ndarray]]], row_labels: Sequence[str],
                      names: Sequence[str] = CONDITION_NAMES, cell: float = 1.7) -> plt.Figure:
    """Each row: the image, then its condition maps side by side."""
    images, titles = [], []
    for r, (img, maps) in enumerate(rows):
        images.append(img)
        titles.append("image" if r == 0 else "")
        for n in names:
            images.append(maps[n])
            titles.append(MAP_TITLES.get(n, n) if r == 0 else "")
    return image_grid(images, titles, ncols=len(names) + 1, cell=cell, row_labels=row_labels)


def sweep_figure(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str],
                 col_titles: Sequence[Sequence[str]], cell: float = 1.6) -> plt.Figure:
    """A grid where each row sweeps one knob (e.g. a metadata field) and each column is one value."""
    ncols = max(len(r) for r in rows)
    images, titles = [], []
    for r, t in zip(rows, col_titles):
        images += list(r) + [np.full_like(r[0], 255)] * (ncols - len(r))
        titles += list(t) + [""] * (ncols - len(r))
    return image_grid(images, titles, ncols=ncols, cell=cell, row_labels=row_labels)


def statistics_figure(records: Sequence[Record]) -> plt.Figure:
    """Bar charts of scene types and object classes, and histograms of the metadata fields."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    scenes = Counter(r.scene for r in records)
    classes = Counter(o.label for r in records for o in r.objects)
    ax = axes[0, 0]
    ax.barh(list(scenes), list(scenes.values()), color="#4c78a8")
    ax.set_title("images per scene type", fontsize=9)
    ax = axes[0, 1]
    ax.barh(list(classes), list(classes.values()), color=[CLASS_COLOURS.get(k, "#888") for k in classes],
            edgecolor="k", lw=0.3)
    ax.set_xscale("log")
    ax.set_title("objects per class (log scale)", fontsize=9)
    ax = axes[0, 2]
    ax.hist([len(r.objects) for r in records], bins=30, color="#72b7b2")
    ax.set_title("objects per image", fontsize=9)
    for ax, field, bins in ((axes[1, 0], "cloud_cover", 20), (axes[1, 1], "gsd", 20), (axes[1, 2], "month", 12)):
        vals = [r.metadata[field] for r in records if r.metadata.get(field) is not None]
        ax.hist(vals, bins=bins, color="#e45756")
        ax.set_title(f"metadata: {field}", fontsize=9)
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig
