"""Run the course notebooks in order through papermill (the main job), and keep sources free of outputs.

``python -m rslib.notebooks --preset cpu`` executes every notebook under
``notebooks/`` into ``runs/<preset>/notebooks/`` and records each one's wall
time in ``runs/<preset>/timings.json`` (and ``figures/timings.md`` for the cpu
preset, next to the figures the notebooks write). While it runs it prints a
line as each notebook section starts and the training loops stream their
progress (:mod:`rslib.progress`); at the end, a summary of wall times, key
measures and where the figures went.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import nbformat

from rslib.config import REPO_ROOT, Preset, get_preset, parse_overrides
from rslib.progress import ENV as PROGRESS_ENV
from rslib.progress import duration

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The course notebooks in order (optionally those whose name starts with one of ``only``)."""
    paths = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
    return paths


def section_titles(cell: Any) -> list[str]:
    """The section headings (``## ...``) of a markdown cell."""
    if cell.get("cell_type") != "markdown":
        return []
    return [line[3:].strip() for line in "".join(cell.get("source", "")).splitlines() if line.startswith("## ")]


def _announcing_engine(name: str, t0: float) -> type:
    """A papermill engine that prints a line as each section of notebook ``name`` starts."""
    from papermill.engines import NBClientEngine

    class AnnouncingEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            cell_start = nb_man.cell_start

            def announce(cell, cell_index=None, **kw):
                for title in section_titles(cell):
                    print(f"   [{duration(time.time() - t0):>6}] {name} · {title}", flush=True)
                return cell_start(cell, cell_index, **kw)

            nb_man.cell_start = announce
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    return AnnouncingEngine


def execute(path: Path, out_path: Path, parameters: dict[str, Any]) -> None:
    """Run one notebook through papermill: section lines as it goes, training progress streamed (``RSLIB_PROGRESS``),
    on a kernel reached over local sockets (IPC) rather than TCP, shut down afterwards."""
    import papermill
    from jupyter_client.manager import KernelManager
    from papermill.engines import papermill_engines

    papermill_engines.register("rslib", _announcing_engine(path.stem, time.time()))
    os.environ[PROGRESS_ENV] = "1"  # the kernel inherits it
    km = KernelManager(kernel_name="python3", transport="ipc")
    try:
        papermill.execute_notebook(str(path), str(out_path), parameters=parameters, cwd=str(NOTEBOOK_DIR),
                                   kernel_name="python3", progress_bar=False, engine_name="rslib", km=km)
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)


def finished_stages(cfg: Preset) -> list[str]:
    """The stage folders under ``runs/<preset>/`` that hold a finished model (reused by a rerun)."""
    from rslib.train.stage import is_finished

    return sorted(p.name for p in cfg.run_dir("").glob("*") if is_finished(p))


def run_notebooks(preset: str = "cpu", only: list[str] | None = None, parameters: dict | None = None,
                  overrides: dict[str, Any] | None = None) -> dict[str, float]:
    """Execute the notebooks at a preset, with ``overrides`` (dotted settings, as ``--set`` gives them) passed to
    every notebook; returns {notebook: seconds}."""
    overrides = json.loads(json.dumps(overrides or {}))  # tuples as lists: papermill would pass them as strings
    cfg = get_preset(preset, **overrides)
    out_dir = cfg.run_dir("notebooks")
    out_dir.mkdir(parents=True, exist_ok=True)
    timings_path = cfg.run_dir("timings.json")
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    paths = notebooks(only)
    done = finished_stages(cfg)
    print(f"Running {len(paths)} notebooks at preset {preset}; executed copies go to {_rel(out_dir)}.\n"
          f"Finished models in {_rel(cfg.run_dir(''))} are reused"
          + (f" (now: {', '.join(done)})" if done else "")
          + ", and an interrupted training resumes from its last checkpoint: stop any time with Ctrl-C and rerun "
            "the same command to continue.", flush=True)
    for path in paths:
        print(f"== {path.name} (preset {preset})", flush=True)
        t0 = time.time()
        execute(path, out_dir / path.name, {"preset": preset, **(parameters or {}),
                                            **({"overrides": overrides} if overrides else {})})
        timings[path.stem] = round(time.time() - t0, 1)
        print(f"   {path.stem} done in {duration(timings[path.stem])}", flush=True)
        timings_path.write_text(json.dumps(timings, indent=1))
    if preset == "cpu":
        write_timings_table(timings, cfg.figures_dir() / "timings.md")
    print(summary(cfg, {p.stem: timings[p.stem] for p in paths}), flush=True)
    return timings


def _rel(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    try:
        return str(Path(path).relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def write_timings_table(timings: dict[str, float], path: Path) -> None:
    """A markdown table of notebook wall times."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["| notebook | wall time (s) |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in sorted(timings.items())]
    lines.append(f"| **total** | **{sum(timings.values()):.0f}** |")
    path.write_text("Wall time of each notebook at the cpu preset (2 CPU cores).\n\n" + "\n".join(lines) + "\n")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _row(rows: list[dict[str, Any]], key: str, name: str) -> dict[str, Any]:
    return next((r for r in rows if r.get(key) == name), {})


def key_measures(cfg: Preset) -> list[tuple[str, str, Any]]:
    """The key numbers of a run, read from the results the notebooks saved: (notebook, measure, value) with the
    value a number or, where the notebook measured its bootstrap interval, (value, low, high)."""
    out: list[tuple[str, str, Any]] = []

    def add(nb: str, label: str, results: dict[str, Any], key: str, value: Any = None) -> None:
        value = results.get(key) if value is None else value
        if value is None:
            return
        ci = results.get("ci", {}).get(key)
        out.append((nb, label, (value, *ci) if ci else value))

    clip = _load(cfg.run_dir("text_encoder") / "eval.json")
    add("01", "RS-CLIP zero-shot scene accuracy", clip, "zero_shot_accuracy")
    add("01", "autoencoder PSNR (dB)", clip, "psnr_db")
    s1 = _load(cfg.run_dir("stage_one") / "eval.json")
    add("02", "stage one scene agreement", s1, "scene_agreement")
    add("02", "stage one FID (RS-CLIP)", s1, "fid_rsclip")
    add("02", "stage one CLIPScore (RS-CLIP)", s1, "clip_score")
    crs = _load(cfg.run_dir("crs_diff") / "eval.json")
    settings = crs.get("settings", [])
    for setting, key, label in (("road", "road_iou", "CRS-Diff road IoU, road map alone"),
                                ("segmentation", "road_iou", "CRS-Diff road IoU, segmentation map alone"),
                                ("all six maps", "road_iou", "CRS-Diff road IoU, all six maps"),
                                ("all six maps", "miou", "CRS-Diff mIoU, all six maps")):
        row = _row(settings, "setting", setting)
        add("03", label, row, key)
    add("03", "CRS-Diff cloud cover Spearman", crs, "cloud_spearman")
    add("03", "CRS-Diff content margin, within scene type", crs, "content_margin_in_scene")
    add("03", "the same, caption only (no content image)", crs, "content_margin_in_scene_caption_only")
    ccd = _load(cfg.run_dir("cc_diff") / "eval.json")
    rows = ccd.get("rows", [])
    for method, key, label in (("cc_diff", "map50", "CC-Diff YOLOScore mAP50"),
                               ("real test images", "map50", "real images' mAP50"),
                               ("cc_diff", "context", "CC-Diff context coherence"),
                               ("no_bridge", "context", "no-bridge context coherence"),
                               ("gligen", "map50", "GLIGEN-style mAP50")):
        add("04", label, _row(rows, "method", method), key)
    tables = cfg.figures_dir() / "tables"
    for name, label in (("d_trainability_detector", "detector trainability"),
                        ("d_trainability_road", "road trainability")):
        path = tables / f"{name}.csv"
        if path.is_file():
            import pandas as pd

            table = pd.read_csv(path)
            # our mAP50 (beside the paper's columns; the paper's own rows have none) or road IoU
            value_cols = [c for c in ("ours: map50", "road_iou") if c in table.columns]
            if value_cols and "method" in table.columns:
                name = value_cols[0].replace("ours: ", "")
                for _, r in table.iterrows():
                    if pd.notna(r[value_cols[0]]):
                        out.append(("05", f"{label} {name}: {r['method']}", r[value_cols[0]]))
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return f"{_fmt(value[0])} [{_fmt(value[1])}, {_fmt(value[2])}]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary(cfg: Preset, timings: dict[str, float]) -> str:
    """The closing report of a run: wall time per notebook, key measures, and where the outputs went."""
    lines = ["", f"== summary (preset {cfg.name})", "", "notebook                               wall time"]
    lines += [f"  {k:<36} {duration(v):>9}" for k, v in timings.items()]
    lines.append(f"  {'total':<36} {duration(sum(timings.values())):>9}")
    measures = key_measures(cfg)
    if measures:
        lines += ["", "key measures (95% bootstrap interval in brackets where measured)"]
        lines += [f"  {nb}  {label:<52} {_fmt(v)}" for nb, label, v in measures]
    fig = cfg.figures_dir()
    lines += ["", f"figures: {_rel(fig)}/" + (" (gallery: figures/README.md)" if cfg.name == "cpu" else ""),
              f"tables: {_rel(fig / 'tables')}/", f"executed notebooks: {_rel(cfg.run_dir('notebooks'))}/"]
    return "\n".join(lines)


def strip_outputs(path: Path) -> bool:
    """Remove outputs and execution counts from a notebook; True if it changed."""
    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            cell.outputs, cell.execution_count = [], None
            changed = True
    if changed:
        nbformat.write(nb, path)
    return changed


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(prog="python -m rslib.notebooks", description=__doc__)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--only", nargs="*", help="notebook prefixes, e.g. 00 02")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="settings for every notebook by dotted key, e.g. seed=3 crs.steps=20 runs_dir=/tmp/runs")
    p.add_argument("--strip", action="store_true", help="strip outputs from the source notebooks and exit")
    args = p.parse_args(argv)
    if args.strip:
        for path in notebooks():
            if strip_outputs(path):
                print(f"stripped {path.name}")
        return 0
    try:
        overrides = parse_overrides(args.set)
        get_preset(args.preset, **overrides)  # a wrong key or value stops here, not in the first notebook
    except ValueError as e:
        p.error(str(e))
    run_notebooks(args.preset, args.only, overrides=overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
