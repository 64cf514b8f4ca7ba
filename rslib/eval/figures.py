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

from rslib.data.records import CONDITION_NAMES, ObjectAnnotation, Record  # noqa: E402

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
    """An image for ``imshow``: uint8 as it is; a float image is in [-1, 1], the library's image convention (maps
    and masks in [0, 1] go through :func:`unit_to_uint8` first). CHW becomes HWC."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):  # CHW -> HWC
        img = img.transpose(1, 2, 0)
    if img.dtype != np.uint8:
        low, high = float(img.min()), float(img.max())
        if low < -1.5 or high > 1.5:  # a decoder's slight overshoot is clipped; another scale is refused
            raise ValueError(f"a float image to show must be in [-1, 1], got values in [{low:.3g}, {high:.3g}]: "
                             f"pass uint8 pixels, or maps in [0, 1] through figures.unit_to_uint8")
        img = np.clip((img + 1) / 2, 0, 1)
    return img.squeeze()


def unit_to_uint8(values: "np.ndarray | object") -> np.ndarray:
    """Maps, masks or attention weights in [0, 1] (tensor or array, any layout) -> uint8 for the figures."""
    import torch

    from rslib.data.datasets import maps_as_uint8

    x = values if torch.is_tensor(values) else torch.from_numpy(np.asarray(values, dtype=np.float32))
    return maps_as_uint8(x.detach().float().cpu().clamp(0, 1)).numpy()


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, ncols: int = 6,
               cell: float = 1.9, suptitle: str | None = None, wrap: int = 28,
               row_labels: Sequence[str] | None = None) -> plt.Figure:
    """Show images (uint8, or float in [-1, 1]; HWC or CHW) in a grid with optional titles."""
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
        images += list(r) + [np.full_like(_as_display(r[0]), 255, dtype=np.uint8)] * (ncols - len(r))  # white
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


def smooth(values: Sequence[float], window: int = 20) -> np.ndarray:
    """Running mean over ``window`` steps (shorter at the start), for noisy loss curves."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def loss_curves(histories: dict[str, Sequence[dict[str, float]]], key: str = "loss", window: int = 20,
                logy: bool = True, title: str = "", ax: plt.Axes | None = None) -> plt.Figure:
    """One smoothed curve per named training history (a list of per-step dicts with ``step`` and ``key``)."""
    fig, ax = (plt.subplots(figsize=(5.5, 3.2)) if ax is None else (ax.figure, ax))
    for name, hist in histories.items():
        pts = [(h.get("step", i + 1), h[key]) for i, h in enumerate(hist) if key in h]
        if not pts:
            continue
        steps, vals = zip(*pts)
        ax.plot(steps, vals, alpha=0.25, lw=0.8)
        ax.plot(steps, smooth(vals, window), lw=1.6, label=name, color=ax.lines[-1].get_color())
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if len(histories) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def confusion_figure(matrix: np.ndarray, names: Sequence[str], title: str = "") -> plt.Figure:
    """A row-normalised confusion matrix (rows: true class, columns: predicted) with counts as text."""
    m = np.asarray(matrix, dtype=float)
    frac = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.42 * len(names) + 2.2, 0.42 * len(names) + 1.6))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            if m[i, j]:
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def retrieval_figure(queries: Sequence[str], images: Sequence[Sequence[np.ndarray]],
                     hits: Sequence[Sequence[bool]], cell: float = 1.5) -> plt.Figure:
    """Each row: a text query and its top-k retrieved images; the true match is framed green, others grey."""
    k = max(len(r) for r in images)
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(cell * (k + 2.2), cell * len(queries)), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2] + [1] * k})
    for r, (q, row, hit) in enumerate(zip(queries, images, hits)):
        axes[r, 0].axis("off")
        axes[r, 0].text(0, 0.5, "\n".join(textwrap.wrap(q, 34)), fontsize=7, va="center")
        for c in range(k):
            ax = axes[r, c + 1]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row):
                ax.axis("off")
                continue
            ax.imshow(_as_display(row[c]), interpolation="nearest")
            colour = "#34c759" if hit[c] else "#bbbbbb"
            for s in ax.spines.values():
                s.set_edgecolor(colour)
                s.set_linewidth(3 if hit[c] else 1)
            if r == 0:
                ax.set_title(f"top {c + 1}", fontsize=7)
    fig.tight_layout()
    return fig


def to_uint8(images: "np.ndarray | object") -> np.ndarray:
    """Images in [-1, 1] (B, 3, H, W) tensor or array -> uint8 (B, H, W, 3) for display (rslib.utils.to_uint8)."""
    import torch

    from rslib.utils import to_uint8 as pixels

    x = images if torch.is_tensor(images) else torch.from_numpy(np.asarray(images, dtype=np.float32))
    return pixels(x).permute(0, 2, 3, 1).numpy()


def _box(ax: plt.Axes, xy: tuple[float, float], w: float, h: float, text: str, colour: str,
         fontsize: float = 7.5) -> tuple[float, float, float, float]:
    ax.add_patch(plt.Rectangle(xy, w, h, fc=colour, ec="#333333", lw=0.8, zorder=2))
    ax.text(xy[0] + w / 2, xy[1] + h / 2, text, ha="center", va="center", fontsize=fontsize, zorder=3)
    return xy[0], xy[1], w, h


def _arrow(ax: plt.Axes, a: tuple[float, float], b: tuple[float, float], colour: str = "#333333",
           style: str = "-|>", ls: str = "-") -> None:
    ax.annotate("", xy=b, xytext=a, arrowprops=dict(arrowstyle=style, color=colour, lw=1.0, ls=ls), zorder=1)


def crs_diff_diagram(levels: int = 3) -> plt.Figure:
    """CRS-Diff's architecture: frozen stage-one UNet (grey), trainable condition branch (orange), inputs (blue)."""
    frozen, train, inp, out = "#d9d9d9", "#ffcc80", "#bbdefb", "#c8e6c9"
    fig, ax = plt.subplots(figsize=(11, 5.6))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 5.6)
    ax.axis("off")
    # inputs
    _box(ax, (0.1, 4.6), 1.7, 0.6, "text prompt", inp)
    _box(ax, (0.1, 3.7), 1.7, 0.6, "content image", inp)
    _box(ax, (0.1, 2.8), 1.7, 0.6, "metadata (7 fields)", inp)
    _box(ax, (0.1, 0.6), 1.7, 1.0, "6 condition maps\n(18 channels)", inp)
    # global encoders
    _box(ax, (2.2, 4.6), 1.6, 0.6, "RS-CLIP text\n(frozen)", frozen)
    _box(ax, (2.2, 3.7), 1.6, 0.6, "CLIP image +\ncontent tokenizer", train)
    _box(ax, (2.2, 2.8), 1.6, 0.6, "metadata encoder\n(sinusoid + linear)", train)
    _box(ax, (2.2, 0.6), 1.6, 1.0, "local feature\nextractor", train)
    for y in (4.9, 4.0, 3.1):
        _arrow(ax, (1.8, y), (2.2, y))
    _arrow(ax, (1.8, 1.1), (2.2, 1.1))
    _box(ax, (4.2, 4.25), 1.5, 0.6, "context: text +\nK content tokens", out)
    _arrow(ax, (3.8, 4.9), (4.2, 4.6))
    _arrow(ax, (3.8, 4.0), (4.2, 4.45))
    # UNet (frozen): encoder, middle, decoder; adapter (trainable copy of encoder + middle)
    x0 = 6.1
    for i in range(levels):
        _box(ax, (x0 + 0.1 * i, 4.3 - 0.55 * i), 1.1, 0.45, f"enc {i}", frozen)
        _box(ax, (x0 + 2.6 - 0.1 * i, 4.3 - 0.55 * i), 1.1, 0.45, f"dec {i}", frozen)
        _box(ax, (x0 + 0.1 * i, 0.3 + 0.55 * i), 1.1, 0.45, f"enc {i} copy\n+ AFF", train, fontsize=6.5)
        _box(ax, (x0 + 1.35, 1.05 + 0.55 * i), 0.55, 0.35, "zero\nconv", train, fontsize=5.5)
        _arrow(ax, (x0 + 1.2 + 0.1 * i, 0.52 + 0.55 * i), (x0 + 1.35, 1.2 + 0.55 * i))
        _arrow(ax, (x0 + 1.9, 1.22 + 0.55 * i), (x0 + 2.6 - 0.1 * i, 4.5 - 0.55 * i), colour="#e65100")
    _box(ax, (x0 + 1.25, 4.3 - 0.55 * levels), 1.2, 0.45, "middle", frozen)
    ax.text(x0 + 1.85, 5.15, "stage-one UNet (frozen)", ha="center", fontsize=9, weight="bold")
    ax.text(x0 + 0.6, 0.05, "adapter: trainable copy, features fused by FF/AFF", ha="left", fontsize=8,
            color="#e65100")
    _arrow(ax, (5.7, 4.55), (x0, 4.5))
    _arrow(ax, (3.8, 3.1), (x0 - 0.1, 3.2), colour="#6a1b9a")
    ax.text(4.3, 3.25, "+ time embedding", fontsize=7, color="#6a1b9a")
    _arrow(ax, (3.8, 1.1), (x0, 0.7), colour="#e65100")
    ax.text(4.0, 0.75, "features at every level", fontsize=7, color="#e65100")
    _box(ax, (9.9, 2.3), 1.0, 0.8, "noise\nprediction", out)
    _arrow(ax, (x0 + 3.7, 4.5), (10.4, 3.1))
    handles = [plt.Rectangle((0, 0), 1, 1, fc=c, ec="#333333") for c in (inp, frozen, train)]
    ax.legend(handles, ["inputs", "frozen", "trained in stage two"], loc="lower right", fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------
# CRS-Diff's figures (notebook 03): each samples a trained pipeline on held-out items and draws the result.
# ``test`` is a split as rslib.data.datasets.load_split_tensors returns it; ``sampling`` the preset's
# guidance_scale and steps, passed on to rslib.pipelines.crs_diff.sample_crs_diff.


def _unit_range(maps: "object") -> "object":
    """Each (H, W) map of a (B, H, W) tensor stretched to [0, 1]."""
    low, high = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    return (maps - low) / (high - low + 1e-8)


def crs_fusion_features(pipe: "object", test: dict, items: Sequence[int], fusion: str, seed: int,
                        timestep: int = 500) -> plt.Figure:
    """Per item: the image, its segmentation map, and the adapter's features before, from the conditions and after
    the fusion block at ``timestep`` (the item's latent noised with ``seed``), each stretched to [0, 1]."""
    import torch

    from rslib.models.crs_diff import fusion_maps

    cond = test["conditions"][list(items)].float() / 255.0
    with torch.no_grad():
        z0 = pipe.vae.encode(test["pixel_values"][list(items)]).latent_dist.mean * pipe.vae.config.scaling_factor
        t = torch.full((len(items),), timestep)
        zt = pipe.scheduler.add_noise(z0, torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)), t)
        text_states = pipe.encode_prompt([test["captions"][i][0] for i in items], pipe.device, 1, False)[0]
        maps = fusion_maps(pipe.adapter, zt, timestep, text_states, cond)
    cells, titles = [], []
    for k, i in enumerate(items):
        stretched = [unit_to_uint8(_unit_range(maps[stage])[k]) for stage in ("before", "features", "after")]
        cells += [test["pixel_values"][i], test["conditions"][i, 15:18]] + stretched  # maps are stored as uint8
        titles += ["image", "segmentation map", "GN(h) before", "condition features", f"after {fusion.upper()}"]
    return image_grid(cells, titles, ncols=5, cell=1.7)


def crs_single_conditions(pipe: "object", test: dict, items: Sequence[int], seed: int, **sampling) -> plt.Figure:
    """One row per condition map given alone (map, generated image per item), the real images last."""
    from rslib.pipelines.crs_diff import sample_crs_diff

    prompts = [test["captions"][i][0] for i in items]
    cells, row_labels = [], []
    for name in CONDITION_NAMES:
        gen = sample_crs_diff(pipe, prompts, seed, conditions=test["conditions"][list(items)], maps=(name,),
                              **sampling)
        m = CONDITION_NAMES.index(name)
        for k, i in enumerate(items):
            cells += [test["conditions"][i, 3 * m:3 * m + 3].numpy(), gen[k]]
        row_labels.append(name)
    cells += sum([[test["pixel_values"][i], test["pixel_values"][i]] for i in items], [])
    row_labels.append("real image")
    return image_grid(cells, ["map", "generated"] * len(items), ncols=2 * len(items), cell=1.3,
                      row_labels=row_labels)


CRS_COMBINATIONS = {"text only": None, "road + segmentation": ("road", "segmentation"),
                    "sketch + depth": ("sketch", "depth"), "all six maps": CONDITION_NAMES}


def crs_combinations(pipe: "object", test: dict, records: Sequence[Record], items: Sequence[int], seed: int,
                     **sampling) -> plt.Figure:
    """One row per combination of maps (:data:`CRS_COMBINATIONS`), then all six with the items' metadata and
    content images, then the real images; a column per item, titled with its scene."""
    from rslib.pipelines.crs_diff import sample_crs_diff

    items = list(items)
    prompts = [test["captions"][i][0] for i in items]
    cells, row_labels = [], []
    for label, keep in CRS_COMBINATIONS.items():
        cells += list(sample_crs_diff(pipe, prompts, seed, conditions=test["conditions"][items], maps=keep,
                                      **sampling))
        row_labels.append(label)
    cells += list(sample_crs_diff(pipe, prompts, seed, conditions=test["conditions"][items], maps=CONDITION_NAMES,
                                  metadata=[dict(records[i].metadata) for i in items],
                                  content_images=test["content"][items], **sampling))
    row_labels.append("all + metadata\n+ content")
    cells += [test["pixel_values"][i] for i in items]
    row_labels.append("real image")
    return image_grid(cells, [records[i].scene.replace("_", " ") for i in items], ncols=len(items), cell=1.5,
                      row_labels=row_labels)


def crs_metadata_sweeps(pipe: "object", test: dict, records: Sequence[Record], item: int,
                        sweeps: dict[str, Sequence[float]], seed: int, **sampling) -> plt.Figure:
    """One item with all six maps and its own metadata but one field, swept along a row per field (the month at
    latitude 50 and no clouds), from the same noise."""
    from rslib.pipelines.crs_diff import sample_crs_diff

    base = dict(records[item].metadata)
    rows, labels, col_titles = [], [], []
    for field, values in sweeps.items():
        fixed = {"latitude": 50.0, "cloud_cover": 0} if field == "month" else {}
        metas = [{**base, **fixed, field: v} for v in values]
        gen = sample_crs_diff(pipe, [test["captions"][item][0]] * len(values), seed, maps=CONDITION_NAMES,
                              conditions=test["conditions"][[item] * len(values)], metadata=metas, same_noise=True,
                              **sampling)
        rows.append(list(gen))
        labels.append(field)
        col_titles.append([f"{field}={v}" for v in values])
    return sweep_figure(rows, labels, col_titles)


def crs_content_and_control_scale(pipe: "object", test: dict, item: int, donors: Sequence[int], shown: int,
                                  scales: Sequence[float], seed: int, **sampling) -> plt.Figure:
    """Item ``item``'s caption with no maps and the content images of ``donors``; then item ``shown`` with all six
    maps at each ``control_scale``, with the maps kept out of the unconditional branch and in both branches."""
    import torch

    from rslib.pipelines.crs_diff import sample_crs_diff

    donors = list(donors)
    gen = sample_crs_diff(pipe, [test["captions"][item][0]] * len(donors), seed, maps=(),
                          conditions=test["conditions"][donors], content_images=test["content"][donors],
                          same_noise=True, **sampling)

    def at_scales(**kw) -> list:
        return list(torch.cat([sample_crs_diff(pipe, [test["captions"][shown][0]], seed, maps=CONDITION_NAMES,
                                               conditions=test["conditions"][[shown]], control_scale=s, **kw,
                                               **sampling) for s in scales]))

    gen_s, gen_u = at_scales(), at_scales(map_guidance=False)
    return sweep_figure([[test["content"][d] for d in donors], list(gen), gen_s, gen_u],
                        ["content image", "generated", "control scale", "maps in both branches"],
                        [[f"item {d}" for d in donors], ["with it"] * len(donors), [f"scale {s}" for s in scales],
                         [f"scale {s}" for s in scales]])


def metadata_adherence_figure(adherence: dict, threshold: float) -> plt.Figure:
    """Cloud cover asked vs seen, month vs greenness, and how the cloud Spearman depends on the cloud detector's
    brightness ``threshold`` (the results of rslib.eval.control.metadata_adherence)."""
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.3))
    axes[0].scatter(adherence["cloud_asked"], adherence["cloud_seen"], s=12)
    axes[0].set(xlabel="cloud cover asked (%)", ylabel="cloud fraction seen",
                title=f"Spearman {adherence['cloud_spearman']:.2f}")
    axes[1].scatter(adherence["months"], adherence["greenness"], s=12, c="green")
    axes[1].set(xlabel="month asked (50° N)", ylabel="vegetation greenness",
                title=f"Spearman vs summer {adherence['season_spearman']:.2f}")
    sweep = adherence["cloud_by_brightness"]
    axes[2].plot(sweep["brightness"], sweep["real"], "o-", label="real test images (their own cover)")
    axes[2].plot(sweep["brightness"], sweep["generated"], "o-", label="generated (cover asked)")
    axes[2].axvline(threshold, color="grey", ls=":", label="calibrated threshold")
    axes[2].set(xlabel="cloud detector: min channel above", ylabel="Spearman", ylim=(-0.2, 1.05),
                title="how white must a cloud be?")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    return fig
