"""Run the course notebooks in order through papermill (the main job), and keep sources free of outputs.

``python -m rslib.notebooks --preset cpu`` executes every notebook under
``notebooks/`` into ``runs/<preset>/notebooks/`` and records each one's wall
time in ``runs/<preset>/timings.json`` (and ``figures/timings.md`` for the cpu
preset, next to the figures the notebooks write).
"""
from __future__ import annotations

import argparse
import json
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


def run_notebooks(preset: str = "cpu", only: list[str] | None = None, parameters: dict | None = None) -> dict[str, float]:
    """Execute the notebooks at a preset; returns {notebook: seconds}."""
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
    if preset == "cpu":
        write_timings_table(timings, cfg.figures_dir() / "timings.md")
    return timings


def write_timings_table(timings: dict[str, float], path: Path) -> None:
    """A markdown table of notebook wall times."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["| notebook | wall time (s) |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in sorted(timings.items())]
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
    args = p.parse_args(argv)
    if args.strip:
        for path in notebooks():
            if strip_outputs(path):
                print(f"stripped {path.name}")
        return 0
    timings = run_notebooks(args.preset, args.only)
    print("wall time per notebook:", json.dumps(timings), f"total {sum(timings.values()):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
