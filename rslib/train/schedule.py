"""Train the main job's models ahead of the notebooks, several at a time.

Small models use a few CPU cores poorly: on 2 cores one stage-one training step (batch 32, 64 px) takes 211 ms
with 2 threads and 325 ms with 1, and two trainings side by side, one thread each, still take 326 ms a step
each, so they do 1.3 times the work of one after the other. :func:`train_ahead` runs the trainings the
notebooks would run, in separate processes, ``jobs`` at a time with ``cores // jobs`` threads each, in an
order their inputs allow; a task that nothing else can run beside (stage one, which every later model
needs) gets the whole machine. Every task is the same call a notebook makes, writing the same stamped folder,
so the notebooks then find the models finished and go on to show and measure them. Each task's output goes to
``runs/<preset>/logs/<task>.log``.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from rslib.config import Preset


@dataclass(frozen=True)
class Task:
    """One training: ``run(cfg)`` in its own process once the tasks named in ``needs`` are done. ``solo``: run
    alone with every core (started when nothing else runs; later tasks wait for it)."""

    name: str
    run: Callable[[Preset], Any]  # a module-level function or a functools.partial of one (it is pickled)
    needs: tuple[str, ...] = ()
    solo: bool = False


def main_job_tasks(cfg: Preset) -> list[Task]:
    """The trainings of notebooks 01-05 at ``cfg``, longest chains first."""
    from rslib.eval import engine
    from rslib.eval.detector import train_detector
    from rslib.eval.segmenter import train_segmenter
    from rslib.train.autoencoder import train_autoencoder
    from rslib.train.cc_diff import train_cc_diff
    from rslib.train.crs_diff import train_crs_diff, train_fusion_ablation
    from rslib.train.stage_one import train_stage_one
    from rslib.train.text_encoder import train_text_encoder

    quiet = {"progress": False}
    return [
        Task("autoencoder", partial(train_autoencoder, **quiet)),
        Task("text_encoder", partial(train_text_encoder, **quiet)),
        Task("segmenter", partial(train_segmenter, **quiet)),
        Task("detector", partial(train_detector, **quiet)),
        Task("engine_segmenters", partial(engine.train_real_only, section="seg")),
        Task("engine_detectors", partial(engine.train_real_only, section="det")),
        Task("stage_one", partial(train_stage_one, **quiet), needs=("autoencoder", "text_encoder"), solo=True),
        Task("crs_diff", partial(train_crs_diff, **quiet), needs=("stage_one",)),
        Task("cc_diff", partial(train_cc_diff, mode="cc_diff", **quiet), needs=("stage_one",)),
        # the CC-Diff variants share cc_diff's cached latents and reference bank: after it, not beside it
        Task("cc_diff_no_bridge", partial(train_cc_diff, mode="no_bridge", **quiet), needs=("cc_diff",)),
        Task("cc_diff_gligen", partial(train_cc_diff, mode="gligen", **quiet), needs=("cc_diff",)),
        *[Task(f"ablation_{f}", partial(train_fusion_ablation, fusion=f), needs=("stage_one",))
          for f in ("aff", "ff", "sum")],
    ]


def _run_task(run: Callable[[Preset], Any], cfg: Preset, threads: int, log_path: str) -> None:
    """Child process: ``threads`` torch threads, stdout and stderr into the log, then the task."""
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    import torch

    torch.set_num_threads(threads)
    run(cfg)


def train_ahead(cfg: Preset, jobs: int = 2, tasks: Sequence[Task] | None = None, cores: int | None = None,
                poll: float = 0.5) -> dict[str, float]:
    """Run ``tasks`` (default: :func:`main_job_tasks`) ``jobs`` at a time; returns {task: seconds} and writes it
    to ``runs/<preset>/logs/train_ahead.json``. A failed task stops the rest and raises, naming its log."""
    tasks = list(main_job_tasks(cfg) if tasks is None else tasks)
    names = {t.name for t in tasks}
    for t in tasks:
        unknown = set(t.needs) - names
        if unknown:
            raise ValueError(f"task {t.name!r} needs {sorted(unknown)}, which are not among the tasks")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    cores = cores or os.cpu_count() or 1
    log_dir = cfg.run_dir("logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")  # a fresh interpreter per task: no threads or torch state inherited
    pending, running, seconds = list(tasks), {}, {}
    t_start = time.time()

    def log_of(name: str) -> Path:
        return log_dir / f"{name}.log"

    try:
        while pending or running:
            for name, (proc, t0, task) in list(running.items()):
                if proc.is_alive():
                    continue
                proc.join()
                del running[name]
                if proc.exitcode != 0:
                    tail = log_of(name).read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"training task {name!r} failed (exit code {proc.exitcode}); its log, "
                                       f"{log_of(name)}, ends with:\n{tail}")
                seconds[name] = round(time.time() - t0, 1)
                print(f"[{time.time() - t_start:6.0f} s] done  {name} in {seconds[name]:.0f} s", flush=True)
            for task in list(pending):
                if len(running) >= jobs or any(t.solo for _, _, t in running.values()):
                    break
                if not all(n in seconds for n in task.needs):
                    continue
                if task.solo and running:
                    break  # it waits for the machine, and the tasks after it wait for it
                threads = cores if task.solo or jobs == 1 else max(1, cores // jobs)
                proc = ctx.Process(target=_run_task, args=(task.run, cfg, threads, str(log_of(task.name))),
                                   name=f"rslib-{task.name}")
                proc.start()
                running[task.name] = (proc, time.time(), task)
                pending.remove(task)
                print(f"[{time.time() - t_start:6.0f} s] start {task.name} ({threads} thread"
                      f"{'s' if threads > 1 else ''}, log {log_of(task.name)})", flush=True)
                if task.solo:
                    break
            if pending and not running and not any(all(n in seconds for n in t.needs) for t in pending):
                raise RuntimeError(f"tasks {[t.name for t in pending]} wait on each other")
            time.sleep(poll)
    finally:
        for proc, _, _ in running.values():
            proc.terminate()
            proc.join()
    seconds["total"] = round(time.time() - t_start, 1)
    (log_dir / "train_ahead.json").write_text(json.dumps({"jobs": jobs, "cores": cores, "seconds": seconds}, indent=1))
    return seconds


__all__ = ["Task", "main_job_tasks", "train_ahead"]
