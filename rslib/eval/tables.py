"""Tables: the papers' published numbers beside ours, written as markdown and CSV."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from rslib.config import REPO_ROOT

PAPER_TABLES = REPO_ROOT / "data" / "paper_tables"


def paper_table(name: str, version: str | None = None) -> pd.DataFrame:
    """A published table from data/paper_tables/<name>.csv (optionally one README version only)."""
    path = PAPER_TABLES / f"{name}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; published tables: {sorted(p.stem for p in PAPER_TABLES.glob('*.csv'))}")
    df = pd.read_csv(path)
    if version is not None and "version" in df:
        df = df[df["version"] == version]
    return df.reset_index(drop=True)


def ours_table(rows: Sequence[dict[str, Any]], preset: str, data: str = "SynthRS") -> pd.DataFrame:
    """Our measured rows, labelled with the preset and data set that produced them."""
    df = pd.DataFrame(list(rows))
    df.insert(0, "ours", f"{preset} preset, {data}")
    return df


def side_by_side(ours: pd.DataFrame, paper: pd.DataFrame, metrics: Sequence[str], key: str = "method",
                 paper_label: str = "paper") -> pd.DataFrame:
    """One row per method: our metric columns, then the published ones in separate, labelled columns. Our rows
    come first, in our order, then the paper's other methods in its order."""
    left = ours.set_index(key)[[m for m in metrics if m in ours]].add_prefix("ours: ")
    right = paper.set_index(key)[[m for m in metrics if m in paper]].add_prefix(f"{paper_label}: ")
    right = right[~right.index.duplicated()]
    order = list(left.index) + [m for m in right.index if m not in set(left.index)]
    return left.join(right, how="outer").reindex(order).rename_axis(key).reset_index()


CC_DIFF_NAMES = {"cc_diff": "CC-Diff", "no_bridge": "CC-Diff without context bridge", "gligen": "GLIGEN",
                 "real test images": "real test images"}
# each column of CC-Diff's published table: (the papers' instrument's key, the project's instrument's key)
CC_DIFF_COLUMNS = {"clip_local": ("clip_local_openclip", "clip_local"),
                   "clip_global": ("clip_global_openclip", "clip_global"),
                   "fid": ("fid_inception", "fid_rsclip"),
                   "map50": ("map50_yolo", "map50"), "map50_95": ("map50_95_yolo", "map50_95")}
PROJECT_INSTRUMENTS = {"clip_local": "RS-CLIP", "clip_global": "RS-CLIP", "fid": "RS-CLIP features",
                       "map50": "the project's detector", "map50_95": "the project's detector"}


def cc_diff_main_rows(results: dict[str, Any]) -> tuple[pd.DataFrame, str]:
    """Our rows of CC-Diff's main table (notebook 04's ``eval.json``) in the published table's columns and units
    (mAP in %), each column from the papers' instrument where notebook 04 had it (``results["instruments"]``,
    the paper preset), else the project's; and a sentence naming the instrument of each column."""
    rows = results["rows"]
    used = {col: paper if all(paper in r for r in rows) else ours for col, (paper, ours) in CC_DIFF_COLUMNS.items()}
    table = pd.DataFrame([{"method": CC_DIFF_NAMES.get(r["method"], r["method"]),
                           **{col: r[key] for col, key in used.items()},
                           "context": r["context"]} for r in rows])
    names = results.get("instruments", {})
    by = {col: names.get(key, PROJECT_INSTRUMENTS[col]) for col, key in used.items()}
    groups: dict[str, list[str]] = {}
    for col, name in by.items():
        groups.setdefault(name, []).append(col)
    note = "; ".join(f"{', '.join(cols)}: {name}" for name, cols in groups.items())
    return table, note


def crs_diff_text_rows(stage_one: dict[str, Any], crs: dict[str, Any]) -> tuple[pd.DataFrame, str]:
    """Our rows of CRS-Diff's text-to-image table (notebook 02's and 03's ``eval.json``) in the published
    columns: FID, IS and CLIPScore from the papers' instruments where both notebooks had them (the paper preset:
    ``fid_inception``, ``inception_score``, ``clip_score_clip``), else RS-CLIP's; and a sentence naming them."""
    full = next(r for r in crs["settings"] if r["setting"] == "all + metadata + content")
    paper = all(k in r for r in (stage_one, full) for k in ("fid_inception", "clip_score_clip"))
    fid, clip = ("fid_inception", "clip_score_clip") if paper else ("fid_rsclip", "clip_score")
    rows = [{"method": "stage one (text only)", "fid": stage_one[fid], "clip_score": stage_one[clip],
             "zero_shot_oa": stage_one.get("scene_agreement", float("nan"))},
            {"method": "CRS-Diff (all conditions)", "fid": full[fid], "clip_score": full[clip]},
            {"method": "real test images", "fid": float("nan") if paper else stage_one["fid_rsclip_real_val"],
             "clip_score": float("nan") if paper else stage_one["clip_score_real"],
             "zero_shot_oa": stage_one.get("scene_agreement_real", float("nan"))}]
    if paper:  # the Inception Score exists with the Inception instrument only
        rows[0]["inception_score"], rows[1]["inception_score"] = stage_one["inception_score"], full["inception_score"]
    note = ("FID and IS with InceptionV3 (eval.inception_weights), CLIPScore with CLIP ViT-L/14 "
            "(eval.clip_score_folder)" if paper else "FID and CLIPScore with RS-CLIP features")
    if "scene_agreement" in stage_one:  # SynthRS's scene labels (a real data set has none: no OA)
        note += "; zero-shot OA = RS-CLIP scene of the generated image equals the caption's"
    return pd.DataFrame(rows), note


def measures_table(rows: Sequence[dict[str, Any]], index: str, digits: int = 3) -> pd.DataFrame:
    """Rows of measures as a table indexed by ``index``; a measure with a bootstrap interval in its row's ``ci``
    reads "value [low, high]", and the same column's values without one read "value" (for reading: the rows keep
    the numbers). Entries that are not single values (e.g. ``map50_per_class``) are left out."""
    with_ci = {k for row in rows for k in (row.get("ci") or {})}

    def cell(row: dict[str, Any], k: str, v: Any) -> Any:
        if k not in with_ci or not isinstance(v, (int, float)):
            return v
        ci = (row.get("ci") or {}).get(k)
        return f"{v:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")

    return pd.DataFrame([{k: cell(row, k, v) for k, v in row.items() if k != "ci" and not isinstance(v, dict)}
                         for row in rows]).set_index(index)


def write_table(df: pd.DataFrame, folder: str | os.PathLike, name: str, caption: str = "") -> tuple[Path, Path]:
    """Write ``df`` as ``<name>.md`` (with a caption line) and ``<name>.csv``; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md, csv = folder / f"{name}.md", folder / f"{name}.csv"
    df.to_csv(csv, index=False)
    text = df.to_markdown(index=False, floatfmt=".3g") if _has_tabulate() else df.to_string(index=False)
    md.write_text((caption + "\n\n" if caption else "") + text + "\n")
    return md, csv


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def save_results(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a stage's measured numbers as JSON (notebook 05 gathers them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=float))
    return path


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a stage's results JSON, or an empty dict if that stage has not run."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}
