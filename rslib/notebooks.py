"""Run the course notebooks in order through papermill (the main job), and keep sources free of outputs.

``python -m rslib.notebooks --preset cpu`` executes every notebook under
``notebooks/`` into ``runs/<preset>/notebooks/`` and records each one's wall
time in ``runs/<preset>/timings.json`` (and ``figures/timings.md`` for the cpu
preset, next to the figures the notebooks write). With ``--train-jobs N`` (the
default at the cpu preset: 2), after notebook 00 has made the data, the models
of notebooks 01-05 are trained N at a time (:mod:`rslib.train.schedule`), and
the notebooks find them finished.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nbformat

from rslib.config import REPO_ROOT, get_preset

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The course notebooks in order (optionally those whose name starts with one of ``only``)."""
    paths = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
    return paths


AHEAD = "models trained ahead"  # the timings entry of rslib.train.schedule.train_ahead


def default_train_jobs(preset: str) -> int:
    """Trainings run side by side before the notebooks: 2 at the cpu preset on 2 or more cores, else 1 (none
    ahead: each notebook trains its own models)."""
    return 2 if preset == "cpu" and (os.cpu_count() or 1) >= 2 else 1


def run_notebooks(preset: str = "cpu", only: list[str] | None = None, parameters: dict | None = None,
                  train_jobs: int = 1) -> dict[str, float]:
    """Execute the notebooks at a preset; returns {notebook: seconds}. ``train_jobs`` > 1: train the models
    that many at a time once the data exist (after notebook 00), before the notebooks that show them."""
    import papermill

    cfg = get_preset(preset)
    out_dir = cfg.run_dir("notebooks")
    out_dir.mkdir(parents=True, exist_ok=True)
    timings_path = cfg.run_dir("timings.json")
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for path in notebooks(only):
        print(f"== {path.name} (preset {preset})", flush=True)
        t0 = time.time()
        papermill.execute_notebook(str(path), str(out_dir / path.name), parameters={"preset": preset, **(parameters or {})},
                                   cwd=str(NOTEBOOK_DIR), kernel_name="python3", progress_bar=False)
        timings[path.stem] = round(time.time() - t0, 1)
        print(f"   {timings[path.stem]:.0f} s", flush=True)
        timings_path.write_text(json.dumps(timings, indent=1))
        if path.name.startswith("00") and train_jobs > 1:
            from rslib.train.schedule import train_ahead

            print(f"== training the models {train_jobs} at a time (logs in {cfg.run_dir('logs')})", flush=True)
            timings[AHEAD] = train_ahead(cfg, jobs=train_jobs)["total"]
            timings_path.write_text(json.dumps(timings, indent=1))
    if preset == "cpu":
        write_timings_table(timings, cfg.figures_dir() / "timings.md")
    return timings


def write_timings_table(timings: dict[str, float], path: Path) -> None:
    """A markdown table of notebook wall times."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["| notebook | wall time (s) |", "| --- | ---: |"]
    order = sorted(k for k in timings if k != AHEAD)
    if AHEAD in timings:  # it runs after notebook 00
        order.insert(1 if order and order[0].startswith("00") else 0, AHEAD)
    lines += [f"| {k} | {timings[k]:.0f} |" for k in order]
    lines.append(f"| **total** | **{sum(timings.values()):.0f}** |")
    path.write_text("Wall time of each notebook at the cpu preset (2 CPU cores).\n\n" + "\n".join(lines) + "\n")


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
    p.add_argument("--strip", action="store_true", help="strip outputs from the source notebooks and exit")
    p.add_argument("--train-jobs", type=int, default=None,
                   help="train the models this many at a time before notebooks 01-05 (default: 2 at the cpu preset "
                        "on 2+ cores, else 1: each notebook trains its own); only when all notebooks run")
    args = p.parse_args(argv)
    if args.strip:
        for path in notebooks():
            if strip_outputs(path):
                print(f"stripped {path.name}")
        return 0
    jobs = default_train_jobs(args.preset) if args.train_jobs is None else args.train_jobs
    timings = run_notebooks(args.preset, args.only, train_jobs=1 if args.only else jobs)
    print("wall time per notebook:", json.dumps(timings), f"total {sum(timings.values()):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
