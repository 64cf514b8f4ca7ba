"""Training ahead: tasks run in their own processes in an order their inputs allow, write the folders the
notebooks reuse, and a failure names its log."""
from __future__ import annotations

import json
from functools import partial

import pytest

from rslib.config import get_preset
from rslib.notebooks import AHEAD, write_timings_table
from rslib.train.autoencoder import train_autoencoder
from rslib.train.schedule import Task, main_job_tasks, train_ahead
from rslib.train.stage_one import is_finished, train_stage_one
from rslib.train.text_encoder import train_text_encoder


def _tasks():
    quiet = {"progress": False}
    return [Task("autoencoder", partial(train_autoencoder, **quiet)),
            Task("text_encoder", partial(train_text_encoder, **quiet)),
            Task("stage_one", partial(train_stage_one, **quiet), needs=("autoencoder", "text_encoder"), solo=True)]


def test_tasks_train_side_by_side_and_the_notebooks_find_them_finished(tmp_path):
    cfg = get_preset("smoke", runs_dir=str(tmp_path))
    seconds = train_ahead(cfg, jobs=2, tasks=_tasks(), cores=2, poll=0.1)
    assert set(seconds) == {"autoencoder", "text_encoder", "stage_one", "total"}
    assert is_finished(cfg.run_dir("stage_one"))
    record = json.loads((cfg.run_dir("logs") / "train_ahead.json").read_text())
    assert record["jobs"] == 2 and record["seconds"] == seconds
    log = (cfg.run_dir("logs") / "stage_one.log").read_text()
    assert "Traceback" not in log
    # the notebook's call returns the finished folder without training again
    mtime = (cfg.run_dir("stage_one") / "stage_one.json").stat().st_mtime
    assert train_stage_one(cfg, progress=False) == cfg.run_dir("stage_one")
    assert (cfg.run_dir("stage_one") / "stage_one.json").stat().st_mtime == mtime


def test_a_failed_task_raises_naming_its_log(tmp_path):
    cfg = get_preset("smoke", runs_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"(?s)'stage_one' failed .*stage_one\.log.*run notebook 01"):
        train_ahead(cfg, tasks=[Task("stage_one", partial(train_stage_one, progress=False))], poll=0.1)


def test_bad_task_graphs_are_refused(tmp_path):
    cfg = get_preset("smoke", runs_dir=str(tmp_path))
    with pytest.raises(ValueError, match="needs .'autoencoder'."):
        train_ahead(cfg, tasks=[Task("stage_one", train_stage_one, needs=("autoencoder",))])
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        train_ahead(cfg, jobs=0, tasks=[])


def test_main_job_tasks_come_after_their_inputs():
    tasks = main_job_tasks(get_preset("cpu"))
    order = [t.name for t in tasks]
    assert len(set(order)) == len(order)
    for t in tasks:
        assert all(order.index(n) < order.index(t.name) for n in t.needs), t.name
    assert {"stage_one", "crs_diff", "cc_diff", "cc_diff_gligen", "ablation_sum", "engine_detectors"} <= set(order)


def test_timings_table_puts_the_models_trained_ahead_after_notebook_00(tmp_path):
    write_timings_table({"01_b": 3.0, "00_a": 1.0, AHEAD: 10.0}, tmp_path / "t.md")
    rows = [line.split("|")[1].strip() for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["notebook", "00_a", AHEAD, "01_b", "**total**"]
